"""The endpoint as Ray Serve replicas (`serve.replicas=N`): each replica is the same app
(`pipeline.serve.app.create_app`) with its own engine, behind Ray Serve's HTTP proxy on host:port;
Ray places the replicas on the cluster's GPUs and nodes. Each answer names its replica in the
`x-served-by` header.

The one Ray Serve module of the endpoint.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

from pipeline.serve.settings import ServeSettings

log = logging.getLogger(__name__)


def endpoint_app(settings: ServeSettings, num_gpus: float):
    """The Ray Serve application: `settings.serve.replicas` replicas of the endpoint."""
    from ray import serve

    from pipeline.serve.app import create_app

    @serve.deployment(
        name="llama-endpoint",
        num_replicas=settings.serve.replicas,
        ray_actor_options={"num_cpus": settings.serve.num_cpus, "num_gpus": num_gpus},
        # Each replica answers 429 itself beyond limits.max_pending; Ray Serve queues no more than that.
        max_ongoing_requests=settings.limits.max_pending + 1,
        health_check_period_s=10,
        graceful_shutdown_timeout_s=settings.limits.shutdown_grace_s,
    )
    @serve.ingress()
    class Endpoint:
        def __init__(self, settings: ServeSettings):
            self.settings = settings

        def __serve_build_asgi_app__(self):
            from pipeline.serve.engine import ServeEngine

            replica = serve.get_replica_context().replica_id.unique_id
            self.engine = ServeEngine(self.settings)
            return create_app(self.settings, self.engine, served_by=f"replica-{replica}")

        def check_health(self):
            # Ray Serve replaces a replica whose check fails: here, one whose engine has died.
            if not self.engine.ready:
                raise RuntimeError("the replica's engine is not running")

    return Endpoint.bind(settings)


def run_replicas(settings: ServeSettings) -> None:
    """Start (or join) Ray, run the replicas until SIGTERM or Ctrl-C, then shut them down."""
    import ray
    from ray import serve

    env = {"TOKENIZERS_PARALLELISM": "false"}
    token = settings.auth.token_env
    if os.environ.get(token):
        # The replicas read the token as this process does: from their environment (Ray's runtime
        # environment carries it to them; it is never logged).
        env[token] = os.environ[token]
    # "local": a Ray of its own here, never one that happens to run on this machine.
    ray.init(address=settings.serve.ray_address or "local", runtime_env={"env_vars": env}, include_dashboard=False)
    # Ray installs handlers of its own that end the process at once: SIGTERM and Ctrl-C should
    # drain the replicas instead, even while they are still starting.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _stop)
    try:
        gpus = settings.serve.num_gpus
        if gpus is None:
            gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
        serve.start(http_options={"host": settings.host, "port": settings.port})
        serve.run(endpoint_app(settings, gpus), name="llama-endpoint", route_prefix="/")
        log.info("serving %d replicas on http://%s:%d", settings.serve.replicas, settings.host, settings.port)
        threading.Event().wait()
    except _Stopped:
        log.info("stopping: the replicas finish their requests (up to %ss)", settings.limits.shutdown_grace_s)
    finally:
        serve.shutdown()
        ray.shutdown()


class _Stopped(Exception):
    """SIGTERM or Ctrl-C."""


def _stop(signum, frame):
    raise _Stopped()
