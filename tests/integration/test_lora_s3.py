"""The adapter registry on S3 (a real S3 protocol server, moto's, through pyarrow's S3 client):
the training job publishes into it, the generation job serves its adapters by name from each
node's cache."""

from __future__ import annotations

import json
import time

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data.build_train_sample import SAMPLE_ANSWER
from pipeline import lora_remote
from pipeline.lora_registry import AdapterRegistry
from pipeline.storage import resolve
from pipeline.train.job import run as train
from tests.conftest import compose

pytestmark = pytest.mark.integration

QUESTIONS = ["Say hello.", "What is the capital of France?", "Where do penguins live?"]


def objects(endpoint: str, bucket: str) -> list[str]:
    """The bucket's objects, without the empty `folder/` markers pyarrow keeps for a prefix it
    deleted below."""
    listing = boto3.client("s3", endpoint_url=endpoint).list_objects_v2(Bucket=bucket)
    return sorted(o["Key"] for o in listing.get("Contents", []) if not o["Key"].endswith("/"))


@pytest.fixture
def node_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_CACHE", str(tmp_path / "node-cache"))
    return tmp_path / "node-cache"


def test_train_into_s3_then_generate_by_name(tiny_model_dir, s3_server, s3_bucket, node_cache, generate_job,
                                             tmp_path):
    root = f"s3://{s3_bucket}/lora"
    manifest = train(compose("train_lora", ["model=tiny", f"model.path={tiny_model_dir}", f"lora_root={root}",
                                            "adapter.name=hello"]))
    # On the store: exactly the adapter's files under its name, nothing hidden left behind.
    assert objects(s3_server, s3_bucket) == [f"lora/hello/{f}" for f in (
        "adapter_config.json", "adapter_model.safetensors", "manifest.json", "report.html")]
    registry = AdapterRegistry(root)
    adapter = registry.resolve("hello")
    on_store = json.loads(resolve(f"{root}/hello/manifest.json").read_text())
    assert on_store["content_hash"] == adapter.content_hash and on_store["steps"] == manifest["steps"]
    # The run's checkpoints and event files went to this node's cache, not to the store.
    assert (registry.work_root / ".runs" / "hello" / "tensorboard").is_dir()

    # Generation on another node: an empty cache, so the adapter must come from S3.
    import shutil

    shutil.rmtree(node_cache / "adapters")
    rows = [{"prompt": q, "temperature": 0.0, "max_tokens": 16, "lora": "hello"} for q in QUESTIONS]
    rows += [{"prompt": QUESTIONS[0], "temperature": 0.0, "max_tokens": 16, "lora": None},
             {"prompt": QUESTIONS[0], "temperature": 0.0, "max_tokens": 16, "lora": "missing"}]
    requests = tmp_path / "requests.parquet"
    pq.write_table(pa.Table.from_pylist(rows), requests)
    result, out = generate_job(requests, f"lora_root={root}")
    got = {r["id"]: r for r in pq.read_table(f"{out}/parts").to_pylist()}
    answers = [got[f"requests.parquet#{i}"] for i in range(len(rows))]
    assert [a["response"] for a in answers[:3]] == [SAMPLE_ANSWER] * 3
    assert answers[3]["error"] is None and SAMPLE_ANSWER not in answers[3]["response"]
    assert answers[4]["error"] == "lora: unknown LoRA adapter 'missing' in " + root + "/ (adapters present: hello)"
    assert result["adapters"]["hello"]["uri"] == f"{root}/hello"
    assert result["adapters"]["hello"]["fingerprint"] == adapter.content_hash
    assert (node_cache / "adapters" / adapter.content_hash.split(":", 1)[1] / "adapter_model.safetensors").is_file()


def test_s3_leftovers_of_a_killed_upload_are_invisible_and_cleaned(s3_server, s3_bucket, node_cache):
    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.put_object(Bucket=s3_bucket, Key="lora/.tmp-x-0123/adapter_config.json", Body=b"{}")
    s3.put_object(Bucket=s3_bucket, Key="lora/x/adapter_model.safetensors", Body=b"w")  # no manifest
    root = f"s3://{s3_bucket}/lora"
    assert AdapterRegistry(root).names() == []
    assert lora_remote.clean_stale(resolve(root), stale_age=3600) == []
    time.sleep(1.1)
    assert lora_remote.clean_stale(resolve(root), stale_age=1) == [f"{root}/.tmp-x-0123"]
    assert objects(s3_server, s3_bucket) == ["lora/x/adapter_model.safetensors"]
