"""The output folder: only its own files are ever deleted, one writer at a time, parts never
written over, every planned row committed exactly once, damaged files named."""

from __future__ import annotations

import fcntl
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import UserError
from pipeline.generate.sinks import OutputDir, OutputError

FP = {"config": {"model": "tiny"}, "inputs": {"in.parquet": "abc"}}
TMP_HEX = "0123456789abcdef0123456789abcdef"


def rows(source: str, indices) -> pa.Table:
    indices = list(indices)
    n = len(indices)
    return pa.table(
        {
            "source_file": pa.array([source] * n, pa.string()),
            "source_row": pa.array(indices, pa.int64()),
            "response": pa.array([f"r{i}" for i in indices], pa.string()),
            "error": pa.array([None] * n, pa.string()),
            "prompt_tokens": pa.array([1] * n, pa.int64()),
            "completion_tokens": pa.array([2] * n, pa.int64()),
            "finish_reason": pa.array(["stop"] * n, pa.string()),
            "tool_parse": pa.array([None] * n, pa.string()),
        }
    )


def opened(path, **kwargs) -> OutputDir:
    out = OutputDir(str(path), **kwargs)
    out.open(FP)
    return out


def lock_is_free(path) -> bool:
    fd = os.open(os.path.join(path, ".lock"), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def finished_job(path, parts=((0, 2), (2, 4))) -> None:
    """A complete job in `path`: one part per (start, stop) range of in.parquet's rows."""
    with OutputDir(str(path), rows_per_part=10**6) as out:
        out.open(FP)
        for start, stop in parts:
            out.add(rows("in.parquet", range(start, stop)))
            out.flush()
        out.finish({"status": "complete"}, expected_rows={"in.parquet": parts[-1][1]})


# -- cleanup: only this module's own leftovers ----------------------------------------------------


def test_open_keeps_user_files_named_like_tmp_files(tmp_path):
    for name in ("draft.tmp-1", ".vimrc.tmp-2", "keep.txt", f".notes.txt.tmp-{TMP_HEX}"):
        (tmp_path / name).write_text("mine")
    (tmp_path / "backup.tmp-old").mkdir()
    (tmp_path / f".job.json.tmp-{TMP_HEX}").mkdir()  # a folder with our name is not ours either
    with OutputDir(str(tmp_path)) as out:
        out.open(FP)
    for name in ("draft.tmp-1", ".vimrc.tmp-2", "keep.txt", f".notes.txt.tmp-{TMP_HEX}"):
        assert (tmp_path / name).read_text() == "mine"
    assert (tmp_path / "backup.tmp-old").is_dir()
    assert (tmp_path / f".job.json.tmp-{TMP_HEX}").is_dir()


def test_open_removes_own_leftovers_only(tmp_path):
    finished = opened(tmp_path)
    finished.close()
    parts = tmp_path / "parts"
    ours = [parts / f".part-00001.parquet.tmp-{TMP_HEX}", tmp_path / f".manifest.json.tmp-{TMP_HEX}"]
    theirs = [
        parts / f".part-1.parquet.tmp-{TMP_HEX}",  # fewer than five digits
        parts / f".part-00001.parquet.tmp-{TMP_HEX.upper()}",
        parts / "part-00001.parquet.tmp-x",
        tmp_path / f".part-00001.parquet.tmp-{TMP_HEX}",  # a part leftover belongs in parts/
    ]
    for path in ours + theirs:
        path.write_text("x")
    target = tmp_path / "target.txt"
    target.write_text("linked")
    os.symlink(target, parts / f".part-00002.parquet.tmp-{TMP_HEX}")
    with OutputDir(str(tmp_path)) as out:
        out.open(FP)
    assert not any(p.exists() for p in ours)
    assert all(p.exists() for p in theirs)
    assert os.path.islink(parts / f".part-00002.parquet.tmp-{TMP_HEX}") and target.read_text() == "linked"


# -- overwrite -------------------------------------------------------------------------------------


def test_overwrite_refuses_a_folder_that_is_not_a_job(tmp_path):
    (tmp_path / "parts").mkdir()
    (tmp_path / "parts" / "part-00000.parquet").write_text("someone else's")
    (tmp_path / "manifest.json").write_text("{}")
    for overwrite in (True, False):
        with pytest.raises(OutputError) as info:
            OutputDir(str(tmp_path), overwrite=overwrite).open(FP)
        text = str(info.value)
        assert "not this project's job output" in text and "choose another output.path or remove those files" in text
    assert (tmp_path / "parts" / "part-00000.parquet").read_text() == "someone else's"
    assert (tmp_path / "manifest.json").exists()


def test_overwrite_deletes_only_the_jobs_files(tmp_path):
    finished_job(tmp_path)
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "run.log").write_text("log")
    (tmp_path / "keep.txt").write_text("keep")
    (tmp_path / "parts" / "notes.md").write_text("notes")
    (tmp_path / "parts" / f".part-00009.parquet.tmp-{TMP_HEX}").write_text("leftover")
    (tmp_path / "report.html").write_text("the previous job's page")
    with OutputDir(str(tmp_path), overwrite=True) as out:
        resume = out.open({**FP, "config": {"model": "other"}})
        assert not resume.complete and resume.rows == 0
    assert not (tmp_path / "manifest.json").exists() and not (tmp_path / "report.html").exists()
    assert json.loads((tmp_path / "job.json").read_text())["fingerprint"]["config"] == {"model": "other"}
    assert sorted(os.listdir(tmp_path / "parts")) == ["notes.md"]
    assert (tmp_path / "logs" / "run.log").read_text() == "log"
    assert (tmp_path / "keep.txt").read_text() == "keep"


