"""The block-scaled FP8 GEMM through ``torch._scaled_mm`` (cuBLASLt, Hopper).

``torch._scaled_mm(a, b, scale_a, scale_b, out_dtype=...)`` infers the scaling recipe
from the scale tensors' shapes and strides. DeepSeek-V3's pair, A with 1x128 groups and
B with 128x128 blocks (cuBLAS ``VEC128_32F`` x ``BLK128x128_32F``), is accepted on
sm_90 with cuBLASLt >= 12.9 when, for ``C[M, N] = A[M, K] @ B[N, K].T``:

* ``a``: ``[M, K]`` row-major; ``b`` is passed as ``B.T``: ``[K, N]`` column-major;
  K and N multiples of 16 (a general ``_scaled_mm`` rule).
* ``scale_a``: ``[M, ceil(K/128)]`` fp32, **M-major**: strides ``(1, M)``.
* ``scale_b``: ``[ceil(K/128), ceil(N/128)]`` fp32 with ``scale_b.T`` row-major, i.e.
  ``b_scale.T`` of our contiguous ``[ceil(N/128), ceil(K/128)]`` grid: strides
  ``(1, ceil(K/128))``. cuBLAS wants that leading dimension 16-byte aligned
  (``ceil(K/128) % 4 == 0``); the newer ``torch.nn.functional.scaled_mm`` pads it,
  ``torch._scaled_mm`` checks the stride equals ``ceil(K/128)`` exactly, so both agree
  only when K is a multiple of 512. Those are the shapes this backend takes.

The scales are dequantization multipliers, as ours are: ``C = (A * sa) @ (B * sb).T``.
Which shapes work is decided by ``scaled_mm_blockwise_supported``: the static rules
above, then once per device a small probe GEMM compared with the reference (an older
torch or cuBLAS that does not know block-wise scaling fails the probe).
"""

from __future__ import annotations

import math
from functools import cache
from typing import NamedTuple

import torch

from ..gemm import check_operands

__all__ = [
    "GemmProblem",
    "SCALED_MM_BLOCK",
    "scaled_mm_scale_layouts",
    "scaled_mm_shape_limit",
    "scaled_mm_blockwise_limit",
    "scaled_mm_blockwise_supported",
    "fp8_gemm_scaled_mm",
]

SCALED_MM_BLOCK = 128
_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class GemmProblem(NamedTuple):
    """What the backend choice needs to know about one ``fp8_gemm`` call."""

    m: int
    n: int
    k: int
    a_dtype: torch.dtype = torch.float8_e4m3fn
    b_dtype: torch.dtype = torch.float8_e4m3fn
    out_dtype: torch.dtype = torch.bfloat16
    block_size: int = 128


