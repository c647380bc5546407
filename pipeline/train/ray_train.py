"""Training on several workers: Ray Train's TorchTrainer runs `loop.fit` under DDP on each.

The only module of the training job that talks to Ray (imported inside the functions). Rank 0's
adapter comes back as a Ray Train checkpoint and is copied into the registry's staging folder.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from pipeline.lora_registry import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from pipeline.train.labels import Example
from pipeline.train.loop import FitJob, fit
from pipeline.train.settings import RaySettings, TrainConfigError

ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
# The checkout's root: Ray's workers import this module by name.
ROOT = Path(__file__).resolve().parents[2]


def _ray_worker(config: dict) -> None:
    """Ray Train's per-worker loop: this rank's share of the data, DDP, rank 0 saves."""
    import ray
    import ray.train
    import ray.train.torch

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("pipeline").setLevel(logging.INFO)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    train_ex, val_ex = ray.get(config["examples"])
    with tempfile.TemporaryDirectory() as tmp:
        metrics = fit(config["job"], train_ex, val_ex, out_dir=Path(tmp) if rank == 0 else None,
                      rank=rank, world_size=world, device=ray.train.torch.get_device(),
                      wrap=ray.train.torch.prepare_model)
        # Every rank must report (it is a barrier); only rank 0 has the adapter.
        checkpoint = ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None
        ray.train.report(metrics, checkpoint=checkpoint)


def fit_with_ray(job: FitJob, train_ex: list[Example], val_ex: list[Example], staging: Path,
                 ray_settings: RaySettings) -> dict:
    """Train on `job.train.workers` Ray Train workers; the adapter files land in `staging` and
    rank 0's metrics come back. Starts (and stops) a local Ray unless one is running or
    `ray.address` names a cluster. `job` travels to every worker as it is (frozen)."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    started_ray = False
    if not ray.is_initialized():
        # address null starts a Ray here: "local", since ray.init(address=None) would join a Ray
        # that `ray start` left running on this machine instead (ray.address=auto joins one).
        address = ray_settings.address or "local"
        kwargs: dict[str, Any] = {"address": address, "log_to_driver": True}
        if address == "local" and ray_settings.num_cpus is not None:
            kwargs["num_cpus"] = ray_settings.num_cpus
        # Workers import this module by name; on a local cluster the checkout may not be
        # installed, so put it on their path (a remote cluster needs the package installed).
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        kwargs["runtime_env"] = {"env_vars": {"PYTHONPATH": path, "TOKENIZERS_PARALLELISM": "false"}}
        ray.init(**kwargs)
        started_ray = True
    t = job.train
    if started_ray:
        # A local cluster without room for every worker would wait for resources forever.
        have = ray.cluster_resources()
        need_cpu = int(t.workers) * float(t.cpus_per_worker)
        need_gpu = int(t.workers) if t.use_gpu else 0
        if need_cpu > have.get("CPU", 0) or need_gpu > have.get("GPU", 0):
            ray.shutdown()
            raise TrainConfigError([
                f"train.workers: {t.workers} workers need {need_cpu:g} CPUs and {need_gpu} GPUs "
                f"(train.cpus_per_worker, train.use_gpu); this machine has {have.get('CPU', 0):g} CPUs "
                f"and {have.get('GPU', 0):g} GPUs"
            ])
    # Ray Train persists rank 0's checkpoint under storage_path; by default a folder inside
    # the staging folder, so it disappears with it. Multi-node clusters need shared storage.
    storage = ray_settings.storage_path or str(staging / ".ray")
    try:
        trainer = TorchTrainer(
            _ray_worker,
            train_loop_config={"job": job, "examples": ray.put((train_ex, val_ex))},
            scaling_config=ScalingConfig(
                num_workers=int(t.workers), use_gpu=bool(t.use_gpu),
                resources_per_worker={"CPU": float(t.cpus_per_worker)},
            ),
            torch_config=TorchConfig(backend="nccl" if t.use_gpu else "gloo"),
            run_config=RunConfig(name=f"train-lora-{staging.name.lstrip('.')}", storage_path=os.path.abspath(storage)),
        )
        result = trainer.fit()
        if result.checkpoint is None:
            raise RuntimeError("Ray Train finished without rank 0's adapter checkpoint")
        with result.checkpoint.as_directory() as ckpt:
            for f in ADAPTER_FILES:
                shutil.copy2(Path(ckpt, f), staging / f)
        metrics = dict(result.metrics)
    finally:
        shutil.rmtree(staging / ".ray", ignore_errors=True)
        if started_ray:
            ray.shutdown()
    return metrics
