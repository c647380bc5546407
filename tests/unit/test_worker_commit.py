"""Parts committed by engine workers (`output.commit=workers`): named by the rows they hold, so a
batch done twice is committed once; the driver's ledger of entries, its exactly-once check, a
rerun resuming from named parts, leftovers and overwrite; the same on an object store (fsspec's
memory://; S3 in tests/integration/test_worker_commits.py); and which mode `auto` picks."""

from __future__ import annotations

import os
import pickle
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import storage
from pipeline.errors import JobFailure
from pipeline.generate.part_files import PART_FILE, batch_part_name, is_numbered, part_sort_key
from pipeline.generate.resources import commit_mode, resolve_resources
from pipeline.generate.settings import ConfigError, GenerationSettings
from pipeline.generate.sinks import OutputDir
from pipeline.generate.stats import RunStats, batch_counts
from pipeline.generate.store_output import StoreOutputDir
from pipeline.generate.worker_commit import MAX_BATCHES_PER_TASK, batches_per_task, ledger_table, read_ledger
from tests.conftest import compose
from tests.unit.test_sinks import FP, TMP_HEX, rows
from tests.unit.test_store_output import FAST


def answered(source: str, indices, text: str = "r", samples=None) -> pa.Table:
    """Output rows as an engine returns them: `rows`, with a `sample` column and a finish reason."""
    table = rows(source, indices)
    table = table.set_column(table.schema.get_field_index("response"), "response",
                             pa.array([f"{text}{i}" for i in indices], pa.string()))
    return table.append_column("sample", pa.array(samples or [0] * len(list(indices)), pa.int64()))


def test_a_part_is_named_by_the_rows_it_holds():
    name = batch_part_name(answered("a.parquet", [3, 1, 2]))
    assert PART_FILE.match(name) and not is_numbered(name)
    assert name == batch_part_name(answered("a.parquet", [1, 2, 3], text="other answers"))  # keys, not content
    assert name != batch_part_name(answered("a.parquet", [1, 2]))
    assert name != batch_part_name(answered("b.parquet", [1, 2, 3]))
    assert name != batch_part_name(answered("a.parquet", [1, 2, 3], samples=[1, 1, 1]))
    # numbered parts first, by index; then named ones, by name
    names = [name, "part-00010.parquet", "part-w" + "0" * 32 + ".parquet", "part-00002.parquet"]
    assert sorted(names, key=part_sort_key) == ["part-00002.parquet", "part-00010.parquet",
                                                "part-w" + "0" * 32 + ".parquet", name]


def test_a_batch_committed_twice_leaves_one_part_described_as_it_is_on_disk(tmp_path):
    out = OutputDir(str(tmp_path))
    out.open(FP)
    committer = pickle.loads(pickle.dumps(out.committer()))  # as Ray ships it to a worker
    first = committer.commit(answered("in.parquet", range(4)), node="n1")
    name = first["file"].split("/")[1]
    assert first == {"file": f"parts/{name}", "rows": 4, "covers": {"in.parquet": [[0, 3]]}, "node": "n1",
                     "counts": {"rows": 4, "errors": 0, "prompt_tokens": 4, "completion_tokens": 8,
                                "tool_parse": {}, "finish_reasons": {"stop": 4}}}
    # Ray redoes the batch (its worker died after committing): a different answer, same rows.
    redone = answered("in.parquet", range(4), text="again").set_column(
        5, "completion_tokens", pa.array([5] * 4, pa.int64()))
    again = committer.commit(redone, node="n2")
    assert os.listdir(tmp_path / "parts") == [name]
    assert pq.read_table(tmp_path / "parts" / name)["response"].to_pylist() == ["r0", "r1", "r2", "r3"]
    assert again["counts"] == first["counts"] and again["file"] == first["file"] and again["node"] == "n2"
    out.close()


def test_a_worker_commits_nothing_once_its_driver_let_go_of_the_folder(tmp_path):
    """A worker can outlive its killed driver by seconds: it must not commit into a folder that
    no run holds, nor into one a rerun has taken."""
    out = OutputDir(str(tmp_path))
    out.open(FP)
    committer = out.committer()
    out.close()
    with pytest.raises(JobFailure, match="no longer holds"):
        committer.commit(answered("in.parquet", range(2)))
    rerun = OutputDir(str(tmp_path))
    rerun.open(FP)
    with pytest.raises(JobFailure, match="another run took it"):
        committer.commit(answered("in.parquet", range(2)))
    assert os.listdir(tmp_path / "parts") == []  # no part, no temporary file
    assert rerun.committer().commit(answered("in.parquet", range(2)))["rows"] == 2
    rerun.close()


