"""The LoRA training job end to end on the tiny model: real Hydra config, PEFT, Ray Train, and
vLLM serving the adapters it writes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cli import adapters as registry_cli
from pipeline.lora_compat import check_adapter_matches
from pipeline.lora_registry import AdapterExists, AdapterRegistry
from data.build_train_sample import SAMPLE_ANSWER, write_sample_dataset
from pipeline.train.job import run
from pipeline.train.labels import IGNORE
from pipeline.train.settings import TrainConfigError
from tests.conftest import compose

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]

ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors", "manifest.json", "report.html"]
# Two questions from the training data and two it never saw: the adapter must answer all four
# with the trained answer, the base model none of them.
QUESTIONS = ["Say hello.", "What is the capital of France?", "Where do penguins live?", "Name a famous painter."]



def overrides(model_dir, root, name, *more):
    return ["model=tiny", f"model.path={model_dir}", f"lora_root={root}", f"adapter.name={name}", *more]


def train(model_dir, root, name, *more):
    return run(compose("train_lora", overrides(model_dir, root, name, *more)))


def train_subprocess(model_dir, root, name, *more, tmp_path, **kwargs):
    cmd = [sys.executable, "-m", "jobs.train_lora", *overrides(model_dir, root, name, *more),
           f"hydra.run.dir={tmp_path}/hydra-{name}"]
    return subprocess.Popen(cmd, cwd=ROOT, text=True, **kwargs)


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """Three adapters of the demo data: nested messages in-process, the same data as JSON text,
    and nested on two Ray Train workers through the command-line entry point."""
    tmp = tmp_path_factory.mktemp("train_lora")
    root = tmp / "lora"
    json_data = write_sample_dataset(tmp / "train_sample_json.parquet", json_messages=True)
    started = time.time()
    manifests = {"nested": train(tiny_model_dir, root, "nested")}
    manifests["json"] = train(tiny_model_dir, root, "json", f"data.path={json_data}")
    # One after another: on a small machine concurrent runs oversubscribe the cores and each
    # takes many times longer.
    ddp = train_subprocess(tiny_model_dir, root, "ddp", "train.workers=2", "train.batch_size=4", "ray.num_cpus=2",
                           tmp_path=tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = ddp.communicate(timeout=600)
    assert ddp.returncode == 0, out[-4000:]
    manifests["ddp"] = json.loads((root / "ddp" / "manifest.json").read_text())
    print(f"\ntraining: {time.time() - started:.0f}s for the three runs; "
          + "; ".join(f"{k}: {m['train_seconds']:.1f}s training, {m['tokens_per_second']:.0f} tokens/s, "
                      f"{m['wall_seconds']:.1f}s wall" for k, m in manifests.items()))
    return {"root": root, "manifests": manifests, "ddp_log": out, "model_dir": tiny_model_dir}


def test_registry_holds_exactly_the_adapter_files(trained, capsys):
    root = trained["root"]
    assert sorted(os.listdir(root)) == [".runs", "ddp", "json", "nested"]  # no staging leftovers
    # Beside the registry: each run's TensorBoard events; its checkpoints went at publishing.
    assert {n: os.listdir(root / ".runs" / n) for n in os.listdir(root / ".runs")} == {
        n: ["tensorboard"] for n in ("ddp", "json", "nested")}
    for name in ("ddp", "json", "nested"):
        assert sorted(os.listdir(root / name)) == ADAPTER_FILES

    registry = AdapterRegistry(root)
    assert registry.names() == ["ddp", "json", "nested"]
    adapter = registry.resolve("nested")
    assert adapter.base_model == "tiny-llama-3.1"
    assert adapter.rank == 8
    assert adapter.target_modules == tuple(sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    config = json.loads((root / "nested" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny-llama-3.1"  # not this machine's path

    m = trained["manifests"]["nested"]
    assert m["adapter"] == "nested"
    assert m["base_model"]["name"] == "tiny-llama-3.1"
    assert m["data"]["fingerprint"].startswith("sha256:")
    assert (m["data"]["rows"], m["data"]["train_examples"], m["data"]["validation_examples"]) == (48, 43, 5)
    assert m["steps"] == 48 and m["workers"] == 1
    assert m["train_loss"] < m["first_step_loss"] / 2
    assert m["validation_loss"] is not None and m["validation_loss"] < m["first_step_loss"] / 2
    assert m["tokens_per_second"] > 0
    assert m["config"]["train"]["lora"]["rank"] == 8 and m["config"]["prompt"]["date_string"] == "26 Jul 2024"
    assert {"torch", "transformers", "peft", "ray"} <= set(m["versions"])

    assert registry_cli(["--root", str(root)]) == 0
    table = capsys.readouterr().out
    assert "nested" in table and "tiny-llama-3.1" in table and f"{m['train_loss']:.4f}" in table


def test_json_text_messages_train_the_same_adapter(trained):
    """Messages as JSON text are the same conversations: same fingerprint, same run, same weights."""
    from safetensors.torch import load_file

    nested, as_json = trained["manifests"]["nested"], trained["manifests"]["json"]
    assert as_json["data"]["fingerprint"] == nested["data"]["fingerprint"]
    assert as_json["train_loss"] == nested["train_loss"]
    a = load_file(str(trained["root"] / "nested" / "adapter_model.safetensors"))
    b = load_file(str(trained["root"] / "json" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_ray_train_two_workers_matches_one(trained):
    """Two DDP workers with half the per-worker batch see the same examples per optimizer step, so
    they follow the single-process run up to floating-point summation order."""
    nested, ddp = trained["manifests"]["nested"], trained["manifests"]["ddp"]
    assert ddp["workers"] == 2 and ddp["steps"] == nested["steps"]
    assert ddp["data"]["fingerprint"] == nested["data"]["fingerprint"]
    # Summation order differs (two half batches, then an all-reduce) and compounds over the steps:
    # within 1e-4 on a quiet machine, up to 3.4e-4 seen on a loaded one. A wrong data split or
    # schedule shows up as a difference of 1e-2 or more.
    assert ddp["train_loss"] == pytest.approx(nested["train_loss"], rel=1e-3)
    assert ddp["validation_loss"] == pytest.approx(nested["validation_loss"], rel=1e-3)
    assert "Wrapping provided model in DistributedDataParallel" in trained["ddp_log"]
    assert "tokens/s" in trained["ddp_log"] and "ETA" in trained["ddp_log"]


def test_vllm_serves_the_adapters_by_name(trained, tiny_model_dir):
    """Greedy generation with each adapter gives the trained answer; without one it does not."""
    from tokenizers import Tokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    from pipeline.prompts import ChatTemplate

    registry = AdapterRegistry(trained["root"])
    adapters = registry.list()
    llm = LLM(model=str(tiny_model_dir), enable_lora=True, max_lora_rank=8, max_loras=len(adapters),
              max_model_len=1024, kv_cache_memory_bytes=256 * 2**20, enable_chunked_prefill=False, seed=0)
    template = ChatTemplate.from_model(tiny_model_dir)
    tokenizer = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    prompts = [
        TokensPrompt(prompt_token_ids=tokenizer.encode(
            template.render([{"role": "user", "content": q}], date_string="26 Jul 2024"), add_special_tokens=False).ids)
        for q in QUESTIONS
    ]
    greedy = SamplingParams(temperature=0, max_tokens=16)

    base = [o.outputs[0].text for o in llm.generate(prompts, greedy, use_tqdm=False)]
    assert all(SAMPLE_ANSWER not in text for text in base), base
    for adapter in adapters:
        request = LoRARequest(adapter.name, adapter.lora_int_id, str(adapter.path))
        outs = llm.generate(prompts, greedy, lora_request=request, use_tqdm=False)
        assert [o.outputs[0].text for o in outs] == [SAMPLE_ANSWER] * len(QUESTIONS), adapter.name
        assert all(o.outputs[0].finish_reason == "stop" for o in outs)  # it learned <|eot_id|> too


def test_train_on_float_serve_on_awq(trained, tiny_model_dir, tmp_path):
    """An AWQ model config trains on its float `train_path` and checks the adapter's target
    modules against the AWQ checkpoint's (quantized) module names before publishing."""
    from pipeline.models.awq import ensure_tiny_awq_model

    awq = ensure_tiny_awq_model(tmp_path / "tiny-awq", float_dir=tiny_model_dir)
    layers = json.loads((awq / "config.json").read_text())["num_hidden_layers"]
    match = check_adapter_matches(trained["root"] / "nested", awq)
    assert match.ok and match.missing == () and match.matched_modules == 7 * layers

    m = train(tiny_model_dir, tmp_path / "lora", "on-awq", "model.name=tiny-awq", f"model.path={awq}",
              f"model.train_path={tiny_model_dir}", "model.build=null", "train.max_steps=2")
    assert m["base_model"] == {"name": "tiny-awq", "path": str(awq), "train_path": str(tiny_model_dir)}
    assert m["served_model_check"] == {"model": str(awq), "checked": True, "matched_modules": 7 * layers}

    with pytest.raises(TrainConfigError, match="quantized checkpoint"):
        train(tiny_model_dir, tmp_path / "lora", "awq-only", f"model.path={awq}", "model.build=null")


