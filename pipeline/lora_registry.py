"""Named LoRA adapters on disk: ``<root>/<name>/`` folders that vLLM can load.

Each adapter folder holds the PEFT files (``adapter_config.json``,
``adapter_model.safetensors``) and a ``manifest.json`` that the training job writes
last. A folder counts as an adapter only once its manifest is there, and training
writes into a hidden staging folder that is renamed into place only on success, so
a crashed or killed run never leaves a half-written adapter that generation could
pick up. The registry may sit on a filesystem shared by several nodes; staging
folders carry an owner file with a heartbeat so that one node's cleanup never
deletes another node's run in progress.

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
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from pipeline.errors import UserError

MANIFEST = "manifest.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Older PEFT versions save pickled weights instead; vLLM loads either.
ADAPTER_WEIGHTS_BIN = "adapter_model.bin"
# What `Adapter.content_hash` covers, in this order: the files that decide what vLLM
# serves. The manifest is left out, since it records when and how the adapter was made,
# not what it computes.
_CONTENT_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, ADAPTER_WEIGHTS_BIN)
_HASH_CHUNK = 1 << 20

# Names become folder names and appear in request rows (`lora=<name>`): a leading
# letter or digit keeps them clear of the hidden `.tmp-*` staging folders, and the
# character set is safe on every filesystem and in URLs.
# Always used with fullmatch: `$` would also match before a trailing newline.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_TMP_PREFIX = ".tmp-"
# Inside a staging folder: which process owns it, so cleanup spares runs in progress.
_OWNER = ".staging-owner.json"

# While a staging block runs, its owner file's mtime is refreshed this often (seconds).
HEARTBEAT_S = 30.0
# A staging folder whose liveness cannot be checked by pid (owner on another host, or
# owner unknown) is a leftover once its heartbeat is this old (seconds). Generous, so
# that a slow shared filesystem, a busy node or clock skew between nodes never gets a
# live run's folder deleted; the cost is only that a crashed run's files linger a while.
STALE_AFTER_S = 3600.0


class AdapterError(UserError):
    """Base class for registry errors (the user's to fix: a name, an existing adapter).

    ``code`` is a stable reason per subclass, for callers that record why an adapter
    could not be used: messages change and may list other adapters, codes do not.
    """

    code = "adapter_error"


class AdapterNotFound(AdapterError, KeyError):
    """No complete adapter of that name in the registry."""

    code = "not_found"

    def __str__(self) -> str:  # KeyError would otherwise print the message quoted
        return str(self.args[0]) if self.args else ""


class AdapterExists(AdapterError):
    """Staging would replace an existing adapter and overwrite was not asked for."""

    code = "exists"


class InvalidAdapterName(AdapterError):
    """The name cannot be used as an adapter folder name."""

    code = "invalid_name"


class AdapterIdCollision(AdapterError):
    """The name's lora_int_id is already another adapter's in the registry."""

    code = "id_collision"


class IncompleteAdapter(AdapterError):
    """Files an adapter needs are missing: a staging block wrote no manifest, or an
    adapter folder has no config or no weights to hash."""

    code = "incomplete"


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or name in (".", ".."):
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
    def content_hash(self) -> str:
        """``"sha256:<hex>"`` of the files that decide what the adapter computes.

        Covers the names and bytes of ``adapter_config.json`` and each weight file
        present (``adapter_model.safetensors``, ``adapter_model.bin``), in that order,
        so a generation job can record which adapter bytes it used and a resume can
        refuse an adapter retrained under the same name. The manifest is not included:
        retraining with the same data and seed gives the same bytes, and resuming with
        those is correct. Read from disk on every access (files are streamed, nothing
        is cached), since the point is to notice when they change. Raises
        ``IncompleteAdapter`` when the config or every weight file is missing.
        """
        return self.fingerprint()

    def fingerprint(self) -> str:
        """Same as ``content_hash``, as a method for callers that prefer a call for I/O."""
        return content_hash(self.path)

    @property
    def steps(self) -> int | None:
        return self.manifest.get("steps")

    @property
    def train_loss(self) -> float | None:
        return self.manifest.get("train_loss")

    @property
    def validation_loss(self) -> float | None:
        return self.manifest.get("validation_loss")


def content_hash(adapter_dir: str | os.PathLike) -> str:
    """``"sha256:<hex>"`` over an adapter folder's config and weight files; see
    ``Adapter.content_hash``.

    Each file present contributes its name, its size and its bytes (read in 1 MiB
    chunks, so large weights never sit in memory), so moving bytes from one file to
    another cannot give the same hash.
    """
    folder = Path(adapter_dir)
    present = [f for f in _CONTENT_FILES if (folder / f).is_file()]
    if ADAPTER_CONFIG not in present or present == [ADAPTER_CONFIG]:
        raise IncompleteAdapter(
            f"adapter folder {folder} lacks {ADAPTER_CONFIG} or a weight file "
            f"({ADAPTER_WEIGHTS} or {ADAPTER_WEIGHTS_BIN})"
        )
    h = hashlib.sha256()
    for name in present:
        with open(folder / name, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            h.update(name.encode("utf-8") + b"\0" + size.to_bytes(8, "big"))
            while chunk := f.read(_HASH_CHUNK):
                h.update(chunk)
    return "sha256:" + h.hexdigest()


class AdapterRegistry:
    """The adapters under one root folder.

    ``heartbeat_s`` and ``stale_after_s`` override the module's ``HEARTBEAT_S`` and
    ``STALE_AFTER_S`` for this registry (tests use short ones); ``None`` means the
    module value at the time of use.
    """

    def __init__(
        self,
        root: str | os.PathLike = "lora",
        *,
        heartbeat_s: float | None = None,
        stale_after_s: float | None = None,
    ):
        self.root = Path(root)
        self.heartbeat_s = heartbeat_s
        self.stale_after_s = stale_after_s

    def _heartbeat_interval(self) -> float:
        return HEARTBEAT_S if self.heartbeat_s is None else self.heartbeat_s

    def _stale_age(self) -> float:
        return STALE_AFTER_S if self.stale_after_s is None else self.stale_after_s

    # ---- reading -----------------------------------------------------------------

    def list(self) -> list[Adapter]:
        """Complete adapters (those with a manifest), sorted by name."""
        if not self.root.is_dir():
            return []
        out = []
        for child in sorted(self.root.iterdir()):
            if not child.is_dir() or not _NAME_RE.fullmatch(child.name):
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
        only the hidden folder, which ``list()`` ignores and a later ``staging()``
        deletes (see ``clean_stale`` for when).

        While the block runs, a daemon thread refreshes the mtime of the folder's owner
        file every ``heartbeat_s`` seconds: on a shared filesystem that heartbeat is how
        other nodes tell a run in progress from a leftover. The thread is stopped and
        joined before the folder is published or deleted, so it never touches either.
        """
        validate_name(name)
        # Refuse before any work is done, so a long training run is not wasted.
        self.check_can_write(name, overwrite)
        self.root.mkdir(parents=True, exist_ok=True)
        self.clean_stale()
        tmp = self.root / f"{_TMP_PREFIX}{name}-{uuid.uuid4().hex}"
        tmp.mkdir()
        (tmp / _OWNER).write_text(_owner_record())
        heartbeat = _Heartbeat(tmp / _OWNER, self._heartbeat_interval())
        heartbeat.start()
        try:
            try:
                yield tmp
            finally:
                heartbeat.stop()
            (tmp / _OWNER).unlink(missing_ok=True)
            if not (tmp / MANIFEST).is_file():
                raise IncompleteAdapter(
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
                raise AdapterIdCollision(
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
        """Delete leftover staging folders (``.tmp-*``) from runs that died before
        publishing; return the folders removed.

        A folder is a leftover when:

        - its owner file names this host and a pid that no longer exists: checked
          directly, so a crashed local run is cleaned at once;
        - its owner file names another host and was last refreshed more than
          ``stale_after_s`` ago. Whether a pid on another node is alive cannot be
          checked from here, so the staging heartbeat stands in for it: a live run
          refreshes the file every ``heartbeat_s``, and a run from another node with a
          fresh heartbeat is kept;
        - it has no readable owner file (missing, unreadable, or naming no usable
          pid) and neither the owner file nor the folder was modified in the last
          ``stale_after_s``. A young folder like that may be a run that has just
          created it and not yet written its owner file. The ``-old`` folders that
          publishing with overwrite moves aside fall under this rule: publishing
          deletes them at once, so one only remains after a crash.
        """
        removed = []
        if not self.root.is_dir():
            return removed
        stale_age = self._stale_age()
        for child in self.root.iterdir():
            if child.name.startswith(_TMP_PREFIX) and child.is_dir() and _is_stale(child, stale_age):
                shutil.rmtree(child, ignore_errors=True)
                removed.append(child)
        return removed


def _owner_record() -> str:
    return json.dumps({"host": socket.gethostname(), "pid": os.getpid()})


class _Heartbeat:
    """Daemon thread that refreshes a staging owner file's mtime at a fixed interval.

    Failures are ignored (a shared filesystem can hiccup; the next beat retries), and a
    vanished staging folder ends the thread, since there is nothing left to keep alive.
    A deleted owner file is rewritten while its folder still exists.
    """

    def __init__(self, owner_file: Path, interval: float):
        self.owner_file = owner_file
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"lora-staging-heartbeat:{owner_file.parent.name}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                os.utime(self.owner_file)
            except FileNotFoundError:
                if not self.owner_file.parent.is_dir():
                    return
                with contextlib.suppress(OSError):
                    self.owner_file.write_text(_owner_record())
            except OSError:
                pass


def _is_stale(staging_dir: Path, stale_age: float) -> bool:
    """Whether `clean_stale` may delete this staging folder (rule in its docstring)."""
    owner_file = staging_dir / _OWNER
    try:
        owner = _read_json(owner_file)
    except (OSError, ValueError):
        owner = None
    host = owner.get("host") if isinstance(owner, dict) else None
    pid = owner.get("pid") if isinstance(owner, dict) else None
    if isinstance(host, str) and host:
        if host != socket.gethostname():
            return _age(owner_file) > stale_age
        if isinstance(pid, int) and not isinstance(pid, bool) and pid > 0:
            return not _pid_alive(pid)
    return min(_age(owner_file), _age(staging_dir)) > stale_age


def _age(path: Path) -> float:
    """Seconds since `path` was modified; infinite when it does not exist."""
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return float("inf")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    except OverflowError:
        return False  # not a pid this system can have
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
