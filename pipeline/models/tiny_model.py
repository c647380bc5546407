"""The project's tiny model: Llama 3.1 Instruct's architecture, tokenizer layout and chat template
at a size that runs anywhere.

Tests and the CPU demo use it in place of the 8B model, so they need no download and no GPU.
Everything around the weights is shaped like Meta's checkpoint, so the code paths are the real ones:

* ``config.json``: ``LlamaForCausalLM`` with grouped-query attention, Llama 3.1's rope scaling
  (``rope_type: llama3``, factor 8) and rope theta, untied embeddings; float32 weights.
* ``tokenizer.json``: a byte-level BPE trained on `pipeline.models.tiny_corpus` with Llama 3's
  pre-tokenizer, followed by Llama 3.1's 256 special tokens in Meta's order at the end of the
  vocabulary; it prepends ``<|begin_of_text|>`` as Meta's does.
* ``tokenizer_config.json``: Meta's chat template (``pipeline/templates/llama-3.1-instruct.jinja``),
  ``bos_token`` ``<|begin_of_text|>`` and ``eos_token`` ``<|eot_id|>``.
* ``generation_config.json``: Meta's, with the tiny vocabulary's ids for the three stop tokens.
* ``model.safetensors``: random weights from a torch generator seeded with ``seed``.

The same seed gives byte-identical files. ``manifest.json`` is written last and lists every file's
sha256; a folder without it is not a finished build.

    python -m pipeline.models.tiny_model --out .cache/models/tiny-llama-3.1 [--seed 0]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
from importlib import resources
from pathlib import Path

MODEL_NAME = "tiny-llama-3.1"
MANIFEST = "manifest.json"
# Bumped whenever the files a given seed produces change, so a cached build from an older
# recipe is recognised as such.
RECIPE_VERSION = 1
TEMPLATE_FILE = "llama-3.1-instruct.jinja"

# Byte-level BPE vocabulary before the special tokens: the 256 bytes plus 1792 merges (the corpus
# yields at most about 2,240 entries). With the 256 special tokens the vocabulary is 2304.
BPE_VOCAB_SIZE = 2048

HIDDEN_SIZE = 256
NUM_LAYERS = 2
NUM_HEADS = 4  # head_dim 64: a size vLLM's CPU attention kernels support
NUM_KV_HEADS = 2  # grouped-query attention, as in the 8B model (32 query heads, 8 KV heads)
INTERMEDIATE_SIZE = 512
INIT_STD = 0.02  # Meta's initializer_range

# Llama 3's pre-tokenizer split (tokenizer.json of meta-llama/Llama-3.1-8B-Instruct).
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def special_tokens() -> list[str]:
    """Llama 3.1's 256 special tokens in Meta's order (ids 128000-128255 in the 8B model)."""
    named = [
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
    reserved = [f"<|reserved_special_token_{i}|>" for i in range(3, 256 - len(named) + 3)]
    return named + reserved


def chat_template() -> str:
    """Meta's Llama 3.1 Instruct chat template, as shipped in this package."""
    return resources.files("pipeline").joinpath("templates", TEMPLATE_FILE).read_text(encoding="utf-8")


# ---- tokenizer ----------------------------------------------------------------------------


