"""Block-wise (weights) and group-wise (activations) quantization: exactness, bounds, errors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from finefp8 import quantization as Q
from finefp8.formats import E4M3, E5M2, encode

# The dequantization error bound derived in docs/numerics.md, for fp32 output:
#   |w~ - w| <= 2^-4 |w|        where |w / s| >= 2^-6 (E4M3 normal range)
#   |w~ - w| <= 2^-10 s         where |w / s| <  2^-6 (subnormal range)
# each plus 2^-21 |w| for the fp32 division and the fp32 product.
NORMAL_REL = 2.0**-4
SUBNORMAL_ABS = 2.0**-10
FP32_SLACK = 2.0**-21


def assert_within_bound(w: torch.Tensor, w_hat: torch.Tensor, s_full: torch.Tensor) -> None:
    w64, err = w.double(), (w_hat.double() - w.double()).abs()
    y = w64.abs() / s_full.double()
    normal = y >= E4M3.min_normal
    bound = torch.where(normal, NORMAL_REL * w64.abs(), SUBNORMAL_ABS * s_full.double())
    bound = bound + FP32_SLACK * w64.abs()
    worst = (err - bound).max()
    assert float(worst) <= 0, f"bound exceeded by {float(worst)}"


def reference_block_quantize(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Element-by-element restatement of docs/numerics.md with the bit-exact encoder."""
    m, n = w.shape
    bm, bn = block
    gm, gn = math.ceil(m / bm), math.ceil(n / bn)
    s = torch.empty(gm, gn)
    codes = torch.empty(m, n, dtype=torch.uint8)
    for i in range(gm):
        for j in range(gn):
            blk = w[i * bm : (i + 1) * bm, j * bn : (j + 1) * bn].float()
            s[i, j] = torch.clamp(blk.abs().max(), min=Q.AMAX_FLOOR) / 448.0
            codes[i * bm : (i + 1) * bm, j * bn : (j + 1) * bn] = encode(blk / s[i, j], E4M3)
    return codes, s


