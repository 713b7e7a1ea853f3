"""``FP8Linear``: a linear layer whose weight lives in memory as E4M3 codes plus block scales.

Tensors held (``N = out_features``, ``K = in_features``, blocks ``bm x bn``)::

    weight            [N, K]                        float8_e4m3fn   (1 byte a parameter)
    weight_scale_inv  [ceil(N/bm), ceil(K/bn)]      float32         (W ~= weight * scale per block)
    bias              [N]                           the original dtype, or None

No float copy of the weight is kept. The forward pass (``FP8Config.mode``):

* ``"w8a8"``: ``x`` ``[..., K]`` is quantized at run time, one scale per token per 128 channels
  by default (``finefp8.ops.quantize_groupwise``), then
  ``y = fp8_gemm(xq, xs, weight, weight_scale_inv) + bias`` with fp32 accumulation promoted every
  128 elements of K (``finefp8.ops.fp8_gemm``: an exact emulation on the CPU, the GPU kernels on
  CUDA), returned in ``x``'s dtype.
* ``"weight_only"``: ``y = x @ (weight * scale).T + bias`` (``finefp8.ops.weight_only_linear``).
* ``"act_only"``: error attribution: ``weight`` is the original float matrix and only ``x`` is
  quantized and dequantized, ``y = dequant(quant(x)) @ weight.T + bias`` in fp32.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..formats import FP8_DTYPES
from .config import FP8Config

__all__ = ["FP8Linear", "WeightQuantizer", "resident_bytes", "quantize_activation",
           "gemm_scale_index", "apply_keeping_codes", "unique_tensor_bytes"]

#: ``(w [N, K] float, block_size, scale_fmt, *, name) -> (q [N, K] fp8, scale_inv grid fp32)``,
#: the signature of ``finefp8.ops.quantize_blockwise``; any other choice of codes or scales that
#: keeps the on-disk layout can be passed in its place.
WeightQuantizer = Callable[..., tuple[torch.Tensor, torch.Tensor]]


def _label(name: str | None) -> str:
    return f"FP8Linear {name!r}" if name else "FP8Linear"


def gemm_scale_index(dim: int, block: int, group: int, what: str,
                     name: str | None) -> torch.Tensor | None:
    """Map the GEMM's ``group``-sized scale blocks along one dimension to the weight's blocks.

    Returns ``None`` when they coincide (``block == group``), otherwise the index of the weight
    block that holds each group. Needs ``block % group == 0`` or one block covering ``dim``;
    ``name`` labels the error (a module name).
    """
    if block == group:
        return None
    if block % group and block < dim:
        raise ValueError(
            f"{name or 'FP8 layer'}: a weight block of {block} {what} cannot be used with the "
            f"block-scaled GEMM's groups of {group}: use blocks that are multiples of {group}, "
            f"or mode='weight_only'"
        )
    n = math.ceil(dim / group)
    return torch.div(torch.arange(n) * group, block, rounding_mode="floor")


class FP8Linear(nn.Module):
    """``nn.Linear`` with an FP8 block-quantized weight; see the module docstring for the math.

    Build one with ``FP8Linear.from_linear(linear, config)`` (quantizes a float layer) or
    ``FP8Linear.from_quantized(q, scale_inv, bias, config)`` (codes and scales as they are on disk).

    Attributes:
        in_features, out_features: ``K`` and ``N``.
        config: the ``FP8Config``.
        block_size: the weight block ``(bm, bn)`` actually used (the whole matrix for per-tensor).
        name: the module's name in its model, for error messages and reports (may be ``None``).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 config: FP8Config | None = None, *, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, name: str | None = None) -> None:
        super().__init__()
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.config = config or FP8Config()
        self.name = name
        self.block_size = self.config.block_size(self.out_features, self.in_features)
        shape = (self.out_features, self.in_features)
        if self.config.mode == "act_only":
            self.register_buffer("weight", torch.zeros(shape, dtype=dtype, device=device))
            self.register_buffer("weight_scale_inv", None)
        else:
            self.register_buffer("weight", torch.zeros(shape, dtype=torch.float8_e4m3fn, device=device))
            grid = self.config.scale_grid(*shape)
            self.register_buffer("weight_scale_inv", torch.ones(grid, dtype=torch.float32, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.out_features, dtype=dtype, device=device),
                                     requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self._rows = self._cols = None
        if self.config.mode == "w8a8":
            g = self.config.act_group_size
            self._rows = gemm_scale_index(self.out_features, self.block_size[0], g, "rows",
                                          _label(name))
            self._cols = gemm_scale_index(self.in_features, self.block_size[1], g, "columns",
                                          _label(name))

    # ------------------------------------------------------------------------- construction

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: FP8Config | None = None, *,
                    name: str | None = None,
                    weight_quantizer: WeightQuantizer | None = None) -> FP8Linear:
        """Quantize a float ``nn.Linear``: ``(q, s) = weight_quantizer(W, block, scale_fmt)``.

        ``weight_quantizer`` defaults to ``finefp8.ops.quantize_blockwise`` (``s = amax / 448``
        per block, DeepSeek-V3). The bias is kept as it is (same dtype, shared storage).
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{_label(name)}: from_linear needs an nn.Linear, got {type(linear).__name__}")
        config = config or FP8Config()
        w = linear.weight.detach()
        if w.device.type == "meta":
            raise ValueError(f"{_label(name)}: the weight is on the meta device (not loaded); "
                             f"load the model's weights before quantizing it")
        has_bias = linear.bias is not None
        mod = cls(linear.in_features, linear.out_features, has_bias, config, dtype=w.dtype,
                  device=w.device, name=name)
        if config.mode == "act_only":
            mod.weight = w
        else:
            quantizer = weight_quantizer or ops.quantize_blockwise
            q, s = quantizer(w, mod.block_size, config.scale_fmt, name=name)
            mod._set_quantized(q, s)
        if has_bias:
            mod.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        return mod

    @classmethod
    def from_quantized(cls, q: torch.Tensor, scale_inv: torch.Tensor, bias: torch.Tensor | None = None,
                       config: FP8Config | None = None, *, name: str | None = None) -> FP8Linear:
        """Wrap existing codes and scales, e.g. read from an FP8 checkpoint, without requantizing.

        Args:
            q: ``[N, K]`` float8_e4m3fn (or e5m2) codes.
            scale_inv: the ``config.scale_grid(N, K)`` grid of dequantization multipliers (any
                float dtype; stored as fp32, which is exact for bf16/fp16 scales).
            bias: ``[N]`` or ``None``; kept in its dtype.
            config: ``mode`` ``"w8a8"`` or ``"weight_only"``; ``weight_block`` must match the grid.
        """
        config = config or FP8Config()
        if config.mode == "act_only":
            raise ValueError(f"{_label(name)}: mode 'act_only' needs the float weight; "
                             f"use from_linear")
        if not isinstance(q, torch.Tensor) or q.dim() != 2:
            raise ValueError(f"{_label(name)}: codes must be a 2-D tensor [out, in]")
        dtype = bias.dtype if bias is not None else torch.float32
        mod = cls(q.shape[1], q.shape[0], bias is not None, config, dtype=dtype, device=q.device,
                  name=name)
        mod._set_quantized(q, scale_inv)
        if bias is not None:
            if tuple(bias.shape) != (q.shape[0],):
                raise ValueError(f"{_label(name)}: bias has shape {tuple(bias.shape)}, "
                                 f"expected ({q.shape[0]},)")
            mod.bias = nn.Parameter(bias.detach(), requires_grad=False)
        return mod

    def _set_quantized(self, q: torch.Tensor, scale_inv: torch.Tensor) -> None:
        """Install codes and scales after checking dtype and shapes."""
        if q.dtype not in FP8_DTYPES:
            hint = " (raw bytes: call .view(torch.float8_e4m3fn) first)" if q.dtype == torch.uint8 else ""
            raise TypeError(f"{_label(self.name)}: codes must be float8_e4m3fn, got {q.dtype}{hint}")
        if tuple(q.shape) != (self.out_features, self.in_features):
            raise ValueError(f"{_label(self.name)}: codes have shape {tuple(q.shape)}, expected "
                             f"{(self.out_features, self.in_features)}")
        grid = self.config.scale_grid(self.out_features, self.in_features)
        if not isinstance(scale_inv, torch.Tensor) or not scale_inv.is_floating_point():
            raise TypeError(f"{_label(self.name)}: scale_inv must be a floating-point tensor")
        if tuple(scale_inv.shape) != grid:
            raise ValueError(
                f"{_label(self.name)}: scale grid {tuple(scale_inv.shape)} does not match weight "
                f"{tuple(q.shape)} with {self.block_size[0]}x{self.block_size[1]} blocks "
                f"(expected {grid}); check FP8Config.weight_block"
            )
        self.weight = q.contiguous()
        self.weight_scale_inv = scale_inv.detach().to(torch.float32).contiguous()

    # ------------------------------------------------------------------------- math

    def quantize_input(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantize an input as the forward pass does (``quantize_activation`` with this config)."""
        return quantize_activation(x, self.config, self.name)

    def fake_quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """``dequant(quant(x))`` in fp32: the input the FP8 GEMM effectively sees."""
        q, s = self.quantize_input(x)
        return ops.dequantize_groupwise(q, s, self.config.act_group_size, torch.float32)

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``W = weight * scale`` per block, ``[N, K]`` in ``dtype`` (the float weight in act_only)."""
        if self.config.mode == "act_only":
            return self.weight.to(dtype)
        return ops.dequantize_blockwise(self.weight, self.weight_scale_inv, self.block_size, dtype,
                                        name=self.name)

    def _gemm_weight_scale(self) -> torch.Tensor:
        """The weight scales on the GEMM's ``g x g`` grid ``[ceil(N/g), ceil(K/g)]``."""
        s = self.weight_scale_inv
        if self._rows is not None:
            s = s.index_select(0, self._rows.to(s.device))
        if self._cols is not None:
            s = s.index_select(1, self._cols.to(s.device))
        return s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``y = x @ W.T + b`` through the configured FP8 path; ``[..., K]`` -> ``[..., N]``."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{_label(self.name)}: input has {x.shape[-1]} features in its last "
                             f"dimension, expected {self.in_features}")
        mode = self.config.mode
        if mode == "weight_only":
            bias = None if self.bias is None else self.bias.to(x.dtype)
            return ops.weight_only_linear(x, self.weight, self.weight_scale_inv, bias,
                                          block_size=self.block_size)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] == 0:
            return x.new_zeros(*lead, self.out_features)
        if mode == "act_only":
            b = None if self.bias is None else self.bias.float()
            y = F.linear(self.fake_quantize_input(x2), self.weight.float(), b)
        else:
            c = self.config
            xq, xs = self.quantize_input(x2)
            y = ops.fp8_gemm(xq, xs, self.weight, self._gemm_weight_scale(), torch.float32,
                             c.promote_every, c.accum_bits, block_size=c.act_group_size)
            if self.bias is not None:
                y = y + self.bias.float()
        return y.to(x.dtype).reshape(*lead, self.out_features)

    # ------------------------------------------------------------------------- memory, printing

    def _apply(self, fn, recurse: bool = True):
        """Keep the FP8 codes and the fp32 scales in their dtypes through ``.to(dtype)``/``.half()``
        (``apply_keeping_codes``); the bias follows dtype changes as usual."""
        return apply_keeping_codes(self, super()._apply, fn, recurse,
                                   ("weight", "weight_scale_inv"))

    def weight_bytes(self) -> int:
        """Bytes held by this layer: codes + scales + bias (what stays resident)."""
        return sum(t.numel() * t.element_size() for t in (self.weight, self.weight_scale_inv, self.bias)
                   if t is not None)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, {self.config.describe()}")


