"""The public ops: one function per op, each picking a backend for its inputs' device.

Backends, in the order ``backend="auto"`` tries them:

* CUDA tensors: the GPU kernels of ``finefp8.kernels``: ``torch._scaled_mm`` block-wise
  (``"scaled_mm"``, fp8_gemm on Hopper), the Triton kernels (``"triton"``, cc >= 8.9), or on
  GPUs without FP8 weight dequantization + a bf16 GEMM (``"dequant"``); see ``select_backend``.
* CPU tensors: the compiled CPU kernels of ``finefp8.kernels.cpu`` (backend ``"cpu"``) for
  the ops they cover (``finefp8.kernels.cpu.CPU_OPS``) when they build on this machine, else
  the pure-torch reference of ``finefp8.quantization`` / ``finefp8.gemm`` (``"reference"``).

Every op takes ``backend=`` to force one; an unavailable forced backend is an error.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import gemm as _gemm
from . import kernels as _kernels
from . import quantization as _q
from .kernels import cpu as _cpu
from .quantization import BLOCK_SIZE, GROUP_SIZE

__all__ = [
    "BACKENDS",
    "select_backend",
    "quantize_blockwise",
    "dequantize_blockwise",
    "quantize_groupwise",
    "dequantize_groupwise",
    "fp8_gemm",
    "grouped_fp8_gemm",
    "weight_only_linear",
]

BACKENDS = ("auto", "reference", "cpu", "triton", "scaled_mm", "dequant")

#: The ops each GPU backend implements.
GPU_BACKEND_OPS = {
    "triton": frozenset({"quantize_groupwise", "quantize_blockwise", "dequantize_blockwise",
                         "fp8_gemm", "grouped_fp8_gemm", "weight_only_linear"}),
    "scaled_mm": frozenset({"fp8_gemm"}),
    "dequant": frozenset({"fp8_gemm"}),
}


def select_backend(op: str, device: torch.device, backend: str = "auto", *, limit: str | None = None,
                   gemm: _kernels.GemmProblem | None = None) -> str:
    """Name of the backend that runs ``op`` for tensors on ``device``.

    ``backend="auto"`` takes the first that applies:

    1. CUDA, ``fp8_gemm``: ``"scaled_mm"`` when the GPU is sm_90 and ``torch._scaled_mm``
       takes block-wise 1x128 / 128x128 scales for this problem
       (``finefp8.kernels.scaled_mm_blockwise_supported(device, gemm)``);
    2. CUDA with FP8 (compute capability >= 8.9) and Triton installed: ``"triton"``;
    3. CUDA without them: ``fp8_gemm`` -> ``"dequant"`` (both operands dequantized to
       bf16, one bf16 GEMM); the other ops -> ``"reference"`` (the torch code, on the GPU);
    4. CPU: ``"cpu"`` for the ops the compiled CPU kernels cover, else ``"reference"``.

    ``limit`` (from ``finefp8.kernels.*_limit``) says why the GPU kernels cannot take this
    particular call (e.g. ``accum_bits`` set, a group size that is not a power of two):
    ``"auto"`` then picks ``"reference"`` on CUDA. Any other ``backend`` forces that backend
    after checking it can run here; if not, the error says why. ``backend="triton"`` runs
    on CPU tensors too when ``TRITON_INTERPRET=1`` (Triton's interpreter).
    """
    if backend not in BACKENDS:
        raise ValueError(f"{op}: unknown backend {backend!r}; expected one of {BACKENDS}")
    device = torch.device(device)
    if backend == "cpu":
        _check_cpu_backend(op, device)
    if backend in GPU_BACKEND_OPS:
        _check_gpu_backend(op, device, backend, limit, gemm)
    if backend != "auto":
        return backend
    if device.type == "cuda":
        return _auto_cuda_backend(op, device, limit, gemm)
    if device.type == "cpu" and op in _cpu.CPU_OPS and _cpu.available():
        return "cpu"
    return "reference"


def _auto_cuda_backend(op: str, device: torch.device, limit: str | None,
                       gemm: _kernels.GemmProblem | None) -> str:
    """Steps 1-3 of ``select_backend``'s order, for a CUDA device."""
    if limit is not None or op not in GPU_BACKEND_OPS["triton"]:
        return "reference"
    if op == "fp8_gemm" and gemm is not None and _kernels.scaled_mm_blockwise_supported(device, gemm):
        return "scaled_mm"
    if _kernels.cuda_fp8_supported(device) and _kernels.triton_available():
        return "triton"
    return "dequant" if op == "fp8_gemm" else "reference"


def _check_gpu_backend(op: str, device: torch.device, backend: str, limit: str | None,
                       gemm: _kernels.GemmProblem | None) -> None:
    """Raise unless the forced GPU ``backend`` can run ``op`` on ``device`` for this call."""
    if op not in GPU_BACKEND_OPS[backend]:
        raise ValueError(f"{op}: backend {backend!r} does not implement it (it runs "
                         f"{', '.join(sorted(GPU_BACKEND_OPS[backend]))}); use 'auto' or 'reference'")
    if limit is not None:
        raise ValueError(f"{op}: backend {backend!r} cannot run this call: {limit}")
    if backend == "triton" and not _kernels.triton_runs_on(device):
        why = ("Triton is not installed (pip install triton)" if not _kernels.triton_available() else
               f"tensors are on {device}: it needs a CUDA GPU of compute capability >= 8.9, "
               f"or TRITON_INTERPRET=1 to interpret the kernels on the CPU")
        raise RuntimeError(f"{op}: backend 'triton' is unavailable: {why}")
    if backend == "scaled_mm":
        why = _kernels.scaled_mm_blockwise_limit(device, gemm)
        if why is not None:
            raise RuntimeError(f"{op}: backend 'scaled_mm' is unavailable: {why}")


def _check_cpu_backend(op: str, device: torch.device) -> None:
    """Raise unless the ``"cpu"`` backend can run ``op`` on ``device``."""
    if device.type != "cpu":
        raise ValueError(f"{op}: backend 'cpu' needs CPU tensors, got {device}")
    if op not in _cpu.CPU_OPS:
        raise ValueError(f"{op}: backend 'cpu' does not implement it; use 'reference'")
    if not _cpu.available():
        raise RuntimeError(f"{op}: backend 'cpu' is unavailable (its C kernels did not build; "
                           f"see the warning above); use backend='reference'")


def quantize_blockwise(w: torch.Tensor, block_size: tuple[int, int] = BLOCK_SIZE,
                       scale_fmt: str = "fp32", *, backend: str = "auto", **kwargs):
    """``finefp8.quantization.quantize_blockwise`` on the selected backend."""
    limit = _kernels.weight_quant_limit(w, block_size, kwargs.get("fmt", "e4m3"))
    chosen = select_backend("quantize_blockwise", w.device, backend, limit=limit)
    if chosen == "cpu":
        return _cpu.quantize_blockwise(w, block_size, scale_fmt, **kwargs)
    if chosen == "triton":
        from .kernels.triton_quant import weight_quant

        return weight_quant(w, block_size, scale_fmt, **kwargs)
    return _q.quantize_blockwise(w, block_size, scale_fmt, **kwargs)


def dequantize_blockwise(q: torch.Tensor, scale_inv: torch.Tensor,
                         block_size: tuple[int, int] = BLOCK_SIZE,
                         dtype: torch.dtype = torch.bfloat16, *, backend: str = "auto", **kwargs):
    """``finefp8.quantization.dequantize_blockwise`` on the selected backend."""
    limit = _kernels.weight_dequant_limit(q, block_size, dtype)
    chosen = select_backend("dequantize_blockwise", q.device, backend, limit=limit)
    if chosen == "cpu":
        return _cpu.dequantize_blockwise(q, scale_inv, block_size, dtype, **kwargs)
    if chosen == "triton":
        from .kernels.triton_quant import weight_dequant

        return weight_dequant(q, scale_inv, block_size, dtype, **kwargs)
    return _q.dequantize_blockwise(q, scale_inv, block_size, dtype, **kwargs)


def quantize_groupwise(x: torch.Tensor, group_size: int = GROUP_SIZE, scale_fmt: str = "fp32",
                       *, backend: str = "auto", **kwargs):
    """``finefp8.quantization.quantize_groupwise`` on the selected backend."""
    limit = _kernels.act_quant_limit(x, group_size, kwargs.get("fmt", "e4m3"))
    chosen = select_backend("quantize_groupwise", x.device, backend, limit=limit)
    if chosen == "cpu":
        return _cpu.quantize_groupwise(x, group_size, scale_fmt, **kwargs)
    if chosen == "triton":
        from .kernels.triton_quant import act_quant

        return act_quant(x, group_size, scale_fmt, **kwargs)
    return _q.quantize_groupwise(x, group_size, scale_fmt, **kwargs)


def dequantize_groupwise(q: torch.Tensor, scale: torch.Tensor, group_size: int = GROUP_SIZE,
                         dtype: torch.dtype = torch.bfloat16, *, backend: str = "auto", **kwargs):
    """``finefp8.quantization.dequantize_groupwise`` on the selected backend."""
    if select_backend("dequantize_groupwise", q.device, backend) == "cpu":
        return _cpu.dequantize_groupwise(q, scale, group_size, dtype, **kwargs)
    return _q.dequantize_groupwise(q, scale, group_size, dtype, **kwargs)


def fp8_gemm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
             out_dtype: torch.dtype = torch.bfloat16, promote_every: int | None = 128,
             accum_bits: int | None = None, *, backend: str = "auto", **kwargs):
    """``finefp8.gemm.fp8_gemm`` on the selected backend (the emulator always runs the reference).

    GPU backends: ``"scaled_mm"`` and ``"triton"`` compute the same sum as the reference
    (fp32 promotion per 128 of K); ``"dequant"`` rounds both operands to bf16 and runs one
    bf16 GEMM (about 1e-3 relative difference), for GPUs without FP8 tensor cores.
    """
    block = kwargs.get("block_size", 128)
    limit = _kernels.gemm_limit(out_dtype, promote_every, accum_bits, block,
                                getattr(a, "dtype", None), getattr(b, "dtype", None))
    gemm = None
    if isinstance(b, torch.Tensor) and a.dim() == 2 and b.dim() == 2:
        gemm = _kernels.GemmProblem(a.shape[0], b.shape[0], a.shape[1], a.dtype, b.dtype, out_dtype, block)
    chosen = select_backend("fp8_gemm", a.device, backend, limit=limit, gemm=gemm)
    if chosen == "cpu":
        return _cpu.fp8_gemm(a, a_scale, b, b_scale, out_dtype, promote_every, accum_bits, **kwargs)
    if chosen == "scaled_mm":
        from .kernels.scaled_mm import fp8_gemm_scaled_mm

        return fp8_gemm_scaled_mm(a, a_scale, b, b_scale, out_dtype)
    if chosen == "triton":
        from .kernels.triton_gemm import fp8_gemm as triton_fp8_gemm

        return triton_fp8_gemm(a, a_scale, b, b_scale, out_dtype, block_size=block)
    if chosen == "dequant":
        return _dequant_gemm(a, a_scale, b, b_scale, out_dtype, block)
    return _gemm.fp8_gemm(a, a_scale, b, b_scale, out_dtype, promote_every, accum_bits, **kwargs)


