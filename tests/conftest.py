"""Fixtures shared by the whole test-suite."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def model_cache() -> Path:
    """Where built models are kept between runs: $PIPELINE_CACHE (relative: to the repository),
    else the repository's .cache/ (as conf/model/tiny.yaml has it)."""
    cache = Path(os.environ.get("PIPELINE_CACHE", ".cache"))
    return (cache if cache.is_absolute() else ROOT / cache) / "models"


def compose(config_name: str, overrides=()):
    """The project's real Hydra config `config_name` (this checkout's conf/), composed with `overrides`."""
    from pipeline.cli import compose as compose_config

    return compose_config(config_name, overrides, config_dir=ROOT / "conf")


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The project's tiny model (seed 0), built on first use and reused across runs."""
    from pipeline.models.tiny_model import ensure_tiny_model

    return ensure_tiny_model(model_cache() / "tiny-llama-3.1", seed=0)