def quantize_activation(x: torch.Tensor, config: FP8Config,
                        name: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize an activation as an FP8 layer's forward pass does: ``x ~= q * s`` per group.

    Returns ``q`` of ``x``'s shape (E4M3) and ``s`` of shape ``x.shape[:-1] + (ceil(K/g),)``
    (fp32, ``g = config.act_group_size``): for ``"token"`` and ``"tensor"`` granularity the one
    scale is repeated over the groups, so ``ops.dequantize_groupwise(q, s, g)`` always inverts it.
    """
    g, k = config.act_group_size, x.shape[-1]
    kb = math.ceil(k / g)
    if config.act_granularity == "group":
        return ops.quantize_groupwise(x, g, config.scale_fmt, name=name)
    if config.act_granularity == "token":
        q, s = ops.quantize_groupwise(x, k, config.scale_fmt, name=name)
        return q, s.expand(*x.shape[:-1], kb).contiguous()
    q, s = ops.quantize_groupwise(x.reshape(1, -1), x.numel(), config.scale_fmt, name=name)
    s = s.view(*([1] * (x.dim() - 1)), 1).expand(*x.shape[:-1], kb).contiguous()
    return q.view(x.shape), s


def apply_keeping_codes(module: nn.Module, parent_apply: Callable, fn: Callable, recurse: bool,
                        keys: Iterable[str]) -> nn.Module:
    """``nn.Module._apply`` that keeps FP8 codes and fp32 scales in their dtypes.

    ``nn.Module.to(torch.bfloat16)`` casts every floating-point tensor, FP8 included; the
    buffers named in ``keys`` that hold FP8 codes, or whose name ends in ``scale_inv``, only
    follow device moves. ``parent_apply`` is the bound ``super()._apply`` of ``module``.
    """
    keep = {}
    for key in keys:
        t = module._buffers.get(key)
        if t is not None and (t.dtype in FP8_DTYPES or key.endswith("scale_inv")):
            keep[key] = module._buffers.pop(key)
    try:
        parent_apply(fn, recurse)
    finally:
        for key, t in keep.items():
            probe = fn(torch.empty(0, dtype=t.dtype, device=t.device))
            module._buffers[key] = fn(t) if probe.dtype == t.dtype else t.to(probe.device)
    return module


def unique_tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of ``tensors``, each distinct storage region counted once; meta tensors count zero."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            continue
        key = (t.untyped_storage().data_ptr(), t.storage_offset())
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def resident_bytes(module: nn.Module) -> int:
    """Bytes of every parameter and buffer of ``module``, each storage counted once (tied weights).

    Meta tensors count zero. For an ``FP8Linear`` this is 1 byte a weight element plus 4 bytes a
    scale plus the bias.
    """
    return unique_tensor_bytes(list(module.parameters()) + list(module.buffers()))
