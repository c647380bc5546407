"""Requests in the Workers AI input schema of `@cf/meta/llama-3.1-8b-instruct-awq`.

One input row is one request. `parse_request` turns a row's request fields into a `Request`
with the schema's defaults applied, or raises `RequestError` listing *every* problem found
(field, value, rule), so a bad row becomes one clear error row instead of a crash.

Pure module: stdlib + jsonschema only.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any, Mapping

import jsonschema

from pipeline.errors import UserError

# Every request field the schema defines, plus the extensions (docs/sampling.md, "Extensions"):
# `response_format` (structured output enforced by guided decoding), `stop`, `min_tokens`,
# `logprobs` and `top_logprobs` (as vLLM and OpenAI's API take them). Input columns with other
# names are not part of the request: they are ignored, or copied to the output when configured.
REQUEST_FIELDS = (
    "prompt", "raw", "messages", "tools", "functions", "image", "stream",
    "max_tokens", "temperature", "top_p", "top_k", "seed",
    "repetition_penalty", "frequency_penalty", "presence_penalty", "lora", "response_format",
    "stop", "min_tokens", "logprobs", "top_logprobs",
)
EXTENSION_FIELDS = ("response_format", "stop", "min_tokens", "logprobs", "top_logprobs")
# Fields that hold nested data: they may arrive as Arrow nested columns or as JSON text.
NESTED_FIELDS = ("messages", "tools", "functions", "response_format")
# Stop strings per request, and the alternatives per position vLLM returns at most (its default
# max_logprobs; the engine is started with this limit).
MAX_STOP_STRINGS = 16
MAX_TOP_LOGPROBS = 20
MESSAGE_ROLES = ("system", "user", "assistant", "tool", "ipython")

# Deeper JSON than this is refused as a row error: no request needs it, and Python's decoder
# and the validators recurse once per level.
MAX_NESTING = 100

DEFAULT_MAX_TOKENS = 256
DEFAULT_TEMPERATURE = 0.6


class RequestError(UserError):
    """A request that breaks the schema. `problems` holds one line per broken rule; it becomes the
    row's error, on one line."""

    def __init__(self, problems: list[str]):
        super().__init__(problems)
        self.args = ("; ".join(self.problems),)

    def __str__(self) -> str:
        return self.args[0]


@dataclass(frozen=True)
class Request:
    mode: str  # "prompt" or "messages"
    prompt: str | None = None
    raw: bool = False
    messages: tuple[dict, ...] | None = None
    tools: tuple[dict, ...] = ()  # normalised to {"type": "function", "function": {...}}
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    lora: str | None = None
    response_format: dict | None = None  # normalised, see pipeline.response_format.validate_response_format
    stream: bool = False  # accepted; a batch job has nothing to stream
    # Extensions; None: the row gives none, and the job's setting applies.
    stop: tuple[str, ...] | None = None
    min_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None

    @property
    def tool_names(self) -> tuple[str, ...]:
        return tuple(t["function"]["name"] for t in self.tools)

    def conversation(self) -> list[dict]:
        """The chat messages this request stands for (a prompt is one user message)."""
        if self.mode == "messages":
            return [dict(m) for m in self.messages]
        return [{"role": "user", "content": self.prompt}]


@lru_cache(maxsize=1)
def input_schema() -> dict:
    text = resources.files("pipeline").joinpath("spec/input-schema.json").read_text()
    return json.loads(text)


@lru_cache(maxsize=2)
def _branch_validator(mode: str) -> jsonschema.Draft7Validator:
    """Validator for one branch of the schema's oneOf.

    The row's mode is decided first (exactly one of prompt / messages), so errors are reported
    against that branch rather than as jsonschema's opaque "not valid under any of oneOf".
    Tools and functions are checked by `pipeline.tool_definitions`, whose messages name the broken path.
    """
    title = "Prompt" if mode == "prompt" else "Messages"
    branch = next(b for b in input_schema()["oneOf"] if b["title"] == title)
    props = {k: v for k, v in branch["properties"].items() if k not in ("tools", "functions", "image")}
    # The schema lists `lora` under prompt mode only; an adapter serves chat requests just as well,
    # so messages mode accepts it with the same rule.
    props.setdefault("lora", {"type": "string"})
    return jsonschema.Draft7Validator({"type": "object", "properties": props, "required": branch["required"]})