@pytest.mark.parametrize("overwrite", [False, True])
def test_parts_symlink_is_refused(tmp_path, overwrite):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "part-00000.parquet").write_text("precious")
    out_dir = tmp_path / "out"
    finished_job(out_dir)
    for name in os.listdir(out_dir / "parts"):
        os.remove(out_dir / "parts" / name)
    os.rmdir(out_dir / "parts")
    os.symlink(elsewhere, out_dir / "parts")
    with pytest.raises(OutputError) as info:
        OutputDir(str(out_dir), overwrite=overwrite).open(FP)
    assert f"'{out_dir / 'parts'}' is a symlink" in str(info.value)
    assert (elsewhere / "part-00000.parquet").read_text() == "precious"
    assert os.listdir(elsewhere) == ["part-00000.parquet"]


def test_parts_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "parts").write_text("not a folder")
    with pytest.raises(OutputError, match="is not a folder"):
        OutputDir(str(tmp_path)).open(FP)


@pytest.mark.parametrize("value", ["no", "false", 0, 1, None])
def test_overwrite_must_be_a_bool(tmp_path, value):
    with pytest.raises(OutputError) as info:
        OutputDir(str(tmp_path), overwrite=value)
    assert str(info.value) == f"output.overwrite: must be true or false (got {value!r})"
    # a UserError, whose single problem is the whole message: the entry points print it as is
    assert isinstance(info.value, UserError) and info.value.problems == [str(info.value)]


# -- one writer per folder (the lock itself: test_folder_lock.py) ---------------------------------


def test_second_writer_is_refused_with_the_holder(tmp_path):
    first = opened(tmp_path)
    holder = json.loads((tmp_path / ".lock").read_text())
    assert holder["pid"] == os.getpid() and holder["host"] and holder["started_at"]
    with pytest.raises(OutputError) as info:
        OutputDir(str(tmp_path)).open(FP)
    text = str(info.value)
    assert f"output.path '{tmp_path}' is in use by another run of the job" in text
    assert f"pid {os.getpid()}" in text and "wait for it to finish or stop it" in text
    first.close()
    first.close()  # idempotent
    second = opened(tmp_path)
    second.close()


def test_lock_is_taken_before_anything_is_deleted(tmp_path):
    first = opened(tmp_path)
    leftover = tmp_path / "parts" / f".part-00000.parquet.tmp-{TMP_HEX}"
    leftover.write_text("being written by the first run")
    with pytest.raises(OutputError, match="in use"):
        OutputDir(str(tmp_path), overwrite=True).open(FP)
    assert leftover.exists() and (tmp_path / "job.json").exists()
    first.close()


