"""The generation job with its input and output on S3 (moto's S3 server on 127.0.0.1, reached
through pyarrow's own S3 filesystem configured by the standard AWS_* environment): the same rows
as from a local disk, read back with pyarrow and pandas; a killed run resumed to exactly-once
identical rows while a reader lists the parts; bad URIs and buckets refused before anything runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from pipeline.errors import UserError
from pipeline.generate.sinks import OutputError
from tests.integration.test_faults import ROOT, content, job_command, requests

pytestmark = pytest.mark.integration
ROWS = 120


def s3() -> pafs.S3FileSystem:
    return pafs.S3FileSystem(endpoint_override=os.environ["AWS_ENDPOINT_URL"])


def listing(bucket: str, prefix: str) -> list[str]:
    infos = s3().get_file_info(pafs.FileSelector(f"{bucket}/{prefix}", recursive=True, allow_not_found=True))
    return sorted(i.path[len(bucket) + 1:] for i in infos if i.type == pafs.FileType.File)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """The same two Parquet files on the local disk and (per test) in a bucket."""
    local = tmp_path_factory.mktemp("s3-inputs") / "in"
    (local / "more").mkdir(parents=True)
    batch = requests(ROWS, max_tokens=6)
    pq.write_table(pa.Table.from_pylist(batch[:80]), local / "a.parquet", row_group_size=20)
    pq.write_table(pa.Table.from_pylist(batch[80:]), local / "more" / "b.parquet", row_group_size=20)
    return local


@pytest.fixture(scope="module")
def reference(inputs, ray_session, tiny_model_dir, tmp_path_factory):
    """The rows of the job on the local disk, which every run on S3 must give again."""
    from pipeline.generate.job import run
    from tests.conftest import compose

    out = tmp_path_factory.mktemp("s3-reference") / "out"
    manifest = run(compose("generate", ["model=tiny", f"model.path={tiny_model_dir}", f"input={inputs}",
                                        f"output.path={out}", "engine.kv_cache_gib=0.25", "ray.shutdown=false",
                                        "progress=false"]))
    return {"rows": content(pq.read_table(out / "parts").to_pylist()), "fingerprints": manifest["inputs"]["fingerprints"]}


def upload(inputs, bucket: str) -> str:
    fs = s3()
    for path in sorted(inputs.rglob("*.parquet")):
        with open(path, "rb") as src, fs.open_output_stream(f"{bucket}/in/{path.relative_to(inputs)}") as dst:
            dst.write(src.read())
    return f"s3://{bucket}/in"


def kill_once_parts_appear(model_dir, src: str, bucket: str, overrides, part_rows: int, parts: int,
                           total_rows: int) -> list[str]:
    """Start the job from `src` into s3://<bucket>/out in a session of its own, and kill it with
    everything it started once `parts` parts are in out/parts, while a reader lists the folder:
    every part it ever sees must be whole (`part_rows` rows, readable). The ids committed by
    then: some, not all `total_rows`, and no manifest."""
    proc = subprocess.Popen(job_command(model_dir, src, f"s3://{bucket}/out", *overrides), cwd=ROOT,
                            env={**os.environ, "RAY_ADDRESS": "local"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    seen, bad = set(), []

    def read_parts_while_running():
        while proc.poll() is None:
            for name in listing(bucket, "out/parts"):
                if name in seen:
                    continue
                try:
                    whole = name.startswith("out/parts/part-") and pq.read_table(f"s3://{bucket}/{name}").num_rows == part_rows
                except Exception as exc:  # noqa: BLE001 - anything unreadable is the failure
                    whole, name = False, f"{name}: {exc}"
                (seen.add if whole else bad.append)(name)
            time.sleep(0.05)

    reader = threading.Thread(target=read_parts_while_running, daemon=True)
    reader.start()
    deadline = time.time() + 300
    while time.time() < deadline and len(seen) < parts:
        assert proc.poll() is None, "the job ended before it could be interrupted"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started
    proc.wait()
    reader.join(timeout=30)
    assert seen and not bad, bad
    committed = pq.read_table(f"s3://{bucket}/out/parts").column("id").to_pylist()
    assert 0 < len(committed) < total_rows and "out/manifest.json" not in listing(bucket, "out")
    return committed


def test_a_killed_run_on_s3_resumes_to_the_local_rows_exactly_once(generate_job, inputs, reference, s3_bucket,
                                                                   tiny_model_dir):
    """Input and output only in S3: a run killed mid-job (its whole process group, as in
    test_faults) and rerun gives every row once, with the ids, seeds and answers of the same
    files on a local disk; a reader listing <out>/parts meanwhile only ever sees whole parts."""
    src, out = upload(inputs, s3_bucket), f"s3://{s3_bucket}/out"
    overrides = ("output.rows_per_part=10", "batch_size=10")
    committed = kill_once_parts_appear(tiny_model_dir, src, s3_bucket, overrides, part_rows=10, parts=2,
                                       total_rows=ROWS)

    manifest, _ = generate_job(src, *overrides, output=out)  # the dead run's lease is taken at once
    assert manifest["status"] == "complete" and manifest["counts"]["rows_in"] == ROWS
    assert manifest["counts"]["rows_resumed"] >= len(committed)
    assert manifest["counts"]["rows_generated"] == ROWS - manifest["counts"]["rows_resumed"]
    table = pq.read_table(f"s3://{s3_bucket}/out/parts")
    assert table.num_rows == len(set(table.column("id").to_pylist())) == ROWS
    assert content(table.to_pylist()) == reference["rows"]
    # The same files, row counts and ids as on the local disk; each object identified by the store's
    # metadata (size and write time), not by reading it again.
    fingerprints = manifest["inputs"]["fingerprints"]
    assert fingerprints.keys() == reference["fingerprints"].keys()
    for name, fp in fingerprints.items():
        rows, kind, size, _ = fp.split(":")
        assert (rows, kind) == (reference["fingerprints"][name].split(":")[0], "store")
        assert int(size) == s3().get_file_info(f"{s3_bucket}/in/{name}").size
    frame = pd.read_parquet(f"s3://{s3_bucket}/out/parts")  # the docs' pandas snippet
    assert len(frame) == ROWS and frame["id"].is_unique
    # what the store holds: the job's files, the manifest listing every part; no lease, no staging
    objects = listing(s3_bucket, "out")
    parts = [o for o in objects if o.startswith("out/parts/")]
    assert objects == ["out/job.json", "out/logs/generate.log", "out/manifest.json", *parts, "out/report.html"]
    stored = json.loads(s3().open_input_stream(f"{s3_bucket}/out/manifest.json").read())
    assert [f"out/{p['file']}" for p in stored["parts"]] == parts
    assert stored["inputs"]["files"] == [f"{src}/a.parquet", f"{src}/more/b.parquet"]
    report = s3().open_input_stream(f"{s3_bucket}/out/report.html").read().decode()
    assert "Generation report: out" in report and "a.parquet#" in report  # built from the parts in S3
    again, _ = generate_job(src, *overrides, output=out)  # complete: nothing to do
    assert again["finished_at"] == manifest["finished_at"]
    # An input written again, even with the same bytes, is another object: the job refuses to
    # resume onto it rather than trust that nothing changed.
    time.sleep(1.1)  # S3 records write times to the second
    with open(inputs / "a.parquet", "rb") as f:
        data = f.read()
    with s3().open_output_stream(f"{s3_bucket}/in/a.parquet") as f:
        f.write(data)
    with pytest.raises(OutputError, match="input file a.parquet changed"):
        generate_job(src, *overrides, output=out)


def test_bad_uris_and_buckets_are_refused_before_anything_runs(generate_job, inputs, s3_bucket, monkeypatch,
                                                               caplog):
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    src = upload(inputs, s3_bucket)
    cases = {
        "nosuchfs://bucket/in": ("input", "no filesystem is known for nosuchfs://"),
        f"'s3://{s3_bucket}/in?secret_key={secret}'": ("input", "holds credentials"),
    }
    for bad, (setting, why) in cases.items():
        with pytest.raises(UserError) as err:
            generate_job(bad, output=f"s3://{s3_bucket}/never")
        assert setting in str(err.value) and why in str(err.value)
    with pytest.raises(UserError) as err:
        generate_job(src, output="s3://no-such-bucket-for-output/out")
    text = str(err.value)
    assert "output.path: cannot write to 's3://no-such-bucket-for-output/out'" in text and "AWS_ENDPOINT_URL" in text
    with pytest.raises(UserError) as err:
        generate_job("s3://no-such-bucket-for-input/in", output=f"s3://{s3_bucket}/never")
    assert "'s3://no-such-bucket-for-input/in'" in str(err.value)
    assert listing(s3_bucket, "never") == []
    assert secret not in caplog.text and all(secret not in str(e) for e in (err.value,))


@pytest.fixture(scope="module")
def read_only_s3():
    """A second S3 server that checks credentials (moto's IAM): a bucket `locked` that the user
    `reader` may read but not write. Yields (endpoint, reader's key id, reader's secret)."""
    import boto3

    from tests.conftest import moto_s3_server

    # The first four requests (the set-up below) run unchecked; every later one is authorised.
    with moto_s3_server(INITIAL_NO_AUTH_ACTION_COUNT="4") as endpoint:
        admin = {"endpoint_url": endpoint, "aws_access_key_id": "admin", "aws_secret_access_key": "admin",
                 "region_name": "us-east-1"}
        iam = boto3.client("iam", **admin)
        iam.create_user(UserName="reader")
        key = iam.create_access_key(UserName="reader")["AccessKey"]
        boto3.client("s3", **admin).create_bucket(Bucket="locked")
        iam.put_user_policy(UserName="reader", PolicyName="read-only", PolicyDocument=json.dumps({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket"], "Resource": "*"}]}))
        yield endpoint, key["AccessKeyId"], key["SecretAccessKey"]


@pytest.mark.parametrize("credentials", ["read-only", "unknown"])
def test_an_output_these_credentials_cannot_write_is_refused_before_anything_runs(
        generate_job, inputs, read_only_s3, credentials, monkeypatch, caplog, capfd):
    endpoint, key_id, secret = read_only_s3
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)  # the driver's probe runs before any Ray worker
    if credentials == "read-only":
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    else:  # a key the server does not know
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNKNOWNKEY")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    with pytest.raises(UserError) as err:
        generate_job(str(inputs), output="s3://locked/out")
    text = str(err.value)
    assert "output.path: cannot write to 's3://locked/out'" in text and "AWS_ACCESS_KEY_ID" in text
    captured = capfd.readouterr()
    assert all(secret not in t for t in (text, caplog.text, captured.out, captured.err))
    listed = pafs.S3FileSystem(endpoint_override=endpoint, access_key=key_id, secret_key=secret).get_file_info(
        pafs.FileSelector("locked", recursive=True))
    assert listed == []  # nothing written
