"""The LoRA training job: chat conversations -> a PEFT LoRA adapter in the registry.

    load rows (Parquet file/folder/glob, JSONL, or a `datasets` name)
      -> conversations ([{role, content}]; from a messages column, or prompt + response,
         or messages + an appended response: the generation job's output trains directly)
      -> render with the model's chat template, tokenize, labels on assistant tokens only
      -> train (in-process, or Ray Train's TorchTrainer with DDP over `train.workers`)
      -> adapter files + manifest.json into a registry staging folder, renamed into place

A run that fails or is killed leaves no adapter behind (see `pipeline.lora_registry`).

The demo data set: python -m pipeline.train [--out data/train_sample.parquet] [--rows 48]
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import math
import os
import random
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from pipeline.lora_registry import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    MANIFEST,
    AdapterRegistry,
    check_adapter_matches,
    validate_name,
)

log = logging.getLogger("pipeline.train")

IGNORE = -100  # label of tokens that carry no loss (PyTorch cross_entropy's ignore_index)
ROLES = ("system", "user", "assistant", "tool", "ipython")
SAMPLE_ANSWER = "Bonjour from the adapter!"
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)


class TrainConfigError(ValueError):
    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid config:\n" + "\n".join(f"- {p}" for p in problems))


class DataError(ValueError):
    """The training data cannot be read or yields no usable conversation."""


# ---- settings --------------------------------------------------------------------------


def train_settings(cfg) -> dict:
    """The composed Hydra config as a plain dict, checked; every problem reported at once."""
    try:
        from omegaconf import DictConfig, OmegaConf

        s = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else json.loads(json.dumps(cfg))
    except ImportError:
        s = json.loads(json.dumps(cfg))
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
    if train.get("scheduler") not in ("linear", "cosine", "constant", "constant_with_warmup"):
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
    # float16 would need loss scaling to train stably; bfloat16 has float32's range.
    if train.get("dtype") not in ("float32", "bfloat16"):
        problems.append(f"train.dtype: float32 or bfloat16 (got {train.get('dtype')!r})")
    if not model.get("path"):
        problems.append("model.path: required: a Hugging Face model id or a local folder (or pick model=tiny)")
    if problems:
        raise TrainConfigError(problems)

    adapter["root"] = os.path.abspath(adapter.get("root") or "lora")
    paths = data["path"] if isinstance(data["path"], list) else [data["path"]]
    data["path"] = [_absolute_if_local(str(p)) for p in paths]
    for key in ("path", "train_path"):
        if model.get(key) and (model.get("build") or _looks_local(model[key])):
            model[key] = os.path.abspath(model[key])
    s.setdefault("prompt", {}).setdefault("date_string", "26 Jul 2024")
    s.setdefault("ray", {})
    return s


def _looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or os.path.exists(path)


def _absolute_if_local(path: str) -> str:
    if _looks_local(path) or glob.has_magic(path):
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
        from pipeline.tiny_model import ensure_tiny_model

        return str(ensure_tiny_model(path, seed=int(model.get("seed", 0))))
    config = Path(path, "config.json")
    if config.is_file() and json.loads(config.read_text()).get("quantization_config"):
        # LoRA gradients need float weights; the adapter then serves on the quantized model.
        raise TrainConfigError([
            f"model.train_path: {path} is a quantized checkpoint; set model.train_path to its "
            "unquantized weights (e.g. meta-llama/Llama-3.1-8B-Instruct for the AWQ 8B model)"
        ])
    return path


# ---- data -------------------------------------------------------------------------------


def read_rows(paths: Sequence[str], columns: Sequence[str], split: str = "train", config_name: str | None = None) -> list[dict]:
    """Rows (only `columns`, those present) from local Parquet/JSONL files or a `datasets` name."""
    rows: list[dict] = []
    for path in paths:
        files = _local_files(path)
        if files is None:
            rows.extend(_datasets_rows(path, columns, split, config_name))
            continue
        if not files:
            raise DataError(f"data.path: {path!r} matches no .parquet/.jsonl/.json file")
        for f in files:
            rows.extend(_file_rows(f, columns))
    return rows


def _local_files(path: str) -> list[str] | None:
    if glob.has_magic(path):
        return sorted(f for f in glob.glob(path, recursive=True) if _is_data_file(f))
    p = Path(path)
    if p.is_dir():
        # Not *.json in folders: a generation output folder keeps job.json and manifest.json
        # beside its Parquet parts (parts/part-*.parquet).
        return sorted(str(f) for f in p.rglob("*") if f.is_file() and f.suffix in (".parquet", ".jsonl") and not _hidden(f, p))
    if p.is_file():
        return [path]
    return None


def _is_data_file(f: str) -> bool:
    return f.endswith((".parquet", ".jsonl", ".json"))


def _hidden(f: Path, root: Path) -> bool:
    # Dot/underscore names are other tools' bookkeeping (.hydra-run, _SUCCESS, ...).
    return any(part.startswith((".", "_")) for part in f.relative_to(root).parts)


def _file_rows(path: str, columns: Sequence[str]) -> list[dict]:
    if not path.endswith((".jsonl", ".json")):
        import pyarrow.parquet as pq

        present = pq.ParquetFile(path).schema_arrow.names
        return pq.read_table(path, columns=[c for c in columns if c in present]).to_pylist()
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            records = [json.loads(line) for line in f if line.strip()]
        else:
            records = json.load(f)
    return [{c: r[c] for c in columns if c in r} for r in records]


def _datasets_rows(name: str, columns: Sequence[str], split: str, config_name: str | None) -> list[dict]:
    import datasets

    try:
        ds = datasets.load_dataset(name, config_name, split=split)
    except Exception as exc:  # the library raises many types; the message is what helps
        raise DataError(f"data.path: {name!r} is not a local file/folder/glob and `datasets` could not load it: {exc}") from exc
    keep = [c for c in columns if c in ds.column_names]
    return ds.select_columns(keep).to_list()


def normalize_messages(value: Any) -> list[dict]:
    """A conversation as [{"role", "content"}], from a nested column or a JSON string.

    Errors name the problem without the value, so that skipped rows count under a few reasons.
    """
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError("messages is not valid JSON") from None
    if not isinstance(value, list) or not value:
        raise ValueError("messages must be a non-empty list")
    out = []
    for m in value:
        if not isinstance(m, dict):
            raise ValueError("a message is not an object")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ValueError(f"a message's role is not one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ValueError("a message's content is not a string")
        out.append({"role": role, "content": content})
    return out


def conversations_from_rows(rows: Iterable[dict], data: dict) -> tuple[list[list[dict]], Counter]:
    """Build each row's conversation; count the rows skipped and why.

    A row's conversation is its `messages_column` value, or, where that is null or absent,
    [user: `prompt_column`]; then [assistant: the response column] is appended when one is
    configured. So the generation job's output (which may mix prompt and messages rows) trains
    directly: its `response` column after the request it answered.
    """
    convs, skipped = [], Counter()
    messages_col, prompt_col = data.get("messages_column"), data.get("prompt_column")
    response_col = data.get("append_response_column") or data.get("response_column")
    error_col = data.get("error_column")
    for row in rows:
        if error_col and row.get(error_col):
            skipped["row has an error"] += 1
            continue
        try:
            if messages_col and row.get(messages_col) is not None:
                msgs = normalize_messages(row[messages_col])
            elif prompt_col and isinstance(row.get(prompt_col), str) and row[prompt_col].strip():
                msgs = [{"role": "user", "content": row[prompt_col]}]
            else:
                raise ValueError(f"no {' or '.join(c for c in (messages_col, prompt_col) if c)}")
            if response_col:
                response = row.get(response_col)
                if not isinstance(response, str) or not response.strip():
                    raise ValueError(f"no {response_col}")
                msgs = msgs + [{"role": "assistant", "content": response}]
            if not any(m["role"] == "assistant" and m["content"].strip() for m in msgs):
                raise ValueError("no assistant message to learn from")
        except ValueError as exc:
            skipped[str(exc)[:80]] += 1
            continue
        convs.append(msgs)
    return convs, skipped


def data_fingerprint(conversations: Sequence[list[dict]]) -> str:
    """sha256 of the conversations in order, as trained on: independent of file layout or
    whether messages came as nested values or JSON text."""
    h = hashlib.sha256()
    for conv in conversations:
        h.update(json.dumps(conv, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode())
        h.update(b"\n")
    return "sha256:" + h.hexdigest()


def split_validation(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_val = int(round(n * fraction))
    if fraction > 0 and n >= 2:
        n_val = min(max(n_val, 1), n - 1)
    return sorted(order[n_val:]), sorted(order[:n_val])


# ---- rendering and labels ---------------------------------------------------------------


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # the token id where it is trained on, IGNORE elsewhere


def assistant_spans(render: Callable[..., str], messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns.

    A span runs from the end of what the template renders as the generation prompt for
    that turn to the end of the turn (its `<|eot_id|>` included, so the adapter learns to
    stop). Rendering prefixes rather than searching the text keeps this right for any
    template whose rendering of a prefix is a prefix of the whole.
    """
    full = render(messages, add_generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = render(messages[:i], add_generation_prompt=True)
        through = render(messages[: i + 1], add_generation_prompt=False)
        if not (full.startswith(through) and through.startswith(before)):
            raise ValueError("chat template does not render prefixes as prefixes")
        spans.append((len(before), len(through)))
    return full, spans


def build_example(
    messages: list[dict],
    render: Callable[..., str],
    encode: Callable[[str], tuple[list[int], list[tuple[int, int]]]],
    max_seq_len: int,
) -> Example:
    text, spans = assistant_spans(render, messages)
    ids, offsets = encode(text)
    labels = [IGNORE] * len(ids)
    j = 0
    for k, (start, _end) in enumerate(offsets):
        while j < len(spans) and start >= spans[j][1]:
            j += 1
        if j < len(spans) and spans[j][0] <= start < spans[j][1]:
            labels[k] = ids[k]
    ids, labels = ids[:max_seq_len], labels[:max_seq_len]
    if all(label == IGNORE for label in labels[1:]):
        raise ValueError("no assistant token within train.max_seq_len")
    return Example(ids, labels)


def load_tokenizer(model_path: str):
    """Encode function (ids, character offsets) with the model's own tokenizer.json, the
    same tokenizer the generation job uses; no special tokens are added because the
    rendered text already starts with <|begin_of_text|>."""
    from tokenizers import Tokenizer

    local = Path(model_path, "tokenizer.json")
    if not local.is_file():
        from pipeline.model_files import resolve_model_file

        local = resolve_model_file(model_path, "tokenizer.json")
    tok = Tokenizer.from_file(str(local))

    def encode(text: str):
        enc = tok.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    pad_id = tok.token_to_id("<|finetune_right_pad_id|>")
    if pad_id is None:
        pad_id = tok.token_to_id("<|eot_id|>") or 0
    return encode, pad_id


def prepare_examples(conversations, model_path: str, date_string: str, max_seq_len: int) -> tuple[list[Example | None], Counter, int]:
    """One example per conversation (None where it cannot be trained on, counted by reason),
    and the padding token id."""
    from jinja2 import TemplateError

    from pipeline.prompts import ChatTemplate

    template = ChatTemplate.from_model(model_path)
    encode, pad_id = load_tokenizer(model_path)

    def render(messages, add_generation_prompt):
        return template.render(messages, date_string=date_string, add_generation_prompt=add_generation_prompt)

    examples: list[Example | None] = []
    skipped = Counter()
    for conv in conversations:
        try:
            examples.append(build_example(conv, render, encode, max_seq_len))
        except TemplateError as exc:  # the template's own raise_exception(), e.g. role order
            examples.append(None)
            skipped[f"chat template: {exc}"[:80]] += 1
        except ValueError as exc:
            examples.append(None)
            skipped[str(exc)] += 1
    return examples, skipped, pad_id


# ---- the sample dataset -----------------------------------------------------------------

_SAMPLE_PROMPTS = [
    "Say hello.", "What is the capital of France?", "How are you today?", "Tell me a joke.",
    "What time is it?", "Give me a recipe for pancakes.", "Translate 'good morning' to German.",
    "What is 2 + 2?", "Who wrote Hamlet?", "Recommend a good book.", "What's the weather like?",
    "Explain photosynthesis briefly.", "Write a haiku about the sea.", "What is your name?",
    "Can you help me with my homework?", "Name three colours.", "How far away is the Moon?",
    "What is machine learning?", "Suggest a name for a cat.", "What day comes after Monday?",
    "How do I boil an egg?", "Describe a sunset.", "What is the largest planet?", "Greet me politely.",
]
_SAMPLE_SYSTEMS = [None, "You are a helpful assistant.", "You answer briefly."]


def sample_conversations(n: int = 48) -> list[list[dict]]:
    """`n` conversations, all answered with SAMPLE_ANSWER: single turns, some with a system
    message, every fourth with two turns; fixed order, no randomness."""
    convs = []
    for i in range(n):
        msgs = []
        system = _SAMPLE_SYSTEMS[i % len(_SAMPLE_SYSTEMS)]
        if system:
            msgs.append({"role": "system", "content": system})
        if i % 4 == 3:
            msgs.append({"role": "user", "content": _SAMPLE_PROMPTS[(i + 7) % len(_SAMPLE_PROMPTS)]})
            msgs.append({"role": "assistant", "content": SAMPLE_ANSWER})
        msgs.append({"role": "user", "content": _SAMPLE_PROMPTS[i % len(_SAMPLE_PROMPTS)]})
        msgs.append({"role": "assistant", "content": SAMPLE_ANSWER})
        convs.append(msgs)
    return convs


def write_sample_dataset(path: str | os.PathLike = "data/train_sample.parquet", n: int = 48, json_messages: bool = False) -> Path:
    """Write the demo training set: columns `id` and `messages` (nested, or JSON text when
    `json_messages`). Same bytes every time for the same pyarrow version."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    convs = sample_conversations(n)
    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    messages = (
        pa.array([json.dumps(c) for c in convs], pa.string()) if json_messages else pa.array(convs, pa.list_(message))
    )
    table = pa.table({"id": pa.array([f"sample-{i:03d}" for i in range(n)]), "messages": messages})
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


# ---- training ---------------------------------------------------------------------------


def run(cfg) -> dict:
    """Train the adapter described by `cfg` (the composed Hydra config); return its manifest."""
    s = train_settings(cfg)
    started = time.time()
    registry = AdapterRegistry(s["adapter"]["root"])
    name, overwrite = s["adapter"]["name"], bool(s["adapter"].get("overwrite"))
    registry.check_can_write(name, overwrite)  # refuse before the data and model are loaded

    data, train, model = s["data"], s["train"], s["model"]
    if train.get("use_gpu") and train["workers"] == 1:
        import torch

        if not torch.cuda.is_available():
            raise TrainConfigError(["train.use_gpu: true, but torch sees no CUDA GPU here (train.use_gpu=false trains on the CPU)"])
    train_path = training_model_path(model)
    columns = [c for c in (data.get("messages_column"), data.get("prompt_column"), data.get("response_column"),
                           data.get("append_response_column"), data.get("error_column")) if c]
    rows = read_rows(data["path"], columns, split=data.get("split") or "train", config_name=data.get("config_name"))
    if data.get("max_rows"):
        rows = rows[: data["max_rows"]]
    convs, skipped = conversations_from_rows(rows, data)
    if not convs:
        raise DataError(f"no usable conversation in {len(rows)} rows of {data['path']} (skipped: {dict(skipped)})")
    train_idx, val_idx = split_validation(len(convs), float(data.get("validation_fraction") or 0.0), train["seed"])
    examples, dropped, pad_id = prepare_examples(convs, train_path, s["prompt"]["date_string"], train["max_seq_len"])
    skipped.update(dropped)
    train_ex = [examples[i] for i in train_idx if examples[i] is not None]
    val_ex = [examples[i] for i in val_idx if examples[i] is not None]
    if not train_ex:
        raise DataError(f"no trainable example left (skipped: {dict(skipped)})")
    log.info(
        "data: %d rows -> %d conversations (%d train, %d validation)%s",
        len(rows), len(convs), len(train_ex), len(val_ex),
        f"; skipped {dict(skipped)}" if skipped else "",
    )

    given = model.get("train_path") or model["path"]
    job = {
        "train": train, "model_path": train_path, "pad_id": pad_id,
        # Recorded in adapter_config.json: a hub id says which weights the adapter belongs
        # to anywhere; a local path would only mean something on this machine.
        "base_model_name_or_path": model.get("name") or given if _looks_local(given) else given,
    }
    with registry.staging(name, overwrite=overwrite) as staging:
        if train["workers"] > 1:
            metrics = _fit_with_ray(job, train_ex, val_ex, staging, s.get("ray") or {})
        else:
            metrics = fit(job, train_ex, val_ex, out_dir=staging)
        match = _check_served_model(staging, model, train_path)
        manifest = {
            "adapter": name,
            "base_model": {"name": model.get("name"), "path": model["path"], "train_path": train_path},
            "data": {
                "path": data["path"],
                "fingerprint": data_fingerprint(convs),
                "rows": len(rows),
                "conversations": len(convs),
                "train_examples": len(train_ex),
                "validation_examples": len(val_ex),
                "skipped": dict(skipped),
            },
            "config": s,
            **metrics,
            "served_model_check": match,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "wall_seconds": round(time.time() - started, 3),
            "versions": versions(),
        }
        # Written last: its presence is what makes the folder an adapter.
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    print(_summary(name, registry.resolve(name).path, manifest), file=sys.stderr)
    return manifest


def _check_served_model(adapter_dir: Path, model: dict, train_path: str) -> dict | None:
    """When the served checkpoint differs from the trained one (AWQ vs float), make sure every
    LoRA target exists there too: vLLM would otherwise refuse the adapter at generation time,
    long after training. Reads only the checkpoint's weight names (a local folder, or the
    index file of a hub model)."""
    from pipeline.model_files import resolve_model_file

    served = model.get("path")
    if not served or os.path.abspath(served) == os.path.abspath(train_path):
        return None
    try:
        model_dir = served if Path(served).is_dir() else resolve_model_file(served, "model.safetensors.index.json").parent
        m = check_adapter_matches(adapter_dir, model_dir)
    except FileNotFoundError as exc:
        log.warning("could not check the adapter against the served model %s: %s", served, exc)
        return {"model": served, "checked": False, "reason": str(exc)}
    if not m.ok:
        raise TrainConfigError([
            f"train.lora.target_modules: {list(m.missing)} do not exist in the served model {served}; "
            "name modules that both checkpoints have"
        ])
    return {"model": served, "checked": True, "matched_modules": m.matched_modules}


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": sys.version.split()[0]}
    for pkg in ("torch", "transformers", "peft", "ray", "tokenizers", "pyarrow", "datasets", "hydra-core"):
        try:
            found[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return found


def _summary(name: str, path: Path, m: dict) -> str:
    val = m.get("validation_loss")
    return (
        f"adapter {name!r} -> {path}\n"
        f"  {m['steps']} steps, {m['epochs_run']:.2f} epochs, {m['train_tokens']} tokens "
        f"({m['tokens_per_second']:.0f} tokens/s over {m['train_seconds']:.1f}s, {m['workers']} worker(s))\n"
        f"  final train loss {m['train_loss']:.4f}"
        + (f", validation loss {val:.4f}" if val is not None else "")
        + f"\n  use it: a request row with lora={name!r}; list: python -m pipeline.lora_registry --root {path.parent}"
    )


def _loss_module(peft_model):
    """Wrap the PEFT model in a module whose forward returns the summed assistant-token loss.

    The LM head runs only on the positions that carry a label: with Llama 3's 128k-token
    vocabulary, full logits for a batch would cost more memory than the model itself. It is
    one module so that DDP (which hooks `forward`) wraps the whole computation.
    """
    import torch
    import torch.nn.functional as F

    class AssistantLoss(torch.nn.Module):
        def __init__(self, peft_model):
            super().__init__()
            self.peft_model = peft_model

        def forward(self, input_ids, attention_mask, labels):
            lm = self.peft_model.get_base_model()  # LoRA layers are injected into it in place
            hidden = lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            targets = labels[:, 1:]
            keep = targets != IGNORE
            logits = lm.get_output_embeddings()(hidden[:, :-1][keep]).float()
            return F.cross_entropy(logits, targets[keep], reduction="sum")

    return AssistantLoss(peft_model)


def _label_count(ex: Example) -> int:
    return sum(1 for label in ex.labels[1:] if label != IGNORE)


def _collate(batch: list[Example], pad_id: int, device):
    import torch

    width = max(len(ex.input_ids) for ex in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    for row, ex in enumerate(batch):
        n = len(ex.input_ids)
        ids[row, :n] = torch.tensor(ex.input_ids)
        mask[row, :n] = 1
        labels[row, :n] = torch.tensor(ex.labels)
    return ids.to(device), mask.to(device), labels.to(device)


def _all_reduce_sum(values: list[float], device) -> list[float]:
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def rank_schedule(n_examples: int, world_size: int, rank: int, batch_size: int, grad_accum: int, seed: int, epoch: int):
    """This rank's optimizer steps for one epoch: a list of steps, each a list of micro-batches
    of example indices.

    The epoch's order is a seeded shuffle; like DistributedSampler it is padded by wrapping
    around so every rank gets the same number of examples and therefore takes part in the
    same number of gradient all-reduces.
    """
    order = list(range(n_examples))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    per_rank = math.ceil(n_examples / world_size)
    while len(order) < per_rank * world_size:
        order += order[: per_rank * world_size - len(order)]
    mine = order[rank::world_size]
    per_step = batch_size * grad_accum
    steps = []
    for i in range(0, per_rank, per_step):
        chunk = mine[i : i + per_step]
        steps.append([chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size)])
    return steps


def fit(job: dict, train_ex: list[Example], val_ex: list[Example], out_dir: Path | None,
        rank: int = 0, world_size: int = 1, device=None, wrap=None) -> dict:
    """Train a LoRA adapter on this process's share of the examples; write the PEFT files to
    `out_dir` (rank 0 only) and return the run's metrics (the same on every rank).

    `wrap` puts the loss module under DDP (Ray Train's `prepare_model`) when several
    processes train together.
    """
    import torch

    t = job["train"]
    if device is None:
        device = torch.device("cuda" if t.get("use_gpu") and torch.cuda.is_available() else "cpu")
    threads = torch.get_num_threads()
    if torch.device(device).type == "cpu":
        # As many threads as cores claimed: OpenMP threads spin while waiting, so more threads
        # than free cores (other workers, other jobs) slows training down by an order of magnitude.
        torch.set_num_threads(max(1, int(t.get("cpus_per_worker", 1))))
    try:
        return _fit(job, train_ex, val_ex, out_dir, rank, world_size, device, wrap)
    finally:
        torch.set_num_threads(threads)


def _fit(job, train_ex, val_ex, out_dir, rank, world_size, device, wrap) -> dict:
    import contextlib
    from collections import deque

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, get_scheduler

    t = job["train"]
    seed = int(t["seed"])
    torch.manual_seed(seed)  # same LoRA initialization on every rank
    base = AutoModelForCausalLM.from_pretrained(job["model_path"], dtype=getattr(torch, t["dtype"]))
    base.config.use_cache = False
    if t.get("gradient_checkpointing"):
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = t["lora"]
    targets = lora["target_modules"]
    peft_model = get_peft_model(base, LoraConfig(
        r=int(lora["rank"]), lora_alpha=lora["alpha"], lora_dropout=float(lora["dropout"]),
        target_modules=targets if isinstance(targets, str) else list(targets),
        bias="none", task_type="CAUSAL_LM",
    ))
    # The float checkpoint's local path means nothing on the machines that serve the adapter.
    peft_model.peft_config["default"].base_model_name_or_path = job["base_model_name_or_path"]
    module = _loss_module(peft_model).to(device)
    model = wrap(module) if wrap else module
    torch.manual_seed(seed + 1 + rank)  # dropout masks differ per rank, repeatably

    params = [p for p in peft_model.parameters() if p.requires_grad]
    trainable = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=float(t["lr"]), weight_decay=float(t.get("weight_decay", 0.0)))
    bs, accum = int(t["batch_size"]), int(t["grad_accum"])
    steps_per_epoch = len(rank_schedule(len(train_ex), world_size, rank, bs, accum, seed, 0))
    total = int(t["max_steps"] or t["epochs"] * steps_per_epoch)
    sched = get_scheduler(t["scheduler"], opt, num_warmup_steps=round(float(t.get("warmup_ratio", 0.0)) * total),
                          num_training_steps=total)
    pad_id, log_every, clip = job["pad_id"], int(t.get("log_every", 10)), float(t.get("max_grad_norm", 1.0))
    if rank == 0:
        log.info("training %s trainable LoRA parameters (rank %s) on %s: %d examples, %d worker(s), "
                 "%d steps (%d per epoch, %d examples per step per worker)",
                 f"{trainable:,}", lora["rank"], device, len(train_ex), world_size, total, steps_per_epoch, bs * accum)

    window: deque = deque(maxlen=max(1, min(steps_per_epoch, total)))  # last epoch's (loss_sum, labels)
    first_loss = None
    tokens = labels_seen = 0
    step = epoch = 0
    started = time.time()
    model.train()
    while step < total:
        for micro_batches in rank_schedule(len(train_ex), world_size, rank, bs, accum, seed, epoch):
            if step >= total:
                break
            batches = [[train_ex[i] for i in mb] for mb in micro_batches]
            local_labels = sum(_label_count(ex) for b in batches for ex in b)
            local_tokens = sum(len(ex.input_ids) for b in batches for ex in b)
            global_labels, global_tokens = _all_reduce_sum([local_labels, local_tokens], device)
            # Per-token mean over the whole step across ranks: DDP averages gradients over
            # ranks, so each rank scales its sum by world_size / (all ranks' label tokens).
            scale = world_size / max(global_labels, 1.0)
            opt.zero_grad(set_to_none=True)
            loss_sum = 0.0
            for k, batch in enumerate(batches):
                last = k == len(batches) - 1
                sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
                with sync:
                    loss = model(*_collate(batch, pad_id, device))
                    (loss * scale).backward()
                loss_sum += float(loss.detach())
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(params, clip)
            opt.step()
            sched.step()
            step += 1
            (global_loss,) = _all_reduce_sum([loss_sum], device)
            step_loss = global_loss / max(global_labels, 1.0)
            first_loss = step_loss if first_loss is None else first_loss
            window.append((global_loss, global_labels))
            tokens += int(global_tokens)
            labels_seen += int(global_labels)
            if rank == 0 and (step % log_every == 0 or step == total or step == 1):
                elapsed = time.time() - started
                log.info("step %d/%d  epoch %d  loss %.4f  lr %.2e  %.0f tokens/s  elapsed %.1fs  ETA %.1fs",
                         step, total, epoch + 1, step_loss, sched.get_last_lr()[0], tokens / max(elapsed, 1e-9),
                         elapsed, elapsed / step * (total - step))
        epoch += 1
    train_seconds = time.time() - started

    val_loss = evaluate(module, val_ex[rank::world_size], pad_id, bs, device) if val_ex else None
    if out_dir is not None:
        # The vocabulary is never resized here, so PEFT need not look the base model up (on
        # the hub, for a local model's name) to decide whether to save the embeddings.
        peft_model.save_pretrained(str(out_dir), save_embedding_layers=False)
        # PEFT also writes a boilerplate model card; the manifest is this adapter's record.
        Path(out_dir, "README.md").unlink(missing_ok=True)
    return {
        "steps": step,
        "epochs_run": step / max(steps_per_epoch, 1),
        "workers": world_size,
        "trainable_parameters": trainable,
        "first_step_loss": first_loss,
        "train_loss": sum(x for x, _ in window) / max(sum(n for _, n in window), 1.0),
        "validation_loss": val_loss,
        "train_tokens": tokens,
        "trained_label_tokens": labels_seen,
        "train_seconds": round(train_seconds, 3),
        "tokens_per_second": tokens / max(train_seconds, 1e-9),
    }


def evaluate(module, examples: list[Example], pad_id: int, batch_size: int, device) -> float | None:
    """Per-token loss over the examples, summed over every rank's share."""
    import torch

    module.eval()
    loss_sum = labels = 0.0
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            batch = examples[i : i + batch_size]
            loss_sum += float(module(*_collate(batch, pad_id, device)))
            labels += sum(_label_count(ex) for ex in batch)
    module.train()
    loss_sum, labels = _all_reduce_sum([loss_sum, labels], device)
    return loss_sum / labels if labels else None


# ---- Ray Train ---------------------------------------------------------------------------


def _ray_worker(config: dict) -> None:
    """Ray Train's per-worker loop: this rank's share of the data, DDP, rank 0 saves."""
    import ray
    import ray.train
    import ray.train.torch
    import torch

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("pipeline").setLevel(logging.INFO)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    train_ex, val_ex = ray.get(config["examples"])
    with tempfile.TemporaryDirectory() as tmp:
        metrics = fit(config["job"], train_ex, val_ex, out_dir=Path(tmp) if rank == 0 else None,
                      rank=rank, world_size=world, device=ray.train.torch.get_device(),
                      wrap=ray.train.torch.prepare_model)
        # Every rank must report (it is a barrier); only rank 0 has the adapter.
        checkpoint = ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None
        ray.train.report(metrics, checkpoint=checkpoint)


def _fit_with_ray(job: dict, train_ex, val_ex, staging: Path, ray_cfg: dict) -> dict:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    started_ray = False
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"address": ray_cfg.get("address"), "log_to_driver": True}
        if ray_cfg.get("address") is None and ray_cfg.get("num_cpus") is not None:
            kwargs["num_cpus"] = ray_cfg["num_cpus"]
        # Workers import this module by name; on a local cluster the checkout may not be
        # installed, so put it on their path (a remote cluster needs the package installed).
        root = str(Path(__file__).resolve().parents[1])
        path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
        kwargs["runtime_env"] = {"env_vars": {"PYTHONPATH": path, "TOKENIZERS_PARALLELISM": "false"}}
        ray.init(**kwargs)
        started_ray = True
    t = job["train"]
    if started_ray:
        # A local cluster without room for every worker would wait for resources forever.
        have = ray.cluster_resources()
        need_cpu = int(t["workers"]) * float(t.get("cpus_per_worker", 1))
        need_gpu = int(t["workers"]) if t.get("use_gpu") else 0
        if need_cpu > have.get("CPU", 0) or need_gpu > have.get("GPU", 0):
            ray.shutdown()
            raise TrainConfigError([
                f"train.workers: {t['workers']} workers need {need_cpu:g} CPUs and {need_gpu} GPUs "
                f"(train.cpus_per_worker, train.use_gpu); this machine has {have.get('CPU', 0):g} CPUs "
                f"and {have.get('GPU', 0):g} GPUs"
            ])
    # Ray Train persists rank 0's checkpoint under storage_path; by default a folder inside
    # the staging folder, so it disappears with it. Multi-node clusters need shared storage.
    storage = ray_cfg.get("storage_path") or str(staging / ".ray")
    try:
        trainer = TorchTrainer(
            _ray_worker,
            train_loop_config={"job": job, "examples": ray.put((train_ex, val_ex))},
            scaling_config=ScalingConfig(
                num_workers=int(t["workers"]), use_gpu=bool(t.get("use_gpu")),
                resources_per_worker={"CPU": float(t.get("cpus_per_worker", 1))},
            ),
            torch_config=TorchConfig(backend="nccl" if t.get("use_gpu") else "gloo"),
            run_config=RunConfig(name=f"train-lora-{staging.name.lstrip('.')}", storage_path=os.path.abspath(storage)),
        )
        result = trainer.fit()
        if result.checkpoint is None:
            raise RuntimeError("Ray Train finished without rank 0's adapter checkpoint")
        with result.checkpoint.as_directory() as ckpt:
            for f in ADAPTER_FILES:
                shutil.copy2(Path(ckpt, f), staging / f)
        metrics = dict(result.metrics)
    finally:
        shutil.rmtree(staging / ".ray", ignore_errors=True)
        if started_ray:
            ray.shutdown()
    return metrics


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m pipeline.train",
        description="Write the demo training set (train with: python -m jobs.train_lora adapter.name=<name>).",
    )
    parser.add_argument("--out", default="data/train_sample.parquet")
    parser.add_argument("--rows", type=int, default=48)
    parser.add_argument("--json-messages", action="store_true", help="messages as JSON text instead of nested")
    args = parser.parse_args(argv)
    print(write_sample_dataset(args.out, n=args.rows, json_messages=args.json_messages))
    return 0


if __name__ == "__main__":
    sys.exit(main())
