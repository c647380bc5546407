import json
import os
import struct
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from pipeline.lora_registry import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    MANIFEST,
    AdapterError,
    AdapterExists,
    AdapterIdCollision,
    AdapterNotFound,
    AdapterRegistry,
    IncompleteAdapter,
    InvalidAdapterName,
    lora_int_id,
    validate_name,
)
from pipeline.cli import adapters as registry_cli
from pipeline.lora_compat import check_adapter_matches

REPO = Path(__file__).resolve().parents[2]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def write_adapter_files(folder: Path, rank=8, targets=TARGETS, base="tiny", steps=12, manifest=True):
    (folder / ADAPTER_CONFIG).write_text(
        json.dumps({"peft_type": "LORA", "r": rank, "lora_alpha": 16, "target_modules": targets,
                    "base_model_name_or_path": ".cache/models/tiny-llama"})
    )
    (folder / ADAPTER_WEIGHTS).write_bytes(b"\0" * 16)
    if manifest:
        (folder / MANIFEST).write_text(
            json.dumps({"adapter": folder.name, "base_model": {"name": base}, "steps": steps,
                        "train_loss": 0.25, "validation_loss": 0.5})
        )


def add(reg: AdapterRegistry, name: str, **kw):
    with reg.staging(name, overwrite=kw.pop("overwrite", False)) as tmp:
        write_adapter_files(tmp, **kw)
    return reg.resolve(name)


def test_empty_or_missing_root(tmp_path):
    assert AdapterRegistry(tmp_path / "nope").list() == []
    assert AdapterRegistry(tmp_path).list() == []


def test_list_and_resolve(tmp_path):
    reg = AdapterRegistry(tmp_path / "lora")
    add(reg, "bonjour", rank=8, steps=40)
    add(reg, "alpha-2", rank=16, targets=["q_proj", "v_proj"], base="llama-3.1-8b")
    assert reg.names() == ["alpha-2", "bonjour"]

    a = reg.resolve("bonjour")
    assert a.name == "bonjour"
    assert a.path == (tmp_path / "lora" / "bonjour").absolute()
    assert a.path.is_absolute()
    assert a.base_model == "tiny"
    assert a.rank == 8
    assert a.target_modules == tuple(sorted(TARGETS))
    assert a.lora_int_id == lora_int_id("bonjour")
    assert (a.steps, a.train_loss, a.validation_loss) == (40, 0.25, 0.5)
    assert reg.resolve("alpha-2").base_model == "llama-3.1-8b"
    assert "bonjour" in reg and "nope" not in reg and "../x" not in reg


def test_unknown_name_lists_present(tmp_path):
    reg = AdapterRegistry(tmp_path)
    with pytest.raises(AdapterNotFound, match=r"adapters present: none"):
        reg.resolve("missing")
    add(reg, "one")
    add(reg, "two")
    with pytest.raises(AdapterNotFound) as e:
        reg.resolve("three")
    assert "'three'" in str(e.value) and "one, two" in str(e.value)
    assert isinstance(e.value, KeyError)


def test_folder_without_manifest_is_not_an_adapter(tmp_path):
    reg = AdapterRegistry(tmp_path)
    (tmp_path / "half").mkdir()
    write_adapter_files(tmp_path / "half", manifest=False)
    assert reg.list() == []
    with pytest.raises(AdapterNotFound):
        reg.resolve("half")


@pytest.mark.parametrize("bad", ["", ".", "..", "../up", "a/b", ".tmp-x", "-lead", "sp ace", "x" * 101, "é"])
def test_invalid_names_rejected(tmp_path, bad):
    reg = AdapterRegistry(tmp_path)
    with pytest.raises(InvalidAdapterName):
        reg.resolve(bad)
    with pytest.raises(InvalidAdapterName):
        with reg.staging(bad):
            pass
    assert list(tmp_path.iterdir()) == []


def test_lora_int_id_stable_positive_31_bit():
    # Pinned values: ids must not change between releases, or running jobs and saved
    # request files would point vLLM at a different adapter slot.
    assert lora_int_id("bonjour") == lora_int_id("bonjour")
    assert lora_int_id("bonjour") == int.from_bytes(
        __import__("hashlib").sha256(b"bonjour").digest()[:4], "big") & 0x7FFFFFFF
    ids = {lora_int_id(f"adapter-{i}") for i in range(2000)}
    assert len(ids) == 2000
    assert all(0 < i < 2**31 for i in ids)


