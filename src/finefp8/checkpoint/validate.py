"""Checks of conversion inputs and outputs that the file format alone does not make.

The reader already refuses what the safetensors format, the index and ``config.json`` forbid
(``reader.read_header``, ``CheckpointReader``). This module checks the numbers:

* ``scale_problem``: a block-scale tensor must be floating-point, finite and > 0 everywhere.
  A NaN/Inf scale turns its whole block non-finite, a zero scale zeroes it and a negative one
  flips its sign; all of them silently. Used by ``dequantize``, ``inspect`` and
  ``finefp8.load``.
* ``check_scales``: ``scale_problem`` over every scale a dequantize will use, before any byte
  is written.
* ``dequantize_overflow`` / ``first_nonfinite``: whether ``Q * s`` exceeds the largest finite
  value of the output dtype (fp16: 65504; bf16 about 3.39e38; fp32 about 3.40e38). A block
  with ``max|Q| * s <= max`` cannot overflow, so only weights whose scales allow it are read.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

from .. import ops
from .errors import ConversionError
from .reader import ST_DTYPES, CheckpointReader, read_rows

__all__ = [
    "FP8_MAX_CODE",
    "scale_problem",
    "check_scales",
    "first_nonfinite",
    "dequantize_overflow",
    "check_dequantize_overflow",
]

#: largest finite magnitude of the FP8 code dtypes (E4M3: 448, E5M2: 57344).
FP8_MAX_CODE = {"F8_E4M3": 448.0, "F8_E5M2": 57344.0}
_CHECK_ROWS_ELEMENTS = 8 * 1024 * 1024


def _where(shape: Sequence[int], flat: int) -> str:
    """``(i, j, ...)`` of flat index ``flat`` in ``shape``."""
    idx = []
    for d in reversed(tuple(shape)):
        idx.append(flat % d if d else 0)
        flat //= d if d else 1
    return "(" + ", ".join(str(i) for i in reversed(idx)) + ")"


def scale_problem(key: str, scale: torch.Tensor) -> str | None:
    """What is wrong with block-scale tensor ``key`` (``None`` when it is sound).

    Sound: a floating-point dtype (F32, BF16, F16, F8_E8M0...) and every value finite and
    strictly positive. Otherwise the message names the tensor, the count of bad values and
    the first bad block ``(i, j)``.
    """
    if not scale.is_floating_point():
        return (f"scale {key!r} has the integer dtype {str(scale.dtype).replace('torch.', '')}; "
                f"block scales are floating-point multipliers")
    s = scale.float()
    bad = ~torch.isfinite(s)
    if bool(bad.any()):
        first = int(torch.nonzero(bad.reshape(-1))[0])
        return (f"scale {key!r} has {int(bad.sum())} NaN/Inf values (first at block "
                f"{_where(s.shape, first)}): every value of that block would be non-finite")
    bad = s <= 0
    if bool(bad.any()):
        first = int(torch.nonzero(bad.reshape(-1))[0])
        return (f"scale {key!r} has {int(bad.sum())} zero or negative values (first at block "
                f"{_where(s.shape, first)} = {float(s.reshape(-1)[first]):g}): the block would "
                f"be zeroed or sign-flipped")
    return None


def check_scales(reader: CheckpointReader, scale_keys: Iterable[str],
                 allow_nonfinite: bool = False) -> None:
    """``scale_problem`` of every tensor in ``scale_keys``; raises ``ConversionError`` listing
    up to five problems. ``allow_nonfinite`` lets NaN/Inf scales through (their blocks are
    then written as NaN/Inf); integer, zero and negative scales are refused in any case."""
    problems = []
    for key in scale_keys:
        p = scale_problem(key, reader.get(key))
        if p is not None and not (allow_nonfinite and "NaN/Inf" in p):
            problems.append(p)
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        hint = (" Re-download or re-create the checkpoint"
                + ("" if any("integer" in p or "zero" in p for p in problems)
                   else ", or pass --allow-nonfinite (allow_nonfinite=True) to write non-finite "
                        "blocks anyway"))
        raise ConversionError(f"{reader.root}: " + "; ".join(problems[:5]) + more + "." + hint)


def first_nonfinite(t: torch.Tensor, r0: int = 0) -> str | None:
    """``"row r, column c"`` of the first NaN/Inf of 2-D ``t`` (rows offset by ``r0``), or
    ``None`` when every value is finite."""
    bad = ~torch.isfinite(t)
    if not bool(bad.any()):
        return None
    r, c = (int(v) for v in torch.nonzero(bad.reshape(t.shape[0], -1))[0])
    return f"row {r + r0}, column {c}"


def dequantize_overflow(reader: CheckpointReader, weight: str, scale: str,
                        block_size: tuple[int, int], dtype: torch.dtype) -> str | None:
    """Where ``Q * s`` of FP8 ``weight`` first overflows ``dtype`` (``"row r, column c"``),
    or ``None``. Reads the codes only when ``max(s) * max_code`` exceeds ``finfo(dtype).max``."""
    info = reader.info(weight)
    if len(info.shape) != 2:  # fused 3-D expert stacks: checked per expert as they are written
        return None
    s = reader.get(scale).double()
    fmax = torch.finfo(dtype).max
    finite = torch.isfinite(s)
    if not bool(finite.any()) or not s.numel():
        return None
    if float(s[finite].max()) * FP8_MAX_CODE[info.dtype] <= fmax:
        return None
    bm = block_size[0]
    cols = max(1, math.prod(info.shape[1:]))
    step = bm * max(1, _CHECK_ROWS_ELEMENTS // (bm * cols))
    sf = reader.get(scale).float()
    for r0 in range(0, info.shape[0], step):
        r1 = min(info.shape[0], r0 + step)
        q = read_rows(reader.root, info, r0, r1)
        sc = sf[r0 // bm: math.ceil(r1 / bm)]
        if not bool(torch.isfinite(sc).all()):
            continue  # non-finite scales are check_scales' business
        out = ops.dequantize_blockwise(q, sc, block_size, dtype, name=weight)
        nan_in = q.float().isnan()
        where = first_nonfinite(out.masked_fill(nan_in, 0), r0)
        if where is not None:
            return where
    return None


def check_dequantize_overflow(reader: CheckpointReader, pairs: Sequence[tuple[str, str]],
                              block_size: tuple[int, int], st_dtype: str) -> None:
    """Refuse (``ConversionError`` naming the tensor and the first value) when dequantizing any
    ``(weight, scale)`` of ``pairs`` to safetensors dtype ``st_dtype`` would overflow to Inf."""
    dtype = ST_DTYPES[st_dtype]
    for weight, scale in pairs:
        where = dequantize_overflow(reader, weight, scale, block_size, dtype)
        if where is not None:
            name = {"F16": "fp16", "BF16": "bf16", "F32": "fp32"}.get(st_dtype, st_dtype)
            raise ConversionError(
                f"dequantizing {weight!r} to {name} overflows: Q * s exceeds the largest finite "
                f"{name} value ({torch.finfo(dtype).max:g}) at {where}, which would be written "
                f"as Inf. Choose a wider --dtype (fp32 or bf16), or pass --allow-nonfinite "
                f"(allow_nonfinite=True) to write Inf anyway")
