"""Named LoRA adapters on disk: ``<root>/<name>/`` folders that vLLM can load.

Each adapter folder holds the PEFT files (``adapter_config.json``,
``adapter_model.safetensors``) and a ``manifest.json`` that the training job writes
last. A folder counts as an adapter only once its manifest is there, and training
writes into a hidden staging folder that is renamed into place only on success, so
a crashed or killed run never leaves a half-written adapter that generation could
pick up.

Pure: standard library only, so the generation driver can resolve names without
importing torch, PEFT or vLLM.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import struct
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

MANIFEST = "manifest.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

# Names become folder names and appear in request rows (`lora=<name>`): a leading
# letter or digit keeps them clear of the hidden `.tmp-*` staging folders, and the
# character set is safe on every filesystem and in URLs.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_TMP_PREFIX = ".tmp-"
# Inside a staging folder: which process owns it, so cleanup spares runs in progress.
_OWNER = ".staging-owner.json"


class AdapterError(Exception):
    """Base class for registry errors."""


class AdapterNotFound(AdapterError, KeyError):
    """No complete adapter of that name in the registry."""

    def __str__(self) -> str:  # KeyError would otherwise print the message quoted
        return str(self.args[0]) if self.args else ""


class AdapterExists(AdapterError):
    """Staging would replace an existing adapter and overwrite was not asked for."""


class InvalidAdapterName(AdapterError, ValueError):
    """The name cannot be used as an adapter folder name."""


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name) or name in (".", ".."):
        raise InvalidAdapterName(
            f"invalid adapter name {name!r}: use 1-100 characters from letters, digits, "
            "'.', '_' and '-', starting with a letter or digit"
        )
    return name


def lora_int_id(name: str) -> int:
    """Stable id vLLM uses to tell adapters apart (``LoRARequest.lora_int_id``).

    vLLM needs a distinct positive int per adapter; deriving it from the name keeps it
    the same across processes, machines and runs without a shared counter. 31 bits so
    it fits a signed int32 anywhere; 0 means "no adapter" to vLLM, so it is never 0.
    """
    digest = hashlib.sha256(validate_name(name).encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF or 1


@dataclass(frozen=True)
class Adapter:
    name: str
    path: Path
    base_model: str | None
    rank: int | None
    target_modules: tuple[str, ...] | str | None
    lora_int_id: int
    manifest: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def base_identities(self) -> set[str]:
        """Every name the adapter's base model goes by: its config name, the checkpoint it was
        published for and the float weights it was trained on (an AWQ model's `train_path`)."""
        base = self.manifest.get("base_model")
        found = {self.base_model}
        if isinstance(base, dict):
            found |= {base.get(k) for k in ("name", "path", "train_path")}
        return {str(b) for b in found if b}

    @property
    def steps(self) -> int | None:
        return self.manifest.get("steps")

    @property
    def train_loss(self) -> float | None:
        return self.manifest.get("train_loss")

    @property
    def validation_loss(self) -> float | None:
        return self.manifest.get("validation_loss")


class AdapterRegistry:
    def __init__(self, root: str | os.PathLike = "lora"):
        self.root = Path(root)

    # ---- reading -----------------------------------------------------------------

    def list(self) -> list[Adapter]:
        """Complete adapters (those with a manifest), sorted by name."""
        if not self.root.is_dir():
            return []
        out = []
        for child in sorted(self.root.iterdir()):
            if not child.is_dir() or not _NAME_RE.match(child.name):
                continue
            if (child / MANIFEST).is_file():
                out.append(self._load(child.name))
        return out

    def names(self) -> list[str]:
        return [a.name for a in self.list()]

    def resolve(self, name: str) -> Adapter:
        validate_name(name)
        if not (self.root / name / MANIFEST).is_file():
            present = self.names()
            listing = ", ".join(present) if present else "none"
            raise AdapterNotFound(
                f"unknown LoRA adapter {name!r} in {self.root}/ (adapters present: {listing})"
            )
        return self._load(name)

    def __contains__(self, name: str) -> bool:
        try:
            validate_name(name)
        except InvalidAdapterName:
            return False
        return (self.root / name / MANIFEST).is_file()

    def _load(self, name: str) -> Adapter:
        # Absolute, because the path is handed to engine processes whose working
        # directory need not be ours.
        path = (self.root / name).absolute()
        manifest = _read_json(path / MANIFEST)
        config = _read_json(path / ADAPTER_CONFIG) if (path / ADAPTER_CONFIG).is_file() else {}
        base = manifest.get("base_model")
        if isinstance(base, dict):
            base = base.get("name") or base.get("path")
        if base is None:
            base = config.get("base_model_name_or_path")
        targets = config.get("target_modules")
        if isinstance(targets, list):
            targets = tuple(sorted(targets))
        return Adapter(
            name=name,
            path=path,
            base_model=base,
            rank=config.get("r"),
            target_modules=targets,
            lora_int_id=lora_int_id(name),
            manifest=manifest,
        )

    # ---- writing -----------------------------------------------------------------

    @contextlib.contextmanager
    def staging(self, name: str, overwrite: bool = False) -> Iterator[Path]:
        """Yield an empty folder to write the adapter into; publish it on success.

        The folder is ``<root>/.tmp-<name>-<uuid>/``. When the block ends normally
        and the folder holds a ``manifest.json``, it is renamed to ``<root>/<name>``;
        if the block raises, it is deleted. A process killed inside the block leaves
        only the hidden folder, which ``list()`` ignores and the next ``staging()``
        deletes.
        """
        validate_name(name)
        # Refuse before any work is done, so a long training run is not wasted.
        self.check_can_write(name, overwrite)
        self.root.mkdir(parents=True, exist_ok=True)
        self.clean_stale()
        tmp = self.root / f"{_TMP_PREFIX}{name}-{uuid.uuid4().hex}"
        tmp.mkdir()
        (tmp / _OWNER).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
        try:
            yield tmp
            (tmp / _OWNER).unlink(missing_ok=True)
            if not (tmp / MANIFEST).is_file():
                raise AdapterError(
                    f"staging for adapter {name!r} finished without writing {MANIFEST}; "
                    "nothing was published"
                )
            self._publish(tmp, name, overwrite)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def check_can_write(self, name: str, overwrite: bool = False) -> None:
        """Raise unless `staging(name, overwrite)` could publish: the name is valid, free (or
        overwrite is set), and its lora_int_id is not another adapter's."""
        validate_name(name)
        target = self.root / name
        if target.exists() and not overwrite:
            raise AdapterExists(
                f"adapter {name!r} already exists at {target}; pick another name or "
                "overwrite it (train_lora: add `adapter.overwrite=true`; "
                "AdapterRegistry.staging(name, overwrite=True))"
            )
        # Ids come from a 31-bit hash, so two names can collide, rarely. Refusing the
        # second name here keeps ids unique within a registry, which is what vLLM needs.
        new_id = lora_int_id(name)
        for other in self.list():
            if other.name != name and other.lora_int_id == new_id:
                raise AdapterError(
                    f"adapter name {name!r} hashes to the same lora_int_id ({new_id}) as "
                    f"existing adapter {other.name!r}; choose another name"
                )

    def _publish(self, tmp: Path, name: str, overwrite: bool) -> None:
        self.check_can_write(name, overwrite)
        target = self.root / name
        old = None
        if target.exists():
            # A directory cannot be atomically replaced by rename, so move the old one
            # aside (as a staging folder, so a crash here is cleaned up like any other).
            old = self.root / f"{_TMP_PREFIX}{name}-{uuid.uuid4().hex}-old"
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def clean_stale(self) -> list[Path]:
        """Delete leftover staging folders from runs that died before publishing.

        A folder whose owner is a live process on this host is a run in progress and
        is kept; anything else (owner dead, unknown, or on another host of a shared
        filesystem, where liveness cannot be checked) is a leftover.
        """
        removed = []
        if not self.root.is_dir():
            return removed
        for child in self.root.iterdir():
            if child.name.startswith(_TMP_PREFIX) and child.is_dir() and not _owner_alive(child):
                shutil.rmtree(child, ignore_errors=True)
                removed.append(child)
        return removed


def _owner_alive(staging_dir: Path) -> bool:
    try:
        owner = _read_json(staging_dir / _OWNER)
    except (OSError, ValueError):
        return False
    if owner.get("host") != socket.gethostname():
        return False
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    return True


def _read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# ---- adapter / model compatibility -------------------------------------------------


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
        keys.update(_read_json(index)["weight_map"])
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
    config = _read_json(Path(adapter_dir) / ADAPTER_CONFIG)
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


# ---- CLI ---------------------------------------------------------------------------


def _fmt_loss(x: Any) -> str:
    return "-" if x is None else f"{x:.4f}"


def format_table(adapters: list[Adapter]) -> str:
    header = ("name", "base_model", "rank", "steps", "train_loss", "val_loss", "lora_int_id")
    rows = [
        (
            a.name,
            str(a.base_model or "-"),
            str(a.rank if a.rank is not None else "-"),
            str(a.steps if a.steps is not None else "-"),
            _fmt_loss(a.train_loss),
            _fmt_loss(a.validation_loss),
            str(a.lora_int_id),
        )
        for a in adapters
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="llama-batch-adapters", description="List the LoRA adapters in a registry."
    )
    parser.add_argument("--root", default="lora", help="registry folder (default: lora)")
    parser.add_argument("--json", action="store_true", help="print the manifests as JSON")
    args = parser.parse_args(argv)
    adapters = AdapterRegistry(args.root).list()
    if args.json:
        print(json.dumps({a.name: a.manifest for a in adapters}, indent=2))
    elif not adapters:
        print(f"no adapters in {args.root}/")
    else:
        print(format_table(adapters))
    return 0


if __name__ == "__main__":
    sys.exit(main())
