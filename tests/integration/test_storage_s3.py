"""pipeline.storage against a real S3 protocol server (moto on 127.0.0.1), through pyarrow's own
S3 filesystem, configured only by the standard AWS environment."""

from __future__ import annotations

import pickle

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from pipeline import storage
from pipeline.storage import StorageError


def test_s3_files_are_listed_read_and_written(s3_bucket):
    root = storage.resolve(f"s3://{s3_bucket}/data")
    assert not root.is_local
    for name in ("a.parquet", "sub/b.parquet"):
        loc = root.join(name)
        pq.write_table(pa.table({"x": [1, 2]}), loc.path, filesystem=loc.filesystem)
    root.join("sub", "readme.txt").write_text("not data")
    found = storage.expand(f"s3://{s3_bucket}/data")
    assert [f.uri for f in found] == [f"s3://{s3_bucket}/data/a.parquet", f"s3://{s3_bucket}/data/sub/b.parquet"]
    assert [f.relative_to(root) for f in storage.expand(f"s3://{s3_bucket}/data/*.parquet")] == ["a.parquet"]
    assert [f.relative_to(root) for f in storage.expand(f"s3://{s3_bucket}/data/**/*.parquet")] == [
        "a.parquet", "sub/b.parquet"]
    moved = pickle.loads(pickle.dumps(found[1]))
    assert pq.read_table(moved.path, filesystem=moved.filesystem).column("x").to_pylist() == [1, 2]
    assert root.join("sub", "readme.txt").read_text() == "not data"


def test_missing_buckets_and_keys_are_refused_with_the_uri(s3_server):
    with pytest.raises(StorageError, match=r"input: 's3://no-such-bucket-here/x.parquet' does not exist"):
        storage.expand("s3://no-such-bucket-here/x.parquet")


def test_planning_takes_each_objects_size_and_time_from_the_listing(s3_server, tmp_path, monkeypatch):
    """Planning a folder of objects costs the listing and one read of each object's footer: in
    the request log of an S3 server of its own, no object is asked for its metadata, neither to
    learn its size before reading its footer nor to fingerprint it (its size and write time come
    from the listing). The listing's size and time are the store's metadata request's, so the same
    object named on its own (one lookup) plans to the same fingerprint."""
    import re
    import time
    from collections import Counter

    import boto3
    import httpx

    from pipeline.generate.planning import file_fingerprint, plan_shards
    from tests.conftest import moto_s3_server

    log = tmp_path / "requests.log"
    with moto_s3_server(log=log) as endpoint:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)  # the session's credentials, this server
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="listed")
        root = storage.resolve("s3://listed/in")
        names = [f"part-{i}.parquet" for i in range(3)]
        for i, name in enumerate(names):
            loc = root.join(name)
            pq.write_table(pa.table({"prompt": [f"p{j}" for j in range(i + 1)]}), loc.path, filesystem=loc.filesystem)
        start = log.stat().st_size
        plan = plan_shards("s3://listed/in")
        httpx.get(f"{endpoint}/moto-api/?planned", timeout=5)  # the last line planning's requests precede
        deadline = time.monotonic() + 10
        while "?planned" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        lines = log.read_bytes()[start:].decode()
        requests = Counter(re.findall(r'"(?:\x1b\[[0-9;]*m)*(HEAD|GET) /listed/in/(\S+) HTTP', lines))
        assert all(requests["GET", name] >= 1 for name in names), lines  # each footer was read
        assert not any(requests["HEAD", name] for name in names), lines
        listing = {i.base_name: i for i in root.filesystem.get_file_info(pafs.FileSelector(root.path))}
        assert plan.fingerprints == {
            name: f"{i + 1}:store:{listing[name].size}:{listing[name].mtime_ns}" for i, name in enumerate(names)}
        alone = plan_shards("s3://listed/in/part-1.parquet").fingerprints
        assert alone == {"part-1.parquet": plan.fingerprints["part-1.parquet"]}
        assert file_fingerprint("s3://listed/in/part-1.parquet", 2) == plan.fingerprints["part-1.parquet"]