@pytest.mark.parametrize("shape", [(576, 1536), (192, 576), (1, 1), (129, 257), (128, 128)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_blockwise_matches_elementwise_reference(shape, dtype):
    g = torch.Generator().manual_seed(hash(shape) % 2**31)
    w = (torch.randn(shape, generator=g) * 0.05).to(dtype)
    q, s = Q.quantize_blockwise(w)
    codes, s_ref = reference_block_quantize(w, (128, 128))
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert s.dtype == torch.float32 and s.shape == (math.ceil(shape[0] / 128), math.ceil(shape[1] / 128))
    assert torch.equal(s, s_ref)
    assert torch.equal(q.view(torch.uint8), codes)


def test_blockwise_block_sizes_and_edges():
    w = torch.randn(300, 200)
    q, s = Q.quantize_blockwise(w, block_size=(64, 32))
    assert s.shape == (5, 7)
    # Each block's scale is its own amax / 448: the padding does not enter.
    assert torch.equal(s[-1, -1], w[256:, 192:].abs().max() / 448)


@given(
    m=st.integers(1, 700),
    n=st.integers(1, 700),
    log_mag=st.floats(-6, 4),
    seed=st.integers(0, 2**31 - 1),
    scale_fmt=st.sampled_from(["fp32", "ue8m0"]),
)
def test_dequantize_error_bound_property(m, n, log_mag, seed, scale_fmt):
    g = torch.Generator().manual_seed(seed)
    # Magnitudes 1e-6 .. 1e4, with a spread of exponents inside each block too.
    w = torch.randn(m, n, generator=g) * torch.exp(torch.randn(m, n, generator=g)) * 10.0**log_mag
    q, s = Q.quantize_blockwise(w, scale_fmt=scale_fmt)
    assert bool(torch.isfinite(s).all()) and bool((s > 0).all())
    assert bool(torch.isfinite(q.float()).all())
    assert float(q.float().abs().max()) <= 448
    w_hat = Q.dequantize_blockwise(q, s, dtype=torch.float32)
    assert_within_bound(w, w_hat, Q.expand_block_scales(s, w.shape))
    if scale_fmt == "ue8m0":
        assert bool((torch.frexp(s)[0] == 0.5).all())  # exact powers of two
        assert bool((s >= Q.block_amax(w) / 448).all())  # rounded up, never down


@given(m=st.integers(1, 400), n=st.integers(1, 400), seed=st.integers(0, 2**31 - 1),
       scale_fmt=st.sampled_from(["fp32", "ue8m0"]))
def test_requantizing_dequantized_weights_is_idempotent(m, n, seed, scale_fmt):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=g) * 0.02
    q, s = Q.quantize_blockwise(w, scale_fmt=scale_fmt)
    w_hat = Q.dequantize_blockwise(q, s, dtype=torch.float32)
    q2, s2 = Q.quantize_blockwise(w_hat, scale_fmt=scale_fmt)
    # The values always survive a second round trip unchanged.
    assert torch.equal(Q.dequantize_blockwise(q2, s2, dtype=torch.float32), w_hat)
    if scale_fmt == "fp32":
        # With fp32 scales the codes and scales are identical too. (With ue8m0, a block whose
        # largest code rounded down to 224 requantizes with s/2 and codes doubled: same values.)
        assert torch.equal(s2, s)
        assert torch.equal(q2.view(torch.uint8), q.view(torch.uint8))


def test_ue8m0_codes_are_recomputed_with_rounded_scale():
    w = torch.randn(256, 256) * 0.3
    q, s = Q.quantize_blockwise(w, scale_fmt="ue8m0")
    q32, s32 = Q.quantize_blockwise(w)
    assert bool((s >= s32).all()) and not torch.equal(s, s32)
    assert torch.equal(q.view(torch.uint8), Q.quantize_with_block_scales(w, s).view(torch.uint8))
    # Rounding only the scale of existing codes (the known bug) gives other values.
    wrong = Q.dequantize_blockwise(q32, s, dtype=torch.float32)
    right = Q.dequantize_blockwise(q, s, dtype=torch.float32)
    assert (wrong - w).norm() > 10 * (right - w).norm()


def test_zero_and_tiny_blocks_never_nan():
    w = torch.zeros(256, 300)
    w[130:, 140:] = 1e-30
    q, s = Q.quantize_blockwise(w)
    assert bool(torch.isfinite(s).all()) and bool((s > 0).all())
    assert bool(torch.isfinite(q.float()).all())
    assert float(Q.dequantize_blockwise(q, s, dtype=torch.float32)[:128].abs().max()) == 0.0
    xq, xs = Q.quantize_groupwise(torch.zeros(3, 200))
    assert bool(torch.isfinite(xs).all()) and float(xq.float().abs().max()) == 0.0


def test_nonfinite_weight_names_the_block():
    w = torch.randn(300, 600)
    w[200, 400] = float("nan")
    with pytest.raises(ValueError, match=r"'layer.weight'.*block \(1, 3\): rows 128:256, columns 384:512"):
        Q.quantize_blockwise(w, name="layer.weight")
    w[5, 5] = float("inf")
    with pytest.raises(ValueError, match=r"block \(0, 0\).*and 1 more blocks"):
        Q.quantize_blockwise(w)
    q, s = Q.quantize_blockwise(w, allow_nonfinite=True)
    assert math.isnan(float(q[200, 400].float())) and float(q[5, 5].float()) == 448.0
    assert bool(torch.isfinite(s).all())
    # The other blocks are what they would be without the bad values.
    w_ok = w.clone()
    w_ok[200, 400] = 0.0
    w_ok[5, 5] = 0.0
    _, s_ok = Q.quantize_blockwise(w_ok)
    assert torch.equal(s, s_ok)


def test_nonfinite_activation_names_the_group():
    x = torch.randn(2, 3, 300)
    x[1, 2, 260] = float("-inf")
    with pytest.raises(ValueError, match=r"token index \(1, 2\), channels 256:300"):
        Q.quantize_groupwise(x)


@pytest.mark.parametrize("bad, err, msg", [
    (torch.randn(4, 4).to(torch.float8_e4m3fn), TypeError, "already FP8"),
    (torch.randint(0, 5, (4, 4)), TypeError, "expected float32"),
    (torch.randn(2, 3, 4), ValueError, "2-D"),
    (torch.randn(0, 4), ValueError, "empty"),
])
def test_bad_weight_inputs(bad, err, msg):
    with pytest.raises(err, match=msg):
        Q.quantize_blockwise(bad, name="w")


def test_bad_arguments():
    with pytest.raises(ValueError, match="scale_fmt"):
        Q.quantize_blockwise(torch.randn(4, 4), scale_fmt="e8m0")
    with pytest.raises(ValueError, match="block_size"):
        Q.quantize_blockwise(torch.randn(4, 4), block_size=(0, 128))
    q, s = Q.quantize_blockwise(torch.randn(300, 300))
    with pytest.raises(ValueError, match=r"expected \(3, 3\)"):
        Q.dequantize_blockwise(q, s[:2])
    with pytest.raises(TypeError, match="view"):
        Q.dequantize_blockwise(q.view(torch.uint8), s)
    xq, xs = Q.quantize_groupwise(torch.randn(5, 300))
    with pytest.raises(ValueError, match=r"expected \(5, 3\)"):
        Q.dequantize_groupwise(xq, xs[:, :2])


@given(
    lead=st.lists(st.integers(1, 5), min_size=0, max_size=2),
    k=st.integers(1, 700),
    log_mag=st.floats(-6, 4),
    seed=st.integers(0, 2**31 - 1),
    scale_fmt=st.sampled_from(["fp32", "ue8m0"]),
)
def test_groupwise_property(lead, k, log_mag, seed, scale_fmt):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, k, generator=g) * 10.0**log_mag
    q, s = Q.quantize_groupwise(x, scale_fmt=scale_fmt)
    assert q.shape == x.shape and s.shape == (*lead, math.ceil(k / 128))
    # Each group's scale and codes, restated one group at a time.
    flat_x, flat_q, flat_s = x.reshape(-1, k), q.reshape(-1, k), s.reshape(-1, s.shape[-1])
    for j in range(flat_s.shape[1]):
        grp = flat_x[:, j * 128 : (j + 1) * 128]
        s_ref = grp.abs().amax(-1).clamp(min=Q.AMAX_FLOOR) / 448
        if scale_fmt == "ue8m0":
            s_ref = torch.exp2(torch.ceil(torch.log2(s_ref.double()))).float()
        assert torch.equal(flat_s[:, j], s_ref)
        codes = encode(grp / s_ref[:, None], E4M3)
        assert torch.equal(flat_q[:, j * 128 : (j + 1) * 128].view(torch.uint8), codes)
    x_hat = Q.dequantize_groupwise(q, s, dtype=torch.float32)
    s_full = s.repeat_interleave(128, -1)[..., :k]
    assert_within_bound(x, x_hat, s_full)


