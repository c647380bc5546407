"""The job's Ray: started or joined, with the job's settings reaching every worker, and shut down.

A Ray the job starts gets the job's settings (`ray.env`) through the environment it starts with,
which its daemons and workers inherit; a Ray the job joins gets them as the job's runtime
environment. Every Ray Data task and engine actor of the job runs in this Ray.
"""

from __future__ import annotations

import contextlib
import os

import ray

from pipeline.generate.settings import RaySettings


def node_id() -> str:
    """The Ray node the calling process runs on (engines tag their batches with it)."""
    return ray.get_runtime_context().get_node_id()


@contextlib.contextmanager
def environment(env: dict[str, str]):
    """`env` set in this process's environment inside the block, as it was before after it."""
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def start_ray(ray_settings: RaySettings) -> None:
    """Start a Ray for the job (`ray.address: null`) or join the one it names; nothing if this
    process has one already (a test session's, a benchmark's)."""
    if ray.is_initialized():
        return
    _init(ray_settings)
    # Ray Data is imported once Ray is up, not before: `ray.init` has loaded much of what it
    # needs by then (0.5 s here against 0.8 s in a process alone).
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = bool(ray_settings.progress_bars)
    ctx.print_on_execution_start = False


def _init(ray_settings: RaySettings) -> None:
    # address null starts a Ray here: "local", since ray.init(address=None) would join a Ray that
    # `ray start` left running on this machine instead.
    kwargs = {"address": ray_settings.address or "local", "log_to_driver": ray_settings.log_to_driver}
    if ray_settings.address is None:
        # Only what the job uses: no dashboard unless asked for (a Ray joined keeps its own).
        kwargs["include_dashboard"] = ray_settings.dashboard
        if ray_settings.num_cpus is not None:
            kwargs["num_cpus"] = ray_settings.num_cpus
    env = {"TOKENIZERS_PARALLELISM": "false", **{k: str(v) for k, v in ray_settings.env.items()}}
    if ray_settings.address is None:
        # A Ray started here hands its workers this process's environment, so the settings go
        # there, for as long as Ray starts. A runtime environment would do the same at a cost:
        # Ray starts a new worker process for each task and actor of a job that has one, instead
        # of the idle workers it starts with (about a second per engine on a 2-core machine, and
        # the idle workers' start-up spent for nothing). The workers' own INFO lines reach the
        # job's log through pipeline.console.worker_log_lines, which the engine and prepare
        # tasks call themselves.
        with environment(env):
            ray.init(**kwargs)
    else:
        # A Ray joined has its own environment: the settings travel as the job's runtime environment,
        # whose setup hook sends every worker's own INFO lines to the job's log (engine start, first
        # batch: its timeline).
        kwargs["runtime_env"] = {"env_vars": env, "worker_process_setup_hook": "pipeline.console.worker_log_lines"}
        ray.init(**kwargs)


def shutdown_ray(ray_settings: RaySettings) -> None:
    """Shut down (or, for a Ray joined, leave) the job's Ray, unless `ray.shutdown` says to keep it."""
    if ray_settings.shutdown and ray.is_initialized():
        ray.shutdown()
