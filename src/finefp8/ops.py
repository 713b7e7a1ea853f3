"""The public ops: one function per op, each running on the backend chosen for its inputs.

Backends, in the order ``backend="auto"`` tries them (``finefp8.kernels.capabilities.AUTO_ORDER``):

* CUDA tensors: ``torch._scaled_mm`` block-wise (``"scaled_mm"``, ``fp8_gemm`` on Hopper), the
  Triton kernels (``"triton"``, cc >= 8.9), for ``fp8_gemm`` on GPUs without FP8 weight and
  activation dequantization + a bf16 GEMM (``"dequant"``), else the torch code (``"reference"``).
* CPU tensors: the compiled C kernels (``"cpu"``, registered as ``torch.ops.finefp8.*``) when
  they built on this machine and take the call, else the pure-torch reference
  (``finefp8.quantization`` / ``finefp8.gemm``, ``"reference"``).

What each backend takes is its capability table (``finefp8.kernels.capabilities``):
``"auto"`` picks the first backend whose table covers the call and that can run here;
``backend=<name>`` forces one, and a forced backend that cannot run the call raises with the
reason (``ValueError`` when its table excludes the call, ``RuntimeError`` when it is
unavailable here). Every op dispatches through ``_dispatch``.

Adding an op: describe its call with an ``OpCall``, add its ``OpSupport`` rows to the backends'
tables, and its implementations (one per backend, all with the op's signature) to
``_IMPLEMENTATIONS``; the public function then is ``_dispatch(call, backend, *args)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import gemm as _gemm
from . import quantization as _q
from .formats import E4M3, FP8_DTYPES, FP8Format
from .kernels import capabilities as _caps
from .kernels import cpu_library as _cpu_library
from .kernels.capabilities import BACKEND_TABLE, OpCall, as_sizes, format_name
from .kernels.scaled_mm import GemmProblem
from .quantization import AMAX_FLOOR, BLOCK_SIZE, GROUP_SIZE

__all__ = [
    "BACKENDS",
    "select_backend",
    "quantize_blockwise",
    "dequantize_blockwise",
    "quantize_groupwise",
    "dequantize_groupwise",
    "fake_quantize_groupwise",
    "fp8_gemm",
    "grouped_fp8_gemm",
    "weight_only_linear",
]

BACKENDS = ("auto", *BACKEND_TABLE)
"""``"auto"`` and every backend name of ``finefp8.kernels.capabilities.BACKEND_TABLE``."""


def select_backend(op: str, device: torch.device | str, backend: str = "auto", *,
                   call: OpCall | None = None, limit: str | None = None,
                   gemm: GemmProblem | None = None) -> str:
    """Name of the backend that runs ``op`` for tensors on ``device``.

    ``call`` describes the call (dtypes, formats, sizes; see ``OpCall``); without it only
    the op and the device are checked. ``gemm`` (``fp8_gemm``'s problem shape) and ``limit``
    (a sentence saying why the GPU kernels cannot take this call, e.g. from
    ``finefp8.kernels.gemm_limit``) add to it.

    ``backend="auto"`` takes the first backend of ``AUTO_ORDER[device.type]`` that can run
    the call. Any other ``backend`` is returned if it can run the call, else the error says
    why: ``ValueError`` (unknown backend, or its capability table excludes the call) or
    ``RuntimeError`` (the backend is unavailable here). ``backend="triton"`` runs on CPU
    tensors too when ``TRITON_INTERPRET=1`` (Triton's interpreter).
    """
    if backend not in BACKENDS:
        raise ValueError(f"{op}: unknown backend {backend!r}; expected one of {BACKENDS}")
    device = torch.device(device)
    if call is None:
        call = OpCall(op, device, gemm=gemm)
    elif gemm is not None and call.gemm is None:
        call = OpCall(**{**call.__dict__, "gemm": gemm})
    if backend != "auto":
        _check_forced(BACKEND_TABLE[backend], call, limit)
        return backend
    for name in _caps.AUTO_ORDER.get(device.type, ("reference",)):
        b = BACKEND_TABLE[name]
        if limit is not None and name not in ("reference", "cpu"):
            continue
        if b.limit(call) is None:
            return name
    return "reference"


def _check_forced(b: _caps.Backend, call: OpCall, limit: str | None) -> None:
    """Raise unless the forced backend ``b`` can run ``call`` (see ``select_backend``); a
    ``limit`` applies to the GPU backends."""
    if limit is not None and b.name not in ("reference", "cpu") and b.table_limit(call) is None:
        raise ValueError(f"{call.op}: backend {b.name!r} cannot run this call: {limit}")
    b.check(call)


def _dispatch(call: OpCall, backend: str, *args, **kwargs):
    """Run ``call.op`` on the backend ``select_backend`` picks, with the op's arguments."""
    chosen = select_backend(call.op, call.device, backend, call=call)
    return _IMPLEMENTATIONS[call.op][chosen](*args, **kwargs)


def _device(*tensors: object) -> torch.device:
    """Where a call runs: the first tensor's device (a mixed call fails in the backend)."""
    for t in tensors:
        if isinstance(t, torch.Tensor):
            return t.device
    return torch.device("cpu")


def _dtype(t: object) -> torch.dtype | None:
    return t.dtype if isinstance(t, torch.Tensor) else None


# ----------------------------------------------------------------------------- public ops


def quantize_blockwise(w: torch.Tensor, block_size: tuple[int, int] = BLOCK_SIZE,
                       scale_fmt: str = "fp32", *, fmt: FP8Format | str = E4M3,
                       amax_floor: float = AMAX_FLOOR, allow_nonfinite: bool = False,
                       name: str | None = None, backend: str = "auto"
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-wise FP8 quantization of a 2-D weight; see ``finefp8.quantization.quantize_blockwise``.

    ``w`` ``[M, N]`` -> ``(q [M, N] fp8 of fmt, scale [ceil(M/bm), ceil(N/bn)] float32)`` with
    ``scale = max(amax, amax_floor) / fmt.max`` per ``bm x bn`` block (``"ue8m0"``: rounded up
    to a power of two) and ``w ~= q * scale``. ``name`` names the tensor in errors;
    ``allow_nonfinite`` quantizes NaN/Inf instead of raising; ``backend`` forces a backend.
    """
    call = OpCall("quantize_blockwise", _device(w), _dtype(w), fmt=format_name(fmt),
                  scale_fmt=scale_fmt, sizes=as_sizes(block_size))
    return _dispatch(call, backend, w, block_size, scale_fmt, fmt=fmt, amax_floor=amax_floor,
                     allow_nonfinite=allow_nonfinite, name=name)


def dequantize_blockwise(q: torch.Tensor, scale: torch.Tensor,
                         block_size: tuple[int, int] = BLOCK_SIZE,
                         dtype: torch.dtype = torch.bfloat16, *, name: str | None = None,
                         backend: str = "auto") -> torch.Tensor:
    """``w = q.float() * scale`` per block, cast to ``dtype``; ``q`` ``[M, N]`` fp8,
    ``scale`` ``[ceil(M/bm), ceil(N/bn)]`` -> ``[M, N]`` (``finefp8.quantization``)."""
    call = OpCall("dequantize_blockwise", _device(q, scale), _dtype(q),
                  codes=(q.dtype,) if _dtype(q) in FP8_DTYPES else (), out_dtype=dtype,
                  sizes=as_sizes(block_size))
    return _dispatch(call, backend, q, scale, block_size, dtype, name=name)


def quantize_groupwise(x: torch.Tensor, group_size: int = GROUP_SIZE, scale_fmt: str = "fp32",
                       *, fmt: FP8Format | str = E4M3, amax_floor: float = AMAX_FLOOR,
                       allow_nonfinite: bool = False, name: str | None = None,
                       backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token-group FP8 quantization; see ``finefp8.quantization.quantize_groupwise``.

    ``x`` ``[..., K]`` -> ``(q [..., K] fp8 of fmt, scale [..., ceil(K/g)] float32)``, one
    scale ``max(amax, amax_floor) / fmt.max`` per ``g`` consecutive channels of the last dim.
    """
    call = OpCall("quantize_groupwise", _device(x), _dtype(x), fmt=format_name(fmt),
                  scale_fmt=scale_fmt, sizes=(group_size,))
    return _dispatch(call, backend, x, group_size, scale_fmt, fmt=fmt, amax_floor=amax_floor,
                     allow_nonfinite=allow_nonfinite, name=name)


def dequantize_groupwise(q: torch.Tensor, scale: torch.Tensor, group_size: int = GROUP_SIZE,
                         dtype: torch.dtype = torch.bfloat16, *, name: str | None = None,
                         backend: str = "auto") -> torch.Tensor:
    """``x = q.float() * scale`` per group of the last dimension, cast to ``dtype``;
    ``q`` ``[..., K]``, ``scale`` ``[..., ceil(K/g)]`` (``finefp8.quantization``)."""
    call = OpCall("dequantize_groupwise", _device(q, scale), _dtype(q),
                  codes=(q.dtype,) if _dtype(q) in FP8_DTYPES else (), out_dtype=dtype,
                  sizes=(group_size,))
    return _dispatch(call, backend, q, scale, group_size, dtype, name=name)


def fake_quantize_groupwise(x: torch.Tensor, group_size: int = GROUP_SIZE,
                            scale_fmt: str = "fp32", *, fmt: FP8Format | str = E4M3,
                            amax_floor: float = AMAX_FLOOR, allow_nonfinite: bool = False,
                            name: str | None = None, backend: str = "auto") -> torch.Tensor:
    """``dequantize_groupwise(*quantize_groupwise(x))`` in ``x.dtype``: the values an FP8 GEMM
    sees, ``[..., K]`` -> ``[..., K]``. Its gradient is the straight-through estimator:
    ``dL/dx = dL/dout`` (rounding treated as the identity), on every backend."""
    call = OpCall("fake_quantize_groupwise", _device(x), _dtype(x), fmt=format_name(fmt),
                  scale_fmt=scale_fmt, sizes=(group_size,))
    return _dispatch(call, backend, x, group_size, scale_fmt, fmt=fmt, amax_floor=amax_floor,
                     allow_nonfinite=allow_nonfinite, name=name)


def fp8_gemm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
             out_dtype: torch.dtype = torch.bfloat16, promote_every: int | None = 128,
             accum_bits: int | None = None, *, block_size: int = 128, mma_k: int = _gemm.MMA_K,
             backend: str = "auto") -> torch.Tensor:
    """``C = (A * a_scale) @ (B * b_scale).T``; see ``finefp8.gemm.fp8_gemm``.

    ``a`` ``[M, K]`` fp8 with ``a_scale`` ``[M, ceil(K/bs)]`` (1 x ``block_size`` groups),
    ``b`` ``[N, K]`` fp8 with ``b_scale`` ``[ceil(N/bs), ceil(K/bs)]`` (square blocks) ->
    ``[M, N]`` of ``out_dtype``; fp32 promotion every ``promote_every`` elements of K;
    ``accum_bits``/``mma_k``: the reference's limited-precision accumulator emulator.
    GPU backends: ``"scaled_mm"`` and ``"triton"`` compute the same sum as the reference;
    ``"dequant"`` rounds both operands to bf16 and runs one bf16 GEMM (about 1e-3 relative).
    """
    gemm = None
    if all(isinstance(t, torch.Tensor) and t.dim() == 2 for t in (a, b)):
        gemm = GemmProblem(a.shape[0], b.shape[0], a.shape[1], a.dtype, b.dtype, out_dtype,
                           block_size)
    codes = tuple(t.dtype for t in (a, b) if _dtype(t) in FP8_DTYPES)
    call = OpCall("fp8_gemm", _device(a, a_scale, b, b_scale), _dtype(a), codes=codes,
                  out_dtype=out_dtype, sizes=(block_size,), accum_bits=accum_bits,
                  promote_every=promote_every, gemm=gemm)
    return _dispatch(call, backend, a, a_scale, b, b_scale, out_dtype, promote_every, accum_bits,
                     block_size=block_size, mma_k=mma_k)


def grouped_fp8_gemm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                     offsets: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16, *,
                     backend: str = "auto") -> torch.Tensor:
    """The experts' GEMM, rows sorted by expert; see ``finefp8.gemm.grouped_fp8_gemm``.

    ``a`` ``[M, K]`` fp8 with ``a_scale`` ``[M, ceil(K/128)]``, ``b`` ``[E, N, K]`` fp8 with
    ``b_scale`` ``[E, ceil(N/128), ceil(K/128)]``, ``offsets`` ``[E+1]`` int64 (expert ``e``
    owns rows ``offsets[e]:offsets[e+1]``, empty experts allowed) -> ``[M, N]`` of
    ``out_dtype``. ``"triton"`` runs every expert in one launch
    (``finefp8.kernels.triton_grouped_gemm``) with the reference's fp32 promotion per 128
    of K; ``"reference"`` loops over the non-empty experts. Both validate the operands.
    """
    codes = tuple(t.dtype for t in (a, b) if _dtype(t) in FP8_DTYPES)
    call = OpCall("grouped_fp8_gemm", _device(a, a_scale, b, b_scale), _dtype(a), codes=codes,
                  out_dtype=out_dtype, sizes=(128,), promote_every=128)
    return _dispatch(call, backend, a, a_scale, b, b_scale, offsets, out_dtype)


def weight_only_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                       bias: torch.Tensor | None = None, *,
                       block_size: tuple[int, int] = BLOCK_SIZE, backend: str = "auto") -> torch.Tensor:
    """``y = x @ (q * scale).T + bias``: a linear layer with a block-quantized weight.

    Shapes: ``x`` ``[..., K]``, ``q`` ``[N, K]`` fp8, ``scale`` ``[ceil(N/bm), ceil(K/bn)]``,
    ``bias`` ``[N]``; returns ``[..., N]`` in ``x.dtype``. The reference and Triton dequantize
    the weight to ``x.dtype`` and run ``F.linear``; the ``"cpu"`` backend reads the FP8 codes
    directly for up to 64 tokens (fp32 sums of exact products; the bf16 dot-product
    instructions where the CPU has them). Differentiable in ``x``, ``scale`` and ``bias``.
    """
    call = OpCall("weight_only_linear", _device(x, q), _dtype(x),
                  codes=(q.dtype,) if _dtype(q) in FP8_DTYPES else (),
                  sizes=as_sizes(block_size))
    return _dispatch(call, backend, x, q, scale, bias, block_size=block_size)