def test_dequantize_bf16_output_adds_only_bf16_rounding():
    w = torch.randn(256, 384) * 0.1
    q, s = Q.quantize_blockwise(w)
    w32 = Q.dequantize_blockwise(q, s, dtype=torch.float32)
    wbf = Q.dequantize_blockwise(q, s)
    assert wbf.dtype == torch.bfloat16
    assert torch.equal(wbf, w32.to(torch.bfloat16))


def test_e5m2_codes():
    """E5M2 block quantization: scale = block amax / 57344 and every code equals the bit-exact
    encoder's E5M2 code of w / scale, block by block."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(200, 300, generator=g) * torch.exp2(torch.randint(-8, 8, (200, 300), generator=g))
    q, s = Q.quantize_blockwise(w, fmt="e5m2")
    assert q.dtype == torch.float8_e5m2 and s.shape == (2, 3)
    codes = q.view(torch.uint8)
    for i in range(2):
        for j in range(3):
            blk = w[128 * i: 128 * (i + 1), 128 * j: 128 * (j + 1)]
            amax = max(abs(float(v)) for v in blk.flatten().tolist())
            s_ref = torch.tensor(amax, dtype=torch.float32) / 57344.0
            assert float(s[i, j]) == float(s_ref)
            want = encode(blk / s_ref, E5M2, saturate=True)
            assert torch.equal(codes[128 * i: 128 * (i + 1), 128 * j: 128 * (j + 1)], want)
            # the block's largest value maps to E5M2's largest finite code (0x7B: 57344)
            assert int((want & 0x7F).max()) == 0x7B
