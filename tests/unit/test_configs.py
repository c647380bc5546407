"""Every config composes, with every model, and resolves into valid job settings."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from pipeline.config import ConfigError, generation_settings

CONF = Path(__file__).resolve().parents[2] / "conf"
MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))


def composed(name, overrides=()):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=name, overrides=list(overrides))


def test_the_production_model_is_the_default():
    cfg = composed("generate")
    assert cfg.model.name == "llama-3.1-8b-instruct-awq"
    assert cfg.model.path == "hugging-quants/Meta-Llama-3.1-8B-Instruct-AWQ-INT4"
    assert cfg.model.train_path == "meta-llama/Llama-3.1-8B-Instruct"


@pytest.mark.parametrize("model", MODELS)
def test_generate_composes_with_every_model(model):
    settings = generation_settings(composed("generate", [f"model={model}"]))
    assert settings["engine"]["max_model_len"] == settings["model"]["max_model_len"]
    assert settings["engine"]["dtype"] == settings["model"]["dtype"]
    assert settings["input"] and settings["output"]["path"].startswith("/")


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
