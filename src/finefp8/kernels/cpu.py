"""The CPU kernels' Python side: fused FP8 quantization, dequantization and weight-only linear.

Each function here calls the C kernels of ``cpu_kernels.c`` (built and loaded by
``finefp8.kernels.cpu_build``, split over threads by ``finefp8.kernels.cpu_threads``) on the
tensors' memory, and returns what its reference in ``finefp8.quantization`` /
``finefp8.gemm`` returns (same codes, same scales, bit for bit; the linear layer and the GEMM
within fp32 rounding of the exact sum).

What the kernels take is the ``"cpu"`` row of ``finefp8.kernels.capabilities`` (E4M3 codes,
float32/bfloat16/float16 inputs, CPU tensors): every function first validates its arguments
exactly as the reference does (same errors), then checks that row and raises ``ValueError``
with the reason for anything else (E5M2, float64 inputs, ...): these functions never quietly
run other code. One data-dependent case is delegated: a quantizer input holding NaN or Inf
(found by the kernel's amax pass) is handed to the reference, which raises its error naming
the block, or with ``allow_nonfinite=True`` computes the codes from the finite values.

``finefp8.kernels.cpu_library`` registers these functions as PyTorch operators
(``torch.ops.finefp8.*``), which is how ``finefp8.ops`` calls them.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .. import gemm as _gemm
from .. import quantization as _q
from ..formats import E4M3, FP8Format
from ..quantization import AMAX_FLOOR, BLOCK_SIZE, GROUP_SIZE
from . import cpu_build
from .capabilities import CPU, OpCall, format_name
from .cpu_build import available, instruction_set, library_path
from .cpu_threads import in_forked_child, parallel, threads_for

__all__ = [
    "CPU_OPS",
    "FUSED_LINEAR_MAX_TOKENS",
    "available",
    "library_path",
    "instruction_set",
    "cast_e4m3",
    "quantize_blockwise",
    "dequantize_blockwise",
    "quantize_groupwise",
    "dequantize_groupwise",
    "weight_only_linear",
    "fp8_gemm",
]

CPU_OPS = frozenset(CPU.ops)
"""Ops of ``finefp8.ops`` that have a ``"cpu"`` backend (the keys of its capability table)."""

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_HUGE_OUTPUT_BYTES = 1 << 23
_CPU = torch.device("cpu")


def _lib():
    """The loaded C library; ``ValueError`` with the reason when it is unavailable."""
    lib = cpu_build.library()
    if lib is None:
        raise ValueError(f"backend 'cpu' is unavailable: {cpu_build.unavailable_reason()}; "
                         f"use backend='reference'")
    return lib


def _device(*tensors: object) -> torch.device:
    """The device the capability check sees: the first non-CPU tensor's, else the CPU."""
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != "cpu":
            return t.device
    return _CPU


def _split(part: Callable[[int, int], object], whole: Callable[[int], object], n_items: int,
           work_per_item: int) -> list:
    """One kernel call over ``range(n_items)``: ``[whole(threads)]`` when the library has OpenMP
    (it splits the range on PyTorch's OpenMP threads), else ``part(begin, end)`` over chunks on
    the Python thread pool (``cpu_threads.parallel``), as also in a forked child, where GNU
    OpenMP can hang."""
    if cpu_build.openmp() and not in_forked_child():
        return [whole(threads_for(n_items, work_per_item))]
    return parallel(part, n_items, work_per_item)


def _empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A new output tensor; large ones are advised to use huge pages before the kernel writes.

    Writing a fresh large tensor page-faults once per 4 KiB page; on virtual machines that
    costs more than the quantization itself. ``madvise(MADV_HUGEPAGE)`` on the untouched
    buffer (Linux, transparent huge pages in ``madvise`` or ``always`` mode) cuts the faults
    512-fold. Only this tensor's memory is affected.
    """
    out = torch.empty(shape, dtype=dtype)
    nbytes = out.numel() * out.element_size()
    if nbytes >= _HUGE_OUTPUT_BYTES:
        _lib().ff8_advise_hugepages(out.data_ptr(), nbytes)
    return out


def _outputs(out: tuple[torch.Tensor, torch.Tensor] | None, q_shape: tuple[int, ...],
             s_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes uint8 q_shape, scales float32 s_shape)``: the caller's ``out`` or new tensors.

    A caller that quantizes many tensors of one shape (a streaming converter, a benchmark)
    can pass the same ``out`` each time and skip the page faults of fresh memory.
    """
    if out is None:
        return _empty(q_shape, torch.uint8), torch.empty(s_shape, dtype=torch.float32)
    q, scale = out
    if (q.dtype not in (torch.uint8, torch.float8_e4m3fn) or tuple(q.shape) != q_shape
            or not q.is_contiguous() or scale.dtype != torch.float32
            or tuple(scale.shape) != s_shape or not scale.is_contiguous()):
        raise ValueError(f"out must be (contiguous uint8/float8_e4m3fn {q_shape}, contiguous "
                         f"float32 {s_shape}), got ({q.dtype} {tuple(q.shape)}, "
                         f"{scale.dtype} {tuple(scale.shape)})")
    return q.view(torch.uint8), scale


