"""The driver's limits, with no engine (`--driver-scale`): every row of a job passes through its one
driver process, so how many files it can plan and how many rows a second it can commit bound the
job whatever the engines do.

planning   `pipeline.generate.planning.plan_shards` over `--scale-files` small Parquet files
           holding `--scale-rows` rows in all (small row groups, metadata-sized), without and with
           an `id_column`: time and the driver's memory (the process tree's peak RSS over its start).
commit     the driver's commit path on `--commit-rows` rows of short answers (about 20 tokens of
           text, as labelling answers are), with no engine: first the job's own sink and counts
           (`OutputDir.add`, `RunStats.add`, `OutputDir.finish` with its exactly-once check) fed in
           this process (at each of `--commit-rows-per-part`), then behind Ray Data, in both of
           the job's commit modes (`output.commit`): `driver`, a stand-in stage returning canned
           answers in the job's output schema that the driver takes with `iter_batches` and
           commits; `workers`, the same stand-in committing each batch as a part itself with the
           job's worker committer (`OutputDir.committer()`) and returning its ledger entry, which
           the driver records (`OutputDir.record`, `RunStats.add_counts`), as the job does.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from benchmarks.memory import TreeMemory, memory_figures
from benchmarks.report import log

ANSWER = "positive"  # a short label answer; the response text is what varies per row in a real job
BATCH_ROWS = 64  # the job's default batch_size: the unit that reaches the driver
GPU_BATCH_ROWS = 256  # conf/hardware/h100.yaml's batch_size
DRIVER = "driver (this process)"  # benchmarks.memory's name for the benchmark's own process


def write_inputs(folder: Path, files: int, rows: int) -> float:
    """`files` Parquet files with `rows` rows in all, each an `id` (`r<row>`) and a short `prompt`,
    in row groups of a tenth of a file; the seconds it took. Vectorised (the ids are made by Arrow
    from a range of numbers, one prompt column serves every file) and written a few files at a
    time, so that 100 M rows take minutes, not the hour that making them in Python would."""
    import concurrent.futures

    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    per_file = max(1, rows // files)
    prompts = pa.array(["Label: a short text."] * per_file)

    def write(f: int) -> None:
        numbers = pa.array(np.arange(f * per_file, (f + 1) * per_file)).cast(pa.string())
        table = pa.table({"id": pc.binary_join_element_wise("r", numbers, ""), "prompt": prompts})
        pq.write_table(table, folder / f"part-{f:06d}.parquet", row_group_size=max(1, per_file // 10))

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        for _ in pool.map(write, range(files)):
            pass
    return time.perf_counter() - started


class FolderPeak:
    """The largest a folder's files grew to while it was watched (sampled every `interval` s):
    the duplicate-id check's spill files, which live only while planning runs."""

    def __init__(self, folder: Path, interval: float = 0.5):
        import threading

        self.folder, self.interval, self.peak = folder, interval, 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="folder-peak", daemon=True)

    def size(self) -> int:
        total = 0
        for root, _, names in os.walk(self.folder):
            for name in names:
                try:
                    total += os.stat(os.path.join(root, name)).st_size
                except OSError:  # removed between listing and reading
                    pass
        return total

    def _loop(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, self.size())
            self.stop.wait(self.interval)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=10)


