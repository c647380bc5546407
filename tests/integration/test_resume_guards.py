"""No change can slip into a resumed job, and no two runs write one output folder.

A finished job's folder is rerun after each change that would alter its tokens: an adapter
retrained under the same name, a model file edited, the chat template edited, `compact_json`
flipped, two rows of an input swapped. Each rerun is refused before any engine starts, naming the
change; undone, the rerun finds the job complete. Then two drivers on one folder: the second is
refused naming the first, and the first's rows come out exactly once."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.generate.sinks import OutputError

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def publish_adapter(model_dir: Path, root: Path, name: str, seed: int) -> None:
    """A PEFT adapter with random weights, published in the registry as training would."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from pipeline.lora_registry import AdapterRegistry

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS,
                                                  init_lora_weights=False))
    with AdapterRegistry(root).staging(name, overwrite=True) as staging:
        peft_model.save_pretrained(staging)
        (staging / "manifest.json").write_text(json.dumps({"base_model": {"name": "tiny-llama-3.1",
                                                                          "path": str(model_dir)}}))


def test_a_resume_that_would_change_tokens_is_refused(generate_job, tiny_model_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    registry = tmp_path / "lora"
    publish_adapter(model, registry, "bonjour", seed=1)
    src = tmp_path / "in.parquet"
    rows = [{"prompt": f"row {i} says", "max_tokens": 4, "lora": "bonjour" if i % 3 == 0 else None} for i in range(90)]
    pq.write_table(pa.Table.from_pylist(rows), src, row_group_size=30)
    job = ("model.build=null", f"model.path={model}", f"lora_root={registry}")
    out = str(tmp_path / "out")
    first, _ = generate_job(str(src), *job, output=out)
    assert first["counts"]["errors"] == 0

    def refused(*overrides) -> str:
        with pytest.raises(OutputError) as info:
            generate_job(str(src), *job, *overrides, output=out)
        return str(info.value)

    publish_adapter(model, registry, "bonjour", seed=2)  # retrained under the same name
    assert "adapters.bonjour: " in refused()
    publish_adapter(model, registry, "bonjour", seed=1)  # the same bytes again: the same adapter

    config = model / "config.json"
    original = config.read_text()
    config.write_text(json.dumps({**json.loads(original), "rms_norm_eps": 1e-6}))
    assert "model.files.config.json: " in refused()
    config.write_text(original)

    tokenizer_config = model / "tokenizer_config.json"
    original = tokenizer_config.read_text()
    data = json.loads(original)
    data["chat_template"] = data["chat_template"].replace("Today Date: ", "Date: ")
    tokenizer_config.write_text(json.dumps(data))
    message = refused()
    assert "model.template: " in message and "model.files.tokenizer_config.json: " in message
    tokenizer_config.write_text(original)

    assert "config.engine.compact_json: true -> false" in refused("engine.compact_json=false")

    swapped = list(rows)
    swapped[10], swapped[20] = swapped[20], swapped[10]
    pq.write_table(pa.Table.from_pylist(swapped), src, row_group_size=30)
    assert "input file in.parquet changed" in refused()
    pq.write_table(pa.Table.from_pylist(rows), src, row_group_size=30)

    again, _ = generate_job(str(src), *job, output=out)  # everything undone: complete as it was
    assert again["finished_at"] == first["finished_at"] and again["counts"] == first["counts"]


def test_two_drivers_on_one_folder(generate_job, tiny_model_dir, tmp_path):
    src = tmp_path / "in.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": f"row {i}", "max_tokens": 8} for i in range(400)]), src)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "jobs.generate", "model=tiny", f"model.path={tiny_model_dir}", f"input={src}",
           f"output.path={out}", "engine.kv_cache_gib=0.25", "ray.num_cpus=2", "progress=false", "batch_size=20",
           "output.rows_per_part=40"]
    first = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"})
    try:
        deadline = time.time() + 300
        while not (out / "job.json").exists():
            assert first.poll() is None and time.time() < deadline, "the first run ended before it held the folder"
            time.sleep(0.05)
        with pytest.raises(OutputError, match=rf"is in use by another run of the job \(host .*, pid {first.pid},"):
            generate_job(str(src), output=str(out))
        assert first.wait(timeout=600) == 0, first.stderr.read()[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
    rows = pq.read_table(out / "parts").to_pylist()
    assert sorted(r["id"] for r in rows) == sorted(f"in.parquet#{i}" for i in range(400))
    manifest, _ = generate_job(str(src), output=str(out))  # the first has finished: nothing left to do
    assert manifest["counts"]["rows_out"] == 400
