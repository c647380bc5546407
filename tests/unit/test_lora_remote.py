"""The adapter registry on another filesystem (fsspec's memory://, a real fsspec store in this
process), and the node cache its adapters are copied into."""

from __future__ import annotations

import json
import multiprocessing
import uuid
from pathlib import Path

import fsspec
import pytest

from pipeline import lora_remote
from pipeline.lora_registry import AdapterExists, AdapterNotFound, AdapterRegistry, content_hash
from pipeline.node_cache import CacheMismatch, fetch_folder, listing_key
from pipeline.storage import resolve


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPELINE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def root():
    """A registry root of its own on the in-memory filesystem."""
    yield f"memory://registry-{uuid.uuid4().hex[:8]}/lora"


def write_adapter(folder: Path, weights: bytes, rank: int = 8) -> None:
    (folder / "adapter_config.json").write_text(json.dumps({"r": rank, "target_modules": ["q_proj"]}))
    (folder / "adapter_model.safetensors").write_bytes(weights)
    (folder / "manifest.json").write_text(json.dumps({"adapter": folder.name, "steps": 3}))


def publish(registry: AdapterRegistry, name: str, weights: bytes, **kwargs) -> None:
    with registry.staging(name, **kwargs) as folder:
        write_adapter(folder, weights)


def store_files(uri: str) -> list[str]:
    fs, path = fsspec.core.url_to_fs(uri)
    return sorted(p[len(path):].lstrip("/") for p in fs.find(path))


def test_publish_then_resolve_copies_to_the_node_cache(root, cache):
    registry = AdapterRegistry(root)
    publish(registry, "bonjour", b"w" * 64)
    # Exactly the adapter's files under its name; the hidden upload prefix is gone.
    assert store_files(root) == ["bonjour/adapter_config.json", "bonjour/adapter_model.safetensors",
                                 "bonjour/manifest.json"]
    adapter = registry.resolve("bonjour")
    assert adapter.uri == f"{root}/bonjour"
    assert adapter.path.parent == cache / "adapters"
    assert adapter.path.name == adapter.content_hash.split(":", 1)[1]
    # The manifest on the store records the hash readers check their copy against.
    assert adapter.manifest["content_hash"] == adapter.content_hash == content_hash(adapter.path)
    assert (adapter.rank, adapter.steps) == (8, 3)
    assert registry.names() == ["bonjour"] and "bonjour" in registry and "other" not in registry
    assert [a.name for a in registry.list()] == ["bonjour"]  # what `llama-batch-adapters --root <uri>` shows


def test_a_missing_adapter_lists_those_present(root, cache):
    registry = AdapterRegistry(root)
    publish(registry, "b", b"1")
    publish(registry, "a", b"2")
    with pytest.raises(AdapterNotFound, match=r"unknown LoRA adapter 'c' in memory://registry-\w+/lora/ "
                                              r"\(adapters present: a, b\)"):
        registry.resolve("c")


def test_overwrite_replaces_the_whole_adapter_and_refuses_without_it(root, cache):
    registry = AdapterRegistry(root)
    publish(registry, "x", b"old" * 10)
    first = registry.resolve("x")
    with pytest.raises(AdapterExists, match="adapter.overwrite=true"):
        publish(registry, "x", b"new")
    publish(registry, "x", b"new" * 10, overwrite=True)
    second = registry.resolve("x")
    assert second.content_hash != first.content_hash
    assert (second.path / "adapter_model.safetensors").read_bytes() == b"new" * 10
    # Both contents stay in the cache under their own keys: a job that planned with the first
    # keeps using exactly it.
    assert (first.path / "adapter_model.safetensors").read_bytes() == b"old" * 10


def test_an_unfinished_upload_or_an_adapter_without_manifest_is_invisible(root, cache):
    registry = AdapterRegistry(root)
    publish(registry, "done", b"d")
    fs, path = fsspec.core.url_to_fs(root)
    fs.pipe(f"{path}/.tmp-half-0123/adapter_config.json", b"{}")  # an upload killed half-way
    fs.pipe(f"{path}/half/adapter_model.safetensors", b"w")  # a copy killed before its manifest
    assert registry.names() == ["done"]
    with pytest.raises(AdapterNotFound):
        registry.resolve("half")
    # A fresh leftover is kept: it may be an upload in progress (tests/integration/test_cluster.py
    # sees an old one go on S3, whose objects carry their times).
    assert lora_remote.clean_stale(resolve(root), stale_age=3600) == []


def test_a_staging_block_that_fails_publishes_nothing(root, cache):
    registry = AdapterRegistry(root)
    with pytest.raises(RuntimeError):
        with registry.staging("broken") as folder:
            write_adapter(folder, b"w")
            raise RuntimeError("training died")
    assert store_files(root) == [] and registry.names() == []
    assert list((registry.work_root / "staging").iterdir()) == []  # the local staging folder is gone


def test_on_this_node_fetches_by_fingerprint_and_refuses_changed_content(root, cache):
    registry = AdapterRegistry(root)
    publish(registry, "a", b"one")
    planned = registry.resolve("a")
    entry = {"path": "/driver/only", "uri": planned.uri, "fingerprint": planned.content_hash, "lora_int_id": 1}
    import shutil

    shutil.rmtree(cache)  # a fresh node: nothing cached
    local = lora_remote.on_this_node({"a": entry, "bad": {"error": "unknown", "uri": "x"}})
    assert Path(local["a"]["path"]) == cache / "adapters" / planned.content_hash.split(":", 1)[1]
    assert local["bad"] == {"error": "unknown", "uri": "x"}
    # Republished since the job planned: this node must not serve other bytes under the name.
    publish(registry, "a", b"two", overwrite=True)
    shutil.rmtree(cache)
    from pipeline.errors import JobFailure

    with pytest.raises(JobFailure, match="changed while it was in use"):
        lora_remote.on_this_node({"a": entry})


def test_fetch_folder_reuses_a_cached_key_without_reading_the_store(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    (source / "f.txt").write_text("hello")
    key = listing_key(resolve(str(source)))
    first = fetch_folder(resolve(str(source)), tmp_path / "cache", key=key)
    assert (first / "f.txt").read_text() == "hello"
    (source / "f.txt").unlink()  # the store no longer has it: the cached copy answers
    assert fetch_folder(resolve(str(source)), tmp_path / "cache", key=key) == first
    with pytest.raises(CacheMismatch):
        (source / "g.txt").write_text("other")
        fetch_folder(resolve(str(source)), tmp_path / "cache", key="wanted",
                     content_key=lambda folder: "what-was-copied")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [key]  # no hidden leftovers


def _fetch_in_process(args):
    source, parent = args
    path = fetch_folder(resolve(source), Path(parent), content_key=lambda folder: listing_key(resolve(source)))
    return str(path), (path / "weights.bin").read_bytes() == b"x" * (1 << 20)


def test_concurrent_fetches_on_one_node_give_one_whole_copy(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    (source / "weights.bin").write_bytes(b"x" * (1 << 20))
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        results = pool.map(_fetch_in_process, [(str(source), str(tmp_path / "cache"))] * 8, chunksize=1)
    assert len({path for path, _ in results}) == 1 and all(whole for _, whole in results)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [Path(results[0][0]).name]
