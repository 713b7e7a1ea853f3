"""Better codes and scales for a block-quantized weight, in the same on-disk format.

DeepSeek-V3's weight quantization (``finefp8.quantize_blockwise``) picks each 128x128
block's scale as ``s = amax / 448`` and rounds every element to the nearest code. Both
choices are good but not optimal; this module offers two refinements whose output is
still ``(q, scale_inv)``: fp8 codes ``[M, N]`` and an fp32 grid
``[ceil(M/128), ceil(N/128)]`` that any DeepSeek-V3-format reader dequantizes as
``w ~= q * scale_inv`` per block.

1. ``quantize_blockwise_mse``: per-block scale search. For each block and each candidate
   factor ``c`` of a grid (default 0.60, 0.62, ..., 1.00)::

       s_c  = c * amax / 448
       err_c = sum((w - cast_fp8(w / s_c) * s_c) ** 2)          # over the block

   and keeps the ``s_c`` with the smallest ``err_c`` (a candidate must beat the plain scale
   by a relative 1e-5, more than the fp32 sums' rounding). ``c = 1`` (the plain scale) is
   always a candidate, so no block's error grows. Values above ``448 * s_c`` saturate.

2. ``gptq_quantize``: error-compensating rounding (GPTQ, Frantar et al. 2022) with fixed
   block scales. With ``H = 2 X^T X`` the Hessian of the layer's squared output error
   ``||X W^T - X Q^T||^2`` over calibration inputs ``X [T, N]``, the columns are rounded
   one at a time, left to right; the rounding error of column ``j`` is spread onto the
   columns not yet rounded through the upper Cholesky factor ``U`` of ``H^-1``::

       q_j  = cast_fp8(w_j / s_j) * s_j                       # s_j: the block scales of column j
       e_j  = (w_j - q_j) / U[j, j]
       w_k -= e_j * U[j, k]          for k > j

   done in column blocks of 128 (the weight block width) with the lazy batch update.
   ``H`` is damped by ``percdamp * mean(diag(H))`` on its diagonal; dead inputs
   (``H[j, j] = 0``) get ``H[j, j] = 1`` and zero weight in the error sums.

3. ``float_target_weight``: the weight GPTQ should round when the layer's inputs are not the
   float model's. With ``X_f [T, N]`` the inputs the float model gives the layer and ``X_q``
   those the quantized model gives it (the earlier layers' FP8 errors, and with W8A8 the
   layer's own 1x128 activation rounding), the output error to minimise is
   ``||X_f W^T - X_q Q^T||^2``. Its least-squares solution splits it (GPTAQ, Li et al. 2025)::

       W* = W + W D^T X_q (X_q^T X_q + damp I)^-1,      D = X_f - X_q

   ``||X_f W^T - X_q Q^T||^2 = ||X_f W^T - X_q W*^T||^2 + ||X_q (W* - Q)^T||^2`` (undamped), so
   GPTQ of ``W*`` with the Hessian of ``X_q`` minimises the whole. When ``X_f = X_q``,
   ``W* = W`` exactly (the damping pulls the correction, not the weight, towards zero).

4. ``attention_hessian_sums`` / ``gptq_quantize_rows``: GPTQ's objective is a sum over the
   weight's rows, so rows may have Hessians of their own. For ``k_proj`` and ``v_proj`` the
   error that matters is the attention output's, not the keys' and values' own: one Hessian
   per key/value head, each token weighted by the attention it receives (exactly, for
   values; to first order, for keys). See ``attention_hessian_sums`` for the formulas.

Everything is fp32 (GPTQ's Cholesky runs in float64 for stability) and runs on the
device of ``w``.
"""

from __future__ import annotations

import torch

from .formats import E4M3, FP8Format, get_format, to_fp8
from .quantization import (
    AMAX_FLOOR,
    BLOCK_SIZE,
    block_amax,
    block_grid,
    expand_block_scales,
    quantize_with_block_scales,
    scale_from_amax,
)

