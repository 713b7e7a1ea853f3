"""FP8Linear against a float64 reference of the same math, for every mode and odd shapes."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from finefp8.nn import FP8Config, FP8Linear, resident_bytes
from finefp8.quantization import dequantize_blockwise, dequantize_groupwise


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    y, ref = y.detach(), ref.detach()
    return float((y.double() - ref.double()).norm() / ref.double().norm())


def make_linear(k: int, n: int, bias: bool = True, seed: int = 0, dtype=torch.float32) -> nn.Linear:
    torch.manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.mul_(1 + 4 * torch.rand(n, 1))  # rows of different magnitude
        if bias:
            lin.bias.normal_()
    return lin.to(dtype)


def reference(m: FP8Linear, x: torch.Tensor) -> torch.Tensor:
    """float64 ``dequant(quant(x)) @ dequant(W).T + b`` from the layer's own codes and scales."""
    w = dequantize_blockwise(m.weight, m.weight_scale_inv, m.block_size, torch.float64)
    if m.config.mode == "w8a8":
        q, s = m.quantize_input(x)
        xin = dequantize_groupwise(q, s, m.config.act_group_size, torch.float64)
    else:
        xin = x.double()
    y = xin @ w.T
    return y + m.bias.double() if m.bias is not None else y


def reference_abs(m: FP8Linear, x: torch.Tensor) -> torch.Tensor:
    """``|dequant(x)| @ |dequant(W)|.T + |b|``, the scale of the sum's terms."""
    w = dequantize_blockwise(m.weight, m.weight_scale_inv, m.block_size, torch.float64).abs()
    if m.config.mode == "w8a8":
        q, s = m.quantize_input(x)
        xin = dequantize_groupwise(q, s, m.config.act_group_size, torch.float64)
    else:
        xin = x.double()
    y = xin.abs() @ w.T
    return y + m.bias.double().abs() if m.bias is not None else y


SHAPES = [(576, 200, (5,)), (200, 576, (1,)), (130, 70, (2, 3)), (1536, 576, (4,)), (64, 1, (1, 1))]


@pytest.mark.parametrize("mode", ["w8a8", "weight_only"])
@pytest.mark.parametrize("k,n,lead", SHAPES)
def test_matches_float64_reference(mode, k, n, lead):
    lin = make_linear(k, n)
    m = FP8Linear.from_linear(lin, FP8Config(mode=mode))
    x = torch.randn(*lead, k) * (1 + torch.rand(*lead, 1) * 10)
    y = m(x)
    assert y.shape == (*lead, n) and y.dtype == torch.float32
    assert rel_err(y, reference(m, x)) < 1e-5
    # and the whole thing approximates the float layer (FP8 has a 2^-4 relative step)
    assert rel_err(y, lin(x)) < 0.06


@given(k=st.integers(1, 300), n=st.integers(1, 300), m_tokens=st.integers(1, 5),
       mode=st.sampled_from(["w8a8", "weight_only"]), bias=st.booleans(), seed=st.integers(0, 99))
def test_any_shape_property(k, n, m_tokens, mode, bias, seed):
    lin = make_linear(k, n, bias, seed)
    layer = FP8Linear.from_linear(lin, FP8Config(mode=mode))
    assert tuple(layer.weight_scale_inv.shape) == (math.ceil(n / 128), math.ceil(k / 128))
    x = torch.randn(m_tokens, k, generator=torch.Generator().manual_seed(seed))
    y = layer(x)
    assert torch.isfinite(y).all()
    # fp32 accumulation bound, elementwise: |y - ref| <= 1e-5 * (|x| @ |W|.T + |b|)
    ref, bound = reference(layer, x), reference_abs(layer, x)
    assert torch.all((y.double() - ref).abs() <= 1e-5 * bound + 1e-30)


