"""Triton kernels for fine-grained FP8 quantization: 1x128 activation groups, 128x128 weight blocks.

The math is the reference's (``finefp8.quantization``), in fp32, operation for operation,
so on a GPU the codes and scales are identical to the reference's::

    amax = max(|x| over the group or block)            # NaN -> inf unless allow_nonfinite
    s    = max(amax, amax_floor) / 448                 # IEEE division (tl.div_rn)
    s    = 2**ceil(log2(s))                            # ue8m0 only: exponent bits rounded up
    q    = cast_e4m3(clamp(x / s, -448, 448))          # round to nearest even, saturating

* ``act_quant``: ``x [..., K]`` -> ``q [..., K]`` float8_e4m3fn, ``s [..., ceil(K/128)]`` fp32.
* ``weight_quant``: ``w [M, N]`` -> ``q [M, N]`` float8_e4m3fn, ``s [ceil(M/128), ceil(N/128)]``.
* ``weight_dequant``: ``q [M, N]`` fp8, ``s`` as above -> ``q * s`` in bf16 / fp16 / fp32.

Edges are masked: K, M, N need not be multiples of the group or block (a partial
group counts as zero-padded, as in the reference). Non-finite inputs: with
``allow_nonfinite=False`` a NaN or Inf makes its group's scale infinite and the
wrapper raises the reference's error (this check reads the scales back: one small
reduction and a host sync); with ``allow_nonfinite=True`` scales come from the finite
values, NaN stays NaN and +-Inf saturates, and nothing is synchronized.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..formats import E4M3, FP8Format
from ..quantization import (
    AMAX_FLOOR,
    BLOCK_SIZE,
    GROUP_SIZE,
    block_grid,
    check_scale_fmt,
    label,
    raise_nonfinite_block,
    raise_nonfinite_group,
)
from . import (
    act_quant_limit,
    interpreter_enabled,
    on_device,
    weight_dequant_limit,
    weight_quant_limit,
)

__all__ = ["act_quant", "weight_quant", "weight_dequant"]

_FP8_MAX = E4M3.max


@triton.jit
def _abs_for_amax(x, ALLOW_NONFINITE: tl.constexpr):
    """|x| for the amax: non-finite values ignored (0) if allowed, else NaN counted as inf."""
    ax = tl.abs(x)
    if ALLOW_NONFINITE:
        ax = tl.where(ax < float("inf"), ax, 0.0)
    else:
        ax = tl.where(ax == ax, ax, float("inf"))
    return ax


@triton.jit
def _scale(amax, amax_floor, FP8_MAX: tl.constexpr, UE8M0: tl.constexpr):
    """``s = max(amax, floor) / FP8_MAX`` (IEEE division); ue8m0: exponent rounded up."""
    s = tl.div_rn(tl.maximum(amax, amax_floor), FP8_MAX)
    if UE8M0:
        s = ((s.to(tl.int32, bitcast=True) + 0x7FFFFF) & 0x7F800000).to(tl.float32, bitcast=True)
    return s


@triton.jit
def _saturated(x, s, FP8_MAX: tl.constexpr):
    """``clamp(x / s, -FP8_MAX, FP8_MAX)`` (IEEE division), NaN kept, ready for the fp8 cast."""
    y = tl.div_rn(x, s)
    return tl.where(y == y, tl.minimum(tl.maximum(y, -FP8_MAX), FP8_MAX), y)


@triton.jit
def _act_quant_kernel(x_ptr, y_ptr, s_ptr, R, K, NG, amax_floor,
                      GROUP: tl.constexpr, BLOCK_R: tl.constexpr, FP8_MAX: tl.constexpr,
                      UE8M0: tl.constexpr, ALLOW_NONFINITE: tl.constexpr):
    """One program: ``BLOCK_R`` rows x one group of ``GROUP`` channels.

    x: [R, K] fp32/bf16/fp16/fp64, y: [R, K] float8_e4m3fn, s: [R, NG] fp32, NG = ceil(K/GROUP).
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    g = tl.program_id(1)
    cols = g * GROUP + tl.arange(0, GROUP)
    mask = (rows[:, None] < R) & (cols[None, :] < K)
    offs = rows[:, None].to(tl.int64) * K + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    ax = _abs_for_amax(x, ALLOW_NONFINITE)
    s = _scale(tl.max(ax, axis=1), amax_floor, FP8_MAX, UE8M0)
    y = _saturated(x, s[:, None], FP8_MAX)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + rows.to(tl.int64) * NG + g, s, mask=rows < R)


