"""Fixtures for tests that run the real jobs: one Ray instance per test session, and the real
Hydra configs composed with CPU-sized overrides."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import compose

ROOT = Path(__file__).resolve().parents[2]

# Engines in-process start in seconds instead of half a minute; the job's workers set this too.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def ray_session(s3_server):
    """Ray for the session. Its workers inherit the environment at `ray.init`, so the S3 server
    (its AWS_* variables) starts first: a worker can then read and write the tests' buckets."""
    import ray

    if not ray.is_initialized():
        from pipeline.generate.ray_session import environment

        # PIPELINE_WNA16_FALLBACK=on: 4-bit (AWQ) layers take the path of CPUs without vLLM's
        # 4-bit kernel (AVX2), whatever this machine's CPU; float models are unaffected. Set for
        # Ray's workers only (they inherit the environment Ray starts with, as in a job's own Ray),
        # not for the engines the tests start in this process.
        with environment({"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false",
                           "PIPELINE_WNA16_FALLBACK": "on"}):
            ray.init(
                # A Ray of the session's own, never another that runs on this machine (a server under
                # test, another checkout's tests): those would refuse num_cpus, or mix workloads.
                address="local",
                num_cpus=2,
                include_dashboard=False,
                log_to_driver=False,
            )
    yield ray
    ray.shutdown()


@pytest.fixture
def generate_job(ray_session, tiny_model_dir, tmp_path):
    """Run the generation job in-process on the real config with the tiny model."""
    from pipeline.generate.job import run

    def _run(input, *overrides, output=None, on_batch=None):
        output = output or str(tmp_path / "out")
        cfg = compose(
            "generate",
            [
                "model=tiny",
                f"model.path={tiny_model_dir}",
                f"input={input}",
                f"output.path={output}",
                "engine.kv_cache_gib=0.25",
                "ray.shutdown=false",
                "progress=false",
                *overrides,
            ],
        )
        return run(cfg, on_batch=on_batch), output

    return _run
