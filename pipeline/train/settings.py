"""The training job's settings, typed: one frozen dataclass per section of `conf/train_lora.yaml`.

`TrainSettings.from_config(cfg)` builds them from the composed Hydra config and checks them in
one place (`_problems`), collecting every problem into one `TrainConfigError`, each naming the
setting, its value and how to fix it. Paths are made absolute here, since Ray Train workers run
elsewhere. Nothing writes into the settings afterwards (they travel to the workers as they are):
what the job derives from them comes back as values (`training_model_path`,
`base_model_name_or_path`).

Pure: no torch, PEFT or Ray; `training_model_path` builds the tiny model only when asked to.
"""

from __future__ import annotations

import dataclasses
import glob
import json
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import UserError
from pipeline.lora_registry import validate_name
from pipeline.model_settings import ModelSettings, PromptSettings
from pipeline.settings_common import absolute, build, looks_local, to_plain

SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
KEEP = ("last", "best")
TRACKERS = ("tensorboard", "mlflow", "none")
# float16 would need loss scaling to train stably; bfloat16 has float32's range.
DTYPES = ("float32", "bfloat16")
_AWQ_TINY_NEEDS_TRAIN_PATH = "model.train_path: required for the AWQ tiny model (the float tiny model to train on)"


class TrainConfigError(UserError):
    """Training settings that cannot run: every problem, each naming the setting and the fix."""

    def __init__(self, problems: list[str] | str):
        super().__init__(problems, heading="invalid config:")


@dataclass(frozen=True)
class AdapterSettings:
    """The adapter to write (`adapter:` in conf/train_lora.yaml)."""

    name: str
    """Its folder name in the registry, and what request rows put in `lora`."""
    overwrite: bool = False
    """Replace an adapter of that name already in the registry instead of refusing."""


@dataclass(frozen=True)
class DataSettings:
    """The training data and how a row becomes a conversation (`data:`; docs/lora.md)."""

    path: tuple[str, ...]
    """Parquet files, folders or globs, JSONL files, or `datasets` names (local ones absolute once checked)."""
    split: str = "train"
    """`datasets` names only: the split to read."""
    config_name: str | None = None
    """`datasets` names only: the dataset's configuration."""
    messages_column: str | None = "messages"
    """The conversation ([{role, content}], nested or JSON text)."""
    prompt_column: str | None = None
    """Rows whose messages are null or absent: [user: this column]."""
    response_column: str | None = None
    """[assistant: this column] appended to the conversation."""
    append_response_column: str | None = None
    """The same as response_column (set one): the name that reads right after messages."""
    error_column: str | None = "error"
    """Rows with a value here are skipped (the generation job's per-row errors); absent: ignored."""
    validation_fraction: float = 0.0
    """Conversations held out for the final validation loss, in [0, 0.5]."""
    max_rows: int | None = None
    """Read at most this many rows (null: all)."""


@dataclass(frozen=True)
class LoraSettings:
    """The adapter's shape (`train.lora:` in conf/train/*.yaml)."""

    rank: int
    """LoRA's rank r."""
    alpha: float
    """LoRA's scale numerator: updates are scaled by alpha / rank."""
    dropout: float
    """Dropout on the LoRA branch's input, in [0, 0.9]."""
    target_modules: tuple[str, ...] | str
    """The module names LoRA wraps, or 'all-linear'."""


