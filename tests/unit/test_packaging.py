"""What `pip install` ships: every package folder, the configs as `pipeline.conf`, and console
scripts that point at functions that exist. (tests/integration/test_installed.py runs them.)"""

from __future__ import annotations

import importlib
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SETUPTOOLS = PROJECT["tool"]["setuptools"]


def package_folder(name: str) -> Path:
    """The folder a listed package is built from: conf/ for pipeline.conf (package-dir), else its path."""
    parts = name.split(".")
    if parts[:2] == ["pipeline", "conf"]:
        return ROOT / SETUPTOOLS["package-dir"]["pipeline.conf"] / Path(*parts[2:])
    return ROOT / Path(*parts)


def test_every_folder_of_the_package_and_the_configs_is_listed():
    """A new subpackage or config group that is not listed would be left out of the wheel."""
    listed = set(SETUPTOOLS["packages"])
    on_disk = set()
    for top, folder in (("pipeline", ROOT / "pipeline"), ("pipeline.conf", ROOT / "conf")):
        for path in [folder, *folder.rglob("*")]:
            if path.is_dir() and path.name != "__pycache__" and any(p.is_file() for p in path.iterdir()):
                rel = path.relative_to(folder)
                on_disk.add(".".join([top, *rel.parts]))
    assert listed == on_disk


def test_every_data_file_is_covered_by_package_data():
    data = SETUPTOOLS["package-data"]
    for name in SETUPTOOLS["packages"]:
        folder = package_folder(name)
        files = {p.name for p in folder.iterdir() if p.is_file() and p.suffix != ".py"}
        shipped = {p.name for pattern in data.get(name, []) for p in folder.glob(pattern)}
        assert files <= shipped, f"{name}: {sorted(files - shipped)} would not be shipped"


def test_console_scripts_name_functions_that_exist():
    scripts = PROJECT["project"]["scripts"]
    assert {"llama-batch-generate", "llama-batch-train", "llama-batch-adapters", "llama-batch-export",
            "llama-batch-serve"} <= set(scripts)
    for target in scripts.values():
        module, _, attr = target.partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), target


def test_packaged_configs_are_the_checkout_configs():
    """Installed, Hydra reads pkg://pipeline.conf; in the checkout (editable install) that is conf/."""
    import pipeline.conf

    assert Path(pipeline.conf.__file__).resolve().parent == ROOT / "conf"


def test_compose_reads_the_packaged_configs_as_the_checkout_has_them():
    """`pipeline.cli.compose` for Python callers: the shipped configs by default, any folder if asked."""
    from omegaconf import OmegaConf

    from pipeline.cli import compose

    for name, overrides in (("generate", ["model=tiny", "recipe=label"]), ("train_lora", ["adapter.name=x"])):
        packaged = OmegaConf.to_container(compose(name, overrides))
        checkout = OmegaConf.to_container(compose(name, overrides, config_dir=ROOT / "conf"))
        assert packaged == checkout, name
