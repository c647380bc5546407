"""What the generation job derives from its settings and the Ray cluster it runs on: the engines'
device, Ray resources, threads, KV cache, batches in flight, engine mode and who commits the
parts, as one frozen `Resources` (`resolve_resources`). The settings themselves are
`pipeline.generate.settings`; nothing here writes into them.

Pure module: standard library and the job's settings.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from pipeline.generate.settings import ConfigError, EngineSettings, GenerationSettings


@dataclass(frozen=True)
class Resources:
    """What the job derives from its settings and the Ray cluster it runs on."""

    device: str
    """cpu or gpu: what the engines run on."""
    num_gpus: float
    """Ray GPUs per engine."""
    num_cpus: float
    """Ray CPUs per engine."""
    cpu_threads: int | None
    """CPU: torch threads per engine (Ray would give a fractional actor one)."""
    kv_cache_gib: float | None
    """The KV cache per engine (null: vLLM's choice)."""
    batches_in_flight: int
    """Batches each engine holds at once."""
    engine_multiprocessing: bool = False
    """vLLM's engine core in its own process (`engine_multiprocessing`)."""
    commit: str = "driver"
    """Who commits the parts: driver or workers (`commit_mode`)."""


def engine_multiprocessing(device: str, engine: EngineSettings) -> bool:
    """Whether an engine runs vLLM's engine core in a process of its own.

    engine.multiprocessing when set. Otherwise on GPUs, yes: it is vLLM's default, and what its
    throughput figures are measured with; the engine-core process schedules the next step and
    the front end turns finished tokens into text while the GPU computes, where in-process every
    step waits for both (and async scheduling overlaps the next step's scheduling with the
    current one's compute). With tensor_parallel_size > 1 vLLM needs it anyway. On the CPU, no: the
    engine core and the model would share the same cores, and the in-process engine starts
    seconds sooner (see docs/benchmark.md).
    """
    if engine.multiprocessing is not None:
        return engine.multiprocessing
    return device == "gpu" or engine.tensor_parallel_size > 1


def commit_mode(commit: str, device: str, nodes: int, output_path: str) -> str:
    """Who commits the parts: `output.commit` when it is driver or workers; for auto, the workers
    where that pays and is safe, the driver otherwise.

    It pays where more rows come back than one driver takes through Ray Data (a few thousand a
    second, docs/benchmark.md "The driver's limits"): with GPU engines, or engines on more than
    one node. It is safe where every worker reaches the output folder: an object store, or a
    local folder on a single-node Ray. A local folder with a multi-node Ray stays on the driver
    (each node would write to its own disk) unless `workers` is asked for, which then says that
    the folder is shared (NFS and the like). CPU jobs on one machine, the tests among them, get
    the driver: their engines give tens of rows a second.
    """
    if commit != "auto":
        return commit
    from pipeline.storage import is_remote

    pays = device == "gpu" or nodes > 1
    safe = is_remote(output_path) or nodes <= 1
    return "workers" if pays and safe else "driver"


def resolve_resources(settings: GenerationSettings, cluster_gpus: float, cluster_cpus: float | None = None,
                      node_cpus: float | None = None, nodes: int = 1) -> Resources:
    """The engines' device and sizes on a cluster of `nodes` nodes with `cluster_gpus` GPUs and
    `cluster_cpus` CPUs (`node_cpus`: the largest node's; both default to this machine's cores)."""
    device = settings.device
    if device == "auto":
        device = "gpu" if cluster_gpus > 0 else "cpu"
    if device == "gpu" and cluster_gpus <= 0:
        raise ConfigError(["device: gpu was asked for, but the Ray cluster has no GPU (use device=cpu or auto)"])
    engine = settings.engine
    num_gpus = engine.num_gpus if engine.num_gpus is not None else (engine.tensor_parallel_size if device == "gpu" else 0)
    # A fractional claim keeps Ray free to run the read and prepare tasks beside the actors
    # (whole cores deadlock on 2 cores); the engine's threads are set by cpu_threads.
    num_cpus = engine.num_cpus if engine.num_cpus is not None else (1 if device == "gpu" else 0.5)
    batches = settings.batches_in_flight
    if batches is None:
        # Enough batches in each engine to fill its running sequences (vLLM's offline default
        # max_num_seqs: 256 on CPU, up to 1024 on big GPUs), and one more waiting in the engine's
        # queue, so a finished batch's place is taken at once rather than after Ray delivers the next.
        seqs = engine.max_num_seqs or (1024 if device == "gpu" else 256)
        batches = -(-int(seqs) // int(settings.batch_size)) + 1
    threads = engine.cpu_threads
    if device == "cpu" and threads is None:
        # Ray sets OMP_NUM_THREADS to an actor's whole CPUs (1 for a fractional claim), which
        # would leave an engine computing on one core: the workers share the cores instead.
        cores = os.cpu_count() or 1
        per_worker = int((cluster_cpus or cores) // max(1, settings.workers))
        threads = max(1, min(per_worker, int(node_cpus or cores)))
    kv_cache = engine.kv_cache_gib
    if device == "cpu" and kv_cache is None:
        kv_cache = 1.0  # vLLM's CPU default reserves far more than a laptop has
    return Resources(device=device, num_gpus=num_gpus, num_cpus=num_cpus, cpu_threads=threads,
                     kv_cache_gib=kv_cache, batches_in_flight=batches,
                     engine_multiprocessing=engine_multiprocessing(device, engine),
                     commit=commit_mode(settings.output.commit, device, nodes, settings.output.path))
