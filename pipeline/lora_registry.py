"""Named LoRA adapters on disk: ``<root>/<name>/`` folders that vLLM can load.

Each adapter folder holds the PEFT files (``adapter_config.json``,
``adapter_model.safetensors``) and a ``manifest.json`` that the training job writes
last. A folder counts as an adapter only once its manifest is there, and training
writes into a hidden staging folder that is renamed into place only on success, so
a crashed or killed run never leaves a half-written adapter that generation could
pick up. The registry may sit on a filesystem shared by several nodes; staging
folders carry an owner file with a heartbeat so that one node's cleanup never
deletes another node's run in progress.

The root may also be a URI on any filesystem `pipeline.storage` opens (`s3://bucket/lora`).
An object store has no rename, so publishing there goes (`lora_remote`): the adapter is
written in a local folder, uploaded under a hidden `.tmp-<name>-<uuid>/` prefix, then copied
server-side to `<name>/` with `manifest.json` (which then records the files' `content_hash`)
copied last; replacing an adapter deletes the old manifest first. Readers go by the manifest,
so they see the old adapter, none, or the whole new one. Resolving an adapter there copies it
into the node's cache (`pipeline.node_cache`), keyed by its content hash, and the `Adapter`
points at that local copy (`uri` says where it came from).

Pure: standard library and pyarrow only, so the generation driver can resolve names without
importing torch, PEFT or vLLM.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from pipeline import lora_staging
from pipeline.errors import UserError
from pipeline.storage import resolve as resolve_location
from pipeline.lora_staging import OWNER_FILE, Heartbeat, is_stale, owner_record

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
    uri: str | None = field(default=None, compare=False)
    """Where the adapter lives when its registry is on another filesystem (`path` is then this
    node's cached copy); None for a local registry."""

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

    ``heartbeat_s`` and ``stale_after_s`` override ``lora_staging.HEARTBEAT_S`` and
    ``lora_staging.STALE_AFTER_S`` for this registry (tests use short ones); ``None`` means the
    module value at the time of use.
    """

    def __init__(
        self,
        root: str | os.PathLike = "lora",
        *,
        heartbeat_s: float | None = None,
        stale_after_s: float | None = None,
    ):
        self.location = resolve_location(str(root), "lora_root")
        self.remote = not self.location.is_local
        self.root = Path(root) if not self.remote else None
        self.heartbeat_s = heartbeat_s
        self.stale_after_s = stale_after_s

    @property
    def shown(self) -> str:
        """The root as messages print it (a URI without credentials)."""
        return self.location.shown if self.remote else str(self.root)

    @property
    def work_root(self) -> Path:
        """A local folder for what a training run keeps beside the registry (`.runs/`: checkpoints,
        event files): the registry's own folder, or for a registry on another filesystem a folder
        of this node's cache named after its URI."""
        if not self.remote:
            return self.root
        from pipeline.node_cache import cache_root

        return cache_root() / "registries" / hashlib.sha256(self.location.uri.encode("utf-8")).hexdigest()[:16]

    def _heartbeat_interval(self) -> float:
        return lora_staging.HEARTBEAT_S if self.heartbeat_s is None else self.heartbeat_s

    def _stale_age(self) -> float:
        return lora_staging.STALE_AFTER_S if self.stale_after_s is None else self.stale_after_s

    # ---- reading -----------------------------------------------------------------

    def list(self) -> list[Adapter]:
        """Complete adapters (those with a manifest), sorted by name. On a remote registry each
        is copied into this node's cache (see `resolve`)."""
        if self.remote:
            from pipeline import lora_remote

            return [self.resolve(n) for n in lora_remote.names(self.location)]
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
        if self.remote:
            from pipeline import lora_remote

            return lora_remote.names(self.location)
        return [a.name for a in self.list()]

    def resolve(self, name: str) -> Adapter:
        """The complete adapter `name`; on a remote registry, copied into this node's cache first
        (once per content: `lora_remote.local_copy`)."""
        validate_name(name)
        if name not in self:
            present = self.names()
            listing = ", ".join(present) if present else "none"
            raise AdapterNotFound(
                f"unknown LoRA adapter {name!r} in {self.shown}/ (adapters present: {listing})"
            )
        if self.remote:
            from pipeline import lora_remote

            path, uri = lora_remote.fetch(self.location, name)
            return self._load(name, path, uri)
        return self._load(name)

    def __contains__(self, name: str) -> bool:
        try:
            validate_name(name)
        except InvalidAdapterName:
            return False
        if self.remote:
            return self.location.join(name, MANIFEST).is_file()
        return (self.root / name / MANIFEST).is_file()

    def _load(self, name: str, path: Path | None = None, uri: str | None = None) -> Adapter:
        # Absolute, because the path is handed to engine processes whose working
        # directory need not be ours.
        path = (path or self.root / name).absolute()
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
            uri=uri,
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

        On a registry on another filesystem the folder is a local one in this node's cache,
        published by `lora_remote.publish` (hidden upload, server-side copies, manifest last).
        """
        validate_name(name)
        # Refuse before any work is done, so a long training run is not wasted.
        self.check_can_write(name, overwrite)
        if self.remote:
            yield from self._remote_staging(name, overwrite)
            return
        self.root.mkdir(parents=True, exist_ok=True)
        self.clean_stale()
        tmp = self.root / f"{_TMP_PREFIX}{name}-{uuid.uuid4().hex}"
        tmp.mkdir()
        (tmp / OWNER_FILE).write_text(owner_record())
        heartbeat = Heartbeat(tmp / OWNER_FILE, self._heartbeat_interval())
        heartbeat.start()
        try:
            try:
                yield tmp
            finally:
                heartbeat.stop()
            (tmp / OWNER_FILE).unlink(missing_ok=True)
            if not (tmp / MANIFEST).is_file():
                raise IncompleteAdapter(
                    f"staging for adapter {name!r} finished without writing {MANIFEST}; "
                    "nothing was published"
                )
            self._publish(tmp, name, overwrite)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def _remote_staging(self, name: str, overwrite: bool) -> Iterator[Path]:
        """`staging` for a registry on another filesystem: a local folder of this node's cache,
        published by `lora_remote.publish` (upload under a hidden prefix, copy, manifest last)."""
        import tempfile

        from pipeline import lora_remote

        self.clean_stale()
        parent = self.work_root / "staging"
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{name}-", dir=parent))
        try:
            yield tmp
            if not (tmp / MANIFEST).is_file():
                raise IncompleteAdapter(
                    f"staging for adapter {name!r} finished without writing {MANIFEST}; "
                    "nothing was published"
                )
            self.check_can_write(name, overwrite)
            lora_remote.publish(self.location, tmp, name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def check_can_write(self, name: str, overwrite: bool = False) -> None:
        """Raise unless `staging(name, overwrite)` could publish: the name is valid, free (or
        overwrite is set), and its lora_int_id is not another adapter's."""
        validate_name(name)
        target = self.location.join(name) if self.remote else self.root / name
        if target.exists() and not overwrite:
            raise AdapterExists(
                f"adapter {name!r} already exists at {target.shown if self.remote else target}; pick another name or "
                "overwrite it (train_lora: add `adapter.overwrite=true`; "
                "AdapterRegistry.staging(name, overwrite=True))"
            )
        # Ids come from a 31-bit hash, so two names can collide, rarely. Refusing the
        # second name here keeps ids unique within a registry, which is what vLLM needs.
        new_id = lora_int_id(name)
        for other in self.names():
            if other != name and lora_int_id(other) == new_id:
                raise AdapterIdCollision(
                    f"adapter name {name!r} hashes to the same lora_int_id ({new_id}) as "
                    f"existing adapter {other!r}; choose another name"
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
        if self.remote:
            from pipeline import lora_remote

            return lora_remote.clean_stale(self.location, self._stale_age())
        removed = []
        if not self.root.is_dir():
            return removed
        stale_age = self._stale_age()
        for child in self.root.iterdir():
            if child.name.startswith(_TMP_PREFIX) and child.is_dir() and is_stale(child, stale_age):
                shutil.rmtree(child, ignore_errors=True)
                removed.append(child)
        return removed


def _read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


if __name__ == "__main__":
    from pipeline.cli import adapters

    sys.exit(adapters())
