"""The generation job on Ray Data: Parquet requests -> seeded vLLM -> Parquet responses.

    read (one task per run of row groups; ids and request JSON)      pipeline.generate.datasource.ShardDatasource
      -> prepare (validate, render, tokenize, sampling; CPU tasks)   pipeline.generate.prepare.Preparer
      -> generate (an actor pool, one vLLM engine per actor)         pipeline.generate.engine.GenerationWorker
      -> the driver commits Parquet parts, shows progress, and writes manifest.json last

The driver streams the results (`iter_batches`), so memory stays flat however many rows there
are. With `output.commit=driver` it commits the parts: a part is written to a temporary name and
renamed, so a part on disk is always whole. With `workers` each engine commits its own batches'
parts the same way and the driver takes only their ledger entries (`pipeline.generate.worker_commit`).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
from collections import Counter
import functools
import json
import logging
import os
import sys
import time
from typing import Callable

import pyarrow as pa
import ray

from pipeline.console import JobConsole
from pipeline.generate import config as job_config
from pipeline.generate import dataset_inputs
from pipeline.generate.config import AdapterSet
from pipeline.generate.node_model import model_source, prepare_block_on_node
from pipeline.node_cache import cache_root
from pipeline.generate.resources import Resources, resolve_resources
from pipeline.generate.settings import GenerationSettings
from pipeline.errors import JobFailure, find_failure
from pipeline.manifests import iso_time, package_versions
from pipeline.generate.planning import Shard, ShardPlan, limit_rows, plan_shards
from pipeline.generate.ray_session import node_id, shutdown_ray, start_ray
from pipeline.generate.retry import RetryError, replace_rows, rows_to_redo
from pipeline.generate.sinks import JOB, OutputDir, Resume, output_dir
from pipeline.generate.stats import RunStats, batch_counts, untag_node
from pipeline.generate.worker_commit import PartCommitter, batches_per_task, read_ledger
from pipeline.generate.tasks import preparer_args, rows_to_skip
from pipeline import storage

log = logging.getLogger("pipeline.generate.job")

# The job's log file, in <output>/logs/ (where conf/generate.yaml points Hydra's job log too).
LOG_FILE = "generate.log"


def run(cfg, on_batch: Callable[[pa.Table], None] | None = None) -> dict:
    """Run the generation job described by `cfg` (the composed Hydra config); return the manifest.

    Rerunning a job into the same output folder resumes it (see `pipeline.generate.sinks`).
    `on_batch`, if given, sees what the driver takes for commit (a benchmark's clock, a progress
    hook): each batch of output rows with `output.commit=driver`, each committed part's ledger
    entry (a dict: `file`, `rows`, `covers`, `counts`, `node`) with `workers`; it must not change it.
    """
    settings = GenerationSettings.from_config(cfg)
    started = time.time()
    # What refuses bad settings, inputs or adapters runs before the console opens the job's log
    # file under output.path: a refused job writes nothing.
    model_path = job_config.ensure_model(settings.model)
    plan = plan_shards(
        dataset_inputs.parquet_inputs(settings.input, settings.dataset.split, settings.dataset.config_name,
                                      str(cache_root())),
        id_column=settings.id_column,
        passthrough=list(settings.passthrough),
        rows_per_shard=settings.read.rows_per_shard,
        template_columns=settings.template.columns if settings.template else None,
        request_columns=settings.template.request_columns if settings.template else True,
    )
    # limit: a preview of `limit` rows, the same ones every run (planning.limit_rows).
    selected = limit_rows(plan, settings.limit) if settings.limit else None
    job_config.check_inputs_outside_output(plan.files, settings.output.path)
    model = job_config.model_fingerprint(settings.model, model_path)
    adapters = job_config.adapters_for(settings, plan)
    output = storage.resolve(settings.output.path, "output.path")
    if settings.retry and not output.join(JOB).is_file():
        raise RetryError([f"output.path '{output.shown}' holds no output of this job to retry (no {JOB}); "
                          "run the job first, then retry=errors redoes its failed rows"])
    if settings.plan:  # a dry run: no Ray, no engine, nothing written
        from pipeline.generate.preview import preview

        result = preview(settings, plan, selected, model_path, adapters, model.get("commit"))
        print(result.text(settings.output.path), file=sys.stderr)
        return {"status": "plan", "plan": result.record()}
    if not output.is_local:
        storage.check_writable(output, "output.path")  # a bucket that is missing, read-only or unreachable
    with JobConsole(_log_file(output), verbose=settings.verbose) as console:
        log.info("settings:\n%s", json.dumps(settings.record(), indent=2))
        try:
            return _run(settings, console, on_batch, started, model_path, plan, selected, model, adapters)
        finally:
            _upload_log(console, output)


def _run(settings: GenerationSettings, console: JobConsole, on_batch, started: float, model_path: str,
         plan: ShardPlan, selected: dict[str, list[int]] | None, model: dict, adapters: AdapterSet) -> dict:
    planned_rows = sum(len(r) for r in selected.values()) if selected is not None else plan.total_rows
    start_ray(settings.ray)
    resources = ray.cluster_resources()
    alive = [n for n in ray.nodes() if n.get("Alive")]
    node_cpus = max((n["Resources"].get("CPU", 0) for n in alive), default=None)
    resolved = resolve_resources(settings, resources.get("GPU", 0), resources.get("CPU"), node_cpus,
                                 nodes=max(1, len(alive)))
    log.info("resources: %s", json.dumps(dataclasses.asdict(resolved)))

    out = output_dir(
        settings.output.path,
        overwrite=settings.output.overwrite,
        rows_per_part=settings.output.rows_per_part,
    )
    try:
        resume = out.open(job_config.fingerprint(settings, resolved, plan, adapters, model))
        if settings.retry:
            manifest = _redo_failed_rows(settings, console, out, resume, resolved, plan, model_path, adapters, model)
            shutdown_ray(settings.ray)
            return manifest
        if resume.complete:
            console.print(f"{out.shown} already holds this job's complete output; nothing to do")
            shutdown_ray(settings.ray)
            return resume.manifest
        console.print(
            f"generate: {planned_rows * settings.n:,} rows from {len(plan.files)} file(s) -> {out.shown}; "
            f"{settings.model.name} on {resolved.device}, {settings.workers} engine(s)"
            + (f"; log: {console.log_file}" if console.log_file and not settings.verbose else "")
        )
        stats = RunStats(total_rows=planned_rows * settings.n)
        for table in out.committed_stats_tables():
            stats.add(table, resumed=True)
        if resume.rows:
            log.info("resuming: %d of %d rows are already committed", resume.rows, planned_rows * settings.n)

        remaining = [s for s in plan.shards if len(rows_to_skip(s, resume, selected)) < s.num_rows]
        with stats.progress(enabled=settings.progress, file=console.terminal) as progress:
            if remaining:
                committer = out.committer() if resolved.commit == "workers" else None
                left = max(0, planned_rows - resume.rows // settings.n)
                per_task = 1 if committer is None else batches_per_task(
                    left, settings.batch_size, resolved.batches_in_flight, settings.workers)
                ds = build_dataset(settings, resolved, plan, remaining, resume, model_path, adapters,
                                   model.get("commit"), selected, committer=committer, batches_per_task=per_task)
                try:
                    # No prefetching: with it, iter_batches holds each answered batch back until the
                    # next one is answered too (Ray Data 2.60's prefetch_batches_locally), so the first
                    # rows would wait for a second batch.
                    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None, prefetch_batches=0):
                        for taken, counts, node in _take(out, batch, committer is not None):
                            if on_batch is not None:
                                on_batch(taken)
                            first = stats.first_row_s is None
                            stats.add_counts(counts, node=node)
                            if first and stats.first_row_s is not None:
                                # The first rows are readable at once, not after rows_per_part rows
                                # (a worker's part is committed already).
                                out.flush()
                                log.info("first rows committed, %.1fs after the job started",
                                         time.time() - started)
                        progress.update(stats)
                except Exception as exc:
                    _stop(out, exc)
        finished = time.time()
        manifest = out.finish(
            {
                "status": "complete",
                "started_at": iso_time(started),
                "finished_at": iso_time(finished),
                "settings": settings.record(),
                "resources": dataclasses.asdict(resolved),
                "versions": package_versions(python=True),
                "model": model,
                "inputs": {"files": [storage.shown(f) for f in plan.files], "fingerprints": plan.fingerprints},
                "adapters": adapters.adapters,
                "counts": stats.counts(),
                "tokens": stats.tokens(),
                # the share of this run's prompt tokens its engines did not prefill again
                "prefix_cache": stats.prefix_cache(),
                "wall_time_s": round(finished - started, 3),
                "throughput": stats.throughput(finished - started),
                "nodes": stats.nodes,  # rows this run's engines answered, per Ray node id
                # (seconds, rows, completion tokens) of this run after each committed batch
                "timeline": {"clock": "seconds since this run started generating", "points": stats.timeline},
            },
            expected_rows=plan.rows_in,
            per_row=settings.n,
            selected=selected,
        )
    finally:
        out.close()
    # The report is drawn while Ray shuts down: the one is the driver's CPU, the other mostly
    # waiting for Ray's processes to exit.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="report") as pool:
        drawn = pool.submit(_write_report, out.path)
        shutdown_ray(settings.ray)
        report = drawn.result()
    lines = [stats.summary(out.shown)]
    if report:
        lines.append(f"  report: {report}")
    if console.log_file:
        lines.append(f"  log: {console.log_file}")
    console.print("\n".join(lines))
    return manifest


def _take(out: OutputDir, batch: pa.Table, ledger: bool):
    """What the driver takes from one batch Ray Data delivers: with driver commits, the rows (added
    to the pending part); with worker commits, the ledger entries of parts already committed
    (recorded, each once). Yields (what `on_batch` sees, its `batch_counts`, the engine's node)."""
    if ledger:
        for entry in read_ledger(batch):
            if out.record(entry):
                yield entry, entry["counts"], entry["node"]
        return
    batch, node = untag_node(batch)
    out.add(batch)
    yield batch, batch_counts(batch), node


def _redo_failed_rows(settings: GenerationSettings, console: JobConsole, out: OutputDir, resume: Resume,
                      resources: Resources, plan: ShardPlan, model_path: str, adapters: AdapterSet,
                      model: dict) -> dict:
    """retry=errors: the failed rows of this job's finished output, generated again and put in
    their place (pipeline.generate.retry); the manifest gets the new counts and a `retries` entry."""
    if not resume.complete:
        raise RetryError([f"output.path '{out.path}' holds an unfinished run of this job: rerun the same command "
                          "without retry= to finish it, then retry"])
    manifest = resume.manifest
    redo = rows_to_redo(out.part_files(), settings.retry_max_tokens)
    if not redo.ids:
        console.print(f"retry: {out.path} has no row to redo")
        return manifest
    attempt = len(manifest.get("retries") or []) + 1
    console.print(f"retry {attempt}: redoing {len(redo.ids):,} row(s) of {out.path}")
    shards = [s for s in plan.shards if set(redo.sources.get(s.source, ())) & set(s.row_range)]
    spec = {"attempt": attempt, "max_tokens": settings.retry_max_tokens, "truncated": sorted(redo.truncated),
            "max_model_len": settings.engine.max_model_len}
    ds = build_dataset(settings, resources, plan, shards, Resume(), model_path, adapters, model.get("commit"),
                       redo.sources, retry=spec)
    tables = [untag_node(t)[0] for t in ds.iter_batches(batch_format="pyarrow", batch_size=None)]
    replaced = replace_rows(redo, pa.concat_tables(tables, promote_options="permissive"))
    stats = RunStats(total_rows=manifest["counts"]["rows_in"])
    for table in out.committed_stats_tables():
        stats.add(table, resumed=True)
    counts = {**manifest["counts"], **{k: v for k, v in stats.counts().items() if not k.startswith("rows_")}}
    still = rows_to_redo(out.part_files(), settings.retry_max_tokens)
    manifest = {
        **manifest,
        "counts": counts,
        "tokens": stats.tokens(),
        "retries": [*(manifest.get("retries") or []), {
            "attempt": attempt,
            "at": iso_time(time.time()),
            "rows": replaced,
            "reasons": dict(sorted(Counter(r for rows in redo.by_part.values() for r in rows.values()).items())),
            "max_tokens": settings.retry_max_tokens,
            "still_failing": len(still.ids),
            "ids": redo.ids,
        }],
    }
    out.rewrite_manifest(manifest)
    out.close()
    report = _write_report(out.path)
    console.print(f"retry {attempt}: {replaced:,} row(s) redone, {len(still.ids):,} still failing -> {out.path}"
                  + (f"\n  report: {report}" if report else ""))
    return manifest


def _write_report(output: str) -> str | None:
    """The job's report page; the job's output is complete without it, so a failure only warns."""
    from pipeline.generate.report import write_report

    try:
        return write_report(output)
    except Exception as exc:
        log.info("the report failed:", exc_info=True)
        log.warning("the report could not be written (%s: %s); rebuild it with python -m jobs.report %s",
                    type(exc).__name__, exc, output)
        return None


def _stop(out: OutputDir, exc: Exception) -> None:
    """The job cannot go on: commit the rows already answered, then stop with the reason."""
    try:
        out.flush()
    except Exception:  # the disk may be what failed; the committed parts are whole either way
        log.exception("the last answered rows could not be committed")
    failure = find_failure(exc)
    if failure is not None:
        reason = failure.args[0] if failure.args else str(failure)
    elif isinstance(exc, OSError):  # the output's storage: full, read-only, permission denied
        reason = f"writing the output to {out.shown} failed: {exc}"
    else:
        raise exc
    raise JobFailure(f"{reason}\nThe rows committed so far are kept: rerun the same command to resume.") from exc


def _log_file(output: storage.Location) -> str:
    """The job's log file: `<output>/logs/generate.log` in a local output folder; for an output on
    another store a local file (uploaded there when the job ends, `_upload_log`)."""
    if output.is_local:
        return os.path.join(output.path, "logs", LOG_FILE)
    import hashlib
    import tempfile

    key = hashlib.sha256(output.uri.encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), "llama-batch-logs", key, LOG_FILE)


