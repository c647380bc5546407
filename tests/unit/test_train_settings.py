"""Training settings (`pipeline.train.settings`): the real config composes into valid, frozen,
documented settings, and every problem is reported at once, naming the setting, the value and
the fix."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import os
import pickle
import sys

import pytest
from tests.conftest import compose

from pipeline.errors import UserError
from pipeline.model_settings import ModelSettings
from pipeline.train.data import DataError
from pipeline.train.loop import FitJob
from pipeline.train.settings import (
    AdapterSettings,
    DataSettings,
    Hyperparameters,
    LoraSettings,
    PromptSettings,
    RaySettings,
    TrainConfigError,
    TrainSettings,
    base_model_name_or_path,
    training_model_path,
)

SETTINGS_CLASSES = (TrainSettings, AdapterSettings, DataSettings, Hyperparameters, LoraSettings, PromptSettings,
                    RaySettings, ModelSettings, FitJob)


def composed(*overrides):
    return compose("train_lora", ["model=tiny", "adapter.name=bonjour", *overrides])


def problems(*overrides) -> list[str]:
    with pytest.raises(TrainConfigError) as info:
        TrainSettings.from_config(composed(*overrides))
    return info.value.problems


def test_the_default_config_is_valid_and_paths_become_absolute():
    s = TrainSettings.from_config(composed())
    assert s.adapter == AdapterSettings(name="bonjour", overwrite=False) and s.lora_root == os.path.abspath("lora")
    assert s.data.path == (os.path.abspath("data/train_sample.parquet"),)
    assert os.path.isabs(s.model.path) and s.model.train_path is None  # a model the job builds
    assert s.prompt.date_string == "26 Jul 2024" and s.ray == RaySettings()
    assert s.train.lora == LoraSettings(rank=8, alpha=16, dropout=0.0, target_modules=(
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    assert (s.train.lr, s.train.epochs, s.train.dtype, s.train.use_gpu) == (5.0e-3, 8, "float32", False)


def test_a_plain_dict_works_too_and_is_not_changed():
    from omegaconf import OmegaConf

    plain = OmegaConf.to_container(composed("data.path=[./a.parquet, org/dataset]"), resolve=True)
    before = json.dumps(plain, sort_keys=True)
    s = TrainSettings.from_config(plain)
    assert json.dumps(plain, sort_keys=True) == before
    assert s.data.path == (os.path.abspath("a.parquet"), "org/dataset")  # a datasets name stays a name


def test_absent_optional_keys_take_their_defaults():
    from omegaconf import OmegaConf

    plain = OmegaConf.to_container(composed(), resolve=True)
    for key in ("weight_decay", "warmup_ratio", "max_grad_norm", "max_steps", "gradient_checkpointing", "use_gpu",
                "cpus_per_worker", "log_every"):
        del plain["train"][key]
    for key in ("prompt", "ray", "lora_root"):
        del plain[key]
    del plain["data"]["validation_fraction"]
    s = TrainSettings.from_config(plain)
    assert s.train.weight_decay == 0.0 and s.train.max_grad_norm == 1.0 and s.train.max_steps is None
    assert s.train.cpus_per_worker == 1 and s.train.log_every == 10 and s.train.use_gpu is False
    assert s.prompt == PromptSettings() and s.ray == RaySettings() and s.lora_root == os.path.abspath("lora")
    assert s.data.validation_fraction == 0.0


def test_local_model_paths_become_absolute_and_hub_ids_stay(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = TrainSettings.from_config(composed("model=tiny-awq", "model.path=./awq", "model.train_path='~/float'",
                                           "lora_root='~/lora'"))
    assert s.model.path == str(tmp_path / "awq") and s.model.train_path == os.path.expanduser("~/float")
    assert s.lora_root == os.path.expanduser("~/lora")
    hub = TrainSettings.from_config(composed("model=llama-3.1-8b-instruct-awq"))
    assert (hub.model.path, hub.model.train_path) == ("hugging-quants/Meta-Llama-3.1-8B-Instruct-AWQ-INT4",
                                                      "meta-llama/Llama-3.1-8B-Instruct")


def test_settings_are_frozen_and_pickle_as_they_are():
    """Ray Train ships them to its workers: a frozen value, unchanged by the trip."""
    s = TrainSettings.from_config(composed())
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.train.lr = 1.0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.model.path = "elsewhere"  # type: ignore[misc]
    job = FitJob(train=s.train, model_path=s.model.path, base_model_name_or_path="tiny", pad_id=0)
    assert pickle.loads(pickle.dumps(s)) == s and pickle.loads(pickle.dumps(job)) == job
    assert TrainSettings.from_config(composed()) == s


def test_record_is_plain_json_with_the_config_nesting():
    """The adapter manifest's `config`: the same keys and nesting as the composed config."""
    s = TrainSettings.from_config(composed())
    record = s.record()
    assert json.loads(json.dumps(record)) == record
    assert record["train"]["lora"]["rank"] == 8 and record["prompt"]["date_string"] == "26 Jul 2024"
    assert record["train"]["lora"]["target_modules"][0] == "q_proj"
    assert record["data"]["path"] == [os.path.abspath("data/train_sample.parquet")]
    assert record["model"]["name"] == "tiny-llama-3.1" and record["adapter"]["name"] == "bonjour"
    assert set(record) == {"adapter", "data", "train", "model", "prompt", "ray", "lora_root"}
    config = composed()
    for section in ("adapter", "data", "train", "model", "prompt", "ray"):
        assert set(record[section]) == set(config[section]), section
    assert set(record["train"]["lora"]) == set(config["train"]["lora"])


