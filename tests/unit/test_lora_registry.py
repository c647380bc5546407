import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pipeline.lora_registry import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    MANIFEST,
    AdapterError,
    AdapterExists,
    AdapterNotFound,
    AdapterRegistry,
    InvalidAdapterName,
    check_adapter_matches,
    lora_int_id,
    main,
)

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
    assert main(["--root", str(tmp_path)]) == 0
    assert "no adapters" in capsys.readouterr().out
    add(reg, "bonjour", rank=8, steps=40)
    assert main(["--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["name", "base_model", "rank", "steps", "train_loss", "val_loss", "lora_int_id"]
    assert out[1].split() == ["bonjour", "tiny", "8", "40", "0.2500", "0.5000", str(lora_int_id("bonjour"))]
    assert main(["--root", str(tmp_path), "--json"]) == 0
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
