"""Workers AI's limits for LoRA adapters (`pipeline.train.export.workers_ai_problems`): each
broken limit is named with the fix, all at once."""

from __future__ import annotations

import json

from pipeline.train.export import WORKERS_AI_MAX_BYTES, is_quantized, workers_ai_problems

OK_CONFIG = {"r": 8, "base_model_name_or_path": "meta-llama/Llama-3.1-8B-Instruct"}
OK_FILES = {"adapter_config.json": 900, "adapter_model.safetensors": 40_000_000}


def test_an_adapter_within_every_limit_passes():
    assert workers_ai_problems(OK_CONFIG, OK_FILES) == []


def test_every_broken_limit_is_named():
    config = {"r": 16, "base_model_name_or_path": "hugging-quants/Meta-Llama-3.1-8B-Instruct-AWQ-INT4"}
    files = {"adapter_config.json": 900, "adapter_model.bin": 10}
    assert workers_ai_problems(config, files) == [
        "rank: Workers AI accepts r <= 8 (this adapter: r=16); retrain with train.lora.rank=8 or lower",
        "files: Workers AI needs exactly adapter_config.json and adapter_model.safetensors; missing "
        "adapter_model.safetensors",
        "base model: hugging-quants/Meta-Llama-3.1-8B-Instruct-AWQ-INT4 is a quantized checkpoint; Workers AI "
        "serves LoRA adapters only on non-quantized bases (train on the float weights: model.train_path)",
    ]


def test_size_rank_pattern_and_a_missing_base():
    big = {**OK_FILES, "adapter_model.safetensors": WORKERS_AI_MAX_BYTES}
    (size,) = workers_ai_problems(OK_CONFIG, big)
    assert size.startswith("size: Workers AI accepts adapters under 100 MB (this adapter: 100.0 MB)")
    (rank,) = workers_ai_problems({**OK_CONFIG, "rank_pattern": {"q_proj": 32}}, OK_FILES)
    assert "(this adapter: r=32)" in rank
    (base,) = workers_ai_problems({"r": 4}, OK_FILES)
    assert base.startswith("base model: adapter_config.json names no base_model_name_or_path")


def test_a_local_base_is_quantized_when_its_config_says_so(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "awq"}}))
    assert is_quantized(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert not is_quantized(str(tmp_path)) and not is_quantized("meta-llama/Llama-3.1-8B-Instruct")
