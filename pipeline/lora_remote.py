"""The adapter registry on an object store, or any filesystem `pipeline.storage` opens.

An object store has no rename, and an adapter is several objects, so a reader must never take
the files of one adapter with the manifest of another. Publishing (`publish`):

1. the finished adapter (a local folder) gets its files' `content_hash` in its manifest;
2. it is uploaded under a hidden prefix, `<root>/.tmp-<name>-<uuid>/`, which no reader lists;
3. an adapter already published under that name loses its `manifest.json` first (readers now
   see no adapter of that name), then its files;
4. each file is copied server-side to `<root>/<name>/`, `manifest.json` last;
5. the hidden prefix is deleted.

A reader goes by the manifest: no manifest, no adapter. A job killed during 2 leaves only the
hidden prefix (`clean_stale` removes it later); killed during 3 or 4, no manifest, so no adapter
(rerun the training with `adapter.overwrite=true`). A reader that took the manifest just before
an overwrite and the files just after gets files whose hash is not the manifest's, and
`local_copy` refuses them (`CacheMismatch`).

Reading (`local_copy`): vLLM loads adapters from local paths, so each node copies an adapter once
into its cache, `$PIPELINE_CACHE/adapters/<content hash>/` (`pipeline.node_cache`).
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import pyarrow.fs as pafs

from pipeline.errors import JobFailure
from pipeline.lora_registry import _NAME_RE, _TMP_PREFIX, MANIFEST, content_hash
from pipeline.node_cache import cache_root, fetch_folder
from pipeline.storage import Location, resolve, shown

ADAPTER_CACHE = "adapters"


def names(root: Location) -> list[str]:
    """The complete adapters under `root` (a folder with a manifest), sorted."""
    found = []
    for child in root.children():
        if _NAME_RE.fullmatch(child.name) and child.join(MANIFEST).is_file():
            found.append(child.name)
    return sorted(found)


def fetch(root: Location, name: str) -> tuple[Path, str]:
    """(this node's copy of adapter `name`, its URI)."""
    location = root.join(name)
    manifest = json.loads(location.join(MANIFEST).read_text())
    return local_copy(location.uri, manifest.get("content_hash")), location.uri


def local_copy(uri: str, fingerprint: str | None = None) -> Path:
    """This node's copy of the adapter folder at `uri`, made if missing.

    `fingerprint` (`sha256:<hex>`, as `lora_registry.content_hash` gives) names the copy, so a
    node that holds it reads nothing from the store; a copy whose files hash otherwise raises
    `node_cache.CacheMismatch`. Without it, the copy is named by the hash of what was copied.
    """
    key = fingerprint.split(":", 1)[1] if fingerprint else None
    return fetch_folder(resolve(uri, "lora_root"), cache_root() / ADAPTER_CACHE, key=key,
                        content_key=lambda folder: content_hash(folder).split(":", 1)[1])


def on_this_node(adapters: dict[str, dict]) -> dict[str, dict]:
    """A job's adapters (`generate.config.AdapterSet.adapters`) with the path of each one from an
    object store (those with a `uri`) replaced by this node's copy, fetched if missing and checked
    against the fingerprint the job planned with. Raises `JobFailure` when one cannot be fetched."""
    out = {}
    for name, adapter in adapters.items():
        if "uri" in adapter and "error" not in adapter:
            try:
                adapter = {**adapter, "path": str(local_copy(adapter["uri"], adapter.get("fingerprint")))}
            except Exception as exc:
                raise JobFailure(f"adapter {name!r} could not be copied from {shown(adapter['uri'])} to this node "
                                 f"({type(exc).__name__}: {exc}); rerun the job to plan with the adapter as it "
                                 "is now") from exc
        out[name] = adapter
    return out


def publish(root: Location, staged: Path, name: str) -> None:
    """Publish the local adapter folder `staged` as `<root>/<name>/` (the steps in the module's
    docstring). The caller has checked that the name may be written."""
    manifest = json.loads((staged / MANIFEST).read_text(encoding="utf-8"))
    manifest["content_hash"] = content_hash(staged)
    (staged / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str) + "\n", encoding="utf-8")
    fs = root.filesystem
    hidden = root.join(f"{_TMP_PREFIX}{name}-{uuid.uuid4().hex}")
    try:
        pafs.copy_files(str(staged), hidden.path, source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=fs)
        files = sorted(f.relative_to(hidden) for f in hidden.files())
        target = root.join(name)
        if target.exists():
            target.join(MANIFEST).delete()
            target.delete()
        for rel in [f for f in files if f != MANIFEST] + [MANIFEST]:
            destination = target.join(*rel.split("/"))
            fs.copy_file(hidden.join(*rel.split("/")).path, destination.path)
    finally:
        hidden.delete()


def clean_stale(root: Location, stale_age: float) -> list[str]:
    """Delete hidden upload prefixes (`.tmp-*`) whose newest object is older than `stale_age`
    seconds (`lora_staging.STALE_AFTER_S`): a publish takes seconds, so one that old was abandoned.
    Returns their URIs."""
    removed = []
    now = time.time()
    for child in root.children():
        if not child.name.startswith(_TMP_PREFIX) or not child.is_dir():
            continue
        selector = pafs.FileSelector(child.path, recursive=True, allow_not_found=True)
        times = [i.mtime.timestamp() for i in child.filesystem.get_file_info(selector) if i.mtime is not None]
        if times and now - max(times) > stale_age:  # a store that gives no times keeps them
            child.delete()
            removed.append(child.shown)
    return removed
