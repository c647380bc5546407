"""One writer per output folder: the lock names its holder when it refuses, is released by its
holder (or by the holder's death), and never writes through a symlink."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.errors import UserError
from pipeline.generate.folder_lock import FolderLock

ROOT = Path(__file__).resolve().parents[2]


class FolderError(UserError):
    pass


def test_second_holder_is_refused_with_the_holder(tmp_path):
    first = FolderLock(str(tmp_path))
    first.acquire()
    first.acquire()  # idempotent
    assert first.held
    holder = json.loads((tmp_path / ".lock").read_text())
    assert holder["pid"] == os.getpid() and holder["host"] and holder["started_at"]
    with pytest.raises(UserError) as info:
        FolderLock(str(tmp_path)).acquire()
    assert str(info.value) == (
        f"output.path '{tmp_path}' is in use by another run of the job (host {holder['host']}, "
        f"pid {os.getpid()}, since {holder['started_at']}); wait for it to finish or stop it"
    )
    first.release()
    first.release()  # idempotent
    assert not first.held
    with FolderLock(str(tmp_path)) as second:
        assert second.held
    assert not second.held
    assert (tmp_path / ".lock").exists()  # released, never deleted


def test_refusals_are_raised_as_the_callers_error(tmp_path):
    with FolderLock(str(tmp_path)):
        with pytest.raises(FolderError, match="is in use"):
            FolderLock(str(tmp_path), error=FolderError).acquire()


def test_refusal_tolerates_a_garbage_lock_file(tmp_path):
    with FolderLock(str(tmp_path)):
        (tmp_path / ".lock").write_text("not json")  # rewriting the content does not drop the lock
        with pytest.raises(UserError, match=r"host unknown, pid unknown, since unknown"):
            FolderLock(str(tmp_path)).acquire()


def test_the_folder_is_created_and_a_file_in_its_place_refused(tmp_path):
    with FolderLock(str(tmp_path / "new" / "out")):
        assert (tmp_path / "new" / "out" / ".lock").is_file()
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(UserError, match=rf"output.path '{tmp_path / 'file'}' is not a folder"):
        FolderLock(str(tmp_path / "file")).acquire()


def test_a_symlinked_lock_file_is_not_written_through(tmp_path):
    target = tmp_path / "precious.txt"
    target.write_text("precious")
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(target, out / ".lock")
    with pytest.raises(UserError, match="cannot open the lock file .*remove it or choose another output.path"):
        FolderLock(str(out)).acquire()
    assert target.read_text() == "precious"


def test_lock_of_a_killed_holder_is_taken_over(tmp_path):
    script = (
        "import sys, time\n"
        "from pipeline.generate.folder_lock import FolderLock\n"
        "lock = FolderLock(sys.argv[1])\n"
        "lock.acquire()\n"
        "time.sleep(120)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], cwd=str(ROOT), env=env)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if json.loads((tmp_path / ".lock").read_text())["pid"] == proc.pid:
                    break
            except (OSError, ValueError, KeyError):
                pass
            assert proc.poll() is None, "the lock-holding subprocess exited early"
            assert time.monotonic() < deadline, "the subprocess never took the lock"
            time.sleep(0.05)
        with pytest.raises(UserError, match=f"pid {proc.pid}"):
            FolderLock(str(tmp_path)).acquire()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with FolderLock(str(tmp_path)):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()


def test_a_dropped_lock_is_released(tmp_path):
    FolderLock(str(tmp_path)).acquire()  # dropped at once, never released by hand
    with FolderLock(str(tmp_path)):
        pass
