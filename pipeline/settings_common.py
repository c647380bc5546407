"""What both jobs' settings modules share: the model and its prompt (`ModelSettings`,
`PromptSettings`, from `pipeline.model_settings`) and the small steps of building frozen settings
from a composed Hydra config.

Pure module: standard library, and omegaconf when given a Hydra config.
"""

from __future__ import annotations

import dataclasses
import json
import os


def to_plain(cfg) -> dict:
    """A deep copy of `cfg` as plain dicts and lists (a Hydra DictConfig resolved)."""
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)  # a required ??? value is reported by the checks
    except ImportError:
        pass
    return json.loads(json.dumps(cfg))


def build(cls, data: dict):
    """`cls` from the keys of `data` it has fields for (the YAML may carry other keys)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


def looks_local(path: str) -> bool:
    """Whether `path` names a local file or folder rather than a hub id or dataset name."""
    return path.startswith((".", "/", "~")) or os.path.exists(path)


def absolute(path: str) -> str:
    """`path` made absolute (Ray workers run elsewhere); a URI (`s3://...`) is kept as it is."""
    if "://" in str(path):
        return str(path)
    return os.path.abspath(os.path.expanduser(str(path)))


def model_path_of(model: dict) -> tuple[str, str | None]:
    """`model.path` as the jobs run it, and the problem with it if any: a local folder is made
    absolute and must hold a model (`config.json`) unless the job builds it there; a hub id or
    a URI is kept as it is (checked where it is fetched)."""
    path = model["path"]
    if not (model.get("build") or looks_local(path)):
        return path, None
    path = absolute(path)
    if not model.get("build") and not os.path.isfile(os.path.join(path, "config.json")):
        return path, (f"model.path: '{path}' is not a model folder (no config.json); "
                      "give a local Hugging Face model folder or a hub id")
    return path, None
