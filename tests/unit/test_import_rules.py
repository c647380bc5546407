"""Who may import whom (docs/architecture.md): the heavy frameworks each stay in the few modules
whose job they are, so the pure core (schema, rendering, planning, settings) loads and tests in
milliseconds, and a reader knows where to look for each framework's use."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PIPELINE = Path(__file__).resolve().parents[2] / "pipeline"

# framework -> the modules (paths relative to pipeline/) allowed to import it, at any depth.
ALLOWED = {
    "vllm": {"generate/engine.py", "models/vllm_plugin.py"},
    "ray": {"generate/job.py", "train/job.py", "train/ray_train.py"},
    # The engine runs vLLM, itself torch: it sizes torch's thread pool before the engine starts.
    "torch": {"generate/engine.py"},
    "peft": set(),
    "transformers": set(),
}
# Folders whose modules may use torch, PEFT and transformers: training and model building.
TORCH_FOLDERS = ("train/", "models/")
# Modules of the shared core, which import nothing from the jobs' subpackages.
JOB_PACKAGES = ("pipeline.generate", "pipeline.train", "pipeline.models")
# The entry points sit above the jobs: they start them (each job's `run`, imported when called).
ENTRY_POINTS = {"cli.py"}


def imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


MODULES = sorted(str(p.relative_to(PIPELINE)) for p in PIPELINE.rglob("*.py"))


@pytest.mark.parametrize("module", MODULES)
def test_frameworks_are_imported_only_where_they_belong(module):
    found = imports(PIPELINE / module)
    for framework, allowed in ALLOWED.items():
        uses = {n for n in found if n == framework or n.startswith(framework + ".")}
        if not uses:
            continue
        ok = module in allowed or (framework in ("torch", "peft", "transformers") and module.startswith(TORCH_FOLDERS))
        assert ok, f"pipeline/{module} imports {sorted(uses)}; only {sorted(allowed) or TORCH_FOLDERS} may"


@pytest.mark.parametrize("module", [m for m in MODULES if "/" not in m and m not in ENTRY_POINTS])
def test_the_shared_core_does_not_depend_on_the_jobs(module):
    found = imports(PIPELINE / module)
    assert not {n for n in found if n.startswith(JOB_PACKAGES)}, f"pipeline/{module} imports a job subpackage"


def test_the_jobs_do_not_depend_on_each_other():
    for module in MODULES:
        found = imports(PIPELINE / module)
        if module.startswith("generate/"):
            assert not {n for n in found if n.startswith("pipeline.train")}, module
        if module.startswith("train/"):
            assert not {n for n in found if n.startswith("pipeline.generate")}, module
