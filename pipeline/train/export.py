"""An adapter out of the registry, in the form where it is deployed (`python -m jobs.export_lora`).

- `peft`: the PEFT files as they are (`adapter_config.json`, `adapter_model.safetensors`).
- `workers-ai`: the same two files, after checking Cloudflare Workers AI's published limits for
  LoRA adapters (developers.cloudflare.com/workers-ai/fine-tunes/loras/): rank r <= 8, the
  adapter under 100 MB, exactly those two file names, and a base model that is not quantized,
  named in `adapter_config.json`. An adapter that breaks any limit is refused with each one named.
- `merged`: the adapter merged into the float weights it was trained on (PEFT's
  `merge_and_unload`), saved with the tokenizer as a model folder that vLLM or transformers load
  without LoRA.

The output folder is written under a hidden name beside it and renamed into place when complete,
so a refusal or a failure leaves nothing half-written. The limit checks are plain Python; torch,
PEFT and transformers are imported only for `merged`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from pathlib import Path

from pipeline.errors import UserError
from pipeline.lora_registry import ADAPTER_CONFIG, ADAPTER_WEIGHTS, AdapterRegistry

TARGETS = ("workers-ai", "merged", "peft")
WORKERS_AI_MAX_RANK = 8
# "< 100MB" in Cloudflare's limits; read as 10^6-byte megabytes, the stricter of the two readings.
WORKERS_AI_MAX_BYTES = 100 * 1000 * 1000
WORKERS_AI_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
# Names quantized checkpoints go by (AWQ, GPTQ, bitsandbytes, GGUF); a local folder is also
# checked for a quantization_config.
_QUANTIZED_NAME = re.compile(r"awq|gptq|bnb|gguf|int4|int8|4bit|8bit|fp8|nf4", re.IGNORECASE)


class ExportRefused(UserError):
    """The adapter cannot be exported to that target: every reason, each naming the limit."""

    def __init__(self, name: str, target: str, problems: list[str]):
        super().__init__(problems, heading=f"adapter {name!r} cannot be exported to {target}:")


def workers_ai_problems(config: dict, files: dict[str, int]) -> list[str]:
    """Every Workers AI limit the adapter breaks: `config` is its adapter_config.json, `files`
    the size in bytes of each file it has."""
    problems = []
    # rank_pattern gives some modules their own rank: the largest is the adapter's.
    ranks = [config.get("r"), *(config.get("rank_pattern") or {}).values()]
    top = max((r for r in ranks if isinstance(r, int)), default=None)
    if top is None or top > WORKERS_AI_MAX_RANK:
        problems.append(f"rank: Workers AI accepts r <= {WORKERS_AI_MAX_RANK} (this adapter: r={top}); "
                        f"retrain with train.lora.rank={WORKERS_AI_MAX_RANK} or lower")
    missing = [f for f in WORKERS_AI_FILES if f not in files]
    if missing:
        problems.append(f"files: Workers AI needs exactly {' and '.join(WORKERS_AI_FILES)}; missing {', '.join(missing)}")
    size = sum(files.get(f, 0) for f in WORKERS_AI_FILES)
    if size >= WORKERS_AI_MAX_BYTES:
        problems.append(f"size: Workers AI accepts adapters under 100 MB (this adapter: {size / 1e6:.1f} MB); "
                        "retrain with a lower train.lora.rank or fewer train.lora.target_modules")
    base = config.get("base_model_name_or_path")
    if not base:
        problems.append("base model: adapter_config.json names no base_model_name_or_path; Workers AI needs the "
                        "non-quantized base model it was trained for")
    elif is_quantized(str(base)):
        problems.append(f"base model: {base} is a quantized checkpoint; Workers AI serves LoRA adapters only on "
                        "non-quantized bases (train on the float weights: model.train_path)")
    return problems


def is_quantized(model: str) -> bool:
    """Whether `model` (a hub id or a local folder) names a quantized checkpoint."""
    config = Path(model, "config.json")
    if config.is_file():
        return bool(json.loads(config.read_text()).get("quantization_config"))
    return bool(_QUANTIZED_NAME.search(model))


def export_adapter(root: str | os.PathLike, name: str, target: str, out: str | os.PathLike) -> Path:
    """Write adapter `name` of the registry at `root` to the new folder `out` in `target`'s form."""
    if target not in TARGETS:
        raise UserError(f"--to: one of {', '.join(TARGETS)} (got {target!r})")
    adapter = AdapterRegistry(root).resolve(name)
    out = Path(out).absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"OUT: {out} already exists and is not an empty folder; name a new folder")
    files = {f.name: f.stat().st_size for f in adapter.path.iterdir() if f.is_file()}
    config = json.loads((adapter.path / ADAPTER_CONFIG).read_text())
    if target == "workers-ai":
        problems = workers_ai_problems(config, files)
        if problems:
            raise ExportRefused(name, target, problems)

    out.parent.mkdir(parents=True, exist_ok=True)
    pending = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex}"
    pending.mkdir()
    try:
        if target == "merged":
            _write_merged(adapter.path, adapter.manifest, pending)
        else:
            for f in WORKERS_AI_FILES:
                shutil.copy2(adapter.path / f, pending / f)
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(pending, out)
    finally:
        shutil.rmtree(pending, ignore_errors=True)
    return out


def _write_merged(adapter_dir: Path, manifest: dict, out: Path) -> None:
    """The float weights the adapter was trained on, with the adapter merged in, and their tokenizer."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base_path = (manifest.get("base_model") or {}).get("train_path")
    if not base_path:
        raise UserError(f"adapter {adapter_dir.name!r}: its manifest records no base_model.train_path "
                        "(the float weights to merge into); retrain it with this version")
    dtype = getattr(torch, ((manifest.get("config") or {}).get("train") or {}).get("dtype") or "float32")
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=dtype)
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(str(out), safe_serialization=True)
    AutoTokenizer.from_pretrained(base_path).save_pretrained(str(out))