def test_the_driver_records_entries_once_and_checks_them_before_the_manifest(tmp_path):
    out = OutputDir(str(tmp_path), rows_per_part=2)
    out.open(FP)
    committer = out.committer()
    entries = [committer.commit(answered("in.parquet", r), node="n") for r in (range(0, 3), range(3, 5))]
    taken = read_ledger(ledger_table(entries + entries[:1]))  # the first entry delivered twice
    stats = RunStats(total_rows=5)
    for entry in taken:
        if out.record(entry):
            stats.add_counts(entry["counts"], node=entry["node"])
    assert stats.rows == 5 and stats.nodes == {"n": 5} and stats.completion_tokens == 10
    manifest = out.finish({"status": "complete"}, expected_rows={"in.parquet": 5})
    assert [p["file"] for p in manifest["parts"]] == sorted(e["file"] for e in entries)
    assert all(set(p) == {"file", "rows", "covers"} for p in manifest["parts"])
    assert pq.read_table(tmp_path / "parts").num_rows == 5


def test_a_missing_batch_stops_the_job_without_a_manifest(tmp_path):
    out = OutputDir(str(tmp_path))
    out.open(FP)
    out.record(out.committer().commit(answered("in.parquet", range(3))))
    with pytest.raises(Exception, match="rows 3-4 missing"):
        out.finish({}, expected_rows={"in.parquet": 5})
    assert not (tmp_path / "manifest.json").exists()


def test_a_rerun_resumes_from_named_parts_and_removes_their_leftovers(tmp_path):
    out = OutputDir(str(tmp_path))
    out.open(FP)
    out.committer().commit(answered("in.parquet", range(3)))  # the driver died before recording it
    out.close()
    leftover = tmp_path / "parts" / f".part-w{TMP_HEX}.parquet.tmp-{TMP_HEX}"
    leftover.write_bytes(b"half a part")
    again = OutputDir(str(tmp_path), rows_per_part=10)
    resume = again.open(FP)
    assert resume.rows == 3 and resume.done == {"in.parquet": {0, 1, 2}} and not leftover.exists()
    again.add(rows("in.parquet", range(3, 5)))  # the rest, committed by the driver this time
    manifest = again.finish({}, expected_rows={"in.parquet": 5})
    assert [p["file"] for p in manifest["parts"]][0] == "parts/part-00000.parquet"  # numbered first
    with OutputDir(str(tmp_path), overwrite=True) as fresh:
        fresh.open(FP)
        assert os.listdir(tmp_path / "parts") == []


@pytest.fixture
def store_folder():
    return f"memory://worker-commit-{uuid.uuid4().hex[:8]}/run"


def test_on_a_store_a_batch_is_committed_once_and_nothing_stays_staged(store_folder):
    out = StoreOutputDir(store_folder, lock_options=FAST)
    out.open(FP)
    committer = pickle.loads(pickle.dumps(out.committer()))
    first = committer.commit(answered("in.parquet", range(4)))
    again = committer.commit(answered("in.parquet", range(4), text="again"))
    assert again["file"] == first["file"] and again["counts"] == first["counts"]
    root = storage.resolve(store_folder)
    assert [f.relative_to(root) for f in root.join("parts").files()] == [first["file"]]
    assert not root.join(".staging").files()
    out.record(first)
    # what a worker that died while staging leaves behind is gone before the manifest is written
    root.join(".staging", committer.token, f"{first['file'].split('/')[1]}.0123").write_bytes(b"half")
    manifest = out.finish({}, expected_rows={"in.parquet": 4})
    assert [p["file"] for p in manifest["parts"]] == [first["file"]]
    assert not root.join(".staging").files()


def test_on_a_store_a_worker_commits_nothing_once_the_driver_lost_the_lease(store_folder):
    out = StoreOutputDir(store_folder, lock_options=FAST)
    out.open(FP)
    committer = out.committer()
    committer.token = uuid.uuid4().hex  # another run's lease
    with pytest.raises(JobFailure, match="no longer holds"):
        committer.commit(answered("in.parquet", range(2)))
    assert not storage.resolve(store_folder).join("parts").files()
    out.close()


