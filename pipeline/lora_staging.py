"""Staging folders of the adapter registry: who owns one, a heartbeat while it is written, and
when a leftover may be removed.

Training writes an adapter into a hidden staging folder of the registry and renames it into
place only on success. The registry may sit on a filesystem shared by several nodes, so each
staging folder carries an owner file (host, pid) whose mtime a heartbeat refreshes: one node's
cleanup then never deletes another node's run in progress.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from pathlib import Path

# Inside a staging folder: which process owns it, so cleanup spares runs in progress.
OWNER_FILE = ".staging-owner.json"

# While a staging block runs, its owner file's mtime is refreshed this often (seconds).
HEARTBEAT_S = 30.0
# A staging folder whose liveness cannot be checked by pid (owner on another host, or
# owner unknown) is a leftover once its heartbeat is this old (seconds). Generous, so
# that a slow shared filesystem, a busy node or clock skew between nodes never gets a
# live run's folder deleted; the cost is only that a crashed run's files linger a while.
STALE_AFTER_S = 3600.0


def owner_record() -> str:
    return json.dumps({"host": socket.gethostname(), "pid": os.getpid()})


class Heartbeat:
    """Daemon thread that refreshes a staging owner file's mtime at a fixed interval.

    Failures are ignored (a shared filesystem can hiccup; the next beat retries), and a
    vanished staging folder ends the thread, since there is nothing left to keep alive.
    A deleted owner file is rewritten while its folder still exists.
    """

    def __init__(self, owner_file: Path, interval: float):
        self.owner_file = owner_file
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"lora-staging-heartbeat:{owner_file.parent.name}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                os.utime(self.owner_file)
            except FileNotFoundError:
                if not self.owner_file.parent.is_dir():
                    return
                with contextlib.suppress(OSError):
                    self.owner_file.write_text(owner_record())
            except OSError:
                pass


def is_stale(staging_dir: Path, stale_age: float) -> bool:
    """Whether `clean_stale` may delete this staging folder (rule in its docstring)."""
    owner_file = staging_dir / OWNER_FILE
    try:
        owner = json.loads(owner_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        owner = None
    host = owner.get("host") if isinstance(owner, dict) else None
    pid = owner.get("pid") if isinstance(owner, dict) else None
    if isinstance(host, str) and host:
        if host != socket.gethostname():
            return _age(owner_file) > stale_age
        if isinstance(pid, int) and not isinstance(pid, bool) and pid > 0:
            return not _pid_alive(pid)
    return min(_age(owner_file), _age(staging_dir)) > stale_age


def _age(path: Path) -> float:
    """Seconds since `path` was modified; infinite when it does not exist."""
    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return float("inf")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: existence check only
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by another user
    except OverflowError:
        return False  # not a pid this system can have
    return True
