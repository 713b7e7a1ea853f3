"""Block-scaled FP8 GEMM against a float64 reference, and the accumulation emulator."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from finefp8 import gemm as G
from finefp8 import quantization as Q


def operands(m: int, n: int, k: int, seed: int, mag: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * mag
    w = torch.randn(n, k, generator=g) * mag * 0.05
    a, sa = Q.quantize_groupwise(x)
    b, sb = Q.quantize_blockwise(w)
    return a, sa, b, sb


def float64_reference(a, sa, b, sb) -> torch.Tensor:
    """``(A * sa) @ (B * sb).T`` from the dequantized operands, in float64."""
    return Q.dequantize_groupwise(a, sa, dtype=torch.float64) @ Q.dequantize_blockwise(b, sb, dtype=torch.float64).T


def rel_fro(c: torch.Tensor, ref: torch.Tensor) -> float:
    return float((c.double() - ref).norm() / ref.norm())


@given(m=st.integers(1, 300), n=st.integers(1, 700), k=st.integers(1, 700),
       seed=st.integers(0, 2**31 - 1), log_mag=st.floats(-3, 3))
def test_fp8_gemm_matches_float64_reference(m, n, k, seed, log_mag):
    a, sa, b, sb = operands(m, n, k, seed, 10.0**log_mag)
    c = G.fp8_gemm(a, sa, b, sb, out_dtype=torch.float32)
    ref = float64_reference(a, sa, b, sb)
    assert c.shape == (m, n) and c.dtype == torch.float32
    # fp32 accumulation error is relative to sum |a_k b_k|, not to |sum a_k b_k|: with a
    # single output a cancelling dot product can leave 1e-6 of the *result* behind.
    absolute = Q.dequantize_groupwise(a, sa, dtype=torch.float64).abs() @ \
        Q.dequantize_blockwise(b, sb, dtype=torch.float64).abs().T
    assert float((c.double() - ref).norm() / absolute.norm()) < 1e-6
    if m * n >= 64:
        assert rel_fro(c, ref) < 1e-6


def test_fp8_gemm_deepseek_shape_and_bf16_output():
    a, sa, b, sb = operands(64, 576, 1536, seed=3)
    ref = float64_reference(a, sa, b, sb)
    assert rel_fro(G.fp8_gemm(a, sa, b, sb, out_dtype=torch.float32), ref) < 1e-6
    cb = G.fp8_gemm(a, sa, b, sb)
    assert cb.dtype == torch.bfloat16
    assert rel_fro(cb, ref) < 2.0**-8  # bf16 output rounding only


def test_scales_enter_per_k_block():
    """Scales that differ per K block must be applied per block, not per row."""
    a, sa, b, sb = operands(8, 130, 384, seed=5)
    sa = sa * torch.tensor([1.0, 4.0, 0.25])
    ref = float64_reference(a, sa, b, sb)
    assert rel_fro(G.fp8_gemm(a, sa, b, sb, out_dtype=torch.float32), ref) < 1e-6
    wrong = (a.double() * sa[:, :1].double()) @ Q.dequantize_blockwise(b, sb, dtype=torch.float64).T
    assert rel_fro(wrong, ref) > 0.1


def test_promote_every_divisor_gives_same_result():
    a, sa, b, sb = operands(16, 256, 512, seed=9)
    c128 = G.fp8_gemm(a, sa, b, sb, out_dtype=torch.float32)
    c32 = G.fp8_gemm(a, sa, b, sb, out_dtype=torch.float32, promote_every=32)
    assert rel_fro(c32, c128.double()) < 1e-6


def test_interval_spanning_different_scales_is_refused():
    a, sa, b, sb = operands(4, 128, 256, seed=1)
    with pytest.raises(ValueError, match="spans scale blocks"):
        G.fp8_gemm(a, sa, b, sb, promote_every=256)
    with pytest.raises(ValueError, match="promote_every"):
        G.fp8_gemm(a, sa, b, sb, promote_every=0)


def test_bad_operands():
    a, sa, b, sb = operands(4, 128, 256, seed=1)
    with pytest.raises(TypeError, match="float8"):
        G.fp8_gemm(a.float(), sa, b, sb)
    with pytest.raises(ValueError, match="K differs"):
        G.fp8_gemm(a[:, :200], sa, b, sb)
    with pytest.raises(ValueError, match=r"b_scale has shape \(1, 1\), expected \(1, 2\)"):
        G.fp8_gemm(a, sa, b, sb[:, :1])
    with pytest.raises(ValueError, match="2-D"):
        G.fp8_gemm(a[None], sa, b, sb)


def row_scaled(x: torch.Tensor):
    """fp8 codes with one scale per row, expanded to the ``[rows, ceil(K/128)]`` grid."""
    q, s = Q.quantize_groupwise(x, group_size=x.shape[1])
    return q, s.expand(-1, math.ceil(x.shape[1] / 128)).contiguous()


def tensor_scaled(x: torch.Tensor):
    """fp8 codes with one scale for the whole tensor, as a ``[ceil(N/128), ceil(K/128)]`` grid."""
    q, s = Q.quantize_groupwise(x.reshape(1, -1), group_size=x.numel())
    grid = (math.ceil(x.shape[0] / 128), math.ceil(x.shape[1] / 128))
    return q.reshape(x.shape), s.reshape(1, 1).expand(grid).contiguous()


def test_limited_dot_with_many_bits_is_exact():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(8, 200, generator=g).to(torch.float8_e4m3fn).double()
    b = torch.randn(6, 200, generator=g).to(torch.float8_e4m3fn).double()
    assert torch.equal(G.limited_dot(a, b, accum_bits=60), a @ b.T)


def test_limited_dot_truncation_bound():
    """Each step truncates at most (mma_k + 1) terms by < 1 ulp of that step."""
    g = torch.Generator().manual_seed(1)
    a = torch.rand(16, 1024, generator=g).to(torch.float8_e4m3fn).double()
    b = torch.rand(16, 1024, generator=g).to(torch.float8_e4m3fn).double()
    exact = a @ b.T
    got = G.limited_dot(a, b, accum_bits=14)
    assert bool((got <= exact).all())  # positive terms truncate toward zero
    steps = 1024 // G.MMA_K
    assert float(((exact - got) / exact).max()) <= steps * (G.MMA_K + 1) * 2.0**-13
    assert float(((exact - got) / exact).max()) > 1e-4  # it does lose precision


def test_promotion_reduces_limited_accumulation_error():
    """The DeepSeek-V3 finding, small: promotion every 128 beats no promotion by >= 5x."""
    g = torch.Generator().manual_seed(2)
    x, w = torch.rand(32, 4096, generator=g), torch.rand(128, 4096, generator=g)
    a, sa = row_scaled(x)
    b, sb = tensor_scaled(w)
    ref = (a.double() * sa[:, :1].double()) @ (b.double() * sb[0, 0].double()).T
    never = G.fp8_gemm(a, sa, b, sb, out_dtype=torch.float32, promote_every=None, accum_bits=14)
    every = G.fp8_gemm(a, sa, b, sb, out_dtype=torch.float32, promote_every=128, accum_bits=14)
    exact = G.fp8_gemm(a, sa, b, sb, out_dtype=torch.float32, promote_every=None)
    err_never, err_every = rel_fro(never, ref), rel_fro(every, ref)
    assert err_never > 5 * err_every
    assert err_never > 1e-2 and err_every < 2e-3
    assert rel_fro(exact, ref) < 1e-6
