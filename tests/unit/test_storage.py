"""pipeline.storage on the local disk and on fsspec's in-memory filesystem (pure, no server)."""

from __future__ import annotations

import pickle

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import storage
from pipeline.storage import StorageError


def test_local_paths_and_file_uris_resolve_to_the_local_filesystem(tmp_path):
    (tmp_path / "a.parquet").write_bytes(b"x")
    for spec in (str(tmp_path / "a.parquet"), f"file://{tmp_path}/a.parquet"):
        loc = storage.resolve(spec)
        assert loc.is_local and loc.path == str(tmp_path / "a.parquet") and loc.is_file()


def test_shown_never_prints_credentials_or_query_values():
    assert storage.shown("s3://key:secret@bucket/data?endpoint_override=x&secret_key=y") == (
        "s3://bucket/data?endpoint_override=...&secret_key=..."
    )
    assert storage.shown("/tmp/x") == "/tmp/x"


def test_expand_file_folder_and_globs(tmp_path):
    for rel in ("d/a.parquet", "d/sub/b.parquet", "d/sub/c.txt", "d/x1.parquet", "d/x22.parquet"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    names = lambda locs: [loc.relative_to(storage.resolve(str(tmp_path / "d"))) for loc in locs]  # noqa: E731
    assert names(storage.expand(str(tmp_path / "d"))) == ["a.parquet", "sub/b.parquet", "x1.parquet", "x22.parquet"]
    assert names(storage.expand(str(tmp_path / "d" / "*.parquet"))) == ["a.parquet", "x1.parquet", "x22.parquet"]
    assert names(storage.expand(str(tmp_path / "d" / "**" / "*.parquet"))) == [
        "a.parquet", "sub/b.parquet", "x1.parquet", "x22.parquet"]
    assert names(storage.expand(str(tmp_path / "d" / "x?.parquet"))) == ["x1.parquet"]
    assert names(storage.expand(str(tmp_path / "d" / "[ax]*.parquet"))) == ["a.parquet", "x1.parquet", "x22.parquet"]


def test_expand_refuses_what_names_nothing(tmp_path):
    with pytest.raises(StorageError, match=r"input: .*missing.parquet' does not exist"):
        storage.expand(str(tmp_path / "missing.parquet"))
    with pytest.raises(StorageError, match="matches no file"):
        storage.expand(str(tmp_path / "*.parquet"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(StorageError, match=r"holds no \*.parquet file"):
        storage.expand(str(tmp_path / "empty"))


def test_an_unknown_scheme_names_the_setting_and_the_fix():
    with pytest.raises(StorageError) as err:
        storage.resolve("nosuchfs://bucket/x.parquet", setting="input")
    assert "input:" in str(err.value) and "nosuchfs://" in str(err.value)


def test_fsspec_filesystems_read_write_list_and_travel_by_uri():
    root = storage.resolve("memory://storage-test/run")
    pq.write_table(pa.table({"x": [1, 2, 3]}), root.join("in", "a.parquet").path, filesystem=root.filesystem)
    root.join("in", "notes.txt").write_text("hello")
    assert [f.relative_to(root) for f in storage.expand("memory://storage-test/run/in")] == ["in/a.parquet"]
    assert root.join("in", "notes.txt").read_text() == "hello"
    again = pickle.loads(pickle.dumps(root.join("in", "a.parquet")))
    assert again.uri == "memory://storage-test/run/in/a.parquet"
    assert pq.read_table(again.path, filesystem=again.filesystem).num_rows == 3
    root.join("in").delete()
    assert not root.join("in", "a.parquet").exists()


def test_local_writes_are_whole(tmp_path):
    loc = storage.resolve(str(tmp_path / "sub" / "m.json"))
    loc.write_text("{}")
    assert loc.read_text() == "{}" and sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["m.json"]


def test_uri_problems_are_found_without_opening_the_store():
    assert storage.uri_problem("s3://bucket/in", "input") is None
    assert storage.uri_problem("/local/path", "input") is None
    assert storage.uri_problem("memory://x/y", "output.path") is None
    for secret_uri in ("s3://AKIAX:hunter2@bucket/in", "s3://bucket/in?secret_key=hunter2",
                       "gs://bucket/in?token=hunter2"):
        problem = storage.uri_problem(secret_uri, "input")
        assert problem.startswith("input: ") and "holds credentials" in problem and "hunter2" not in problem
    assert "no filesystem is known for nosuchfs://" in storage.uri_problem("nosuchfs://b/x", "input")


def test_common_root_and_relative_names_are_store_independent():
    local = ["/data/in/a.parquet", "/data/in/sub/b.parquet"]
    remote = ["s3://bucket/in/a.parquet", "s3://bucket/in/sub/b.parquet"]
    assert storage.common_root(local) == "/data/in" and storage.common_root(remote) == "s3://bucket/in"
    assert [storage.relative_name(u, storage.common_root(local)) for u in local] == [
        storage.relative_name(u, storage.common_root(remote)) for u in remote] == ["a.parquet", "sub/b.parquet"]
    assert storage.common_root(["/a.parquet", "/x/b.parquet"]) == "/"


def test_a_scheme_whose_fsspec_package_is_missing_names_the_package():
    pytest.importorskip("fsspec")
    try:
        import adlfs  # noqa: F401
    except ImportError:
        assert "pip install adlfs" in storage.uri_problem("az://container/in", "input")
    else:
        pytest.skip("adlfs is installed here")