@pytest.mark.parametrize("config", [
    FP8Config.per_tensor(),
    FP8Config.per_tensor(mode="weight_only"),
    FP8Config(mode="weight_only", scale_fmt="ue8m0"),
    FP8Config(scale_fmt="ue8m0"),
    FP8Config(act_granularity="token"),
    FP8Config(act_granularity="tensor"),
    FP8Config(weight_block=(256, 128)),
    FP8Config(weight_block=(128, 384)),
], ids=lambda c: c.describe())
def test_variants_match_reference(config):
    lin = make_linear(576, 300)
    m = FP8Linear.from_linear(lin, config)
    assert tuple(m.weight_scale_inv.shape) == config.scale_grid(300, 576)
    x = torch.randn(3, 7, 576)
    assert rel_err(m(x), reference(m, x)) < 1e-5
    assert rel_err(m(x), lin(x)) < 0.08


def test_per_tensor_has_one_scale_each():
    m = FP8Linear.from_linear(make_linear(576, 300), FP8Config.per_tensor())
    assert m.weight_scale_inv.shape == (1, 1)
    x = torch.randn(4, 576)
    q, s = m.quantize_input(x)
    assert s.shape == (4, 5) and torch.unique(s).numel() == 1
    assert torch.equal(s[0, 0], x.abs().amax() / 448)


def test_ue8m0_scales_are_powers_of_two():
    m = FP8Linear.from_linear(make_linear(576, 300), FP8Config(scale_fmt="ue8m0"))
    _, s = m.quantize_input(torch.randn(3, 576))
    for t in (m.weight_scale_inv, s):
        mant, _ = torch.frexp(t)
        assert torch.all(mant == 0.5)


def test_group_scales_are_per_token_per_128_channels():
    m = FP8Linear.from_linear(make_linear(576, 64))
    x = torch.randn(2, 576)
    _, s = m.quantize_input(x)
    assert s.shape == (2, 5)
    assert torch.equal(s[1, 4], x[1, 512:].abs().amax() / 448)


def test_act_only_keeps_float_weight_and_quantizes_input():
    lin = make_linear(200, 50)
    m = FP8Linear.from_linear(lin, FP8Config(mode="act_only"))
    assert m.weight.dtype == torch.float32 and m.weight_scale_inv is None
    assert torch.equal(m.weight, lin.weight)
    x = torch.randn(3, 200)
    ref = m.fake_quantize_input(x).double() @ lin.weight.double().T + lin.bias.double()
    assert rel_err(m(x), ref) < 1e-6
    assert 0 < rel_err(m(x), lin(x)) < 0.06


def test_bf16_input_gives_bf16_output():
    lin = make_linear(576, 200, dtype=torch.bfloat16)
    for mode in ("w8a8", "weight_only"):
        m = FP8Linear.from_linear(lin, FP8Config(mode=mode))
        assert m.bias.dtype == torch.bfloat16
        x = torch.randn(3, 576, dtype=torch.bfloat16)
        y = m(x)
        assert y.dtype == torch.bfloat16
        assert rel_err(y, reference(m, x)) < 1e-2


def test_zero_input_and_zero_weight_give_no_nan():
    lin = make_linear(300, 130, bias=False)
    with torch.no_grad():
        lin.weight[:128].zero_()
    m = FP8Linear.from_linear(lin)
    y = m(torch.zeros(2, 300))
    assert torch.equal(y, torch.zeros(2, 130))
    x = torch.randn(2, 300)
    x[:, 128:256] = 0
    y = m(x)
    assert torch.isfinite(y).all() and torch.equal(y[:, :128], torch.zeros(2, 128))


def test_empty_batch():
    m = FP8Linear.from_linear(make_linear(200, 30))
    assert m(torch.randn(0, 200)).shape == (0, 30)


def test_to_dtype_keeps_codes_and_fp32_scales():
    m = FP8Linear.from_linear(make_linear(576, 200))
    q, s = m.weight.clone(), m.weight_scale_inv.clone()
    m.to(torch.bfloat16)
    assert m.weight.dtype == torch.float8_e4m3fn and torch.equal(m.weight.view(torch.uint8),
                                                                 q.view(torch.uint8))
    assert m.weight_scale_inv.dtype == torch.float32 and torch.equal(m.weight_scale_inv, s)
    assert m.bias.dtype == torch.bfloat16
    m.float()
    assert m.weight.dtype == torch.float8_e4m3fn and m.bias.dtype == torch.float32