def test_every_settings_field_is_documented():
    """A field's docstring: the string literal on the line after its declaration."""
    for cls in SETTINGS_CLASSES:
        body = ast.parse(inspect.getsource(sys.modules[cls.__module__])).body
        (node,) = [n for n in body if isinstance(n, ast.ClassDef) and n.name == cls.__name__]
        fields = {f.name for f in dataclasses.fields(cls)}
        documented = {
            stmt.target.id for stmt, after in zip(node.body, node.body[1:])
            if isinstance(stmt, ast.AnnAssign) and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)
        }
        assert fields - documented == set(), f"{cls.__name__}: fields without a docstring"


def test_every_problem_is_reported_at_once():
    with pytest.raises(TrainConfigError) as info:
        TrainSettings.from_config(composed("adapter.name=../bad", "train.lora.rank=0", "data.prompt_column=prompt",
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
    (["train.lora.target_modules=5"], "train.lora.target_modules: a list of module names, or 'all-linear' (got 5)"),
    (["model=tiny-awq", "model.train_path=null"],
     "model.train_path: required for the AWQ tiny model (the float tiny model to train on)"),
])
def test_each_problem_names_the_setting_value_and_fix(overrides, expected):
    assert problems(*overrides) == [expected]


def test_a_quantized_checkpoint_needs_its_float_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "awq"}}))
    with pytest.raises(TrainConfigError, match="quantized checkpoint") as info:
        training_model_path(ModelSettings(path=str(tmp_path), build=None))
    assert info.value.problems[0].startswith(f"model.train_path: {tmp_path} is a quantized checkpoint; set model.train_path")
    assert training_model_path(ModelSettings(path=str(tmp_path), train_path="org/float-model")) == "org/float-model"
    assert training_model_path(ModelSettings(path="org/hub-model")) == "org/hub-model"
    with pytest.raises(TrainConfigError, match="model.train_path: required for the AWQ tiny model"):
        training_model_path(ModelSettings(path=str(tmp_path), build="tiny-awq"))


def test_the_adapter_records_a_hub_id_or_the_model_name_never_a_local_path(tmp_path):
    assert base_model_name_or_path(ModelSettings(name="tiny", path=str(tmp_path))) == "tiny"
    assert base_model_name_or_path(ModelSettings(name="awq-8b", path="org/awq", train_path="org/float")) == "org/float"
    assert base_model_name_or_path(ModelSettings(name=None, path="org/model")) == "org/model"


def test_data_errors_are_user_errors_with_their_message():
    err = DataError("no trainable example left (skipped: {})")
    assert isinstance(err, UserError) and str(err) == "no trainable example left (skipped: {})"
    assert err.problems == ["no trainable example left (skipped: {})"]
