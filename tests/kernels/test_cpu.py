"""The compiled CPU kernels (finefp8.kernels.cpu): bit-identical to the reference, and the fallback."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from finefp8 import ops
from finefp8 import quantization as Q
from finefp8.formats import E4M3, E5M2, decode, encode
from finefp8.kernels import cpu, cpu_build
from finefp8.kernels.capabilities import OpCall

needs_kernels = pytest.mark.skipif(not cpu.available(), reason="the CPU kernels did not build")

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _codes(q: torch.Tensor) -> torch.Tensor:
    return q.view(torch.uint8)


def _same_quant(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> None:
    assert a[0].dtype == b[0].dtype == torch.float8_e4m3fn
    assert a[0].shape == b[0].shape and a[1].shape == b[1].shape
    diff = int((_codes(a[0]) != _codes(b[0])).sum())
    assert diff == 0, f"{diff} codes differ"
    assert torch.equal(a[1], b[1]), "scales differ"


def _weights(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random values over many magnitudes, with an all-zero band and a tiny band."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.exp(torch.empty(shape).uniform_(-12, 6, generator=g))
    if x.shape[0] > 2:
        x[: x.shape[0] // 3] *= 1e-3
        x[-1:] = 0.0
    return x.to(dtype)


# ----------------------------------------------------------------------------- the fp8 cast


def _tie_values() -> torch.Tensor:
    """Every E4M3 value, every midpoint between neighbours (the ties), their fp32 neighbours."""
    vals = decode(torch.arange(0, 0x7F, dtype=torch.uint8), E4M3).double()  # 0 .. 448
    mids = (vals[1:] + vals[:-1]) / 2
    above = torch.tensor([448.0, 456.0, 464.0, 472.0, 480.0, 500.0, 1e4, 3e38], dtype=torch.float64)
    base = torch.cat([vals, mids, above]).float()
    up = torch.nextafter(base, torch.tensor(float("inf")))
    down = torch.nextafter(base, torch.tensor(0.0))
    pos = torch.cat([base, up, down])
    return torch.cat([pos, -pos])


@needs_kernels
def test_cast_matches_encode_code_for_code():
    g = torch.Generator().manual_seed(1)
    parts = [
        _tie_values(),
        torch.randn(1_000_000, generator=g) * torch.exp(torch.empty(1_000_000).uniform_(-16, 8, generator=g)),
        torch.empty(500_000).uniform_(-2.0**-6, 2.0**-6, generator=g),  # E4M3 subnormal range
        torch.randint(-(2**31), 2**31 - 1, (500_000,), generator=g, dtype=torch.int64)
        .to(torch.int32).view(torch.float32),  # random bit patterns: denormals, NaN, Inf
        torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), -float("nan")]),
    ]
    x = torch.cat(parts)
    got = cpu.cast_e4m3(x)
    want = encode(x, E4M3, saturate=True)
    bad = (got != want).nonzero()
    assert bad.numel() == 0, f"{bad.numel()} codes differ, e.g. x={x[bad[0]].item()!r}"


# ----------------------------------------------------------------------------- quantization


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale_fmt", ["fp32", "ue8m0"])
@pytest.mark.parametrize("shape", [(1, 1), (576, 1536), (129, 257), (300, 700), (128, 128)])
def test_quantize_blockwise_identical(shape, dtype, scale_fmt):
    w = _weights(shape, dtype, seed=shape[0] * 7 + shape[1])
    _same_quant(cpu.quantize_blockwise(w, scale_fmt=scale_fmt),
                Q.quantize_blockwise(w, scale_fmt=scale_fmt))


@needs_kernels
@pytest.mark.parametrize("block_size", [(64, 32), (1, 128), (50, 37), (1000, 1000)])
def test_quantize_blockwise_other_blocks_and_floor(block_size):
    w = _weights((300, 200), torch.bfloat16, seed=3)
    _same_quant(cpu.quantize_blockwise(w, block_size, amax_floor=1e-4),
                Q.quantize_blockwise(w, block_size, amax_floor=1e-4))


@needs_kernels
@pytest.mark.parametrize("amax_floor", [0.0, 1e-30, 1e-4])
def test_zero_blocks_with_any_floor(amax_floor):
    """A zero block with floor 0 gives 0/0 = NaN codes in the reference: the kernels agree."""
    w = _weights((256, 300), torch.bfloat16, seed=9)
    w[:128, :128] = 0.0
    _same_quant(cpu.quantize_blockwise(w, amax_floor=amax_floor),
                Q.quantize_blockwise(w, amax_floor=amax_floor))
    _same_quant(cpu.quantize_groupwise(w, amax_floor=amax_floor),
                Q.quantize_groupwise(w, amax_floor=amax_floor))


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale_fmt", ["fp32", "ue8m0"])
@pytest.mark.parametrize("shape", [(1,), (7, 128), (3, 5, 300), (2, 1, 1000), (64, 576)])
def test_quantize_groupwise_identical(shape, dtype, scale_fmt):
    x = _weights(shape, dtype, seed=sum(shape))
    _same_quant(cpu.quantize_groupwise(x, scale_fmt=scale_fmt),
                Q.quantize_groupwise(x, scale_fmt=scale_fmt))


@needs_kernels
@pytest.mark.parametrize("group_size", [1, 32, 100, 4096])
def test_quantize_groupwise_other_groups(group_size):
    x = _weights((9, 700), torch.float32, seed=group_size)
    _same_quant(cpu.quantize_groupwise(x, group_size), Q.quantize_groupwise(x, group_size))


@needs_kernels
def test_quantize_non_contiguous_input():
    w = _weights((400, 300), torch.bfloat16, seed=5).T
    _same_quant(cpu.quantize_blockwise(w), Q.quantize_blockwise(w))
    _same_quant(cpu.quantize_groupwise(w), Q.quantize_groupwise(w))


@needs_kernels
def test_quantize_threads_split_gives_same_result():
    w = _weights((1024, 640), torch.bfloat16, seed=11)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu.quantize_blockwise(w)
        torch.set_num_threads(max(2, threads))
        many = cpu.quantize_blockwise(w)
    finally:
        torch.set_num_threads(threads)
    _same_quant(one, many)
    _same_quant(one, Q.quantize_blockwise(w))


@needs_kernels
@given(m=st.integers(1, 300), n=st.integers(1, 300), log_mag=st.floats(-6, 4),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_quantize_property_identical(m, n, log_mag, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(m, n, generator=g) * 10.0**log_mag).to(dtype)
    _same_quant(cpu.quantize_blockwise(w), Q.quantize_blockwise(w))
    _same_quant(cpu.quantize_groupwise(w), Q.quantize_groupwise(w))


# The kernels compute the code of the correctly rounded quotient fl(x / s): they divide, or
# multiply by 1/s when s is a power of two (1/s is then exact, so the product is the quotient;
# cpu_kernels.c, quant_run_avx2). These tests put x / s within a few fp32 ulps of every E4M3
# rounding midpoint, where a multiplication by a rounded reciprocal fl(1/s) changes codes:
# they would catch a kernel that took that shortcut.


def _rows_with_amax(amax: torch.Tensor, values: list[torch.Tensor]) -> torch.Tensor:
    """[R, 128] rows: column 0 = +-amax[i], columns 1..127 = values[i] cycled; 128 rows per i.

    Every 1x128 group and every 128x128 block then has the amax amax[i] (so the scale
    s = amax[i] / 448), and holds the values[i] (all |v| <= amax[i]) in both signs.
    """
    blocks = []
    for a, v in zip(amax, values, strict=True):
        v = torch.cat([v, -v])
        size = 127 * 128 * math.ceil(v.numel() / (127 * 128))  # whole 128-row blocks
        rows = v.repeat(math.ceil(size / v.numel()))[:size].view(-1, 127)
        first = a.expand(rows.shape[0], 1).clone()
        first[1::2] = -first[1::2]
        blocks.append(torch.cat([first, rows], dim=1))
    return torch.cat(blocks)


def _reciprocal_changes(w: torch.Tensor, scale: torch.Tensor, ref_q: torch.Tensor) -> int:
    """How many codes e4m3(fl(x * fl(1/s))) would get wrong (rows of one 1x128 group)."""
    y = w.float() * (1.0 / scale)
    return int((encode(y, E4M3, saturate=True) != _codes(ref_q)).sum())


def _near_midpoint_fp32(scale_fmt: str, amax_floor: float, seed: int) -> torch.Tensor:
    """fp32 rows whose quotients x / s lie within 4 ulps of every E4M3 midpoint.

    Amax values over many binades (and some whose scale is below 2^-126, with floor 0);
    for each, x = fl(m * s) and its 4 fp32 neighbours on each side, for every midpoint m
    between neighbouring E4M3 values (0 .. 432: the subnormal grid and every binade).
    """
    g = torch.Generator().manual_seed(seed)
    vals = decode(torch.arange(0, 0x7F, dtype=torch.uint8), E4M3).double()
    mids = (vals[1:] + vals[:-1]) / 2
    exps = torch.cat([torch.arange(-20, 21, 4), torch.tensor([-118, -121, 60, 120])]).double()
    amax = (torch.empty(exps.numel()).uniform_(1, 2, generator=g).double() * 2.0**exps).float()
    amax = amax[amax > amax_floor]  # a floored amax: x = m * s would exceed it
    scale = Q.scale_from_amax(amax, E4M3, scale_fmt, amax_floor)
    values = []
    for a, s in zip(amax, scale, strict=True):
        x = (mids * s.double()).float()
        near = [x]
        up, down = x, x
        for _ in range(4):
            up = torch.nextafter(up, torch.tensor(float("inf")))
            down = torch.nextafter(down, torch.tensor(0.0))
            near += [up, down]
        x = torch.cat(near)
        values.append(x[x <= a])
    return _rows_with_amax(amax, values)


def _all_below(amax: torch.Tensor, dtype: torch.dtype, ratio: float = 2.0**-21) -> list[torch.Tensor]:
    """For each amax: every positive finite value of dtype in [amax * ratio, amax]."""
    pos = torch.arange(0, 0x7C00 if dtype == torch.float16 else 0x7F80, dtype=torch.int32)
    allv = pos.to(torch.int16).view(dtype)
    return [allv[(allv <= a) & (allv >= a * ratio)] for a in amax]


def _exhaustive_16bit(dtype: torch.dtype) -> torch.Tensor:
    """16-bit rows: amax over mantissas (all 128 for bf16, 40 for fp16) in a few binades
    (2^-118: a scale below 2^-126), each with every value of the dtype from amax * 2^-21 to
    amax: every quotient x / s of those scales, exact ties included."""
    if dtype == torch.bfloat16:
        mant = torch.arange(0, 128, dtype=torch.int32)
        amax = torch.cat([((127 + e) * 128 + mant).to(torch.int16).view(torch.bfloat16)
                          for e in (0, -118)])
    else:
        g = torch.Generator().manual_seed(4)
        mant = torch.cat([torch.tensor([0, 320, 512, 1023]),
                          torch.randint(0, 1024, (36,), generator=g)]).to(torch.int32)
        amax = torch.cat([((15 + e) * 1024 + mant).to(torch.int16).view(torch.float16)
                          for e in (0, 12)])
    return _rows_with_amax(amax, _all_below(amax, dtype))


@needs_kernels
@pytest.mark.parametrize("scale_fmt", ["fp32", "ue8m0"])
@pytest.mark.parametrize("amax_floor", [Q.AMAX_FLOOR, 0.0])
def test_quantize_near_midpoints_fp32_code_for_code(scale_fmt, amax_floor):
    w = _near_midpoint_fp32(scale_fmt, amax_floor, seed=17)
    ref = Q.quantize_groupwise(w, 128, scale_fmt, amax_floor=amax_floor)
    if scale_fmt == "fp32":  # the inputs are hard: a plain reciprocal multiply fails here
        assert _reciprocal_changes(w, ref[1], ref[0]) > 100
    _same_quant(cpu.quantize_groupwise(w, 128, scale_fmt, amax_floor=amax_floor), ref)
    _same_quant(cpu.quantize_blockwise(w, (128, 128), scale_fmt, amax_floor=amax_floor),
                Q.quantize_blockwise(w, (128, 128), scale_fmt, amax_floor=amax_floor))


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale_fmt", ["fp32", "ue8m0"])
def test_quantize_exhaustive_16bit_inputs_code_for_code(dtype, scale_fmt):
    w = _exhaustive_16bit(dtype)
    ref = Q.quantize_groupwise(w, 128, scale_fmt, amax_floor=0.0)
    if scale_fmt == "fp32":
        assert _reciprocal_changes(w, ref[1], ref[0]) > 0
    _same_quant(cpu.quantize_groupwise(w, 128, scale_fmt, amax_floor=0.0), ref)
    _same_quant(cpu.quantize_blockwise(w, (128, 128), scale_fmt, amax_floor=0.0),
                Q.quantize_blockwise(w, (128, 128), scale_fmt, amax_floor=0.0))


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale_fmt", ["fp32", "ue8m0"])
def test_quantize_large_random_code_for_code(dtype, scale_fmt):
    """4 M values over 18 binades (heavy-tailed blocks): every code equals the reference's."""
    w = _weights((1024, 4096), dtype, seed=23)
    _same_quant(cpu.quantize_blockwise(w, scale_fmt=scale_fmt),
                Q.quantize_blockwise(w, scale_fmt=scale_fmt))
    _same_quant(cpu.quantize_groupwise(w, scale_fmt=scale_fmt),
                Q.quantize_groupwise(w, scale_fmt=scale_fmt))


