"""Training settings (`pipeline.train.settings`): the real config composes into valid settings,
and every problem is reported at once, naming the setting, the value and the fix."""

from __future__ import annotations

import json
import os

import pytest
from tests.conftest import compose

from pipeline.errors import UserError
from pipeline.train.data import DataError
from pipeline.train.settings import (
    TrainConfigError,
    base_model_name_or_path,
    train_settings,
    training_model_path,
)



def composed(*overrides):
    return compose("train_lora", ["model=tiny", "adapter.name=bonjour", *overrides])


def problems(*overrides) -> list[str]:
    with pytest.raises(TrainConfigError) as info:
        train_settings(composed(*overrides))
    return info.value.problems


def test_the_default_config_is_valid_and_paths_become_absolute():
    s = train_settings(composed())
    assert s["adapter"]["name"] == "bonjour" and s["lora_root"] == os.path.abspath("lora")
    assert s["data"]["path"] == [os.path.abspath("data/train_sample.parquet")]
    assert os.path.isabs(s["model"]["path"])  # a model the job builds
    assert s["prompt"]["date_string"] == "26 Jul 2024" and s["ray"]["address"] is None


def test_a_plain_dict_works_too_and_is_not_changed():
    from omegaconf import OmegaConf

    plain = OmegaConf.to_container(composed("data.path=[./a.parquet, org/dataset]"), resolve=True)
    before = json.dumps(plain, sort_keys=True)
    s = train_settings(plain)
    assert json.dumps(plain, sort_keys=True) == before
    assert s["data"]["path"] == [os.path.abspath("a.parquet"), "org/dataset"]  # a datasets name stays a name


def test_every_problem_is_reported_at_once():
    with pytest.raises(TrainConfigError) as info:
        train_settings(composed("adapter.name=../bad", "train.lora.rank=0", "data.prompt_column=prompt",
                                "train.dtype=float16", "train.scheduler=step", "data.validation_fraction=0.9",
                                "train.max_seq_len=8", "train.lr=0", "model.path=null"))
    err = info.value
    assert isinstance(err, UserError) and isinstance(err, ValueError)
    assert err.problems[1:] == [
        "data.response_column: required with data.prompt_column (the assistant answer's column)",
        "data.validation_fraction: must be a number in [0.0, 0.5] (got 0.9)",
        "train.lora.rank: must be an integer >= 1 (got 0)",
        "train.lr: must be a number in (0.0, 1.0] (got 0)",
        "train.scheduler: linear, cosine, constant or constant_with_warmup (got 'step')",
        "train.max_seq_len: must be an integer >= 16 (got 8)",
        "train.dtype: float32 or bfloat16 (got 'float16')",
        "model.path: required: a Hugging Face model id or a local folder (or pick model=tiny)",
    ]
    assert err.problems[0].startswith("adapter.name: ")
    assert str(err) == "invalid config:\n" + "\n".join(f"- {p}" for p in err.problems)


@pytest.mark.parametrize("overrides, expected", [
    (["adapter.name=???"], "adapter.name: required: the adapter's name in the registry (e.g. adapter.name=bonjour)"),
    (["data.path=null"], "data.path: required: a Parquet file, folder or glob, a JSONL file, or a datasets name"),
    (["data.response_column=a", "data.append_response_column=b"],
     "data.response_column and data.append_response_column: set one (both name the assistant answer's column)"),
    (["data.messages_column=null"], "data.messages_column: set it, or data.prompt_column + data.response_column"),
    (["data.max_rows=0"], "data.max_rows: must be an integer >= 1 or null (got 0)"),
    (["train.lora.target_modules=[]"], "train.lora.target_modules: a list of module names, or 'all-linear' (got [])"),
    (["train.lora.alpha=0"], "train.lora.alpha: must be a number in (0, 1000000.0] (got 0)"),
    (["train.epochs=true"], "train.epochs: must be an integer >= 1 (got True)"),
    (["train.workers=0"], "train.workers: must be an integer >= 1 (got 0)"),
    (["train.cpus_per_worker=0"], "train.cpus_per_worker: must be a number in (0, 1024] (got 0)"),
])
def test_each_problem_names_the_setting_value_and_fix(overrides, expected):
    assert problems(*overrides) == [expected]


def test_a_quantized_checkpoint_needs_its_float_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "awq"}}))
    with pytest.raises(TrainConfigError, match="quantized checkpoint") as info:
        training_model_path({"path": str(tmp_path), "build": None})
    assert info.value.problems[0].startswith(f"model.train_path: {tmp_path} is a quantized checkpoint; set model.train_path")
    assert training_model_path({"path": str(tmp_path), "train_path": "org/float-model"}) == "org/float-model"
    assert training_model_path({"path": "org/hub-model"}) == "org/hub-model"
    with pytest.raises(TrainConfigError, match="model.train_path: required for the AWQ tiny model"):
        training_model_path({"path": str(tmp_path), "build": "tiny-awq"})


def test_the_adapter_records_a_hub_id_or_the_model_name_never_a_local_path(tmp_path):
    assert base_model_name_or_path({"name": "tiny", "path": str(tmp_path)}) == "tiny"
    assert base_model_name_or_path({"name": "awq-8b", "path": "org/awq", "train_path": "org/float"}) == "org/float"
    assert base_model_name_or_path({"name": None, "path": "org/model"}) == "org/model"


def test_data_errors_are_user_errors_with_their_message():
    err = DataError("no trainable example left (skipped: {})")
    assert isinstance(err, UserError) and str(err) == "no trainable example left (skipped: {})"
    assert err.problems == ["no trainable example left (skipped: {})"]
