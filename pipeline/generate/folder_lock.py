"""One writer per output folder: an exclusive `flock` on `<output>/.lock` on a local disk, a lease
object with a heartbeat on an object store (`ObjectStoreLock`).

`OutputDir.open()` (`pipeline.generate.sinks`) takes the lock before it reads or deletes
anything and holds it until `close()` or `finish()`; the file records the holder's host, pid and
start time, which a refused second run (a scheduler retry, a rerun in another terminal) reports,
and a random token, by which engine workers committing parts for the holder
(`output.commit=workers`) check that it still holds the folder (`check_folder_holder`).
The operating system drops the lock when its holder dies, so a killed run never leaves a stale
lock behind. `.lock` is hidden, so Parquet readers of the folder skip it, and it is never
deleted: a run that opened it before the deletion would lock a file nobody else sees.

Pure module: stdlib (POSIX `fcntl`), `pipeline.errors`; `ObjectStoreLock` is handed a
`pipeline.storage.Location`.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
import uuid

from pipeline.errors import JobFailure, UserError
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
        self.token: str | None = None  # recorded in the lock file while held (`check_folder_holder`)

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
        token = uuid.uuid4().hex
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "started_at": iso_time(time.time()),
                  "token": token}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self._fd, self.token = fd, token

    def release(self) -> None:
        """Let other runs take the folder (idempotent). The lock file stays (see the module's
        docstring)."""
        fd, self._fd, self.token = self._fd, None, None
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)


def check_folder_holder(folder: str, token: str | None) -> None:
    """Raise `JobFailure` unless the run whose lock records `token` still holds `<folder>/.lock`.

    For an engine worker committing parts under its driver's lock (`output.commit=workers`): a
    worker can outlive a killed driver by seconds, and must not commit into a folder that no
    run holds (its driver is gone) or that a rerun has taken. A shared lock that can be taken
    means no one holds the exclusive one; it is dropped at once."""
    try:
        fd = os.open(os.path.join(folder, LOCK), os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        fd = None
    try:
        held = fd is not None
        if held:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                pass
            else:
                fcntl.flock(fd, fcntl.LOCK_UN)
                held = False
        holder = _read_holder(fd) if held else {}
    finally:
        if fd is not None:
            os.close(fd)
    if token is None or not held or holder.get("token") != token:
        raise JobFailure(
            f"the run that started this worker no longer holds output.path '{folder}'"
            + (f": another run took it (host {holder.get('host')}, pid {holder.get('pid')})" if held else "")
            + "; this worker commits nothing more, and the parts committed are kept"
        )


def _read_holder(fd: int) -> dict:
    """Who holds the lock, from the lock file; {} when it is empty or garbage (its holder may be
    between taking the lock and writing it)."""
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}



class ObjectStoreLock:
    """One writer per output folder on an object store (S3, GCS, any fsspec store), which has
    neither `flock` nor an exclusive create that pyarrow exposes: a lease.

    `<output>/.lock` is an object recording its holder (host, pid, start time, a random token)
    and a heartbeat time that the holder rewrites every `heartbeat` seconds from a background
    thread. A run may take the folder when there is no lock object, when its heartbeat is older
    than `stale_after` seconds (its holder died or lost the store), or when its holder ran on
    this host and its process is gone (a killed run is resumed at once). To take it, a run
    writes its own record, waits `settle` seconds and reads the object back: only the run whose
    token is there goes on; the other is refused.

    What this does not guarantee, and how the job stays correct anyway: two runs that both read
    "free" and whose writes land more than `settle` seconds apart (a store that slow to answer)
    can both believe they hold the folder; and a holder that stalls for longer than
    `stale_after` (clocks must agree to well within it) can be taken over while it still runs.
    The holder re-reads the lock before it publishes each part and each JSON file (`check`), so
    it stops at its next commit; a part it published in between holds rows the other run also
    generates, which the exactly-once check (`coverage`) finds before any manifest is written.
    """

    def __init__(self, folder, *, error: type[UserError] = UserError, stale_after: float = 60.0,
                 heartbeat: float = 10.0, settle: float = 1.0):
        self.folder = folder  # a pipeline.storage.Location
        self.file = folder.join(LOCK)
        self._error = error
        self.stale_after, self.heartbeat, self.settle = stale_after, heartbeat, settle
        self.token: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def held(self) -> bool:
        return self.token is not None

    def __enter__(self) -> ObjectStoreLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        """Take the folder or refuse, naming the holder; idempotent."""
        if self.token is not None:
            return
        holder = self._read()
        if holder is not None and not self._stale(holder):
            raise self._error(
                f"output.path '{self.folder.shown}' is in use by another run of the job ({_describe(holder)}); "
                f"wait for it to finish or stop it (its lock, {LOCK}, is free {self.stale_after:g} s after "
                "its last heartbeat)"
            )
        token = uuid.uuid4().hex
        self._write(token)
        time.sleep(self.settle)
        now = self._read()
        if now is None or now.get("token") != token:
            raise self._error(
                f"output.path '{self.folder.shown}' was claimed by another run at the same moment "
                f"({_describe(now or {})}); wait for it to finish or stop it"
            )
        self.token = token
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="output-lock-heartbeat", daemon=True)
        self._thread.start()

    def check(self) -> None:
        """Raise `JobFailure` unless this run still holds the folder (read from the store)."""
        check_lease(self.folder, self.token)

    def release(self) -> None:
        """Stop the heartbeat and delete the lock object if it is still this run's (idempotent)."""
        token, self.token = self.token, None
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=self.heartbeat + 5)
        self._thread = None
        if token is None:
            return
        try:
            holder = self._read()
            if holder is not None and holder.get("token") == token:
                self.file.delete()
        except OSError:
            pass  # unreachable store: the lock goes stale after `stale_after` seconds

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat):
            token = self.token
            try:
                holder = self._read()
                if token is None or holder is None or holder.get("token") != token:
                    return  # taken over: `check` stops the run at its next commit
                self._write(token, started_at=holder.get("started_at"))
            except OSError:
                continue  # a store hiccup; the next beat tries again

    def _stale(self, holder: dict) -> bool:
        beat = holder.get("heartbeat_at")
        if not isinstance(beat, (int, float)) or time.time() - beat > self.stale_after:
            return True
        if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
            return not _alive(holder["pid"])
        return False

    def _read(self) -> dict | None:
        return _read_lease(self.file)

    def _write(self, token: str, started_at: str | None = None) -> None:
        now = time.time()
        self.file.write_text(json.dumps({
            "host": socket.gethostname(), "pid": os.getpid(), "token": token,
            "started_at": started_at or iso_time(now), "heartbeat_at": now,
        }) + "\n")