def test_lora_int_id_same_in_another_process():
    code = "from pipeline.lora_registry import lora_int_id; print(lora_int_id('bonjour'))"
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                         text=True, check=True).stdout
    assert int(out) == lora_int_id("bonjour")


def test_staging_renames_into_place(tmp_path):
    reg = AdapterRegistry(tmp_path)
    with reg.staging("bonjour") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".tmp-bonjour-")
        write_adapter_files(tmp)
        assert reg.list() == []  # nothing visible until the block succeeds
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bonjour"]
    assert sorted(p.name for p in (tmp_path / "bonjour").iterdir()) == [
        ADAPTER_CONFIG, ADAPTER_WEIGHTS, MANIFEST]


def test_failed_staging_leaves_nothing(tmp_path):
    reg = AdapterRegistry(tmp_path)
    with pytest.raises(RuntimeError):
        with reg.staging("bonjour") as tmp:
            write_adapter_files(tmp)
            raise RuntimeError("training diverged")
    assert list(tmp_path.iterdir()) == []


def test_staging_without_manifest_is_refused(tmp_path):
    reg = AdapterRegistry(tmp_path)
    with pytest.raises(AdapterError, match="manifest.json"):
        with reg.staging("bonjour") as tmp:
            write_adapter_files(tmp, manifest=False)
    assert list(tmp_path.iterdir()) == []