@needs_kernels
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_raises_the_reference_error(bad):
    w = _weights((300, 300), torch.bfloat16, seed=2)
    w[200, 150] = bad
    with pytest.raises(ValueError, match=r"block \(1, 1\): rows 128:256, columns 128:256") as got:
        cpu.quantize_blockwise(w, name="layer.weight")
    assert "layer.weight" in str(got.value)
    with pytest.raises(ValueError, match=r"channels 128:256"):
        cpu.quantize_groupwise(w)
    _same_quant_nan = cpu.quantize_blockwise(w, allow_nonfinite=True)
    want = Q.quantize_blockwise(w, allow_nonfinite=True)
    assert torch.equal(_codes(_same_quant_nan[0]), _codes(want[0]))
    assert torch.equal(_same_quant_nan[1], want[1])
    got_g, want_g = cpu.quantize_groupwise(w, allow_nonfinite=True), Q.quantize_groupwise(w, allow_nonfinite=True)
    assert torch.equal(_codes(got_g[0]), _codes(want_g[0])) and torch.equal(got_g[1], want_g[1])


@needs_kernels
def test_kernels_refuse_inputs_outside_their_table():
    """float64 inputs and E5M2 codes are not in the "cpu" table: the kernels raise with the
    reason instead of running other code; argument errors are the reference's."""
    w = _weights((200, 300), torch.float64, seed=4)
    with pytest.raises(ValueError, match=r"backend 'cpu' cannot run this call: input dtype "
                                         r"torch.float64"):
        cpu.quantize_blockwise(w)
    with pytest.raises(ValueError, match="float64"):
        cpu.quantize_groupwise(w)
    with pytest.raises(ValueError, match="writes E4M3 codes only, not 'e5m2'"):
        cpu.quantize_blockwise(w.float(), fmt=E5M2)
    with pytest.raises(ValueError, match="writes E4M3 codes only"):
        cpu.quantize_groupwise(w.float(), fmt="e5m2")
    q5 = torch.zeros(200, 300, dtype=torch.float8_e5m2)
    with pytest.raises(ValueError, match="float8_e5m2 is not float8_e4m3fn"):
        cpu.dequantize_blockwise(q5, torch.ones(2, 3))
    with pytest.raises(ValueError, match="reads E4M3 codes only"):
        cpu.weight_only_linear(torch.randn(2, 300), q5, torch.ones(2, 3))
    # the reference's own argument checks, same messages
    with pytest.raises(ValueError, match="2-D"):
        cpu.quantize_blockwise(w.float()[0])
    with pytest.raises(ValueError, match="scale_fmt"):
        cpu.quantize_blockwise(w.float(), scale_fmt="e8m0")
    with pytest.raises(TypeError, match="already FP8"):
        cpu.quantize_groupwise(q5)
    with pytest.raises(ValueError, match="group_size"):
        cpu.quantize_groupwise(w.float(), 0)