def check_lease(folder, token: str | None) -> None:
    """Raise `JobFailure` unless the lease on `folder` (a pipeline.storage.Location) is still the
    one of `token`. The holder checks it before each commit; so does an engine worker committing
    parts under its driver's lease (`output.commit=workers`), handed the driver's token."""
    holder = _read_lease(folder.join(LOCK)) if token is not None else None
    if holder is None or holder.get("token") != token:
        raise JobFailure(
            f"this run no longer holds output.path '{folder.shown}'"
            + (f": another run took it ({_describe(holder)})" if holder else ": its lock object is gone")
            + "; this run stops without committing more, and the parts it committed are kept"
        )


def _read_lease(file) -> dict | None:
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        return None
    except OSError:
        if not file.exists():  # stores that do not say FileNotFoundError
            return None
        raise
    except ValueError:
        return {}  # garbage: treated as a stale holder
    return data if isinstance(data, dict) else {}


def _describe(holder: dict) -> str:
    beat = holder.get("heartbeat_at")
    age = f", last heartbeat {time.time() - beat:.0f} s ago" if isinstance(beat, (int, float)) else ""
    return (f"host {holder.get('host', 'unknown')}, pid {holder.get('pid', 'unknown')}, "
            f"since {holder.get('started_at', 'unknown')}{age}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True
