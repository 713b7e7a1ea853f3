"""Block-scaled FP8 GEMM, the reference, and an emulator of limited-precision accumulation.

``C = A @ B.T`` with A ``[M, K]`` fp8 and scales ``[M, ceil(K/128)]`` (1x128 groups), and B
``[N, K]`` fp8 and scales ``[ceil(N/128), ceil(K/128)]`` (128x128 blocks), as DeepSeek-V3
and DeepGEMM compute it (docs/numerics.md)::

    acc = 0                                           # fp32
    for each K interval k of `promote_every` elements (inside one scale block):
        acc += (A_k . B_k^T) * (sa[:, k] outer sb[:, k])

The product inside one interval is what the tensor cores compute; the scaled partial
sum is promoted to fp32. With ``accum_bits=None`` the interval's product is an ordinary
fp32 matmul. With ``accum_bits=n`` it is computed by ``limited_dot``, which models the
H800 accumulator the DeepSeek-V3 report describes: every MMA step (``mma_k`` = 32 fp8
elements) aligns the running sum and the new products to the largest exponent among
them and truncates everything past ``n`` bits below it.
"""

from __future__ import annotations

import math

import torch

from .formats import FP8_DTYPES

__all__ = ["fp8_gemm", "grouped_fp8_gemm", "check_grouped_operands", "limited_dot", "MMA_K"]

MMA_K = 32  # fp8 elements of K consumed by one Hopper WGMMA instruction


def _truncate_to_bits(t: torch.Tensor, e: torch.Tensor, bits: int) -> torch.Tensor:
    """Truncate ``t`` toward zero to multiples of ``2**(e - bits)`` (``bits`` bits below ``2**e``)."""
    ulp = torch.ldexp(torch.ones_like(t), e - bits)
    return torch.trunc(t / ulp) * ulp


def limited_dot(a: torch.Tensor, b: torch.Tensor, accum_bits: int, mma_k: int = MMA_K) -> torch.Tensor:
    """``a @ b.T`` through an accumulator register that holds ``accum_bits`` significant bits.

    Args:
        a: ``[M, L]`` float64 (exact fp8 values), b: ``[N, L]`` float64.
        accum_bits: significant bits kept, the leading one included (14 for the H800).
        mma_k: products added in one step (one tensor-core instruction).
    Returns:
        ``[M, N]`` float64. Per step, with ``t`` = the running sum and the ``mma_k`` new
        products and ``2**e > max|t|``, every term is aligned to ``2**e`` and truncated,
        ``s = sum(trunc(t / 2**(e - bits))) * 2**(e - bits)``, and the sum is truncated again
        to ``bits`` bits below its own top (a carry cannot widen the register).
    """
    m, length = a.shape
    n = b.shape[0]
    acc = torch.zeros(m, n, dtype=torch.float64, device=a.device)
    for j in range(0, length, mma_k):
        prods = a[:, None, j : j + mma_k] * b[None, :, j : j + mma_k]
        terms = torch.cat([acc.unsqueeze(-1), prods], dim=-1)
        _, e = torch.frexp(terms.abs().amax(-1))
        total = _truncate_to_bits(terms, e.unsqueeze(-1), accum_bits).sum(-1)
        acc = _truncate_to_bits(total, torch.frexp(total)[1], accum_bits)
    return acc


def check_operands(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                   block: int) -> tuple[int, int, int, int]:
    """Validate the operands of ``fp8_gemm``; returns ``(M, N, K, ceil(K/block))``.

    ``a`` ``[M, K]`` and ``b`` ``[N, K]`` of an FP8 dtype; ``a_scale`` ``[M, ceil(K/block)]``
    and ``b_scale`` ``[ceil(N/block), ceil(K/block)]`` floating point. Raises ``TypeError`` or
    ``ValueError`` naming the operand otherwise. Every GEMM backend calls it first.
    """
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, torch.Tensor) or t.dtype not in FP8_DTYPES:
            got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"fp8_gemm: {name} must be a float8_e4m3fn/float8_e5m2 tensor, got {got}")
        if t.dim() != 2:
            raise ValueError(f"fp8_gemm: {name} must be 2-D, got shape {tuple(t.shape)}")
    (m, k), (n, kb_) = a.shape, b.shape
    if k != kb_:
        raise ValueError(f"fp8_gemm: a is {tuple(a.shape)} and b is {tuple(b.shape)}: K differs")
    kb = math.ceil(k / block)
    for name, s, want in (("a_scale", a_scale, (m, kb)), ("b_scale", b_scale, (math.ceil(n / block), kb))):
        if not isinstance(s, torch.Tensor) or not s.is_floating_point():
            raise TypeError(f"fp8_gemm: {name} must be a floating-point tensor")
        if tuple(s.shape) != want:
            raise ValueError(f"fp8_gemm: {name} has shape {tuple(s.shape)}, expected {want} "
                             f"for a {tuple(a.shape)}, b {tuple(b.shape)}, blocks of {block}")
    return m, n, k, kb


