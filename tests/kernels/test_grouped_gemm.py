"""The grouped (over experts) block-scaled FP8 GEMM: reference, Triton kernel, ops dispatch.

The expectation is computed here, independently, in float64: each expert's weight is
dequantized (codes times its 128x128 block scale), A's rows are dequantized (codes times
their 1x128 group scale), and each expert's rows are multiplied by its weight. The
reference (fp32, promoted every 128 of K) and the Triton kernel must both match it to
fp32 rounding. The Triton tests run interpreted on the CPU (tests/kernels/conftest.py
sets ``TRITON_INTERPRET=1``); their FP8 inputs come from the reference quantizer, so the
interpreter's faulty fp32 -> fp8 cast is never involved. The ``gpu`` test runs the
compiled kernel on a CUDA device.
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

# ----------------------------------------------------------------------------- operands


def grouped_operands(counts: list[int], n: int, k: int, seed: int, scale_fmt: str = "fp32"):
    """FP8 operands for experts owning ``counts[e]`` rows each (reference quantizer, fresh data)."""
    g = torch.Generator().manual_seed(seed)
    m = sum(counts)
    x = torch.randn(m, k, generator=g) * 10.0 ** torch.empty(m, 1).uniform_(-2, 2, generator=g)
    if m:
        a, sa = Q.quantize_groupwise(x, 128, scale_fmt)
    else:  # no routed rows at all
        a, sa = x.to(torch.float8_e4m3fn), torch.ones(0, math.ceil(k / 128))
    qs = [
        Q.quantize_blockwise(torch.randn(n, k, generator=g) * 0.05 * (e + 1), (128, 128), scale_fmt)
        for e in range(len(counts))
    ]
    b = torch.stack([q for q, _ in qs])
    sb = torch.stack([s for _, s in qs])
    offsets = torch.tensor(
        [0, *torch.tensor(counts, dtype=torch.int64).cumsum(0).tolist()], dtype=torch.int64
    )
    return a, sa, b, sb, offsets


def float64_grouped(a, sa, b, sb, offsets):
    """``C[rows of e] = dequant(A)[rows] @ dequant(B[e]).T`` in float64, and ``|A| @ |B[e]|.T``."""
    m, k = a.shape
    n = b.shape[1]
    a64 = a.double() * sa.double().repeat_interleave(128, 1)[:, :k]
    out = torch.zeros(m, n, dtype=torch.float64)
    mag = torch.zeros(m, n, dtype=torch.float64)
    for e in range(b.shape[0]):
        r0, r1 = int(offsets[e]), int(offsets[e + 1])
        w = (
            b[e].double()
            * sb[e].double().repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]
        )
        out[r0:r1] = a64[r0:r1] @ w.T
        mag[r0:r1] = a64[r0:r1].abs() @ w.abs().T
    return out, mag


def assert_matches_float64(got, a, sa, b, sb, offsets, rel=2e-6):
    """Elementwise ``|got - C| <= rel * (|A| @ |B|.T)``: fp32 summation error, nothing more."""
    want, mag = float64_grouped(a, sa, b, sb, offsets)
    assert got.shape == want.shape
    err = (got.double() - want).abs()
    bad = err > rel * mag + 1e-30
    assert not bad.any(), (
        f"{int(bad.sum())} entries off; worst {float((err / (mag + 1e-30)).max()):.2e}"
    )


# ----------------------------------------------------------------------------- reference


@pytest.mark.parametrize(
    "counts,n,k",
    [
        ([3, 0, 20, 1, 0], 576, 200),  # odd K and N, empty experts
        ([1], 96, 128),  # M = 1, one expert
        ([0, 1, 0, 0], 130, 384 + 5),  # M = 1 among empty experts
        ([0, 0, 0], 64, 256),  # no rows at all
        ([40, 33], 257, 129),
    ],
)
def test_reference_matches_float64(counts, n, k):
    a, sa, b, sb, off = grouped_operands(counts, n, k, seed=n + k)
    got = G.grouped_fp8_gemm(a, sa, b, sb, off, torch.float32)
    assert got.dtype == torch.float32 and got.shape == (sum(counts), n)
    assert_matches_float64(got, a, sa, b, sb, off)


@settings(max_examples=15, deadline=None)
@given(
    counts=st.lists(st.integers(0, 9), min_size=1, max_size=6),
    n=st.integers(1, 200),
    k=st.integers(1, 300),
    seed=st.integers(0, 2**16),
    scale_fmt=st.sampled_from(["fp32", "ue8m0"]),
)
def test_reference_property_any_grouping(counts, n, k, seed, scale_fmt):
    a, sa, b, sb, off = grouped_operands(counts, n, k, seed, scale_fmt)
    assert_matches_float64(G.grouped_fp8_gemm(a, sa, b, sb, off, torch.float32), a, sa, b, sb, off)


def test_reference_each_expert_uses_its_own_weight():
    """Swapping two experts' weights changes exactly their rows."""
    a, sa, b, sb, off = grouped_operands([4, 5, 6], 64, 256, seed=3)
    base = G.grouped_fp8_gemm(a, sa, b, sb, off, torch.float32)
    perm = torch.tensor([1, 0, 2])
    swapped = G.grouped_fp8_gemm(a, sa, b[perm], sb[perm], off, torch.float32)
    assert torch.equal(base[9:], swapped[9:]) and not torch.allclose(base[:9], swapped[:9])


