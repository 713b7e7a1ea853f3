"""GPU kernels for fine-grained FP8, and the checks that decide where they can run.

Modules (each importable on its own; only the ``triton_*`` ones import Triton):

* ``triton_quant``: ``act_quant`` (1x128 activation groups), ``weight_quant`` and
  ``weight_dequant`` (128x128 weight blocks), Triton kernels with the reference's math.
* ``triton_gemm``: ``fp8_gemm``, the block-scaled ``C = A @ B.T`` with fp32 promotion
  every 128 elements of K, autotuned for small M (decode) and large M (prefill).
* ``scaled_mm``: the same GEMM through ``torch._scaled_mm``'s block-wise scaling
  (cuBLAS, Hopper only), its scale layouts and its capability check.

This module holds only pure-Python checks, so ``finefp8.ops`` can ask them without
importing Triton. Each ``*_limit`` function returns ``None`` when the Triton kernel
can run the call, else a sentence saying why not (``finefp8.ops`` then falls back to
the reference, or raises that sentence when the backend was forced).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from functools import cache

import torch

from .scaled_mm import GemmProblem, scaled_mm_blockwise_limit, scaled_mm_blockwise_supported

__all__ = [
    "GemmProblem",
    "triton_available",
    "interpreter_enabled",
    "cuda_capability",
    "cuda_fp8_supported",
    "triton_runs_on",
    "on_device",
    "scaled_mm_blockwise_limit",
    "scaled_mm_blockwise_supported",
    "act_quant_limit",
    "weight_quant_limit",
    "weight_dequant_limit",
    "gemm_limit",
    "KERNEL_OUT_DTYPES",
]

KERNEL_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_KERNEL_IN_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_FP8_CODE_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


@cache
def triton_available() -> bool:
    """True when the ``triton`` package is installed (it is an optional dependency)."""
    return importlib.util.find_spec("triton") is not None


def interpreter_enabled() -> bool:
    """True when ``TRITON_INTERPRET=1``: Triton kernels then run on the CPU, interpreted.

    Triton fixes the mode when it is imported (its own library functions are decorated
    then), so the variable must be set before the first ``import triton`` and holds for
    the whole process: interpreted and compiled kernels cannot share one process.
    """
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def cuda_capability(device: torch.device | str) -> tuple[int, int] | None:
    """Compute capability ``(major, minor)`` of a CUDA device, ``None`` for other devices."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(device)


def cuda_fp8_supported(device: torch.device | str) -> bool:
    """True for CUDA devices with FP8 tensor cores: compute capability 8.9 (Ada) or newer."""
    cc = cuda_capability(device)
    return cc is not None and cc >= (8, 9)


def triton_runs_on(device: torch.device | str) -> bool:
    """True when the Triton kernels can run on tensors of ``device``.

    CUDA devices with FP8 support (cc >= 8.9) and Triton installed; any device when
    ``TRITON_INTERPRET=1`` (Triton's interpreter copies to the host and runs there).
    """
    if not triton_available():
        return False
    return interpreter_enabled() or cuda_fp8_supported(device)


def on_device(t: torch.Tensor):
    """Context that makes ``t``'s CUDA device current for a kernel launch (no-op on the CPU)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _pow2(v: int) -> bool:
    return int(v) == v and v >= 1 and (int(v) & (int(v) - 1)) == 0


def _e4m3(fmt) -> bool:
    from ..formats import E4M3, get_format

    return get_format(fmt) is E4M3


def act_quant_limit(x: torch.Tensor, group_size: int, fmt="e4m3") -> str | None:
    """Why ``act_quant`` cannot quantize ``x`` with these settings, or ``None`` if it can."""
    if x.dtype not in _KERNEL_IN_DTYPES:
        return f"input dtype {x.dtype} is not float32/bfloat16/float16/float64"
    if not _pow2(group_size):
        return f"group_size {group_size!r} is not a power of two"
    if not _e4m3(fmt):
        return f"the kernels write E4M3 codes only, not {fmt!r}"
    return None


def weight_quant_limit(w: torch.Tensor, block_size: tuple[int, int], fmt="e4m3") -> str | None:
    """Why ``weight_quant`` cannot quantize ``w`` with these settings, or ``None`` if it can."""
    if w.dtype not in _KERNEL_IN_DTYPES:
        return f"input dtype {w.dtype} is not float32/bfloat16/float16/float64"
    if len(block_size) != 2 or not all(_pow2(b) for b in block_size):
        return f"block_size {block_size!r} is not two powers of two"
    if not _e4m3(fmt):
        return f"the kernels write E4M3 codes only, not {fmt!r}"
    return None


def weight_dequant_limit(q: torch.Tensor, block_size: tuple[int, int],
                         dtype: torch.dtype) -> str | None:
    """Why ``weight_dequant`` cannot dequantize ``q`` to ``dtype``, or ``None`` if it can."""
    if q.dtype not in _FP8_CODE_DTYPES:
        return f"input dtype {q.dtype} is not float8_e4m3fn/float8_e5m2"
    if len(block_size) != 2 or not all(_pow2(b) for b in block_size):
        return f"block_size {block_size!r} is not two powers of two"
    if dtype not in KERNEL_OUT_DTYPES:
        return f"output dtype {dtype} is not bfloat16/float16/float32"
    return None


def gemm_limit(out_dtype: torch.dtype, promote_every: int | None, accum_bits: int | None,
               block_size: int, a_dtype: torch.dtype | None = None,
               b_dtype: torch.dtype | None = None) -> str | None:
    """Why the GPU GEMM backends cannot run this ``fp8_gemm`` call, or ``None`` if they can.

    They promote to fp32 once per scale block, so ``promote_every`` must equal
    ``block_size`` (a power of two >= 16, ``tl.dot``'s smallest K); the accumulation
    emulator (``accum_bits``) exists only in the reference; both operands must share
    one FP8 dtype (``tl.dot`` takes no e4m3 x e5m2 mix).
    """
    if a_dtype is not None and b_dtype is not None and a_dtype != b_dtype:
        return f"operands of different FP8 dtypes ({a_dtype}, {b_dtype})"
    if accum_bits is not None:
        return "accum_bits (the accumulator emulator) runs only on the reference backend"
    if not _pow2(block_size) or block_size < 16:
        return f"block_size {block_size!r} is not a power of two >= 16"
    if promote_every != block_size:
        return f"promote_every={promote_every!r} differs from block_size={block_size}"
    if out_dtype not in KERNEL_OUT_DTYPES:
        return f"out_dtype {out_dtype} is not bfloat16/float16/float32"
    return None