def test_lock_released_by_finish_context_and_failed_open(tmp_path):
    out = opened(tmp_path)
    out.add(rows("in.parquet", range(3)))
    out.finish({"status": "complete"})
    with OutputDir(str(tmp_path)) as again:
        assert again.open(FP).complete  # a complete job releases the lock at once
        assert lock_is_free(tmp_path)
    with OutputDir(str(tmp_path / "ctx")) as ctx:
        ctx.open(FP)
    opened(tmp_path / "ctx").close()
    with pytest.raises(OutputError, match="other settings"):
        OutputDir(str(tmp_path / "ctx")).open({**FP, "config": {"model": "other"}})
    opened(tmp_path / "ctx").close()  # the refused open did not keep the lock


# -- part names (publishing itself: test_part_files.py) -------------------------------------------


def test_part_indices_go_past_99999(tmp_path):
    out = opened(tmp_path, rows_per_part=1)
    out.parts.append({"file": "parts/part-99999.parquet", "rows": 0, "covers": {}})
    out.add(rows("in.parquet", [0]))
    out.add(rows("in.parquet", [1]))
    assert sorted(os.listdir(tmp_path / "parts")) == ["part-100000.parquet", "part-100001.parquet"]
    assert pq.read_table(tmp_path / "parts" / "part-100000.parquet")["source_row"].to_pylist() == [0]
    assert pq.read_table(tmp_path / "parts" / "part-100001.parquet")["source_row"].to_pylist() == [1]
    manifest = out.finish({})
    files = [p["file"] for p in manifest["parts"]]
    assert files == ["parts/part-99999.parquet", "parts/part-100000.parquet", "parts/part-100001.parquet"]


def test_part_files_sort_numerically_and_resume_continues(tmp_path):
    parts = tmp_path / "parts"
    out = opened(tmp_path)
    out.close()
    for index, row in ((99999, 0), (100000, 1)):
        pq.write_table(rows("in.parquet", [row]), parts / f"part-{index:05d}.parquet")
    (parts / "part-x.parquet.bak").write_text("not a part")
    out = opened(tmp_path)
    assert [os.path.basename(p) for p in out.part_files()] == ["part-99999.parquet", "part-100000.parquet"]
    out.add(rows("in.parquet", [2]))
    manifest = out.finish({}, expected_rows={"in.parquet": 3})
    assert [p["file"] for p in manifest["parts"]][-1] == "parts/part-100001.parquet"


def test_existing_file_at_the_next_name_is_not_overwritten(tmp_path):
    out = opened(tmp_path)
    (tmp_path / "parts" / "part-00000.parquet").write_text("not ours")
    out.add(rows("in.parquet", [0]))
    out.flush()
    assert (tmp_path / "parts" / "part-00000.parquet").read_text() == "not ours"
    assert out.parts[-1]["file"] == "parts/part-00001.parquet"
    out.close()


def test_a_name_taken_after_the_index_was_chosen_is_skipped(tmp_path, monkeypatch):
    out = opened(tmp_path)
    (tmp_path / "parts" / "part-00000.parquet").write_text("not ours")
    monkeypatch.setattr(OutputDir, "_next_index", lambda self: 0)
    out.add(rows("in.parquet", [0]))
    out.flush()
    assert (tmp_path / "parts" / "part-00000.parquet").read_text() == "not ours"
    assert out.parts[-1]["file"] == "parts/part-00001.parquet"
    assert sorted(os.listdir(tmp_path / "parts")) == ["part-00000.parquet", "part-00001.parquet"]
    out.close()


# -- exactly once (the check itself: test_coverage.py) --------------------------------------------


def test_finish_with_exact_coverage_writes_the_manifest(tmp_path):
    out = opened(tmp_path, rows_per_part=4)
    out.add(rows("in.parquet", range(0, 6)))
    out.add(rows("b.parquet", [2, 0, 1]))
    out.add(rows("in.parquet", range(6, 10)))
    manifest = out.finish({"status": "complete"}, expected_rows={"in.parquet": 10, "b.parquet": 3})
    on_disk = json.loads((tmp_path / "manifest.json").read_text())
    assert on_disk["parts"] == manifest["parts"] and manifest["status"] == "complete"
    assert lock_is_free(tmp_path)