@triton.jit
def _weight_quant_kernel(x_ptr, y_ptr, s_ptr, M, N, amax_floor,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, FP8_MAX: tl.constexpr,
                         UE8M0: tl.constexpr, ALLOW_NONFINITE: tl.constexpr):
    """One program: one ``BLOCK_M x BLOCK_N`` block and its scale.

    x: [M, N] fp32/bf16/fp16/fp64, y: [M, N] float8_e4m3fn, s: [ceil(M/BM), ceil(N/BN)] fp32.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    offs = rows[:, None].to(tl.int64) * N + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    ax = _abs_for_amax(x, ALLOW_NONFINITE)
    s = _scale(tl.max(tl.max(ax, axis=1), axis=0), amax_floor, FP8_MAX, UE8M0)
    y = _saturated(x, s, FP8_MAX)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + pid_m * tl.num_programs(1) + pid_n, s)


@triton.jit
def _weight_dequant_kernel(q_ptr, s_ptr, y_ptr, M, N,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program: ``y = q.float() * s`` for one block.

    q: [M, N] fp8, s: [ceil(M/BM), ceil(N/BN)] fp32/bf16/fp16, y: [M, N] bf16/fp16/fp32.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    offs = rows[:, None].to(tl.int64) * N + cols[None, :]
    q = tl.load(q_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + pid_m * tl.num_programs(1) + pid_n).to(tl.float32)
    tl.store(y_ptr + offs, (q * s).to(y_ptr.dtype.element_ty), mask=mask)


# act_quant is on the inference hot path: tune the rows per program (on a GPU; under the
# interpreter one fixed config runs). The weight kernels take one block per program, 8 warps.
_act_quant_tuned = triton.autotune(
    [triton.Config({"BLOCK_R": 8}, num_warps=2),
     triton.Config({"BLOCK_R": 16}, num_warps=4),
     triton.Config({"BLOCK_R": 32}, num_warps=4),
     triton.Config({"BLOCK_R": 64}, num_warps=8)],
    key=["K", "GROUP"],
)(_act_quant_kernel)
_WEIGHT_WARPS = 8


def act_quant(x: torch.Tensor, group_size: int = GROUP_SIZE, scale_fmt: str = "fp32", *,
              fmt: FP8Format | str = E4M3, amax_floor: float = AMAX_FLOOR,
              allow_nonfinite: bool = False, name: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token-group FP8 quantization on the GPU (same contract as the reference).

    Args:
        x: ``[..., K]`` fp32/bf16/fp16/fp64, any leading shape, any K >= 1.
        group_size: channels per group (a power of two, 128 by default).
        scale_fmt: ``"fp32"`` or ``"ue8m0"``.
    Returns:
        ``(q, s)``: ``q`` float8_e4m3fn of ``x``'s shape, ``s`` fp32 ``[..., ceil(K/group_size)]``.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{label(name, 'activation')}: expected a torch.Tensor, got {type(x).__name__}")
    limit = act_quant_limit(x, group_size, fmt)
    if limit:
        raise ValueError(f"act_quant, {label(name, 'activation')}: {limit}")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{label(name, 'activation')}: needs a non-empty last dimension, "
                         f"got shape {tuple(x.shape)}")
    check_scale_fmt(scale_fmt)
    k = x.shape[-1]
    lead = tuple(x.shape[:-1])
    x2 = x.reshape(-1, k).contiguous()
    r, ng = x2.shape[0], math.ceil(k / group_size)
    q = torch.empty(x2.shape, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty((r, ng), dtype=torch.float32, device=x.device)
    if r:
        args = (x2, q, s, r, k, ng, float(amax_floor))
        meta = dict(GROUP=int(group_size), FP8_MAX=_FP8_MAX, UE8M0=scale_fmt == "ue8m0",
                    ALLOW_NONFINITE=bool(allow_nonfinite))
        with on_device(x):
            if interpreter_enabled():
                block_r = min(16, triton.next_power_of_2(r))
                _act_quant_kernel[(triton.cdiv(r, block_r), ng)](*args, BLOCK_R=block_r, **meta)
            else:
                _act_quant_tuned[lambda m: (triton.cdiv(r, m["BLOCK_R"]), ng)](*args, **meta)
    s = s.view(*lead, ng)
    if not allow_nonfinite and not bool(torch.isfinite(s).all()):
        raise_nonfinite_group(s, k, group_size, name)
    return q.view(x.shape), s


def weight_quant(w: torch.Tensor, block_size: tuple[int, int] = BLOCK_SIZE, scale_fmt: str = "fp32", *,
                 fmt: FP8Format | str = E4M3, amax_floor: float = AMAX_FLOOR,
                 allow_nonfinite: bool = False, name: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise FP8 quantization of a 2-D weight on the GPU (same contract as the reference).

    Args:
        w: ``[M, N]`` fp32/bf16/fp16/fp64, any M, N >= 1.
        block_size: ``(bm, bn)``, powers of two, ``(128, 128)`` by default.
    Returns:
        ``(q, s)``: ``q`` float8_e4m3fn ``[M, N]``, ``s`` fp32 ``[ceil(M/bm), ceil(N/bn)]``.
    """
    if not isinstance(w, torch.Tensor):
        raise TypeError(f"{label(name, 'weight')}: expected a torch.Tensor, got {type(w).__name__}")
    limit = weight_quant_limit(w, block_size, fmt)
    if limit:
        raise ValueError(f"weight_quant, {label(name, 'weight')}: {limit}")
    if w.dim() != 2 or w.numel() == 0:
        raise ValueError(f"{label(name, 'weight')}: block-wise quantization needs a non-empty 2-D "
                         f"tensor, got shape {tuple(w.shape)}")
    check_scale_fmt(scale_fmt)
    bm, bn = (int(b) for b in block_size)
    m, n = w.shape
    gm, gn = block_grid((m, n), (bm, bn))
    w = w.contiguous()
    q = torch.empty((m, n), dtype=torch.float8_e4m3fn, device=w.device)
    s = torch.empty((gm, gn), dtype=torch.float32, device=w.device)
    with on_device(w):
        _weight_quant_kernel[(gm, gn)](w, q, s, m, n, float(amax_floor), BLOCK_M=bm, BLOCK_N=bn, FP8_MAX=_FP8_MAX,
                         UE8M0=scale_fmt == "ue8m0", ALLOW_NONFINITE=bool(allow_nonfinite),
                         num_warps=_WEIGHT_WARPS)
    if not allow_nonfinite and not bool(torch.isfinite(s).all()):
        raise_nonfinite_block(s, (m, n), (bm, bn), name)
    return q, s


