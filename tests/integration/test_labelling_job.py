"""Labelling and synthetic data through the real job on the tiny model: templates over plain
columns, n answers per row (ids, seeds, resume), stop strings and min_tokens, logprobs, label
probabilities, limit previews, and the recipes run as the README shows them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.integration

PROMPTS = [f"Tell me something about item {i}." for i in range(16)]


def rows_of(path) -> dict[str, dict]:
    return {r["id"]: r for r in pq.read_table(os.path.join(path, "parts")).to_pylist()}


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("in") / "prompts.parquet"
    pq.write_table(pa.table({"prompt": PROMPTS, "max_tokens": [12] * 16, "temperature": [1.0] * 16}), path)
    return path


@pytest.fixture
def job(ray_session, tiny_model_dir):
    """The generation job in-process on the real config with the tiny model."""
    from pipeline.generate.job import run
    from tests.conftest import compose

    def _run(input, output, *overrides, on_batch=None):
        cfg = compose("generate", ["model=tiny", f"model.path={tiny_model_dir}", f"input={input}",
                                   f"output.path={output}", "engine.kv_cache_gib=0.25", "ray.shutdown=false",
                                   "progress=false", *overrides])
        return run(cfg, on_batch=on_batch)

    return _run


def test_logprobs_and_n_answers_per_row_with_resume(job, prompts_file, tmp_path):
    one = tmp_path / "one"
    job(prompts_file, one, "top_logprobs=3")
    single = rows_of(one)
    for r in single.values():
        assert r["error"] is None and len(r["logprobs"]) == r["completion_tokens"]
        assert all(t["logprob"] is None or t["logprob"] <= 0 for t in r["logprobs"])
        assert all(len(t["top_logprobs"]) == 3 for t in r["logprobs"])
        tops = [[a["logprob"] for a in t["top_logprobs"]] for t in r["logprobs"]]
        assert all(x == sorted(x, reverse=True) for x in tops)

    three = tmp_path / "three"
    manifest = job(prompts_file, three, "n=3", "batch_size=4", "output.rows_per_part=12")
    answers = rows_of(three)
    assert sorted(answers) == sorted(f"{i}#{k}" for i in single for k in range(3))
    assert manifest["counts"]["rows_out"] == 48 and manifest["counts"]["rows_in"] == 48
    for row_id, r in single.items():
        first = answers[f"{row_id}#0"]
        # The first answer of n is the one answer of n=1: same seed, same prompt, same tokens.
        assert (first["seed"], first["response"], first["sample"]) == (r["seed"], r["response"], 0)
        assert len({answers[f"{row_id}#{k}"]["seed"] for k in range(3)}) == 3
    assert len({r["response"] for r in answers.values()}) > len(single)  # the answers differ

    # Interrupted once the first part is committed, then rerun: every answer once, identical.
    resumed = tmp_path / "resumed"
    seen = []

    def stop_after_first_part(batch):
        seen.append(batch.num_rows)
        if sum(seen) >= 12:
            raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        job(prompts_file, resumed, "n=3", "batch_size=4", "output.rows_per_part=12", on_batch=stop_after_first_part)
    committed = pq.read_table(resumed / "parts").num_rows
    assert 12 <= committed < 48 and committed % 3 == 0 and not (resumed / "manifest.json").exists()
    manifest = job(prompts_file, resumed, "n=3", "batch_size=4", "output.rows_per_part=12")
    assert manifest["counts"]["rows_resumed"] == committed
    assert rows_of(resumed) == answers