def train_tokenizer():
    """Byte-level BPE on the repository's own corpus, with Llama 3's pre-tokenizer, decoder and
    post-processor, and the special tokens appended after the learned vocabulary."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from pipeline.models.tiny_corpus import TEXT

    tokenizer = Tokenizer(models.BPE(ignore_merges=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    # The template is part of the corpus so the prompt scaffolding tokenizes compactly.
    tokenizer.train_from_iterator([TEXT, chat_template()], trainer=trainer)
    if tokenizer.get_vocab_size() != BPE_VOCAB_SIZE:
        raise RuntimeError(f"the BPE trainer learned {tokenizer.get_vocab_size()} tokens, expected {BPE_VOCAB_SIZE}")

    tokenizer.add_special_tokens(special_tokens())
    bos = "<|begin_of_text|>"
    bos_id = tokenizer.token_to_id(bos)
    tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, bos_id)]
            ),
        ]
    )
    return tokenizer


def token_id(tokenizer, token: str) -> int:
    tid = tokenizer.token_to_id(token)
    if tid is None:
        raise KeyError(token)
    return tid


# ---- config files -------------------------------------------------------------------------


def model_config(vocab_size: int, bos_id: int, eos_ids: list[int]) -> dict:
    """config.json with the keys and values of Meta's Llama 3.1 8B Instruct, at the tiny size."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": bos_id,
        "eos_token_id": eos_ids,
        "head_dim": HIDDEN_SIZE // NUM_HEADS,
        "hidden_act": "silu",
        "hidden_size": HIDDEN_SIZE,
        "initializer_range": INIT_STD,
        "intermediate_size": INTERMEDIATE_SIZE,
        "max_position_embeddings": 131072,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": NUM_HEADS,
        "num_hidden_layers": NUM_LAYERS,
        "num_key_value_heads": NUM_KV_HEADS,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {
            "factor": 8.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "use_cache": True,
        "vocab_size": vocab_size,
    }


def generation_config(bos_id: int, eos_ids: list[int]) -> dict:
    # Meta's sampling defaults: vLLM starts from them where no SamplingParams are given.
    return {"bos_token_id": bos_id, "do_sample": True, "eos_token_id": eos_ids, "temperature": 0.6, "top_p": 0.9}


