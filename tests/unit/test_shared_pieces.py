"""A long piece of prompt text that many rows share (a labelling instruction, a system prompt) is
encoded once per preparer, and every row gets exactly the tokens it would get without that."""

from __future__ import annotations

import json

from pipeline.generate import prepare
from pipeline.generate.prepare import Preparer, shared_pieces_once
from tests.unit.test_hostile_inputs import SPECIAL, TEMPLATE  # a Llama-3-shaped template, its special tokens

INSTRUCTION = "Label the text as positive, negative or neutral. " * 40  # about 2,000 characters


class CountingEncoder:
    """A byte-level stand-in for the tokenizer that records each piece it was asked to encode."""

    def __init__(self):
        self.pieces: list[str] = []

    def __call__(self, text: str) -> list[int]:
        self.pieces.append(text)
        return list(text.encode("utf-8"))


def preparer(encode_literal) -> Preparer:
    return Preparer(template=TEMPLATE, encode=lambda t: list(t.encode("utf-8")), job_seed=0, max_model_len=8192,
                    special_token_ids=SPECIAL, encode_literal=encode_literal)


def labelling_rows(n: int) -> list[str]:
    return [json.dumps({"messages": [{"role": "system", "content": INSTRUCTION},
                                     {"role": "user", "content": f"Text number {i}: fine."}]}) for i in range(n)]


def test_rows_sharing_a_long_instruction_get_the_same_tokens_with_the_instruction_encoded_once():
    counting, plain = CountingEncoder(), CountingEncoder()
    remembered = preparer(counting)
    rows = labelling_rows(200)
    got = [remembered.prepare_row(f"r{i}", r) for i, r in enumerate(rows)]
    # What each row gets is what encoding every piece afresh gives.
    want = [preparer(plain).prepare_row(f"r{i}", r) for i, r in enumerate(rows)]
    assert [g["_prompt_token_ids"] for g in got] == [w["_prompt_token_ids"] for w in want]
    long_pieces = [p for p in counting.pieces if len(p) >= prepare.SHARED_PIECE_CHARS]
    assert len(long_pieces) == 1 and INSTRUCTION.strip() in long_pieces[0]
    assert len([p for p in plain.pieces if len(p) >= prepare.SHARED_PIECE_CHARS]) == 200
    # Each row's own short text is encoded for it: short pieces are never remembered.
    assert sum("Text number" in p for p in counting.pieces) == 200


def test_remembered_pieces_are_bounded_and_the_least_recent_is_dropped():
    counting = CountingEncoder()
    encode = shared_pieces_once(counting)
    pieces = [f"{i:04d}" + "x" * prepare.SHARED_PIECE_CHARS for i in range(prepare.SHARED_PIECES + 1)]
    for p in pieces:
        assert list(encode(p)) == list(p.encode("utf-8"))
    encode(pieces[-1])  # still remembered
    assert len(counting.pieces) == prepare.SHARED_PIECES + 1
    encode(pieces[0])  # the least recent, dropped when the last one came: encoded again
    assert len(counting.pieces) == prepare.SHARED_PIECES + 2
