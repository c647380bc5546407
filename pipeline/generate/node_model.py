"""The model on whichever node a task or an engine lands: vLLM and the tokenizer read local files.

`model.path` is one of:

- a Hugging Face hub id: each node's vLLM downloads it into that node's Hugging Face cache
  (`HF_HOME`), at the commit the driver pinned (`model.revision`);
- a folder every node mounts at the same path (a shared filesystem): used as it is; a node that
  does not have it stops the job with the fix;
- a URI on an object store (`s3://bucket/models/llama`): copied once per node into
  `$PIPELINE_CACHE/models/remote/<key>/`, the key a hash of the folder's listing (names, sizes,
  modification times), and checked against the driver's file hashes;
- the project's tiny models (`model.build`): the driver's folder where a node sees it, else built
  by the node into its own cache from the same seed; either way checked against the driver's
  file hashes (same seed, same bytes).

The driver resolves `model_source` once; tasks and engines call `node_model_path` with it.
"""

from __future__ import annotations

import functools
import json
import os
import socket
from pathlib import Path

from pipeline.errors import JobFailure
from pipeline.model_files import model_identity
from pipeline.model_settings import ModelSettings
from pipeline.node_cache import cache_root, fetch_folder, listing_key
from pipeline.storage import is_remote, resolve, shown

REMOTE_MODELS = Path("models") / "remote"


def fetch_model(uri: str) -> Path:
    """This node's copy of the model folder at `uri` (copied if missing)."""
    location = resolve(uri, "model.path")
    return fetch_folder(location, cache_root() / REMOTE_MODELS, key=listing_key(location))


def model_source(model: ModelSettings, model_path: str) -> dict:
    """What a node needs to find the model the driver resolved at `model_path`: plain data for Ray."""
    local = os.path.isdir(model_path)
    return {
        "setting": model.path,
        "build": model.build,
        "seed": model.seed,
        "driver_path": model_path,
        # The driver's file hashes (cached, so cheap): what every node's copy or build must match.
        "files": model_identity(model_path)["files"] if local else None,
    }


def node_model_path(source: dict) -> str:
    """The model's local path on this node (see the module's docstring). Raises `JobFailure`
    when this node cannot have the driver's model."""
    return _node_model_path(json.dumps(source, sort_keys=True), str(cache_root()))


@functools.lru_cache(maxsize=4)
def _node_model_path(source_json: str, cache: str) -> str:
    # Once per process and cache: the checks hash the model's small files each time.
    source = json.loads(source_json)
    setting, driver_path, files = source["setting"], source["driver_path"], source["files"]
    if is_remote(setting):
        location = resolve(setting, "model.path")
        key = Path(driver_path).name  # the driver's copy is named by the listing key it saw
        try:
            path = fetch_folder(location, cache_root() / REMOTE_MODELS, key=key,
                                content_key=lambda folder: key if _files(folder) == files else "changed")
        except Exception as exc:
            raise JobFailure(f"model.path: {shown(setting)} could not be copied to node {socket.gethostname()} "
                             f"({type(exc).__name__}: {exc}); if it changed since the job started, rerun it") from exc
        return str(path)
    if source["build"]:
        path = _build_here(source)
    elif os.path.isdir(driver_path) or not os.path.isabs(driver_path):
        return driver_path  # a shared folder, or a hub id this node's vLLM downloads itself
    else:
        raise JobFailure(
            f"model.path: the folder {driver_path} is not on node {socket.gethostname()}; mount it on every "
            "node at the same path, or put the model on an object store (model.path=s3://...)")
    if _files(path) != files:
        raise JobFailure(
            f"model.path: the {source['build']} model built on node {socket.gethostname()} ({path}) differs from "
            f"the driver's ({driver_path}); check that the nodes have the same torch and tokenizers versions")
    return str(path)


def _build_here(source: dict) -> Path:
    """The tiny model on this node: the driver's folder when this node sees it (a shared or the
    same filesystem) and has no copy of its own, else built in this node's cache under the
    driver's folder name."""
    from pipeline.generate.config import ensure_model

    here = cache_root() / "models" / Path(source["driver_path"]).name
    if not here.is_dir() and os.path.isdir(source["driver_path"]):
        return Path(source["driver_path"])
    return Path(ensure_model(ModelSettings(path=str(here), build=source["build"], seed=source["seed"])))


def _files(folder) -> dict:
    return model_identity(str(folder))["files"]


def prepare_block_on_node(block, model_source: dict, log_lines: bool = False, **kwargs):
    """`tasks.prepare_block` with the model's path on the node the task runs on; `log_lines`: in
    the job's Ray worker, whose own lines (the model copied to this node) go to the job's log."""
    from pipeline.console import worker_log_lines
    from pipeline.generate.tasks import prepare_block

    if log_lines:
        worker_log_lines()

    return prepare_block(block, **{**kwargs, "model_path": node_model_path(model_source)})
