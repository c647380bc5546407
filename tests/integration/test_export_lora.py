"""`python -m jobs.export_lora` on adapters the training job wrote: each target round-trips, and
a refusal leaves nothing behind."""

from __future__ import annotations

import json
import os

import pytest

from data.build_train_sample import SAMPLE_ANSWER
from pipeline.cli import export_lora
from tests.integration.test_train_lora import QUESTIONS, train

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def registry(tiny_model_dir, tmp_path_factory):
    """`bonjour`: the demo adapter (rank 8); `wide`: rank 16, one step (only its shape matters)."""
    root = tmp_path_factory.mktemp("export") / "lora"
    train(tiny_model_dir, root, "bonjour", "train.report_to=none")
    train(tiny_model_dir, root, "wide", "train.report_to=none", "train.lora.rank=16", "train.max_steps=1")
    return root


def export(root, name, target, out):
    return export_lora([name, "--to", target, str(out), "--root", str(root)])


@pytest.mark.parametrize("target", ["peft", "workers-ai"])
def test_peft_and_workers_ai_write_exactly_the_two_adapter_files(registry, target, tmp_path):
    out = tmp_path / target
    assert export(registry, "bonjour", target, out) == 0
    assert sorted(os.listdir(out)) == ["adapter_config.json", "adapter_model.safetensors"]
    for name in os.listdir(out):
        assert (out / name).read_bytes() == (registry / "bonjour" / name).read_bytes()
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 8 and config["base_model_name_or_path"] == "tiny-llama-3.1"


def test_workers_ai_refuses_rank_16_and_writes_nothing(registry, tmp_path, capsys):
    out = tmp_path / "wai"
    with pytest.raises(SystemExit) as exit_info:
        export(registry, "wide", "workers-ai", out)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err == ("error: adapter 'wide' cannot be exported to workers-ai:\n"
                   "- rank: Workers AI accepts r <= 8 (this adapter: r=16); retrain with train.lora.rank=8 or lower\n")
    assert os.listdir(tmp_path) == []  # no output folder, no hidden leftover
    # The same adapter exports as plain PEFT files: the limit is Workers AI's, not the adapter's.
    assert export(registry, "wide", "peft", tmp_path / "peft") == 0


def test_an_existing_output_folder_is_refused(registry, tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit):
        export(registry, "bonjour", "peft", tmp_path / "taken")
    assert "already exists and is not an empty folder" in capsys.readouterr().err
    assert os.listdir(tmp_path / "taken") == ["keep.txt"]


def _greedy_transformers(model, tokenizer, prompts) -> list[str]:
    import torch

    answers = []
    for ids in prompts:
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False,
                                 eos_token_id=tokenizer.convert_tokens_to_ids("<|eot_id|>"), pad_token_id=0)
        answers.append(tokenizer.decode(out[0, len(ids):], skip_special_tokens=True))
    return answers


def test_merged_model_answers_as_base_plus_adapter(registry, tiny_model_dir, tmp_path):
    """The merged float checkpoint gives base+adapter's greedy answers: in transformers next to
    PEFT's unmerged model, and served by vLLM without LoRA."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from pipeline.prompts import ChatTemplate

    out = tmp_path / "merged"
    assert export(registry, "bonjour", "merged", out) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(out))
    assert "quantization_config" not in json.loads((out / "config.json").read_text())

    tokenizer = AutoTokenizer.from_pretrained(str(out))
    template = ChatTemplate.from_model(tiny_model_dir)
    prompts = [tokenizer.encode(template.render([{"role": "user", "content": q}], date_string="26 Jul 2024"),
                                add_special_tokens=False) for q in QUESTIONS]

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    with_adapter = PeftModel.from_pretrained(base, str(registry / "bonjour")).eval()
    expected = _greedy_transformers(with_adapter, tokenizer, prompts)
    assert expected == [SAMPLE_ANSWER] * len(QUESTIONS)
    merged = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert _greedy_transformers(merged, tokenizer, prompts) == expected

    llm = LLM(model=str(out), max_model_len=1024, kv_cache_memory_bytes=256 * 2**20,
              enable_chunked_prefill=False, seed=0)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts],
                        SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)
    assert [o.outputs[0].text for o in outs] == expected