@needs_kernels
@pytest.mark.parametrize("shape", [(256, 512), (300, 700), (64, 4096)])
def test_huge_page_outputs_give_the_same_results(monkeypatch, shape):
    """Large outputs are advised to use huge pages before the kernels write them: force
    that path on small tensors (aligned and unaligned rows) and compare."""
    monkeypatch.setattr(cpu, "_HUGE_OUTPUT_BYTES", 1)
    w = _weights(shape, torch.bfloat16, seed=shape[1])
    qb, sb = cpu.quantize_blockwise(w)
    _same_quant((qb, sb), Q.quantize_blockwise(w))
    _same_quant(cpu.quantize_groupwise(w), Q.quantize_groupwise(w))
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert torch.equal(cpu.dequantize_blockwise(qb, sb, dtype=dtype),
                           Q.dequantize_blockwise(qb, sb, dtype=dtype))
        qg, sg = Q.quantize_groupwise(w)
        assert torch.equal(cpu.dequantize_groupwise(qg, sg, dtype=dtype),
                           Q.dequantize_groupwise(qg, sg, dtype=dtype))


# ----------------------------------------------------------------------------- dequantization


def _random_codes(shape: tuple[int, ...], seed: int, nan: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    c = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    if not nan:
        c[(c & 0x7F) == 0x7F] = 0x3C
    return c.view(torch.float8_e4m3fn)


@needs_kernels
@pytest.mark.parametrize("dtype", OUT_DTYPES)
@pytest.mark.parametrize("nan", [False, True])
@pytest.mark.parametrize("shape", [(1, 1), (300, 700), (256, 512)])
def test_dequantize_identical(shape, dtype, nan):
    q = _random_codes(shape, seed=shape[1], nan=nan)
    g = torch.Generator().manual_seed(9)
    s = torch.rand(Q.block_grid(shape), generator=g) * 100 + 1e-3
    got, want = cpu.dequantize_blockwise(q, s, dtype=dtype), Q.dequantize_blockwise(q, s, dtype=dtype)
    assert got.dtype == want.dtype == dtype
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    sg = torch.rand(shape[0], -(-shape[1] // 128), generator=g) * 1e-3
    got, want = cpu.dequantize_groupwise(q, sg, dtype=dtype), Q.dequantize_groupwise(q, sg, dtype=dtype)
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dequantize_output_rounding_over_all_magnitudes(dtype):
    """Code 0x38 (1.0) times random fp32 scales: the kernels' fp32 -> bf16/fp16 rounding
    (ties, subnormal outputs, overflow to Inf) against torch's cast, value for value."""
    g = torch.Generator().manual_seed(12)
    bits = torch.randint(-(2**31), 2**31 - 1, (400_000,), generator=g, dtype=torch.int64)
    vals = bits.to(torch.int32).view(torch.float32).abs()
    vals = vals[torch.isfinite(vals) & (vals > 0) & (vals < 1e37)]
    q = torch.full((vals.numel(), 1), 0x38, dtype=torch.uint8).view(torch.float8_e4m3fn)
    got = cpu.dequantize_groupwise(q, vals[:, None], dtype=dtype)
    want = Q.dequantize_groupwise(q, vals[:, None], dtype=dtype)
    assert torch.equal(got, want)


@needs_kernels
def test_dequantize_roundtrip_and_shape_errors():
    w = _weights((257, 300), torch.float32, seed=8)
    q, s = cpu.quantize_blockwise(w, (64, 32))
    assert torch.equal(cpu.dequantize_blockwise(q, s, (64, 32), torch.float32),
                       Q.dequantize_blockwise(q, s, (64, 32), torch.float32))
    with pytest.raises(ValueError, match="scale shape"):
        cpu.dequantize_blockwise(q, s[:-1])
    x = _weights((3, 4, 300), torch.bfloat16, seed=6)
    qx, sx = cpu.quantize_groupwise(x, 100)
    assert torch.equal(cpu.dequantize_groupwise(qx, sx, 100), Q.dequantize_groupwise(qx, sx, 100))
    with pytest.raises(ValueError, match="scale shape"):
        cpu.dequantize_groupwise(qx, sx[..., :-1], 100)


# ----------------------------------------------------------------------------- linear and GEMM


def _rel_fro(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).norm() / ref.norm())


@needs_kernels
@pytest.mark.parametrize("tokens", [1, 3, 16, cpu.FUSED_LINEAR_MAX_TOKENS + 6])
@pytest.mark.parametrize("shape,block", [((300, 700), (128, 128)), ((257, 129), (128, 128)),
                                         ((100, 90), (50, 37)), ((384, 1024), (128, 128))])
def test_weight_only_linear_fp32_matches_float64(shape, block, tokens):
    n, k = shape
    g = torch.Generator().manual_seed(n + k + tokens)
    q, s = Q.quantize_blockwise(torch.randn(n, k, generator=g), block)
    x = torch.randn(tokens, k, generator=g)
    bias = torch.randn(n, generator=g)
    w64 = Q.dequantize_blockwise(q, s, block, dtype=torch.float64)
    ref = x.double() @ w64.T + bias.double()
    y = cpu.weight_only_linear(x, q, s, bias, block_size=block)
    assert y.dtype == torch.float32 and y.shape == (tokens, n)
    assert _rel_fro(y, ref) < 1e-6


@needs_kernels
def test_weight_only_linear_bf16_and_leading_dims():
    g = torch.Generator().manual_seed(4)
    q, s = Q.quantize_blockwise(torch.randn(256, 576, generator=g))
    x = torch.randn(2, 3, 576, generator=g).to(torch.bfloat16)
    y = cpu.weight_only_linear(x, q, s)
    ref = x.double() @ Q.dequantize_blockwise(q, s, dtype=torch.float64).T
    assert y.dtype == torch.bfloat16 and y.shape == (2, 3, 256)
    # the fused kernel is exact up to fp32 sums, then rounds once to bf16 (2**-9 relative)
    assert torch.all((y.double() - ref).abs() <= 2.0**-8 * ref.abs() + 1e-6 * ref.abs().max())
    assert _rel_fro(y, ref) < 2.0**-8


@needs_kernels
@pytest.mark.parametrize("tokens", [1, 2, 7, 16, cpu.FUSED_LINEAR_MAX_TOKENS])
@pytest.mark.parametrize("shape,block", [((300, 700), (128, 128)), ((257, 129), (128, 128)),
                                         ((100, 90), (50, 37)), ((70, 1000), (64, 256))])
def test_weight_only_linear_bf16_matches_float64(shape, block, tokens):
    """bf16 activations (the bf16 dot-product kernel where the CPU has AVX-512-BF16): every
    product is exact and summed in fp32, so y is the float64 result rounded once to bf16,
    up to fp32 summation error (bounded by 1e-5 of the sum of |products|)."""
    n, k = shape
    g = torch.Generator().manual_seed(n * k + tokens)
    q, s = Q.quantize_blockwise(torch.randn(n, k, generator=g), block)
    x = torch.randn(tokens, k, generator=g).to(torch.bfloat16)
    bias = torch.randn(n, generator=g).to(torch.bfloat16)
    bm, bn = block
    w64 = q.double() * s.double().repeat_interleave(bm, 0)[:n].repeat_interleave(bn, 1)[:, :k]
    ref = x.double() @ w64.T + bias.double()
    y = cpu.weight_only_linear(x, q, s, bias, block_size=block)
    assert y.dtype == torch.bfloat16 and y.shape == (tokens, n)
    bound = 2.0**-8 * ref.abs() + 1e-5 * (x.double().abs() @ w64.abs().T + bias.double().abs())
    assert bool(((y.double() - ref).abs() <= bound).all())


@needs_kernels
@pytest.mark.parametrize("tokens", [1, 2, 9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weight_only_linear_nan_code_propagates(dtype, tokens):
    g = torch.Generator().manual_seed(5)
    q, s = Q.quantize_blockwise(torch.randn(8, 256, generator=g))
    codes = q.view(torch.uint8).clone()
    codes[3, 200] = 0xFF
    x = torch.randn(tokens, 256, generator=g).to(dtype)
    y = cpu.weight_only_linear(x, codes.view(torch.float8_e4m3fn), s)
    assert torch.isnan(y[:, 3]).all() and torch.isfinite(y[:, [0, 1, 2, 4, 5, 6, 7]]).all()


@needs_kernels
@pytest.mark.parametrize("m", [1, 5, 100])
@pytest.mark.parametrize("n,k", [(300, 700), (257, 129)])
def test_fp8_gemm_matches_float64(m, n, k):
    g = torch.Generator().manual_seed(m * n + k)
    qa, sa = Q.quantize_groupwise(torch.randn(m, k, generator=g) * 3)
    qb, sb = Q.quantize_blockwise(torch.randn(n, k, generator=g))
    ref = Q.dequantize_groupwise(qa, sa, dtype=torch.float64) @ Q.dequantize_blockwise(qb, sb, dtype=torch.float64).T
    y = cpu.fp8_gemm(qa, sa, qb, sb, out_dtype=torch.float32)
    assert y.dtype == torch.float32 and _rel_fro(y, ref) < 1e-6
    # the accumulation emulator exists only in the reference: refused here, "auto" sends it there
    with pytest.raises(ValueError, match="accum_bits"):
        cpu.fp8_gemm(qa, sa, qb, sb, torch.float32, accum_bits=14)
    with pytest.raises(ValueError, match="promote_every=64"):
        cpu.fp8_gemm(qa, sa, qb, sb, torch.float32, promote_every=64)
    call = OpCall("fp8_gemm", torch.device("cpu"), qa.dtype, codes=(qa.dtype, qb.dtype),
                      sizes=(128,), accum_bits=14, promote_every=128)
    assert ops.select_backend("fp8_gemm", "cpu", call=call) == "reference"
    with pytest.raises(ValueError, match="a_scale"):
        cpu.fp8_gemm(qa, sa[:, :-1], qb, sb)


# ----------------------------------------------------------------------------- dispatch, fallback


@needs_kernels
def test_ops_auto_picks_cpu_and_reference_can_be_forced(monkeypatch):
    dev = torch.device("cpu")
    for op in cpu.CPU_OPS:
        assert ops.select_backend(op, dev) == "cpu"
        assert ops.select_backend(op, dev, "reference") == "reference"
    w = _weights((130, 260), torch.bfloat16, seed=1)
    _same_quant(ops.quantize_blockwise(w), Q.quantize_blockwise(w))

    def boom(*args, **kwargs):
        raise AssertionError("the cpu kernel ran although backend='reference' was forced")

    monkeypatch.setattr(cpu, "quantize_blockwise", boom)
    _same_quant(ops.quantize_blockwise(w, backend="reference"), Q.quantize_blockwise(w))


@needs_kernels
def test_fallback_when_the_library_is_unavailable(monkeypatch):
    """Without the C library "auto" runs the pure-torch code, a forced "cpu" raises, and the
    results equal what the C kernels computed (two independent implementations) and, for the
    linear layer, the float64 product."""
    w = _weights((130, 260), torch.bfloat16, seed=2)
    x = torch.randn(2, 260)
    with_c = cpu.quantize_blockwise(w), cpu.quantize_groupwise(w)
    monkeypatch.setattr(cpu_build, "_loaded", lambda: (None, "simulated: no library"))
    dev = torch.device("cpu")
    assert not cpu.available()
    assert ops.select_backend("quantize_blockwise", dev) == "reference"
    with pytest.raises(RuntimeError, match="backend 'cpu' is unavailable: .*simulated"):
        ops.select_backend("quantize_blockwise", dev, "cpu")
    with pytest.raises(RuntimeError, match="unavailable"):
        ops.quantize_blockwise(w, backend="cpu")
    with pytest.raises(RuntimeError, match="unavailable"):
        cpu.quantize_blockwise(w)
    _same_quant(ops.quantize_blockwise(w), with_c[0])
    _same_quant(ops.quantize_groupwise(w), with_c[1])
    q, s = with_c[0]
    y = ops.weight_only_linear(x, q, s)
    want = x.double() @ (q.double() * s.double().repeat_interleave(128, 0)[:130]
                         .repeat_interleave(128, 1)[:, :260]).T
    assert _rel_fro(y, want) < 1e-6


def test_build_failure_warns_once_and_falls_back(monkeypatch, tmp_path):
    monkeypatch.setenv("FINEFP8_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    lib, why = cpu_build.load()
    assert lib is None and "no C compiler" in why and "no-such-compiler" in why
    cpu_build.reset()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert not cpu.available()
            assert not cpu.available()
        msgs = [str(c.message) for c in caught if issubclass(c.category, RuntimeWarning)]
        assert len(msgs) == 1 and "pure-torch reference" in msgs[0] and "\n" not in msgs[0]
    finally:
        cpu_build.reset()


def test_disable_environment_variable(monkeypatch):
    monkeypatch.setenv("FINEFP8_DISABLE_CPU_KERNELS", "1")
    lib, why = cpu_build.load()
    assert lib is None and "FINEFP8_DISABLE_CPU_KERNELS" in why


@needs_kernels
def test_cpu_backend_rejects_what_it_cannot_run():
    with pytest.raises(ValueError, match="tensors are on cuda; it runs on cpu"):
        ops.select_backend("quantize_blockwise", torch.device("cuda"), "cpu")


@needs_kernels
def test_python_thread_pool_path_gives_the_same_results(monkeypatch):
    """Without OpenMP (a compiler without it, or a forked child) calls are split on the Python
    thread pool: the same codes, scales and values as the OpenMP path."""
    g = torch.Generator().manual_seed(21)
    w = _weights((1024, 640), torch.bfloat16, seed=21)
    x = torch.randn(9, 640, generator=g).to(torch.bfloat16)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with_omp = (cpu.quantize_blockwise(w), cpu.quantize_groupwise(w))
        qb, sb = with_omp[0]
        more = (cpu.dequantize_blockwise(qb, sb), cpu.weight_only_linear(x, qb, sb))
        monkeypatch.setattr(cpu_build, "openmp", lambda: False)
        _same_quant(cpu.quantize_blockwise(w), with_omp[0])
        _same_quant(cpu.quantize_groupwise(w), with_omp[1])
        assert torch.equal(cpu.dequantize_blockwise(qb, sb), more[0])
        assert torch.equal(cpu.weight_only_linear(x, qb, sb), more[1])
    finally:
        torch.set_num_threads(threads)


@needs_kernels
def test_quantize_into_preallocated_outputs():
    """``out=`` writes the same codes and scales as a fresh call, on the fast and fallback paths."""
    g = torch.Generator().manual_seed(11)
    w = torch.randn(300, 520, generator=g).to(torch.bfloat16)
    q_ref, s_ref = cpu.quantize_blockwise(w)
    out = (torch.empty(300, 520, dtype=torch.uint8), torch.empty(3, 5))
    q, s = cpu.quantize_blockwise(w, out=out)
    assert q.data_ptr() == out[0].data_ptr() and torch.equal(out[1], s_ref)
    assert torch.equal(out[0], q_ref.view(torch.uint8))
    # a NaN input is handed to the reference (allow_nonfinite): the result still lands in out
    wn = w.clone()
    wn[5, 7] = float("nan")
    outn = (torch.empty(300, 520, dtype=torch.uint8), torch.empty(3, 5))
    cpu.quantize_blockwise(wn, out=outn, allow_nonfinite=True)
    want_q, want_s = Q.quantize_blockwise(wn, allow_nonfinite=True)
    assert torch.equal(outn[0], want_q.view(torch.uint8)) and torch.equal(outn[1], want_s)
    x = torch.randn(4, 7, 200, generator=g)
    xq_ref, xs_ref = cpu.quantize_groupwise(x)
    xout = (torch.empty(4, 7, 200, dtype=torch.uint8), torch.empty(4, 7, 2))
    cpu.quantize_groupwise(x, out=xout)
    assert torch.equal(xout[0], xq_ref.view(torch.uint8)) and torch.equal(xout[1], xs_ref)
    with pytest.raises(ValueError, match="out must be"):
        cpu.quantize_blockwise(w, out=(torch.empty(300, 52, dtype=torch.uint8), torch.empty(3, 5)))