def parse_request(fields: Mapping[str, Any]) -> Request:
    """Validate one row's request fields and apply the schema's defaults.

    `fields` maps field names to the row's values; `None` means the column is absent or null
    for this row. Nested fields may be JSON text or already-decoded lists/dicts.
    """
    problems: list[str] = []
    values: dict[str, Any] = {}
    for name in REQUEST_FIELDS:
        value = fields.get(name)
        if value is None:
            continue
        if name in NESTED_FIELDS:
            try:
                value = decode_nested(value)
            except ValueError as exc:
                problems.append(f"{name}: {exc}")
                continue
        elif isinstance(value, float) and math.isnan(value):
            problems.append(f"{name}: must be a number (got NaN)")
            continue
        elif name == "lora" and isinstance(value, str) and not value.strip():
            continue  # "" is how dataframes often spell "no adapter" (fillna("")): the base model
        bad_text = _invalid_text(value, name)
        if bad_text:
            problems.append(bad_text)
            continue
        values[name] = value

    given = {name for name in ("prompt", "messages") if fields.get(name) is not None}
    if given - set(values):  # given, but already refused above: nothing more to say about the mode
        raise RequestError(problems)
    has_prompt, has_messages = "prompt" in values, "messages" in values
    if has_prompt == has_messages:
        problems.append(
            "request: give exactly one of 'prompt' (prompt mode) or 'messages' (messages mode)"
            + (", not both" if has_prompt else "; neither is set")
        )
        raise RequestError(problems)
    mode = "prompt" if has_prompt else "messages"

    if "image" in values:
        problems.append("image: not supported: Llama 3.1 8B Instruct reads text only; remove the image")
    if mode == "prompt":
        for name in ("tools", "functions"):
            if name in values:
                problems.append(f"{name}: only allowed with 'messages' (the schema's prompt mode has no {name})")
    else:
        if "raw" in values:
            problems.append("raw: only allowed with 'prompt' (messages are always rendered with the chat template)")

    problems.extend(_schema_problems(mode, values))
    problems.extend(_extra_problems(mode, values))
    problems.extend(extension_problems(values))

    tools: tuple[dict, ...] = ()
    if mode == "messages" and ("tools" in values or "functions" in values):
        from pipeline.tool_definitions import ToolSpecError, normalize_tools

        try:
            tools = tuple(normalize_tools(values.get("tools"), values.get("functions")))
        except ToolSpecError as exc:
            problems.extend(exc.problems)

    response_format = None
    if "response_format" in values:
        from pipeline.response_format import ResponseFormatError, validate_response_format

        try:
            response_format = validate_response_format(values["response_format"])
        except ResponseFormatError as exc:
            problems.extend(f"response_format: {p}" for p in exc.problems)

    if problems:
        raise RequestError(problems)

    def number(name):
        return float(values[name]) if name in values else None

    return Request(
        mode=mode,
        prompt=values.get("prompt"),
        raw=bool(values.get("raw", False)),
        messages=tuple(values["messages"]) if mode == "messages" else None,
        tools=tools,
        max_tokens=int(values.get("max_tokens", DEFAULT_MAX_TOKENS)),
        temperature=float(values.get("temperature", DEFAULT_TEMPERATURE)),
        top_p=number("top_p"),
        top_k=int(values["top_k"]) if "top_k" in values else None,
        seed=int(values["seed"]) if "seed" in values else None,
        repetition_penalty=number("repetition_penalty"),
        frequency_penalty=number("frequency_penalty"),
        presence_penalty=number("presence_penalty"),
        lora=values.get("lora"),
        response_format=response_format,
        stream=bool(values.get("stream", False)),
        stop=_stop_strings(values["stop"]) if "stop" in values else None,
        min_tokens=int(values["min_tokens"]) if "min_tokens" in values else None,
        logprobs=values.get("logprobs"),
        top_logprobs=int(values["top_logprobs"]) if "top_logprobs" in values else None,
    )


def decode_nested(value: Any) -> Any:
    """A nested field's value as plain JSON data, from JSON text or from an Arrow nested cell.

    Arrow structs hold every key of every row's shape, with nulls where a row has none, and
    Parquet cannot tell a missing key from a null one: null keys are dropped.
    """
    if isinstance(value, (bytes, bytearray)):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"not valid UTF-8 text (byte {exc.object[exc.start]:#04x} at position {exc.start})") from None
    if isinstance(value, str):
        if _depth_exceeds(value, MAX_NESTING):
            raise ValueError(f"nested more than {MAX_NESTING} levels deep")
        try:
            return json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not valid JSON text ({exc.msg} at character {exc.pos})") from None
        except RecursionError:
            raise ValueError(f"nested more than {MAX_NESTING} levels deep") from None
    try:
        return _drop_nulls(value)
    except RecursionError:
        raise ValueError(f"nested more than {MAX_NESTING} levels deep") from None


def _depth_exceeds(text: str, limit: int) -> bool:
    """Whether JSON text opens more than `limit` brackets at once (strings are skipped), found
    without recursion so that a hostile cell costs one pass over its characters."""
    if text.count("[") + text.count("{") <= limit:
        return False
    depth, in_string, escaped = 0, False, False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > limit:
                return True
        elif ch in "]}":
            depth -= 1
    return False


