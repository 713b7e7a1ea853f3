"""The public ops: one function per op, each picking a backend for its inputs' device.

Backends, in the order ``backend="auto"`` tries them:

* CUDA tensors: the GPU kernels of ``finefp8.kernels`` (see ``select_backend``).
* CPU tensors: the pure-torch reference of ``finefp8.quantization`` / ``finefp8.gemm``.

Every op takes ``backend=`` to force one; an unavailable forced backend is an error.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import gemm as _gemm
from . import quantization as _q
from .quantization import BLOCK_SIZE, GROUP_SIZE

__all__ = [
    "BACKENDS",
    "select_backend",
    "quantize_blockwise",
    "dequantize_blockwise",
    "quantize_groupwise",
    "dequantize_groupwise",
    "fp8_gemm",
    "weight_only_linear",
]

BACKENDS = ("auto", "reference")


def select_backend(op: str, device: torch.device, backend: str = "auto") -> str:
    """Name of the backend that runs ``op`` for tensors on ``device``.

    ``backend`` other than ``"auto"`` is returned as is once checked to be known.
    """
    if backend not in BACKENDS:
        raise ValueError(f"{op}: unknown backend {backend!r}; expected one of {BACKENDS}")
    if backend != "auto":
        return backend
    return "reference"


def quantize_blockwise(w: torch.Tensor, block_size: tuple[int, int] = BLOCK_SIZE,
                       scale_fmt: str = "fp32", *, backend: str = "auto", **kwargs):
    """``finefp8.quantization.quantize_blockwise`` on the selected backend."""
    select_backend("quantize_blockwise", w.device, backend)
    return _q.quantize_blockwise(w, block_size, scale_fmt, **kwargs)


def dequantize_blockwise(q: torch.Tensor, scale_inv: torch.Tensor,
                         block_size: tuple[int, int] = BLOCK_SIZE,
                         dtype: torch.dtype = torch.bfloat16, *, backend: str = "auto", **kwargs):
    """``finefp8.quantization.dequantize_blockwise`` on the selected backend."""
    select_backend("dequantize_blockwise", q.device, backend)
    return _q.dequantize_blockwise(q, scale_inv, block_size, dtype, **kwargs)


def quantize_groupwise(x: torch.Tensor, group_size: int = GROUP_SIZE, scale_fmt: str = "fp32",
                       *, backend: str = "auto", **kwargs):
    """``finefp8.quantization.quantize_groupwise`` on the selected backend."""
    select_backend("quantize_groupwise", x.device, backend)
    return _q.quantize_groupwise(x, group_size, scale_fmt, **kwargs)


def dequantize_groupwise(q: torch.Tensor, scale: torch.Tensor, group_size: int = GROUP_SIZE,
                         dtype: torch.dtype = torch.bfloat16, *, backend: str = "auto", **kwargs):
    """``finefp8.quantization.dequantize_groupwise`` on the selected backend."""
    select_backend("dequantize_groupwise", q.device, backend)
    return _q.dequantize_groupwise(q, scale, group_size, dtype, **kwargs)


def fp8_gemm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
             out_dtype: torch.dtype = torch.bfloat16, promote_every: int | None = 128,
             accum_bits: int | None = None, *, backend: str = "auto", **kwargs):
    """``finefp8.gemm.fp8_gemm`` on the selected backend (the emulator always runs the reference)."""
    select_backend("fp8_gemm", a.device, backend)
    return _gemm.fp8_gemm(a, a_scale, b, b_scale, out_dtype, promote_every, accum_bits, **kwargs)


def weight_only_linear(x: torch.Tensor, q: torch.Tensor, scale_inv: torch.Tensor,
                       bias: torch.Tensor | None = None, *,
                       block_size: tuple[int, int] = BLOCK_SIZE, backend: str = "auto") -> torch.Tensor:
    """``y = x @ (q * scale_inv).T + bias``: a linear layer with a block-quantized weight.

    Shapes: ``x`` ``[..., K]``, ``q`` ``[N, K]`` fp8, ``scale_inv`` ``[ceil(N/bm), ceil(K/bn)]``,
    ``bias`` ``[N]``; returns ``[..., N]`` in ``x.dtype``. The weight is dequantized to
    ``x.dtype`` and multiplied with an ordinary GEMM.
    """
    select_backend("weight_only_linear", x.device, backend)
    w = _q.dequantize_blockwise(q, scale_inv, block_size, dtype=x.dtype)
    return F.linear(x, w, bias)
