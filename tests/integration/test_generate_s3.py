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
from tests.integration.test_faults import ROOT, content, job_command, requests

pytestmark = pytest.mark.integration
ROWS = 160


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
    pq.write_table(pa.Table.from_pylist(batch[:100]), local / "a.parquet", row_group_size=25)
    pq.write_table(pa.Table.from_pylist(batch[100:]), local / "more" / "b.parquet", row_group_size=20)
    return local


@pytest.fixture(scope="module")
def reference(inputs, ray_session, tiny_model_dir, tmp_path_factory):
    """The rows of the job on the local disk, which every run on S3 must give again."""
    from pipeline.generate.job import run
    from tests.conftest import compose

    out = tmp_path_factory.mktemp("s3-reference") / "out"
    run(compose("generate", ["model=tiny", f"model.path={tiny_model_dir}", f"input={inputs}", f"output.path={out}",
                             "engine.kv_cache_gib=0.25", "ray.shutdown=false", "progress=false"]))
    return content(pq.read_table(out / "parts").to_pylist())


def upload(inputs, bucket: str) -> str:
    fs = s3()
    for path in sorted(inputs.rglob("*.parquet")):
        with open(path, "rb") as src, fs.open_output_stream(f"{bucket}/in/{path.relative_to(inputs)}") as dst:
            dst.write(src.read())
    return f"s3://{bucket}/in"


def test_input_and_output_on_s3_give_the_local_rows(generate_job, inputs, reference, s3_bucket):
    manifest, out = generate_job(upload(inputs, s3_bucket), output=f"s3://{s3_bucket}/out")
    assert manifest["status"] == "complete" and manifest["counts"]["rows_in"] == ROWS
    # ids, seeds and answers are those of the same files on a local disk
    table = pq.read_table(f"s3://{s3_bucket}/out/parts")
    assert content(table.to_pylist()) == reference
    assert set(table.column("id").to_pylist()) == {f"a.parquet#{i}" for i in range(100)} | {
        f"more/b.parquet#{i}" for i in range(ROWS - 100)}
    frame = pd.read_parquet(f"s3://{s3_bucket}/out/parts")  # the docs' pandas snippet
    assert len(frame) == ROWS and frame["id"].is_unique
    # what the store holds: the job's files, the manifest listing every part; no lease or staging left
    objects = listing(s3_bucket, "out")
    parts = [o for o in objects if o.startswith("out/parts/")]
    assert objects == ["out/job.json", "out/logs/generate.log", "out/manifest.json", *parts, "out/report.html"]
    stored = json.loads(s3().open_input_stream(f"{s3_bucket}/out/manifest.json").read())
    assert [f"out/{p['file']}" for p in stored["parts"]] == parts
    assert stored["inputs"]["files"] == [f"s3://{s3_bucket}/in/a.parquet", f"s3://{s3_bucket}/in/more/b.parquet"]
    # a rerun finds the job complete
    again, _ = generate_job(f"s3://{s3_bucket}/in", output=f"s3://{s3_bucket}/out")
    assert again["finished_at"] == manifest["finished_at"]


def test_a_killed_run_on_s3_resumes_to_exactly_once_identical_rows(generate_job, inputs, reference, s3_bucket,
                                                                    tiny_model_dir):
    src, out = upload(inputs, s3_bucket), f"s3://{s3_bucket}/killed"
    overrides = ("output.rows_per_part=10", "batch_size=10")
    proc = subprocess.Popen(job_command(tiny_model_dir, src, out, *overrides), cwd=ROOT, env=dict(os.environ),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    seen, bad = set(), []

    def read_parts_while_running():
        # a reader of <out>/parts during the run: every object there is a whole, committed part
        while proc.poll() is None:
            for name in listing(s3_bucket, "killed/parts"):
                if name not in seen:
                    try:
                        rows = pq.read_table(f"s3://{s3_bucket}/{name}").num_rows
                        seen.add(name) if rows == 10 or not name.endswith(".parquet") else bad.append(name)
                    except Exception as exc:  # noqa: BLE001 - anything unreadable is the failure
                        bad.append(f"{name}: {exc}")
            time.sleep(0.05)

    reader = threading.Thread(target=read_parts_while_running, daemon=True)
    reader.start()
    deadline = time.time() + 300
    while time.time() < deadline and len(seen) < 2:
        assert proc.poll() is None, "the job ended before it could be interrupted"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    reader.join(timeout=30)
    assert not bad and all(n.startswith("killed/parts/part-") for n in seen)
    committed = pq.read_table(f"s3://{s3_bucket}/killed/parts").column("id").to_pylist()
    assert 0 < len(committed) < ROWS and "killed/manifest.json" not in listing(s3_bucket, "killed")

    manifest, _ = generate_job(src, *overrides, output=out)  # the dead run's lease is taken at once
    rows = pq.read_table(f"s3://{s3_bucket}/killed/parts").to_pylist()
    assert len(rows) == len({r["id"] for r in rows}) == ROWS
    assert content(rows) == reference
    assert manifest["counts"]["rows_resumed"] >= len(committed)
    assert manifest["counts"]["rows_generated"] == ROWS - manifest["counts"]["rows_resumed"]
    assert not [o for o in listing(s3_bucket, "killed") if "/.staging/" in o or o.endswith("/.lock")]


def test_bad_uris_and_buckets_are_refused_before_anything_runs(generate_job, inputs, s3_bucket, monkeypatch,
                                                               caplog):
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    src = upload(inputs, s3_bucket)
    cases = {
        "nosuchfs://bucket/in": ("input", "no filesystem is known for nosuchfs://"),
        f"s3://{s3_bucket}/in?secret_key={secret}": ("input", "holds credentials"),
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
