"""Bit-exactness of the FP8 formats against torch's and ml_dtypes' casts."""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from finefp8.formats import E4M3, E5M2, UE8M0, decode, encode, get_format, round_up_pow2, to_fp8

ML = {"e4m3": ml_dtypes.float8_e4m3fn, "e5m2": ml_dtypes.float8_e5m2, "ue8m0": ml_dtypes.float8_e8m0fnu}


def ml_codes(x: torch.Tensor, fmt) -> torch.Tensor:
    """ml_dtypes' codes for float32 ``x`` (non-saturating, round to nearest even)."""
    return torch.from_numpy(x.numpy().astype(ML[fmt.name]).view(np.uint8).copy())


def nan_aware_equal(a: torch.Tensor, b: torch.Tensor, fmt) -> torch.Tensor:
    """Codes equal, or both NaN codes (NaN payloads differ between libraries)."""
    return (a == b) | (torch.isnan(decode(a, fmt)) & torch.isnan(decode(b, fmt)))


def random_values(n: int, fmt, seed: int) -> torch.Tensor:
    """Random float32 covering the format's range: normals, subnormals, exact ties,
    values just past the largest finite value, +-0, inf and NaN."""
    g = torch.Generator().manual_seed(seed)
    lo = math.log2(fmt.min_subnormal or fmt.min_normal) - 2
    hi = math.log2(fmt.max) + 1
    mags = torch.exp2(torch.rand(n, generator=g) * (hi - lo) + lo)
    signs = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    x = mags * signs
    # Exact ties: midpoints between neighbouring representable values.
    vals = decode(torch.arange(256, dtype=torch.uint8), fmt)
    vals = torch.sort(vals[torch.isfinite(vals)]).values
    mids = (vals[1:] + vals[:-1]) / 2
    k = n // 10
    x[:k] = mids[torch.randint(len(mids), (k,), generator=g)]
    # Just above max and special values.
    x[k : k + 100] = fmt.max * (1 + torch.rand(100, generator=g) * 0.2)
    x[k + 100 : k + 106] = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), fmt.max])
    return x


@pytest.mark.parametrize("fmt", [E4M3, E5M2, UE8M0], ids=lambda f: f.name)
def test_all_codes_round_trip(fmt):
    codes = torch.arange(256, dtype=torch.uint8)
    values = decode(codes, fmt)
    back = encode(values, fmt, saturate=False)
    finite = ~torch.isnan(values)
    assert torch.equal(back[finite], codes[finite])
    assert int(torch.isnan(values).sum()) == len(fmt.nan_codes)
    # The decode table agrees with ml_dtypes' values for every code.
    ml_vals = torch.from_numpy(codes.numpy().view(ML[fmt.name]).astype(np.float32))
    same = (ml_vals == values) | (torch.isnan(ml_vals) & torch.isnan(values))
    assert bool(same.all())


@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=lambda f: f.name)
def test_constants_match_decode_table(fmt):
    vals = decode(torch.arange(256, dtype=torch.uint8), fmt)
    finite = vals[torch.isfinite(vals)]
    pos = finite[finite > 0]
    assert float(finite.max()) == fmt.max
    assert float(pos.min()) == fmt.min_subnormal
    assert float(pos[pos >= 2.0 ** (1 - fmt.bias)].min()) == fmt.min_normal
    assert float(vals[fmt.bias << fmt.mantissa_bits | 1]) - 1.0 == fmt.eps  # next after 1.0
    assert bool(torch.isinf(vals).any()) == fmt.has_inf


def test_spec_constants():
    assert (E4M3.max, E4M3.min_normal, E4M3.min_subnormal, E4M3.max_code) == (448.0, 2**-6, 2**-9, 0x7E)
    assert (E5M2.max, E5M2.min_normal, E5M2.min_subnormal, E5M2.max_code) == (57344.0, 2**-14, 2**-16, 0x7B)
    assert (UE8M0.max, UE8M0.min_normal, UE8M0.bias) == (2.0**127, 2.0**-127, 127)
    assert get_format("float8_e4m3fn") is E4M3 and get_format("E5M2") is E5M2
    with pytest.raises(ValueError, match="unknown FP8 format"):
        get_format("e4m3fnuz")


@pytest.mark.parametrize("fmt", [E4M3, E5M2], ids=lambda f: f.name)
def test_million_random_values_match_torch_and_ml_dtypes(fmt):
    x = random_values(10**6, fmt, seed=1234)
    ours_sat = encode(x, fmt, saturate=True)
    ours_nan = encode(x, fmt, saturate=False)
    ml = ml_codes(x, fmt)
    th = x.to(fmt.torch_dtype).view(torch.uint8)
    in_range = x.abs() <= fmt.max
    assert bool(nan_aware_equal(ours_sat[in_range], ml[in_range], fmt).all())
    assert bool(nan_aware_equal(ours_sat[in_range], th[in_range], fmt).all())
    # Out of range: ml_dtypes' non-saturating cast everywhere (NaN for E4M3, inf for E5M2).
    assert bool(nan_aware_equal(ours_nan, ml, fmt).all())
    big = x.abs() > fmt.max * 1.1
    sat_vals = decode(ours_sat[big], fmt)
    assert bool((sat_vals.abs() == fmt.max).all())
    assert bool((torch.sign(sat_vals) == torch.sign(x[big])).all())
    over = decode(ours_nan[big], fmt)
    assert bool((torch.isinf(over) if fmt.has_inf else torch.isnan(over)).all())
    # The fast saturating cast used by the quantizers is the same, code for code.
    assert bool(nan_aware_equal(to_fp8(x, fmt).view(torch.uint8), ours_sat, fmt).all())