@dataclass(frozen=True)
class Hyperparameters:
    """How the adapter is trained (`train:`, conf/train/*.yaml)."""

    lora: LoraSettings
    """The adapter's shape."""
    lr: float
    """AdamW's peak learning rate."""
    scheduler: str
    """The learning-rate schedule: linear, cosine, constant or constant_with_warmup."""
    epochs: int
    """Passes over the training conversations (unless max_steps ends the run first)."""
    batch_size: int
    """Conversations per micro-batch, per worker."""
    grad_accum: int
    """Micro-batches per optimizer step."""
    max_seq_len: int
    """Tokens per conversation; longer ones are cut (assistant tokens beyond are not learned)."""
    seed: int
    """Data order, validation split, LoRA initialization, dropout."""
    dtype: str
    """The weights' dtype while training: float32 or bfloat16."""
    workers: int
    """Training processes; more than 1 runs Ray Train's TorchTrainer with DDP."""
    weight_decay: float = 0.0
    """AdamW's weight decay."""
    warmup_ratio: float = 0.0
    """The share of the steps the learning rate warms up over."""
    max_grad_norm: float = 1.0
    """Gradients are clipped to this norm (0: no clipping)."""
    max_steps: int | None = None
    """Optimizer steps to stop after (null: epochs decide)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, slower."""
    use_gpu: bool = False
    """Each worker trains on a GPU."""
    cpus_per_worker: float = 1
    """Ray CPUs per worker, and the torch threads a CPU worker computes with."""
    log_every: int = 10
    """Optimizer steps between progress lines."""
    packing: bool = False
    """Each micro-batch's conversations end to end in one row, without padding; attention and loss stay within each."""
    eval_every: int | None = None
    """Optimizer steps between evaluations on the validation split (null: one, at the end)."""
    keep: str = "last"
    """The adapter the registry gets: "last" (the final step's) or "best" (the lowest validation loss; needs eval_every)."""
    early_stopping_patience: int | None = None
    """Stop after this many evaluations in a row that do not improve on the best validation loss (null: never; needs eval_every)."""
    early_stopping_min_delta: float = 0.0
    """How much lower than the best a validation loss must be to count as an improvement."""
    save_every: int | None = None
    """Optimizer steps between resumable checkpoints (null: only on SIGTERM, which one worker alone catches)."""
    resume: bool = True
    """Continue from the adapter's checkpoint when one exists (false: discard it and start over)."""
    report_to: str = "tensorboard"
    """The experiment tracker: tensorboard (event files), mlflow or none."""
    mlflow_uri: str | None = None
    """report_to=mlflow: a tracking server, sqlite:///..., or null: a file store in <lora_root>/.runs/mlflow."""
    log_dir: str | None = None
    """Where the TensorBoard event files go (null: <lora_root>/.runs/<adapter name>/tensorboard)."""


@dataclass(frozen=True)
class RaySettings:
    """The Ray cluster, used only when train.workers > 1 (`ray:`)."""

    address: str | None = None
    """null: start Ray here; "auto" or ray://host:10001 joins a cluster."""
    num_cpus: float | None = None
    """CPUs of a Ray started here (null: all)."""
    storage_path: str | None = None
    """Where Ray Train keeps rank 0's checkpoint (null: inside the registry's staging folder)."""


@dataclass(frozen=True)
class TrainSettings:
    """The whole job (conf/train_lora.yaml)."""

    adapter: AdapterSettings
    """The adapter to write."""
    data: DataSettings
    """The training data."""
    train: Hyperparameters
    """How it is trained."""
    model: ModelSettings
    """The model: trained on `train_path` (else `path`), served on `path`."""
    prompt: PromptSettings = field(default_factory=PromptSettings)
    """How conversations are rendered."""
    ray: RaySettings = field(default_factory=RaySettings)
    """The Ray cluster for several workers."""
    lora_root: str = "lora"
    """The adapter registry the adapter is published into (absolute once checked)."""

    @classmethod
    def from_config(cls, cfg) -> "TrainSettings":
        """Build and check the settings from the composed Hydra config (or a plain dict, left unchanged)."""
        s = to_plain(cfg)
        problems = _problems(s)
        if problems:
            raise TrainConfigError(problems)

        adapter, data, train, model = (s[k] for k in ("adapter", "data", "train", "model"))
        paths = data["path"] if isinstance(data["path"], list) else [data["path"]]
        targets = train["lora"]["target_modules"]
        model_paths = {key: absolute(model[key]) for key in ("path", "train_path")
                       if model.get(key) and (model.get("build") or looks_local(model[key]))}
        return cls(
            adapter=AdapterSettings(name=str(adapter["name"]), overwrite=bool(adapter.get("overwrite"))),
            data=build(DataSettings, {
                **data,
                "path": tuple(absolute_if_local(str(p)) for p in paths),
                "split": data.get("split") or "train",
                "validation_fraction": float(data.get("validation_fraction") or 0.0),
            }),
            train=build(Hyperparameters, {
                **train,
                "lora": build(LoraSettings, {
                    **train["lora"], "target_modules": targets if isinstance(targets, str) else tuple(targets)}),
                "gradient_checkpointing": bool(train.get("gradient_checkpointing")),
                "use_gpu": bool(train.get("use_gpu")),
                "packing": bool(train.get("packing")),
                "early_stopping_min_delta": float(train.get("early_stopping_min_delta") or 0.0),
                "resume": bool(train.get("resume", True)),
                "log_dir": absolute(train["log_dir"]) if train.get("log_dir") else None,
            }),
            model=build(ModelSettings, {**model, **model_paths}),
            prompt=build(PromptSettings, s.get("prompt") or {}),
            ray=build(RaySettings, s.get("ray") or {}),
            lora_root=absolute(s.get("lora_root") or "lora"),
        )

    def record(self) -> dict:
        """The settings as plain JSON data, as the adapter's manifest records them (`config`):
        the config's own nesting, tuples as lists."""
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))