def _upload_log(console: JobConsole, output: storage.Location) -> None:
    """Copy the local log file of a job whose output is on another store to `<output>/logs/`."""
    if output.is_local or not console.log_file or not os.path.isfile(console.log_file):
        return
    try:
        with open(console.log_file, "rb") as f:
            output.join("logs", LOG_FILE).write_bytes(f.read())
    except OSError as exc:
        log.warning("the log file stays at %s: copying it to %s failed (%s)", console.log_file,
                    output.join("logs", LOG_FILE).shown, exc)


def build_dataset(settings: GenerationSettings, resources: Resources, plan: ShardPlan, shards: list[Shard],
                  resume: Resume, model_path: str, adapters: AdapterSet, revision: str | None = None,
                  selected: dict[str, list[int]] | None = None, retry: dict | None = None,
                  committer: PartCommitter | None = None, batches_per_task: int = 1):
    import ray.data  # once Ray is up (pipeline.generate.ray_session.start_ray)

    from pipeline.generate.datasource import ShardDatasource
    from pipeline.generate.engine import GenerationWorker

    engine = job_config.engine_config(settings, resources, adapters)
    datasource = ShardDatasource(plan, shards, resume, selected, settings.template)
    ds = ray.data.read_datasource(datasource, override_num_blocks=len(shards))
    # Tasks and engines find the model on their own node (pipeline.generate.node_model).
    source = model_source(settings.model, model_path)
    # Each prepared block's rows sorted by prompt tokens (prepare.group_prefixes): the batches cut
    # from it below are consecutive rows, so rows sharing a prefix reach an engine together.
    # log_lines: each Ray worker sends its own INFO lines to the job's log (pipeline.console.worker_log_lines).
    prepare = functools.partial(prepare_block_on_node, model_source=source, log_lines=True,
                                group_prefixes=settings.prepare.group_prefixes,
                                **preparer_args(settings, model_path, adapters, revision))
    ds = ds.map_batches(prepare, batch_format="pyarrow", batch_size=None, num_cpus=settings.prepare.num_cpus)
    # Ray Data merges a task's outputs into one block, so without this a whole read shard would
    # reach the driver at once: results arrive (and are committed) one engine batch at a time.
    # With worker commits a task holds `batches_per_task` batches, each committed as it finishes
    # (pipeline.generate.worker_commit.batches_per_task): fewer tasks and blocks for the driver.
    ds = ds.repartition(target_num_rows_per_block=settings.batch_size * batches_per_task)
    ds = ds.map_batches(
        GenerationWorker,
        fn_constructor_kwargs={
            "engine": engine,
            "model_path": model_path,
            "model_source": source,
            "node_id": node_id,
            "adapters": adapters.adapters,
            "passthrough": list(plan.passthrough),
            "revision": revision,
            "samples": settings.n,
            "retry": retry,
            "committer": committer,  # output.commit=workers: the engine commits its batches' parts
            "log_lines": True,
        },
        # Several batches per engine at once, each call in its own thread: the worker's engine
        # loop adds each batch's requests as they arrive (pipeline.generate.engine_loop.EngineLoop).
        compute=ray.data.ActorPoolStrategy(
            size=settings.workers,
            max_concurrent_calls_per_actor=resources.batches_in_flight,
            max_tasks_in_flight_per_actor=resources.batches_in_flight,
            enable_true_multi_threading=True,
        ),
        batch_size=settings.batch_size,
        batch_format="pyarrow",
        num_cpus=resources.num_cpus,
        num_gpus=resources.num_gpus,
        # A dead engine is replaced and its batches redone: Ray Data's own default for an actor
        # pool (max_restarts and max_task_retries -1). Turning it off has no named parameter in
        # Ray 2.60, only the extra remote arguments it warns about.
        **({} if settings.ray.restart_actors else {"max_restarts": 0, "max_task_retries": 0}),
    )
    return ds
