"""Who may import whom (docs/architecture.md): the heavy frameworks each stay in the few modules
whose job they are, so the pure core (schema, rendering, planning, settings) loads and tests in
milliseconds, and a reader knows where to look for each framework's use."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PIPELINE = ROOT / "pipeline"
BENCHMARKS = ROOT / "benchmarks"

# framework -> the modules (paths relative to pipeline/) allowed to import it, at any depth.
ALLOWED = {
    "vllm": {"generate/engine.py", "models/vllm_plugin.py", "serve/engine.py"},
    # serve/replicas.py: the endpoint's Ray Serve deployment.
    # generate/datasource.py: the job's read stage, a Ray Data datasource.
    "ray": {"generate/job.py", "generate/ray_session.py", "generate/datasource.py", "train/job.py",
            "train/ray_train.py", "serve/replicas.py"},
    # The engine runs vLLM, itself torch: it sizes torch's thread pool before the engine starts.
    "torch": {"generate/engine.py"},
    "peft": set(),
    "transformers": set(),
}
# Folders whose modules may use torch, PEFT and transformers: training and model building.
TORCH_FOLDERS = ("train/", "models/")
# The benchmark's contenders: each framework only in the modules that run it (paths relative to
# benchmarks/); the workload, results, report and comparisons import none of them.
BENCHMARK_ALLOWED = {
    "vllm": {"bare_vllm.py", "lora.py"},
    # the one Ray instance every contender shares; Ray Data LLM; the driver's stand-in pipeline
    "ray": {"cli.py", "ray_data_llm.py", "driver_scale.py"},
    "torch": {"bare_vllm.py", "lora.py", "plain_peft.py"},
    "peft": {"lora.py", "plain_peft.py"},
    "transformers": {"lora.py", "plain_peft.py"},
}
# Modules of the shared core, which import nothing from the jobs' subpackages.
JOB_PACKAGES = ("pipeline.generate", "pipeline.train", "pipeline.models", "pipeline.serve")
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
BENCHMARK_MODULES = sorted(str(p.relative_to(BENCHMARKS)) for p in BENCHMARKS.rglob("*.py"))


def may_import(path: str, framework: str) -> bool:
    """Whether the module at `path` (pipeline/... or benchmarks/...) may import `framework`."""
    top, module = path.split("/", 1)
    if top == "benchmarks":
        return module in BENCHMARK_ALLOWED[framework]
    return module in ALLOWED[framework] or (framework in ("torch", "peft", "transformers")
                                            and module.startswith(TORCH_FOLDERS))


@pytest.mark.parametrize("path", [f"pipeline/{m}" for m in MODULES] + [f"benchmarks/{m}" for m in BENCHMARK_MODULES])
def test_frameworks_are_imported_only_where_they_belong(path):
    found = imports(ROOT / path)
    for framework in ALLOWED:
        uses = {n for n in found if n == framework or n.startswith(framework + ".")}
        assert not uses or may_import(path, framework), \
            f"{path} imports {sorted(uses)}; see 'Who may import whom' in docs/architecture.md"


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
            assert not {n for n in found if n.startswith(("pipeline.generate", "pipeline.serve"))}, module
        if module.startswith("generate/"):
            assert not {n for n in found if n.startswith("pipeline.serve")}, module
        if module.startswith("serve/"):  # the endpoint reuses generation's request path, never training
            assert not {n for n in found if n.startswith("pipeline.train")}, module


@pytest.mark.parametrize("module", BENCHMARK_MODULES)
def test_the_benchmark_drives_pipeline_through_public_names_and_patches_nothing(module):
    tree = ast.parse((BENCHMARKS / module).read_text())
    from_pipeline = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipeline"):
            private = [a.name for a in node.names if a.name.startswith("_")]
            assert not private, f"benchmarks/{module} imports {private} from {node.module}"
            from_pipeline.update(a.asname or a.name for a in node.names)
        elif isinstance(node, ast.Import):
            assert not [a.name for a in node.names if a.name.startswith("pipeline")], \
                f"benchmarks/{module}: import names from pipeline modules, so that this test can see them"
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in from_pipeline:
            assert not node.attr.startswith("_"), f"benchmarks/{module} uses {node.value.id}.{node.attr}"
            assert not isinstance(node.ctx, ast.Store), f"benchmarks/{module} assigns {node.value.id}.{node.attr}"
