"""Finding one file of a model: in a local folder, or in the Hugging Face cache for a hub id.

Pure module: standard library only; `huggingface_hub` is imported only when a hub id is looked up,
so local models need nothing else.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# A hub id: "name" or "owner/name" (letters, digits, "-", "_", ".").
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class ModelFileNotFound(FileNotFoundError):
    """The model, or the requested file of it, is not available locally."""


def resolve_model_file(name_or_path: str | os.PathLike, filename: str) -> Path:
    """The local path of `filename` of the model `name_or_path`.

    A local folder is used as it is. Anything else must be a Hugging Face hub id; the file is
    taken from the local Hugging Face cache, else downloaded (a first run on a fresh machine
    renders prompts before vLLM has fetched the model). Offline, huggingface_hub retries for
    about half a minute before giving up unless ``HF_HUB_OFFLINE=1``. Raises `ModelFileNotFound`
    saying where it looked.
    """
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        path = local / filename
        if not path.is_file():
            raise ModelFileNotFound(f"{filename} not found in the model folder {local}")
        return path
    name = str(name_or_path)
    if not _HUB_ID.match(name) or local.exists():
        raise ModelFileNotFound(f"model {name!r}: no such model folder, and not a Hugging Face hub id")
    return _from_hub(name, filename)


def _from_hub(repo_id: str, filename: str) -> Path:
    try:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache
        from huggingface_hub.constants import HF_HUB_CACHE
    except ImportError as exc:
        raise ModelFileNotFound(
            f"model {repo_id!r} is not a local folder, and huggingface_hub (needed to find hub models) "
            f"is not installed: {exc}"
        ) from exc

    cached = try_to_load_from_cache(repo_id, filename)
    if isinstance(cached, str):
        return Path(cached)
    if cached is not None:  # the cache knows the repository has no such file
        raise ModelFileNotFound(f"model {repo_id!r} has no {filename} (per the Hugging Face cache, {HF_HUB_CACHE})")
    try:
        return Path(hf_hub_download(repo_id, filename))
    except Exception as exc:  # offline, gated, missing repo or file: all mean "not available"
        raise ModelFileNotFound(
            f"model {repo_id!r} is no local folder (relative paths: to {Path.cwd()}), and its {filename} is "
            f"not in the Hugging Face cache ({HF_HUB_CACHE}) and could not be downloaded "
            f"({type(exc).__name__}: {exc}). Download the model first (`hf download {repo_id}`) or pass "
            "a local folder; HF_HUB_OFFLINE=1 skips the download attempt."
        ) from exc