def planning(args, workdir: Path, mem: TreeMemory) -> dict:
    """Plans the files without and with `id_column=id`; the inputs are removed afterwards (100 M
    rows are a few GB). The id check's spill files go to a folder of the workdir, watched for
    their largest size."""
    import shutil
    import tempfile

    from pipeline.generate.planning import plan_shards

    folder = workdir / "scale-inputs"
    log(f"driver scale: writing {args.scale_files:,} files, {args.scale_rows:,} rows -> {folder}")
    written = write_inputs(folder, args.scale_files, args.scale_rows)
    log(f"  written in {written:.1f}s")
    spill = workdir / "spill"
    spill.mkdir(exist_ok=True)
    runs = []
    try:
        for id_column in (None, "id"):
            label = f"plan, id_column={id_column}"
            mem.settle()
            tempfile.tempdir = str(spill)  # where the id check's TemporaryDirectory goes
            try:
                with FolderPeak(spill) as watched, mem.window(label) as w:
                    started = time.perf_counter()
                    plan = plan_shards(str(folder), id_column=id_column)
                    seconds = time.perf_counter() - started
            finally:
                tempfile.tempdir = None
            figures = memory_figures(w)
            driver_cpu = figures.cpu_s.get(DRIVER, 0.0)
            runs.append({"name": label, "files": len(plan.files), "rows": plan.total_rows, "shards": len(plan.shards),
                         "seconds": round(seconds, 2), "files_per_s": round(len(plan.files) / seconds, 1),
                         "driver_cpu_s": round(driver_cpu, 1), "spill_peak_gib": round(watched.peak / 2**30, 3),
                         "peak_rss_gib": figures.peak_rss_gib, "rise_rss_gib": figures.rise_rss_gib,
                         "load_avg": round(os.getloadavg()[0], 1)})
            log(f"  {label}: {seconds:.1f}s for {len(plan.files):,} files ({plan.total_rows:,} rows), "
                f"driver CPU {driver_cpu:.1f}s, driver RSS rise {figures.rise_rss_gib:.2f} GiB, "
                f"spill folder peak {watched.peak / 2**30:.2f} GiB, load average {os.getloadavg()[0]:.1f}")
            del plan
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(spill, ignore_errors=True)
    return {"files": args.scale_files, "rows": args.scale_rows, "write_s": round(written, 1), "runs": runs}


def canned_answers(first_id: int, n: int):
    """`n` answered rows in the job's output schema, ids from `first_id`, as an engine returns them."""
    from pipeline.generate.prepare import OUTPUT_SCHEMA, output_table

    cols: dict[str, list] = {f.name: [None] * n for f in OUTPUT_SCHEMA}
    cols["id"] = [f"in.parquet#{i}" for i in range(first_id, first_id + n)]
    cols["response"] = [ANSWER] * n
    cols["tool_calls"] = [[] for _ in range(n)]
    cols["prompt_tokens"] = [1020] * n
    cols["completion_tokens"] = [2] * n
    cols["finish_reason"] = ["stop"] * n
    cols["seed"] = list(range(first_id, first_id + n))
    cols["sample"] = [0] * n
    cols["source_file"] = ["in.parquet"] * n
    cols["source_row"] = list(range(first_id, first_id + n))
    return output_table(cols, {})


def _stand_in(batch):
    """The stand-in engine stage: canned answers for the rows of a `range` block."""
    ids = batch.column("id").to_pylist()
    return canned_answers(ids[0], len(ids))


class _StandInEngine:
    """The stand-in engine stage, an actor as the job's engines are: canned answers for each batch,
    returned (`output.commit=driver`) or, given the job's worker committer, committed here as a
    part and only its ledger entry returned (`workers`), as the job's engine workers do."""

    def __init__(self, committer=None):
        self.committer = committer

    def __call__(self, batch):
        from pipeline.generate.worker_commit import ledger_table

        answers = _stand_in(batch)
        if self.committer is None:
            return answers
        return ledger_table([self.committer.commit(answers, node="stand-in")])