def _intervals(k: int, block: int, promote_every: int | None) -> list[tuple[int, int]]:
    """Promotion intervals ``[k0, k1)`` covering ``0..K``."""
    step = k if promote_every is None else promote_every
    if step < 1:
        raise ValueError(f"promote_every must be a positive integer or None, got {promote_every!r}")
    return [(k0, min(k0 + step, k)) for k0 in range(0, k, step)]


def _interval_scale(sa: torch.Tensor, sb_rows: torch.Tensor, k0: int, k1: int, block: int) -> torch.Tensor:
    """``sa[:, k] outer sb[:, k]`` for the scale block(s) spanned by ``[k0, k1)``.

    An interval that spans several scale blocks needs the same scales in all of them
    (e.g. per-row scales): a promotion cannot apply two different scales to one sum.
    """
    b0, b1 = k0 // block, (k1 - 1) // block
    if b1 > b0:
        same = torch.equal(sa[:, b0:b1 + 1], sa[:, b0:b0 + 1].expand(-1, b1 - b0 + 1)) and \
            torch.equal(sb_rows[:, b0:b1 + 1], sb_rows[:, b0:b0 + 1].expand(-1, b1 - b0 + 1))
        if not same:
            raise ValueError(
                f"fp8_gemm: promotion interval {k0}:{k1} spans scale blocks {b0}..{b1} with different "
                f"scales; use promote_every <= {block} that divides it, or scales constant along K"
            )
    return sa[:, b0, None] * sb_rows[None, :, b0]


def fp8_gemm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    promote_every: int | None = 128,
    accum_bits: int | None = None,
    *,
    block_size: int = 128,
    mma_k: int = MMA_K,
) -> torch.Tensor:
    """Block-scaled FP8 matrix product ``C = (A * sa) @ (B * sb).T`` (reference).

    Args:
        a: ``[M, K]`` float8_e4m3fn (activations), a_scale: ``[M, ceil(K/128)]`` fp32.
        b: ``[N, K]`` float8_e4m3fn (weights), b_scale: ``[ceil(N/128), ceil(K/128)]`` fp32.
        out_dtype: dtype of C.
        promote_every: K elements accumulated on the "tensor core" before the scaled sum is
            added to the fp32 accumulator; ``None`` never promotes (scales must then be
            constant along K).
        accum_bits: ``None`` accumulates each interval in fp32; an integer emulates an
            accumulator keeping that many bits (``limited_dot``), e.g. 14 for the H800.
    Returns:
        ``[M, N]`` tensor of ``out_dtype``.
    """
    m, n, k, _ = check_operands(a, a_scale, b, b_scale, block_size)
    sa = a_scale.float()
    sb_rows = b_scale.float().repeat_interleave(block_size, 0)[:n]  # [N, Kb]
    work = torch.float64 if accum_bits is not None else torch.float32
    af, bf = a.to(work), b.to(work)
    acc = torch.zeros(m, n, dtype=torch.float32, device=a.device)
    for k0, k1 in _intervals(k, block_size, promote_every):
        if accum_bits is None:
            part = af[:, k0:k1] @ bf[:, k0:k1].T
        else:
            part = limited_dot(af[:, k0:k1], bf[:, k0:k1], accum_bits, mma_k).float()
        acc += part * _interval_scale(sa, sb_rows, k0, k1, block_size)
    return acc.to(out_dtype)


