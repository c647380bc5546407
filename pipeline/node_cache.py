"""A node's own cache folder, and folders copied into it from any filesystem.

vLLM loads models and LoRA adapters from local paths, so a model or an adapter that lives on an
object store (`s3://...`) is copied once per node into `$PIPELINE_CACHE` (default `.cache` where
the process runs), under a key that names its content:

    <cache>/adapters/<sha256 of the adapter's files>/
    <cache>/models/remote/<sha256 of the model's listing: names, sizes, modification times>/

A copy is made in a hidden folder beside its final place, checked, then renamed into place: a
reader never sees a half-copied folder, and when several processes of one node fetch the same
folder at once, the first rename wins and the others drop their copy (same content, same key).

Pure: standard library and pyarrow only.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import pyarrow.fs as pafs

from pipeline.storage import Location

CACHE_ENV = "PIPELINE_CACHE"


class CacheMismatch(RuntimeError):
    """A copied folder's content is not the content it was fetched for (it changed on the store)."""


def cache_root() -> Path:
    """This node's cache folder: `$PIPELINE_CACHE`, else `.cache` in the working directory."""
    return Path(os.environ.get(CACHE_ENV) or ".cache").expanduser().absolute()


def fetch_folder(source: Location, parent: Path, key: str | None = None,
                 content_key: Callable[[Path], str] | None = None) -> Path:
    """`parent/<key>`: every file below `source`, copied there unless already present.

    `content_key(folder)` names a copied folder by its content. With a `key`, a folder already at
    `parent/<key>` is used without reading the store, and a copy whose content key differs raises
    `CacheMismatch`; without one, the copy is named by its content key. Raises `OSError` (the
    store's) when `source` cannot be read.
    """
    if key is not None and (parent / key).is_dir():
        return parent / key
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=parent))
    try:
        tmp.chmod(0o755)  # mkdtemp's 0700 would become the folder's mode
        pafs.copy_files(source.path, str(tmp), source_filesystem=source.filesystem,
                        destination_filesystem=pafs.LocalFileSystem(), use_threads=True)
        found = content_key(tmp) if content_key is not None else key
        if found is None:
            raise ValueError("fetch_folder needs a key or a content_key")
        if key is not None and found != key:
            raise CacheMismatch(f"{source.shown} changed while it was in use: its content is now {found}, "
                                f"not {key}")
        dest = parent / found
        try:
            os.rename(tmp, dest)  # atomic; fails when another process got there first
        except OSError:
            if not dest.is_dir():
                raise
        return dest
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def listing_key(source: Location) -> str:
    """A key for a folder on a store by its listing: each file's path below it, size and
    modification time (an object rewritten gets a new one), hashed. Reads no file."""
    digest = hashlib.sha256()
    selector = pafs.FileSelector(source.path, recursive=True, allow_not_found=False)
    infos = sorted((i for i in source.filesystem.get_file_info(selector) if i.type == pafs.FileType.File),
                   key=lambda i: i.path)
    if not infos:
        raise FileNotFoundError(f"{source.shown} holds no file")
    for info in infos:
        rel = info.path[len(source.path):].lstrip("/")
        mtime = info.mtime_ns if info.mtime_ns is not None else 0
        digest.update(f"{rel}\0{info.size}\0{mtime}\n".encode("utf-8"))
    return digest.hexdigest()
