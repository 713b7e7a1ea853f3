"""Fine-grained FP8 quantization, the reference: 128x128 weight blocks, 1x128 activation groups.

The math of DeepSeek-V3's scheme (docs/numerics.md), in fp32 as the reference does:

* weights, ``w`` of shape ``[M, N]`` (``[out, in]``), blocks of ``bm x bn`` (128 x 128)::

      s[i, j] = max(amax(|w[bm*i : bm*(i+1), bn*j : bn*(j+1)]|), amax_floor) / fmt.max
      q       = cast_fp8(w.float() / s)          # round to nearest even, saturating
      w      ~= q * s

  ``s``, called ``scale`` throughout the library (the *de*quantization multiplier;
  DeepSeek-V3 checkpoints store it as ``weight_scale_inv``), has shape
  ``[ceil(M/bm), ceil(N/bn)]``; a partial edge block behaves as if zero-padded.
* activations, ``x`` of shape ``[..., K]``, groups of ``g`` (128) consecutive channels
  of the last dimension; ``s`` has shape ``[..., ceil(K/g)]``.
* ``scale_fmt="ue8m0"`` rounds each scale *up* to a power of two,
  ``s = 2**ceil(log2(s))``, so ``|w / s| <= fmt.max`` still holds, and the codes are
  computed with the rounded scale.

``amax_floor`` (default ``1e-10``, as vLLM and SGLang; DeepGEMM uses ``1e-4``) keeps
all-zero blocks from producing ``0/0 = NaN``. NaN or Inf in the input is an error
naming the block, unless ``allow_nonfinite=True``: then scales come from the finite
values, NaN stays NaN and +-Inf saturates to +-max.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .formats import E4M3, FP8_DTYPES, FP8Format, get_format, round_up_pow2, to_fp8

__all__ = [
    "AMAX_FLOOR",
    "BLOCK_SIZE",
    "GROUP_SIZE",
    "SCALE_FMTS",
    "FLOAT_INPUT_DTYPES",
    "label",
    "check_float_input",
    "check_fp8_input",
    "check_block_size",
    "check_scale_fmt",
    "raise_nonfinite_block",
    "raise_nonfinite_group",
    "check_block_scales",
    "check_group_scales",
    "block_grid",
    "block_amax",
    "group_amax",
    "scale_from_amax",
    "expand_block_scales",
    "quantize_blockwise",
    "quantize_with_block_scales",
    "dequantize_blockwise",
    "quantize_groupwise",
    "dequantize_groupwise",
]

AMAX_FLOOR = 1e-10
BLOCK_SIZE = (128, 128)
GROUP_SIZE = 128
SCALE_FMTS = ("fp32", "ue8m0")
#: dtypes the quantizers take as input.
FLOAT_INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


# ----------------------------------------------------------------------------- checks


def label(name: str | None, default: str) -> str:
    """How error messages name a tensor: ``"tensor 'name'"``, or ``default`` when unnamed."""
    return f"tensor {name!r}" if name else default


def check_float_input(x: torch.Tensor, name: str | None, what: str) -> None:
    """Raise ``TypeError`` unless ``x`` is a tensor of a ``FLOAT_INPUT_DTYPES`` dtype."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{label(name, what)}: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_INPUT_DTYPES:
        hint = " (it is already FP8: dequantize it first)" if x.dtype in FP8_DTYPES else ""
        raise TypeError(
            f"{label(name, what)}: expected float32, bfloat16, float16 or float64, "
            f"got {x.dtype}{hint}"
        )


def check_fp8_input(q: torch.Tensor, name: str | None, what: str) -> None:
    """Raise ``TypeError`` unless ``q`` is a tensor of an FP8 dtype (``FP8_DTYPES``)."""
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"{label(name, what)}: expected a torch.Tensor, got {type(q).__name__}")
    if q.dtype not in FP8_DTYPES:
        hint = " (raw codes: call .view(torch.float8_e4m3fn) first)" if q.dtype == torch.uint8 else ""
        raise TypeError(
            f"{label(name, what)}: expected torch.float8_e4m3fn or float8_e5m2, got {q.dtype}{hint}"
        )


def check_block_size(block_size: tuple[int, int]) -> tuple[int, int]:
    """``(bm, bn)`` as ints; ``ValueError`` unless two positive integers."""
    if len(block_size) != 2 or any(int(b) != b or b < 1 for b in block_size):
        raise ValueError(f"block_size must be two positive integers, got {block_size!r}")
    return int(block_size[0]), int(block_size[1])


