"""Conversations -> token ids with labels on the assistant turns only.

    render with the model's chat template -> character spans of the assistant turns
      -> tokenize (ids + character offsets) -> label = the token id inside a span, IGNORE outside

`assistant_spans` and `build_example` take the renderer and the encoder as functions, so they
run on any template and tokenizer (tests use a byte-level one); `prepare_examples` wires in the
model's own. No torch here.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

IGNORE = -100  # label of tokens that carry no loss (PyTorch cross_entropy's ignore_index)

Render = Callable[..., str]  # render(messages, add_generation_prompt) -> text
Encode = Callable[[str], "tuple[list[int], list[tuple[int, int]]]"]  # text -> (ids, character offsets)


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # the token id where it is trained on, IGNORE elsewhere


def assistant_spans(render: Render, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns.

    A span runs from the end of what the template renders as the generation prompt for
    that turn to the end of the turn (its `<|eot_id|>` included, so the adapter learns to
    stop). Rendering prefixes rather than searching the text keeps this right for any
    template whose rendering of a prefix is a prefix of the whole.
    """
    full = render(messages, add_generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(messages[:i], add_generation_prompt=True)
        through = render(messages[: i + 1], add_generation_prompt=False)
        if not (full.startswith(through) and through.startswith(before)):
            raise ValueError("chat template does not render prefixes as prefixes")
        spans.append((len(before), len(through)))
    return full, spans


def build_example(messages: list[dict], render: Render, encode: Encode, max_seq_len: int) -> Example:
    """The conversation's tokens, labelled where a token starts inside an assistant span, cut to
    `max_seq_len`; a ValueError when no assistant token is left to learn from."""
    text, spans = assistant_spans(render, messages)
    ids, offsets = encode(text)
    labels = [IGNORE] * len(ids)
    j = 0
    for k, (start, _end) in enumerate(offsets):
        while j < len(spans) and start >= spans[j][1]:
            j += 1
        if j < len(spans) and spans[j][0] <= start < spans[j][1]:
            labels[k] = ids[k]
    ids, labels = ids[:max_seq_len], labels[:max_seq_len]
    if all(label == IGNORE for label in labels[1:]):
        raise ValueError("no assistant token within train.max_seq_len")
    return Example(ids, labels)


def label_count(example: Example) -> int:
    """The tokens that carry loss: labels shifted by one, as the next-token loss sees them."""
    return sum(1 for label in example.labels[1:] if label != IGNORE)


def load_tokenizer(model_path: str) -> tuple[Encode, int]:
    """Encode function (ids, character offsets) with the model's own tokenizer.json, the
    same tokenizer the generation job uses, and the padding token id. No special tokens are
    added because the rendered text already starts with <|begin_of_text|>."""
    from tokenizers import Tokenizer

    local = Path(model_path, "tokenizer.json")
    if not local.is_file():
        from pipeline.model_files import resolve_model_file

        local = resolve_model_file(model_path, "tokenizer.json")
    tok = Tokenizer.from_file(str(local))

    def encode(text: str):
        enc = tok.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    pad_id = tok.token_to_id("<|finetune_right_pad_id|>")
    if pad_id is None:
        pad_id = tok.token_to_id("<|eot_id|>") or 0
    return encode, pad_id


def prepare_examples(conversations, model_path: str, date_string: str, max_seq_len: int) -> tuple[list[Example | None], Counter, int]:
    """One example per conversation (None where it cannot be trained on, counted by reason),
    and the padding token id."""
    from pipeline.prompts import ChatTemplate

    template = ChatTemplate.from_model(model_path)
    encode, pad_id = load_tokenizer(model_path)

    def render(messages, add_generation_prompt):
        return template.render(messages, date_string=date_string, add_generation_prompt=add_generation_prompt)

    examples, skipped = examples_from(conversations, render, encode, max_seq_len)
    return examples, skipped, pad_id


def examples_from(conversations, render: Render, encode: Encode, max_seq_len: int) -> tuple[list[Example | None], Counter]:
    """`build_example` over the conversations: None for each one that cannot be trained on,
    counted by reason (a template's own error, e.g. role order, or nothing left to learn)."""
    from jinja2 import TemplateError

    examples: list[Example | None] = []
    skipped = Counter()
    for conv in conversations:
        try:
            examples.append(build_example(conv, render, encode, max_seq_len))
        except TemplateError as exc:  # the template's own raise_exception(), e.g. role order
            examples.append(None)
            skipped[f"chat template: {exc}"[:80]] += 1
        except ValueError as exc:
            examples.append(None)
            skipped[str(exc)] += 1
    return examples, skipped