def weight_dequant(q: torch.Tensor, scale: torch.Tensor, block_size: tuple[int, int] = BLOCK_SIZE,
                   dtype: torch.dtype = torch.bfloat16, *, name: str | None = None) -> torch.Tensor:
    """``w = q.float() * scale`` per block, cast to ``dtype``, on the GPU.

    Args:
        q: ``[M, N]`` float8_e4m3fn or float8_e5m2.
        scale: ``[ceil(M/bm), ceil(N/bn)]`` fp32 / bf16 / fp16 (read as fp32).
        dtype: bfloat16, float16 or float32.
    Returns:
        ``[M, N]`` tensor of ``dtype``.
    """
    if not isinstance(q, torch.Tensor) or not isinstance(scale, torch.Tensor):
        raise TypeError(f"weight_dequant, {label(name, 'weight')}: expected torch.Tensor inputs")
    limit = weight_dequant_limit(q, block_size, dtype)
    if limit:
        raise ValueError(f"weight_dequant, {label(name, 'weight')}: {limit}")
    if q.dim() != 2:
        raise ValueError(f"{label(name, 'weight')}: expected a 2-D tensor, got shape {tuple(q.shape)}")
    bm, bn = (int(b) for b in block_size)
    m, n = q.shape
    grid = block_grid((m, n), (bm, bn))
    if tuple(scale.shape) != grid:
        raise ValueError(f"{label(name, 'weight')}: scale shape {tuple(scale.shape)} does not match "
                         f"weight shape {(m, n)} with {bm}x{bn} blocks (expected {grid})")
    if scale.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        scale = scale.float()
    y = torch.empty((m, n), dtype=dtype, device=q.device)
    if q.numel():
        with on_device(q):
            _weight_dequant_kernel[grid](q.contiguous(), scale.contiguous(), y, m, n, BLOCK_M=bm, BLOCK_N=bn,
                         num_warps=_WEIGHT_WARPS)
    return y
