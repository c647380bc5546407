"""Parts committed by the engine workers, the driver keeping only the ledger
(`output.commit=workers`): the same rows as driver commits on the same input; a worker killed
mid-job, and a driver killed and rerun on S3, each end with every row exactly once and the same
answers (real Ray, real vLLM on the tiny model, moto's S3 server)."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.generate.part_files import is_numbered
from tests.conftest import compose
from tests.integration.test_faults import content, kill_engines_once_parts_appear, output_rows, requests
from tests.integration.test_generate_s3 import kill_once_parts_appear, listing, s3

pytestmark = pytest.mark.integration
LOCAL_ROWS = 240
BATCH = ("batch_size=20",)


def run_job(tiny_model_dir, src, out, *overrides, on_batch=None):
    from pipeline.generate.job import run

    return run(on_batch=on_batch, cfg=compose("generate", ["model=tiny", f"model.path={tiny_model_dir}", f"input={src}", f"output.path={out}",
                                    "engine.kv_cache_gib=0.25", "ray.shutdown=false", "progress=false", *overrides]))


@pytest.fixture(scope="module")
def local_input(tmp_path_factory):
    src = tmp_path_factory.mktemp("worker-commit-input") / "in.parquet"
    pq.write_table(pa.Table.from_pylist(requests(LOCAL_ROWS, max_tokens=24)), src, row_group_size=40)
    return str(src)


@pytest.fixture(scope="module")
def by_driver(local_input, ray_session, tiny_model_dir, tmp_path_factory):
    """The job with the default commits (auto: the driver, on one CPU machine)."""
    out = tmp_path_factory.mktemp("by-driver") / "out"
    manifest = run_job(tiny_model_dir, local_input, out, *BATCH)
    assert manifest["resources"]["commit"] == "driver"
    return manifest, output_rows(out)


def test_worker_commits_give_the_rows_of_driver_commits(by_driver, local_input, tiny_model_dir, tmp_path):
    driver_manifest, driver_rows = by_driver
    out = tmp_path / "by-workers"
    seen = []
    manifest = run_job(tiny_model_dir, local_input, out, *BATCH, "output.commit=workers", on_batch=seen.append)
    rows = output_rows(out)
    assert manifest["resources"]["commit"] == "workers"
    assert len(rows) == len({r["id"] for r in rows}) == LOCAL_ROWS
    assert content(rows) == content(driver_rows)  # ids, answers, token counts, seeds, errors
    assert {r["id"]: r for r in rows} == {r["id"]: r for r in driver_rows}  # every column
    for key in ("counts", "tokens"):
        assert manifest[key] == driver_manifest[key]
    assert sum(manifest["nodes"].values()) == LOCAL_ROWS
    # one part per batch, named by its rows, listed in the manifest in name order; nothing else
    parts = sorted(os.listdir(out / "parts"))
    assert [p["file"] for p in manifest["parts"]] == [f"parts/{p}" for p in parts]
    assert len(parts) == LOCAL_ROWS // 20 and not any(is_numbered(p) for p in parts)
    assert sum(p["rows"] for p in manifest["parts"]) == LOCAL_ROWS
    # on_batch and the progress come from the ledger: one entry per part, no rows on the driver
    assert sorted(e["file"] for e in seen) == [p["file"] for p in manifest["parts"]]
    assert manifest["timeline"]["points"][-1][1] == LOCAL_ROWS


def test_a_worker_killed_mid_job_leaves_every_row_once(by_driver, local_input, tiny_model_dir, tmp_path):
    out = tmp_path / "killed-worker"
    killer, killed = kill_engines_once_parts_appear(out)
    # tasks of 3 batches of 10 (240 // (10 x 2 x 4)): a redone task finds some of its parts there
    manifest = run_job(tiny_model_dir, local_input, out, "batch_size=10", "batches_in_flight=2",
                       "output.commit=workers")
    killer.join()
    assert killed, "no worker was killed: the test did not exercise the fault"
    rows = output_rows(out)
    assert len(rows) == len({r["id"] for r in rows}) == LOCAL_ROWS
    assert content(rows) == content(by_driver[1])
    assert manifest["counts"]["rows_out"] == LOCAL_ROWS


def test_a_killed_driver_on_s3_is_resumed_exactly_once(generate_job, by_driver, local_input, s3_bucket,
                                                       tiny_model_dir):
    """Worker commits on S3: the driver's whole process group killed once parts appear, then the
    same command again: every row once, with the local disk's answers; a reader listing the parts
    meanwhile sees only whole parts; no staged object is left."""
    with open(local_input, "rb") as f, s3().open_output_stream(f"{s3_bucket}/in/in.parquet") as dst:
        dst.write(f.read())
    src, out = f"s3://{s3_bucket}/in/in.parquet", f"s3://{s3_bucket}/out"
    # parts one by one; tasks of 3 batches (worker_commit.batches_per_task: 240 rows // (10 x 2 x 4))
    overrides = ("batch_size=10", "batches_in_flight=2", "output.commit=workers")
    committed = kill_once_parts_appear(tiny_model_dir, src, s3_bucket, overrides, part_rows=10, parts=1,
                                       total_rows=LOCAL_ROWS)

    # The killed driver's engine may commit a few more parts until Ray ends it or the rerun
    # takes the lease; it commits nothing after that.
    manifest, _ = generate_job(src, *overrides, output=out)
    assert manifest["resources"]["commit"] == "workers"
    assert manifest["counts"]["rows_resumed"] >= len(committed)
    assert manifest["counts"]["rows_generated"] == LOCAL_ROWS - manifest["counts"]["rows_resumed"]
    table = pq.read_table(f"s3://{s3_bucket}/out/parts")
    assert table.num_rows == len(set(table.column("id").to_pylist())) == LOCAL_ROWS
    assert content(table.to_pylist()) == content(by_driver[1])
    objects = listing(s3_bucket, "out")
    parts = [o for o in objects if o.startswith("out/parts/")]
    assert objects == ["out/job.json", "out/logs/generate.log", "out/manifest.json", *parts, "out/report.html"]
    assert [f"out/{p['file']}" for p in manifest["parts"]] == parts  # every part listed, in name order