def test_killed_run_leaves_no_adapter(tiny_model_dir, tmp_path):
    root = tmp_path / "lora"
    proc = train_subprocess(tiny_model_dir, root, "killed", "train.max_steps=100000", "train.log_every=1",
                            tmp_path=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        for line in proc.stdout:  # wait until it is training, adapter half made
            if "step 2/100000" in line:
                break
        else:
            pytest.fail("the training run ended before it started training")
        staging = [p.name for p in root.iterdir() if p.name != ".runs"]
        assert len(staging) == 1 and staging[0].startswith(".tmp-killed-")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    registry = AdapterRegistry(root)
    assert registry.list() == []
    assert "killed" not in registry
    # The next staging run cleans up what the killed one left.
    with registry.staging("next") as folder:
        (folder / "manifest.json").write_text("{}")
    assert sorted(os.listdir(root)) == [".runs", "next"]


def test_existing_adapter_is_refused_before_training(trained, tiny_model_dir):
    with pytest.raises(AdapterExists, match=r"adapter\.overwrite=true"):
        train(tiny_model_dir, trained["root"], "nested", "data.path=does/not/matter.parquet")


@pytest.fixture(scope="module")
def generated(trained, ray_session, tmp_path_factory):
    """The generation job on requests that name the `nested` adapter, none, or an unknown one;
    the request columns passed through, as a generate -> train loop needs them."""
    from pipeline.generate.job import run as generate

    tmp_path = tmp_path_factory.mktemp("generate")
    rows = []
    for i, question in enumerate(QUESTIONS * 2):
        row = {"prompt": None, "messages": None, "temperature": 0.0, "max_tokens": 16, "lora": None}
        if i % 2:
            row["messages"] = json.dumps([{"role": "system", "content": "Be brief."}, {"role": "user", "content": question}])
        else:
            row["prompt"] = question
        if i < len(QUESTIONS):
            row["lora"] = "nested"
        rows.append(row)
    rows.append({**rows[0], "lora": "no-such-adapter"})
    rows.append({**rows[1], "temperature": 7.5})  # invalid: an error row
    requests = tmp_path / "requests.parquet"
    pq.write_table(pa.Table.from_pylist(rows), requests)
    out = str(tmp_path / "out")
    generate(compose("generate", [
        "model=tiny", f"model.path={trained['model_dir']}", f"input={requests}", f"output.path={out}",
        "engine.kv_cache_gib=0.25", "ray.shutdown=false", "progress=false",
        f"lora_root={trained['root']}", "passthrough=[prompt,messages]",
    ]))
    got = {r["id"]: r for r in pq.read_table(Path(out) / "parts").to_pylist()}
    n = len(QUESTIONS)
    answers = [got[f"requests.parquet#{i}"] for i in range(len(rows))]
    return {"out": out, "rows": rows, "adapter": answers[:n], "base": answers[n : 2 * n],
            "unknown": answers[-2], "invalid": answers[-1]}


def test_generation_job_serves_registry_adapters_by_name(generated):
    assert [a["response"] for a in generated["adapter"]] == [SAMPLE_ANSWER] * len(QUESTIONS)
    assert all(a["lora"] == "nested" and a["error"] is None for a in generated["adapter"])
    unknown = generated["unknown"]["error"]
    assert "no-such-adapter" in unknown and "nested" in unknown  # names the adapters present


def test_generation_job_rows_without_lora_use_the_base_model(generated):
    """Rows without `lora` in the same batch as adapter rows get the base model's answer."""
    base = generated["base"]
    assert all(a["error"] is None and a["lora"] is None for a in base)
    assert all(SAMPLE_ANSWER not in a["response"] for a in base), [a["response"] for a in base]


def test_generation_output_trains_with_one_config_line(generated, trained, tmp_path):
    """The output folder (job.json, parts/, manifest.json) trains as it stands: prompt rows and
    messages rows alike, rows that failed skipped."""
    m = train(trained["model_dir"], tmp_path / "lora", "from-generation", f"data.path={generated['out']}",
              "data.prompt_column=prompt", "data.append_response_column=response", "train.max_steps=2")
    assert m["data"]["rows"] == len(generated["rows"])
    assert m["data"]["conversations"] == 2 * len(QUESTIONS)
    assert m["data"]["skipped"] == {"row has an error": 2}
    assert m["steps"] == 2
    assert AdapterRegistry(tmp_path / "lora").names() == ["from-generation"]


def test_labels_cover_exactly_the_assistant_turns(tiny_model_dir):
    """Loss is on each assistant answer and its <|eot_id|>, nothing else; one <|begin_of_text|>."""
    from tokenizers import Tokenizer

    from pipeline.train.labels import prepare_examples

    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "First answer."}, {"role": "user", "content": "Again?"},
            {"role": "assistant", "content": "Second answer."}]
    (example,), skipped, _ = prepare_examples([conv], str(tiny_model_dir), "26 Jul 2024", 1024)
    tok = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    runs, current = [], []
    for token, label in zip(example.input_ids, example.labels):
        if label != IGNORE:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    runs.append(current) if current else None
    assert [tok.decode(r, skip_special_tokens=False) for r in runs] == ["First answer.<|eot_id|>", "Second answer.<|eot_id|>"]
    assert example.input_ids.count(tok.token_to_id("<|begin_of_text|>")) == 1
    assert "Today Date: 26 Jul 2024" in tok.decode(example.input_ids, skip_special_tokens=False)