def grouped_fp8_gemm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                     offsets: torch.Tensor, out_dtype: torch.dtype = torch.bfloat16, *,
                     backend: str = "auto") -> torch.Tensor:
    """``finefp8.gemm.grouped_fp8_gemm`` (experts' GEMM, rows sorted by expert) on the selected backend.

    Shapes: ``a`` ``[M, K]`` fp8, ``a_scale`` ``[M, ceil(K/128)]``, ``b`` ``[E, N, K]`` fp8,
    ``b_scale`` ``[E, ceil(N/128), ceil(K/128)]``, ``offsets`` ``[E+1]`` int64 (expert ``e``
    owns rows ``offsets[e]:offsets[e+1]``); returns ``[M, N]`` of ``out_dtype``. ``"triton"``
    runs every expert in one launch (``finefp8.kernels.triton_grouped_gemm``) with the
    reference's fp32 promotion per 128 of K; elsewhere the reference loops over the
    non-empty experts.
    """
    _gemm.check_grouped_operands(a, a_scale, b, b_scale, offsets)
    limit = _kernels.gemm_limit(out_dtype, 128, None, 128, a.dtype, b.dtype)
    chosen = select_backend("grouped_fp8_gemm", a.device, backend, limit=limit)
    if chosen == "triton":
        from .kernels.triton_grouped_gemm import grouped_fp8_gemm as triton_grouped_fp8_gemm

        return triton_grouped_fp8_gemm(a, a_scale, b, b_scale, offsets, out_dtype)
    return _gemm.grouped_fp8_gemm(a, a_scale, b, b_scale, offsets, out_dtype)


