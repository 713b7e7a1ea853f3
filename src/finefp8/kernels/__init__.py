"""Kernels for fine-grained FP8, and the checks that decide where each can run.

Modules (each importable on its own; only the ``triton_*`` ones import Triton):

* ``capabilities``: one capability table per backend (ops, dtypes, formats, sizes,
  devices) and the one check that reads it; ``finefp8.ops`` and every kernel's guard use it.
* ``cpu``: the compiled C kernels' Python side (``cpu_kernels.c``), with ``cpu_build`` (the
  compiler and its cache), ``cpu_threads`` (the thread pool) and ``cpu_library`` (their
  registration as ``torch.ops.finefp8.*`` operators with fake implementations and autograd).
* ``triton_quant``: ``act_quant`` (1x128 activation groups), ``weight_quant`` and
  ``weight_dequant`` (128x128 weight blocks), Triton kernels with the reference's math.
* ``triton_gemm``: ``fp8_gemm``, the block-scaled ``C = A @ B.T`` with fp32 promotion
  every 128 elements of K, autotuned for small M (decode) and large M (prefill).
* ``scaled_mm``: the same GEMM through ``torch._scaled_mm``'s block-wise scaling
  (cuBLAS, Hopper only), its scale layouts and its capability check.

This module holds the device probes (is Triton installed, the GPU's compute capability) and
the ``*_limit`` functions the Triton wrappers use as their guards: each returns ``None``
when the Triton kernel can run the call, else a sentence saying why not, read from the
``"triton"`` row of ``capabilities``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from functools import cache

import torch

from .capabilities import KERNEL_OUT_DTYPES, TRITON, OpCall, as_sizes, format_name
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


def act_quant_limit(x: torch.Tensor, group_size: int, fmt="e4m3") -> str | None:
    """Why ``act_quant`` cannot quantize ``x`` with these settings, or ``None`` if it can."""
    return TRITON.ops["quantize_groupwise"].limit(
        OpCall("quantize_groupwise", x.device, x.dtype, fmt=format_name(fmt), sizes=(group_size,)))


def weight_quant_limit(w: torch.Tensor, block_size: tuple[int, int], fmt="e4m3") -> str | None:
    """Why ``weight_quant`` cannot quantize ``w`` with these settings, or ``None`` if it can."""
    if len(as_sizes(block_size)) != 2:
        return f"block_size {block_size!r} is not two sizes"
    return TRITON.ops["quantize_blockwise"].limit(
        OpCall("quantize_blockwise", w.device, w.dtype, fmt=format_name(fmt),
               sizes=as_sizes(block_size)))


def weight_dequant_limit(q: torch.Tensor, block_size: tuple[int, int],
                         dtype: torch.dtype) -> str | None:
    """Why ``weight_dequant`` cannot dequantize ``q`` to ``dtype``, or ``None`` if it can."""
    if len(as_sizes(block_size)) != 2:
        return f"block_size {block_size!r} is not two sizes"
    return TRITON.ops["dequantize_blockwise"].limit(
        OpCall("dequantize_blockwise", q.device, q.dtype, codes=(), out_dtype=dtype,
               sizes=as_sizes(block_size)))


def gemm_limit(out_dtype: torch.dtype, promote_every: int | None, accum_bits: int | None,
               block_size: int, a_dtype: torch.dtype | None = None,
               b_dtype: torch.dtype | None = None) -> str | None:
    """Why the GPU GEMM backends cannot run this ``fp8_gemm`` call, or ``None`` if they can.

    They promote to fp32 once per scale block, so ``promote_every`` must equal
    ``block_size`` (a power of two >= 16, ``tl.dot``'s smallest K); the accumulation
    emulator (``accum_bits``) exists only in the reference; both operands must share
    one FP8 dtype (``tl.dot`` takes no e4m3 x e5m2 mix).
    """
    codes = tuple(d for d in (a_dtype, b_dtype) if d is not None)
    return TRITON.ops["fp8_gemm"].limit(
        OpCall("fp8_gemm", torch.device("cuda"), codes[0] if codes else None, codes=codes,
               out_dtype=out_dtype, sizes=(block_size,), accum_bits=accum_bits,
               promote_every=promote_every))
