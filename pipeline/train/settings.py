"""The training job's settings: the composed config checked in one place, every problem at once.

Pure: no torch, PEFT or Ray; `training_model_path` builds the tiny model only when asked to.
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

from pipeline.errors import UserError
from pipeline.lora_registry import validate_name

SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
# float16 would need loss scaling to train stably; bfloat16 has float32's range.
DTYPES = ("float32", "bfloat16")


class TrainConfigError(UserError):
    """Training settings that cannot run: every problem, each naming the setting and the fix."""

    def __init__(self, problems: list[str] | str):
        super().__init__(problems, heading="invalid config:")


def train_settings(cfg) -> dict:
    """The composed Hydra config as a plain dict, checked; every problem reported at once."""
    s = _plain(cfg)
    problems: list[str] = []

    def need_int(path, value, minimum, optional=False):
        if optional and value is None:
            return
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            problems.append(f"{path}: must be an integer >= {minimum}{' or null' if optional else ''} (got {value!r})")

    def need_number(path, value, low, high, low_open=False):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        ok = ok and (value > low if low_open else value >= low) and value <= high
        if not ok:
            problems.append(f"{path}: must be a number in {'(' if low_open else '['}{low}, {high}] (got {value!r})")

    adapter, data, train, model = (s.setdefault(k, {}) for k in ("adapter", "data", "train", "model"))
    name = adapter.get("name")
    if name in (None, "", "???"):
        problems.append("adapter.name: required: the adapter's name in the registry (e.g. adapter.name=bonjour)")
    else:
        try:
            validate_name(str(name))
        except ValueError as exc:
            problems.append(f"adapter.name: {exc}")
    if not data.get("path"):
        problems.append("data.path: required: a Parquet file, folder or glob, a JSONL file, or a datasets name")
    response_cols = {data.get("response_column"), data.get("append_response_column")} - {None, ""}
    if len(response_cols) > 1:
        problems.append("data.response_column and data.append_response_column: set one (both name the assistant answer's column)")
    if data.get("prompt_column") and not response_cols:
        problems.append("data.response_column: required with data.prompt_column (the assistant answer's column)")
    if not data.get("messages_column") and not data.get("prompt_column"):
        problems.append("data.messages_column: set it, or data.prompt_column + data.response_column")
    need_number("data.validation_fraction", data.get("validation_fraction", 0.0), 0.0, 0.5)
    need_int("data.max_rows", data.get("max_rows"), 1, optional=True)
    lora = train.get("lora") or {}
    need_int("train.lora.rank", lora.get("rank"), 1)
    need_number("train.lora.alpha", lora.get("alpha"), 0, 1e6, low_open=True)
    need_number("train.lora.dropout", lora.get("dropout"), 0.0, 0.9)
    targets = lora.get("target_modules")
    if not targets or not (isinstance(targets, str) or all(isinstance(t, str) for t in targets)):
        problems.append(f"train.lora.target_modules: a list of module names, or 'all-linear' (got {targets!r})")
    need_number("train.lr", train.get("lr"), 0.0, 1.0, low_open=True)
    need_number("train.weight_decay", train.get("weight_decay", 0.0), 0.0, 1.0)
    need_number("train.warmup_ratio", train.get("warmup_ratio", 0.0), 0.0, 1.0)
    need_number("train.max_grad_norm", train.get("max_grad_norm", 1.0), 0.0, 1e6)
    if train.get("scheduler") not in SCHEDULERS:
        problems.append(f"train.scheduler: linear, cosine, constant or constant_with_warmup (got {train.get('scheduler')!r})")
    need_int("train.epochs", train.get("epochs"), 1)
    need_int("train.max_steps", train.get("max_steps"), 1, optional=True)
    need_int("train.batch_size", train.get("batch_size"), 1)
    need_int("train.grad_accum", train.get("grad_accum"), 1)
    need_int("train.max_seq_len", train.get("max_seq_len"), 16)
    need_int("train.seed", train.get("seed"), 0)
    need_int("train.workers", train.get("workers"), 1)
    need_int("train.log_every", train.get("log_every", 10), 1)
    need_number("train.cpus_per_worker", train.get("cpus_per_worker", 1), 0, 1024, low_open=True)
    if train.get("dtype") not in DTYPES:
        problems.append(f"train.dtype: float32 or bfloat16 (got {train.get('dtype')!r})")
    if not model.get("path"):
        problems.append("model.path: required: a Hugging Face model id or a local folder (or pick model=tiny)")
    if problems:
        raise TrainConfigError(problems)

    s["lora_root"] = os.path.abspath(s.get("lora_root") or "lora")
    paths = data["path"] if isinstance(data["path"], list) else [data["path"]]
    data["path"] = [absolute_if_local(str(p)) for p in paths]
    for key in ("path", "train_path"):
        if model.get(key) and (model.get("build") or looks_local(model[key])):
            model[key] = os.path.abspath(model[key])
    s.setdefault("prompt", {}).setdefault("date_string", "26 Jul 2024")
    s.setdefault("ray", {})
    return s


def _plain(cfg) -> dict:
    """A deep copy of `cfg` as plain dicts and lists (a DictConfig resolved)."""
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)
    except ImportError:
        pass
    return json.loads(json.dumps(cfg))


def looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or os.path.exists(path)


def absolute_if_local(path: str) -> str:
    if looks_local(path) or glob.has_magic(path):
        return os.path.abspath(os.path.expanduser(path))
    return path  # a `datasets` hub name


def training_model_path(model: dict) -> str:
    """The weights to train on: `model.train_path` (the float checkpoint of a quantized model)
    when set, else `model.path`; the project's tiny model is built there first if missing."""
    path = model.get("train_path") or model["path"]
    if model.get("build") == "tiny-awq" and not model.get("train_path"):
        raise TrainConfigError(["model.train_path: required for the AWQ tiny model (the float tiny model to train on)"])
    if model.get("build") in ("tiny", "tiny-awq"):
        # The AWQ tiny model is quantized from this same float model, so both builds train
        # on the float one.
        from pipeline.models.tiny_model import ensure_tiny_model

        return str(ensure_tiny_model(path, seed=int(model.get("seed", 0))))
    config = Path(path, "config.json")
    if config.is_file() and json.loads(config.read_text()).get("quantization_config"):
        # LoRA gradients need float weights; the adapter then serves on the quantized model.
        raise TrainConfigError([
            f"model.train_path: {path} is a quantized checkpoint; set model.train_path to its "
            "unquantized weights (e.g. meta-llama/Llama-3.1-8B-Instruct for the AWQ 8B model)"
        ])
    return path


def base_model_name_or_path(model: dict) -> str:
    """What adapter_config.json records as the base model: a hub id says which weights the
    adapter belongs to anywhere; a local path would only mean something on this machine, so
    the model's name stands in for it."""
    given = model.get("train_path") or model["path"]
    return model.get("name") or given if looks_local(given) else given
