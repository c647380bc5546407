"""AWQ GEMM packing and round-to-nearest quantization (`pipeline.models.awq`), checked against AutoAWQ's
layout on hand-made values and against a direct transcription of AutoAWQ's packing loop."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.models import awq
def autoawq_pack(intweight: torch.Tensor) -> torch.Tensor:
    """AutoAWQ's WQLinear_GEMM.from_linear packing loop, as written there: `intweight` is
    [in, out], column 8*c + order_map[i] goes to bits 4*i.. of packed column c."""
    order_map = [0, 2, 4, 6, 1, 3, 5, 7]
    qweight = torch.zeros(intweight.shape[0], intweight.shape[1] // 8, dtype=torch.int32)
    for col in range(intweight.shape[1] // 8):
        for i in range(8):
            qweight[:, col] |= intweight[:, col * 8 + order_map[i]].to(torch.int32) << (i * 4)
    return qweight


def random_ints(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 16, (rows, cols), generator=torch.Generator().manual_seed(seed), dtype=torch.int32)


def random_weight(out_features: int, in_features: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed)) * 0.02


# ---- the interleave order -----------------------------------------------------------------------


def test_interleave_order_on_a_hand_made_row():
    # Columns hold their own index: nibble i (bits 4i..4i+3) must hold column order[i], so read
    # from the lowest nibble up the packed word is 0,2,4,6,1,3,5,7, i.e. 0x75316420.
    packed = awq.pack_int4_awq(torch.arange(8, dtype=torch.int32)[None, :])
    assert packed.dtype == torch.int32
    assert packed.tolist() == [[0x75316420]]
    assert awq.AWQ_PACK_ORDER == (0, 2, 4, 6, 1, 3, 5, 7)


def test_high_nibble_sets_the_int32_sign_bit():
    # Column 7 lands in the top nibble; a value >= 8 there makes the stored int32 negative.
    row = torch.tensor([[0, 0, 0, 0, 0, 0, 0, 15]], dtype=torch.int32)
    assert awq.pack_int4_awq(row).tolist() == [[-(2**28)]]  # 0xF0000000 as int32
    assert awq.pack_int4_awq(torch.full((1, 8), 15, dtype=torch.int32)).tolist() == [[-1]]
    assert awq.unpack_int4_awq(torch.tensor([[-1]], dtype=torch.int32)).tolist() == [[15] * 8]


def test_packing_matches_autoawq_loop():
    values = random_ints(64, 96)
    assert torch.equal(awq.pack_int4_awq(values), autoawq_pack(values))


def test_unpack_inverts_pack():
    values = random_ints(32, 64, seed=1)
    assert torch.equal(awq.unpack_int4_awq(awq.pack_int4_awq(values)), values)
    assert awq.AWQ_UNPACK_ORDER == tuple(awq.AWQ_PACK_ORDER.index(c) for c in range(8))


def test_pack_refuses_columns_not_a_multiple_of_8():
    with pytest.raises(ValueError, match="multiple of 8"):
        awq.pack_int4_awq(torch.zeros(2, 12, dtype=torch.int32))


# ---- quantization -------------------------------------------------------------------------------


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_layer_tensors_shapes_and_dtypes(group_size):
    out_features, in_features = 192, 256
    t = awq.quantize_linear(random_weight(out_features, in_features), group_size)
    groups = in_features // group_size
    assert t["qweight"].shape == (in_features, out_features // 8) and t["qweight"].dtype == torch.int32
    assert t["qzeros"].shape == (groups, out_features // 8) and t["qzeros"].dtype == torch.int32
    assert t["scales"].shape == (groups, out_features) and t["scales"].dtype == torch.float16


def test_pack_unpack_round_trip_equals_rtn_dequantized_weights_exactly():
    weight, group_size = random_weight(128, 256, seed=2), 32
    intweight, zeros, scales = awq.quantize_rtn(weight, group_size)
    expected = awq.dequantize_rtn(intweight, zeros, scales, group_size)
    t = awq.quantize_linear(weight, group_size)
    got = awq.unpack_awq(t["qweight"], t["qzeros"], t["scales"], group_size)
    assert got.dtype == torch.float32 and got.shape == weight.shape
    assert torch.equal(got, expected)
    # and the packed tensors are AutoAWQ's: its own loop on the transposed integers
    assert torch.equal(t["qweight"], autoawq_pack(intweight.t().contiguous()))
    assert torch.equal(t["qzeros"], autoawq_pack(zeros.t().contiguous()))
    assert torch.equal(t["scales"], scales.t())


@pytest.mark.parametrize("seed", range(4))
def test_error_is_at_most_half_a_scale_step(seed):
    group_size = 64
    # a mix of scales, including rows that are all positive and all negative
    weight = random_weight(64, 256, seed=seed) * torch.logspace(-3, 1, 64)[:, None]
    weight[0] = weight[0].abs() + 0.5
    weight[1] = -weight[1].abs() - 0.5
    intweight, zeros, scales = awq.quantize_rtn(weight, group_size)
    assert int(intweight.min()) >= 0 and int(intweight.max()) <= 15
    assert int(zeros.min()) >= 0 and int(zeros.max()) <= 15
    error = (awq.dequantize_rtn(intweight, zeros, scales, group_size) - weight).abs()
    half_step = scales.to(torch.float32).repeat_interleave(group_size, dim=1) / 2
    # float32 rounding of w / scale can put a value a hair past the midpoint
    assert bool((error <= half_step * (1 + 1e-5)).all()), float((error / half_step).max())


def test_zero_and_constant_groups():
    weight = torch.zeros(8, 64)
    weight[1] = 0.25
    intweight, zeros, scales = awq.quantize_rtn(weight, 32)
    back = awq.dequantize_rtn(intweight, zeros, scales, 32)
    assert torch.equal(back[0], weight[0])
    assert torch.allclose(back[1], weight[1], rtol=0, atol=float(scales[1].max()) / 2)
    assert bool((scales > 0).all())


def test_group_size_must_divide_inputs():
    with pytest.raises(ValueError, match="group size 48 does not divide"):
        awq.quantize_rtn(random_weight(8, 64), 48)


# ---- checkpoints (a fake two-layer Llama; no transformers needed) -------------------------------


def write_float_checkpoint(path, hidden=64, inter=128, vocab=96, layers=2):
    from safetensors.torch import save_file

    path.mkdir()
    g = torch.Generator().manual_seed(0)
    t = {"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=g), "model.norm.weight": torch.ones(hidden)}
    t["lm_head.weight"] = torch.randn(vocab, hidden, generator=g)
    shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (32, hidden), "self_attn.v_proj": (32, hidden),
              "self_attn.o_proj": (hidden, hidden), "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden),
              "mlp.down_proj": (hidden, inter)}
    for i in range(layers):
        t[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(hidden)
        t[f"model.layers.{i}.post_attention_layernorm.weight"] = torch.ones(hidden)
        for name, shape in shapes.items():
            t[f"model.layers.{i}.{name}.weight"] = torch.randn(*shape, generator=g) * 0.02
    save_file(t, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "torch_dtype": "float32"}))
    (path / "tokenizer.json").write_text("{}")
    (path / "generation_config.json").write_text("{}")
    (path / "manifest.json").write_text("{}")
    return t


def test_checkpoint_layout_config_and_round_trip(tmp_path):
    from safetensors.torch import load_file

    source = write_float_checkpoint(tmp_path / "float")
    out = awq.quantize_to_awq(tmp_path / "float", tmp_path / "awq", group_size=32)

    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == {
        "quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm",
        "modules_to_not_convert": None,
    }
    assert config["torch_dtype"] == "float16"
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "manifest.json", "model.safetensors", "tokenizer.json",
    ]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["quantized_linear_layers"] == 14
    assert set(manifest["files_sha256"]) == {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"}

    tensors = load_file(str(out / "model.safetensors"))
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight"):
        assert tensors[name].dtype == torch.float16
    assert "model.layers.1.mlp.down_proj.weight" not in tensors
    assert tensors["model.layers.1.mlp.down_proj.qweight"].shape == (128, 8)
    assert tensors["model.layers.1.mlp.down_proj.qzeros"].shape == (4, 8)
    assert tensors["model.layers.1.mlp.down_proj.scales"].shape == (4, 64)

    back = awq.dequantize_checkpoint(out, tmp_path / "dequantized")
    assert "quantization_config" not in json.loads((back / "config.json").read_text())
    dense = load_file(str(back / "model.safetensors"))
    name = "model.layers.0.self_attn.k_proj.weight"
    assert dense[name].dtype == torch.float32
    assert torch.equal(dense[name], awq.dequantize_rtn(*awq.quantize_rtn(source[name], 32), 32))
    assert torch.equal(dense["lm_head.weight"], source["lm_head.weight"].half())


def test_checkpoint_is_deterministic_and_never_overwritten(tmp_path):
    write_float_checkpoint(tmp_path / "float")
    a = awq.quantize_to_awq(tmp_path / "float", tmp_path / "a", group_size=64)
    b = awq.quantize_to_awq(tmp_path / "float", tmp_path / "b", group_size=64)
    assert all((a / f.name).read_bytes() == f.read_bytes() for f in b.iterdir())
    with pytest.raises(FileExistsError):
        awq.quantize_to_awq(tmp_path / "float", a, group_size=64)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(FileExistsError, match="not empty"):
        awq.quantize_to_awq(tmp_path / "float", tmp_path / "other", group_size=64)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folders left


def test_checkpoint_names_the_layer_when_group_size_does_not_fit(tmp_path):
    write_float_checkpoint(tmp_path / "float")
    with pytest.raises(ValueError, match=r"model\.layers\.0\..*group size 128 does not divide"):
        awq.quantize_to_awq(tmp_path / "float", tmp_path / "awq", group_size=128)
    assert not (tmp_path / "awq").exists()


# ---- GPTQ (the other layout of vLLM's WNA16 path) -------------------------------------------------


def autogptq_pack(intweight: torch.Tensor) -> torch.Tensor:
    """AutoGPTQ's QuantLinear.pack loop: `intweight` is [in, out]; input row 8*r + j goes to
    bits 4*j.. of packed row r."""
    qweight = torch.zeros(intweight.shape[0] // 8, intweight.shape[1], dtype=torch.int64)
    for row in range(qweight.shape[0]):
        for j in range(8):
            qweight[row] |= intweight[row * 8 + j].to(torch.int64) << (4 * j)
    return torch.where(qweight >= 2**31, qweight - 2**32, qweight).to(torch.int32)


def test_gptq_layer_matches_autogptq_packing_and_round_trips():
    weight, group_size = random_weight(64, 128, seed=3), 32
    t = awq.quantize_gptq_linear(weight, group_size)
    assert t["qweight"].shape == (128 // 8, 64) and t["qweight"].dtype == torch.int32
    assert t["qzeros"].shape == (4, 64 // 8) and t["scales"].shape == (4, 64) and t["scales"].dtype == torch.float16
    assert t["g_idx"].tolist() == [i // group_size for i in range(128)]
    intweight = awq.unpack_int4_sequential(t["qweight"].t().contiguous())  # [out, in]
    assert torch.equal(t["qweight"], autogptq_pack(intweight.t().contiguous()))
    assert awq.unpack_int4_sequential(t["qzeros"]).unique().tolist() == [7]  # AutoGPTQ stores zero - 1
    back = awq.unpack_gptq(t["qweight"], t["scales"], group_size)
    step = t["scales"].t().to(torch.float32).repeat_interleave(group_size, dim=1)
    assert bool(((back - weight).abs() <= step / 2 * (1 + 1e-5)).all())
    # exact: the integers times the float16 scales
    expected = (intweight.to(torch.float32) - 8) * step
    assert torch.equal(back, expected)


def test_gptq_checkpoint_and_dequantized_round_trip(tmp_path):
    from safetensors.torch import load_file

    write_float_checkpoint(tmp_path / "float")
    out = awq.quantize_to_gptq(tmp_path / "float", tmp_path / "gptq", group_size=32)
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qcfg["quant_method"], qcfg["bits"], qcfg["group_size"], qcfg["sym"], qcfg["desc_act"]) == ("gptq", 4, 32, True, False)
    tensors = load_file(str(out / "model.safetensors"))
    back = load_file(str(awq.dequantize_checkpoint(out, tmp_path / "dense") / "model.safetensors"))
    name = "model.layers.1.mlp.down_proj"
    assert torch.equal(back[f"{name}.weight"], awq.unpack_gptq(tensors[f"{name}.qweight"], tensors[f"{name}.scales"], 32))
    assert not [k for k in back if k.endswith(("qweight", "qzeros", "scales", "g_idx"))]
