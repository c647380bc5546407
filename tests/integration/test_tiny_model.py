"""The tiny model: reproducible files, a tokenizer and template that behave like Llama 3.1's,
and weights that transformers and vLLM (CPU) both load and agree on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.models import tiny_model
from pipeline.prompts import ChatTemplate

# In-process engine: starts in seconds instead of spawning an engine-core process.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
TEMPLATE_PATH = REPO / "pipeline" / "templates" / "llama-3.1-instruct.jinja"
META_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather <b>&</b> été",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CONVERSATIONS = [
    ([{"role": "user", "content": "Hi"}], {}),
    (
        [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "Hi\n"}],
        {"date_string": "1 Jan 2025"},
    ),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}], {}),
    ([{"role": "system", "content": "S"}, {"role": "user", "content": "Weather in Paris?"}], {"tools": [WEATHER]}),
    ([{"role": "user", "content": "Weather?"}], {"tools": [WEATHER], "tools_in_user_message": False}),
    (
        [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
            {"role": "tool", "content": {"temperature": -3}},
            {"role": "tool", "content": "snow"},
        ],
        {"tools": [WEATHER]},
    ),
    (
        [
            {"role": "user", "content": "Search"},
            {"role": "assistant", "tool_calls": [{"function": {"name": "brave_search", "arguments": {"query": "q"}}}]},
            {"role": "ipython", "content": "result"},
        ],
        {"builtin_tools": ["brave_search", "code_interpreter"]},
    ),
]
ROUND_TRIP_TEXTS = [
    "",
    " ",
    "Hello, world!",
    "  leading and trailing spaces  ",
    "tabs\tand\r\nwindows newlines\n\n\n",
    "Ünïcödé: Ελλάδα, Москва, 東京, 서울, مرحبا, 🙂👍🏽",
    "a lone combining mark \u0301 and a zero-width joiner \u200d",
    '{"name": "get_weather", "parameters": {"city": "Paris"}}',
    "def f(x):\n    return x ** 2  # comment\n",
    "text with <|eot_id|> and <|python_tag|> inside",
    "\x00\x01 control bytes \x7f",
]


def file_hashes(model_dir: Path) -> dict:
    return json.loads((model_dir / tiny_model.MANIFEST).read_text())["files"]


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def fast_tokenizer(tiny_model_dir):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))


# ---- reproducible builds ----------------------------------------------------------------


def test_same_seed_same_files_other_seed_other_weights(tiny_model_dir, tmp_path):
    first = tiny_model.build_tiny_model(tmp_path / "a", seed=0)
    other_seed = tiny_model.build_tiny_model(tmp_path / "c", seed=1)
    # Another process (its own hash seeds) through the CLI must give the same bytes too.
    env = {**os.environ, "PYTHONHASHSEED": "123"}
    subprocess.run(
        [sys.executable, "-m", "pipeline.models.tiny_model", "--out", str(tmp_path / "b")], cwd=REPO, env=env, check=True,
        capture_output=True,
    )

    hashes = file_hashes(first)
    assert set(hashes) == {
        "config.json", "generation_config.json", "model.safetensors",
        "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json",
    }
    for name, digest in hashes.items():
        assert tiny_model._sha256(first / name) == digest
    assert file_hashes(tmp_path / "b") == hashes
    assert file_hashes(tiny_model_dir) == hashes, "the cached tiny model is stale: delete it"
    differing = {name for name, digest in file_hashes(other_seed).items() if hashes[name] != digest}
    assert differing == {"model.safetensors"}


def test_ensure_builds_once_and_refuses_foreign_folders(tmp_path):
    target = tmp_path / "models" / "tiny"
    assert tiny_model.ensure_tiny_model(target) == target
    weights_mtime = (target / "model.safetensors").stat().st_mtime_ns
    assert tiny_model.ensure_tiny_model(target) == target
    assert (target / "model.safetensors").stat().st_mtime_ns == weights_mtime
    assert sorted(p.name for p in target.parent.iterdir()) == ["tiny"], "no temporary folder left behind"

    with pytest.raises(ValueError, match="seed 0, not 1"):
        tiny_model.ensure_tiny_model(target, seed=1)
    half_built = tmp_path / "half"
    half_built.mkdir()
    (half_built / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no finished tiny model"):
        tiny_model.ensure_tiny_model(half_built)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (tiny_model.ensure_tiny_model(empty) / tiny_model.MANIFEST).is_file()


def test_racing_builds_agree(tmp_path):
    target = tmp_path / "tiny"
    cmd = [sys.executable, "-m", "pipeline.models.tiny_model", "--out", str(target)]
    procs = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()
        assert out.decode().strip() == str(target)
    assert [p.name for p in tmp_path.iterdir()] == ["tiny"]
    assert file_hashes(target) == {n: tiny_model._sha256(target / n) for n in file_hashes(target)}


# ---- tokenizer and chat template ------------------------------------------------------------


def test_special_tokens_are_single_ids_at_the_end_in_metas_order(tiny_model_dir, fast_tokenizer, hf_tokenizer):
    vocab_size = json.loads((tiny_model_dir / "config.json").read_text())["vocab_size"]
    assert fast_tokenizer.get_vocab_size() == len(hf_tokenizer) == vocab_size
    specials = tiny_model.special_tokens()
    assert len(specials) == 256 and specials[: len(META_SPECIAL_TOKENS)] == META_SPECIAL_TOKENS
    assert specials[-1] == "<|reserved_special_token_247|>"
    first = vocab_size - len(specials)
    for offset, token in enumerate(specials):
        assert fast_tokenizer.encode(token, add_special_tokens=False).ids == [first + offset]
        assert hf_tokenizer.encode(token, add_special_tokens=False) == [first + offset]
    assert hf_tokenizer.bos_token == "<|begin_of_text|>" and hf_tokenizer.eos_token == "<|eot_id|>"
    assert fast_tokenizer.encode("Hi").ids[0] == hf_tokenizer.bos_token_id == first


def test_text_round_trips(fast_tokenizer, hf_tokenizer):
    for text in ROUND_TRIP_TEXTS:
        ids = fast_tokenizer.encode(text, add_special_tokens=False).ids
        assert fast_tokenizer.decode(ids, skip_special_tokens=False) == text
        assert hf_tokenizer.encode(text, add_special_tokens=False) == ids
        assert hf_tokenizer.decode(ids) == text
    # The BPE learned real merges: common words are single tokens.
    assert len(fast_tokenizer.encode(" the weather", add_special_tokens=False).ids) == 2


def test_text_round_trips_property(fast_tokenizer):
    hypothesis = pytest.importorskip("hypothesis")
    strategies = pytest.importorskip("hypothesis.strategies")

    @hypothesis.settings(max_examples=200, deadline=None, database=None)
    @hypothesis.given(strategies.text())
    def round_trip(text):
        ids = fast_tokenizer.encode(text, add_special_tokens=False).ids
        assert fast_tokenizer.decode(ids, skip_special_tokens=False) == text

    round_trip()


def test_config_files(tiny_model_dir, fast_tokenizer):
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["num_key_value_heads"] < config["num_attention_heads"]
    assert config["hidden_size"] // config["num_attention_heads"] == config["head_dim"] == 64
    assert config["rope_scaling"] == {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    assert config["rope_theta"] == 500000.0 and config["tie_word_embeddings"] is False
    generation = json.loads((tiny_model_dir / "generation_config.json").read_text())
    bos_id = fast_tokenizer.token_to_id("<|begin_of_text|>")
    eos_ids = [fast_tokenizer.token_to_id(t) for t in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")]
    assert generation["bos_token_id"] == config["bos_token_id"] == bos_id
    assert generation["eos_token_id"] == config["eos_token_id"] == eos_ids
    tokenizer_config = json.loads((tiny_model_dir / "tokenizer_config.json").read_text())
    assert tokenizer_config["chat_template"] == TEMPLATE_PATH.read_text(encoding="utf-8")
    assert (tokenizer_config["bos_token"], tokenizer_config["eos_token"]) == ("<|begin_of_text|>", "<|eot_id|>")


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_renderer_matches_transformers(tiny_model_dir, hf_tokenizer, add_generation_prompt):
    template = ChatTemplate.from_model(tiny_model_dir)
    for messages, kwargs in CONVERSATIONS:
        expected = hf_tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
        )
        assert template.render(messages, add_generation_prompt=add_generation_prompt, **kwargs) == expected


def test_the_jobs_preparer_encodes_a_shared_long_instruction_once_and_tokenizes_as_the_tokenizer(
        tiny_model_dir, fast_tokenizer):
    """Labelling rows: one long instruction, each row its own text. The job's preparer (its real
    tokenizer) gives every row the tokenizer's own tokens for the whole rendered prompt, while it
    encodes the instruction only for the first row (pipeline.generate.prepare.shared_pieces_once)."""
    from pipeline.generate.settings import GenerationSettings
    from pipeline.generate.tasks import preparer_for
    from tests.conftest import compose

    settings = GenerationSettings.from_config(compose("generate", ["model=tiny", f"model.path={tiny_model_dir}"]))
    preparer = preparer_for(settings, str(tiny_model_dir))
    template = ChatTemplate.from_model(tiny_model_dir)
    instruction = "Label the review as positive, negative or neutral; say only the label. " * 30
    for i, text in enumerate(["Great value, works as described.", "Broke after a week.", "It is a phone."] * 2):
        messages = [{"role": "system", "content": instruction}, {"role": "user", "content": text}]
        got = preparer.prepare_row(f"r{i}", json.dumps({"messages": messages}))["_prompt_token_ids"]
        prompt = template.render(messages, date_string=settings.prompt.date_string, add_generation_prompt=True)
        assert got == fast_tokenizer.encode(prompt, add_special_tokens=False).ids, text
    # The instruction (with the template's date lines) is the one long piece: encoded for the
    # first row, reused for the five others.
    info = preparer.encode_piece.cache_info()
    assert (info.misses, info.hits) == (1, 5)


# ---- the weights in transformers and vLLM ---------------------------------------------------


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def test_transformers_loads_the_model(hf_model):
    import torch

    config = hf_model.config
    assert config.rope_parameters["rope_type"] == "llama3" and config.rope_parameters["factor"] == 8.0
    assert hf_model.dtype == torch.float32
    assert not hf_model.lm_head.weight.data_ptr() == hf_model.model.embed_tokens.weight.data_ptr()


def test_vllm_generates_what_transformers_predicts(tiny_model_dir, fast_tokenizer, hf_model):
    import torch
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=str(tiny_model_dir),
        dtype="float32",
        max_model_len=2048,
        kv_cache_memory_bytes=256 * 2**20,  # the CPU default reserves several GiB
        enable_chunked_prefill=False,
        enforce_eager=True,  # skips torch.compile: the engine starts in seconds
        seed=0,
    )
    try:
        messages = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "Say hello."}]
        prompt = ChatTemplate.from_model(tiny_model_dir).render(messages)
        prompt_ids = fast_tokenizer.encode(prompt, add_special_tokens=False).ids
        params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=0)

        via_chat = llm.chat(messages, params, use_tqdm=False)[0]
        assert via_chat.prompt_token_ids == prompt_ids, "vLLM's own templating and tokenizing agree with ours"
        result = llm.generate([{"prompt_token_ids": prompt_ids}], params, use_tqdm=False)[0].outputs[0]
    finally:
        del llm
    generated = list(result.token_ids)
    assert len(generated) == 16 and generated == list(via_chat.outputs[0].token_ids)

    with torch.no_grad():
        logits = hf_model(torch.tensor([prompt_ids + generated])).logits[0, len(prompt_ids) - 1 : -1]
    logprobs = torch.log_softmax(logits, dim=-1)
    for step, token in enumerate(generated):
        # Greedy choice = transformers' argmax, up to float32 noise (the random model's logits are
        # close together, so an exact argmax comparison could flip on a near-tie).
        assert logits[step, token] >= logits[step].max() - 1e-4, f"step {step}"
        assert result.logprobs[step][token].logprob == pytest.approx(logprobs[step, token].item(), abs=1e-4)