def _dequant_gemm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
                  out_dtype: torch.dtype, block: int) -> torch.Tensor:
    """The ``"dequant"`` backend: ``C = bf16(A * sa) @ bf16(B * sb).T``, cast to ``out_dtype``.

    For GPUs without FP8 tensor cores: B goes through ``dequantize_blockwise`` (the Triton
    kernel where it runs), A through the reference; the GEMM accumulates in fp32 on the
    bf16 tensor cores. Each operand element is rounded to bf16 once (relative error
    <= 2**-9), so C differs from the reference by about 1e-3 relative.
    """
    _gemm._check_operands(a, a_scale, b, b_scale, block)
    a16 = _q.dequantize_groupwise(a, a_scale, block, torch.bfloat16)
    b16 = dequantize_blockwise(b, b_scale, (block, block), torch.bfloat16)
    return (a16 @ b16.T).to(out_dtype)


def weight_only_linear(x: torch.Tensor, q: torch.Tensor, scale_inv: torch.Tensor,
                       bias: torch.Tensor | None = None, *,
                       block_size: tuple[int, int] = BLOCK_SIZE, backend: str = "auto") -> torch.Tensor:
    """``y = x @ (q * scale_inv).T + bias``: a linear layer with a block-quantized weight.

    Shapes: ``x`` ``[..., K]``, ``q`` ``[N, K]`` fp8, ``scale_inv`` ``[ceil(N/bm), ceil(K/bn)]``,
    ``bias`` ``[N]``; returns ``[..., N]`` in ``x.dtype``. The weight is dequantized to
    ``x.dtype`` and multiplied with an ordinary GEMM; the ``"cpu"`` backend instead reads the
    FP8 codes directly for up to 64 tokens (fp32 accumulation, one byte read per weight, see
    ``finefp8.kernels.cpu.weight_only_linear``).
    """
    limit = _kernels.weight_dequant_limit(q, block_size, x.dtype)
    chosen = select_backend("weight_only_linear", x.device, backend, limit=limit)
    if chosen == "cpu":
        return _cpu.weight_only_linear(x, q, scale_inv, bias, block_size=block_size)
    if chosen == "triton":
        from .kernels.triton_quant import weight_dequant

        w = weight_dequant(q, scale_inv, block_size, dtype=x.dtype)
    else:
        w = _q.dequantize_blockwise(q, scale_inv, block_size, dtype=x.dtype)
    return F.linear(x, w, bias)
