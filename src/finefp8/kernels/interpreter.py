"""Triton's CPU interpreter and FP8: which wrong codes its fp32 -> float8e4nv cast produces.

Triton 3.9's interpreter (``TRITON_INTERPRET=1``) converts fp32 to float8e4nv in numpy
by adding the first dropped bit to the 3-bit mantissa and OR-ing the result into the
exponent field (docs/gpu.md). Against a correct round-to-nearest-even cast, for
normal results that gives exactly two kinds of wrong code:

1. lost carry: a value that rounds up to a power of two ``r`` comes out as ``r / 2``
   when the carry should flip an exponent bit that is already set (31.32 -> 16, not 32);
2. ties away from zero: a value exactly halfway between two codes takes the one
   farther from zero, not the even one (common when inputs are bf16 and scales are
   powers of two).

Subnormal results (``|x / s| < 2**-6``) are truncated, and NaN is not kept; callers that
compare codes keep their data clear of those. ``cast_defect_mask`` marks the codes
explained by (1) or (2), so a comparison can accept exactly those and nothing else.
On a GPU the hardware cast (``cvt.rn.satfinite``) is exact and none of this applies.
"""

from __future__ import annotations

import torch

__all__ = ["cast_defect_mask"]


def cast_defect_mask(y: torch.Tensor, want: torch.Tensor, got: torch.Tensor) -> torch.Tensor:
    """True where the interpreter's code ``got`` differs from ``want`` by the known cast defect.

    Args:
        y: the exact value before the cast (``x / s`` in fp32), any shape.
        want: the correct FP8 tensor (e.g. the reference quantizer's), same shape.
        got: the FP8 tensor the interpreted kernel wrote, same shape.
    Returns:
        bool tensor: ``want`` is a power of two reached by rounding up and ``got == want / 2``
        (lost carry), or ``y`` is exactly halfway between ``want`` and ``got`` with ``got``
        farther from zero (tie rounded away).
    """
    r, k = want.float(), got.float()
    mant, _ = torch.frexp(r.abs())
    lost_carry = (mant == 0.5) & (y.abs() < r.abs()) & (k == r / 2)
    tie_away = (y == (r + k) / 2) & (k.abs() > r.abs()) & (torch.sign(k) == torch.sign(r))
    return lost_carry | tie_away
