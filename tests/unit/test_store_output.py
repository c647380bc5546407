"""The output folder on an object store (fsspec's memory:// here; S3 in
tests/integration/test_generate_s3.py): parts committed by a copy from a hidden staging prefix,
a lease as the folder lock, resume, overwrite, and every refusal of the local folder."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid

import pyarrow.parquet as pq
import pytest

from pipeline import storage
from pipeline.errors import JobFailure
from pipeline.generate.folder_lock import ObjectStoreLock
from pipeline.generate.sinks import OutputError, output_dir
from pipeline.generate.store_output import StoreOutputDir
from tests.unit.test_sinks import FP, rows

FAST = {"settle": 0.0, "heartbeat": 0.05}


@pytest.fixture
def folder():
    return f"memory://store-out-{uuid.uuid4().hex[:8]}/run"


def store(uri, **kwargs) -> StoreOutputDir:
    return StoreOutputDir(uri, lock_options=FAST, **kwargs)


def names(uri, below="") -> list[str]:
    root = storage.resolve(uri)
    return [f.relative_to(root) for f in root.join(below).files()] if below else [
        f.relative_to(root) for f in root.files()]


def test_a_remote_path_gets_the_store_folder(folder, tmp_path):
    assert isinstance(output_dir(folder), StoreOutputDir)
    assert not isinstance(output_dir(str(tmp_path)), StoreOutputDir)


def test_parts_are_committed_whole_and_the_manifest_is_last(folder, monkeypatch):
    seen = []
    real_check = ObjectStoreLock.check

    def check_and_look(self):
        # Called just before a part is copied into parts/: the part is staged, not yet listed.
        seen.append((names(folder, "parts") if storage.resolve(folder).join("parts").exists() else [],
                     names(folder, ".staging")))
        return real_check(self)

    monkeypatch.setattr(ObjectStoreLock, "check", check_and_look)
    out = store(folder, rows_per_part=3)
    resume = out.open(FP)
    assert resume.rows == 0 and names(folder) == [".lock", "job.json"]
    out.add(rows("in.parquet", range(0, 3)))
    out.add(rows("in.parquet", range(3, 5)))
    manifest = out.finish({"status": "complete"}, expected_rows={"in.parquet": 5})
    part_seen = [s for s in seen if s[1]]
    assert part_seen[0][0] == [] and part_seen[0][1][0].endswith("/part-00000.parquet")
    assert part_seen[1][0] == ["parts/part-00000.parquet"]
    assert names(folder) == ["job.json", "manifest.json", "parts/part-00000.parquet", "parts/part-00001.parquet"]
    assert [p["file"] for p in manifest["parts"]] == ["parts/part-00000.parquet", "parts/part-00001.parquet"]
    loc = storage.resolve(folder).join("parts")
    table = pq.read_table(loc.path, filesystem=loc.filesystem)
    assert sorted(table.column("source_row").to_pylist()) == [0, 1, 2, 3, 4]
    from pipeline.generate.answers import load_outputs

    assert sorted(r["source_row"] for r in load_outputs(folder)) == [0, 1, 2, 3, 4]
    again = store(folder)
    assert again.open(FP).complete and not again._lock.held


def test_a_killed_run_resumes_from_its_committed_parts(folder):
    out = store(folder, rows_per_part=2)
    out.open(FP)
    out.add(rows("in.parquet", range(0, 2)))
    # what a run killed while writing its next part leaves: a staged object, the lease
    staged = storage.resolve(folder).join(".staging", "dead", "part-00001.parquet")
    staged.write_bytes(b"half a part")
    out._lock._stop.set()  # a dead run beats no more; its record stays
    out._lock.token = None

    again = store(folder, rows_per_part=10)
    holder = json.loads(storage.resolve(folder).join(".lock").read_text())
    holder["heartbeat_at"] = time.time() - 3600
    storage.resolve(folder).join(".lock").write_text(json.dumps(holder))
    resume = again.open(FP)
    assert resume.done == {"in.parquet": {0, 1}} and not staged.exists()
    again.add(rows("in.parquet", range(2, 4)))
    manifest = again.finish({}, expected_rows={"in.parquet": 4})
    assert [p["file"] for p in manifest["parts"]] == ["parts/part-00000.parquet", "parts/part-00001.parquet"]


def test_a_second_writer_is_refused_while_the_first_holds_the_lease(folder):
    first = store(folder)
    first.open(FP)
    with pytest.raises(OutputError, match=r"is in use by another run of the job \(host .*pid"):
        store(folder).open(FP)
    first.close()
    assert not storage.resolve(folder).join(".lock").exists()
    with store(folder) as second:
        assert second.open(FP).rows == 0


def test_the_lease_of_a_dead_process_on_this_host_is_taken_at_once(folder):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket

    storage.resolve(folder).join(".lock").write_text(json.dumps(
        {"host": socket.gethostname(), "pid": int(dead.stdout), "token": "x", "heartbeat_at": time.time()}))
    with store(folder) as out:
        out.open(FP)
        assert out._lock.held


def test_a_run_that_lost_its_lease_commits_nothing_more(folder):
    out = store(folder, rows_per_part=2)
    out.open(FP)
    storage.resolve(folder).join(".lock").write_text(json.dumps(
        {"host": "elsewhere", "pid": 1, "token": "theirs", "heartbeat_at": time.time()}))
    with pytest.raises(JobFailure, match="no longer holds output.path .*another run took it \\(host elsewhere"):
        out.add(rows("in.parquet", range(0, 2)))
    assert not storage.resolve(folder).join("parts").files()
    out.close()
    assert storage.resolve(folder).join(".lock").exists()  # the other run's lease is left alone


def test_the_heartbeat_keeps_the_lease_fresh(folder):
    lock = ObjectStoreLock(storage.resolve(folder), settle=0.0, heartbeat=0.05, stale_after=0.5)
    with lock:
        first = json.loads(lock.file.read_text())["heartbeat_at"]
        time.sleep(0.3)
        assert json.loads(lock.file.read_text())["heartbeat_at"] > first
        lock.check()
    assert not lock.file.exists()


def test_overwrite_deletes_only_the_jobs_own_objects(folder):
    with store(folder, rows_per_part=1) as out:
        out.open(FP)
        out.add(rows("in.parquet", [0]))
        out.finish({}, expected_rows={"in.parquet": 1})
    storage.resolve(folder).join("notes.txt").write_text("mine")
    with store(folder, overwrite=True) as out:
        assert out.open({**FP, "config": {"model": "other"}}).rows == 0
    assert names(folder) == ["job.json", "notes.txt"]


def test_a_changed_job_and_foreign_outputs_are_refused(folder):
    with store(folder, rows_per_part=1) as out:
        out.open(FP)
        out.add(rows("in.parquet", [0]))
    with pytest.raises(OutputError, match="holds a job with other settings"):
        store(folder).open({**FP, "config": {"model": "other"}})
    storage.resolve(folder).join("job.json").delete()
    with pytest.raises(OutputError, match="is not this project's job output"):
        store(folder).open(FP)


def test_retry_reads_and_replaces_parts_on_a_store(folder):
    """retry=errors on an object store: the failed rows are found in the parts there, and a part
    is replaced whole (one PUT) with the redone rows in their place."""
    import pyarrow as pa

    from pipeline.generate.retry import replace_rows, rows_to_redo

    part = rows("in.parquet", range(3))
    part = part.append_column("id", pa.array(["a", "b", "c"])).set_column(
        part.schema.get_field_index("error"), "error", pa.array([None, "engine error: boom", None], pa.string()))
    with store(folder, rows_per_part=10) as out:
        out.open(FP)
        out.add(part)
        out.flush()
        paths = out.part_files()
    plan = rows_to_redo(paths, None)
    assert plan.ids == ["b"] and plan.sources == {"in.parquet": [1]}
    redone = part.slice(1, 1).set_column(part.schema.get_field_index("error"), "error", pa.array([None], pa.string()))
    assert replace_rows(plan, redone.set_column(redone.schema.get_field_index("response"), "response",
                                                pa.array(["fixed"]))) == 1
    loc = storage.resolve(paths[0])
    table = pq.read_table(loc.path, filesystem=loc.filesystem)
    assert table.column("id").to_pylist() == ["a", "b", "c"]
    assert table.column("response").to_pylist() == ["r0", "fixed", "r2"] and table.column("error").null_count == 3
