"""The generation job on a CUDA GPU (skipped elsewhere): the tiny model through the GPU build of
vLLM, and the same seeded rows as on any other run of the job on that GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _has_cuda() -> bool:
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0
    except FileNotFoundError:
        return False


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _has_cuda(), reason="needs an NVIDIA GPU")]


@pytest.mark.parametrize("batch_invariant", ["false", "true"])
def test_job_on_gpu_is_reproducible(tiny_model_dir, tmp_path, batch_invariant):
    """Batch sizes 64 and 7 give the same rows; with engine.batch_invariant=true vLLM's
    batch-invariant kernels guarantee it rather than the tiny float model's luck. The engines run
    in vLLM's multiprocess mode (`pipeline.generate.resources.engine_multiprocessing`)."""
    import pyarrow.parquet as pq

    outputs = []
    for name, extra in (("a", ["workers=1", "batch_size=64"]), ("b", ["workers=1", "batch_size=7"])):
        extra = [*extra, f"engine.batch_invariant={batch_invariant}"]
        out = tmp_path / name
        proc = subprocess.run(
            [sys.executable, "-m", "jobs.generate", "model=tiny", f"model.path={tiny_model_dir}", "device=gpu",
             "engine.gpu_memory_utilization=0.3", "input=data/sample_requests.parquet", f"output.path={out}", *extra],
            cwd=ROOT, capture_output=True, text=True, timeout=900,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        # On a GPU the engine runs vLLM's engine core in its own process (its throughput mode).
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["resources"]["engine_multiprocessing"] is True
        assert "(EngineCore pid=" in (out / "logs" / "generate.log").read_text()
        outputs.append({r["id"]: r["response"] for r in pq.read_table(os.path.join(out, "parts")).to_pylist()})
    assert outputs[0] == outputs[1] and len(outputs[0]) == 200
