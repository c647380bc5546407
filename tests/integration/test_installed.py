"""Installed, the project works outside its checkout: a wheel built from the project's files,
installed into a folder of its own, gives console scripts that train an adapter and generate
with it from an empty directory, with the configs shipped inside the package."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.build_train_sample import write_sample_dataset
from tests.conftest import ROOT, model_cache

pytestmark = pytest.mark.integration

# What the wheel is built from: pyproject.toml's packages (conf/ ships as pipeline.conf).
SOURCES = ("pyproject.toml", "README.md", "pipeline", "conf")


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The wheel, installed with --target: (its folder, an environment that imports from it first)."""
    tmp = tmp_path_factory.mktemp("installed")
    src = tmp / "src"
    src.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "wheel"), str(src)], check=True)
    target = tmp / "site"
    (wheel,) = (tmp / "wheel").glob("*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True)
    env = {**os.environ, "PYTHONPATH": str(target), "PIPELINE_CACHE": str(model_cache().parent),
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false"}
    return target, env


def test_installed_package_and_configs_come_from_the_wheel(installed, tmp_path):
    target, env = installed
    where = subprocess.run(
        [sys.executable, "-c", "import pipeline, pipeline.conf; print(pipeline.__file__); print(pipeline.conf.__file__)"],
        cwd=tmp_path, env=env, capture_output=True, text=True, check=True,
    ).stdout.split()
    assert all(Path(p).is_relative_to(target) for p in where), where
    assert sorted(p.name for p in (target / "pipeline" / "conf").glob("*.yaml")) == ["generate.yaml", "serve.yaml",
                                                                                     "train_lora.yaml"]
    assert (target / "pipeline" / "serve" / "playground.html").is_file()


def test_installed_server_refuses_to_listen_beyond_this_machine_without_a_token(installed, tmp_path):
    target, env = installed
    env = {k: v for k, v in env.items() if k != "LLAMA_BATCH_SERVE_TOKEN"}
    refused = subprocess.run([str(target / "bin" / "llama-batch-serve"), "model=tiny", "host=0.0.0.0"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2, refused.stderr[-4000:]
    assert "LLAMA_BATCH_SERVE_TOKEN" in refused.stderr and "Traceback" not in refused.stderr


def test_console_scripts_train_then_generate_from_an_empty_directory(installed, tiny_model_dir, tmp_path):
    """The README's flow with the installed commands, in a directory with nothing of the project in it:
    relative paths (data, registry `lora/`, outputs) are the user's, the configs are the package's."""
    target, env = installed
    work = tmp_path / "work"
    work.mkdir()
    write_sample_dataset(work / "train.parquet", n=16)
    train = subprocess.run(
        [str(target / "bin" / "llama-batch-train"), "adapter.name=hello", "data.path=train.parquet",
         "train.max_steps=2", "train.log_every=1"],
        cwd=work, env=env, capture_output=True, text=True, timeout=600,
    )
    assert train.returncode == 0, train.stderr[-4000:]
    assert json.loads((work / "lora" / "hello" / "manifest.json").read_text())["adapter"] == "hello"

    prompts = [f"Question {i}?" for i in range(24)]
    pq.write_table(pa.table({
        "prompt": prompts, "max_tokens": [6] * 24, "lora": [None, "hello"] * 12,
    }), work / "requests.parquet")
    gen = subprocess.run(
        [str(target / "bin" / "llama-batch-generate"), "model=tiny", "input=requests.parquet", "output.path=out",
         "engine.kv_cache_gib=0.25", "ray.num_cpus=2"],
        cwd=work, env=env, capture_output=True, text=True, timeout=600,
    )
    assert gen.returncode == 0, gen.stderr[-4000:]
    rows = pq.read_table(work / "out" / "parts").to_pylist()
    assert len(rows) == 24 and not any(r["error"] for r in rows)
    assert all(r["completion_tokens"] > 0 for r in rows)
    manifest = json.loads((work / "out" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["counts"]["ok"] == 24
    assert list(manifest["adapters"]) == ["hello"]  # loaded by name from the user's registry, lora/
    assert (work / "out" / "logs" / "generate.log").exists()
