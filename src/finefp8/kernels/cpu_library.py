"""The CPU kernels as PyTorch operators: ``torch.ops.finefp8.*`` with fake implementations and autograd.

Each function of ``finefp8.kernels.cpu`` is registered with ``torch.library.custom_op`` in the
``finefp8`` namespace, so that:

* ``torch.compile`` traces a model that calls them (the op stays one opaque node; its fake
  implementation below gives the output shapes and dtypes without running the C code);
* autograd sees them. Gradients, where one is meaningful:

  - ``weight_only_linear``: ``dL/dx = dL/dy @ W`` and ``dL/dbias = sum(dL/dy)`` with
    ``W = q * scale`` (the dequantized weight), and ``dL/dscale`` per block as
    ``sum over the block of (dL/dy^T x) * q``; the FP8 codes get none;
  - ``dequantize_blockwise`` / ``dequantize_groupwise``: ``dL/dscale`` = the sum over each
    block or group of ``dL/dout * q``; the codes get none;
  - ``quantize_*`` and ``fp8_gemm``: FP8 codes are not differentiable, so a backward pass
    through them raises an error that says so (for quantization-aware training, the
    straight-through estimator of a quantize-dequantize is what to use:
    ``finefp8.ops.fake_quantize_groupwise``).

The outputs require grad exactly when an input does (whatever the token count), as for any
PyTorch operator.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.library import custom_op, register_autograd, register_fake

from .. import quantization as _q
from . import cpu

__all__ = ["NAMESPACE", "OPS"]

NAMESPACE = "finefp8"
_FP8 = torch.float8_e4m3fn


def _sizes(block_size: Sequence[int]) -> tuple[int, int]:
    return int(block_size[0]), int(block_size[1])


# ----------------------------------------------------------------------------- quantization


@custom_op(f"{NAMESPACE}::quantize_blockwise", mutates_args=(), device_types="cpu")
def quantize_blockwise(w: torch.Tensor, block_size: Sequence[int], scale_fmt: str, fmt: str,
                       amax_floor: float, allow_nonfinite: bool, name: str | None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """``finefp8.kernels.cpu.quantize_blockwise`` as an operator."""
    return cpu.quantize_blockwise(w, _sizes(block_size), scale_fmt, fmt=fmt, amax_floor=amax_floor,
                                  allow_nonfinite=allow_nonfinite, name=name)


@register_fake(f"{NAMESPACE}::quantize_blockwise")
def _quantize_blockwise_fake(w, block_size, scale_fmt, fmt, amax_floor, allow_nonfinite, name):
    grid = _q.block_grid(tuple(w.shape), _sizes(block_size))
    return w.new_empty(w.shape, dtype=_FP8), w.new_empty(grid, dtype=torch.float32)


@custom_op(f"{NAMESPACE}::quantize_groupwise", mutates_args=(), device_types="cpu")
def quantize_groupwise(x: torch.Tensor, group_size: int, scale_fmt: str, fmt: str,
                       amax_floor: float, allow_nonfinite: bool, name: str | None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """``finefp8.kernels.cpu.quantize_groupwise`` as an operator."""
    return cpu.quantize_groupwise(x, group_size, scale_fmt, fmt=fmt, amax_floor=amax_floor,
                                  allow_nonfinite=allow_nonfinite, name=name)


@register_fake(f"{NAMESPACE}::quantize_groupwise")
def _quantize_groupwise_fake(x, group_size, scale_fmt, fmt, amax_floor, allow_nonfinite, name):
    gk = math.ceil(x.shape[-1] / group_size)
    return x.new_empty(x.shape, dtype=_FP8), x.new_empty((*x.shape[:-1], gk), dtype=torch.float32)


def _no_gradient(op: str):
    def backward(ctx, *grads):
        raise RuntimeError(
            f"finefp8::{op} has no gradient: its outputs are FP8 codes (and their scales), which "
            f"are not differentiable. Detach the input, or for quantization-aware training use "
            f"finefp8.ops.fake_quantize_groupwise (straight-through estimator).")
    return backward


register_autograd(f"{NAMESPACE}::quantize_blockwise", _no_gradient("quantize_blockwise"))
register_autograd(f"{NAMESPACE}::quantize_groupwise", _no_gradient("quantize_groupwise"))


@custom_op(f"{NAMESPACE}::fake_quantize_groupwise", mutates_args=(), device_types="cpu")
def fake_quantize_groupwise(x: torch.Tensor, group_size: int, scale_fmt: str, fmt: str,
                            amax_floor: float, allow_nonfinite: bool, name: str | None
                            ) -> torch.Tensor:
    """``dequantize(quantize(x))`` per group, in ``x.dtype``: the value an FP8 GEMM sees."""
    q, s = cpu.quantize_groupwise(x, group_size, scale_fmt, fmt=fmt, amax_floor=amax_floor,
                                  allow_nonfinite=allow_nonfinite, name=name)
    return cpu.dequantize_groupwise(q, s, group_size, x.dtype)


@register_fake(f"{NAMESPACE}::fake_quantize_groupwise")
def _fake_quantize_groupwise_fake(x, group_size, scale_fmt, fmt, amax_floor, allow_nonfinite, name):
    return torch.empty_like(x)


def _straight_through(ctx, grad):
    return grad, None, None, None, None, None, None


register_autograd(f"{NAMESPACE}::fake_quantize_groupwise", _straight_through)


# ----------------------------------------------------------------------------- dequantization


@custom_op(f"{NAMESPACE}::dequantize_blockwise", mutates_args=(), device_types="cpu")
def dequantize_blockwise(q: torch.Tensor, scale: torch.Tensor, block_size: Sequence[int],
                         dtype: torch.dtype, name: str | None) -> torch.Tensor:
    """``finefp8.kernels.cpu.dequantize_blockwise`` as an operator."""
    return cpu.dequantize_blockwise(q, scale, _sizes(block_size), dtype, name=name)


@register_fake(f"{NAMESPACE}::dequantize_blockwise")
def _dequantize_blockwise_fake(q, scale, block_size, dtype, name):
    return q.new_empty(q.shape, dtype=dtype)


def _block_sums(g: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Sum of ``g`` ``[M, N]`` over each ``bm x bn`` block: ``[ceil(M/bm), ceil(N/bn)]`` fp32."""
    bm, bn = block
    m, n = g.shape
    gm, gn = math.ceil(m / bm), math.ceil(n / bn)
    p = torch.nn.functional.pad(g.float(), (0, gn * bn - n, 0, gm * bm - m))
    return p.view(gm, bm, gn, bn).sum(dim=(1, 3))


