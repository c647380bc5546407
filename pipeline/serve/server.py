"""`python -m jobs.serve`: the endpoint on one engine under uvicorn, or as Ray Serve replicas.

SIGTERM (or Ctrl-C) drains: the server stops accepting connections, `/readyz` answers 503 on
connections still open, the requests in flight finish (for up to `limits.shutdown_grace_s`), then
the engine stops.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import threading

from pipeline.serve.settings import ServeSettings

log = logging.getLogger(__name__)


def run(cfg) -> None:
    """The endpoint on a composed config (conf/serve.yaml); returns once it has shut down."""
    settings = ServeSettings.from_config(cfg)
    log.info("settings: %s", json.dumps(settings.record(), default=str))
    if settings.serve.replicas > 0:
        from pipeline.serve.replicas import run_replicas

        run_replicas(settings)
        return
    import uvicorn

    from pipeline.serve.app import create_app

    app = create_app(settings)

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            app.state.drain()
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self):
            # uvicorn's own re-raises the signal once drained, which would end the process as
            # killed by it; a drained server has stopped as asked, and exits 0.
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None, access_log=False,
                            timeout_graceful_shutdown=settings.limits.shutdown_grace_s)
    auth = "bearer token required" if settings.auth_required else "no auth"
    log.info("serving %s on http://%s:%d (%s)", settings.model.name or settings.model.path, settings.host,
             settings.port, auth)
    DrainingServer(config).run()
