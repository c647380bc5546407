"""Every config composes, with every model, and resolves into valid job settings."""

from __future__ import annotations

from pathlib import Path

import pytest
from pipeline.generate.resources import resolve_resources
from pipeline.generate.settings import ConfigError, GenerationSettings
from tests.conftest import compose

CONF = Path(__file__).resolve().parents[2] / "conf"
MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))


def composed(name, overrides=()):
    return compose(name, overrides)


def generation_settings(cfg):
    return GenerationSettings.from_config(cfg)


def test_the_production_model_is_the_default():
    cfg = composed("generate")
    assert cfg.model.name == "llama-3.1-8b-instruct-awq"
    assert cfg.model.path == "hugging-quants/Meta-Llama-3.1-8B-Instruct-AWQ-INT4"
    assert cfg.model.train_path == "meta-llama/Llama-3.1-8B-Instruct"


@pytest.mark.parametrize("model", MODELS)
def test_generate_composes_with_every_model(model):
    settings = generation_settings(composed("generate", [f"model={model}"]))
    assert settings.engine.max_model_len == settings.model.max_model_len
    assert settings.engine.dtype == settings.model.dtype
    assert settings.input and settings.output.path.startswith("/")


@pytest.mark.parametrize("name", sorted(p.stem for p in CONF.glob("*.yaml")))
def test_every_top_level_config_composes(name):
    cfg = composed(name)
    assert cfg.model.path


def test_config_errors_are_gathered_and_name_the_setting():
    with pytest.raises(ConfigError) as info:
        generation_settings(composed("generate", ["workers=0", "batch_size=0", "device=tpu", "engine.kv_cache_gib=-1",
                                                  "response_format={type: choice, choices: []}"]))
    text = str(info.value)
    for expected in ("workers: must be an integer >= 1 (got 0)", "batch_size: must be an integer >= 1 (got 0)",
                     "device: must be auto, cpu or gpu (got 'tpu')", "engine.kv_cache_gib: must be > 0 GiB",
                     "response_format: "):
        assert expected in text


def test_device_dependent_settings():
    settings = generation_settings(composed("generate", ["model=tiny", "workers=2"]))
    cpu = resolve_resources(settings, 0, 8, 8)
    assert cpu.device == "cpu" and cpu.num_gpus == 0 and cpu.num_cpus == 0.5
    assert cpu.cpu_threads == 4  # the cores shared by the two engines, not Ray's 1
    assert cpu.batches_in_flight == 5  # 4 x 64 rows fill the CPU engine's 256 sequences, 1 waits
    assert cpu.kv_cache_gib == 1.0
    assert settings.engine.kv_cache_gib is None and settings.batches_in_flight is None  # derived, not written back

    gpu = resolve_resources(generation_settings(composed("generate", ["batch_size=100"])), 8, 128, 128)
    assert gpu.device == "gpu" and gpu.num_gpus == 1 and gpu.cpu_threads is None
    assert gpu.batches_in_flight == 12  # ceil(1024 / 100) + 1

    fixed = resolve_resources(generation_settings(composed("generate", ["model=tiny", "batches_in_flight=2",
                                                                        "engine.cpu_threads=1"])), 0, 2, 2)
    assert fixed.batches_in_flight == 2 and fixed.cpu_threads == 1
    with pytest.raises(ConfigError, match=r"batches_in_flight: must be an integer >= 1 \(got 0\)"):
        generation_settings(composed("generate", ["batches_in_flight=0"]))
    with pytest.raises(ConfigError, match="no GPU"):
        resolve_resources(generation_settings(composed("generate", ["device=gpu"])), 0)


def test_settings_are_frozen_and_every_field_is_documented():
    import dataclasses
    import inspect
    import sys

    from pipeline.generate import resources, settings as module

    settings = generation_settings(composed("generate", ["model=tiny"]))
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.engine.max_model_len = 1  # type: ignore[misc]
    for cls in (module.GenerationSettings, module.EngineSettings, module.ModelSettings, module.OutputSettings,
                module.RaySettings, resources.Resources):
        source = inspect.getsource(sys.modules[cls.__module__])  # ModelSettings: pipeline/model_settings.py
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(f.type) or f.name in ("output", "model", "engine", "prompt", "prepare",
                                                              "read", "ray", "lora"):
                continue
            # a field's docstring: the string literal on the line after its declaration
            assert f'    {f.name}: ' in source and source.split(f'    {f.name}: ', 1)[1].split("\n", 2)[1].strip().startswith('"""'), \
                f"{cls.__name__}.{f.name} has no docstring"


@pytest.mark.parametrize("model", MODELS)
def test_both_jobs_read_one_prompt_date_and_one_registry(model):
    generate = composed("generate", [f"model={model}"])
    train = composed("train_lora", [f"model={model}", "adapter.name=x"])
    assert generate.prompt.date_string == train.prompt.date_string == generate.model.date_string
    assert generate.lora_root == train.lora_root == "lora"
    moved = composed("train_lora", [f"model={model}", "adapter.name=x", "lora_root=/shared/lora",
                                    "model.date_string=1 Jan 2025"])
    assert (moved.lora_root, moved.prompt.date_string) == ("/shared/lora", "1 Jan 2025")


def test_the_h100_config_is_a_throughput_config_for_one_gpu_per_engine():
    settings = generation_settings(composed("generate", ["hardware=h100", "workers=8"]))
    resources = resolve_resources(settings, 8, 256, 128)
    assert settings.device == "gpu" and settings.engine.tensor_parallel_size == 1
    assert (settings.engine.max_num_seqs, settings.engine.max_num_batched_tokens) == (1024, 16384)
    assert settings.engine.enable_prefix_caching is True and settings.engine.enforce_eager is False
    assert resources.engine_multiprocessing is True and resources.num_gpus == 1 and resources.num_cpus == 2
    assert resources.batches_in_flight == 5 and resources.kv_cache_gib is None  # 1024 / 256 + 1; vLLM's share
    assert settings.output.rows_per_part == 16384