def _dequantize_blockwise_setup(ctx, inputs, output):
    q, scale, block_size, _dtype, _name = inputs
    ctx.block = _sizes(block_size)
    ctx.scale_dtype = scale.dtype
    ctx.save_for_backward(q)


def _dequantize_blockwise_backward(ctx, grad):
    (q,) = ctx.saved_tensors
    gs = _block_sums(grad.float() * q.float(), ctx.block).to(ctx.scale_dtype)
    return None, gs, None, None, None


register_autograd(f"{NAMESPACE}::dequantize_blockwise", _dequantize_blockwise_backward,
                  setup_context=_dequantize_blockwise_setup)


@custom_op(f"{NAMESPACE}::dequantize_groupwise", mutates_args=(), device_types="cpu")
def dequantize_groupwise(q: torch.Tensor, scale: torch.Tensor, group_size: int,
                         dtype: torch.dtype, name: str | None) -> torch.Tensor:
    """``finefp8.kernels.cpu.dequantize_groupwise`` as an operator."""
    return cpu.dequantize_groupwise(q, scale, group_size, dtype, name=name)


@register_fake(f"{NAMESPACE}::dequantize_groupwise")
def _dequantize_groupwise_fake(q, scale, group_size, dtype, name):
    return q.new_empty(q.shape, dtype=dtype)


def _dequantize_groupwise_setup(ctx, inputs, output):
    q, scale, group_size, _dtype, _name = inputs
    ctx.group = int(group_size)
    ctx.scale_dtype = scale.dtype
    ctx.save_for_backward(q)


