"""Contender: the generation job, `pipeline.generate.job.run` on the composed `conf/generate.yaml`.

Everything a user's run does: it reads the Parquet file, prepares rows in Ray tasks, generates in
an engine actor and commits Parquet parts and the manifest. The benchmark only watches, through
the job's `on_batch` seam: how many batches of output rows reach the driver for commit.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

from benchmarks.job_config import compose, job_overrides
from benchmarks.memory import TreeMemory, memory_figures
from benchmarks.results import RunResult

# The job's settings that shape its throughput, as its manifest records them.
SETTINGS = ("workers", "batch_size")
ENGINE_SETTINGS = ("max_num_seqs", "max_num_batched_tokens")
RESOURCES = ("kv_cache_gib", "num_cpus")


def run_job(args, model_path: str, input_path: str, workdir: Path, mem: TreeMemory, label: str, extra=()) -> RunResult:
    """The job on the rows at `input_path` with the benchmark's overrides (and `extra`), into a
    new output folder under `workdir`; `label` names the run. Fails if any row failed."""
    import pyarrow.parquet as pq

    from pipeline.generate.job import run

    # Hydra's override grammar refuses brackets and other punctuation in values.
    output = workdir / f"out-{re.sub(r'[^A-Za-z0-9_]+', '-', label)}-{time.time_ns()}"
    cfg = compose("generate", job_overrides(args, model_path, input_path, str(output), extra))
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
    table = pq.read_table(output / "parts", columns=["id", "response", "error"])
    errors = table.column("error").null_count
    if errors != table.num_rows:
        first = next(e for e in table.column("error").to_pylist() if e)
        raise RuntimeError(f"{label}: {table.num_rows - errors} rows failed, e.g. {first}")
    recorded = manifest["settings"]
    return RunResult(
        name=label, rows=manifest["counts"]["rows_out"], output_tokens=manifest["tokens"]["completion"],
        prompt_tokens=manifest["tokens"]["prompt"], wall_s=wall,
        cached_tokens=(manifest.get("prefix_cache") or {}).get("cached_tokens"),
        # From calling the job (settings, planning, engine start included) to its first batch of
        # output rows handed to the commit: what a user waits for the first committed row.
        time_to_first_row_s=first[0] - started if first else None,
        memory=memory_figures(w), output_batches=len(batches),
        settings={k: recorded[k] for k in SETTINGS} | {k: recorded["engine"].get(k) for k in ENGINE_SETTINGS}
        | {k: manifest["resources"][k] for k in RESOURCES},
        texts=dict(zip(table.column("id").to_pylist(), table.column("response").to_pylist())),
    )
