"""Property tests: whatever a row holds, preparing it never raises, and it ends as either an
error naming a field or engine-ready parameters within vLLM's ranges."""

from __future__ import annotations

import json
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.generate.planning import Shard
from pipeline.prompts import ChatTemplate
from pipeline.generate.prepare import Preparer, canonical_block
from tests.strategies import request_rows, to_table

TEMPLATE = ChatTemplate(
    (Path(__file__).resolve().parents[2] / "pipeline" / "templates" / "llama-3.1-instruct.jinja").read_text(),
    bos_token="<|begin_of_text|>",
)


def preparer(max_model_len=512) -> Preparer:
    # Stands in for the tokenizer: one id per character, enough to exercise the context check.
    return Preparer(template=TEMPLATE, encode=lambda s: [ord(c) % 2000 for c in s], job_seed=0,
                    max_model_len=max_model_len, date_string="26 Jul 2024",
                    resolve_lora=lambda name: (_ for _ in ()).throw(ValueError(f"unknown adapter '{name}'")))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request_rows())
def test_any_row_prepares_to_an_error_or_valid_parameters(row):
    result = preparer().prepare_row("f#0", json.dumps(row, allow_nan=True))
    assert result["_id"] == "f#0"
    if result.get("_error"):
        assert isinstance(result["_error"], str) and ":" in result["_error"]
        return
    params = json.loads(result["_params"])
    assert 0 <= params["temperature"] <= 2
    assert 0 < params.get("top_p", 1) <= 1
    assert params.get("top_k", 1) >= 1 and params["max_tokens"] >= 1
    assert 0 <= params["seed"] < 2**32
    assert params.get("repetition_penalty", 1) > 0
    assert len(result["_prompt_token_ids"]) + params["max_tokens"] <= 512


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(request_rows(), min_size=1, max_size=30))
def test_any_table_gives_one_prepared_row_per_input_row(rows):
    table = to_table(rows)
    shard = Shard("in.parquet", "in.parquet", (0,), 0, table.num_rows, tuple(table.column_names))
    prepared = preparer().prepare_block(canonical_block(table, shard, None, []))
    assert prepared.column("_id").to_pylist() == [f"in.parquet#{i}" for i in range(len(rows))]
    errors = prepared.column("_error").to_pylist()
    params = prepared.column("_params").to_pylist()
    assert all((e is None) != (p is None) for e, p in zip(errors, params))