def test_reference_bf16_output_is_the_rounded_fp32():
    a, sa, b, sb, off = grouped_operands([2, 0, 3], 96, 200, seed=8)
    got = G.grouped_fp8_gemm(a, sa, b, sb, off)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, G.grouped_fp8_gemm(a, sa, b, sb, off, torch.float32).bfloat16())


@pytest.mark.parametrize("fn", [G.grouped_fp8_gemm, ops.grouped_fp8_gemm])
def test_bad_operands_are_clear_errors(fn):
    a, sa, b, sb, off = grouped_operands([2, 3], 64, 200, seed=1)
    with pytest.raises(ValueError, match=r"end at M=5; got \[0, 2, 4\]"):
        fn(a, sa, b, sb, torch.tensor([0, 2, 4]))
    with pytest.raises(ValueError, match="never decrease"):
        fn(a, sa, b, sb, torch.tensor([0, 6, 5]))
    with pytest.raises(ValueError, match="start at 0"):
        fn(a, sa, b, sb, torch.tensor([1, 2, 5]))
    with pytest.raises(
        ValueError, match=r"offsets has shape \(2,\), expected \(3,\) for 2 experts"
    ):
        fn(a, sa, b, sb, torch.tensor([0, 5]))
    with pytest.raises(TypeError, match="offsets must be an int64"):
        fn(a, sa, b, sb, off.float())
    with pytest.raises(ValueError, match=r"b_scale has shape \(2, 1, 1\), expected \(2, 1, 2\)"):
        fn(a, sa, b, sb[:, :, :1], off)
    with pytest.raises(ValueError, match=r"a_scale has shape"):
        fn(a, sa[:, :1], b, sb, off)
    with pytest.raises(ValueError, match="b must be 3-D"):
        fn(a, sa, b[0], sb[0], off)
    with pytest.raises(ValueError, match="K differs"):
        fn(a[:, :128], sa[:, :1], b, sb, off)
    with pytest.raises(TypeError, match="a must be a float8"):
        fn(a.float(), sa, b, sb, off)
    with pytest.raises(TypeError, match="use one FP8 dtype"):
        fn(a.to(torch.float8_e5m2), sa, b, sb, off)


def test_ops_auto_on_cpu_runs_the_reference():
    assert ops.select_backend("grouped_fp8_gemm", torch.device("cpu")) == "reference"
    a, sa, b, sb, off = grouped_operands([3, 0, 2], 96, 200, seed=2)
    assert torch.equal(
        ops.grouped_fp8_gemm(a, sa, b, sb, off, torch.float32),
        G.grouped_fp8_gemm(a, sa, b, sb, off, torch.float32),
    )
    with pytest.raises(ValueError, match="'cpu' does not implement grouped_fp8_gemm"):
        ops.grouped_fp8_gemm(a, sa, b, sb, off, backend="cpu")
    with pytest.raises(ValueError, match="'scaled_mm' does not implement grouped_fp8_gemm"):
        ops.grouped_fp8_gemm(a, sa, b, sb, off, backend="scaled_mm")


# ----------------------------------------------------------------------------- Triton (interpreted)


@pytest.fixture
def triton_grouped(require_interpreter):
    from finefp8.kernels import triton_grouped_gemm

    return triton_grouped_gemm


def test_tile_schedule_hand_written(triton_grouped):
    off = torch.tensor([0, 3, 3, 23, 24, 24])  # rows per expert: 3, 0, 20, 1, 0
    group, row = triton_grouped.tile_schedule(off, 24, 16)
    # 2 + 5 = 7 slots; tiles: e0 rows 0.., e2 rows 3.. and 19.., e3 row 23; the rest unused (== E)
    assert group.tolist() == [0, 2, 2, 3, 5, 5, 5]
    assert row.tolist() == [0, 3, 19, 23, 0, 0, 0]


@settings(max_examples=30, deadline=None)
@given(
    counts=st.lists(st.integers(0, 70), min_size=1, max_size=9), bm=st.sampled_from([16, 32, 64])
)
def test_tile_schedule_covers_every_row_once(counts, bm):
    """Property: the tiles cover each expert's rows exactly once and fit the launch bound."""
    from finefp8.kernels.triton_grouped_gemm import tile_schedule

    off = torch.tensor([0, *torch.tensor(counts).cumsum(0).tolist()])
    m, e = sum(counts), len(counts)
    group, row = tile_schedule(off, m, bm)
    assert group.numel() == math.ceil(m / bm) + e
    owner = torch.full((m,), -1)
    for g, r in zip(group.tolist(), row.tolist(), strict=True):
        if g < e:
            end = min(r + bm, int(off[g + 1]))
            assert int(off[g]) <= r < end
            assert (owner[r:end] == -1).all()
            owner[r:end] = g
    want = torch.repeat_interleave(torch.arange(e), torch.tensor(counts))
    assert torch.equal(owner, want)