# ----------------------------------------------------------------------------- implementations


def _cpu_op(name: str) -> Callable:
    """``torch.ops.finefp8.<name>``, the CPU kernel registered as a PyTorch operator."""
    return _cpu_library.OPS[name]


def _cpu_quantize_blockwise(w, block_size, scale_fmt, *, fmt, amax_floor, allow_nonfinite, name):
    return _cpu_op("quantize_blockwise")(w, list(as_sizes(block_size)), scale_fmt, format_name(fmt),
                                         float(amax_floor), bool(allow_nonfinite), name)


def _cpu_quantize_groupwise(x, group_size, scale_fmt, *, fmt, amax_floor, allow_nonfinite, name):
    return _cpu_op("quantize_groupwise")(x, int(group_size), scale_fmt, format_name(fmt),
                                         float(amax_floor), bool(allow_nonfinite), name)


def _cpu_fake_quantize_groupwise(x, group_size, scale_fmt, *, fmt, amax_floor, allow_nonfinite,
                                 name):
    return _cpu_op("fake_quantize_groupwise")(x, int(group_size), scale_fmt, format_name(fmt),
                                              float(amax_floor), bool(allow_nonfinite), name)


def _cpu_dequantize_blockwise(q, scale, block_size, dtype, *, name):
    return _cpu_op("dequantize_blockwise")(q, scale, list(as_sizes(block_size)), dtype, name)