def _problems(s: dict) -> list[str]:
    """Every problem with the composed config, each naming the setting, its value and the fix."""
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

    adapter, data, train, model = (s.get(k) or {} for k in ("adapter", "data", "train", "model"))
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
    if not targets or not (isinstance(targets, str)
                           or (isinstance(targets, (list, tuple)) and all(isinstance(t, str) for t in targets))):
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
    problems += _progress_problems(train, data, need_int, need_number)
    if train.get("dtype") not in DTYPES:
        problems.append(f"train.dtype: float32 or bfloat16 (got {train.get('dtype')!r})")
    if not model.get("path"):
        problems.append("model.path: required: a Hugging Face model id or a local folder (or pick model=tiny)")
    elif model.get("build") == "tiny-awq" and not model.get("train_path"):
        problems.append(_AWQ_TINY_NEEDS_TRAIN_PATH)
    return problems

def _progress_problems(train: dict, data: dict, need_int, need_number) -> list[str]:
    """Evaluation, early stopping, checkpoints and tracking: settings that depend on each other."""
    found: list[str] = []
    need_int("train.eval_every", train.get("eval_every"), 1, optional=True)
    need_int("train.early_stopping_patience", train.get("early_stopping_patience"), 1, optional=True)
    need_number("train.early_stopping_min_delta", train.get("early_stopping_min_delta", 0.0), 0.0, 1e6)
    need_int("train.save_every", train.get("save_every"), 1, optional=True)
    keep, evaluates = train.get("keep", "last"), train.get("eval_every") is not None
    if keep not in KEEP:
        found.append(f"train.keep: last or best (got {keep!r})")
    if train.get("report_to", "tensorboard") not in TRACKERS:
        found.append(f"train.report_to: tensorboard, mlflow or none (got {train.get('report_to')!r})")
    elif train.get("report_to") == "mlflow":
        import importlib.util

        if importlib.util.find_spec("mlflow") is None:
            found.append("train.report_to: mlflow needs the mlflow package: pip install '.[mlflow]' "
                         "(or mlflow-skinny), or use train.report_to=tensorboard")
    for key, used in (("keep", keep == "best"), ("early_stopping_patience", train.get("early_stopping_patience"))):
        if used and not evaluates:
            found.append(f"train.{key}: needs validation during training; set train.eval_every (e.g. train.eval_every=10)")
    if evaluates and not data.get("validation_fraction"):
        found.append("train.eval_every: there are no validation rows; set data.validation_fraction "
                     "(e.g. data.validation_fraction=0.1) or train.eval_every=null")
    return found


def absolute_if_local(path: str) -> str:
    if looks_local(path) or glob.has_magic(path):
        return absolute(path)
    return path  # a `datasets` hub name


def training_model_path(model: ModelSettings) -> str:
    """The weights to train on: `model.train_path` (the float checkpoint of a quantized model)
    when set, else `model.path`; the project's tiny model is built there first if missing."""
    path = model.train_path or model.path
    if model.build == "tiny-awq" and not model.train_path:
        raise TrainConfigError([_AWQ_TINY_NEEDS_TRAIN_PATH])
    if model.build in ("tiny", "tiny-awq"):
        # The AWQ tiny model is quantized from this same float model, so both builds train
        # on the float one.
        from pipeline.models.tiny_model import ensure_tiny_model

        return str(ensure_tiny_model(path, seed=int(model.seed)))
    config = Path(path, "config.json")
    if config.is_file() and json.loads(config.read_text()).get("quantization_config"):
        # LoRA gradients need float weights; the adapter then serves on the quantized model.
        raise TrainConfigError([
            f"model.train_path: {path} is a quantized checkpoint; set model.train_path to its "
            "unquantized weights (e.g. meta-llama/Llama-3.1-8B-Instruct for the AWQ 8B model)"
        ])
    return path


def base_model_name_or_path(model: ModelSettings) -> str:
    """What adapter_config.json records as the base model: a hub id says which weights the
    adapter belongs to anywhere; a local path would only mean something on this machine, so
    the model's name stands in for it."""
    given = model.train_path or model.path
    return model.name or given if looks_local(given) else given

