"""retry=errors through the real job on the tiny model: the failed rows of a finished output are
generated again and put in their place, every id still exactly once, the other rows untouched."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import UserError
from pipeline.sampling import retry_seed

pytestmark = pytest.mark.integration


def parts_rows(out) -> list[dict]:
    rows = []
    for name in sorted(os.listdir(out / "parts")):
        rows.extend(pq.read_table(out / "parts" / name).to_pylist())
    return rows


def test_retry_redoes_engine_errors_and_truncated_rows_in_place(generate_job, tmp_path):
    src = tmp_path / "in.parquet"
    n = 24
    pq.write_table(pa.table({
        "prompt": [f"Describe thing number {i}." for i in range(n)],
        "max_tokens": [3 if i % 3 == 0 else 40 for i in range(n)],
        "temperature": [0.9] * n,
    }), src)
    out = tmp_path / "out"
    common = ["batch_size=8", "output.rows_per_part=8"]
    generate_job(str(src), *common, output=str(out))
    before = parts_rows(out)
    parts_before = {name: pq.read_table(out / "parts" / name).num_rows for name in os.listdir(out / "parts")}

    # Two rows as an engine that failed them would have left them (a transient engine fault).
    failed = {before[4]["id"], before[13]["id"]}
    for name in sorted(os.listdir(out / "parts")):
        table = pq.read_table(out / "parts" / name)
        rows = table.to_pylist()
        for r in rows:
            if r["id"] in failed:
                r.update(response=None, tool_calls=None, prompt_tokens=None, completion_tokens=None,
                         finish_reason=None, error="engine error: RuntimeError: the engine dropped the request")
        pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), out / "parts" / name)
    # Cut off with fewer tokens than retry_max_tokens: the rows of max_tokens 3 (those of 40 are not redone).
    # (A row the engine failed is redone for that, with its own max_tokens.)
    truncated = {r["id"] for r in before if r["finish_reason"] == "length" and r["completion_tokens"] < 16} - failed
    assert len(truncated) >= 4

    manifest, _ = generate_job(str(src), *common, "retry=errors", "retry_max_tokens=16", output=str(out))
    after = parts_rows(out)
    assert sorted(r["id"] for r in after) == sorted(r["id"] for r in before)  # every id, exactly once
    assert {name: pq.read_table(out / "parts" / name).num_rows for name in os.listdir(out / "parts")} == parts_before
    redone = failed | truncated
    old = {r["id"]: r for r in before}
    for r in after:
        if r["id"] not in redone:
            assert r == old[r["id"]]  # untouched, byte for byte
            continue
        assert r["error"] is None and r["seed"] == retry_seed(old[r["id"]]["seed"], 1)
        if r["id"] in truncated:
            assert r["completion_tokens"] > 3 or r["finish_reason"] == "stop"
    entry = manifest["retries"][-1]
    assert entry["attempt"] == 1 and entry["ids"] == sorted(redone) and entry["rows"] == len(redone)
    assert entry["reasons"] == {"error": 2, "length": len(truncated)}
    assert manifest["counts"]["errors"] == 0 and manifest["counts"]["rows_out"] == n
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["retries"] == manifest["retries"]

    # Nothing left that retry=errors (without retry_max_tokens) would redo.
    again, _ = generate_job(str(src), *common, "retry=errors", output=str(out))
    assert len(again["retries"]) == 1


def test_retry_needs_a_finished_output_of_the_same_job(generate_job, tmp_path):
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"]}), src)
    with pytest.raises(UserError, match="holds no output of this job"):
        generate_job(str(src), "retry=errors", output=str(tmp_path / "nothing"))
    assert not (tmp_path / "nothing").exists()