def scaled_mm_scale_layouts(a_scale: torch.Tensor, b_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Our scale grids in the layouts ``torch._scaled_mm`` reads as 1x128 x 128x128.

    Args:
        a_scale: ``[M, ceil(K/128)]`` (any strides, any float dtype).
        b_scale: ``[ceil(N/128), ceil(K/128)]``.
    Returns:
        ``(scale_a, scale_b)`` fp32: ``scale_a`` ``[M, Kb]`` with strides ``(1, M)``;
        ``scale_b`` ``[Kb, Nb]`` with strides ``(1, Kb)`` (the transpose of a row-major grid).
    """
    scale_a = a_scale.float().t().contiguous().t()
    scale_b = b_scale.float().contiguous().t()
    return scale_a, scale_b


def scaled_mm_shape_limit(p: GemmProblem) -> str | None:
    """Why ``torch._scaled_mm`` block-wise cannot run problem ``p``, or ``None`` if the shapes fit.

    Only the shape and dtype rules (see the module docstring); the device is checked by
    ``scaled_mm_blockwise_supported``. ``M % 16 == 0`` is asked as well: cuBLAS's
    1x128 scale layout has leading dimension M, and only such shapes are exercised by
    PyTorch's own tests; smaller or odd M go to the Triton kernel.
    """
    if p.block_size != SCALED_MM_BLOCK:
        return f"block size {p.block_size} is not {SCALED_MM_BLOCK}"
    if p.a_dtype != torch.float8_e4m3fn or p.b_dtype != torch.float8_e4m3fn:
        return f"operand dtypes {p.a_dtype}, {p.b_dtype}: this backend takes float8_e4m3fn only"
    if p.out_dtype not in _OUT_DTYPES:
        return f"out_dtype {p.out_dtype} is not bfloat16/float16/float32"
    if p.m < 1 or p.m % 16:
        return f"M={p.m} is not a positive multiple of 16"
    if p.n % 16:
        return f"N={p.n} is not a multiple of 16"
    if p.k % (4 * SCALED_MM_BLOCK):
        return f"K={p.k} is not a multiple of 512 (the 128x128 scale grid needs ceil(K/128) % 4 == 0)"
    return None


def fp8_gemm_scaled_mm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                       out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``C = (A * sa) @ (B * sb).T`` with ``torch._scaled_mm`` block-wise scaling.

    Args:
        a: ``[M, K]`` float8_e4m3fn, a_scale: ``[M, ceil(K/128)]``.
        b: ``[N, K]`` float8_e4m3fn, b_scale: ``[ceil(N/128), ceil(K/128)]``.
        out_dtype: bfloat16, float16 or float32.
    Returns:
        ``[M, N]`` of ``out_dtype``. Shapes must pass ``scaled_mm_shape_limit``.
    """
    check_operands(a, a_scale, b, b_scale, SCALED_MM_BLOCK)
    scale_a, scale_b = scaled_mm_scale_layouts(a_scale, b_scale)
    return torch._scaled_mm(a.contiguous(), b.contiguous().t(), scale_a, scale_b,
                            out_dtype=out_dtype, use_fast_accum=False)


def _cuda_version() -> tuple[int, int]:
    v = torch.version.cuda
    if not v:
        return (0, 0)
    major, minor = (int(x) for x in v.split(".")[:2])
    return major, minor


@cache
def _probe(device_index: int) -> str | None:
    """Run one small block-wise ``_scaled_mm`` on the device; ``None`` if it matches the reference.

    M=64, N=256, K=512 with fresh random codes and scales; cached per device.
    """
    from ..gemm import fp8_gemm as reference_gemm

    device = torch.device("cuda", device_index)
    g = torch.Generator(device="cpu").manual_seed(0)
    m, n, k = 64, 256, 512
    a = (torch.randn(m, k, generator=g) * 64).clamp(-448, 448).to(torch.float8_e4m3fn).to(device)
    b = (torch.randn(n, k, generator=g) * 64).clamp(-448, 448).to(torch.float8_e4m3fn).to(device)
    sa = (torch.rand(m, math.ceil(k / 128), generator=g) + 0.5).to(device)
    sb = (torch.rand(math.ceil(n / 128), math.ceil(k / 128), generator=g) + 0.5).to(device)
    try:
        got = fp8_gemm_scaled_mm(a, sa, b, sb, torch.float32)
    except (RuntimeError, ValueError) as e:  # torch rejects unsupported recipes with these (or subclasses)
        return f"torch._scaled_mm rejected block-wise scaling: {str(e).splitlines()[0]}"
    want = reference_gemm(a, sa, b, sb, torch.float32)
    err = float((got - want).norm() / want.norm())
    if not err < 1e-3:
        return f"torch._scaled_mm block-wise result differs from the reference (relative error {err:.2e})"
    return None


def scaled_mm_blockwise_limit(device: torch.device | str, problem: GemmProblem | None = None) -> str | None:
    """Why ``torch._scaled_mm`` cannot compute DeepSeek-V3's 1x128 x 128x128 GEMM here, or ``None``.

    Needs a CUDA device of compute capability 9.x (PyTorch allows this recipe on Hopper
    only), a torch built with CUDA >= 12.9 (cuBLASLt block scaling), shapes that pass
    ``scaled_mm_shape_limit`` (when ``problem`` is given), and a passing probe GEMM.
    """
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return f"needs a CUDA device, got {device}"
    cc = torch.cuda.get_device_capability(device)
    if cc[0] != 9:
        return f"block-wise scaling in torch._scaled_mm is for sm_90 (Hopper); this GPU is sm_{cc[0]}{cc[1]}"
    if _cuda_version() < (12, 9):
        return f"needs torch built with CUDA >= 12.9 (cuBLASLt block scaling), got {torch.version.cuda}"
    if problem is not None:
        shape_limit = scaled_mm_shape_limit(problem)
        if shape_limit:
            return shape_limit
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _probe(index)


def scaled_mm_blockwise_supported(device: torch.device | str, problem: GemmProblem | None = None) -> bool:
    """True when ``scaled_mm_blockwise_limit`` finds nothing against this device and problem."""
    return scaled_mm_blockwise_limit(device, problem) is None
