"""Finding one file of a model: in a local folder, or in the Hugging Face cache for a hub id.

Pure module: standard library only; `huggingface_hub` is imported only when a hub id is looked up,
so local models need nothing else.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

# A hub id: "name" or "owner/name" (letters, digits, "-", "_", ".").
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class ModelFileNotFound(FileNotFoundError):
    """The model, or the requested file of it, is not available locally."""


def resolve_model_file(name_or_path: str | os.PathLike, filename: str, revision: str | None = None) -> Path:
    """The local path of `filename` of the model `name_or_path`.

    A local folder is used as it is. Anything else must be a Hugging Face hub id; the file is
    taken from the local Hugging Face cache, else downloaded (a first run on a fresh machine
    renders prompts before vLLM has fetched the model). Offline, huggingface_hub retries for
    about half a minute before giving up unless ``HF_HUB_OFFLINE=1``. Raises `ModelFileNotFound`
    saying where it looked. `revision` (a commit, for a job pinned to one) applies to hub ids.
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
    return _from_hub(name, filename, revision)


def _from_hub(repo_id: str, filename: str, revision: str | None = None) -> Path:
    try:
        from huggingface_hub import hf_hub_download, try_to_load_from_cache
        from huggingface_hub.constants import HF_HUB_CACHE
    except ImportError as exc:
        raise ModelFileNotFound(
            f"model {repo_id!r} is not a local folder, and huggingface_hub (needed to find hub models) "
            f"is not installed: {exc}"
        ) from exc

    cached = try_to_load_from_cache(repo_id, filename, revision=revision)
    if isinstance(cached, str):
        return Path(cached)
    if cached is not None:  # the cache knows the repository has no such file
        raise ModelFileNotFound(f"model {repo_id!r} has no {filename} (per the Hugging Face cache, {HF_HUB_CACHE})")
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision))
    except Exception as exc:  # offline, gated, missing repo or file: all mean "not available"
        raise ModelFileNotFound(
            f"model {repo_id!r} is no local folder (relative paths: to {Path.cwd()}), and its {filename} is "
            f"not in the Hugging Face cache ({HF_HUB_CACHE}) and could not be downloaded "
            f"({type(exc).__name__}: {exc}). Download the model first (`hf download {repo_id}`) or pass "
            "a local folder; HF_HUB_OFFLINE=1 skips the download attempt."
        ) from exc


# The files of a model folder that decide its tokens: configuration, tokenizer, chat template and
# weights. A file that is absent is recorded as absent.
IDENTITY_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "chat_template.jinja", "quantization_config.json",
)
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")


def model_identity(name_or_path: str | os.PathLike, revision: str | None = None) -> dict:
    """What identifies a model's content, for a job's fingerprint.

    A local folder: a sha256 of each file that decides tokens (`IDENTITY_FILES`, every weight
    file). Weight hashes are kept in a small cache keyed by path, size, modification time and
    inode, so a folder of many gigabytes is read once, not at every job start; a file rebuilt in
    place gets a new modification time and is hashed again. A hub id: the commit it resolves
    to (`revision`, default the main branch), which pins every file of it.
    """
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        files = {}
        for name in IDENTITY_FILES:
            path = local / name
            files[name] = _sha256(path) if path.is_file() else None
        for pattern in WEIGHT_PATTERNS:
            for path in sorted(local.glob(pattern)):
                files[path.name] = _cached_sha256(path)
        return {"kind": "folder", "files": files}
    return {"kind": "hub", "id": str(name_or_path), "commit": resolve_hub_commit(str(name_or_path), revision)}


def resolve_hub_commit(repo_id: str, revision: str | None = None) -> str:
    """The commit a hub model's `revision` (a branch, tag or commit; default main) stands for:
    from the Hugging Face cache when it holds that ref, else from the hub. Raises
    `ModelFileNotFound` saying what to do when neither answers."""
    revision = revision or "main"
    if re.fullmatch(r"[0-9a-f]{40}", revision):
        return revision
    try:
        from huggingface_hub import HfApi
        from huggingface_hub.constants import HF_HUB_CACHE, HF_HUB_OFFLINE
    except ImportError as exc:
        raise ModelFileNotFound(f"model {repo_id!r}: huggingface_hub is needed to resolve a hub id ({exc})") from exc
    ref = Path(HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "refs" / revision
    if ref.is_file():
        return ref.read_text().strip()
    if HF_HUB_OFFLINE:
        raise ModelFileNotFound(
            f"model {repo_id!r}: revision {revision!r} is not in the Hugging Face cache and HF_HUB_OFFLINE is set; "
            f"download it first (`hf download {repo_id} --revision {revision}`) or set model.revision to a commit"
        )
    try:
        return HfApi().model_info(repo_id, revision=revision).sha
    except Exception as exc:
        raise ModelFileNotFound(
            f"model {repo_id!r}: could not resolve revision {revision!r} to a commit ({type(exc).__name__}: {exc}); "
            "check the id and the network, or set model.revision to a commit hash"
        ) from exc


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def _hash_cache_file() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "llama-batch-pipeline" / "file-hashes.json"


def _cached_sha256(path: Path) -> str:
    stat = path.stat()
    key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ino}"
    cache_file = _hash_cache_file()
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return cache[key]
    digest = _sha256(path)
    cache[key] = digest
    try:  # a cache that cannot be written only costs time
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(f".{cache_file.name}.{os.getpid()}")
        tmp.write_text(json.dumps(dict(list(cache.items())[-1000:])))
        os.replace(tmp, cache_file)
    except OSError:
        pass
    return digest
