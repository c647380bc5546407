"""The jobs' entry points, and what every one of them does with the errors a job stops with.

Each job runs two ways, on the same configs:
- in a checkout: `python -m jobs.generate ...` (`jobs/*.py`, configs read from `conf/`);
- installed: the console scripts `llama-batch-generate` and `llama-batch-train`, anywhere, with the
  configs shipped inside the package (`pipeline.conf`, built from the same `conf/` folder).
Both end in the same plain `run(cfg)` of the job's package, wrapped by `exit_on_user_error`.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Callable

from pipeline.errors import JobFailure, UserError

# Where installed copies find their Hydra configs: the `conf/` folder, shipped as this package.
PACKAGED_CONFIGS = "pkg://pipeline.conf"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


@contextlib.contextmanager
def exit_on_user_error():
    """A bad config, input, output folder or adapter name is the user's to fix: say what, without
    a traceback (exit 2). A job that had to stop (an engine that cannot start) says why and that a
    rerun resumes (exit 1). Anything else is a bug, and keeps its traceback."""
    try:
        yield
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except JobFailure as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)


def run_generate(cfg) -> None:
    """The generation job on a composed config (conf/generate.yaml)."""
    from pipeline.generate.job import run

    with exit_on_user_error():
        run(cfg)


def run_train(cfg) -> None:
    """The LoRA training job on a composed config (conf/train_lora.yaml)."""
    from pipeline.train.job import run

    with exit_on_user_error():
        run(cfg)


def hydra_entry(job: Callable, config_name: str, config_path: str = PACKAGED_CONFIGS) -> Callable[[], None]:
    """A Hydra command-line entry point (key=value overrides, --help, --cfg job, -m) for `job`,
    reading `config_name` from `config_path`."""
    import hydra

    task = hydra.main(config_path=config_path, config_name=config_name, version_base="1.3")(job)

    def main() -> None:
        logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
        task()

    return main


def generate() -> None:
    """Console script `llama-batch-generate`: the generation job."""
    hydra_entry(run_generate, "generate")()


def train() -> None:
    """Console script `llama-batch-train`: the LoRA training job."""
    hydra_entry(run_train, "train_lora")()
