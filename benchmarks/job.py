"""Contender: the generation job on the composed `conf/generate.yaml`.

Everything a user's run does: it reads the Parquet file, prepares rows in Ray tasks, generates in
an engine actor and commits Parquet parts and the manifest. By default the job runs as a user runs
it, `python -m jobs.generate` in a process of its own that starts and stops its own Ray, timed from
the process's start to its exit, as bare vLLM's script is; its first row is when its log says the
first rows were committed. With `--job-in-ray` it runs in the benchmark's process and Ray (a
job sent to a running Ray cluster, no Ray start or stop on its clock), watched through the job's
`on_batch` seam.
"""

from __future__ import annotations

import datetime
import json
import re
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.job_config import ROOT, compose, job_overrides
from benchmarks.memory import TreeMemory, memory_figures
from benchmarks.results import RunResult

# The job's settings that shape its throughput, as its manifest records them.
SETTINGS = ("workers", "batch_size")
ENGINE_SETTINGS = ("max_num_seqs", "max_num_batched_tokens")
RESOURCES = ("kv_cache_gib", "num_cpus")


# The job's log line when its first rows are committed (pipeline.generate.job._run).
FIRST_ROWS = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\]\[pipeline\.generate\.job\]\[INFO\] - "
                        r"first rows committed")


def run_job(args, model_path: str, input_path: str, workdir: Path, mem: TreeMemory, label: str, extra=()) -> RunResult:
    """The job on the rows at `input_path` with the benchmark's overrides (and `extra`), into a
    new output folder under `workdir`; `label` names the run. Fails if any row failed."""
    # Hydra's override grammar refuses brackets and other punctuation in values.
    output = workdir / f"out-{re.sub(r'[^A-Za-z0-9_]+', '-', label)}-{time.time_ns()}"
    overrides = job_overrides(args, model_path, input_path, str(output), extra)
    if getattr(args, "job_in_ray", False):
        return _run_in_ray(overrides, output, mem, label)
    return _run_process(args, overrides, output, mem, label)


def _run_process(args, overrides: list[str], output: Path, mem: TreeMemory, label: str) -> RunResult:
    """`python -m jobs.generate` as a process of its own, with its own Ray started and shut down."""
    overrides = [o for o in overrides if o != "ray.shutdown=false"] + [f"ray.num_cpus={args.ray_cpus}"]
    mem.settle()
    with mem.window(label) as w:
        spawned = time.time()
        proc = subprocess.run([sys.executable, "-m", "jobs.generate", *overrides], cwd=ROOT, capture_output=True,
                              text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{label}: the job failed:\n{proc.stderr[-3000:]}")
    manifest = json.loads((output / "manifest.json").read_text())
    first = first_rows_logged(output / "logs" / "generate.log")
    return _result(label, output, manifest, wall=w["wall"], first_row=None if first is None else first - spawned,
                   memory=memory_figures(w), batches=None)


def first_rows_logged(log_file: Path) -> float | None:
    """When (seconds since the epoch) the job's log says its first rows were committed."""
    if not log_file.is_file():
        return None
    for line in log_file.read_text(errors="replace").splitlines():
        m = FIRST_ROWS.match(line)
        if m:  # the log's times are the machine's local time, as a naive datetime takes them
            return datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
    return None


def _run_in_ray(overrides: list[str], output: Path, mem: TreeMemory, label: str) -> RunResult:
    """`pipeline.generate.job.run` in this process, in the Ray the benchmark started."""
    from pipeline.generate.job import run

    cfg = compose("generate", overrides)
    batches: list[int] = []  # rows per batch committed
    first: list[float] = []  # when the first batch reached the driver's commit

    def on_batch(table) -> None:
        if not first:
            first.append(time.perf_counter())
        # rows: a batch of output rows (output.commit=driver), or a worker-committed part's ledger entry
        batches.append(table["rows"] if isinstance(table, dict) else table.num_rows)

    mem.settle()
    with mem.window(label) as w:
        started = time.perf_counter()
        manifest = run(cfg, on_batch=on_batch)
        wall = time.perf_counter() - started
    # From calling the job (settings, planning, engine start included) to its first batch of
    # output rows handed to the commit: what a user waits for the first committed row.
    return _result(label, output, manifest, wall=wall, first_row=first[0] - started if first else None,
                   memory=memory_figures(w), batches=len(batches))


def _result(label: str, output: Path, manifest: dict, *, wall: float, first_row: float | None, memory,
            batches: int | None) -> RunResult:
    """The run's figures from its manifest, with its texts read back from its parts; fails if any
    row failed."""
    import pyarrow.parquet as pq

    table = pq.read_table(output / "parts", columns=["id", "response", "error"])
    errors = table.column("error").null_count
    if errors != table.num_rows:
        first = next(e for e in table.column("error").to_pylist() if e)
        raise RuntimeError(f"{label}: {table.num_rows - errors} rows failed, e.g. {first}")
    recorded = manifest["settings"]
    return RunResult(
        name=label, rows=manifest["counts"]["rows_out"], output_tokens=manifest["tokens"]["completion"],
        prompt_tokens=manifest["tokens"]["prompt"], wall_s=wall, time_to_first_row_s=first_row,
        cached_tokens=(manifest.get("prefix_cache") or {}).get("cached_tokens"),
        running_output_tokens_per_s=running_rate(manifest),
        memory=memory, output_batches=batches,
        settings={k: recorded[k] for k in SETTINGS} | {k: recorded["engine"].get(k) for k in ENGINE_SETTINGS}
        | {k: manifest["resources"][k] for k in RESOURCES},
        texts=dict(zip(table.column("id").to_pylist(), table.column("response").to_pylist())),
    )


def running_rate(manifest: dict) -> float | None:
    """Output tokens/s between the job's first and last committed batch, from its manifest's
    timeline of (seconds, rows, completion tokens) after each batch; None with fewer than two."""
    points = (manifest.get("timeline") or {}).get("points") or []
    if len(points) < 2 or points[-1][0] <= points[0][0]:
        return None
    return (points[-1][2] - points[0][2]) / (points[-1][0] - points[0][0])
