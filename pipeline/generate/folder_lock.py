"""One writer per output folder: an exclusive `flock` on `<output>/.lock`.

`OutputDir.open()` (`pipeline.generate.sinks`) takes the lock before it reads or deletes
anything and holds it until `close()` or `finish()`; the file records the holder's host, pid and
start time, which a refused second run (a scheduler retry, a rerun in another terminal) reports.
The operating system drops the lock when its holder dies, so a killed run never leaves a stale
lock behind. `.lock` is hidden, so Parquet readers of the folder skip it, and it is never
deleted: a run that opened it before the deletion would lock a file nobody else sees.

Pure module: stdlib (POSIX `fcntl`) and `pipeline.errors`.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time

from pipeline.errors import UserError
from pipeline.manifests import iso_time

LOCK = ".lock"


class FolderLock:
    """The exclusive lock on `<folder>/.lock`; its refusals name `output.path`, the setting that
    chose the folder. They are raised as `error` (the caller's `UserError` kind), so that the
    output folder's problems all come out as one kind of error."""

    def __init__(self, folder: str, *, error: type[UserError] = UserError):
        self.folder = folder
        self.file = os.path.join(folder, LOCK)
        self._error = error
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> FolderLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self) -> None:
        # The descriptor is a bare int, which nothing else closes: a dropped lock must not keep
        # the folder locked for the rest of the process.
        try:
            self.release()
        except Exception:
            pass

    def acquire(self) -> None:
        """Take the lock (creating the folder) and record this process as its holder; refused,
        without waiting, while another process holds it. Idempotent."""
        if self._fd is not None:
            return
        try:
            os.makedirs(self.folder, exist_ok=True)
        except (FileExistsError, NotADirectoryError) as e:
            raise self._error(f"output.path '{self.folder}' is not a folder ({e})") from e
        try:
            # O_NOFOLLOW: the lock file is truncated and written, so a symlink planted there
            # must not redirect that write. Python's descriptors are not inherited across exec,
            # so processes the job starts never keep the lock alive after it dies.
            fd = os.open(self.file, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as e:
            raise self._error(
                f"cannot open the lock file '{self.file}' ({e}); remove it or choose another output.path"
            ) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise self._error(
                f"output.path '{self.folder}' is in use by another run of the job "
                f"(host {holder.get('host', 'unknown')}, pid {holder.get('pid', 'unknown')}, "
                f"since {holder.get('started_at', 'unknown')}); wait for it to finish or stop it"
            ) from None
        except OSError as e:
            os.close(fd)
            raise self._error(
                f"cannot lock '{self.file}' ({e}); the filesystem of output.path must support file locks "
                "so that two runs never write the same folder"
            ) from e
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "started_at": iso_time(time.time())}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Let other runs take the folder (idempotent). The lock file stays (see the module's
        docstring)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)


def _read_holder(fd: int) -> dict:
    """Who holds the lock, from the lock file; {} when it is empty or garbage (its holder may be
    between taking the lock and writing it)."""
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}

