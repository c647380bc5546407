"""The job's configuration for a benchmark run, and what the other contenders take from it.

Every contender is configured from the job's own settings (`conf/generate.yaml` with `model=tiny`,
`engine.ignore_eos=true` and the benchmark's engine sizes), so that bare vLLM and Ray Data LLM run
the engine the job's workers would run on this machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.generate.settings import GenerationSettings

ROOT = Path(__file__).resolve().parents[1]


def compose(config_name: str, overrides: list[str]):
    """The project's Hydra config `config_name` (this checkout's conf/) with `overrides`, as the
    job's entry point would compose it."""
    from pipeline.cli import compose as compose_config

    return compose_config(config_name, overrides, config_dir=ROOT / "conf")


def job_overrides(args, model_path: str, input_path: str, output: str, extra=()) -> list[str]:
    """The job's Hydra overrides for the benchmark's flags (`args`), then `--job-set`, then `extra`."""
    def value(x) -> str:
        return "null" if x is None else str(x)

    return [
        f"model={args.model}",
        f"model.path={model_path}",
        f"input={input_path}",
        f"output.path={output}",
        f"device={args.device}",
        "engine.ignore_eos=true",
        f"engine.kv_cache_gib={value(args.kv_cache_gib)}",
        f"engine.max_num_seqs={value(args.max_num_seqs)}",
        f"engine.max_num_batched_tokens={value(args.max_num_batched_tokens)}",
        # One Ray instance serves every contender; the job must leave it running.
        "ray.shutdown=false",
        "progress=false",
        *args.job_set,
        *extra,
    ]


@dataclass(frozen=True)
class JobSetup:
    """The job's settings on this machine, as its engine workers would receive them."""

    settings: GenerationSettings
    engine: dict
    """What each engine worker is handed (`pipeline.generate.config.engine_config`)."""
    model_path: str
    device: str = "cpu"

    def engine_kwargs(self, **engine) -> dict:
        """`vllm.LLM`'s arguments for the job's engine, with `engine` settings changed."""
        from pipeline.generate.engine import engine_kwargs

        return engine_kwargs({**self.engine, **engine}, self.model_path, on_cpu=self.device == "cpu")


def job_setup(args, model_path: str, input_path: str) -> JobSetup:
    """The job's settings for the rows at `input_path`, resolved as on this machine: no GPU, or
    (`--device gpu`) one GPU per engine."""
    from pipeline.generate.config import AdapterSet, engine_config
    from pipeline.generate.resources import resolve_resources
    from pipeline.generate.settings import GenerationSettings

    cfg = compose("generate", job_overrides(args, model_path, input_path, str(Path(input_path).parent / "unused")))
    settings = GenerationSettings.from_config(cfg)
    gpus = float(settings.workers) if args.device == "gpu" else 0
    resources = resolve_resources(settings, gpus)
    return JobSetup(settings, engine_config(settings, resources, AdapterSet()), model_path, resources.device)


def threads_asked(args, setup: JobSetup) -> int | None:
    """The engine's threads when `--job-set engine.cpu_threads=N` sets them, so that bare vLLM
    computes with as many as the job's engine (Ray Data LLM always gets the job's); None when the
    job resolves them itself, and bare vLLM leaves them to vLLM as a script would."""
    if any(o.lstrip("+").startswith("engine.cpu_threads=") for o in args.job_set):
        return setup.engine.get("cpu_threads")
    return None
