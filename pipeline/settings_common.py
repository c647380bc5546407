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
