"""Structured answers end to end on the tiny model: guided decoding keeps a labelling job's
answers inside its label set or JSON schema, per row and per job; rows offering tools get a
tool-call parse outcome and the manifest counts them."""

from __future__ import annotations

import json
import os

import jsonschema
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.integration

LABELS = ["positive", "negative", "neutral"]
SCHEMA = {
    "type": "object",
    "properties": {"label": {"enum": LABELS}, "confidence": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["label", "confidence"],
    "additionalProperties": False,
}
WEATHER = {"name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "City"}},
                          "required": ["city"]}}


def rows(out) -> dict:
    return {r["id"]: r for r in pq.read_table(os.path.join(out, "parts")).to_pylist()}


def test_label_sets_and_schemas_are_enforced(generate_job, tmp_path):
    reviews = [f"Review {i}: the product was {'great' if i % 2 else 'awful'}." for i in range(60)]
    table = pa.table({
        "prompt": [f"Label the sentiment: {r}" for r in reviews],
        "response_format": [
            json.dumps({"type": "choice", "choices": LABELS}) if i % 2 == 0
            else json.dumps({"type": "json_schema", "json_schema": {"name": "label", "schema": SCHEMA}})
            for i in range(60)
        ],
        "temperature": [1.0] * 60,
        "max_tokens": [40] * 60,
    })
    pq.write_table(table, tmp_path / "label.parquet")
    manifest, out = generate_job(str(tmp_path / "label.parquet"))
    got = rows(out)
    for i in range(60):
        r = got[f"label.parquet#{i}"]
        assert r["error"] is None
        if i % 2 == 0:
            assert r["response"] in LABELS
        else:
            jsonschema.validate(json.loads(r["response"]), SCHEMA)
    assert manifest["counts"]["errors"] == 0


def test_job_level_response_format(generate_job, tmp_path):
    pq.write_table(pa.table({"prompt": [f"item {i}" for i in range(30)]}), tmp_path / "p.parquet")
    _, out = generate_job(str(tmp_path / "p.parquet"),
                          "response_format={type: choice, choices: [yes, no]}")
    assert {r["response"] for r in rows(out).values()} <= {"yes", "no"}


def test_rows_offering_tools_are_parsed_and_counted(generate_job, tmp_path):
    messages = [json.dumps([{"role": "user", "content": f"Weather in city {i}?"}]) for i in range(20)]
    table = pa.table({
        "messages": messages,
        "tools": [json.dumps([WEATHER])] * 20,
        # Half the rows are forced (by guided decoding) to answer with a call in Llama 3.1's JSON form.
        "response_format": [
            json.dumps({"type": "json_schema", "json_schema": {
                "type": "object",
                "properties": {"name": {"const": "get_weather"},
                               "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                                              "required": ["city"], "additionalProperties": False}},
                "required": ["name", "parameters"], "additionalProperties": False}})
            if i % 2 == 0 else None
            for i in range(20)
        ],
        "max_tokens": [60] * 20,
    })
    pq.write_table(table, tmp_path / "tools.parquet")
    manifest, out = generate_job(str(tmp_path / "tools.parquet"))
    got = rows(out)
    for i in range(0, 20, 2):
        r = got[f"tools.parquet#{i}"]
        assert r["tool_parse"] == "parsed", r
        assert r["response"] == ""
        call = r["tool_calls"][0]
        assert call["name"] == "get_weather" and isinstance(json.loads(call["arguments"])["city"], str)
    assert all(got[f"tools.parquet#{i}"]["tool_parse"] is not None for i in range(1, 20, 2))
    assert manifest["counts"]["tool_parse"]["parsed"] >= 10
    assert sum(manifest["counts"]["tool_parse"].values()) == 20
