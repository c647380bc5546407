"""AWQ checkpoints (4-bit, GEMM packing) written exactly as AutoAWQ writes them.

The production model is an AutoAWQ checkpoint; tests and CPU demos need one that is small.
`quantize_to_awq` turns a float Llama checkpoint (safetensors) into that format:

* the decoder blocks' linear layers (q/k/v/o, gate/up/down) become, per layer,
  ``qweight`` int32 [in, out/8], ``qzeros`` int32 [in/group, out/8], ``scales`` float16 [in/group, out],
  4-bit values packed eight to an int32 in AutoAWQ's interleaved order (``AWQ_PACK_ORDER``);
* embeddings, norms and ``lm_head`` stay float16;
* ``config.json`` gets AutoAWQ's ``quantization_config``; tokenizer files and the generation config
  are copied.

Quantization is round-to-nearest, asymmetric, per group of ``group_size`` inputs. AutoAWQ's
activation-aware scale search needs calibration data and forward passes through the model; the
checkpoint format does not depend on it, and for a random test model it buys nothing. Each group's
range is widened to include 0 (as GPTQ does) and its scale is rounded *up* to float16, so the zero
point never clamps and every weight is within half a scale step of its float value.

`quantize_to_gptq` writes the other 4-bit layout vLLM's WNA16 path reads (AutoGPTQ's: symmetric,
packed along the input dimension, no activation order), so both formats can be tested.

`unpack_awq` and `dequantize_checkpoint` go the other way: the float weights the 4-bit model stands
for, computed exactly (in float32), which is what the vLLM tests compare the quantized model against.

    python -m pipeline.models.awq --out .cache/models/tiny-llama-3.1-awq [--seed 0] [--group-size 32]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

BITS = 4
PACK_FACTOR = 32 // BITS  # 4-bit values per int32
MAX_INT = 2**BITS - 1
# AutoAWQ's GEMM layout: nibble i (bits 4i..4i+3) of a packed int32 holds output column
# 8*j + AWQ_PACK_ORDER[i]. AWQ_UNPACK_ORDER is its inverse (column c sits in nibble UNPACK[c]).
AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_UNPACK_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)

DEFAULT_GROUP_SIZE = 128
# The tiny model's widths are small; 32 divides all of them and gives several groups per row.
TINY_GROUP_SIZE = 32
TINY_AWQ_MODEL_NAME = "tiny-llama-3.1-awq"
# Linear layers inside each decoder block that AutoAWQ quantizes for Llama.
QUANTIZED_PROJECTIONS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)
MANIFEST = "manifest.json"
WEIGHTS_FILE = "model.safetensors"
# Files of a checkpoint that are rewritten, not copied, when converting it.
_REWRITTEN = {"config.json", MANIFEST, "model.safetensors.index.json"}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


# ---------------------------------------------------------------------------------------------
# Tensors
# ---------------------------------------------------------------------------------------------


def quantize_rtn(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest 4-bit quantization of a linear weight [out, in], per group of inputs.

    Returns ``(intweight [out, in], zeros [out, in/group], scales [out, in/group])``: int32 values
    in 0..15, int32 zero points in 0..15, float16 scales. ``(intweight - zeros) * scales`` (per
    group) is the weight the checkpoint represents; see `dequantize_rtn`.
    """
    out_features, in_features = weight.shape
    _check_group_size(in_features, group_size, "weight")
    w = weight.detach().to(torch.float32).reshape(out_features, in_features // group_size, group_size)
    # Widen each range to include 0 so the zero point lies in 0..15 and never clamps.
    w_max = w.amax(dim=-1).clamp(min=0)
    w_min = w.amin(dim=-1).clamp(max=0)
    scales = ((w_max - w_min).clamp(min=1e-5) / MAX_INT).to(torch.float16)
    # Round the float16 scale up, never down: then (max - min) / scale <= 15 and no value clamps.
    too_small = scales.to(torch.float32) < (w_max - w_min) / MAX_INT
    scales = torch.where(too_small, torch.nextafter(scales, torch.full_like(scales, float("inf"))), scales)
    s = scales.to(torch.float32)
    zeros = torch.round(-w_min / s).clamp(0, MAX_INT)
    intweight = (torch.round(w / s[..., None]) + zeros[..., None]).clamp(0, MAX_INT)
    return (
        intweight.reshape(out_features, in_features).to(torch.int32),
        zeros.to(torch.int32),
        scales,
    )


def dequantize_rtn(
    intweight: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, group_size: int
) -> torch.Tensor:
    """The float32 weight [out, in] that 4-bit values, zero points and scales (all [out, ...]) stand for.

    Exact: (q - z) has 5 bits and a float16 scale 11, so their product fits float32's 24 bits.
    """
    out_features, in_features = intweight.shape
    q = intweight.to(torch.float32).reshape(out_features, in_features // group_size, group_size)
    w = (q - zeros.to(torch.float32)[..., None]) * scales.to(torch.float32)[..., None]
    return w.reshape(out_features, in_features)


def pack_int4_awq(values: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit values [rows, cols] (0..15) into int32 [rows, cols/8] in AutoAWQ's order."""
    rows, cols = values.shape
    if cols % PACK_FACTOR:
        raise ValueError(f"cannot pack {cols} columns: AWQ packs 8 values per int32, need a multiple of 8")
    v = values.to(torch.int64).reshape(rows, cols // PACK_FACTOR, PACK_FACTOR)[:, :, list(AWQ_PACK_ORDER)]
    shifts = torch.arange(0, 32, BITS, dtype=torch.int64)
    packed = (v << shifts).sum(dim=-1)
    # The sum is an unsigned 32-bit pattern; reinterpret it as the int32 the checkpoint stores.
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)
    return packed.to(torch.int32)


def unpack_int4_awq(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_int4_awq`: int32 [rows, cols/8] -> int32 values [rows, cols] in 0..15."""
    rows, packed_cols = packed.shape
    shifts = torch.arange(0, 32, BITS, dtype=torch.int32)
    # Arithmetic shift of negative int32s smears the sign bit, which the mask removes.
    nibbles = (packed.to(torch.int32)[..., None] >> shifts) & MAX_INT
    return nibbles[:, :, list(AWQ_UNPACK_ORDER)].reshape(rows, packed_cols * PACK_FACTOR)


def quantize_linear(weight: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
    """A float linear weight [out, in] as AutoAWQ's WQLinear_GEMM tensors: qweight, qzeros, scales."""
    intweight, zeros, scales = quantize_rtn(weight, group_size)
    if weight.shape[0] % PACK_FACTOR:
        raise ValueError(f"output size {weight.shape[0]} is not a multiple of 8: AWQ cannot pack it")
    return {
        "qweight": pack_int4_awq(intweight.t().contiguous()),
        "qzeros": pack_int4_awq(zeros.t().contiguous()),
        "scales": scales.t().contiguous(),
    }


def unpack_awq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """The float32 weight [out, in] (torch Linear layout) of one AWQ GEMM layer."""
    in_features = qweight.shape[0]
    _check_group_size(in_features, group_size, "qweight")
    if scales.shape[0] * group_size != in_features:
        raise ValueError(
            f"scales has {scales.shape[0]} groups but qweight has {in_features} inputs: "
            f"group size {group_size} does not match this layer"
        )
    intweight = unpack_int4_awq(qweight).t()
    zeros = unpack_int4_awq(qzeros).t()
    return dequantize_rtn(intweight, zeros, scales.t(), group_size)


# GPTQ (AutoGPTQ's format, symmetric, desc_act=False): the other 4-bit layout vLLM's WNA16 path
# takes. Values are packed eight to an int32 along the *input* dimension in plain order (row
# 8*i + j in bits 4j.. of packed row i); a value q stands for (q - 8) * scale.
GPTQ_BIAS = 8


def quantize_gptq_linear(weight: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
    """A float linear weight [out, in] as AutoGPTQ's tensors: qweight int32 [in/8, out], qzeros
    int32 [in/group, out/8] (AutoGPTQ's "zero - 1", i.e. 7, unused by symmetric kernels), scales
    float16 [in/group, out] and g_idx int32 [in] (each input's group)."""
    out_features, in_features = weight.shape
    _check_group_size(in_features, group_size, "weight")
    if in_features % PACK_FACTOR or out_features % PACK_FACTOR:
        raise ValueError(f"shape {out_features} x {in_features}: GPTQ packs 8 values per int32, need multiples of 8")
    w = weight.detach().to(torch.float32).reshape(out_features, in_features // group_size, group_size)
    # Symmetric: (q - 8) in -8..7, so the largest magnitude maps to 7 steps; float16 scale rounded up.
    amax = w.abs().amax(dim=-1).clamp(min=1e-5)
    scales = (amax / (GPTQ_BIAS - 1)).to(torch.float16)
    too_small = scales.to(torch.float32) < amax / (GPTQ_BIAS - 1)
    scales = torch.where(too_small, torch.nextafter(scales, torch.full_like(scales, float("inf"))), scales)
    q = (torch.round(w / scales.to(torch.float32)[..., None]) + GPTQ_BIAS).clamp(0, MAX_INT)
    intweight = q.reshape(out_features, in_features).to(torch.int32)
    groups = in_features // group_size
    zeros = torch.full((groups, out_features), GPTQ_BIAS - 1, dtype=torch.int32)
    return {
        "qweight": pack_int4_sequential(intweight).t().contiguous(),
        "qzeros": pack_int4_sequential(zeros),
        "scales": scales.t().contiguous(),
        "g_idx": torch.arange(in_features, dtype=torch.int32) // group_size,
    }


def pack_int4_sequential(values: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit values [rows, cols] into int32 [rows, cols/8], value 8*j + i in bits 4i.. (GPTQ)."""
    rows, cols = values.shape
    if cols % PACK_FACTOR:
        raise ValueError(f"cannot pack {cols} values: 8 per int32, need a multiple of 8")
    v = values.to(torch.int64).reshape(rows, cols // PACK_FACTOR, PACK_FACTOR)
    packed = (v << torch.arange(0, 32, BITS, dtype=torch.int64)).sum(dim=-1)
    return torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)


def unpack_int4_sequential(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_int4_sequential`."""
    rows, packed_cols = packed.shape
    nibbles = (packed.to(torch.int32)[..., None] >> torch.arange(0, 32, BITS, dtype=torch.int32)) & MAX_INT
    return nibbles.reshape(rows, packed_cols * PACK_FACTOR)


def unpack_gptq(qweight: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """The float32 weight [out, in] of one symmetric 4-bit GPTQ layer (qweight [in/8, out])."""
    intweight = unpack_int4_sequential(qweight.t().contiguous())  # [out, in]
    out_features, in_features = intweight.shape
    _check_group_size(in_features, group_size, "qweight")
    q = intweight.to(torch.float32).reshape(out_features, in_features // group_size, group_size)
    return ((q - GPTQ_BIAS) * scales.t().to(torch.float32)[..., None]).reshape(out_features, in_features)


def _check_group_size(in_features: int, group_size: int, what: str) -> None:
    if group_size <= 0 or in_features % group_size:
        raise ValueError(
            f"group size {group_size} does not divide the {what}'s {in_features} inputs "
            f"(use --group-size / group_size= with a divisor, e.g. 32 or 64 for the tiny model)"
        )


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def quantize_to_awq(
    float_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    group_size: int = DEFAULT_GROUP_SIZE,
    manifest_extra: dict | None = None,
) -> Path:
    """Write the AWQ (GEMM, 4-bit) checkpoint of the float Llama checkpoint in `float_dir` to `out_dir`.

    The directory appears complete or not at all (built beside it, then renamed); its manifest
    is written last, with `manifest_extra` merged in. Same input and group size, same bytes.
    """
    qcfg = {
        "quant_method": "awq",
        "bits": BITS,
        "group_size": group_size,
        "zero_point": True,
        "version": "gemm",
        "modules_to_not_convert": None,
    }
    method = "round-to-nearest, asymmetric, range widened to include 0, scales rounded up to float16"
    return _quantize_checkpoint(float_dir, out_dir, lambda w: quantize_linear(w, group_size), qcfg, method, manifest_extra)


def quantize_to_gptq(
    float_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    group_size: int = DEFAULT_GROUP_SIZE,
    manifest_extra: dict | None = None,
) -> Path:
    """Write the GPTQ (4-bit, symmetric, desc_act=False) checkpoint of a float Llama checkpoint,
    as AutoGPTQ lays it out; round-to-nearest, like `quantize_to_awq`."""
    qcfg = {
        "quant_method": "gptq",
        "bits": BITS,
        "group_size": group_size,
        "sym": True,
        "desc_act": False,
        "damp_percent": 0.01,
        "true_sequential": True,
        "static_groups": False,
        "checkpoint_format": "gptq",
    }
    method = "round-to-nearest, symmetric (q - 8) * scale, scales rounded up to float16"
    return _quantize_checkpoint(float_dir, out_dir, lambda w: quantize_gptq_linear(w, group_size), qcfg, method, manifest_extra)


def _quantize_checkpoint(float_dir, out_dir, quantize, qcfg: dict, method: str, manifest_extra: dict | None) -> Path:
    float_dir, out_dir = Path(float_dir), Path(out_dir)
    config = json.loads((float_dir / "config.json").read_text())
    if "quantization_config" in config:
        raise ValueError(f"{float_dir.name}: already quantized ({config['quantization_config'].get('quant_method')})")
    tensors, sources = _read_weights(float_dir)

    out: dict[str, torch.Tensor] = {}
    quantized = 0
    for name in sorted(tensors):
        module, _, leaf = name.rpartition(".")
        if leaf == "weight" and _is_quantized_module(module):
            try:
                out.update({f"{module}.{k}": v for k, v in quantize(tensors[name]).items()})
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
            quantized += 1
        else:
            out[name] = tensors[name].to(torch.float16) if tensors[name].is_floating_point() else tensors[name]
    if not quantized:
        raise ValueError(f"{float_dir.name}: no decoder-block linear layers found (is this a Llama checkpoint?)")

    config["quantization_config"] = qcfg
    config["dtype" if "dtype" in config else "torch_dtype"] = "float16"
    manifest = {
        "kind": qcfg["quant_method"],
        "quantization_config": qcfg,
        "method": method,
        "quantized_linear_layers": quantized,
        "source_weights_sha256": sources,
        **(manifest_extra or {}),
    }
    return _write_checkpoint(float_dir, out_dir, out, config, manifest)


def dequantize_checkpoint(awq_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Write the float checkpoint that the AWQ (or GPTQ) checkpoint in `awq_dir` represents to `out_dir`.

    Dequantized linear weights are float32, the exact value of (q - zero) * scale; a loader that
    casts them to float16 or bfloat16 gets the same rounding as a kernel that dequantizes in
    float32 and casts. Everything else is copied unchanged; ``quantization_config`` is dropped.
    """
    awq_dir, out_dir = Path(awq_dir), Path(out_dir)
    config = json.loads((awq_dir / "config.json").read_text())
    qcfg = config.pop("quantization_config", None) or {}
    kind = qcfg.get("quant_method")
    if kind == "awq":
        if qcfg.get("bits") != BITS or str(qcfg.get("version", "")).lower() != "gemm":
            raise ValueError(f"{awq_dir.name}: not a 4-bit GEMM AWQ checkpoint (quantization_config: {qcfg})")
        if not qcfg.get("zero_point", True):
            raise ValueError(f"{awq_dir.name}: AWQ without zero points is not supported")
    elif kind == "gptq":
        if qcfg.get("bits") != BITS or not qcfg.get("sym") or qcfg.get("desc_act"):
            raise ValueError(f"{awq_dir.name}: only 4-bit symmetric GPTQ without desc_act is supported ({qcfg})")
    else:
        raise ValueError(f"{awq_dir.name}: not a 4-bit AWQ or GPTQ checkpoint (quantization_config: {qcfg or None})")
    group_size = int(qcfg["group_size"])
    tensors, sources = _read_weights(awq_dir)

    out: dict[str, torch.Tensor] = {}
    dequantized = 0
    for name in sorted(tensors):
        module, _, leaf = name.rpartition(".")
        if leaf == "qweight":
            if kind == "awq":
                out[f"{module}.weight"] = unpack_awq(
                    tensors[name], tensors[f"{module}.qzeros"], tensors[f"{module}.scales"], group_size
                )
            else:
                out[f"{module}.weight"] = unpack_gptq(tensors[name], tensors[f"{module}.scales"], group_size)
            dequantized += 1
        elif leaf not in ("qzeros", "scales", "g_idx") or f"{module}.qweight" not in tensors:
            out[name] = tensors[name]
    manifest = {
        "kind": f"{kind}-dequantized",
        "from_quantization_config": qcfg,
        "dequantized_linear_layers": dequantized,
        "source_weights_sha256": sources,
    }
    return _write_checkpoint(awq_dir, out_dir, out, config, manifest)


def ensure_tiny_awq_model(
    out_dir: str | os.PathLike,
    seed: int = 0,
    group_size: int = TINY_GROUP_SIZE,
    float_dir: str | os.PathLike | None = None,
) -> Path:
    """The project's tiny model (`pipeline.models.tiny_model`, same seed) as an AWQ checkpoint at `out_dir`.

    Built on first use (a second or two); a finished one (manifest present) for the same seed,
    group size and tiny-model recipe is reused, anything else at `out_dir` is an error and is
    never overwritten. The float model comes from `float_dir` when given (built there if
    missing, e.g. a LoRA job's ``train_path``), else it is built in a temporary folder: the tiny
    model is deterministic, so both give the same weights.
    """
    from pipeline.models import tiny_model
    out_dir = Path(out_dir)
    wanted = {"model": TINY_AWQ_MODEL_NAME, "tiny_seed": seed, "tiny_recipe_version": tiny_model.RECIPE_VERSION}
    manifest_path = out_dir / MANIFEST
    if manifest_path.exists():
        manifest = json.loads(manifest_path.read_text())
        have = {k: manifest.get(k) for k in wanted}
        have_group = manifest.get("quantization_config", {}).get("group_size")
        if have == wanted and have_group == group_size:
            return out_dir
        raise ValueError(
            f"{out_dir} holds {have['model']!r} (seed {have['tiny_seed']}, group size {have_group}, "
            f"tiny recipe {have['tiny_recipe_version']}), not the tiny AWQ model with seed {seed}, group size "
            f"{group_size}, recipe {tiny_model.RECIPE_VERSION}: delete it (it is rebuilt) or choose another path"
        )
    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.float-", dir=_parent(out_dir)) as tmp:
        if float_dir is None:
            source = tiny_model.build_tiny_model(Path(tmp) / "float", seed=seed)
        else:
            source = tiny_model.ensure_tiny_model(float_dir, seed=seed)
        return quantize_to_awq(source, out_dir, group_size=group_size, manifest_extra=wanted)


def _is_quantized_module(module: str) -> bool:
    # e.g. model.layers.3.self_attn.q_proj
    parts = module.split(".")
    return any(module.endswith("." + p) for p in QUANTIZED_PROJECTIONS) and "layers" in parts


def _read_weights(model_dir: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of a safetensors checkpoint (single file or shards) and each file's sha256."""
    from safetensors.torch import load_file

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors weights")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update(load_file(f))
    return tensors, {f.name: _sha256(f) for f in files}


def _write_checkpoint(
    src_dir: Path, out_dir: Path, tensors: dict[str, torch.Tensor], config: dict, manifest: dict
) -> Path:
    from safetensors.torch import save_file

    _check_free(out_dir)
    stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.build-", dir=_parent(out_dir)))
    try:
        stage.chmod(0o755)  # mkdtemp's 0700 would become the model folder's mode
        save_file({k: v.contiguous() for k, v in tensors.items()}, stage / WEIGHTS_FILE, metadata={"format": "pt"})
        (stage / WEIGHTS_FILE).chmod(0o644)
        (stage / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for f in sorted(src_dir.iterdir()):
            if f.is_file() and f.name not in _REWRITTEN and not f.name.endswith(_WEIGHT_SUFFIXES):
                shutil.copyfile(f, stage / f.name)
        files = {f.name: _sha256(f) for f in sorted(stage.iterdir())}
        manifest = {**manifest, "files_sha256": files, "versions": _versions()}
        (stage / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        try:
            # Replaces a missing or empty folder atomically; fails if another build got there first.
            os.rename(stage, out_dir)
        except OSError:
            if not (out_dir / MANIFEST).exists():
                raise
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
    return out_dir


def _check_free(out_dir: Path) -> None:
    """Refuse to replace anything but a missing or empty folder."""
    if (out_dir / MANIFEST).exists():
        raise FileExistsError(f"{out_dir} already holds a finished checkpoint: delete it or choose another path")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} exists and is not empty ({MANIFEST} missing): delete it or choose another path")


def _parent(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.parent


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _versions() -> dict[str, str]:
    import safetensors

    return {"torch": torch.__version__.split("+")[0], "safetensors": safetensors.__version__}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.models.awq",
        description="Build the tiny model as an AutoAWQ (4-bit GEMM) checkpoint, or quantize a float Llama checkpoint.",
    )
    parser.add_argument("--out", required=True, help="folder to write the AWQ checkpoint to")
    parser.add_argument("--seed", type=int, default=0, help="seed of the tiny model (default 0)")
    parser.add_argument(
        "--group-size", type=int, default=None,
        help=f"inputs per quantization group (default {TINY_GROUP_SIZE} for the tiny model, "
        f"{DEFAULT_GROUP_SIZE} with --from)",
    )
    parser.add_argument("--from", dest="float_dir", help="quantize this float checkpoint instead of the tiny model")
    parser.add_argument("--format", choices=("awq", "gptq"), default="awq", help="checkpoint format with --from (default awq)")
    args = parser.parse_args(argv)
    try:
        if args.float_dir:
            quantize = quantize_to_gptq if args.format == "gptq" else quantize_to_awq
            path = quantize(args.float_dir, args.out, group_size=args.group_size or DEFAULT_GROUP_SIZE)
        else:
            path = ensure_tiny_awq_model(args.out, seed=args.seed, group_size=args.group_size or TINY_GROUP_SIZE)
    except (ValueError, FileExistsError, FileNotFoundError) as exc:
        parser.exit(2, f"error: {exc}\n")
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