def test_killed_staging_leaves_nothing_listed_and_is_cleaned(tmp_path):
    # A real process killed (SIGKILL) inside the block, so no cleanup code runs.
    code = textwrap.dedent(f"""
        import os, signal
        from pipeline.lora_registry import AdapterRegistry
        with AdapterRegistry({str(tmp_path)!r}).staging("bonjour") as tmp:
            (tmp / "adapter_config.json").write_text("{{}}")
            (tmp / "manifest.json").write_text("{{}}")
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO)
    assert proc.returncode == -9
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert len(leftovers) == 1 and leftovers[0].startswith(".tmp-bonjour-")

    reg = AdapterRegistry(tmp_path)
    assert reg.list() == []
    with pytest.raises(AdapterNotFound):
        reg.resolve("bonjour")

    add(reg, "other")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other"]


def test_staging_of_a_live_process_is_not_cleaned(tmp_path):
    reg = AdapterRegistry(tmp_path)
    with reg.staging("first") as first:
        write_adapter_files(first)
        add(reg, "second")  # cleaning inside staging() must spare `first`
        assert first.is_dir()
    assert reg.names() == ["first", "second"]


def test_existing_name_refused_unless_overwrite(tmp_path):
    reg = AdapterRegistry(tmp_path)
    add(reg, "bonjour", steps=1)
    with pytest.raises(AdapterExists, match=r"overwrite=true"):
        with reg.staging("bonjour"):
            pytest.fail("refusal must come before the block runs")
    assert reg.resolve("bonjour").steps == 1

    add(reg, "bonjour", steps=2, overwrite=True)
    assert reg.resolve("bonjour").steps == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bonjour"]


def test_name_taken_while_staging_is_refused_at_publish(tmp_path):
    reg = AdapterRegistry(tmp_path)
    with pytest.raises(AdapterExists):
        with reg.staging("bonjour") as tmp:
            write_adapter_files(tmp, steps=1)
            add(reg, "bonjour", steps=2)  # another run finished first
    assert reg.resolve("bonjour").steps == 2
    assert reg.names() == ["bonjour"]


def test_cli_table(tmp_path, capsys):
    reg = AdapterRegistry(tmp_path)
    assert registry_cli(["--root", str(tmp_path)]) == 0
    assert "no adapters" in capsys.readouterr().out
    add(reg, "bonjour", rank=8, steps=40)
    assert registry_cli(["--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["name", "base_model", "rank", "steps", "train_loss", "val_loss", "lora_int_id"]
    assert out[1].split() == ["bonjour", "tiny", "8", "40", "0.2500", "0.5000", str(lora_int_id("bonjour"))]
    assert registry_cli(["--root", str(tmp_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["bonjour"]["steps"] == 40


def test_cli_module_entry_point(tmp_path):
    add(AdapterRegistry(tmp_path), "bonjour")
    out = subprocess.run([sys.executable, "-m", "pipeline.lora_registry", "--root", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert "bonjour" in out


# ---- adapter/model module-name check ------------------------------------------------


def write_safetensors_header(path: Path, keys):
    header = {k: {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]} for k in keys}
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 4)


def llama_keys(layers=2, awq=False):
    suffixes = ["qweight", "qzeros", "scales"] if awq else ["weight"]
    keys = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    for i in range(layers):
        for m in ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]:
            keys += [f"model.layers.{i}.{m}.{s}" for s in suffixes]
        keys += [f"model.layers.{i}.input_layernorm.weight"]
    return keys


@pytest.mark.parametrize("awq", [False, True])
def test_adapter_matches_model_single_file(tmp_path, awq):
    adapter = tmp_path / "a"
    adapter.mkdir()
    write_adapter_files(adapter)
    model = tmp_path / "m"
    model.mkdir()
    write_safetensors_header(model / "model.safetensors", llama_keys(awq=awq))
    m = check_adapter_matches(adapter, model)
    assert m.ok and m.missing == () and m.matched_modules == 14


def test_adapter_matches_sharded_awq_index_and_reports_missing(tmp_path):
    adapter = tmp_path / "a"
    adapter.mkdir()
    write_adapter_files(adapter, targets=["q_proj", "v_proj", "qkv_proj"])
    model = tmp_path / "m"
    model.mkdir()
    (model / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: "model-00001-of-00002.safetensors" for k in llama_keys(awq=True)}}))
    m = check_adapter_matches(adapter, model)
    assert not m.ok and m.missing == ("qkv_proj",)


def test_colliding_lora_int_id_is_refused(tmp_path, monkeypatch):
    import pipeline.lora_registry as registry_module

    reg = AdapterRegistry(tmp_path)
    add(reg, "first")
    monkeypatch.setattr(registry_module, "lora_int_id", lambda name: 7)
    with pytest.raises(AdapterError, match=r"same lora_int_id \(7\) as existing adapter 'first'"):
        with reg.staging("second"):
            pytest.fail("refusal must come before the block runs")
    assert reg.names() == ["first"]


# ---- names ---------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["bonjour\n", "bonjour\r\n", "\nbonjour"])
def test_name_with_newline_rejected(tmp_path, bad):
    with pytest.raises(InvalidAdapterName):
        validate_name(bad)
    reg = AdapterRegistry(tmp_path)
    with pytest.raises(InvalidAdapterName):
        with reg.staging(bad):
            pass
    assert list(tmp_path.iterdir()) == []


def test_list_ignores_folder_with_trailing_newline(tmp_path):
    reg = AdapterRegistry(tmp_path)
    (tmp_path / "bonjour\n").mkdir()
    write_adapter_files(tmp_path / "bonjour\n")
    add(reg, "bonjour")
    assert reg.names() == ["bonjour"]


# ---- stale staging folders -------------------------------------------------------------

HOUR = 3600


def make_staging(root: Path, owner=None, age_s: float = 0, name=".tmp-x-0123"):
    """A staging folder as a run would leave it; `owner` is a dict, raw text, or None for
    no owner file. `age_s` backdates the owner file and the folder."""
    folder = root / name
    folder.mkdir(parents=True)
    (folder / ADAPTER_CONFIG).write_text("{}")
    if owner is not None:
        (folder / ".staging-owner.json").write_text(owner if isinstance(owner, str) else json.dumps(owner))
    if age_s:
        then = time.time() - age_s
        for p in [*folder.iterdir(), folder]:
            os.utime(p, (then, then))
    return folder


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_other_host_with_fresh_heartbeat_survives(tmp_path):
    folder = make_staging(tmp_path, {"host": "gpu-node-7", "pid": os.getpid()}, age_s=60)
    assert AdapterRegistry(tmp_path).clean_stale() == []
    assert folder.is_dir()
    add(AdapterRegistry(tmp_path), "bonjour")  # staging() cleans too, and must spare it
    assert folder.is_dir()


def test_other_host_with_old_heartbeat_is_removed(tmp_path):
    folder = make_staging(tmp_path, {"host": "gpu-node-7", "pid": os.getpid()}, age_s=2 * HOUR)
    assert AdapterRegistry(tmp_path).clean_stale() == [folder]
    assert not folder.exists()


def test_other_host_stale_age_is_configurable(tmp_path, monkeypatch):
    import pipeline.lora_staging as staging_module

    folder = make_staging(tmp_path, {"host": "gpu-node-7", "pid": 1}, age_s=60)
    assert AdapterRegistry(tmp_path, stale_after_s=120).clean_stale() == []
    monkeypatch.setattr(staging_module, "STALE_AFTER_S", 30)
    assert AdapterRegistry(tmp_path).clean_stale() == [folder]


def test_same_host_live_pid_survives_even_when_old(tmp_path):
    import socket

    folder = make_staging(tmp_path, {"host": socket.gethostname(), "pid": os.getpid()}, age_s=2 * HOUR)
    assert AdapterRegistry(tmp_path).clean_stale() == []
    assert folder.is_dir()


def test_same_host_dead_pid_is_removed_at_once(tmp_path):
    import socket

    folder = make_staging(tmp_path, {"host": socket.gethostname(), "pid": dead_pid()})
    assert AdapterRegistry(tmp_path).clean_stale() == [folder]
    assert not folder.exists()


@pytest.mark.parametrize("owner", [None, "{not json", json.dumps(["a"]), json.dumps({"pid": 5}),
                                   json.dumps({"host": "", "pid": 5})])
def test_unknown_owner_kept_while_young_removed_when_old(tmp_path, owner):
    young = make_staging(tmp_path, owner, name=".tmp-young-1")
    old = make_staging(tmp_path, owner, age_s=2 * HOUR, name=".tmp-old-1")
    assert AdapterRegistry(tmp_path).clean_stale() == [old]
    assert young.is_dir() and not old.exists()


def test_unknown_owner_kept_when_only_owner_file_is_fresh(tmp_path):
    folder = make_staging(tmp_path, "{partial", age_s=2 * HOUR)
    os.utime(folder / ".staging-owner.json")
    assert AdapterRegistry(tmp_path).clean_stale() == []


def test_leftover_old_folder_from_overwrite_is_removed_once_stale(tmp_path):
    young = make_staging(tmp_path, None, name=".tmp-bonjour-aaaa-old")
    old = make_staging(tmp_path, None, age_s=2 * HOUR, name=".tmp-bonjour-bbbb-old")
    assert AdapterRegistry(tmp_path).clean_stale() == [old]
    assert young.is_dir()


def heartbeat_threads():
    return [t for t in threading.enumerate() if t.name.startswith("lora-staging-heartbeat")]


def test_heartbeat_refreshes_owner_file_and_stops_after_block(tmp_path):
    reg = AdapterRegistry(tmp_path, heartbeat_s=0.05)
    with reg.staging("bonjour") as tmp:
        owner = tmp / ".staging-owner.json"
        past = time.time() - 2 * HOUR
        os.utime(owner, (past, past))
        deadline = time.monotonic() + 5
        while owner.stat().st_mtime < past + HOUR and time.monotonic() < deadline:
            time.sleep(0.02)
        assert owner.stat().st_mtime > time.time() - 60
        assert len(heartbeat_threads()) == 1
        write_adapter_files(tmp)
    assert heartbeat_threads() == []
    assert reg.names() == ["bonjour"]
    assert not (tmp_path / "bonjour" / ".staging-owner.json").exists()
    time.sleep(0.2)  # a stray beat would recreate the owner file in the published adapter
    assert sorted(p.name for p in (tmp_path / "bonjour").iterdir()) == [
        ADAPTER_CONFIG, ADAPTER_WEIGHTS, MANIFEST]


def test_heartbeat_stops_when_block_raises(tmp_path):
    reg = AdapterRegistry(tmp_path, heartbeat_s=0.05)
    with pytest.raises(RuntimeError):
        with reg.staging("bonjour"):
            assert len(heartbeat_threads()) == 1
            raise RuntimeError("training diverged")
    assert heartbeat_threads() == []
    assert list(tmp_path.iterdir()) == []


def test_heartbeat_tolerates_vanished_folder(tmp_path):
    import shutil

    reg = AdapterRegistry(tmp_path, heartbeat_s=0.02)
    with pytest.raises(AdapterError):
        with reg.staging("bonjour") as tmp:
            shutil.rmtree(tmp)  # e.g. removed by hand or by another node
            time.sleep(0.1)
    assert heartbeat_threads() == []
    assert list(tmp_path.iterdir()) == []


# ---- content hash -----------------------------------------------------------------------


def test_content_hash_follows_config_and_weights_not_manifest(tmp_path):
    reg = AdapterRegistry(tmp_path)
    a = add(reg, "one")
    b = add(reg, "two")  # identical files in another folder
    h = a.content_hash
    assert h.startswith("sha256:") and len(h) == len("sha256:") + 64
    assert h == b.content_hash == a.fingerprint()

    (b.path / MANIFEST).write_text(json.dumps({"adapter": "two", "created": "later"}))
    assert b.content_hash == h

    (b.path / ADAPTER_WEIGHTS).write_bytes(b"\1" + b"\0" * 15)
    assert b.content_hash != h
    assert reg.resolve("two").content_hash == b.content_hash  # read from disk, not cached

    (b.path / ADAPTER_WEIGHTS).write_bytes(b"\0" * 16)
    assert b.content_hash == h
    (b.path / "adapter_model.bin").write_bytes(b"legacy")
    assert b.content_hash != h

    (b.path / "adapter_model.bin").unlink()
    cfg = json.loads((b.path / ADAPTER_CONFIG).read_text())
    (b.path / ADAPTER_CONFIG).write_text(json.dumps({**cfg, "r": 4}))
    assert b.content_hash != h


def test_content_hash_format_and_large_weights(tmp_path):
    import hashlib

    reg = AdapterRegistry(tmp_path)
    a = add(reg, "big")
    data = os.urandom(3 * (1 << 20) + 5)  # several read chunks
    (a.path / ADAPTER_WEIGHTS).write_bytes(data)
    expected = hashlib.sha256()
    for name in [ADAPTER_CONFIG, ADAPTER_WEIGHTS]:
        raw = (a.path / name).read_bytes()
        expected.update(name.encode() + b"\0" + len(raw).to_bytes(8, "big") + raw)
    assert a.content_hash == "sha256:" + expected.hexdigest()
    (a.path / ADAPTER_WEIGHTS).write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert a.content_hash != "sha256:" + expected.hexdigest()


def test_content_hash_without_weights_is_incomplete(tmp_path):
    reg = AdapterRegistry(tmp_path)
    a = add(reg, "bonjour")
    (a.path / ADAPTER_WEIGHTS).unlink()
    with pytest.raises(IncompleteAdapter) as e:
        a.content_hash
    assert e.value.code == "incomplete"


# ---- stable error codes -----------------------------------------------------------------


def test_error_codes(tmp_path, monkeypatch):
    import pipeline.lora_registry as registry_module

    assert AdapterError.code == "adapter_error"
    reg = AdapterRegistry(tmp_path)
    codes = {}
    add(reg, "first")
    for call in [lambda: reg.resolve("nope"), lambda: reg.resolve("bad\n"),
                 lambda: reg.check_can_write("first")]:
        with pytest.raises(AdapterError) as e:
            call()
        codes[type(e.value)] = e.value.code
    assert codes == {AdapterNotFound: "not_found", InvalidAdapterName: "invalid_name",
                     AdapterExists: "exists"}

    with pytest.raises(IncompleteAdapter) as e:
        with reg.staging("no-manifest") as tmp:
            write_adapter_files(tmp, manifest=False)
    assert e.value.code == "incomplete"

    monkeypatch.setattr(registry_module, "lora_int_id", lambda name: 7)
    with pytest.raises(AdapterIdCollision) as e:
        reg.check_can_write("second")
    assert e.value.code == "id_collision"
    assert len({c.code for c in [AdapterError, AdapterNotFound, AdapterExists, InvalidAdapterName,
                                 AdapterIdCollision, IncompleteAdapter]}) == 6