def check_scale_fmt(scale_fmt: str) -> None:
    """Raise ``ValueError`` unless ``scale_fmt`` is one of ``SCALE_FMTS``."""
    if scale_fmt not in SCALE_FMTS:
        raise ValueError(f"scale_fmt must be one of {SCALE_FMTS}, got {scale_fmt!r}")


def check_block_scales(shape: tuple[int, int], scale: torch.Tensor, block: tuple[int, int],
                       name: str | None) -> tuple[int, int]:
    """Raise ``ValueError`` unless ``scale`` has the block grid of an ``[M, N]`` weight with
    ``bm x bn`` blocks, ``(ceil(M/bm), ceil(N/bn))``; returns that grid."""
    grid = block_grid(tuple(shape), tuple(block))
    if tuple(scale.shape) != grid:
        raise ValueError(
            f"{label(name, 'weight')}: scale shape {tuple(scale.shape)} does not match weight "
            f"shape {tuple(shape)} with {block[0]}x{block[1]} blocks (expected {grid})")
    return grid


def check_group_scales(shape: tuple[int, ...], scale: torch.Tensor, group_size: int,
                       name: str | None) -> tuple[int, ...]:
    """Raise ``ValueError`` unless ``scale`` has the group shape of a ``[..., K]`` activation,
    ``[..., ceil(K/g)]``; returns that shape."""
    expected = tuple(shape[:-1]) + (math.ceil(shape[-1] / group_size),)
    if tuple(scale.shape) != expected:
        raise ValueError(f"{label(name, 'activation')}: scale shape {tuple(scale.shape)} does not "
                         f"match {tuple(shape)} with groups of {group_size} (expected {expected})")
    return expected


def block_grid(shape: tuple[int, int], block_size: tuple[int, int] = BLOCK_SIZE) -> tuple[int, int]:
    """Shape of the scale grid of an ``[M, N]`` matrix: ``(ceil(M/bm), ceil(N/bn))``."""
    return math.ceil(shape[0] / block_size[0]), math.ceil(shape[1] / block_size[1])


def raise_nonfinite_block(amax: torch.Tensor, shape: tuple[int, int], block: tuple[int, int],
                          name: str | None) -> None:
    """Raise the error naming the first block of ``amax`` (a block-amax grid) that is not finite."""
    bad = torch.nonzero(~torch.isfinite(amax))
    i, j = (int(v) for v in bad[0])
    bm, bn = block
    r0, r1 = i * bm, min((i + 1) * bm, shape[0])
    c0, c1 = j * bn, min((j + 1) * bn, shape[1])
    more = f" (and {len(bad) - 1} more blocks)" if len(bad) > 1 else ""
    raise ValueError(
        f"{label(name, 'weight')} has NaN or Inf in block ({i}, {j}): rows {r0}:{r1}, "
        f"columns {c0}:{c1}{more}. Fix the source weights, or pass allow_nonfinite=True to "
        f"scale from the finite values (NaN stays NaN, Inf saturates)."
    )


def raise_nonfinite_group(amax: torch.Tensor, k: int, group: int, name: str | None) -> None:
    """Raise the error naming the first group of ``amax`` (``[..., ceil(K/g)]``) not finite."""
    bad = torch.nonzero(~torch.isfinite(amax))
    idx = tuple(int(v) for v in bad[0])
    j = idx[-1]
    more = f" (and {len(bad) - 1} more groups)" if len(bad) > 1 else ""
    raise ValueError(
        f"{label(name, 'activation')} has NaN or Inf at token index {idx[:-1]}, "
        f"channels {j * group}:{min((j + 1) * group, k)}{more}. Pass allow_nonfinite=True "
        f"to quantize the finite values anyway."
    )


# ----------------------------------------------------------------------------- helpers


def _pad2d(x: torch.Tensor, bm: int, bn: int) -> torch.Tensor:
    """Zero-pad a 2-D tensor at the bottom/right to multiples of ``(bm, bn)``."""
    m, n = x.shape
    pm, pn = (-m) % bm, (-n) % bn
    return F.pad(x, (0, pn, 0, pm)) if pm or pn else x


def _padlast(x: torch.Tensor, g: int) -> torch.Tensor:
    """Zero-pad the last dimension to a multiple of ``g``."""
    p = (-x.shape[-1]) % g
    return F.pad(x, (0, p)) if p else x


def _finite_or_zero(x: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(x), x, torch.zeros((), dtype=x.dtype, device=x.device))


