"""The Triton kernels, run on the CPU by Triton's interpreter, against the CPU reference.

Every test here runs with ``TRITON_INTERPRET=1``, which tests/kernels/conftest.py sets
before Triton is imported on machines without CUDA (on a GPU machine these tests skip and
test_triton_gpu.py runs the compiled kernels). Triton 3.9's interpreter casts fp32 to float8e4nv wrongly
(docs/gpu.md), so the tests are built not to be fooled by it:

* scales are compared exactly (they are computed before any cast);
* FP8 codes are compared with the reference code for code; the only differences
  accepted are the known defects of that cast (``finefp8.kernels.interpreter.cast_defect_mask``:
  a value that rounds up to a power of two comes out as half of it; an exact tie rounds
  away from zero instead of to even, common with bf16 inputs), and that set must stay small;
* the test data keep ``|x / s| >= 2**-6``, away from the subnormal codes, which the
  interpreter truncates instead of rounding;
* the GEMM takes FP8 inputs made by the reference quantizer, so no cast is involved.

Assertions or data choices that exist only because of the interpreter are marked
``INTERPRETER ONLY``; tests/kernels/test_triton_gpu.py checks the same things exactly on a GPU.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from finefp8 import gemm as G
from finefp8 import ops
from finefp8 import quantization as Q

pytest.importorskip("triton")

from finefp8.kernels.interpreter import cast_defect_mask  # noqa: E402
from finefp8.kernels.triton_gemm import fp8_gemm  # noqa: E402
from finefp8.kernels.triton_quant import act_quant, weight_dequant, weight_quant  # noqa: E402

pytestmark = pytest.mark.usefixtures("require_interpreter")

# Measured on 65536 codes: 2.1-2.4% with fp32 data, 5.6% with bf16 data and ue8m0 scales (ties).
MAX_DEFECT_FRACTION = 0.08


# ----------------------------------------------------------------------------- helpers


def codes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


def assert_codes(y: torch.Tensor, want: torch.Tensor, got: torch.Tensor) -> None:
    """Every code equals the reference's except the known interpreter defect, which stays rare."""
    assert got.dtype == want.dtype and got.shape == want.shape
    differ = codes(want) != codes(got)
    defect = cast_defect_mask(y, want, got)  # INTERPRETER ONLY
    other = differ & ~defect
    if other.any():
        i = tuple(int(v) for v in torch.nonzero(other)[0])
        raise AssertionError(f"{int(other.sum())} of {other.numel()} codes differ from the reference "
                             f"beyond the interpreter defect; first at {i}: x/s={float(y[i])!r}, "
                             f"want {float(want[i].float())}, got {float(got[i].float())}")
    # INTERPRETER ONLY: the defect stays rare (binomial slack of 3 sigma for small tensors)
    expected = MAX_DEFECT_FRACTION * defect.numel()
    assert int(defect.sum()) <= expected + 3 * math.sqrt(expected) + 3


def group_prequant(x: torch.Tensor, s: torch.Tensor, group: int = 128) -> torch.Tensor:
    """``x / s`` per group in fp32, as the reference computes it before the cast."""
    return x.float() / s.repeat_interleave(group, -1)[..., : x.shape[-1]]


def block_prequant(w: torch.Tensor, s: torch.Tensor, block=(128, 128)) -> torch.Tensor:
    return w.float() / Q.expand_block_scales(s, tuple(w.shape), block)


def activations(shape, seed: int, dtype=torch.float32) -> torch.Tensor:
    """Random activations: rows of magnitudes 1e-3..1e3, each value at least 1% of its group's amax.

    The lower bound keeps |x/s| >= 2**-6 (no subnormal codes: INTERPRETER ONLY reason).
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    x = torch.sign(x) * (x.abs() + 0.05)
    rows = 10.0 ** torch.empty(*shape[:-1], 1).uniform_(-3, 3, generator=g)
    return (x * rows).to(dtype)


def weights(shape, seed: int, dtype=torch.float32) -> torch.Tensor:
    """Random weights: 128x128 blocks of magnitudes 1e-3..1e3, values away from zero (as above)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    w = torch.sign(w) * (w.abs() + 0.05)
    grid = Q.block_grid(tuple(shape))
    mags = 10.0 ** torch.empty(grid).uniform_(-3, 3, generator=g)
    return (w * Q.expand_block_scales(mags, tuple(shape))).to(dtype)


