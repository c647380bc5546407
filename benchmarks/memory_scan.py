"""`--memory-scan`: the job's peak memory as the number of rows grows, and bare vLLM's on the same rows.

The job: `python -m jobs.generate` at each row count, each in its own process with its own Ray
instance (as a user runs it), so that no run inherits another's workers or object store. Bare
vLLM: a script of its own (`benchmarks.bare_vllm`) with the job's engine arguments on the job's
prepared rows, fed `generate()` calls of as many rows as the job keeps in flight in an engine
(`batch_size` x `batches_in_flight`) and keeping nothing of a row after its call: what memory the
engine itself gathers over the rows, measured the same way. Short prompts and few output tokens:
the scan is about rows passing through, not compute. Each run's figures include every kind of
process's own peak (the job's driver, its engine actor, Ray's daemons), so growth is placed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from benchmarks.job_config import ROOT, job_overrides, job_setup
from benchmarks.memory import TreeMemory, memory_figures
from benchmarks.report import log
from benchmarks.results import RunResult, ratio
from benchmarks.workload import make_requests, prepared_table, write_requests

PROMPT_SCALE = 0.25
SCAN_CONTENDERS = ("job", "bare")


def memory_scan(args, model_path: str, workdir: Path, mem: TreeMemory, time_left) -> dict:
    counts = [int(x) for x in args.scan_rows.split(",")]
    runs: dict[str, list[RunResult]] = {c: [] for c in args.scan_contenders}
    for k, n in enumerate(counts):
        if not time_left(f"memory scan at {n} rows"):
            continue
        path = write_requests(workdir / f"scan-{n}.parquet",
                              make_requests(n, args.scan_max_tokens, args.seed, scale=PROMPT_SCALE))
        if "job" in runs:
            runs["job"].append(scan_job(args, model_path, path, workdir / f"scan-out-{k}-{n}", n, mem))
        if "bare" in runs:
            runs["bare"].append(scan_bare(args, model_path, path, workdir, n, mem))
    out: dict = {"runs": [r.to_dict() for c in runs.values() for r in c]}
    for contender, mine in runs.items():
        if len(mine) >= 2:
            first, last = mine[0].memory, mine[-1].memory
            key = "" if contender == "job" else f"{contender}_"
            out[f"{key}peak_rss_last_over_first"] = ratio(last.peak_rss_gib, first.peak_rss_gib)
            out[f"{key}peak_pss_last_over_first"] = ratio(last.peak_pss_gib, first.peak_pss_gib)
            for figure in ("rss", "pss"):
                a, b = getattr(first, f"peak_{figure}_by_kind_gib"), getattr(last, f"peak_{figure}_by_kind_gib")
                out[f"{key}{figure}_rise_by_kind_gib"] = {kind: round(b.get(kind, 0) - a.get(kind, 0), 3)
                                                          for kind in {**a, **b}}
    return out


def scan_job(args, model_path: str, path: str, output: Path, n: int, mem: TreeMemory) -> RunResult:
    # The job's own Ray, shut down when it ends, as a user's run has.
    overrides = [o for o in job_overrides(args, model_path, path, str(output)) if o != "ray.shutdown=false"]
    log(f"memory scan: python -m jobs.generate on {n} rows, {args.scan_max_tokens} output tokens each ...")
    mem.settle()
    with mem.window(f"job {n} rows") as w:
        proc = subprocess.run([sys.executable, "-m", "jobs.generate", *overrides, f"ray.num_cpus={args.ray_cpus}"],
                              cwd=ROOT, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"the job on {n} rows failed:\n{proc.stderr[-3000:]}")
    manifest = json.loads((output / "manifest.json").read_text())
    if manifest["counts"]["rows_out"] != n or manifest["counts"]["errors"]:
        raise RuntimeError(f"the job on {n} rows wrote {manifest['counts']}")
    r = RunResult(name=f"job, {n} rows", rows=manifest["counts"]["rows_out"], phase="job",
                  output_tokens=manifest["tokens"]["completion"], wall_s=w["wall"],
                  time_to_first_row_s=manifest["throughput"]["time_to_first_row_s"], memory=memory_figures(w))
    logged(r)
    return r


def scan_bare(args, model_path: str, path: str, workdir: Path, n: int, mem: TreeMemory) -> RunResult:
    from benchmarks import bare_vllm
    from pipeline.generate.resources import resolve_resources

    setup = job_setup(args, model_path, path)
    resources = resolve_resources(setup.settings, float(setup.settings.workers) if args.device == "gpu" else 0)
    in_flight = setup.settings.batch_size * resources.batches_in_flight
    prepared = prepared_table(path, setup.settings, model_path)
    log(f"memory scan: bare vLLM on {n} rows, generate() on {in_flight} at a time ...")
    r = bare_vllm.run_bare(prepared, setup.engine_kwargs(), mem, workdir, chunk=in_flight, keep_texts=False)
    if r.rows != n:
        raise RuntimeError(f"bare vLLM answered {r.rows} of {n} rows")
    r.name, r.phase = f"bare vLLM, {n} rows", "bare"
    logged(r)
    return r


def logged(r: RunResult) -> None:
    kinds = ", ".join(f"{k} {v:.2f}" for k, v in list(r.memory.peak_rss_by_kind_gib.items())[:5])
    log(f"  {r.name}: peak RSS {r.memory.peak_rss_gib:.2f} GiB, PSS {r.memory.peak_pss_gib:.2f} GiB, "
        f"wall {r.wall_s:.1f}s; by process: {kinds}")