def tokenizer_config(tokenizer) -> dict:
    """tokenizer_config.json laid out like Meta's: every special token in added_tokens_decoder."""
    added = {
        str(token_id(tokenizer, t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in special_tokens()
    }
    return {
        "added_tokens_decoder": added,
        "bos_token": "<|begin_of_text|>",
        "chat_template": chat_template(),
        # Meta's says true; transformers 5 ignores it for BPE with a warning, and older versions
        # would strip the space before punctuation on decode.
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|eot_id|>",
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": 131072,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }


def special_tokens_map() -> dict:
    def entry(content):
        return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}

    return {"bos_token": entry("<|begin_of_text|>"), "eos_token": entry("<|eot_id|>")}


# ---- weights ------------------------------------------------------------------------------


def weight_shapes(vocab_size: int) -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names (Hugging Face's Llama layout) and shapes, in the order they are drawn."""
    head_dim = HIDDEN_SIZE // NUM_HEADS
    kv_dim = NUM_KV_HEADS * head_dim
    shapes = [("model.embed_tokens.weight", (vocab_size, HIDDEN_SIZE))]
    for i in range(NUM_LAYERS):
        p = f"model.layers.{i}"
        shapes += [
            (f"{p}.input_layernorm.weight", (HIDDEN_SIZE,)),
            (f"{p}.self_attn.q_proj.weight", (NUM_HEADS * head_dim, HIDDEN_SIZE)),
            (f"{p}.self_attn.k_proj.weight", (kv_dim, HIDDEN_SIZE)),
            (f"{p}.self_attn.v_proj.weight", (kv_dim, HIDDEN_SIZE)),
            (f"{p}.self_attn.o_proj.weight", (HIDDEN_SIZE, NUM_HEADS * head_dim)),
            (f"{p}.post_attention_layernorm.weight", (HIDDEN_SIZE,)),
            (f"{p}.mlp.gate_proj.weight", (INTERMEDIATE_SIZE, HIDDEN_SIZE)),
            (f"{p}.mlp.up_proj.weight", (INTERMEDIATE_SIZE, HIDDEN_SIZE)),
            (f"{p}.mlp.down_proj.weight", (HIDDEN_SIZE, INTERMEDIATE_SIZE)),
        ]
    shapes += [("model.norm.weight", (HIDDEN_SIZE,)), ("lm_head.weight", (vocab_size, HIDDEN_SIZE))]
    return shapes


def random_weights(vocab_size: int, seed: int) -> dict:
    """Normal(0, INIT_STD) matrices and unit norm scales, drawn in a fixed order from one
    generator so the result depends on the seed alone (not on transformers' init code)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in weight_shapes(vocab_size):
        if name.endswith("norm.weight"):
            weights[name] = torch.ones(shape, dtype=torch.float32)
        else:
            weights[name] = torch.randn(shape, generator=generator, dtype=torch.float32) * INIT_STD
    return weights


# ---- building -----------------------------------------------------------------------------


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def build_tiny_model(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """Write the tiny model's files into `out_dir` (created if needed; files of the same names
    are replaced) and return its path. The manifest is removed first and written last."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    names = _write_model_files(out, seed)
    manifest = {
        "model": MODEL_NAME,
        "recipe_version": RECIPE_VERSION,
        "seed": seed,
        "files": {name: _sha256(out / name) for name in sorted(names)},
    }
    _write_json(out / MANIFEST, manifest)
    return out


def _write_model_files(out: Path, seed: int) -> list[str]:
    from safetensors.torch import save_file

    tokenizer = train_tokenizer()
    vocab_size = tokenizer.get_vocab_size()
    bos_id = token_id(tokenizer, "<|begin_of_text|>")
    eos_ids = [token_id(tokenizer, t) for t in ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>")]

    tokenizer.save(str(out / "tokenizer.json"))
    _write_json(out / "tokenizer_config.json", tokenizer_config(tokenizer))
    _write_json(out / "special_tokens_map.json", special_tokens_map())
    _write_json(out / "config.json", model_config(vocab_size, bos_id, eos_ids))
    _write_json(out / "generation_config.json", generation_config(bos_id, eos_ids))
    weights = out / "model.safetensors"
    save_file(random_weights(vocab_size, seed), str(weights), metadata={"format": "pt"})
    weights.chmod(0o644)  # safetensors writes 0600; the model folder may be shared
    return [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "config.json",
        "generation_config.json",
        weights.name,
    ]


def read_manifest(model_dir: str | os.PathLike) -> dict | None:
    """The manifest of a finished build at `model_dir`, or None if there is none."""
    path = Path(model_dir) / MANIFEST
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError):
        return None


def _check_existing(out: Path, seed: int) -> Path | None:
    """`out` if it holds a finished build for `seed`; None if there is nothing there (or only an
    empty folder); an error for anything else, which is never overwritten."""
    manifest = read_manifest(out)
    if manifest is not None:
        if manifest.get("model") != MODEL_NAME:
            raise ValueError(f"{out} holds another model ({manifest.get('model')!r}): choose another path")
        if manifest.get("recipe_version") != RECIPE_VERSION:
            raise ValueError(
                f"{out} holds the tiny model as an older version of pipeline.models.tiny_model built it "
                f"(recipe {manifest.get('recipe_version')}, now {RECIPE_VERSION}): delete it and it is rebuilt"
            )
        if manifest.get("seed") != seed:
            raise ValueError(
                f"{out} holds the tiny model with seed {manifest.get('seed')}, not {seed}: "
                "delete it or choose another path"
            )
        return out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(
            f"{out} exists but holds no finished tiny model ({MANIFEST} missing): delete it or choose another path"
        )
    return None


def ensure_tiny_model(out_dir: str | os.PathLike, seed: int = 0) -> Path:
    """The tiny model at `out_dir`, built there first if it is missing.

    The build happens in a temporary folder beside `out_dir` and is renamed into place, so a
    reader never sees a half-written model; when several processes race, the first rename wins
    and the others discard their copy (the files are identical anyway).
    """
    out = Path(out_dir)
    if _check_existing(out, seed) is not None:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.build-", dir=out.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp's 0700 would otherwise become the model folder's mode
        build_tiny_model(tmp, seed=seed)
        try:
            # Replaces a missing or empty folder atomically; fails if another build got there first.
            os.rename(tmp, out)
        except OSError:
            if _check_existing(out, seed) is None:
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.models.tiny_model",
        description="Build the project's tiny Llama-3.1-architecture model (skipped if already built).",
    )
    parser.add_argument("--out", required=True, help="folder to build the model in")
    parser.add_argument("--seed", type=int, default=0, help="weights seed; the same seed gives the same files")
    args = parser.parse_args(argv)
    try:
        path = ensure_tiny_model(args.out, seed=args.seed)
    except ValueError as exc:
        parser.exit(2, f"error: {exc}\n")
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