def bf16_truncate(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> bf16 rounding toward zero: what the interpreter's bf16 store does (INTERPRETER ONLY)."""
    return (x.float().view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)


# ----------------------------------------------------------------------------- the defect model


def test_interpreter_defect_model_explains_every_mismatch():
    """With s = 1 exactly (amax = 448), codes are the bare cast: every mismatch is the defect."""
    g = torch.Generator().manual_seed(1)
    vals = 2.0 ** torch.empty(8, 127).uniform_(-6, math.log2(448), generator=g)
    vals[0, :4] = torch.tensor([31.32, 15.9, 0.4999, 1.99])  # round up across a power of two
    x = torch.cat([torch.full((8, 1), 448.0), vals * torch.sign(torch.randn(8, 127, generator=g))], 1)
    q, s = act_quant(x)
    assert torch.equal(s, torch.ones(8, 1))
    want, _ = Q.quantize_groupwise(x)
    assert_codes(x, want, q)
    # INTERPRETER ONLY: 31.32 must give the right code or exactly the documented wrong one.
    assert abs(float(q[0, 1].float())) in (32.0, 16.0)


# ----------------------------------------------------------------------------- act_quant


@pytest.mark.parametrize("shape", [(1, 200), (3, 5, 576), (4, 128 * 3 + 17), (2, 64)])
@pytest.mark.parametrize("scale_fmt", ["fp32", "ue8m0"])
def test_act_quant_matches_reference(shape, scale_fmt):
    x = activations(shape, seed=sum(shape))
    q, s = act_quant(x, 128, scale_fmt)
    want_q, want_s = Q.quantize_groupwise(x, 128, scale_fmt)
    assert s.shape == want_s.shape and torch.equal(s, want_s)
    assert q.shape == x.shape
    assert_codes(group_prequant(x, want_s), want_q, q)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_act_quant_input_dtypes(dtype):
    x = activations((3, 300), seed=7, dtype=dtype)
    q, s = act_quant(x)
    want_q, want_s = Q.quantize_groupwise(x)
    assert torch.equal(s, want_s)
    assert_codes(group_prequant(x, want_s), want_q, q)


def test_act_quant_zero_and_tiny_groups_give_finite_scales():
    x = activations((2, 384), seed=3)
    x[0, :128] = 0.0
    x[1, 128:256] = 1e-13 * torch.sign(x[1, 128:256])
    q, s = act_quant(x)
    want_q, want_s = Q.quantize_groupwise(x)
    assert torch.isfinite(s).all() and torch.equal(s, want_s)
    assert float(s[0, 0]) == pytest.approx(Q.AMAX_FLOOR / 448, rel=1e-6)
    assert torch.equal(codes(q[0, :128]), torch.zeros(128, dtype=torch.uint8))
    assert_codes(group_prequant(x, want_s), want_q, q)


def test_act_quant_nonfinite_raises_like_reference():
    x = activations((2, 256), seed=4)
    x[1, 200] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or Inf at token index \(1,\), channels 128:256"):
        act_quant(x, name="h")
    with pytest.raises(ValueError, match="NaN or Inf"):
        Q.quantize_groupwise(x, name="h")


def test_act_quant_allow_nonfinite_saturates_inf():
    x = activations((2, 256), seed=5)
    x[0, 3], x[0, 4], x[1, 130] = float("inf"), float("-inf"), float("nan")
    q, s = act_quant(x, allow_nonfinite=True)
    want_q, want_s = Q.quantize_groupwise(x, allow_nonfinite=True)
    assert torch.equal(s, want_s) and torch.isfinite(s).all()
    assert int(codes(q)[0, 3]) == 0x7E and int(codes(q)[0, 4]) == 0xFE  # +-448, not NaN
    # INTERPRETER ONLY: its fp8 cast of NaN is wrong too, so the NaN position is left out here.
    keep = torch.ones_like(x, dtype=torch.bool)
    keep[1, 130] = False
    y = group_prequant(torch.where(keep, x, 0.0), want_s)
    assert_codes(y[keep], want_q[keep], q[keep])


@settings(max_examples=12, deadline=None)
@given(rows=st.integers(1, 3), k=st.integers(1, 300), seed=st.integers(0, 2**16),
       scale_fmt=st.sampled_from(["fp32", "ue8m0"]))
def test_act_quant_property_scales_exact_for_any_k(rows, k, seed, scale_fmt):
    x = activations((rows, k), seed=seed)
    q, s = act_quant(x, 128, scale_fmt)
    want_q, want_s = Q.quantize_groupwise(x, 128, scale_fmt)
    assert torch.equal(s, want_s)
    assert_codes(group_prequant(x, want_s), want_q, q)


# ----------------------------------------------------------------------------- weights


@pytest.mark.parametrize("shape", [(129, 257), (576, 200), (64, 128), (1, 1)])
@pytest.mark.parametrize("scale_fmt", ["fp32", "ue8m0"])
def test_weight_quant_matches_reference(shape, scale_fmt):
    w = weights(shape, seed=shape[0] + shape[1])
    q, s = weight_quant(w, (128, 128), scale_fmt)
    want_q, want_s = Q.quantize_blockwise(w, (128, 128), scale_fmt)
    assert s.shape == want_s.shape and torch.equal(s, want_s)
    assert_codes(block_prequant(w, want_s), want_q, q)


def test_weight_quant_bf16_input_zero_block_and_small_blocks():
    w = weights((200, 150), seed=9, dtype=torch.bfloat16)
    w[:128, :128] = 0
    q, s = weight_quant(w, (64, 32))
    want_q, want_s = Q.quantize_blockwise(w, (64, 32))
    assert torch.isfinite(s).all() and torch.equal(s, want_s)
    assert torch.equal(codes(q[:128, :128]), torch.zeros(128, 128, dtype=torch.uint8))
    assert_codes(block_prequant(w, want_s, (64, 32)), want_q, q)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf / inf in numpy
def test_weight_quant_nonfinite_raises_naming_the_block():
    w = weights((300, 300), seed=2)
    w[260, 5] = float("inf")
    with pytest.raises(ValueError, match=r"'layer.w' has NaN or Inf in block \(2, 0\)"):
        weight_quant(w, name="layer.w")


def _all_finite_codes(shape, seed):
    g = torch.Generator().manual_seed(seed)
    c = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
    c[(c & 0x7F) == 0x7F] = 0x3C  # no NaN codes (the interpreter decodes them as 480, INTERPRETER ONLY)
    flat = c.view(-1)
    finite = torch.tensor([v for v in range(256) if v & 0x7F != 0x7F], dtype=torch.uint8)
    flat[: min(flat.numel(), finite.numel())] = finite[: flat.numel()]
    return c.view(torch.float8_e4m3fn)


@pytest.mark.parametrize("shape,block", [((200, 576), (128, 128)), ((1, 130), (128, 128)),
                                         ((65, 33), (32, 16))])
def test_weight_dequant_exact(shape, block):
    q = _all_finite_codes(shape, seed=shape[1])
    grid = Q.block_grid(shape, block)
    s = torch.rand(grid, generator=torch.Generator().manual_seed(0)) * 3 + 1e-3
    want32 = Q.dequantize_blockwise(q, s, block, torch.float32)
    assert torch.equal(weight_dequant(q, s, block, torch.float32), want32)
    assert torch.equal(weight_dequant(q, s, block, torch.float16), Q.dequantize_blockwise(q, s, block, torch.float16))
    got16 = weight_dequant(q, s.bfloat16(), block, torch.bfloat16)
    want16 = Q.dequantize_blockwise(q, s.bfloat16(), block, torch.bfloat16)
    # INTERPRETER ONLY: its fp32 -> bf16 store truncates; the fp32 value under it must be exact.
    assert torch.equal(got16, bf16_truncate(Q.dequantize_blockwise(q, s.bfloat16(), block, torch.float32)))
    assert ((got16.float() - want16.float()).abs() <= want16.float().abs() * 2.0**-7).all()


def test_weight_dequant_checks_scale_shape():
    q = _all_finite_codes((130, 130), seed=1)
    with pytest.raises(ValueError, match=r"expected \(2, 2\)"):
        weight_dequant(q, torch.ones(1, 2), name="w")


# ----------------------------------------------------------------------------- fp8_gemm


def gemm_operands(m: int, n: int, k: int, seed: int, scale_fmt: str = "fp32"):
    """FP8 operands made by the reference quantizer (no interpreter cast involved)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * 10.0 ** torch.empty(m, 1).uniform_(-2, 2, generator=g)
    w = torch.randn(n, k, generator=g) * 0.05
    a, sa = Q.quantize_groupwise(x, 128, scale_fmt)
    b, sb = Q.quantize_blockwise(w, (128, 128), scale_fmt)
    return a, sa, b, sb


def assert_gemm_close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-6) -> None:
    """|got - want| <= rel * max|want| elementwise (fp32 sums in a different order)."""
    assert got.shape == want.shape and got.dtype == want.dtype
    err = float((got.float() - want.float()).abs().max())
    assert err <= rel * float(want.abs().max()), f"max error {err:.3e} vs max |C| {float(want.abs().max()):.3e}"


@pytest.mark.parametrize("m,n,k", [(1, 576, 200), (5, 96, 128 * 2 + 3), (33, 130, 512), (64, 192, 128)])
def test_fp8_gemm_fp32_matches_reference(m, n, k):
    a, sa, b, sb = gemm_operands(m, n, k, seed=m + n + k)
    assert_gemm_close(fp8_gemm(a, sa, b, sb, torch.float32), G.fp8_gemm(a, sa, b, sb, torch.float32))


def test_fp8_gemm_split_k_and_ue8m0_scales():
    a, sa, b, sb = gemm_operands(5, 96, 128 * 4 + 3, seed=11, scale_fmt="ue8m0")
    cfg = {"BLOCK_M": 16, "BLOCK_N": 32, "SPLIT_K": 3, "GROUP_M": 2}
    got = fp8_gemm(a, sa, b, sb, torch.float32, config=cfg)
    assert_gemm_close(got, G.fp8_gemm(a, sa, b, sb, torch.float32))


def test_fp8_gemm_bf16_output():
    a, sa, b, sb = gemm_operands(3, 130, 300, seed=5)
    got = fp8_gemm(a, sa, b, sb, torch.bfloat16)
    want32 = G.fp8_gemm(a, sa, b, sb, torch.float32)
    assert got.dtype == torch.bfloat16
    # INTERPRETER ONLY: the bf16 store truncates, so allow one bf16 step (a GPU rounds: half a step).
    _, exp = torch.frexp(want32.abs())
    step = torch.ldexp(torch.ones_like(want32), exp - 8)
    assert ((got.float() - want32).abs() <= step + 1e-6 * want32.abs().max()).all()


def test_fp8_gemm_checks_operands():
    a, sa, b, sb = gemm_operands(4, 64, 256, seed=1)
    with pytest.raises(ValueError, match="a_scale has shape"):
        fp8_gemm(a, sa[:, :1], b, sb)
    with pytest.raises(TypeError, match="float8"):
        fp8_gemm(a.float(), sa, b, sb)


# ----------------------------------------------------------------------------- through finefp8.ops


def test_ops_forced_triton_runs_the_kernels_on_cpu():
    x = activations((2, 3, 200), seed=21)
    q, s = ops.quantize_groupwise(x, backend="triton")
    q2, s2 = act_quant(x)
    assert torch.equal(codes(q), codes(q2)) and torch.equal(s, s2)

    w = weights((130, 200), seed=22)
    wq, ws = ops.quantize_blockwise(w, backend="triton")
    assert torch.equal(ws, Q.quantize_blockwise(w)[1])
    assert torch.equal(ops.dequantize_blockwise(wq, ws, dtype=torch.float32, backend="triton"),
                      Q.dequantize_blockwise(wq, ws, dtype=torch.float32))

    xa, bias = torch.randn(3, 200), torch.randn(130)
    assert torch.equal(ops.weight_only_linear(xa, wq, ws, bias, backend="triton"),
                       torch.nn.functional.linear(xa, Q.dequantize_blockwise(wq, ws, dtype=torch.float32), bias))

    a, sa, b, sb = gemm_operands(1, 576, 200, seed=23)
    assert_gemm_close(ops.fp8_gemm(a, sa, b, sb, torch.float32, backend="triton"),
                      G.fp8_gemm(a, sa, b, sb, torch.float32))


def test_ops_forced_triton_refuses_what_the_kernels_do_not_do():
    x = activations((2, 200), seed=1)
    with pytest.raises(ValueError, match="power of two"):
        ops.quantize_groupwise(x, group_size=100, backend="triton")
    with pytest.raises(ValueError, match="E4M3"):
        ops.quantize_groupwise(x, fmt="e5m2", backend="triton")
    a, sa, b, sb = gemm_operands(2, 64, 128, seed=2)
    with pytest.raises(ValueError, match="accum_bits"):
        ops.fp8_gemm(a, sa, b, sb, torch.float32, accum_bits=14, backend="triton")
    with pytest.raises(ValueError, match="promote_every"):
        ops.fp8_gemm(a, sa, b, sb, torch.float32, promote_every=64, backend="triton")
    with pytest.raises(ValueError, match="does not implement"):
        ops.dequantize_groupwise(*Q.quantize_groupwise(x), backend="triton")


def test_ops_forced_triton_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        ops.quantize_groupwise(torch.randn(2, 128), backend="triton")


def test_ops_auto_on_cpu_never_picks_a_gpu_backend():
    for op in ("quantize_groupwise", "quantize_blockwise", "dequantize_blockwise", "fp8_gemm",
               "dequantize_groupwise", "weight_only_linear"):
        assert ops.select_backend(op, torch.device("cpu")) in ("cpu", "reference")