def test_special_values_e4m3():
    x = torch.tensor([0.0, -0.0, 448.0, 464.0, 465.0, float("inf"), -float("inf"), float("nan"),
                      2.0**-10, 1.5 * 2.0**-10, 31.32])
    sat = encode(x, E4M3, saturate=True).tolist()
    nos = encode(x, E4M3, saturate=False).tolist()
    assert sat == [0x00, 0x80, 0x7E, 0x7E, 0x7E, 0x7E, 0xFE, 0x7F, 0x00, 0x01, 0x60]
    # 464 is the tie between 448 and (unrepresentable) 480: ties to even keeps 448.
    assert nos[:4] == [0x00, 0x80, 0x7E, 0x7E] and nos[4:7] == [0x7F, 0x7F, 0xFF]


def test_special_values_e5m2():
    x = torch.tensor([57344.0, 61439.0, 61440.0, float("inf"), -1e6])
    assert encode(x, E5M2, saturate=False).tolist() == [0x7B, 0x7B, 0x7C, 0x7C, 0xFC]
    assert encode(x, E5M2, saturate=True).tolist() == [0x7B, 0x7B, 0x7B, 0x7B, 0xFB]


def test_ue8m0_matches_ml_dtypes():
    g = torch.Generator().manual_seed(7)
    x = torch.exp2(torch.rand(200_000, generator=g) * 260 - 130)
    x[:6] = torch.tensor([1.5, 3.0, 0.75, 2.0**-125, 2.0**-126, 2.0**127])
    # Below 2**-126 the input is an fp32 subnormal, which both ml_dtypes and torch round by
    # bit pattern (1.19 * 2**-127 becomes 2**-126); ours rounds by value, so compare above it.
    normal = x >= 2.0**-126
    assert torch.equal(encode(x, UE8M0, saturate=False)[normal], ml_codes(x, UE8M0)[normal])
    tiny = torch.tensor([1.19 * 2.0**-127, 1.6 * 2.0**-127, 2.0**-130])
    assert encode(tiny, UE8M0).tolist() == [0, 1, 0]
    bad = torch.tensor([0.0, -1.0, float("nan"), float("inf"), 1e39])
    assert encode(bad, UE8M0, saturate=False).tolist() == [0xFF] * 5
    assert encode(bad, UE8M0, saturate=True).tolist() == [0x00, 0x00, 0xFF, 0xFE, 0xFE]


@given(st.floats(min_value=2.0**-100, max_value=2.0**100, allow_nan=False, width=32))
def test_round_up_pow2_is_smallest_power_above(v):
    s = torch.tensor([v], dtype=torch.float32)
    p = float(round_up_pow2(s))
    assert p >= v and p / 2 < v
    assert math.log2(p) == int(math.log2(p))


@given(st.floats(width=32, allow_nan=True, allow_infinity=True))
def test_encode_scalar_matches_ml_dtypes(v):
    x = torch.tensor([v], dtype=torch.float32)
    for fmt in (E4M3, E5M2):
        ours = encode(x, fmt, saturate=False)
        assert bool(nan_aware_equal(ours, ml_codes(x, fmt), fmt).all())


def test_encode_float64_and_bfloat16_inputs():
    x = torch.randn(10_000, dtype=torch.float64) * 50
    # float64 is encoded from its exact value: compare to ml_dtypes' float64 cast.
    ref = torch.from_numpy(x.numpy().astype(ml_dtypes.float8_e4m3fn).view(np.uint8).copy())
    in_range = x.abs() <= 448
    assert torch.equal(encode(x, E4M3)[in_range], ref[in_range])



def _bf16_e4m3_ties() -> torch.Tensor:
    """bf16 values on and between E4M3 values: every finite E4M3 value, every midpoint between
    neighbours (exact in bf16: 5 significant bits) and its bf16 neighbours, both signs."""
    vals = decode(torch.arange(0, 0x7F, dtype=torch.uint8), E4M3)
    mids = ((vals[1:] + vals[:-1]) / 2).to(torch.bfloat16)
    up = torch.nextafter(mids, torch.tensor(float("inf"), dtype=torch.bfloat16))
    down = torch.nextafter(mids, torch.tensor(0.0, dtype=torch.bfloat16))
    pos = torch.cat([vals.to(torch.bfloat16), mids, up, down])
    return torch.cat([pos, -pos])


def test_encode_bfloat16_matches_ml_dtypes_bfloat16_cast():
    """bf16 inputs against ml_dtypes' own bfloat16 -> float8 cast, from the raw bf16 bits (no
    torch conversion on the reference side): random values, exact ties, out of range."""
    g = torch.Generator().manual_seed(2)
    rand = (torch.randn(20_000, generator=g) * torch.exp2(torch.randint(-14, 10, (20_000,),
                                                                        generator=g))).to(torch.bfloat16)
    xb = torch.cat([rand, _bf16_e4m3_ties()])
    bits = xb.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    for fmt in (E4M3, E5M2):
        want = torch.from_numpy(bits.astype(ML[fmt.name]).view(np.uint8).copy())
        ours = encode(xb, fmt, saturate=False)
        assert bool(nan_aware_equal(ours, want, fmt).all())
    sat = encode(xb, E4M3, saturate=True)
    big = xb.float().abs() > 464  # beyond the midpoint of 448 and 2**9: saturates to +-448
    assert bool((sat[big] & 0x7F == 0x7E).all()) and bool(big.any())


def test_bad_inputs():
    with pytest.raises(TypeError, match="floating-point"):
        encode(torch.arange(3), E4M3)
    with pytest.raises(TypeError, match="uint8"):
        decode(torch.arange(3), E4M3)
    with pytest.raises(ValueError, match="UE8M0"):
        to_fp8(torch.ones(2), UE8M0)