def commit(args, workdir: Path, mem: TreeMemory) -> dict:
    import ray

    from pipeline.generate.sinks import OutputDir
    from pipeline.generate.stats import RunStats
    from pipeline.generate.worker_commit import LEDGER_COLUMN, batches_per_task, read_ledger

    n = args.commit_rows
    runs, made = [], None
    # output.rows_per_part: the job's default, then larger parts (fewer files to write and sync)
    sizes = [int(x) for x in str(args.commit_rows_per_part).split(",")]
    # (--commit-modes key, run, output.rows_per_part, batch_size): a worker-committed part is one
    # batch; batches of the job's default size, then of conf/hardware/h100.yaml's
    modes = [("sink", "sink only", size, BATCH_ROWS) for size in sizes] + [
        ("driver", "through Ray Data, driver commits", sizes[0], BATCH_ROWS),
        ("workers", "through Ray Data, worker commits", BATCH_ROWS, BATCH_ROWS),
        ("workers", "through Ray Data, worker commits", GPU_BATCH_ROWS, GPU_BATCH_ROWS)]
    wanted = set(str(getattr(args, "commit_modes", "sink,driver,workers")).split(","))
    modes = [m[1:] for m in modes if m[0] in wanted]
    for mode, rows_per_part, batch_rows in modes:
        out = OutputDir(str(workdir / f"commit-{re.sub(r'[^a-z]+', '-', mode)}-{rows_per_part}"),
                        rows_per_part=rows_per_part)
        out.open({"config": {"benchmark": "driver scale"}})
        stats = RunStats(total_rows=n)
        if mode == "sink only":  # made before the clock starts: the stand-in's work is not the driver's
            made = [canned_answers(i, min(batch_rows, n - i)) for i in range(0, n, batch_rows)]
        mem.settle()
        with mem.window(f"commit, {mode}") as w:
            started = time.perf_counter()
            if mode == "sink only":
                batches = iter(made)
            else:
                # As the job's pipeline: read tasks of 4,096 rows, blocks of one batch each, then
                # the engine stage (here the stand-in, an actor pool as the engines are) and the
                # driver's commit or ledger.
                ds = ray.data.range(n, override_num_blocks=max(1, n // 4096))
                committer = out.committer() if "worker" in mode else None
                # the job's engine tasks: one batch each with driver commits, several with worker
                # commits (pipeline.generate.worker_commit.batches_per_task; 5 batches in flight)
                per_task = batches_per_task(n, batch_rows, 5, 1) if committer else 1
                ds = ds.repartition(target_num_rows_per_block=batch_rows * per_task)
                ds = ds.map_batches(_StandInEngine, fn_constructor_kwargs={"committer": committer},
                                    batch_size=batch_rows, batch_format="pyarrow",
                                    compute=ray.data.ActorPoolStrategy(size=1))
                batches = ds.iter_batches(batch_format="pyarrow", batch_size=None)
            for batch in batches:
                if LEDGER_COLUMN in batch.column_names:
                    for entry in read_ledger(batch):
                        if out.record(entry):
                            stats.add_counts(entry["counts"], node=entry["node"])
                else:
                    out.add(batch)
                    stats.add(batch)
            out.finish({"status": "complete"}, expected_rows={"in.parquet": n})
            seconds = time.perf_counter() - started
        made = None
        figures = memory_figures(w)
        driver_cpu = figures.cpu_s.get(DRIVER, 0.0)
        assert stats.rows == n, f"{mode}: {stats.rows} rows counted of {n}"
        runs.append({"name": f"commit, {mode}", "rows_per_part": rows_per_part, "batch_rows": batch_rows, "rows": n, "seconds": round(seconds, 2),
                     "rows_per_s": round(n / seconds), "parts": len(out.parts),
                     "peak_rss_gib": figures.peak_rss_gib, "rise_rss_gib": figures.rise_rss_gib,
                     "cpu_s": figures.cpu_s, "driver_cpu_us_per_row": round(driver_cpu / n * 1e6, 1),
                     "load_avg": round(os.getloadavg()[0], 1)})
        log(f"  commit, {mode}, {rows_per_part} rows per part: {n / seconds:,.0f} rows/s ({n:,} rows in {seconds:.1f}s), "
            f"driver CPU {driver_cpu:.1f}s, load average {os.getloadavg()[0]:.1f}")
    return {"rows": n, "batch_rows": BATCH_ROWS, "answer": ANSWER, "runs": runs}


def driver_scale(args, workdir: Path, mem: TreeMemory) -> dict:
    """Planning and committing at scale on this machine (`--scale-files 0`: committing only;
    `--commit-modes ''`: planning only); the results' `driver_scale`."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return {"planning": planning(args, workdir, mem) if args.scale_files else None,
            "commit": commit(args, workdir, mem) if args.commit_modes.strip() else None}