def test_finish_refuses_missing_rows(tmp_path):
    out = opened(tmp_path)
    out.add(rows("in.parquet", range(0, 100)))
    with pytest.raises(OutputError) as info:
        out.finish({}, expected_rows={"in.parquet": 200})
    assert "in.parquet: rows 100-199 missing" in str(info.value)
    assert not (tmp_path / "manifest.json").exists()
    opened(tmp_path).close()  # the failed finish released the lock


def test_finish_refuses_rows_committed_twice(tmp_path):
    out = opened(tmp_path)
    out.add(rows("in.parquet", range(0, 10)))
    out.flush()
    out.add(rows("in.parquet", range(5, 12)))
    with pytest.raises(OutputError) as info:
        out.finish({}, expected_rows={"in.parquet": 12})
    assert "in.parquet: rows 5-9 committed 2 times" in str(info.value)
    assert not (tmp_path / "manifest.json").exists()


def test_finish_lists_at_most_ten_problems(tmp_path):
    out = opened(tmp_path)
    out.add(rows("in.parquet", range(0, 100, 2)))
    with pytest.raises(OutputError) as info:
        out.finish({}, expected_rows={"in.parquet": 100})
    lines = [line for line in str(info.value).splitlines() if line.startswith("  - ")]
    assert len(lines) == 11 and lines[-1] == "  - ... and 40 more"


# -- damaged files ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content, problem",
    [("{not json", "cannot be read"), ("[1, 2]", "is not a JSON object"), ('{"created_at": "x"}', 'has no "fingerprint"')],
)
def test_damaged_job_file(tmp_path, content, problem):
    (tmp_path / "job.json").write_text(content)
    with pytest.raises(OutputError) as info:
        OutputDir(str(tmp_path)).open(FP)
    text = str(info.value)
    assert f"'{tmp_path / 'job.json'}' {problem}" in text and "output.overwrite=true" in text
    with OutputDir(str(tmp_path), overwrite=True) as out:  # a folder with a job.json: replaced
        out.open(FP)
    assert json.loads((tmp_path / "job.json").read_text())["fingerprint"] == FP


def test_damaged_manifest(tmp_path):
    finished_job(tmp_path)
    (tmp_path / "manifest.json").write_text('{"status": "comp')
    with pytest.raises(OutputError) as info:
        OutputDir(str(tmp_path)).open(FP)
    assert f"'{tmp_path / 'manifest.json'}' cannot be read" in str(info.value)


def test_complete_job_with_missing_parts(tmp_path):
    finished_job(tmp_path, parts=((0, 1), (1, 2), (2, 3), (3, 4)))
    os.remove(tmp_path / "parts" / "part-00001.parquet")
    os.remove(tmp_path / "parts" / "part-00003.parquet")
    with pytest.raises(OutputError) as info:
        OutputDir(str(tmp_path)).open(FP)
    assert str(info.value) == (
        f"output.path '{tmp_path}': manifest.json lists 2 part(s) that are missing "
        "(parts/part-00001.parquet, parts/part-00003.parquet); the output is damaged: "
        "set output.overwrite=true to regenerate it"
    )
    assert lock_is_free(tmp_path)
    assert sorted(os.listdir(tmp_path / "parts")) == ["part-00000.parquet", "part-00002.parquet"]


def test_damaged_part_is_named(tmp_path):
    out = opened(tmp_path)
    out.add(rows("in.parquet", [0]))
    out.flush()
    out.close()
    (tmp_path / "parts" / "part-00001.parquet").write_text("garbage")
    with pytest.raises(OutputError) as info:
        OutputDir(str(tmp_path)).open(FP)
    assert f"'{tmp_path / 'parts' / 'part-00001.parquet'}' cannot be read" in str(info.value)


def test_resume_reads_committed_rows_and_stats(tmp_path):
    out = opened(tmp_path)
    out.add(rows("in.parquet", [0, 1, 3]))
    out.flush()
    out.close()
    with OutputDir(str(tmp_path)) as again:
        resume = again.open(FP)
        assert resume.rows == 3 and resume.skip_for("in.parquet") == frozenset({0, 1, 3})
        assert sum(t.num_rows for t in again.committed_stats_tables()) == 3
        assert again.parts == [{"file": "parts/part-00000.parquet", "rows": 3, "covers": {"in.parquet": [[0, 1], [3, 3]]}}]
