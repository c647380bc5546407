"""The jobs' entry points, and what every one of them does with the errors a job stops with.

Each job runs two ways, on the same configs:
- in a checkout: `python -m jobs.generate ...` (`jobs/*.py`, configs read from `conf/`);
- installed: the console scripts `llama-batch-generate`, `llama-batch-train` and `llama-batch-serve`, anywhere, with the
  configs shipped inside the package (`pipeline.conf`, built from the same `conf/` folder).
`llama-batch-adapters` (or `python -m pipeline.lora_registry`) lists an adapter registry;
`llama-batch-export` (or `python -m jobs.export_lora`) writes an adapter out for deployment.
Both end in the same plain `run(cfg)` of the job's package, wrapped by `exit_on_user_error`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from typing import Any, Callable

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


def run_serve(cfg) -> None:
    """The endpoint on a composed config (conf/serve.yaml)."""
    from pipeline.serve.server import run

    with exit_on_user_error():
        run(cfg)


def compose(config_name: str, overrides=(), config_dir: str | None = None):
    """A job's Hydra config `config_name` with `overrides` (key=value strings), as its entry point
    composes it, for Python callers (tests, the benchmark, notebooks): from `config_dir`, or the
    configs shipped with the package."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir, initialize_config_module

    init = (initialize_config_dir(config_dir=str(config_dir), version_base="1.3") if config_dir is not None
            else initialize_config_module(config_module="pipeline.conf", version_base="1.3"))
    with init:
        return hydra_compose(config_name=config_name, overrides=list(overrides))


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


def serve() -> None:
    """Console script `llama-batch-serve`: the endpoint."""
    hydra_entry(run_serve, "serve")()


def _fmt_loss(x: Any) -> str:
    return "-" if x is None else f"{x:.4f}"


def format_table(adapters: list) -> str:
    """The registry as a table: one line per adapter (`pipeline.lora_registry.Adapter`)."""
    header = ("name", "base_model", "rank", "steps", "train_loss", "val_loss", "lora_int_id")
    rows = [
        (
            a.name,
            str(a.base_model or "-"),
            str(a.rank if a.rank is not None else "-"),
            str(a.steps if a.steps is not None else "-"),
            _fmt_loss(a.train_loss),
            _fmt_loss(a.validation_loss),
            str(a.lora_int_id),
        )
        for a in adapters
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows]]
    return "\n".join(lines)


def adapters(argv: list[str] | None = None) -> int:
    """Console script `llama-batch-adapters`: the adapters of a registry, as a table or JSON."""
    from pipeline.lora_registry import AdapterRegistry

    parser = argparse.ArgumentParser(
        prog="llama-batch-adapters", description="List the LoRA adapters in a registry."
    )
    parser.add_argument("--root", default="lora", help="registry folder or URI, e.g. s3://bucket/lora (default: lora)")
    parser.add_argument("--json", action="store_true", help="print the manifests as JSON")
    args = parser.parse_args(argv)
    found = AdapterRegistry(args.root).list()
    if args.json:
        print(json.dumps({a.name: a.manifest for a in found}, indent=2))
    elif not found:
        print(f"no adapters in {args.root}/")
    else:
        print(format_table(found))
    return 0


def export_lora(argv: list[str] | None = None) -> int:
    """Console script `llama-batch-export` (and `python -m jobs.export_lora`): an adapter of the
    registry written out as Workers AI, a merged model, or plain PEFT files expect it."""
    from pipeline.train.export import TARGETS, export_adapter

    parser = argparse.ArgumentParser(
        prog="llama-batch-export", description="Export a LoRA adapter from the registry for deployment."
    )
    parser.add_argument("name", help="the adapter's name in the registry")
    parser.add_argument("out", metavar="OUT", help="the folder to create (new, or empty)")
    parser.add_argument("--to", required=True, choices=TARGETS,
                        help="workers-ai: the two files Cloudflare accepts, limits checked; merged: a float model "
                             "with the adapter merged in; peft: the PEFT files")
    parser.add_argument("--root", default="lora", help="registry folder (default: lora)")
    args = parser.parse_args(argv)
    with exit_on_user_error():
        out = export_adapter(args.root, args.name, args.to, args.out)
    print(f"adapter {args.name!r} -> {out} ({args.to}): {', '.join(sorted(p.name for p in out.iterdir()))}")
    return 0