def _drop_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        # An Arrow map cell reads back as a list of (key, value) pairs.
        if value and all(isinstance(v, tuple) and len(v) == 2 and isinstance(v[0], str) for v in value):
            return {k: _drop_nulls(v) for k, v in value if v is not None}
        return [_drop_nulls(v) for v in value]
    return value


def _schema_problems(mode: str, values: dict) -> list[str]:
    errors = sorted(_branch_validator(mode).iter_errors(values), key=lambda e: list(e.absolute_path))
    return [_describe(e) for e in errors]


def _describe(error: jsonschema.ValidationError) -> str:
    path = _path(error.absolute_path) or "request"
    rule, got = error.validator, error.instance
    limit = error.validator_value
    text = {
        "type": f"must be of type {limit}",
        "minimum": f"must be >= {limit}",
        "maximum": f"must be <= {limit}",
        "minLength": f"must be at least {limit} character{'s' if limit != 1 else ''} long",
        "maxLength": f"must be at most {limit} characters long",
    }.get(rule)
    if rule == "required":
        missing = [k for k in limit if isinstance(got, dict) and k not in got]
        return "; ".join(f"{path}.{k}: required, but missing" for k in missing) or f"{path}: {error.message}"
    if text is None:
        return f"{path}: {error.message}"
    if rule in ("minLength", "maxLength") and isinstance(got, str):
        return f"{path}: {text} (got {len(got)} characters)"
    return f"{path}: {text} (got {_short(got)})"


def _extra_problems(mode: str, values: dict) -> list[str]:
    """Rules the schema leaves implicit but a generation engine needs."""
    problems = []
    max_tokens = values.get("max_tokens")
    if isinstance(max_tokens, (int, float)) and not isinstance(max_tokens, bool) and max_tokens < 1:
        problems.append(f"max_tokens: must be >= 1 (got {_short(max_tokens)})")
    if mode == "messages" and isinstance(values.get("messages"), list):
        messages = values["messages"]
        if not messages:
            problems.append("messages: must hold at least one message (got an empty list)")
        for i, message in enumerate(messages):
            if isinstance(message, dict) and isinstance(message.get("role"), str):
                if message["role"] not in MESSAGE_ROLES:
                    problems.append(
                        f"messages[{i}].role: must be one of {', '.join(MESSAGE_ROLES)} (got {_short(message['role'])})"
                    )
    return problems


def extension_problems(values: Mapping[str, Any], prefix: str = "") -> list[str]:
    """What is wrong with the extension fields `stop`, `min_tokens`, `logprobs` and
    `top_logprobs` in `values` (a row's, or the job's with `prefix` ""), one line each."""
    problems = []
    if values.get("stop") is not None:
        stop = values["stop"]
        strings = [stop] if isinstance(stop, str) else stop
        if not isinstance(strings, list) or not all(isinstance(x, str) and x for x in strings):
            problems.append(f"{prefix}stop: must be a non-empty string or a list of them (got {_short(stop)})")
        elif len(strings) > MAX_STOP_STRINGS:
            problems.append(f"{prefix}stop: at most {MAX_STOP_STRINGS} strings (got {len(strings)})")
    for name, low, high in (("min_tokens", 0, None), ("top_logprobs", 0, MAX_TOP_LOGPROBS)):
        value = values.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) or value < low \
                or (high is not None and value > high):
            bound = f"between {low} and {high}" if high is not None else f">= {low}"
            problems.append(f"{prefix}{name}: must be an integer {bound} (got {_short(value)})")
    if values.get("logprobs") is not None and not isinstance(values["logprobs"], bool):
        problems.append(f"{prefix}logprobs: must be true or false (got {_short(values['logprobs'])})")
    max_tokens, min_tokens = values.get("max_tokens"), values.get("min_tokens")
    if all(isinstance(v, int) and not isinstance(v, bool) for v in (max_tokens, min_tokens)) and min_tokens > max_tokens:
        problems.append(f"{prefix}min_tokens: must be <= max_tokens ({max_tokens}) (got {min_tokens})")
    return problems


def _stop_strings(stop: str | list[str]) -> tuple[str, ...]:
    return (stop,) if isinstance(stop, str) else tuple(stop)


def _invalid_text(value: Any, path: str) -> str | None:
    """A problem if a string inside `value` is not valid Unicode: JSON text can spell a lone
    surrogate (\\ud800), which no tokenizer or Parquet writer accepts."""
    stack = [(value, path)]
    while stack:
        item, where = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError as exc:
                code = ord(item[exc.start])
                return f"{where}: holds \\u{code:04x} at character {exc.start}, a lone surrogate that is not valid Unicode"
        elif isinstance(item, dict):
            stack.extend((v, f"{where}.{k}") for k, v in item.items())
            stack.extend((k, f"{where} key") for k in item if isinstance(k, str))
        elif isinstance(item, (list, tuple)):
            stack.extend((v, f"{where}[{i}]") for i, v in enumerate(item))
    return None


def _path(parts) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, float) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
