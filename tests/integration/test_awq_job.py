"""The generation job with `model=tiny-awq`: the production model's 4-bit code path end to end on the
CPU, with a LoRA adapter on top, through Ray workers that load the project's vLLM plugin from its
entry point.

The Ray workers of this test session run with PIPELINE_WNA16_FALLBACK=on (tests/integration/
conftest.py), so the 4-bit layers take the path an AVX2 CPU takes whatever this machine's CPU is.
That path computes exactly what the float model `dequantize_checkpoint` writes computes, so the two
jobs must agree row for row: greedy and seeded sampling, base rows and adapter rows.
"""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.models.awq import dequantize_checkpoint, ensure_tiny_awq_model
from data.build_train_sample import SAMPLE_ANSWER

from tests.integration.conftest import compose

pytestmark = pytest.mark.integration

QUESTIONS = ["Say hello.", "What is the capital of France?", "Where do penguins live?", "Name a famous painter."]


def read_output(path) -> dict[str, dict]:
    return {r["id"]: r for r in pq.read_table(os.path.join(path, "parts")).to_pylist()}


def job(model_overrides: list[str], input_path, output, lora_root) -> tuple[dict, dict]:
    from pipeline.generate.job import run

    cfg = compose("generate", [
        *model_overrides, f"input={input_path}", f"output.path={output}", f"lora_root={lora_root}",
        "id_column=uid", "engine.kv_cache_gib=0.25", "ray.shutdown=false", "progress=false", "workers=2",
        "batch_size=32",
    ])
    return run(cfg), read_output(output)


def test_job_on_tiny_awq_with_lora_equals_dequantized_float_model(ray_session, tiny_model_dir, tmp_path):
    from pipeline.train.job import run as train

    awq = ensure_tiny_awq_model(tmp_path / "tiny-llama-3.1-awq", float_dir=tiny_model_dir)
    dequantized = dequantize_checkpoint(awq, tmp_path / "tiny-llama-3.1-awq-dequantized")
    awq_model = ["model=tiny-awq", f"model.path={awq}", f"model.train_path={tiny_model_dir}"]

    # Train as a user would for an AWQ model: `model=tiny-awq` trains on its float `train_path`.
    lora_root = tmp_path / "lora"
    manifest = train(compose("train_lora", [*awq_model, f"lora_root={lora_root}", "adapter.name=bonjour"]))
    assert manifest["base_model"]["train_path"] == str(tiny_model_dir)

    rows = []
    for i, q in enumerate(QUESTIONS):
        rows.append({"uid": f"base-{i}", "prompt": q, "temperature": 0.0, "max_tokens": 16, "lora": None})
        rows.append({"uid": f"lora-{i}", "prompt": q, "temperature": 0.0, "max_tokens": 16, "lora": "bonjour"})
    for i in range(160):  # sampled rows, some on the adapter: realistic batches, not a handful
        rows.append({"uid": f"sampled-{i}", "prompt": f"Tell me about item {i}", "temperature": 1.0,
                     "max_tokens": 24 + i % 9, "lora": "bonjour" if i % 3 == 0 else None})
    rows.append({"uid": "unknown-adapter", "prompt": "hi", "temperature": 0.0, "max_tokens": 4, "lora": "nope"})
    source = tmp_path / "requests.parquet"
    pq.write_table(pa.Table.from_pylist(rows), source)

    m_awq, got = job(awq_model, source, tmp_path / "out-awq", lora_root)
    assert m_awq["status"] == "complete"
    assert m_awq["counts"] == {**m_awq["counts"], "rows_in": len(rows), "rows_out": len(rows), "errors": 1}
    assert "unknown-adapter" in got and "bonjour" in got["unknown-adapter"]["error"]
    # The adapter trained on the float weights answers with its trained text on the 4-bit model.
    for i in range(len(QUESTIONS)):
        assert got[f"lora-{i}"]["response"] == SAMPLE_ANSWER, got[f"lora-{i}"]
        assert got[f"base-{i}"]["response"] != SAMPLE_ANSWER
    assert len({r["response"] for k, r in got.items() if k.startswith("sampled-")}) > 150

    # The same job on the float model the 4-bit one stands for (same dtype): the same rows.
    float_model = ["model=tiny", f"model.path={dequantized}", "model.build=null", "model.dtype=float16",
                   f"model.train_path={tiny_model_dir}"]
    _, expected = job(float_model, source, tmp_path / "out-float", lora_root)
    assert sorted(expected) == sorted(got)
    different = [k for k in got if (got[k]["response"], got[k]["error"]) != (expected[k]["response"], expected[k]["error"])]
    assert not different, different[:10]

    settings = json.loads((tmp_path / "out-awq" / "manifest.json").read_text())["settings"]
    assert settings["model"]["path"] == str(awq)