def test_batch_counts_are_what_run_stats_adds():
    batch = answered("in.parquet", range(3))
    direct, counted = RunStats(total_rows=3), RunStats(total_rows=3)
    direct.add(batch, node="n")
    counted.add_counts(batch_counts(batch), node="n")
    assert direct.counts() == counted.counts() and direct.tokens() == counted.tokens()
    assert direct.nodes == counted.nodes == {"n": 3}


@pytest.mark.parametrize("commit, device, nodes, output, expected", [
    ("auto", "cpu", 1, "/out", "driver"),           # CPU on one machine: the driver keeps up
    ("auto", "gpu", 1, "/out", "workers"),          # GPU engines, one node: the folder is local to all
    ("auto", "gpu", 2, "s3://b/out", "workers"),    # an object store every node reaches
    ("auto", "cpu", 3, "s3://b/out", "workers"),
    ("auto", "gpu", 2, "/out", "driver"),           # a local folder, several nodes: not safe
    ("workers", "gpu", 2, "/out", "workers"),       # unless asked for (a shared folder)
    ("driver", "gpu", 1, "s3://b/out", "driver"),
])
def test_auto_commits_on_the_workers_where_it_pays_and_is_safe(commit, device, nodes, output, expected):
    assert commit_mode(commit, device, nodes, output) == expected


def test_the_commit_setting_is_checked_and_resolved():
    with pytest.raises(ConfigError, match=r"output.commit: must be auto, driver or workers \(got 'nodes'\)"):
        GenerationSettings.from_config(compose("generate", ["output.commit=nodes"]))
    tiny = GenerationSettings.from_config(compose("generate", ["model=tiny"]))
    assert tiny.output.commit == "auto" and resolve_resources(tiny, 0, 2, 2).commit == "driver"
    h100 = GenerationSettings.from_config(compose("generate", ["hardware=h100"]))
    assert h100.output.commit == "workers" and resolve_resources(h100, 8, 128, 64, nodes=2).commit == "workers"


def test_a_batch_already_committed_is_found_before_it_is_generated_again(tmp_path):
    out = OutputDir(str(tmp_path))
    out.open(FP)
    committer = out.committer()
    name = batch_part_name(answered("in.parquet", range(3)))
    assert committer.committed(name) is None
    entry = committer.commit(answered("in.parquet", range(3)), node="n")
    assert committer.committed(name, node="n") == entry
    out.close()


def test_tasks_hold_several_batches_only_where_every_engine_slot_still_gets_several():
    # 1,000,000 rows, 8 engines of 5 batches of 256 in flight: tasks of 16 batches (the cap)
    assert batches_per_task(1_000_000, 256, 5, 8) == MAX_BATCHES_PER_TASK
    # 100,000 rows on the same engines: 100,000 // (256 x 5 x 8 x 4) = 2 batches a task
    assert batches_per_task(100_000, 256, 5, 8) == 2
    assert batches_per_task(240, 20, 14, 1) == 1  # a small job: one batch a task, as with driver commits
    assert batches_per_task(0, 64, 5, 1) == 1


def test_retry_errors_finds_and_replaces_rows_in_worker_named_parts(tmp_path):
    """retry=errors runs on the driver over whatever parts the folder holds, named ones included."""
    from pipeline.generate.retry import replace_rows, rows_to_redo

    out = OutputDir(str(tmp_path))
    out.open(FP)
    failed = answered("in.parquet", range(3)).append_column("id", pa.array(["a", "b", "c"]))
    failed = failed.set_column(failed.schema.get_field_index("error"), "error",
                               pa.array([None, "engine error: boom", None], pa.string()))
    entry = out.committer().commit(failed)
    out.close()
    plan = rows_to_redo(out.part_files(), None)
    assert plan.ids == ["b"] and list(plan.by_part) == [str(tmp_path / entry["file"])]
    redone = failed.slice(1, 1).set_column(failed.schema.get_field_index("error"), "error", pa.array([None], pa.string()))
    assert replace_rows(plan, redone) == 1
    assert pq.read_table(tmp_path / entry["file"])["error"].to_pylist() == [None, None, None]
    assert os.listdir(tmp_path / "parts") == [entry["file"].split("/")[1]]
