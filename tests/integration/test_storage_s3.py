"""pipeline.storage against a real S3 protocol server (moto on 127.0.0.1), through pyarrow's own
S3 filesystem, configured only by the standard AWS environment."""

from __future__ import annotations

import pickle

import pyarrow as pa
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
