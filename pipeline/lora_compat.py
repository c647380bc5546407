"""Does an adapter fit a model? Its LoRA target modules checked against the module names of a
model's checkpoint, read from safetensors headers (no weights loaded), so an adapter trained on
float weights is known to load on the AWQ checkpoint before anything is served.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path

from pipeline.lora_registry import ADAPTER_CONFIG


def model_module_names(model_dir: str | os.PathLike) -> set[str]:
    """Names of the modules that own weights in a local checkpoint.

    Read from ``model.safetensors.index.json`` or the safetensors headers, so it works
    for float and quantized (AWQ/GPTQ: ``qweight``/``scales``/``qzeros``) checkpoints
    alike without loading any weights.
    """
    model_dir = Path(model_dir)
    keys: set[str] = set()
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        keys.update(json.loads(index.read_text(encoding="utf-8"))["weight_map"])
    else:
        files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no safetensors weights in {model_dir}")
        for f in files:
            keys.update(_safetensors_keys(f))
    return {k.rsplit(".", 1)[0] for k in keys if "." in k}


def _safetensors_keys(path: Path) -> list[str]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return [k for k in header if k != "__metadata__"]


@dataclass(frozen=True)
class AdapterMatch:
    ok: bool
    target_modules: tuple[str, ...]
    missing: tuple[str, ...]
    matched_modules: int


def check_adapter_matches(adapter_dir: str | os.PathLike, model_dir: str | os.PathLike) -> AdapterMatch:
    """Does every LoRA target module of the adapter exist in the model's checkpoint?

    An adapter trained on float weights is served on the AWQ checkpoint; vLLM applies
    LoRA to its (quantized) linear layers by module name, so the names must line up.
    ``missing`` lists targets that match no module of the model.
    """
    config = json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    targets = config.get("target_modules") or []
    modules = model_module_names(model_dir)
    if isinstance(targets, str):
        if targets == "all-linear":
            return AdapterMatch(True, (targets,), (), len(modules))
        # PEFT treats a string as a full-match regex over module names.
        pattern = re.compile(targets)
        hits = [m for m in modules if pattern.fullmatch(m)]
        return AdapterMatch(bool(hits), (targets,), () if hits else (targets,), len(hits))
    missing, hits = [], 0
    for target in targets:
        n = sum(1 for m in modules if m == target or m.endswith("." + target))
        hits += n
        if n == 0:
            missing.append(target)
    return AdapterMatch(not missing, tuple(sorted(targets)), tuple(missing), hits)