def check_grouped_operands(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor,
                           b_scale: torch.Tensor, offsets: torch.Tensor,
                           block: int = 128) -> tuple[int, int, int, int]:
    """Validate the operands of ``grouped_fp8_gemm``; return ``(M, N, K, E)``.

    Expected: a ``[M, K]`` fp8, a_scale ``[M, ceil(K/block)]`` float, b ``[E, N, K]`` fp8 of
    a's dtype, b_scale ``[E, ceil(N/block), ceil(K/block)]`` float, offsets ``[E+1]``
    int32/int64 with ``offsets[0] == 0``, non-decreasing, ``offsets[E] == M``. Reading the
    offsets' values costs one host synchronisation when they live on a GPU.
    """
    for name, t, dims in (("a", a, 2), ("b", b, 3)):
        if not isinstance(t, torch.Tensor) or t.dtype not in FP8_DTYPES:
            got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise TypeError(f"grouped_fp8_gemm: {name} must be a float8_e4m3fn/float8_e5m2 tensor, "
                            f"got {got}")
        if t.dim() != dims:
            raise ValueError(f"grouped_fp8_gemm: {name} must be {dims}-D, "
                             f"got shape {tuple(t.shape)}")
    if a.dtype != b.dtype:
        raise TypeError(f"grouped_fp8_gemm: a is {a.dtype} and b is {b.dtype}; use one FP8 dtype")
    (m, k), (e, n, kb_) = a.shape, b.shape
    if k != kb_:
        raise ValueError(f"grouped_fp8_gemm: a is {tuple(a.shape)} and b is {tuple(b.shape)}: "
                         f"K differs")
    kb = math.ceil(k / block)
    for name, s, want in (("a_scale", a_scale, (m, kb)),
                          ("b_scale", b_scale, (e, math.ceil(n / block), kb))):
        if not isinstance(s, torch.Tensor) or not s.is_floating_point():
            raise TypeError(f"grouped_fp8_gemm: {name} must be a floating-point tensor")
        if tuple(s.shape) != want:
            raise ValueError(f"grouped_fp8_gemm: {name} has shape {tuple(s.shape)}, "
                             f"expected {want} for a {tuple(a.shape)}, b {tuple(b.shape)}, "
                             f"blocks of {block}")
    if not isinstance(offsets, torch.Tensor) or offsets.dtype not in (torch.int32, torch.int64):
        got = offsets.dtype if isinstance(offsets, torch.Tensor) else type(offsets).__name__
        raise TypeError(f"grouped_fp8_gemm: offsets must be an int64 (or int32) tensor, got {got}")
    if tuple(offsets.shape) != (e + 1,):
        raise ValueError(f"grouped_fp8_gemm: offsets has shape {tuple(offsets.shape)}, "
                         f"expected ({e + 1},) for {e} experts "
                         f"(expert i owns rows offsets[i]:offsets[i+1])")
    o = offsets.cpu()
    if int(o[0]) != 0 or int(o[-1]) != m or bool((o[1:] < o[:-1]).any()):
        raise ValueError(f"grouped_fp8_gemm: offsets must start at 0, never decrease and end "
                         f"at M={m}; got {o.tolist() if e <= 16 else [*o[:8].tolist(), '...', int(o[-1])]}")
    return m, n, k, e


def grouped_fp8_gemm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor,
                     b_scale: torch.Tensor, offsets: torch.Tensor,
                     out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Block-scaled FP8 GEMM grouped over experts (reference), as DeepGEMM's contiguous layout.

    Rows of A are sorted by expert: expert ``e`` owns rows ``offsets[e]:offsets[e+1]`` and
    multiplies them by its own weight ``b[e]``::

        C[offsets[e]:offsets[e+1]] = fp8_gemm(A[rows], sa[rows], B[e], sb[e])   # for each e

    with fp32 promotion every 128 elements of K (``fp8_gemm``'s math). Empty groups are
    allowed and cost nothing.

    Args:
        a: ``[M, K]`` float8_e4m3fn (or e5m2), a_scale: ``[M, ceil(K/128)]`` fp32 (1x128 groups).
        b: ``[E, N, K]`` fp8 of a's dtype, b_scale: ``[E, ceil(N/128), ceil(K/128)]`` fp32.
        offsets: ``[E+1]`` int64, ``0 = offsets[0] <= ... <= offsets[E] = M``.
        out_dtype: dtype of C.
    Returns:
        ``[M, N]`` tensor of ``out_dtype``.
    """
    m, n, _, e = check_grouped_operands(a, a_scale, b, b_scale, offsets)
    out = torch.zeros(m, n, dtype=out_dtype, device=a.device)
    bounds = offsets.cpu().tolist()
    for g in range(e):
        r0, r1 = bounds[g], bounds[g + 1]
        if r1 > r0:
            out[r0:r1] = fp8_gemm(a[r0:r1], a_scale[r0:r1], b[g], b_scale[g], out_dtype)
    return out
