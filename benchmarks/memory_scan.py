"""`--memory-scan`: the job's peak memory as the number of rows grows.

`python -m jobs.generate` at each row count, each in its own process with its own Ray instance (as
a user runs it), so that no run inherits another's workers or object store. Short prompts and few
output tokens: the scan is about rows in flight, not compute. The driver streams rows in and parts
out, so the tree's peak should stay flat; what grows is the engine's caches, which level off.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from benchmarks.job_config import ROOT, job_overrides
from benchmarks.memory import TreeMemory, memory_figures
from benchmarks.report import log
from benchmarks.results import RunResult, ratio
from benchmarks.workload import make_requests, write_requests

PROMPT_SCALE = 0.25


def memory_scan(args, model_path: str, workdir: Path, mem: TreeMemory, time_left) -> dict:
    counts = [int(x) for x in args.scan_rows.split(",")]
    runs = []
    for k, n in enumerate(counts):
        if not time_left(f"memory scan at {n} rows"):
            continue
        path = write_requests(workdir / f"scan-{n}.parquet",
                              make_requests(n, args.scan_max_tokens, args.seed, scale=PROMPT_SCALE))
        output = workdir / f"scan-out-{k}-{n}"
        # The job's own Ray, shut down when it ends, as a user's run has.
        overrides = [o for o in job_overrides(args, model_path, path, str(output)) if o != "ray.shutdown=false"]
        log(f"memory scan: python -m jobs.generate on {n} rows, {args.scan_max_tokens} output tokens each ...")
        mem.settle()
        with mem.window(f"job {n} rows") as w:
            proc = subprocess.run([sys.executable, "-m", "jobs.generate", *overrides, f"ray.num_cpus={args.ray_cpus}"],
                                  cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"the job on {n} rows failed:\n{proc.stderr[-3000:]}")
        manifest = json.loads((output / "manifest.json").read_text())
        if manifest["counts"]["rows_out"] != n or manifest["counts"]["errors"]:
            raise RuntimeError(f"the job on {n} rows wrote {manifest['counts']}")
        r = RunResult(name=f"job, {n} rows", rows=manifest["counts"]["rows_out"],
                      output_tokens=manifest["tokens"]["completion"], wall_s=w["wall"],
                      time_to_first_row_s=manifest["throughput"]["time_to_first_row_s"], memory=memory_figures(w))
        log(f"  {n} rows: peak RSS {r.memory.peak_rss_gib:.2f} GiB, PSS {r.memory.peak_pss_gib:.2f} GiB, wall {r.wall_s:.1f}s")
        runs.append(r)
    out = {"runs": [r.to_dict() for r in runs]}
    if len(runs) >= 2:
        first, last = runs[0].memory, runs[-1].memory
        out["peak_rss_last_over_first"] = ratio(last.peak_rss_gib, first.peak_rss_gib)
        out["peak_pss_last_over_first"] = ratio(last.peak_pss_gib, first.peak_pss_gib)
    return out