@pytest.mark.parametrize(
    "counts,n,k",
    [
        ([3, 0, 20, 1, 0], 576, 200),
        ([1], 96, 128),
        ([0, 1, 0, 0], 130, 384 + 5),
        ([17, 0, 40], 64, 256),
    ],
)
def test_triton_matches_float64_and_reference(triton_grouped, counts, n, k):
    a, sa, b, sb, off = grouped_operands(counts, n, k, seed=n * k)
    got = triton_grouped.grouped_fp8_gemm(a, sa, b, sb, off, torch.float32)
    assert got.dtype == torch.float32 and got.shape == (sum(counts), n)
    assert_matches_float64(got, a, sa, b, sb, off)
    want = G.grouped_fp8_gemm(a, sa, b, sb, off, torch.float32)
    assert float((got - want).abs().max()) <= 1e-6 * float(want.abs().max())


def test_triton_fixed_tiles_no_rows_and_ue8m0(triton_grouped):
    a, sa, b, sb, off = grouped_operands([5, 0, 9, 2], 200, 300, seed=4, scale_fmt="ue8m0")
    got = triton_grouped.grouped_fp8_gemm(
        a, sa, b, sb, off, torch.float32, config={"BLOCK_M": 16, "BLOCK_N": 32}
    )
    assert_matches_float64(got, a, sa, b, sb, off)
    a0, sa0, b0, sb0, off0 = grouped_operands([0, 0], 64, 128, seed=5)
    assert triton_grouped.grouped_fp8_gemm(a0, sa0, b0, sb0, off0).shape == (0, 64)


def test_triton_bf16_output(triton_grouped):
    a, sa, b, sb, off = grouped_operands([2, 0, 7], 130, 300, seed=6)
    got = triton_grouped.grouped_fp8_gemm(a, sa, b, sb, off)
    want32 = G.grouped_fp8_gemm(a, sa, b, sb, off, torch.float32)
    assert got.dtype == torch.bfloat16
    # INTERPRETER ONLY: its bf16 store truncates, so allow one bf16 step (a GPU rounds: half).
    _, exp = torch.frexp(want32.abs())
    step = torch.ldexp(torch.ones_like(want32), exp - 8)
    assert ((got.float() - want32).abs() <= step + 1e-6 * want32.abs().max()).all()


def test_ops_forced_triton(triton_grouped):
    a, sa, b, sb, off = grouped_operands([4, 0, 3], 576, 200, seed=7)
    got = ops.grouped_fp8_gemm(a, sa, b, sb, off, torch.float32, backend="triton")
    assert_matches_float64(got, a, sa, b, sb, off)
    with pytest.raises(ValueError, match="output dtype torch.float64"):
        ops.grouped_fp8_gemm(a, sa, b, sb, off, torch.float64, backend="triton")
    with pytest.raises(ValueError, match="different FP8 dtypes"):
        ops.grouped_fp8_gemm(a, sa, b.to(torch.float8_e5m2), sb, off, backend="triton")


# ----------------------------------------------------------------------------- compiled, GPU


@pytest.mark.gpu
@pytest.mark.parametrize(
    "counts,n,k",
    [
        ([3, 0, 20, 1, 0], 576, 200),
        ([1] + [0] * 255, 4096, 7168),  # decode: one row, 256 experts
        ([64] * 8 + [0] * 8, 7168, 2048),  # prefill slice: 16 experts, 8 busy
        ([130, 1, 0, 257], 4096, 128 * 5 + 3),
    ],
)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_triton_compiled_on_gpu(require_compiled_triton, counts, n, k, out_dtype):
    from finefp8.kernels import cuda_fp8_supported

    dev = torch.device("cuda")
    if not cuda_fp8_supported(dev):
        pytest.skip("the FP8 kernels need compute capability >= 8.9")
    a, sa, b, sb, off = grouped_operands(counts, n, k, seed=len(counts) + n)
    assert ops.select_backend("grouped_fp8_gemm", dev) == "triton"
    got = ops.grouped_fp8_gemm(a.to(dev), sa.to(dev), b.to(dev), sb.to(dev), off.to(dev), out_dtype)
    assert got.dtype == out_dtype and got.shape == (sum(counts), n)
    want = G.grouped_fp8_gemm(a, sa, b, sb, off, torch.float32)
    # normwise: tensor-core accumulation inside one 128-block (see test_triton_gpu.GEMM_REL)
    assert float((got.float().cpu() - want).norm() / want.norm()) < 1e-3