def _cpu_dequantize_groupwise(q, scale, group_size, dtype, *, name):
    return _cpu_op("dequantize_groupwise")(q, scale, int(group_size), dtype, name)


def _cpu_weight_only_linear(x, q, scale, bias, *, block_size):
    return _cpu_op("weight_only_linear")(x, q, scale, bias, list(as_sizes(block_size)))


def _cpu_fp8_gemm(a, a_scale, b, b_scale, out_dtype, promote_every, accum_bits, *, block_size,
                  mma_k):
    return _cpu_op("fp8_gemm")(a, a_scale, b, b_scale, out_dtype, promote_every, accum_bits,
                               int(block_size), int(mma_k))


class _StraightThrough(torch.autograd.Function):
    """``dequant(quant(x))`` forward, identity backward (the straight-through estimator)."""

    @staticmethod
    def forward(ctx, x, group_size, scale_fmt, fmt, amax_floor, allow_nonfinite, name):
        q, s = _q.quantize_groupwise(x, group_size, scale_fmt, fmt=fmt, amax_floor=amax_floor,
                                     allow_nonfinite=allow_nonfinite, name=name)
        return _q.dequantize_groupwise(q, s, group_size, x.dtype, name=name)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None, None, None, None, None


def _ref_fake_quantize_groupwise(x, group_size, scale_fmt, *, fmt, amax_floor, allow_nonfinite,
                                 name):
    _q.check_float_input(x, name, "activation")
    return _StraightThrough.apply(x, group_size, scale_fmt, fmt, amax_floor, allow_nonfinite, name)