__all__ = [
    "DEFAULT_SCALE_GRID",
    "block_squared_error",
    "quantize_blockwise_mse",
    "hessian_from_inputs",
    "gptq_factor",
    "gptq_quantize",
    "float_target_correction",
    "float_target_weight",
]

DEFAULT_SCALE_GRID: tuple[float, ...] = tuple(round(0.60 + 0.02 * i, 2) for i in range(21))


def _check_weight(w: torch.Tensor, what: str) -> None:
    if not isinstance(w, torch.Tensor) or not w.is_floating_point() or w.dim() != 2:
        raise ValueError(f"{what}: expected a 2-D floating-point weight [out, in], got "
                         f"{getattr(w, 'shape', type(w).__name__)}")
    if w.numel() == 0:
        raise ValueError(f"{what}: empty weight of shape {tuple(w.shape)}")
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"{what}: the weight has NaN or Inf; fix the source weights first")


def block_squared_error(w: torch.Tensor, q: torch.Tensor, scale_inv: torch.Tensor,
                        block_size: tuple[int, int] = BLOCK_SIZE) -> torch.Tensor:
    """``sum((w - q * s) ** 2)`` over each block: ``[M, N]`` -> ``[ceil(M/bm), ceil(N/bn)]`` fp32.

    ``q`` is the fp8 codes and ``scale_inv`` their block grid; the sums are fp64-accurate
    enough for comparisons (accumulated in float64, returned as float32).
    """
    bm, bn = block_size
    gm, gn = block_grid(tuple(w.shape), block_size)
    deq = q.float() * expand_block_scales(scale_inv.float(), tuple(w.shape), block_size)
    d = (w.double() - deq.double()) ** 2
    pm, pn = gm * bm - w.shape[0], gn * bn - w.shape[1]
    d = torch.nn.functional.pad(d, (0, pn, 0, pm))
    return d.view(gm, bm, gn, bn).sum(dim=(1, 3)).float()


