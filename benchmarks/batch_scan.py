"""`--batch-scan`: what the job's batch size alone costs its engine, without Ray and without
engine start-ups.

The job's engine UDF (`pipeline.generate.engine.GenerationWorker`) runs in this process, fed the
job's prepared rows in batches of each size, against `generate()` over every prompt on the same
engine. Variants run in turns on one engine, so machine noise hits them alike; the prefix cache is
emptied before each so every variant prefills in full. Two workloads: every row the same length,
and lengths spread as answers are (a batch lasts as long as its longest row).
"""

from __future__ import annotations

import gc
import random
import time
from pathlib import Path

from benchmarks.bare_vllm import SavedProcessState, token_prompts_and_params
from benchmarks.job_config import job_setup
from benchmarks.report import log
from benchmarks.results import median
from benchmarks.workload import make_requests, prepared_table, rotated, write_requests

ALL = "generate(all)"


def batched_name(size: int) -> str:
    return f"batch_size={size}"


def output_lengths(rows: int, max_tokens: int, seed: int) -> dict[str, list[int]]:
    """Each workload's `max_tokens` per row."""
    rng = random.Random(seed + 1)
    return {"fixed": [max_tokens] * rows,
            "spread": [rng.randint(max(1, max_tokens // 8), max_tokens * 2) for _ in range(rows)]}


def batch_scan(args, model_path: str, workdir: Path, mem, time_left) -> dict:
    from pipeline.generate.engine import GenerationWorker

    sizes = [int(x) for x in args.batch_scan.split(",")]
    setup = job_setup(args, model_path, str(workdir / "unused.parquet"))
    with SavedProcessState():
        worker = GenerationWorker(engine=setup.engine, model_path=model_path, adapters={}, passthrough=[])
    out = {"batch_sizes": sizes, "workloads": {}}
    for wl, lengths in output_lengths(args.rows, args.max_tokens, args.seed).items():
        rows = make_requests(args.rows, args.max_tokens, args.seed)
        for row, n in zip(rows, lengths):
            row["max_tokens"] = n
        folder = workdir / f"batch-scan-{wl}"
        folder.mkdir(parents=True, exist_ok=True)
        table = prepared_table(write_requests(folder / "requests.parquet", rows), setup.settings, model_path)
        runs = scan(worker, table, sizes, args.repeats, lambda rep: time_left(f"batch scan {wl} (repeat {rep + 1})"),
                    label=f"batch scan, {wl} lengths")
        out["workloads"][wl] = {
            "output_tokens": sum(lengths), "runs": runs,
            "over_generate_all": {batched_name(b): median([r[batched_name(b)] / r[ALL] for r in runs]) for b in sizes},
        }
    del worker  # the engine's memory, before anything else runs in this process
    gc.collect()
    return out


def scan(worker, table, sizes: list[int], repeats: int, go_on, label: str) -> list[dict]:
    """Out tok/s of each variant (generate() over all rows, the worker at each batch size), by
    variant, one dict a repeat; `go_on(rep)` says whether repeat `rep` (from 0) may start."""

    def generate_all():
        outs = worker.llm.generate(*token_prompts_and_params(table), use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outs)

    def batched(size):
        def f():
            return sum(sum(worker(table.slice(i, size)).column("completion_tokens").to_pylist())
                       for i in range(0, table.num_rows, size))
        return f

    variants = [(ALL, generate_all)] + [(batched_name(b), batched(b)) for b in sizes]
    runs = []
    for rep in range(repeats):
        if not go_on(rep):
            break
        rates = {}
        for name, f in rotated(variants, rep):
            worker.llm.reset_prefix_cache()
            started = time.perf_counter()
            tokens = f()
            rates[name] = tokens / (time.perf_counter() - started)
        log(f"{label}, repeat {rep + 1}: " + ", ".join(f"{k} {v:.0f}" for k, v in rates.items()) + " out tok/s")
        runs.append({k: round(v, 1) for k, v in rates.items()})
    return runs
