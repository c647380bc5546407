"""Rendering conversations with a model's chat template, exactly as Hugging Face transformers does.

`ChatTemplate.render(messages, tools=...)` gives the same text as
``tokenizer.apply_chat_template(messages, tools=..., tokenize=False)``: the template runs in the
same Jinja environment transformers builds (``transformers/utils/chat_template_utils.py``): an
immutable sandbox with ``trim_blocks``/``lstrip_blocks`` and loop controls, its ``tojson`` filter
(no HTML escaping, ``indent``/``separators``/``sort_keys`` options), ``raise_exception`` and
``strftime_now``, and the ``{% generation %}`` tag, with the tokenizer's named special tokens
(``bos_token``, ``eos_token``, ...) in the context.

Pure module (jinja2 and the standard library): the workers that render prompts need neither
torch nor transformers.
"""

from __future__ import annotations

import json
import os
import re
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping, Sequence

import jinja2
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from pipeline.model_files import ModelFileNotFound, resolve_model_file

TOKENIZER_CONFIG = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
# The named special tokens transformers passes to every template (its SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class _GenerationTag(Extension):
    """``{% generation %}...{% endgeneration %}``: transformers uses it to mark assistant text for
    training masks; rendering just emits the body, so templates that use it still parse."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    def _render_body(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


class ChatTemplate:
    """A compiled chat template and the special tokens it is rendered with."""

    def __init__(
        self,
        template: str,
        bos_token: str | None = None,
        eos_token: str | None = None,
        **special_tokens: str | None,
    ):
        """`template`: the Jinja source. Special tokens given as None are left out of the context,
        as transformers leaves out those a tokenizer does not define."""
        unknown = set(special_tokens) - set(SPECIAL_TOKEN_NAMES)
        if unknown:
            raise TypeError(f"unknown special token names {sorted(unknown)}; expected some of {SPECIAL_TOKEN_NAMES}")
        tokens = {"bos_token": bos_token, "eos_token": eos_token, **special_tokens}
        self.source = template
        self.special_tokens = {k: v for k, v in tokens.items() if v is not None}
        self._compiled = _environment().from_string(template)

    @classmethod
    def from_model(
        cls, name_or_path: str | os.PathLike, template_name: str | None = None, revision: str | None = None
    ) -> "ChatTemplate":
        """The template of a model: a local folder, or a hub id found in the Hugging Face cache.

        Reads ``tokenizer_config.json``; a ``chat_template.jinja`` beside it takes precedence, as
        in transformers. Where the config holds several named templates, `template_name` picks
        one (default: ``"default"``).
        """
        config_path = resolve_model_file(name_or_path, TOKENIZER_CONFIG, revision)
        config = json.loads(config_path.read_text(encoding="utf-8"))
        template = _read_template(config_path.parent / CHAT_TEMPLATE_FILE, config, template_name, name_or_path)
        tokens = {name: _token_text(config.get(name)) for name in SPECIAL_TOKEN_NAMES}
        return cls(template, **tokens)

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: Sequence[Mapping[str, Any]] | None = None,
        date_string: str | None = None,
        add_generation_prompt: bool = True,
        **template_kwargs: Any,
    ) -> str:
        """The prompt text for `messages` (OpenAI-style dicts: role, content, tool_calls).

        `tools`: JSON schemas of the functions offered. `date_string` is the template's
        "Today Date" (None: the template's own default); pinning it keeps a job's prompts the
        same from one day to the next. Other keyword arguments reach the template as variables
        (e.g. Llama 3.1's ``builtin_tools``, ``tools_in_user_message``), as in transformers.
        """
        if not messages:
            raise ValueError("cannot render an empty conversation: give at least one message")
        if tools is not None and not all(isinstance(t, Mapping) for t in tools):
            raise TypeError("tools must be JSON schemas (dicts)")
        context = dict(self.special_tokens)
        if date_string is not None:
            template_kwargs["date_string"] = date_string
        context.update(template_kwargs)
        return self._compiled.render(
            messages=messages,
            tools=tools,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **context,
        )


def _read_template(jinja_path: Path, config: dict, template_name: str | None, model: str | os.PathLike) -> str:
    if jinja_path.is_file():
        return jinja_path.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if template is None:
        raise ModelFileNotFound(
            f"model {str(model)!r} has no chat template (no {CHAT_TEMPLATE_FILE}, none in {TOKENIZER_CONFIG})"
        )
    if isinstance(template, str):
        return template
    # Several templates, stored as [{"name": ..., "template": ...}, ...].
    named = {t["name"]: t["template"] for t in template}
    name = template_name or "default"
    if name not in named:
        raise KeyError(f"model {str(model)!r} has no chat template named {name!r}; it has {sorted(named)}")
    return named[name]


def _token_text(value) -> str | None:
    # tokenizer_config.json stores a special token as text, or as a serialized AddedToken.
    if isinstance(value, dict):
        return value.get("content")
    return value


class LiteralSpecialTokens:
    """Keeps special-token text inside a request's content as text, never as control tokens.

    A tokenizer matches its special tokens anywhere in the text it is given, so a message whose
    content holds ``<|eot_id|><|start_header_id|>system<|end_header_id|>`` would close its own turn
    and open a system turn. Before rendering, `protect` replaces each special token's text in
    every string of the request with a marker made of Unicode noncharacters (reserved for
    internal use, so no text means anything by them; a literal one is escaped too). After
    rendering, `segments` splits the text at the special tokens the template itself wrote and
    restores the content's text, which is then tokenized with special tokens read as text.
    Tokenizers split at special tokens before anything else, so tokenizing the segments apart
    gives the same ids as tokenizing the whole text wherever content holds no special token.
    """

    MARK, END = "\ufdd0", "\ufdd1"

    def __init__(self, special_tokens: Sequence[str]):
        self.tokens = sorted({t for t in special_tokens if t}, key=lambda t: (-len(t), t))
        self._index = {t: i for i, t in enumerate(self.tokens)}
        self._find = re.compile("|".join(re.escape(t) for t in self.tokens)) if self.tokens else None
        self._marker = re.compile(f"{self.MARK}(m|\\d+){self.END}")

    def protect(self, value: Any) -> Any:
        """`value` (strings, lists, dicts) with special-token text in its strings replaced by markers."""
        if isinstance(value, str):
            text = value.replace(self.MARK, f"{self.MARK}m{self.END}")
            if self._find is not None:
                text = self._find.sub(lambda m: f"{self.MARK}{self._index[m.group(0)]}{self.END}", text)
            return text
        if isinstance(value, Mapping):
            return {k: self.protect(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.protect(v) for v in value]
        return value

    def segments(self, rendered: str) -> list[tuple[str, bool]]:
        """The rendered text as (piece, is_special_token) in order, content pieces restored."""
        out: list[tuple[str, bool]] = []
        pos = 0
        for match in self._find.finditer(rendered) if self._find is not None else ():
            if match.start() > pos:
                out.append((self._restore(rendered[pos : match.start()]), False))
            out.append((match.group(0), True))
            pos = match.end()
        if pos < len(rendered):
            out.append((self._restore(rendered[pos:]), False))
        return out

    def _restore(self, text: str) -> str:
        def back(m: re.Match) -> str:
            key = m.group(1)
            return self.MARK if key == "m" else self.tokens[int(key)]

        return self._marker.sub(back, text)