def quantize_blockwise_mse(
    w: torch.Tensor,
    block_size: tuple[int, int] = BLOCK_SIZE,
    scale_grid: tuple[float, ...] = DEFAULT_SCALE_GRID,
    *,
    fmt: FP8Format | str = E4M3,
    amax_floor: float = AMAX_FLOOR,
    name: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise FP8 quantization with each block's scale chosen to minimise its squared error.

    Args:
        w: ``[M, N]`` float weight (any M, N; edge blocks are partial).
        block_size: ``(bm, bn)``, 128x128 by default.
        scale_grid: factors ``c`` tried as ``s = c * amax / fmt.max``; 1.0 is always added.
        fmt: code format (E4M3).
        amax_floor: lower bound on a block's amax (all-zero blocks stay finite).
        name: the tensor's name for error messages.

    Returns:
        ``(q, scale_inv)`` exactly as ``finefp8.quantize_blockwise`` returns them: ``q``
        ``[M, N]`` fp8 and ``scale_inv`` ``[ceil(M/bm), ceil(N/bn)]`` fp32, with every
        block's squared error ``<=`` that of the plain ``amax / 448`` scale (ties keep it).
        The candidates are evaluated on the zero-padded ``[gm, bm, gn, bn]`` view of ``w``
        (padding quantizes to zero and adds no error).
    """
    what = f"tensor {name!r}" if name else "weight"
    _check_weight(w, what)
    fmt = get_format(fmt)
    factors = [1.0] + sorted({float(c) for c in scale_grid} - {1.0})
    if any(not (c > 0) for c in factors):
        raise ValueError(f"{what}: scale_grid factors must be positive, got {scale_grid!r}")
    bm, bn = block_size
    gm, gn = block_grid(tuple(w.shape), block_size)
    wf = w.float()
    p = torch.nn.functional.pad(wf, (0, gn * bn - w.shape[1], 0, gm * bm - w.shape[0]))
    blocks = p.view(gm, bm, gn, bn)
    base = scale_from_amax(block_amax(wf, block_size), fmt, "fp32", amax_floor)
    best_s, best_err = base, None
    for c in factors:
        s = base * c if c != 1.0 else base
        s4 = s.view(gm, 1, gn, 1)
        deq = to_fp8(blocks / s4, fmt).float() * s4
        err = ((blocks - deq) ** 2).sum(dim=(1, 3))
        if best_err is None:
            best_err = err
            continue
        better = err < best_err * (1.0 - 1e-5)
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
    return quantize_with_block_scales(w, best_s, block_size, fmt), best_s


def hessian_from_inputs(x: torch.Tensor) -> torch.Tensor:
    """``H = 2 X^T X / T`` of a layer's inputs ``x [..., N]`` (flattened to ``[T, N]``): ``[N, N]`` fp32.

    Sums of several calls are combined by the caller as a token-weighted mean.
    """
    x2 = x.reshape(-1, x.shape[-1]).double()
    return (2.0 * x2.T @ x2 / max(x2.shape[0], 1)).float()


def gptq_factor(hessian: torch.Tensor, percdamp: float = 0.01,
                act_order: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What GPTQ needs from a Hessian: the Cholesky factor, the dead inputs, the column order.

    Args:
        hessian: ``[N, N]`` ``2 X^T X`` (``hessian_from_inputs``).
        percdamp: ``damp = percdamp * mean(diag(H))`` (after dead inputs get ``H[j, j] = 1``).
        act_order: process columns by decreasing ``H[j, j]`` (GPTQ's "act-order") instead of
            left to right.

    Returns:
        ``(U, dead, perm)``: ``U`` ``[N, N]`` float32, the upper Cholesky factor of
        ``(H + damp I)^-1`` with rows and columns in processing order; ``dead`` ``[N]`` bool
        (inputs that were always zero); ``perm`` ``[N]`` int64, the processing order.
        Computed in float64. Layers fed the same input (q/k/v, gate/up) can share it.
    """
    if hessian.dim() != 2 or hessian.shape[0] != hessian.shape[1]:
        raise ValueError(f"the Hessian must be square [N, N], got {tuple(hessian.shape)}")
    if not bool(torch.isfinite(hessian).all()):
        raise ValueError("the Hessian has NaN or Inf")
    n = hessian.shape[0]
    h = hessian.double().clone()
    dead = torch.diag(h) == 0
    idx = torch.nonzero(dead).flatten()
    h[idx, idx] = 1.0
    if act_order:
        perm = torch.argsort(torch.diag(h), descending=True, stable=True)
        h = h[perm][:, perm]
    else:
        perm = torch.arange(n)
    h += percdamp * torch.mean(torch.diag(h)) * torch.eye(n, dtype=h.dtype, device=h.device)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    return u.float(), dead, perm


def gptq_quantize(
    w: torch.Tensor,
    hessian: torch.Tensor | None,
    scale_inv: torch.Tensor | None = None,
    block_size: tuple[int, int] = BLOCK_SIZE,
    *,
    percdamp: float = 0.01,
    act_order: bool = False,
    factor: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    fmt: FP8Format | str = E4M3,
    amax_floor: float = AMAX_FLOOR,
    name: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ rounding of ``w`` to FP8 codes with fixed block scales (see the module docstring).

    Args:
        w: ``[M, N]`` float weight (``[out, in]``).
        hessian: ``[N, N]`` ``2 X^T X`` of the layer's inputs (``hessian_from_inputs``); may be
            ``None`` when ``factor`` is given.
        scale_inv: the ``[ceil(M/bm), ceil(N/bn)]`` block scales to keep; ``None`` uses
            DeepSeek-V3's ``amax / 448`` of ``w``.
        block_size: ``(bm, bn)``; columns are processed ``bn`` at a time (lazy batch updates).
        percdamp: diagonal damping, as a fraction of the mean diagonal of ``H``.
        act_order: columns in decreasing ``H[j, j]`` order (ignored when ``factor`` is given:
            the factor carries its order).
        factor: ``gptq_factor(hessian, percdamp, act_order)`` computed once for layers sharing
            an input.

    Returns:
        ``(q, scale_inv)`` in the same format as ``finefp8.quantize_blockwise``. The codes
        minimise (greedily) ``||X W^T - X (q*s)^T||^2`` rather than ``||W - q*s||^2``. A block
        of ``w`` that is all zero keeps all-zero codes (its rounding error is the update the
        other columns put there, and is passed on like any other).
        The column updates run in float32, as in the GPTQ reference code.
    """
    what = f"tensor {name!r}" if name else "weight"
    if factor is None:
        n = w.shape[-1]
        if hessian is None or tuple(hessian.shape) != (n, n):
            got = None if hessian is None else tuple(hessian.shape)
            raise ValueError(f"{what}: Hessian shape {got} does not match the weight's {n} "
                             f"input columns (expected {(n, n)})")
        try:
            factor = gptq_factor(hessian, percdamp, act_order)
        except ValueError as e:
            raise ValueError(f"{what}: {e}") from e
    return gptq_quantize_rows(w, [(0, w.shape[0], factor)], scale_inv, block_size, fmt=fmt,
                              amax_floor=amax_floor, name=name)


def gptq_quantize_rows(
    w: torch.Tensor,
    row_factors: list[tuple[int, int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]],
    scale_inv: torch.Tensor | None = None,
    block_size: tuple[int, int] = BLOCK_SIZE,
    *,
    fmt: FP8Format | str = E4M3,
    amax_floor: float = AMAX_FLOOR,
    name: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ rounding where groups of rows have Hessians of their own (``gptq_quantize`` is the
    case of one group). GPTQ's objective is a sum over rows, so rows ``r0:r1`` can minimise
    ``||X_g (w_r - q_r s_r)||^2`` with their own inputs' Hessian, for example the rows of one
    attention head (``attention_hessian_sums``). The block scales are still one per 128x128
    block, whatever rows share it.

    Args:
        w: ``[M, N]`` float weight.
        row_factors: ``(r0, r1, gptq_factor(H_g, ...))`` covering the rows ``0..M`` in order,
            each row once.
        scale_inv, block_size, fmt, amax_floor: as ``gptq_quantize``.

    Returns:
        ``(q, scale_inv)`` as ``gptq_quantize``.
    """
    what = f"tensor {name!r}" if name else "weight"
    _check_weight(w, what)
    fmt = get_format(fmt)
    m, n = w.shape
    covered = [(r0, r1) for r0, r1, _ in row_factors]
    if not covered or covered[0][0] != 0 or covered[-1][1] != m or any(
            a[1] != b[0] for a, b in zip(covered[:-1], covered[1:], strict=True)) or any(
            r1 <= r0 for r0, r1 in covered):
        raise ValueError(f"{what}: row groups {covered} do not cover rows 0..{m} in order")
    for _r0, _r1, (hinv, _dead, _perm) in row_factors:
        if tuple(hinv.shape) != (n, n):
            raise ValueError(f"{what}: Hessian factor shape {tuple(hinv.shape)} does not match "
                             f"the weight's {n} input columns")
    amax = block_amax(w, block_size)
    if scale_inv is None:
        scale_inv = scale_from_amax(amax, fmt, "fp32", amax_floor)
    if tuple(scale_inv.shape) != block_grid((m, n), block_size):
        raise ValueError(f"{what}: scale grid {tuple(scale_inv.shape)} does not match weight "
                         f"{(m, n)} with blocks {block_size}")
    scale_inv = scale_inv.float()
    scales = expand_block_scales(scale_inv, (m, n), block_size)
    # a block that is all zero in ``w`` keeps zero codes: its floor scale cannot represent the
    # error the other columns push into it (its codes would saturate at +-448)
    zero = expand_block_scales((amax == 0).float(), (m, n), block_size).bool()
    codes = torch.empty(m, n, dtype=torch.float32, device=w.device)
    for r0, r1, factor in row_factors:
        codes[r0:r1] = _gptq_codes(w[r0:r1].float(), scales[r0:r1], zero[r0:r1], factor,
                                   block_size[1], fmt)
    return codes.to(fmt.torch_dtype), scale_inv


def _gptq_codes(w: torch.Tensor, scales: torch.Tensor, zero: torch.Tensor,
                factor: tuple[torch.Tensor, torch.Tensor, torch.Tensor], bn: int,
                fmt: FP8Format) -> torch.Tensor:
    """GPTQ's column loop: codes ``[R, N]`` (float32 values) of ``w [R, N]`` with per-element
    scales ``scales`` and forced-zero elements ``zero``, columns in ``factor``'s order,
    ``bn`` columns per lazy batch."""
    hinv, dead, perm = factor
    m, n = w.shape
    scales, zero = scales[:, perm], zero[:, perm]
    work = w.clone()
    work[:, dead] = 0.0
    work = work[:, perm]
    codes = torch.empty(m, n, dtype=torch.float32, device=w.device)
    for c0 in range(0, n, bn):
        c1 = min(c0 + bn, n)
        w1 = work[:, c0:c1].clone()
        s1 = scales[:, c0:c1]
        err1 = torch.empty_like(w1)
        hinv1 = hinv[c0:c1, c0:c1]
        for i in range(c1 - c0):
            code = to_fp8(w1[:, i] / s1[:, i], fmt).float().masked_fill_(zero[:, c0 + i], 0.0)
            codes[:, c0 + i] = code
            e = (w1[:, i] - code * s1[:, i]) / hinv1[i, i]
            w1[:, i:].sub_(torch.outer(e, hinv1[i, i:]))
            err1[:, i] = e
        work[:, c1:] -= err1 @ hinv[c0:c1, c1:]
    out = torch.empty_like(codes)
    out[:, perm] = codes
    return out


def attention_hessian_sums(x: torch.Tensor, probs: torch.Tensor, q: torch.Tensor,
                           v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per key/value head, the sums whose GPTQ Hessians weigh the tokens of one window by what
    an error in their key or value does to the attention output.

    Shapes: ``x [T, N]`` the input of ``k_proj`` / ``v_proj``; ``probs [H, T, T]`` the
    attention probabilities (query ``t``, key ``s``); ``q [T, H, D]`` the queries (before or
    after the rotary embedding: only each head's norm ``|q_t|`` is used); ``v [T, G, D]`` the
    values, ``H = G * r`` (query head ``h`` reads key/value head ``h // r``).

    Values (exact): the head's output is ``o_t = sum_s A_ts v_s``, linear in ``v``, so an error
    ``dW`` of ``v_proj``'s rows of head ``g`` changes it by ``dW xbar_t``, with
    ``xbar_t = sum_s A_ts x_s``::

        Sv[g] = sum_{h reads g} sum_t xbar_t xbar_t^T

    Keys (first order, errors of different keys and of different channels taken as
    independent): a key error changes the score ``q_t . dk_s`` and the output by
    ``A_ts (v_s - o_t)`` times that, so token ``s`` weighs
    ``u_s = sum_{h reads g} sum_t A_ts^2 |v_s - o_t|^2 |q_t|^2`` (rotations keep ``|q_t|``)::

        Sk[g] = sum_s u_s x_s x_s^T

    Returns ``(Sk, Sv)``, each ``[G, N, N]`` float64; ``2 * S / T`` summed over windows is
    the Hessian for ``gptq_factor``.
    """
    t, n = x.shape
    heads, groups = probs.shape[0], v.shape[1]
    if probs.shape != (heads, t, t) or q.shape[:2] != (t, heads) or v.shape[0] != t or \
            heads % groups:
        raise ValueError(f"attention shapes do not agree: x {tuple(x.shape)}, probs "
                         f"{tuple(probs.shape)}, q {tuple(q.shape)}, v {tuple(v.shape)}")
    x = x.float()
    sk = torch.zeros(groups, n, n, dtype=torch.float64, device=x.device)
    sv = torch.zeros(groups, n, n, dtype=torch.float64, device=x.device)
    qn = q.float().pow(2).sum(-1)  # [T, H]
    per = heads // groups
    for g in range(groups):
        vg = v[:, g].float()
        vn = vg.pow(2).sum(-1)
        u = torch.zeros(t, dtype=torch.float32, device=x.device)
        for h in range(g * per, (g + 1) * per):
            a = probs[h].float()
            xbar = a @ x
            sv[g] += (xbar.T @ xbar).double()
            o = a @ vg
            dist = (vn[None, :] - 2.0 * (o @ vg.T) + o.pow(2).sum(-1)[:, None]).clamp_min(0.0)
            u += (a.pow(2) * dist).T @ qn[:, h]
        sk[g] += ((x * u[:, None]).T @ x).double()
    return sk, sv


def float_target_correction(hessian: torch.Tensor, cross: torch.Tensor,
                            percdamp: float = 0.01, *, name: str | None = None) -> torch.Tensor:
    """``M = C (H + damp I)^-1`` ``[N, N]`` float64, so that ``W* = W + W M``
    (``float_target_weight``); computed once for the layers fed one input (q/k/v, gate/up).

    Args:
        hessian: ``[N, N]`` ``X_q^T X_q / T`` of the inputs the quantized model gives the layer
            (any common positive factor, shared with ``cross``).
        cross: ``[N, N]`` ``(X_f - X_q)^T X_q / T`` with the same factor, ``X_f`` the float
            model's inputs for the same tokens.
        percdamp: ``damp = percdamp * mean(diag(H))`` (1 when the diagonal is all zero).
        name: the tensor's name for error messages.
    """
    what = f"tensor {name!r}" if name else "weight"
    n = hessian.shape[0] if hessian.dim() == 2 else -1
    if tuple(hessian.shape) != (n, n) or tuple(cross.shape) != (n, n):
        raise ValueError(f"{what}: Hessian {tuple(hessian.shape)} and cross term "
                         f"{tuple(cross.shape)} must both be square and of one size")
    if not (bool(torch.isfinite(hessian).all()) and bool(torch.isfinite(cross).all())):
        raise ValueError(f"{what}: the Hessian or the cross term has NaN or Inf")
    h = hessian.double()
    mean = float(torch.diag(h).mean())
    damp = percdamp * mean if mean > 0 else 1.0
    h = h + damp * torch.eye(n, dtype=h.dtype, device=h.device)
    # C (H + damp)^-1 = ((H + damp)^-1 C^T)^T, H symmetric
    return torch.cholesky_solve(cross.double().T, torch.linalg.cholesky(h)).T


def float_target_weight(w: torch.Tensor, hessian: torch.Tensor | None, cross: torch.Tensor | None,
                        percdamp: float = 0.01, *, correction: torch.Tensor | None = None,
                        name: str | None = None) -> torch.Tensor:
    """``W* = W + W C (H + damp I)^-1``: the weight whose GPTQ rounding on the quantized
    model's inputs best reproduces the float model's outputs (module docstring, item 3).

    Args:
        w: ``[M, N]`` float weight.
        hessian, cross, percdamp: as ``float_target_correction`` takes them; may be ``None``
            when ``correction`` is given.
        correction: ``float_target_correction(hessian, cross, percdamp)`` computed once for
            layers sharing an input.

    Returns:
        ``W*`` ``[M, N]`` float32, computed in float64 (Cholesky solve of the damped ``H``).
    """
    what = f"tensor {name!r}" if name else "weight"
    _check_weight(w, what)
    n = w.shape[1]
    if correction is None:
        if hessian is None or cross is None or tuple(hessian.shape) != (n, n) \
                or tuple(cross.shape) != (n, n):
            got = [None if t is None else tuple(t.shape) for t in (hessian, cross)]
            raise ValueError(f"{what}: Hessian {got[0]} and cross term {got[1]} must both be "
                             f"{(n, n)}")
        correction = float_target_correction(hessian, cross, percdamp, name=name)
    if tuple(correction.shape) != (n, n):
        raise ValueError(f"{what}: correction {tuple(correction.shape)} must be {(n, n)}")
    wd = w.double()
    return (wd + wd @ correction.double()).float()