def _nonfinite(out: tuple[torch.Tensor, torch.Tensor] | None,
               compute: Callable[[], tuple[torch.Tensor, torch.Tensor]]
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's handling of a NaN/Inf input (``compute``), copied into ``out`` if given."""
    q, scale = compute()
    if out is None:
        return q, scale
    q_out, s_out = _outputs(out, tuple(q.shape), tuple(scale.shape))
    q_out.copy_(q.view(torch.uint8))
    s_out.copy_(scale)
    return q_out.view(q.dtype), s_out


# ----------------------------------------------------------------------------- quantization


def cast_e4m3(x: torch.Tensor) -> torch.Tensor:
    """The kernels' fp32 -> E4M3 cast on its own: ``uint8`` codes of ``x`` (float32, any shape).

    Round to nearest even, saturating to +-448, NaN -> ``0x7F | sign``: the codes of
    ``finefp8.formats.encode(x, E4M3, saturate=True)``. Needs ``available()``.
    """
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32 or x.device.type != "cpu":
        raise TypeError("cast_e4m3 expects a float32 CPU tensor")
    lib = _lib()
    src = x.detach().contiguous()
    out = _empty(tuple(x.shape), torch.uint8)
    lib.ff8_cast_e4m3(src.data_ptr(), out.data_ptr(), src.numel())
    return out


def quantize_blockwise(
    w: torch.Tensor,
    block_size: tuple[int, int] = BLOCK_SIZE,
    scale_fmt: str = "fp32",
    *,
    fmt: FP8Format | str = E4M3,
    amax_floor: float = AMAX_FLOOR,
    allow_nonfinite: bool = False,
    name: str | None = None,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``finefp8.quantization.quantize_blockwise``, fused: one pass per block strip.

    ``w`` ``[M, N]`` float32/bfloat16/float16 -> ``(q [M, N] float8_e4m3fn,
    scale [ceil(M/bm), ceil(N/bn)] float32)``, identical to the reference's.
    ``out``: optional preallocated ``(q, scale)`` to write into (see ``_outputs``).
    """
    _q.check_float_input(w, name, "weight")
    if w.dim() != 2:
        raise ValueError(f"{_q.label(name, 'weight')}: block-wise quantization needs a 2-D "
                         f"tensor, got shape {tuple(w.shape)}")
    if w.numel() == 0:
        raise ValueError(f"{_q.label(name, 'weight')}: empty tensor of shape {tuple(w.shape)}")
    _q.check_scale_fmt(scale_fmt)
    bm, bn = _q.check_block_size(block_size)
    CPU.check(OpCall("quantize_blockwise", w.device, w.dtype, fmt=format_name(fmt),
                     scale_fmt=scale_fmt, sizes=(bm, bn)), _q.label(name, "weight"))
    lib = _lib()
    x = w.detach().contiguous()
    m, n = x.shape
    gm, gn = math.ceil(m / bm), math.ceil(n / bn)
    q, scale = _outputs(out, (m, n), (gm, gn))
    dt, ue8m0 = _DTYPE_CODES[x.dtype], int(scale_fmt == "ue8m0")

    def part(b0: int, b1: int) -> int:
        return lib.ff8_quant_block(x.data_ptr(), dt, m, n, bm, bn, b0, b1, amax_floor, ue8m0,
                                   q.data_ptr(), scale.data_ptr())

    def whole(threads: int) -> int:
        return lib.ff8_quant_block_mt(x.data_ptr(), dt, m, n, bm, bn, amax_floor, ue8m0,
                                      q.data_ptr(), scale.data_ptr(), threads)

    if any(bad != 0 for bad in _split(part, whole, gm, bm * n)):
        return _nonfinite(out, functools.partial(
            _q.quantize_blockwise, w.detach(), (bm, bn), scale_fmt, fmt=fmt, amax_floor=amax_floor,
            allow_nonfinite=allow_nonfinite, name=name))
    return q.view(torch.float8_e4m3fn), scale


def quantize_groupwise(
    x: torch.Tensor,
    group_size: int = GROUP_SIZE,
    scale_fmt: str = "fp32",
    *,
    fmt: FP8Format | str = E4M3,
    amax_floor: float = AMAX_FLOOR,
    allow_nonfinite: bool = False,
    name: str | None = None,
    out: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``finefp8.quantization.quantize_groupwise``, fused: amax, scale and codes per group.

    ``x`` ``[..., K]`` -> ``(q [..., K] float8_e4m3fn, scale [..., ceil(K/g)] float32)``.
    ``out``: optional preallocated ``(q, scale)`` to write into (see ``_outputs``).
    """
    _q.check_float_input(x, name, "activation")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"{_q.label(name, 'activation')}: needs a non-empty last dimension, "
                         f"got shape {tuple(x.shape)}")
    if int(group_size) != group_size or group_size < 1:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
    _q.check_scale_fmt(scale_fmt)
    group_size = int(group_size)
    CPU.check(OpCall("quantize_groupwise", x.device, x.dtype, fmt=format_name(fmt),
                     scale_fmt=scale_fmt, sizes=(group_size,)), _q.label(name, "activation"))
    k = x.shape[-1]
    gk = math.ceil(k / group_size)
    q, scale = _outputs(out, tuple(x.shape), (*x.shape[:-1], gk))
    t = x.numel() // k
    if t == 0:
        return q.view(torch.float8_e4m3fn), scale
    lib = _lib()
    src = x.detach().contiguous()
    dt, ue8m0 = _DTYPE_CODES[x.dtype], int(scale_fmt == "ue8m0")

    def part(t0: int, t1: int) -> int:
        return lib.ff8_quant_group(src.data_ptr(), dt, t, k, group_size, t0, t1, amax_floor,
                                   ue8m0, q.data_ptr(), scale.data_ptr())

    def whole(threads: int) -> int:
        return lib.ff8_quant_group_mt(src.data_ptr(), dt, t, k, group_size, amax_floor, ue8m0,
                                      q.data_ptr(), scale.data_ptr(), threads)

    if any(bad != 0 for bad in _split(part, whole, t, k)):
        return _nonfinite(out, functools.partial(
            _q.quantize_groupwise, x.detach(), group_size, scale_fmt, fmt=fmt,
            amax_floor=amax_floor, allow_nonfinite=allow_nonfinite, name=name))
    return q.view(torch.float8_e4m3fn), scale


# ----------------------------------------------------------------------------- dequantization


def _out_code(dtype: torch.dtype) -> tuple[torch.dtype, int]:
    """(dtype the kernel writes, its code); float64 is written as float32 and widened."""
    if dtype == torch.float64:
        return torch.float32, 0
    return dtype, _DTYPE_CODES[dtype]


def _check_scale_tensor(scale: object, name: str | None, what: str) -> None:
    if not isinstance(scale, torch.Tensor) or not scale.is_floating_point():
        got = scale.dtype if isinstance(scale, torch.Tensor) else type(scale).__name__
        raise TypeError(f"{_q.label(name, what)}: the scale must be a floating-point tensor, "
                        f"got {got}")


def dequantize_blockwise(
    q: torch.Tensor,
    scale: torch.Tensor,
    block_size: tuple[int, int] = BLOCK_SIZE,
    dtype: torch.dtype = torch.bfloat16,
    *,
    name: str | None = None,
) -> torch.Tensor:
    """``finefp8.quantization.dequantize_blockwise``: ``dtype(q.float() * scale)`` per block."""
    _q.check_fp8_input(q, name, "weight")
    if q.dim() != 2:
        raise ValueError(f"{_q.label(name, 'weight')}: expected a 2-D tensor, got shape "
                         f"{tuple(q.shape)}")
    bm, bn = _q.check_block_size(block_size)
    _check_scale_tensor(scale, name, "weight")
    (m, n) = q.shape
    grid = _q.check_block_scales((m, n), scale, (bm, bn), name)
    CPU.check(OpCall("dequantize_blockwise", _device(q, scale), q.dtype, codes=(q.dtype,),
                     out_dtype=dtype, sizes=(bm, bn)), _q.label(name, "weight"))
    out_dtype, code = _out_code(dtype)
    res = _empty((m, n), out_dtype)
    if q.numel():
        lib = _lib()
        codes = q.detach().contiguous().view(torch.uint8)
        s = scale.detach().float().contiguous()
        _split(lambda b0, b1: lib.ff8_dequant_block(codes.data_ptr(), s.data_ptr(), m, n, bm, bn,
                                                    b0, b1, res.data_ptr(), code),
               lambda th: lib.ff8_dequant_block_mt(codes.data_ptr(), s.data_ptr(), m, n, bm, bn,
                                                   res.data_ptr(), code, th),
               grid[0], bm * n)
    return res.to(dtype)


def dequantize_groupwise(
    q: torch.Tensor,
    scale: torch.Tensor,
    group_size: int = GROUP_SIZE,
    dtype: torch.dtype = torch.bfloat16,
    *,
    name: str | None = None,
) -> torch.Tensor:
    """``finefp8.quantization.dequantize_groupwise``: ``dtype(q.float() * scale)`` per group."""
    _q.check_fp8_input(q, name, "activation")
    if q.dim() < 1:
        raise ValueError(f"{_q.label(name, 'activation')}: expected at least 1 dimension")
    _check_scale_tensor(scale, name, "activation")
    k = q.shape[-1]
    if int(group_size) != group_size or group_size < 1:
        raise ValueError(f"group_size must be a positive integer, got {group_size!r}")
    group_size = int(group_size)
    _q.check_group_scales(tuple(q.shape), scale, group_size, name)
    CPU.check(OpCall("dequantize_groupwise", _device(q, scale), q.dtype, codes=(q.dtype,),
                     out_dtype=dtype, sizes=(group_size,)), _q.label(name, "activation"))
    out_dtype, code = _out_code(dtype)
    res = _empty(tuple(q.shape), out_dtype)
    t = q.numel() // k if k else 0
    if t:
        lib = _lib()
        codes = q.detach().contiguous().view(torch.uint8)
        s = scale.detach().float().contiguous()
        _split(lambda t0, t1: lib.ff8_dequant_group(codes.data_ptr(), s.data_ptr(), t, k,
                                                    group_size, t0, t1, res.data_ptr(), code),
               lambda th: lib.ff8_dequant_group_mt(codes.data_ptr(), s.data_ptr(), t, k,
                                                   group_size, res.data_ptr(), code, th),
               t, k)
    return res.to(dtype)


# ----------------------------------------------------------------------------- linear

FUSED_LINEAR_MAX_TOKENS = 64
"""Up to this many tokens ``weight_only_linear`` runs the fused kernel (it reads one byte per
weight); above, it dequantizes the weight with the fast kernel and calls ``F.linear``."""


def _padded_blocks(x2: torch.Tensor, k: int, bn: int, align: int, dtype: torch.dtype) -> torch.Tensor:
    """``x2`` ``[T, K]`` as ``[T, ceil(K/bn), bnp]`` of ``dtype``, each K block zero-padded to
    ``bnp`` (``bn`` rounded up to a multiple of ``align``): the layout the linear kernels read."""
    t = x2.shape[0]
    gk, full = math.ceil(k / bn), k // bn
    bnp = -(-bn // align) * align
    xp = torch.zeros((t, gk, bnp), dtype=dtype)
    xp[:, :full, :bn] = x2[:, : full * bn].view(t, full, bn)
    if full < gk:
        xp[:, -1, : k - full * bn] = x2[:, full * bn:]
    return xp


def _has_bf16_dot() -> bool:
    """True when the loaded library has the AVX-512-BF16 linear kernel (``ff8_isa() & 4``)."""
    lib = cpu_build.library()
    return lib is not None and bool(lib.ff8_isa() & 4)


def weight_only_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                       bias: torch.Tensor | None = None, *,
                       block_size: tuple[int, int] = BLOCK_SIZE) -> torch.Tensor:
    """``y = x @ (q * scale).T + bias`` with an E4M3 block-quantized weight, on the CPU.

    Shapes: ``x`` ``[..., K]`` float32/bfloat16/float16, ``q`` ``[N, K]`` float8_e4m3fn,
    ``scale`` ``[ceil(N/bm), ceil(K/bn)]``, ``bias`` ``[N]``; returns ``[..., N]`` in
    ``x.dtype``. For at most ``FUSED_LINEAR_MAX_TOKENS`` tokens a fused kernel computes
    ``sum_blocks scale * (x_block . decode(q_block))`` with fp32 sums straight from the codes
    (the weight is never materialized; each product is exact, so this is more accurate than
    the reference for bf16 inputs, which rounds the dequantized weight to bf16 first): for
    bf16 inputs on CPUs with AVX-512-BF16 the bf16 dot-product kernel, else the fp32 one.
    Above, the weight is dequantized to ``x.dtype`` and multiplied by ``F.linear``.
    This function computes values from the tensors' memory; gradients come from its operator
    registration, ``torch.ops.finefp8.weight_only_linear`` (``finefp8.kernels.cpu_library``),
    which is what ``finefp8.ops`` calls.
    """
    if not isinstance(x, torch.Tensor) or not isinstance(q, torch.Tensor):
        raise TypeError("weight_only_linear: x and q must be tensors")
    _q.check_fp8_input(q, None, "weight")
    bm, bn = _q.check_block_size(block_size)
    _check_scale_tensor(scale, None, "weight")
    if q.dim() != 2 or x.dim() < 1 or x.shape[-1] != q.shape[1]:
        raise ValueError(f"weight_only_linear: x {tuple(x.shape)} and weight {tuple(q.shape)} "
                         f"do not fit: x's last dimension must equal the weight's K")
    _q.check_block_scales(tuple(q.shape), scale, (bm, bn), None)
    CPU.check(OpCall("weight_only_linear", _device(x, q, scale, bias), x.dtype, codes=(q.dtype,),
                     sizes=(bm, bn)))
    (n, k) = q.shape
    t = x.numel() // k if k else 0
    if t > FUSED_LINEAR_MAX_TOKENS or t == 0 or k == 0 or n == 0:
        w = dequantize_blockwise(q, scale, (bm, bn), dtype=x.dtype)
        return F.linear(x.detach(), w, None if bias is None else bias.detach())
    lib = _lib()
    x2 = x.detach().reshape(t, k)
    codes = q.detach().contiguous().view(torch.uint8)
    s = scale.detach().float().contiguous()
    y = torch.empty((t, n), dtype=torch.float32)
    # one token: the fp32 matrix-vector kernel (bandwidth-bound either way); more tokens of a
    # bf16 input: the bf16 dot-product kernel where the CPU has AVX-512-BF16
    use_bf16 = t > 1 and x.dtype == torch.bfloat16 and _has_bf16_dot()
    if use_bf16:
        xp = _padded_blocks(x2, k, bn, 32, torch.bfloat16)
        kernel, bnp = lib.ff8_linear_w8_bf16, xp.shape[-1]
    else:
        xp = _padded_blocks(x2.float(), k, bn, 8, torch.float32)
        kernel, bnp = lib.ff8_linear_w8, xp.shape[-1]

    def part(n0: int, n1: int) -> int:
        return kernel(xp.data_ptr(), t, k, codes.data_ptr(), s.data_ptr(), n, bm, bn, bnp,
                      n0, n1, y.data_ptr())

    def whole(threads: int) -> int:
        return lib.ff8_linear_mt(xp.data_ptr(), int(use_bf16), t, k, codes.data_ptr(),
                                 s.data_ptr(), n, bm, bn, bnp, y.data_ptr(), threads)

    if any(rc != 0 for rc in _split(part, whole, n, k * t)):
        raise MemoryError("weight_only_linear: the CPU kernel could not allocate scratch memory")
    y = y.view(*x.shape[:-1], n)
    if bias is not None:
        y = y + bias.detach().float()
    return y.to(x.dtype)


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
    mma_k: int = _gemm.MMA_K,
) -> torch.Tensor:
    """``finefp8.gemm.fp8_gemm`` (``C = (A * sa) @ (B * sb).T``) with exact fp32 promotion.

    ``a`` ``[M, K]`` float8_e4m3fn with ``a_scale`` ``[M, ceil(K/128)]``, ``b`` ``[N, K]``
    float8_e4m3fn with ``b_scale`` ``[ceil(N/128), ceil(K/128)]``; returns ``[M, N]`` of
    ``out_dtype``. The activations are dequantized to fp32 (``a * sa``, exact products
    rounded once) and multiplied by the fp32 ``weight_only_linear`` kernel with the
    block-quantized ``b``: the reference's per-block promotion, within fp32 rounding.
    The accumulation emulator (``accum_bits``), promotion intervals other than the block and
    E5M2 operands are not in this backend's table: they raise (``finefp8.ops`` sends them to
    the reference).
    """
    _gemm.check_operands(a, a_scale, b, b_scale, block_size)
    CPU.check(OpCall("fp8_gemm", _device(a, a_scale, b, b_scale), a.dtype,
                     codes=(a.dtype, b.dtype), out_dtype=out_dtype, sizes=(block_size,),
                     accum_bits=accum_bits, promote_every=promote_every))
    x = dequantize_groupwise(a, a_scale, block_size, torch.float32)
    y = weight_only_linear(x, b, b_scale, block_size=(block_size, block_size))
    return y.to(out_dtype)