def test_state_dict_is_the_deepseek_layout():
    m = FP8Linear.from_linear(make_linear(576, 200))
    sd = m.state_dict()
    assert set(sd) == {"weight", "weight_scale_inv", "bias"}
    assert sd["weight"].dtype == torch.float8_e4m3fn and sd["weight_scale_inv"].shape == (2, 5)
    again = FP8Linear.from_quantized(sd["weight"], sd["weight_scale_inv"], sd["bias"])
    x = torch.randn(2, 576)
    assert torch.equal(again(x), m(x))


def test_from_quantized_widens_bf16_scales_exactly():
    m = FP8Linear.from_linear(make_linear(576, 200))
    s16 = m.weight_scale_inv.to(torch.bfloat16)
    m2 = FP8Linear.from_quantized(m.weight, s16)
    assert m2.weight_scale_inv.dtype == torch.float32
    assert torch.equal(m2.weight_scale_inv, s16.float())


def test_resident_memory_is_one_byte_a_parameter_plus_scales():
    n, k = 1000, 1200
    m = FP8Linear.from_linear(make_linear(k, n, bias=False))
    grid = math.ceil(n / 128) * math.ceil(k / 128)
    assert m.weight_bytes() == n * k + 4 * grid == resident_bytes(m)
    assert resident_bytes(m) / (n * k) < 1.001


@pytest.mark.parametrize("bad,match", [
    (dict(q=torch.zeros(200, 576, dtype=torch.uint8)), "view"),
    (dict(q=torch.zeros(200, 576)), "float8_e4m3fn"),
    (dict(scale_inv=torch.ones(1, 5)), "scale grid"),
    (dict(bias=torch.zeros(3)), "bias"),
])
def test_from_quantized_rejects_bad_tensors(bad, match):
    args = dict(q=torch.zeros(200, 576, dtype=torch.float8_e4m3fn), scale_inv=torch.ones(2, 5),
                bias=None)
    args.update(bad)
    with pytest.raises((TypeError, ValueError), match=match):
        FP8Linear.from_quantized(args["q"], args["scale_inv"], args["bias"], name="layer.x")


def test_errors_name_the_layer():
    m = FP8Linear.from_linear(make_linear(200, 30), name="model.layers.3.mlp.up_proj")
    with pytest.raises(ValueError, match="up_proj.*expected 200"):
        m(torch.randn(2, 100))
    x = torch.randn(2, 200)
    x[1, 5] = float("nan")
    with pytest.raises(ValueError, match="up_proj"):
        m(x)
    with pytest.raises(ValueError, match="cannot be used with the block-scaled GEMM"):
        FP8Linear.from_linear(make_linear(300, 300), FP8Config(weight_block=(64, 64)))
    # weight-only has no such constraint
    m64 = FP8Linear.from_linear(make_linear(300, 300), FP8Config(mode="weight_only",
                                                                 weight_block=(64, 64)))
    x = torch.randn(2, 300)
    assert rel_err(m64(x), reference(m64, x)) < 1e-5


def test_config_validation():
    for bad in (dict(mode="int8"), dict(scale_fmt="e8"), dict(weight_block=(0, 128)),
                dict(act_granularity="row"), dict(act_group_size=0), dict(promote_every=96)):
        with pytest.raises(ValueError):
            FP8Config(**bad)
    assert FP8Config.per_tensor().describe() == "w8a8 tensor act tensor fp32"
    assert FP8Config().replace(mode="weight_only").mode == "weight_only"


def test_extra_repr():
    r = repr(FP8Linear.from_linear(make_linear(576, 200)))
    assert "in_features=576" in r and "w8a8 block128x128 act group128 fp32" in r
