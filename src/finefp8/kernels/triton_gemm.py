"""Block-scaled FP8 GEMM in Triton: ``C = (A * sa) @ (B * sb).T`` with fp32 promotion per K block.

Shapes and dtypes (DeepSeek-V3 / DeepGEMM, docs/numerics.md)::

    A  [M, K]  float8_e4m3fn (or e5m2)   sa [M, ceil(K/128)]             fp32 (1x128 groups)
    B  [N, K]  float8_e4m3fn (or e5m2)   sb [ceil(N/128), ceil(K/128)]   fp32 (128x128 blocks)
    C  [M, N]  bfloat16 / float16 / float32

    acc = 0                                                    # fp32 registers
    for each K block k (BLOCK_K = 128 elements):
        acc += dot(A[:, k], B[:, k].T) * (sa[:, k] outer sb[n // 128, k])
    C = acc.to(out_dtype)

The ``dot`` of one K block runs on the tensor cores; its result is scaled and added
to the fp32 accumulator once per block (the promotion). M, N and K need not be
multiples of the tile: rows and columns past the edge are read modulo M / N and not
stored, and a partial last K block is masked to zero.

Tiles are autotuned, keyed on (N, K, next power of two of M), from two lists:
``SMALL_M_CONFIGS`` for decode (M <= 64: narrow tiles, split-K so that a thin
problem still fills the GPU; the partial sums meet in an fp32 buffer with atomic
adds) and ``LARGE_M_CONFIGS`` for prefill (M > 64: 128-256 wide tiles, 3-4 stages).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..gemm import check_operands
from . import gemm_limit, interpreter_enabled, on_device

__all__ = ["fp8_gemm", "block_scaled_dot", "SMALL_M", "SMALL_M_CONFIGS", "LARGE_M_CONFIGS",
           "interpreter_config"]

SMALL_M = 64


@triton.jit
def block_scaled_dot(a_ptr, b_ptr, a_s_ptr, b_s_ptr, offs_m, offs_n, K, pid_k,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr):
    """The scaled K loop: ``acc = sum_kb dot(A[m, kb], B[n, kb].T) * sa[m, kb] * sb[n // BK, kb]``.

    Over every ``SPLIT_K``-th K block ``kb`` from ``pid_k``.

    a_ptr: [*, K] fp8 rows ``offs_m`` (BLOCK_M indices, all valid rows); b_ptr: [*, K] fp8 rows
    ``offs_n`` (BLOCK_N valid indices); a_s_ptr: [*, KB] fp32 (1x128 group scales of A's rows);
    b_s_ptr: [*, KB] fp32 (128x128 block scales of B, row ``n // BLOCK_K``), KB = ceil(K/BLOCK_K).
    Returns the ``[BLOCK_M, BLOCK_N]`` fp32 accumulator, promoted once per K block; a partial
    last K block is masked to zero. Shared by the dense and the grouped GEMM kernels.
    """
    offs_k = tl.arange(0, BLOCK_K)
    kb_total = tl.cdiv(K, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * K + offs_k[None, :]
    b_ptrs = b_ptr + offs_n[None, :].to(tl.int64) * K + offs_k[:, None]
    a_s_ptrs = a_s_ptr + offs_m * kb_total
    b_s_ptrs = b_s_ptr + (offs_n // BLOCK_K) * kb_total

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(pid_k, kb_total, SPLIT_K):
        if EVEN_K:
            a = tl.load(a_ptrs + kb * BLOCK_K)
            b = tl.load(b_ptrs + kb * BLOCK_K)
        else:
            k_left = K - kb * BLOCK_K
            a = tl.load(a_ptrs + kb * BLOCK_K, mask=offs_k[None, :] < k_left, other=0.0)
            b = tl.load(b_ptrs + kb * BLOCK_K, mask=offs_k[:, None] < k_left, other=0.0)
        a_s = tl.load(a_s_ptrs + kb)
        b_s = tl.load(b_s_ptrs + kb)
        acc += tl.dot(a, b) * (a_s[:, None] * b_s[None, :])
    return acc


@triton.jit
def _fp8_gemm_kernel(a_ptr, b_ptr, c_ptr, a_s_ptr, b_s_ptr, M, N, K, M_BUCKET,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr, EVEN_K: tl.constexpr):
    """One program: a ``BLOCK_M x BLOCK_N`` tile of C over every ``SPLIT_K``-th K block.

    a: [M, K] fp8, b: [N, K] fp8, a_s: [M, KB] fp32, b_s: [ceil(N/BLOCK_K), KB] fp32, KB = ceil(K/BLOCK_K);
    c: [M, N] (fp32 when SPLIT_K > 1: the partial sums are added atomically).
    """
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m

    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    offs_m = tl.max_contiguous(tl.multiple_of(offs_m, BLOCK_M), BLOCK_M)
    offs_n = tl.max_contiguous(tl.multiple_of(offs_n, BLOCK_N), BLOCK_N)
    acc = block_scaled_dot(a_ptr, b_ptr, a_s_ptr, b_s_ptr, offs_m, offs_n, K, pid_k,
                           BLOCK_M, BLOCK_N, BLOCK_K, SPLIT_K, EVEN_K)

    offs_cm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_cn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ptrs = c_ptr + offs_cm[:, None].to(tl.int64) * N + offs_cn[None, :]
    c_mask = (offs_cm[:, None] < M) & (offs_cn[None, :] < N)
    if SPLIT_K == 1:
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)
    else:
        tl.atomic_add(c_ptrs, acc, mask=c_mask)


def _config(bm: int, bn: int, split_k: int, stages: int, warps: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "SPLIT_K": split_k, "GROUP_M": 8},
                         num_stages=stages, num_warps=warps)


# Decode (M <= 64): the weights dominate the traffic; split K so that N/BLOCK_N tiles
# times SPLIT_K programs cover the SMs. BLOCK_M is cut to M's bucket by _prune_small.
SMALL_M_CONFIGS = [
    _config(64, 64, 1, 4, 4),
    _config(64, 128, 1, 4, 4),
    _config(64, 64, 4, 4, 4),
    _config(64, 128, 4, 4, 4),
    _config(64, 64, 8, 3, 4),
    _config(64, 32, 8, 3, 4),
    _config(64, 128, 2, 4, 8),
]

# Prefill (M > 64): compute bound; big tiles, deep pipelines.
LARGE_M_CONFIGS = [
    _config(128, 128, 1, 4, 8),
    _config(128, 256, 1, 3, 8),
    _config(256, 128, 1, 3, 8),
    _config(128, 128, 1, 3, 4),
    _config(64, 128, 1, 4, 4),
    _config(128, 64, 1, 4, 4),
]


def _prune_small(configs, named_args, **kwargs):
    """Shrink BLOCK_M to M's power-of-two bucket (at least 16, ``tl.dot``'s minimum); drop repeats."""
    bm = max(16, min(SMALL_M, triton.next_power_of_2(named_args["M"])))
    seen, out = set(), []
    for c in configs:
        kw = dict(c.kwargs, BLOCK_M=bm)
        sig = tuple(sorted(kw.items())) + (c.num_stages, c.num_warps)
        if sig not in seen:
            seen.add(sig)
            out.append(triton.Config(kw, num_stages=c.num_stages, num_warps=c.num_warps))
    return out


_gemm_small_m = triton.autotune(SMALL_M_CONFIGS, key=["M_BUCKET", "N", "K"], reset_to_zero=["c_ptr"],
                                prune_configs_by={"early_config_prune": _prune_small})(_fp8_gemm_kernel)
_gemm_large_m = triton.autotune(LARGE_M_CONFIGS, key=["M_BUCKET", "N", "K"])(_fp8_gemm_kernel)


def interpreter_config(m: int) -> dict:
    """The one tile used under ``TRITON_INTERPRET=1`` (no autotuning there): few, wide programs."""
    return {"BLOCK_M": max(16, min(64, triton.next_power_of_2(m))), "BLOCK_N": 64, "SPLIT_K": 1, "GROUP_M": 8}


def fp8_gemm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
             out_dtype: torch.dtype = torch.bfloat16, *, block_size: int = 128,
             config: dict | None = None) -> torch.Tensor:
    """``C = (A * sa) @ (B * sb).T`` on the GPU, promoting to fp32 every ``block_size`` of K.

    Args:
        a: ``[M, K]`` fp8, a_scale: ``[M, ceil(K/bs)]``; b: ``[N, K]`` fp8,
            b_scale: ``[ceil(N/bs), ceil(K/bs)]`` (scales read as fp32).
        out_dtype: bfloat16, float16 or float32.
        block_size: the scale block along K and N (power of two >= 16).
        config: a fixed tile, e.g. ``{"BLOCK_M": 32, "BLOCK_N": 64, "SPLIT_K": 2, "GROUP_M": 8}``
            (plus optional ``num_warps`` / ``num_stages``) instead of autotuning.
    Returns:
        ``[M, N]`` tensor of ``out_dtype``.
    """
    m, n, k, _ = check_operands(a, a_scale, b, b_scale, block_size)
    limit = gemm_limit(out_dtype, block_size, None, block_size, a.dtype, b.dtype)
    if limit:
        raise ValueError(f"fp8_gemm (triton): {limit}")
    a, b = a.contiguous(), b.contiguous()
    sa, sb = a_scale.float().contiguous(), b_scale.float().contiguous()
    args = (m, n, k, min(triton.next_power_of_2(m), 8192))
    meta = dict(BLOCK_K=int(block_size), EVEN_K=k % block_size == 0)
    small = m <= SMALL_M

    with on_device(a):
        if config is not None or interpreter_enabled():
            cfg = dict(config) if config is not None else interpreter_config(m)
            launch = {key: cfg.pop(key) for key in ("num_warps", "num_stages") if key in cfg}
            c = _output(m, n, out_dtype, a.device, cfg["SPLIT_K"] > 1)
            grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]), cfg["SPLIT_K"])
            _fp8_gemm_kernel[grid](a, b, c, sa, sb, *args, **meta, **cfg, **launch)
        else:
            c = _output(m, n, out_dtype, a.device, small)
            kernel = _gemm_small_m if small else _gemm_large_m
            kernel[lambda cfg: (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),
                                cfg["SPLIT_K"])](a, b, c, sa, sb, *args, **meta)
    return c if c.dtype == out_dtype else c.to(out_dtype)


def _output(m: int, n: int, out_dtype: torch.dtype, device: torch.device, split: bool) -> torch.Tensor:
    """C's buffer: zeroed fp32 when the partial sums of split K are added into it, else ``out_dtype``."""
    if split:
        return torch.zeros((m, n), dtype=torch.float32, device=device)
    return torch.empty((m, n), dtype=out_dtype, device=device)
