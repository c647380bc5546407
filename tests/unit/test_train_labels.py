"""Assistant-only labels (`pipeline.train.labels`) with Meta's Llama 3.1 chat template and a
byte-level tokenizer: no model, no torch."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.prompts import ChatTemplate
from pipeline.train.labels import IGNORE, Example, assistant_spans, build_example, examples_from, label_count

TEMPLATE = (Path(__file__).resolve().parents[2] / "pipeline" / "templates" / "llama-3.1-instruct.jinja").read_text()
LLAMA = ChatTemplate(TEMPLATE, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "First answer."},
    {"role": "user", "content": "Again?"},
    {"role": "assistant", "content": "Second answer, déjà vu."},
]


def render(messages, add_generation_prompt):
    return LLAMA.render(messages, date_string="26 Jul 2024", add_generation_prompt=add_generation_prompt)


def encode_bytes(text: str):
    """One token per UTF-8 byte; each byte's offsets are its character's (as `tokenizers` gives
    for a byte-level BPE)."""
    ids, offsets = [], []
    for i, ch in enumerate(text):
        for b in ch.encode():
            ids.append(b)
            offsets.append((i, i + 1))
    return ids, offsets


def labelled_runs(example: Example) -> list[str]:
    """The labelled stretches of the example, decoded."""
    runs, current = [], []
    for token, label in zip(example.input_ids, example.labels):
        if label != IGNORE:
            assert label == token
            current.append(token)
        elif current:
            runs.append(bytes(current).decode())
            current = []
    if current:
        runs.append(bytes(current).decode())
    return runs


def test_labels_cover_exactly_each_assistant_answer_and_its_eot():
    example = build_example(CONV, render, encode_bytes, max_seq_len=4096)
    assert labelled_runs(example) == ["First answer.<|eot_id|>", "Second answer, déjà vu.<|eot_id|>"]
    text = bytes(example.input_ids).decode()
    assert text == render(CONV, add_generation_prompt=False)
    assert text.startswith("<|begin_of_text|>") and "Today Date: 26 Jul 2024" in text


def test_spans_are_the_answers_after_the_generation_prompt():
    text, spans = assistant_spans(render, CONV)
    assert [text[a:b] for a, b in spans] == ["First answer.<|eot_id|>", "Second answer, déjà vu.<|eot_id|>"]
    assert text[: spans[0][0]].endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_system_and_user_turns_carry_no_loss():
    convo = [{"role": "user", "content": "Only a question"}, {"role": "assistant", "content": "A"}]
    example = build_example(convo, render, encode_bytes, max_seq_len=4096)
    assert labelled_runs(example) == ["A<|eot_id|>"]
    assert label_count(example) == len("A<|eot_id|>")


def test_a_token_is_labelled_by_where_it_starts():
    """A token that starts before an answer and runs into it carries no loss; one that starts
    inside it does."""
    def render_plain(messages, add_generation_prompt):
        text = "".join(f"[{m['role']}]{m['content']}|" for m in messages)
        return text + ("[assistant]" if add_generation_prompt else "")

    def encode_pairs(text):  # two characters a token
        offsets = [(i, min(i + 2, len(text))) for i in range(0, len(text), 2)]
        return list(range(1, len(offsets) + 1)), offsets

    convo = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "abcd"}]
    text, ((start, end),) = assistant_spans(render_plain, convo)
    assert text[start:end] == "abcd|" and start % 2 == 1  # the answer starts mid-token
    example = build_example(convo, render_plain, encode_pairs, max_seq_len=100)
    labelled = [off for off, label in zip(encode_pairs(text)[1], example.labels) if label != IGNORE]
    assert labelled == [(s, e) for s, e in encode_pairs(text)[1] if start <= s < end]
    assert labelled[0][0] == start + 1


def test_truncation_keeps_the_first_tokens_and_needs_an_answer_left():
    full = build_example(CONV, render, encode_bytes, max_seq_len=4096)
    cut = build_example(CONV, render, encode_bytes, max_seq_len=len(full.input_ids) - 5)
    assert cut.input_ids == full.input_ids[:-5] and cut.labels == full.labels[:-5]
    first_answer = full.labels.index(next(label for label in full.labels if label != IGNORE))
    with pytest.raises(ValueError, match="no assistant token within train.max_seq_len"):
        build_example(CONV, render, encode_bytes, max_seq_len=first_answer)


def test_a_template_that_does_not_render_prefixes_as_prefixes_is_refused():
    def reversed_render(messages, add_generation_prompt):
        return "".join(m["content"] for m in reversed(messages)) + ("?" if add_generation_prompt else "")

    with pytest.raises(ValueError, match="does not render prefixes as prefixes"):
        assistant_spans(reversed_render, [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])


def test_conversations_that_cannot_train_are_counted_by_reason():
    from jinja2 import TemplateError

    def strict_render(messages, add_generation_prompt):
        if any(m["content"] == "bad" for m in messages):
            raise TemplateError("Conversation roles must alternate")
        return render(messages, add_generation_prompt)

    convs = [
        CONV,
        [{"role": "user", "content": "bad"}, {"role": "assistant", "content": "x"}],
        [{"role": "system", "content": "long " * 200}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
    ]
    examples, skipped = examples_from(convs, strict_render, encode_bytes, max_seq_len=512)
    assert examples[0] is not None and examples[1:] == [None, None]
    assert skipped == {"chat template: Conversation roles must alternate": 1,
                       "no assistant token within train.max_seq_len": 1}


def test_label_count_skips_the_first_position():
    # The next-token loss predicts labels[1:]: a label on the first token is never trained on.
    assert label_count(Example([1, 2, 3], [1, IGNORE, 3])) == 1