def test_config_errors_are_reported_together(tiny_model_dir, tmp_path):
    with pytest.raises(TrainConfigError) as e:
        train(tiny_model_dir, tmp_path, "../bad", "train.lora.rank=0", "data.prompt_column=prompt")
    text = str(e.value)
    assert "adapter.name" in text and "train.lora.rank" in text and "data.response_column" in text


def test_mixed_adapters_and_base_in_one_job_equal_separate_jobs(trained, tmp_path):
    """Two different adapters and the base model, mixed in every batch of one job, give the same
    rows as three jobs that each run one of them."""
    from pipeline.generate.job import run as generate
    from data.build_train_sample import sample_conversations

    other = "Ciao from the second adapter!"
    convs = [[{**m, "content": other} if m["role"] == "assistant" else m for m in c] for c in sample_conversations(48)]
    data = tmp_path / "second.parquet"
    pq.write_table(pa.table({"messages": [json.dumps(c) for c in convs]}), data)
    train(trained["model_dir"], trained["root"], "second", f"data.path={data}", "adapter.overwrite=true")

    # The first round greedy (answers checkable), the others sampled (seeded: still reproducible).
    rows = [{"uid": f"{lora}-{i}", "prompt": q, "lora": lora, "temperature": 0.0 if i < len(QUESTIONS) else 0.7,
             "max_tokens": 12}
            for i, q in enumerate(QUESTIONS * 3) for lora in ("nested", "second", None)]

    def job(name, selected):
        src = tmp_path / f"{name}.parquet"
        pq.write_table(pa.Table.from_pylist(selected), src)
        out = tmp_path / f"out-{name}"
        generate(compose("generate", [
            "model=tiny", f"model.path={trained['model_dir']}", f"input={src}", f"output.path={out}",
            "engine.kv_cache_gib=0.25", "ray.shutdown=false", "progress=false", "id_column=uid",
            f"lora_root={trained['root']}", "batch_size=36",
        ]))
        return {r["id"]: (r["response"], r["lora"], r["error"]) for r in pq.read_table(out / "parts").to_pylist()}

    mixed = job("mixed", rows)
    separate = {}
    for lora in ("nested", "second", None):
        separate.update(job(f"only-{lora}", [r for r in rows if r["lora"] == lora]))
    assert mixed == separate
    assert {mixed[f"second-{i}"][0] for i in range(len(QUESTIONS))} == {other}
    assert {mixed[f"nested-{i}"][0] for i in range(len(QUESTIONS))} == {SAMPLE_ANSWER}
    assert not {mixed[f"None-{i}"][0] for i in range(len(QUESTIONS))} & {other, SAMPLE_ANSWER}