def block_amax(w: torch.Tensor, block_size: tuple[int, int] = BLOCK_SIZE) -> torch.Tensor:
    """``amax(|w|)`` of every block: ``[M, N]`` -> ``[ceil(M/bm), ceil(N/bn)]`` float32.

    NaN anywhere in a block makes that block's amax NaN (torch's ``amax`` propagates it).
    """
    bm, bn = block_size
    p = _pad2d(w, bm, bn)
    gm, gn = p.shape[0] // bm, p.shape[1] // bn
    return p.view(gm, bm, gn, bn).abs().amax(dim=(1, 3)).float()


def group_amax(x: torch.Tensor, group_size: int = GROUP_SIZE) -> torch.Tensor:
    """``amax(|x|)`` of every group of the last dim: ``[..., K]`` -> ``[..., ceil(K/g)]`` float32."""
    p = _padlast(x, group_size)
    return p.view(*p.shape[:-1], p.shape[-1] // group_size, group_size).abs().amax(-1).float()


def scale_from_amax(amax: torch.Tensor, fmt: FP8Format = E4M3, scale_fmt: str = "fp32",
                    amax_floor: float = AMAX_FLOOR) -> torch.Tensor:
    """Dequantization scale of each group: ``s = max(amax, amax_floor) / fmt.max`` (fp32).

    With ``scale_fmt="ue8m0"``: ``s = 2**ceil(log2(s))`` (never smaller, so no overflow).
    """
    s = torch.clamp(amax.float(), min=amax_floor) / fmt.max
    return round_up_pow2(s) if scale_fmt == "ue8m0" else s


def expand_block_scales(scale: torch.Tensor, shape: tuple[int, int],
                        block_size: tuple[int, int] = BLOCK_SIZE) -> torch.Tensor:
    """Per-element scales of an ``[M, N]`` matrix from its ``[ceil(M/bm), ceil(N/bn)]`` grid."""
    bm, bn = block_size
    return scale.repeat_interleave(bm, 0)[: shape[0]].repeat_interleave(bn, 1)[:, : shape[1]]


# ----------------------------------------------------------------------------- weights


def quantize_with_block_scales(w: torch.Tensor, scale: torch.Tensor,
                               block_size: tuple[int, int] = BLOCK_SIZE,
                               fmt: FP8Format | str = E4M3) -> torch.Tensor:
    """Codes of ``w`` for given block scales: ``cast_fp8(w.float() / s)``, ``[M, N]`` -> fp8.

    The building block of ``quantize_blockwise`` and of any scale search: the scales
    are the caller's, the division is fp32, the cast rounds to nearest even and saturates.
    """
    fmt = get_format(fmt)
    bm, bn = check_block_size(block_size)
    m, n = w.shape
    p = _pad2d(w.float(), bm, bn)
    gm, gn = p.shape[0] // bm, p.shape[1] // bn
    if tuple(scale.shape) != (gm, gn):
        raise ValueError(f"scale grid {tuple(scale.shape)} does not match weight {tuple(w.shape)} "
                         f"with blocks {block_size}: expected {(gm, gn)}")
    x = p.view(gm, bm, gn, bn) / scale.float().view(gm, 1, gn, 1)
    return to_fp8(x.view(gm * bm, gn * bn)[:m, :n], fmt)


def quantize_blockwise(
    w: torch.Tensor,
    block_size: tuple[int, int] = BLOCK_SIZE,
    scale_fmt: str = "fp32",
    *,
    fmt: FP8Format | str = E4M3,
    amax_floor: float = AMAX_FLOOR,
    allow_nonfinite: bool = False,
    name: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise FP8 quantization of a 2-D weight (DeepSeek-V3, 128x128 blocks).

    Args:
        w: ``[M, N]`` float32 / bfloat16 / float16 / float64, any M, N >= 1.
        block_size: ``(bm, bn)``.
        scale_fmt: ``"fp32"`` (``amax / 448``) or ``"ue8m0"`` (rounded up to a power of two).
        fmt: the code format, E4M3 unless asked otherwise.
        amax_floor: lower bound on a block's amax, so all-zero blocks give finite scales.
        allow_nonfinite: quantize NaN/Inf instead of raising (see the module docstring).
        name: the tensor's name, used in error messages.

    Returns:
        ``(q, scale)``: ``q`` is ``[M, N]`` in ``fmt.torch_dtype``; ``scale`` is
        ``[ceil(M/bm), ceil(N/bn)]`` float32 with ``w ~= q * scale`` per block.
    """
    check_float_input(w, name, "weight")
    if w.dim() != 2:
        raise ValueError(f"{label(name, 'weight')}: block-wise quantization needs a 2-D tensor, "
                         f"got shape {tuple(w.shape)}")
    if w.numel() == 0:
        raise ValueError(f"{label(name, 'weight')}: empty tensor of shape {tuple(w.shape)}")
    check_scale_fmt(scale_fmt)
    fmt = get_format(fmt)
    block = check_block_size(block_size)
    amax = block_amax(w, block)
    if not bool(torch.isfinite(amax).all()):
        if not allow_nonfinite:
            raise_nonfinite_block(amax, tuple(w.shape), block, name)
        amax = block_amax(_finite_or_zero(w), block)
    scale = scale_from_amax(amax, fmt, scale_fmt, amax_floor)
    return quantize_with_block_scales(w, scale, block, fmt), scale


def dequantize_blockwise(
    q: torch.Tensor,
    scale: torch.Tensor,
    block_size: tuple[int, int] = BLOCK_SIZE,
    dtype: torch.dtype = torch.bfloat16,
    *,
    name: str | None = None,
) -> torch.Tensor:
    """``w = q.float() * scale`` per block, cast to ``dtype``.

    Args:
        q: ``[M, N]`` float8_e4m3fn or float8_e5m2.
        scale: ``[ceil(M/bm), ceil(N/bn)]`` (any float dtype; used as fp32).
    Returns:
        ``[M, N]`` tensor of ``dtype``.
    """
    check_fp8_input(q, name, "weight")
    if q.dim() != 2:
        raise ValueError(f"{label(name, 'weight')}: expected a 2-D tensor, got shape {tuple(q.shape)}")
    bm, bn = check_block_size(block_size)
    m, n = q.shape
    grid = check_block_scales((m, n), scale, (bm, bn), name)
    p = _pad2d(q.float(), bm, bn)
    x = p.view(grid[0], bm, grid[1], bn) * scale.float().view(grid[0], 1, grid[1], 1)
    return x.view(grid[0] * bm, grid[1] * bn)[:m, :n].to(dtype)


# ----------------------------------------------------------------------------- activations


def quantize_groupwise(
    x: torch.Tensor,
    group_size: int = GROUP_SIZE,
    scale_fmt: str = "fp32",
    *,
    fmt: FP8Format | str = E4M3,
    amax_floor: float = AMAX_FLOOR,
    allow_nonfinite: bool = False,
    name: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token-group FP8 quantization of activations (DeepSeek-V3, 1x128 groups).

    Args:
        x: ``[..., K]`` float tensor (any leading shape, any K >= 1).
        group_size: channels per group along the last dimension.
    Returns:
        ``(q, scale)``: ``q`` of ``x``'s shape in ``fmt.torch_dtype``; ``scale`` float32 of shape
        ``x.shape[:-1] + (ceil(K/group_size),)`` with ``x ~= q * scale`` per group.
    """
    check_float_input(x, name, "activation")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{label(name, 'activation')}: needs a non-empty last dimension, "
                         f"got shape {tuple(x.shape)}")
    if int(group_size) != group_size or group_size < 1:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
    check_scale_fmt(scale_fmt)
    fmt = get_format(fmt)
    k = x.shape[-1]
    amax = group_amax(x, group_size)
    if not bool(torch.isfinite(amax).all()):
        if not allow_nonfinite:
            raise_nonfinite_group(amax, k, group_size, name)
        amax = group_amax(_finite_or_zero(x), group_size)
    scale = scale_from_amax(amax, fmt, scale_fmt, amax_floor)
    p = _padlast(x.float(), group_size)
    g = p.view(*p.shape[:-1], -1, group_size) / scale.unsqueeze(-1)
    q = to_fp8(g.view(p.shape)[..., :k], fmt)
    return q, scale


def dequantize_groupwise(
    q: torch.Tensor,
    scale: torch.Tensor,
    group_size: int = GROUP_SIZE,
    dtype: torch.dtype = torch.bfloat16,
    *,
    name: str | None = None,
) -> torch.Tensor:
    """``x = q.float() * scale`` per group of the last dimension, cast to ``dtype``.

    Shapes: ``q`` ``[..., K]``, ``scale`` ``[..., ceil(K/group_size)]``.
    """
    check_fp8_input(q, name, "activation")
    k = q.shape[-1]
    check_group_scales(tuple(q.shape), scale, group_size, name)
    p = _padlast(q.float(), group_size)
    x = p.view(*p.shape[:-1], -1, group_size) * scale.float().unsqueeze(-1)
    return x.view(p.shape)[..., :k].to(dtype)