def _ref_weight_only_linear(x, q, scale, bias, *, block_size):
    w = _q.dequantize_blockwise(q, scale, block_size, dtype=x.dtype)
    return F.linear(x, w, bias)


def _triton_quantize_groupwise(x, group_size, scale_fmt, **kwargs):
    from .kernels.triton_quant import act_quant

    return act_quant(x, group_size, scale_fmt, **kwargs)


def _triton_quantize_blockwise(w, block_size, scale_fmt, **kwargs):
    from .kernels.triton_quant import weight_quant

    return weight_quant(w, block_size, scale_fmt, **kwargs)


def _triton_dequantize_blockwise(q, scale, block_size, dtype, *, name):
    from .kernels.triton_quant import weight_dequant

    return weight_dequant(q, scale, block_size, dtype, name=name)


def _triton_weight_only_linear(x, q, scale, bias, *, block_size):
    from .kernels.triton_quant import weight_dequant

    return F.linear(x, weight_dequant(q, scale, block_size, dtype=x.dtype), bias)


def _triton_fp8_gemm(a, a_scale, b, b_scale, out_dtype, promote_every, accum_bits, *, block_size,
                     mma_k):
    from .kernels.triton_gemm import fp8_gemm as triton_fp8_gemm

    return triton_fp8_gemm(a, a_scale, b, b_scale, out_dtype, block_size=block_size)