def _dequantize_groupwise_backward(ctx, grad):
    (q,) = ctx.saved_tensors
    k, g = q.shape[-1], ctx.group
    gk = math.ceil(k / g)
    prod = torch.nn.functional.pad(grad.float() * q.float(), (0, gk * g - k))
    gs = prod.view(*q.shape[:-1], gk, g).sum(-1).to(ctx.scale_dtype)
    return None, gs, None, None, None


register_autograd(f"{NAMESPACE}::dequantize_groupwise", _dequantize_groupwise_backward,
                  setup_context=_dequantize_groupwise_setup)


# ----------------------------------------------------------------------------- linear and GEMM


@custom_op(f"{NAMESPACE}::weight_only_linear", mutates_args=(), device_types="cpu")
def weight_only_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                       bias: torch.Tensor | None, block_size: Sequence[int]) -> torch.Tensor:
    """``finefp8.kernels.cpu.weight_only_linear`` as an operator."""
    return cpu.weight_only_linear(x, q, scale, bias, block_size=_sizes(block_size))


@register_fake(f"{NAMESPACE}::weight_only_linear")
def _weight_only_linear_fake(x, q, scale, bias, block_size):
    return x.new_empty((*x.shape[:-1], q.shape[0]))


def _linear_setup(ctx, inputs, output):
    x, q, scale, bias, block_size = inputs
    ctx.block = _sizes(block_size)
    ctx.has_bias = bias is not None
    ctx.x_dtype, ctx.scale_dtype = x.dtype, scale.dtype
    ctx.bias_dtype = bias.dtype if bias is not None else None
    ctx.save_for_backward(x, q, scale)


def _linear_backward(ctx, grad):
    x, q, scale = ctx.saved_tensors
    n, k = q.shape
    g2 = grad.reshape(-1, n).float()
    gx = gs = gb = None
    if ctx.needs_input_grad[0]:
        w = cpu.dequantize_blockwise(q, scale, ctx.block, torch.float32)
        gx = (g2 @ w).reshape(x.shape).to(ctx.x_dtype)
    if ctx.needs_input_grad[2]:
        gw = g2.T @ x.reshape(-1, k).float()  # dL/dW [N, K]
        gs = _block_sums(gw * q.float(), ctx.block).to(ctx.scale_dtype)
    if ctx.has_bias and ctx.needs_input_grad[3]:
        gb = g2.sum(0).to(ctx.bias_dtype)
    return gx, None, gs, gb, None


register_autograd(f"{NAMESPACE}::weight_only_linear", _linear_backward, setup_context=_linear_setup)


@custom_op(f"{NAMESPACE}::fp8_gemm", mutates_args=(), device_types="cpu")
def fp8_gemm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
             out_dtype: torch.dtype, promote_every: int | None, accum_bits: int | None,
             block_size: int, mma_k: int) -> torch.Tensor:
    """``finefp8.kernels.cpu.fp8_gemm`` as an operator."""
    return cpu.fp8_gemm(a, a_scale, b, b_scale, out_dtype, promote_every, accum_bits,
                        block_size=block_size, mma_k=mma_k)


@register_fake(f"{NAMESPACE}::fp8_gemm")
def _fp8_gemm_fake(a, a_scale, b, b_scale, out_dtype, promote_every, accum_bits, block_size, mma_k):
    return a.new_empty((a.shape[0], b.shape[0]), dtype=out_dtype)


register_autograd(f"{NAMESPACE}::fp8_gemm", _no_gradient("fp8_gemm"))

#: The registered operators, by op name (what ``finefp8.ops`` calls for ``backend="cpu"``).
OPS = {
    "quantize_blockwise": torch.ops.finefp8.quantize_blockwise,
    "quantize_groupwise": torch.ops.finefp8.quantize_groupwise,
    "fake_quantize_groupwise": torch.ops.finefp8.fake_quantize_groupwise,
    "dequantize_blockwise": torch.ops.finefp8.dequantize_blockwise,
    "dequantize_groupwise": torch.ops.finefp8.dequantize_groupwise,
    "weight_only_linear": torch.ops.finefp8.weight_only_linear,
    "fp8_gemm": torch.ops.finefp8.fp8_gemm,
}
