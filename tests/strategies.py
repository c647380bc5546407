"""Hypothesis strategies for requests in the model's input schema, valid and broken."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import strategies as st

text = st.text(min_size=0, max_size=40)
roles = st.sampled_from(["system", "user", "assistant", "tool", "ipython", "robot", ""])
message = st.fixed_dictionaries({"role": roles, "content": text}, optional={"name": text})
good_tool = st.fixed_dictionaries(
    {
        "name": st.text(alphabet="abcdefghij_", min_size=1, max_size=8),
        "description": text,
        "parameters": st.just({"type": "object", "properties": {"x": {"type": "string", "description": "x"}}}),
    }
)
bad_tool = st.one_of(st.just({"name": "f"}), st.just({"type": "function", "function": {}}), st.integers())

# Each field: mostly values inside the schema, sometimes outside it or of the wrong type.
FIELDS = {
    "max_tokens": st.one_of(st.integers(1, 24), st.integers(-5, 0), st.just("8")),
    "temperature": st.one_of(st.floats(0, 5), st.floats(5.01, 50), st.floats(-2, -0.01), st.just(float("nan"))),
    "top_p": st.one_of(st.floats(0, 2), st.floats(2.01, 9)),
    "top_k": st.one_of(st.integers(1, 50), st.integers(51, 100), st.integers(-3, 0)),
    "seed": st.one_of(st.integers(1, 9_999_999_999), st.integers(-10, 0), st.integers(10**10, 10**12)),
    "repetition_penalty": st.one_of(st.floats(0, 2), st.floats(2.01, 5)),
    "frequency_penalty": st.floats(-1, 3),
    "presence_penalty": st.floats(-1, 3),
    "raw": st.booleans(),
    "stream": st.booleans(),
    "lora": st.one_of(st.just("no-such-adapter"), st.just("")),
    "image": st.just([1, 2, 3]),
}


@st.composite
def request_rows(draw) -> dict:
    row: dict = {}
    mode = draw(st.sampled_from(["prompt", "messages", "both", "neither"]))
    if mode in ("prompt", "both"):
        row["prompt"] = draw(st.one_of(text, st.just("")))
    if mode in ("messages", "both"):
        msgs = draw(st.lists(message, min_size=0, max_size=4))
        row["messages"] = json.dumps(msgs) if draw(st.booleans()) else msgs
        if draw(st.booleans()):
            row["tools"] = draw(st.lists(st.one_of(good_tool, good_tool, bad_tool), min_size=1, max_size=3))
    if draw(st.integers(0, 9)) == 0:
        row["messages"] = "{not json"
    for name, strategy in FIELDS.items():
        if draw(st.integers(0, 3)) == 0:
            row[name] = draw(strategy)
    return row


def to_table(rows: list[dict]) -> pa.Table:
    """The rows as an Arrow table: a column keeps its natural type where its values share one,
    and falls back to JSON text where they do not (as users' files do)."""
    names = sorted({k for r in rows for k in r})
    columns = {}
    for name in names:
        values = [r.get(name) for r in rows]
        try:
            columns[name] = pa.array(values)
            # Parquet cannot hold every Arrow type (a struct with no fields): such a column is
            # written as JSON text, as a user's writer would have to.
            pq.write_table(pa.table({name: columns[name]}), pa.BufferOutputStream())
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError):
            columns[name] = pa.array([None if v is None else json.dumps(v) for v in values], pa.string())
    if not names:
        columns["prompt"] = pa.nulls(len(rows), pa.string())
    return pa.table(columns)