def _triton_grouped_fp8_gemm(a, a_scale, b, b_scale, offsets, out_dtype):
    from .kernels.triton_grouped_gemm import grouped_fp8_gemm as triton_grouped_fp8_gemm

    return triton_grouped_fp8_gemm(a, a_scale, b, b_scale, offsets, out_dtype)


def _scaled_mm_fp8_gemm(a, a_scale, b, b_scale, out_dtype, promote_every, accum_bits, *,
                        block_size, mma_k):
    from .kernels.scaled_mm import fp8_gemm_scaled_mm

    return fp8_gemm_scaled_mm(a, a_scale, b, b_scale, out_dtype)


def _dequant_fp8_gemm(a, a_scale, b, b_scale, out_dtype, promote_every, accum_bits, *, block_size,
                      mma_k):
    """The ``"dequant"`` backend: ``C = bf16(A * sa) @ bf16(B * sb).T``, cast to ``out_dtype``.

    For GPUs without FP8 tensor cores: B goes through ``dequantize_blockwise`` (the Triton
    kernel where it runs), A through the reference; the GEMM accumulates in fp32 on the
    bf16 tensor cores. Each operand element is rounded to bf16 once (relative error
    <= 2**-9), so C differs from the reference by about 1e-3 relative.
    """
    _gemm.check_operands(a, a_scale, b, b_scale, block_size)
    a16 = _q.dequantize_groupwise(a, a_scale, block_size, torch.bfloat16)
    b16 = dequantize_blockwise(b, b_scale, (block_size, block_size), torch.bfloat16)
    return (a16 @ b16.T).to(out_dtype)


#: op -> backend -> implementation; every implementation of an op has the op's signature.
_IMPLEMENTATIONS: dict[str, dict[str, Callable]] = {
    "quantize_blockwise": {"reference": _q.quantize_blockwise, "cpu": _cpu_quantize_blockwise,
                           "triton": _triton_quantize_blockwise},
    "quantize_groupwise": {"reference": _q.quantize_groupwise, "cpu": _cpu_quantize_groupwise,
                           "triton": _triton_quantize_groupwise},
    "fake_quantize_groupwise": {"reference": _ref_fake_quantize_groupwise,
                                "cpu": _cpu_fake_quantize_groupwise},
    "dequantize_blockwise": {"reference": _q.dequantize_blockwise,
                             "cpu": _cpu_dequantize_blockwise,
                             "triton": _triton_dequantize_blockwise},
    "dequantize_groupwise": {"reference": _q.dequantize_groupwise,
                             "cpu": _cpu_dequantize_groupwise},
    "weight_only_linear": {"reference": _ref_weight_only_linear, "cpu": _cpu_weight_only_linear,
                           "triton": _triton_weight_only_linear},
    "fp8_gemm": {"reference": _gemm.fp8_gemm, "cpu": _cpu_fp8_gemm, "triton": _triton_fp8_gemm,
                 "scaled_mm": _scaled_mm_fp8_gemm, "dequant": _dequant_fp8_gemm},
    "grouped_fp8_gemm": {"reference": _gemm.grouped_fp8_gemm, "triton": _triton_grouped_fp8_gemm},
}
