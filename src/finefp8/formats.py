"""The 8-bit floating-point formats: constants, bit-exact encoding and decoding.

Three formats are described here (docs/numerics.md):

* ``E4M3`` (OCP ``float8_e4m3fn``): bias 7, largest finite 448, no infinity,
  NaN only at 0x7F / 0xFF. Used for every tensor in DeepSeek-V3's scheme.
* ``E5M2`` (``float8_e5m2``): bias 15, largest finite 57344, IEEE-like inf/NaN.
* ``UE8M0`` (``float8_e8m0fnu``): unsigned, exponent only, ``2**(code - 127)``,
  0xFF is NaN. Used for power-of-two scales.

``encode`` is the reference: it rounds a float to the nearest representable
value (ties to even for E4M3/E5M2) with plain arithmetic on ``frexp``, then
packs sign, biased exponent and mantissa into a code. Overflow is the caller's
explicit choice: ``saturate=True`` clamps to the largest finite value (what the
GPU's ``cvt.rn.satfinite`` does), ``saturate=False`` gives NaN (E4M3, UE8M0) or
infinity (E5M2), as ``ml_dtypes`` does. ``decode`` turns codes back into
float32 through a 256-entry table built from the format's formula.

``to_fp8`` is the fast path used by the quantizers: clamp, then torch's own
round-to-nearest-even cast. The tests check it against ``encode`` code for code.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch

__all__ = [
    "FP8Format",
    "E4M3",
    "E5M2",
    "UE8M0",
    "FORMATS",
    "FP8_DTYPES",
    "get_format",
    "encode",
    "decode",
    "to_fp8",
    "round_up_pow2",
]


@dataclass(frozen=True)
class FP8Format:
    """Constants of one 8-bit float format.

    ``min_subnormal`` is ``None`` for formats without subnormals (UE8M0).
    ``eps`` is the distance from 1.0 to the next representable value.
    """

    name: str
    exponent_bits: int
    mantissa_bits: int
    bias: int
    signed: bool
    max: float
    min_normal: float
    min_subnormal: float | None
    eps: float
    has_inf: bool
    nan_codes: tuple[int, ...]
    torch_dtype: torch.dtype

    @property
    def max_code(self) -> int:
        """Code of the largest finite positive value."""
        return int(encode(torch.tensor([self.max], dtype=torch.float64), self).item())

    @property
    def emin(self) -> int:
        """Unbiased exponent of the smallest normal number: ``1 - bias``."""
        return 1 - self.bias

    def __repr__(self) -> str:
        return f"FP8Format({self.name})"


E4M3 = FP8Format(
    name="e4m3",
    exponent_bits=4,
    mantissa_bits=3,
    bias=7,
    signed=True,
    max=448.0,
    min_normal=2.0**-6,
    min_subnormal=2.0**-9,
    eps=2.0**-3,
    has_inf=False,
    nan_codes=(0x7F, 0xFF),
    torch_dtype=torch.float8_e4m3fn,
)

E5M2 = FP8Format(
    name="e5m2",
    exponent_bits=5,
    mantissa_bits=2,
    bias=15,
    signed=True,
    max=57344.0,
    min_normal=2.0**-14,
    min_subnormal=2.0**-16,
    eps=2.0**-2,
    has_inf=True,
    nan_codes=(0x7D, 0x7E, 0x7F, 0xFD, 0xFE, 0xFF),
    torch_dtype=torch.float8_e5m2,
)

UE8M0 = FP8Format(
    name="ue8m0",
    exponent_bits=8,
    mantissa_bits=0,
    bias=127,
    signed=False,
    max=2.0**127,
    min_normal=2.0**-127,
    min_subnormal=None,
    eps=1.0,
    has_inf=False,
    nan_codes=(0xFF,),
    torch_dtype=torch.float8_e8m0fnu,
)

FORMATS: dict[str, FP8Format] = {f.name: f for f in (E4M3, E5M2, UE8M0)}

#: The torch dtypes that hold FP8 codes of a quantized tensor (E4M3 and E5M2); the one
#: definition every module checks against.
FP8_DTYPES: tuple[torch.dtype, ...] = (E4M3.torch_dtype, E5M2.torch_dtype)


def get_format(fmt: FP8Format | str) -> FP8Format:
    """Return the format object for ``fmt`` (an ``FP8Format`` or one of its names)."""
    if isinstance(fmt, FP8Format):
        return fmt
    key = str(fmt).lower().replace("float8_", "").replace("fnu", "").replace("fn", "")
    if key not in FORMATS:
        raise ValueError(f"unknown FP8 format {fmt!r}; expected one of {sorted(FORMATS)}")
    return FORMATS[key]


def _work_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 for float64 inputs, else float32 (every other float type converts exactly)."""
    if not x.is_floating_point():
        raise TypeError(f"encode expects a floating-point tensor, got {x.dtype}")
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _pow2(exp: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``2.0 ** exp`` elementwise for an integer tensor ``exp``, exactly."""
    return torch.ldexp(torch.ones(exp.shape, dtype=dtype, device=exp.device), exp)


def _encode_signed(x: torch.Tensor, fmt: FP8Format, saturate: bool) -> torch.Tensor:
    """E4M3/E5M2 codes of ``x``: round |x| to the format's grid (ties to even), then pack.

    The grid spacing at ``|x|`` is ``q = 2**(max(floor(log2|x|), emin) - mantissa_bits)``;
    ``round(|x| / q) * q`` is the rounded magnitude (``torch.round`` is half-to-even and
    ``|x| / q`` is exact because ``q`` is a power of two).
    """
    wd = _work_dtype(x)
    xf = x.to(wd)
    mag = xf.abs()
    finite = torch.isfinite(xf)
    safe = torch.where(finite, mag, torch.zeros((), dtype=wd))
    _, e = torch.frexp(safe)  # safe = m * 2**e, m in [0.5, 1)
    exp = torch.clamp(e.to(torch.int32) - 1, min=fmt.emin)
    quantum = _pow2(exp - fmt.mantissa_bits, wd)
    rounded = torch.round(safe / quantum) * quantum

    overflow = (rounded > fmt.max) | torch.isinf(xf)
    rounded = torch.where(overflow, torch.full((), fmt.max, dtype=wd), rounded)

    # Pack the rounded magnitude (now exactly representable) into exponent and mantissa.
    _, e2 = torch.frexp(rounded)
    exp2 = e2.to(torch.int32) - 1
    normal = (exp2 >= fmt.emin) & (rounded > 0)
    exp_clamped = torch.clamp(exp2, min=fmt.emin)
    mant_quantum = _pow2(exp_clamped - fmt.mantissa_bits, wd)
    implicit = torch.where(normal, _pow2(exp_clamped, wd), 0.0)
    mantissa = ((rounded - implicit) / mant_quantum).to(torch.int32)
    biased = torch.where(normal, exp_clamped + fmt.bias, torch.zeros_like(exp_clamped))
    code = (biased << fmt.mantissa_bits) | mantissa

    if not saturate:
        overflow_code = 0x7C if fmt.has_inf else 0x7F  # inf for E5M2, NaN for E4M3
        code = torch.where(overflow, torch.full_like(code, overflow_code), code)
    code = torch.where(torch.isnan(xf), torch.full_like(code, 0x7F), code)
    sign = torch.signbit(xf).to(torch.int32) << 7
    return (code | sign).to(torch.uint8)


def _encode_ue8m0(x: torch.Tensor, saturate: bool) -> torch.Tensor:
    """UE8M0 codes: ``2**e`` nearest to ``x`` (a mantissa of one half or more rounds up).

    Below ``2**-127`` the result is code 0 (there is no zero). Zero, negative values and
    values past ``2**127`` are out of range: ``saturate=True`` gives the nearest end of
    the range (code 0 or 254), ``saturate=False`` gives NaN (0xFF), as ml_dtypes does.
    """
    wd = _work_dtype(x)
    xf = x.to(wd)
    finite_pos = torch.isfinite(xf) & (xf > 0)
    safe = torch.where(finite_pos, xf, torch.ones((), dtype=wd))
    m, e = torch.frexp(safe)  # safe = m * 2**e, m in [0.5, 1): 2**(e-1) * (2m)
    exp = e.to(torch.int32) - 1 + (m >= 0.75).to(torch.int32)
    code = torch.clamp(exp + 127, min=0)
    too_big = code > 254
    code = torch.clamp(code, max=254)
    if saturate:
        nonpos = ~torch.isnan(xf) & (xf <= 0)
        code = torch.where(nonpos, torch.zeros_like(code), code)
        code = torch.where(torch.isposinf(xf), torch.full_like(code, 254), code)
        bad = torch.isnan(xf)
    else:
        bad = ~finite_pos | too_big
    code = torch.where(bad, torch.full_like(code, 0xFF), code)
    return code.to(torch.uint8)


def encode(x: torch.Tensor, fmt: FP8Format | str, saturate: bool = True) -> torch.Tensor:
    """Round ``x`` to the nearest value of ``fmt`` and return its 8-bit codes.

    Args:
        x: any floating-point tensor, any shape.
        fmt: ``E4M3``, ``E5M2``, ``UE8M0`` or one of their names.
        saturate: out-of-range values become +-max (True) or NaN/inf (False).

    Returns:
        ``torch.uint8`` tensor of ``x``'s shape. NaN inputs give a NaN code.
    """
    fmt = get_format(fmt)
    if fmt is UE8M0:
        return _encode_ue8m0(x, saturate)
    return _encode_signed(x, fmt, saturate)


@cache
def _decode_table(name: str) -> torch.Tensor:
    """float32 value of each of the 256 codes, from the format's formula."""
    fmt = FORMATS[name]
    values = []
    for code in range(256):
        if code in fmt.nan_codes:
            values.append(float("nan"))
            continue
        if not fmt.signed:
            values.append(2.0 ** (code - fmt.bias))
            continue
        sign = -1.0 if code & 0x80 else 1.0
        biased = (code >> fmt.mantissa_bits) & ((1 << fmt.exponent_bits) - 1)
        mant = code & ((1 << fmt.mantissa_bits) - 1)
        if fmt.has_inf and biased == (1 << fmt.exponent_bits) - 1:
            values.append(sign * float("inf"))  # mantissa 0 here: the NaNs were handled above
        elif biased == 0:
            values.append(sign * mant * 2.0 ** (fmt.emin - fmt.mantissa_bits))
        else:
            values.append(sign * (1 + mant / 2**fmt.mantissa_bits) * 2.0 ** (biased - fmt.bias))
    return torch.tensor(values, dtype=torch.float32)


def decode(codes: torch.Tensor, fmt: FP8Format | str) -> torch.Tensor:
    """float32 values of 8-bit ``codes`` (``torch.uint8``, any shape) in format ``fmt``."""
    fmt = get_format(fmt)
    if codes.dtype != torch.uint8:
        raise TypeError(f"decode expects torch.uint8 codes, got {codes.dtype}")
    table = _decode_table(fmt.name).to(codes.device)
    return table[codes.long()]


def to_fp8(x: torch.Tensor, fmt: FP8Format | str = E4M3) -> torch.Tensor:
    """Saturating round-to-nearest-even cast of ``x`` to ``fmt.torch_dtype`` (E4M3 or E5M2).

    ``clamp(x, -max, max)`` followed by torch's cast: identical, code for code, to
    ``encode(x, fmt, saturate=True)`` (the tests check it); NaN stays NaN.
    """
    fmt = get_format(fmt)
    if fmt is UE8M0:
        raise ValueError("to_fp8 casts to E4M3 or E5M2; use round_up_pow2 for UE8M0 scales")
    return x.clamp(-fmt.max, fmt.max).to(fmt.torch_dtype)


def round_up_pow2(s: torch.Tensor) -> torch.Tensor:
    """Smallest power of two ``>= s`` for positive ``s``: ``2**ceil(log2(s))``, exactly.

    Computed from ``frexp`` (``s = m * 2**e``, ``m`` in [0.5, 1)), so exact powers of two
    are kept and nothing depends on the rounding of ``log2``. Shapes and dtype unchanged.
    """
    m, e = torch.frexp(s)
    exp = torch.where(m == 0.5, e - 1, e)
    return torch.ldexp(torch.ones_like(s), exp)
