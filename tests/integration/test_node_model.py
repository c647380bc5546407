"""The model on a node that has not got it: the tiny model built there from the same seed (same
bytes, checked by hash), a model on S3 (a real S3 protocol server) copied into the node's cache,
and a folder the node cannot see refused with the fix."""

from __future__ import annotations

from pathlib import Path

import boto3
import pytest

from pipeline.errors import JobFailure
from pipeline.generate.config import ensure_model
from pipeline.generate.node_model import model_source, node_model_path
from pipeline.model_files import model_identity
from pipeline.model_settings import ModelSettings

pytestmark = pytest.mark.integration


@pytest.fixture
def fresh_node(tmp_path, monkeypatch):
    """Another node: its own, empty cache."""
    monkeypatch.setenv("PIPELINE_CACHE", str(tmp_path / "node"))
    return tmp_path / "node"


def test_a_node_without_the_tiny_model_builds_the_same_bytes(tiny_model_dir, fresh_node):
    source = {**model_source(ModelSettings(path=str(tiny_model_dir), build="tiny"), str(tiny_model_dir)),
              "driver_path": "/elsewhere/models/tiny-llama-3.1"}  # the driver's folder is not here
    path = Path(node_model_path(source))
    assert path == fresh_node / "models" / "tiny-llama-3.1"
    assert model_identity(path)["files"] == model_identity(tiny_model_dir)["files"]
    # Built with another seed, the node's model is not the driver's: refused, never served.
    other = {**source, "seed": 1, "driver_path": "/elsewhere/models/other-seed"}
    with pytest.raises(JobFailure, match="differs from the driver's"):
        node_model_path(other)


def test_a_model_on_s3_is_copied_once_per_node(tiny_model_dir, s3_server, s3_bucket, fresh_node, tmp_path,
                                               monkeypatch):
    s3 = boto3.client("s3", endpoint_url=s3_server)
    for f in sorted(Path(tiny_model_dir).iterdir()):
        s3.upload_file(str(f), s3_bucket, f"models/tiny/{f.name}")
    model = ModelSettings(path=f"s3://{s3_bucket}/models/tiny")
    driver_path = ensure_model(model)  # the driver's own copy, in its cache
    assert Path(driver_path).parent == fresh_node / "models" / "remote"
    assert model_identity(driver_path)["files"] == model_identity(tiny_model_dir)["files"]
    source = model_source(model, driver_path)
    monkeypatch.setenv("PIPELINE_CACHE", str(tmp_path / "second-node"))
    path = node_model_path(source)
    assert path == str(tmp_path / "second-node" / "models" / "remote" / Path(driver_path).name)
    assert model_identity(path)["files"] == source["files"]


def test_a_folder_the_node_does_not_have_is_refused_with_the_fix(fresh_node):
    source = {"setting": "/mnt/models/llama", "build": None, "seed": 0, "driver_path": "/mnt/models/llama",
              "files": {}}
    with pytest.raises(JobFailure, match=r"mount it on every node at the same path, or put the model on an "
                                         r"object store \(model.path=s3://...\)"):
        node_model_path(source)
