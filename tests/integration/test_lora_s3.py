"""The adapter registry on S3 (a real S3 protocol server, moto's, through pyarrow's S3 client):
the training job publishes into it; a node resolves an adapter into its own cache."""

from __future__ import annotations

import json
import shutil
import time

import boto3
import pytest

from pipeline import lora_remote
from pipeline.lora_registry import AdapterNotFound, AdapterRegistry
from pipeline.storage import resolve
from pipeline.train.job import run as train
from tests.conftest import compose

pytestmark = pytest.mark.integration


def objects(endpoint: str, bucket: str) -> list[str]:
    """The bucket's objects, without the empty `folder/` markers pyarrow keeps for a prefix it
    deleted below."""
    listing = boto3.client("s3", endpoint_url=endpoint).list_objects_v2(Bucket=bucket)
    return sorted(o["Key"] for o in listing.get("Contents", []) if not o["Key"].endswith("/"))


@pytest.fixture
def node_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_CACHE", str(tmp_path / "node-cache"))
    return tmp_path / "node-cache"


def test_train_into_s3_and_resolve_on_another_node(tiny_model_dir, s3_server, s3_bucket, node_cache):
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

    # Another node: an empty cache, so the adapter comes from S3, checked against the manifest's
    # hash. (tests/integration/test_cluster.py generates with it on two nodes.)
    shutil.rmtree(node_cache / "adapters")
    again = AdapterRegistry(root).resolve("hello")
    assert again.path == node_cache / "adapters" / adapter.content_hash.split(":", 1)[1]
    assert again.content_hash == adapter.content_hash and again.uri == f"{root}/hello"
    with pytest.raises(AdapterNotFound, match=f"unknown LoRA adapter 'missing' in {root}/ "
                                              r"\(adapters present: hello\)"):
        registry.resolve("missing")


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
