"""Block-scaled FP8 GEMM grouped over experts, in Triton: one launch for every expert.

DeepGEMM's "contiguous" grouped layout: the rows of A are the routed tokens sorted by
expert, expert ``e`` owning rows ``offsets[e]:offsets[e+1]`` (empty groups allowed)::

    A  [M, K]     float8_e4m3fn (or e5m2)   sa [M, ceil(K/128)]                  fp32 (1x128)
    B  [E, N, K]  same dtype as A           sb [E, ceil(N/128), ceil(K/128)]     fp32 (128x128)
    C  [M, N]     bfloat16 / float16 / float32
    C[offsets[e]:offsets[e+1]] = (A[rows] * sa[rows]) @ (B[e] * sb[e]).T      for each e

The tile schedule is computed on the device from ``offsets`` without reading them on the
host (``tile_schedule``): expert ``e`` gets ``ceil(rows_e / BLOCK_M)`` M-tiles, the M-tiles
of all experts are numbered one after another, and the launch grid is
``(ceil(M / BLOCK_M) + E, ceil(N / BLOCK_N))``, an upper bound on the number of M-tiles;
programs past the last tile return at once. Each program computes one
``BLOCK_M x BLOCK_N`` tile of one expert with ``triton_gemm.block_scaled_dot`` (the dense
kernel's K loop: fp32 promotion once per 128-element K block); rows past the expert's
last row are read from its first row and not stored.

``BLOCK_M`` follows the mean rows per expert (``block_m_for``): 16 for decode (a token
sends one row to each of its 8 experts), up to 128 for prefill. The rest of the tile
(``BLOCK_N``, stages, warps) is autotuned, keyed on (BLOCK_M, N, K).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..gemm import check_grouped_operands
from . import gemm_limit, interpreter_enabled, on_device
from .triton_gemm import block_scaled_dot

__all__ = ["grouped_fp8_gemm", "tile_schedule", "block_m_for", "GROUPED_CONFIGS"]


@triton.jit
def _grouped_gemm_kernel(a_ptr, b_ptr, c_ptr, a_s_ptr, b_s_ptr, offsets_ptr, tile_group_ptr,
                         tile_row_ptr, N, K, E,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         EVEN_K: tl.constexpr):
    """One program: rows ``tile_row[t] .. + BLOCK_M`` of expert ``tile_group[t]``, N-tile ``pid_n``.

    a: [M, K] fp8, a_s: [M, KB]; b: [E, N, K] fp8, b_s: [E, ceil(N/BLOCK_K), KB]; c: [M, N];
    offsets: [E+1] int64; tile_group / tile_row: [T] int32 (``tile_group[t] == E``: no tile).
    """
    t = tl.program_id(0)
    pid_n = tl.program_id(1)
    g = tl.load(tile_group_ptr + t)
    if g < E:
        row0 = tl.load(tile_row_ptr + t)
        row_end = tl.load(offsets_ptr + g + 1).to(tl.int32)
        offs_cm = row0 + tl.arange(0, BLOCK_M)
        m_ok = offs_cm < row_end
        offs_m = tl.where(m_ok, offs_cm, row0)  # rows past the expert's end re-read its first row
        offs_cn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_n = offs_cn % N
        offs_n = tl.max_contiguous(tl.multiple_of(offs_n, BLOCK_N), BLOCK_N)
        kb_total = tl.cdiv(K, BLOCK_K)
        g64 = g.to(tl.int64)
        b_e = b_ptr + g64 * N * K
        b_s_e = b_s_ptr + g64 * tl.cdiv(N, BLOCK_K) * kb_total
        acc = block_scaled_dot(a_ptr, b_e, a_s_ptr, b_s_e, offs_m, offs_n, K, 0,
                               BLOCK_M, BLOCK_N, BLOCK_K, 1, EVEN_K)
        c_ptrs = c_ptr + offs_cm[:, None].to(tl.int64) * N + offs_cn[None, :]
        c_mask = m_ok[:, None] & (offs_cn[None, :] < N)
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


def _config(bn: int, stages: int, warps: int) -> triton.Config:
    return triton.Config({"BLOCK_N": bn}, num_stages=stages, num_warps=warps)


#: Autotuned over BLOCK_N and the pipeline; BLOCK_M is fixed per call by ``block_m_for``.
GROUPED_CONFIGS = [
    _config(64, 4, 4),
    _config(128, 4, 4),
    _config(128, 3, 8),
    _config(256, 3, 8),
    _config(64, 3, 4),
]

_grouped_tuned = triton.autotune(GROUPED_CONFIGS, key=["BLOCK_M", "N", "K"])(_grouped_gemm_kernel)


def block_m_for(m: int, e: int) -> int:
    """BLOCK_M for ``m`` rows over ``e`` experts: next power of two of ``ceil(m/e)``, in 16..128."""
    return max(16, min(128, triton.next_power_of_2(max(1, -(-m // max(e, 1))))))


def tile_schedule(offsets: torch.Tensor, m: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The M-tiles of every expert, numbered one after another, computed where ``offsets`` live.

    Args:
        offsets: ``[E+1]`` int64, expert ``e`` owns rows ``offsets[e]:offsets[e+1]``.
        m: total rows M (``offsets[E]``, passed so the host need not read it).
        block_m: rows per tile.
    Returns:
        ``(tile_group, tile_row)``, both ``[ceil(m / block_m) + E]`` int32: tile ``t`` covers rows
        ``tile_row[t] .. tile_row[t] + block_m`` (clipped to the expert's end) of expert
        ``tile_group[t]``; unused tiles have ``tile_group == E``. With ``n_e`` the tiles of
        expert ``e`` (``ceil(rows_e / block_m)``) and ``c_e`` their inclusive cumulative sum,
        tile ``t`` belongs to the ``e`` with ``c_{e-1} <= t < c_e`` and starts at row
        ``offsets[e] + (t - c_{e-1}) * block_m``. ``sum n_e <= ceil(m / block_m) + E``.
    """
    e = offsets.numel() - 1
    off = offsets.to(torch.int64)
    counts = off[1:] - off[:-1]
    tiles = (counts + block_m - 1) // block_m
    ends = torch.cumsum(tiles, 0)
    t = torch.arange(-(-m // block_m) + e, device=offsets.device, dtype=torch.int64)
    group = torch.searchsorted(ends, t, right=True)
    safe = group.clamp(max=e - 1)  # tiles past the last one: any valid index, masked below
    row = off[safe] + (t - (ends[safe] - tiles[safe])) * block_m
    return group.to(torch.int32), torch.where(group < e, row, 0).to(torch.int32)


def grouped_fp8_gemm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                     offsets: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16, *,
                     block_size: int = 128, config: dict | None = None) -> torch.Tensor:
    """``C[rows of e] = (A * sa)[rows of e] @ (B[e] * sb[e]).T`` for every expert, one launch.

    Args:
        a: ``[M, K]`` fp8, a_scale: ``[M, ceil(K/bs)]``; b: ``[E, N, K]`` fp8,
            b_scale: ``[E, ceil(N/bs), ceil(K/bs)]`` (scales read as fp32).
        offsets: ``[E+1]`` int64 on a's device: expert ``e`` owns rows ``offsets[e]:offsets[e+1]``.
        out_dtype: bfloat16, float16 or float32.
        block_size: the scale block along K and N (128 in every checkpoint finefp8 reads).
        config: a fixed tile, e.g. ``{"BLOCK_M": 16, "BLOCK_N": 64}`` (plus optional
            ``num_warps`` / ``num_stages``), instead of ``block_m_for`` and autotuning.
    Returns:
        ``[M, N]`` tensor of ``out_dtype``; rows of no expert cannot exist (offsets end at M).
    """
    m, n, k, e = check_grouped_operands(a, a_scale, b, b_scale, offsets, block_size)
    limit = gemm_limit(out_dtype, block_size, None, block_size, a.dtype, b.dtype)
    if limit:
        raise ValueError(f"grouped_fp8_gemm (triton): {limit}")
    c = torch.empty((m, n), dtype=out_dtype, device=a.device)
    if m == 0 or n == 0:
        return c
    a, b = a.contiguous(), b.contiguous()
    sa, sb = a_scale.float().contiguous(), b_scale.float().contiguous()
    offsets = offsets.to(device=a.device, dtype=torch.int64).contiguous()
    meta = dict(BLOCK_K=int(block_size), EVEN_K=k % block_size == 0)
    if config is not None or interpreter_enabled():
        cfg = dict(config) if config is not None else {"BLOCK_M": block_m_for(m, e), "BLOCK_N": 64}
        launch = {key: cfg.pop(key) for key in ("num_warps", "num_stages") if key in cfg}
        kernel, bm = _grouped_gemm_kernel, cfg["BLOCK_M"]
        grid = lambda meta_: (-(-m // bm) + e, triton.cdiv(n, cfg["BLOCK_N"]))
        extra = {**cfg, **launch}
    else:
        kernel, bm = _grouped_tuned, block_m_for(m, e)
        grid = lambda meta_: (-(-m // bm) + e, triton.cdiv(n, meta_["BLOCK_N"]))
        extra = {"BLOCK_M": bm}
    tile_group, tile_row = tile_schedule(offsets, m, bm)
    with on_device(a):
        kernel[grid](a, b, c, sa, sb, offsets, tile_group, tile_row, n, k, e, **meta, **extra)
    return c
