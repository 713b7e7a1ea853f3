"""Fast CPU kernels: fused FP8 block/group quantization, dequantization, weight-only linear.

The kernels are the C file next to this module (``cpu_kernels.c``), compiled on first use
with the system C compiler (``$CC`` or ``cc``; ``-O3 -march=native``, so the compiler
vectorizes them for the machine at hand) into a per-user cache directory
(``$FINEFP8_CACHE_DIR``, else ``$XDG_CACHE_HOME/finefp8``, else ``~/.cache/finefp8``), and
called through ``ctypes`` on the tensors' memory. ``ctypes`` releases the GIL, so a call is
split over ``torch.get_num_threads()`` Python threads by rows or block rows.

Every function here has the signature and the results of its reference in
``finefp8.quantization`` (same codes, same scales, bit for bit) and falls back to that
reference for what the kernels do not cover: other formats than E4M3, float64 inputs,
non-CPU tensors, invalid arguments (so the reference's error messages are raised) and
inputs holding NaN or Inf (detected by the kernel's amax pass). If the C library cannot be
built, ``available()`` is False, one warning says why, and everything runs the reference.
Set ``FINEFP8_DISABLE_CPU_KERNELS=1`` to force that.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn.functional as F

from .. import gemm as _gemm
from .. import quantization as _q
from ..formats import E4M3, FP8Format, get_format
from ..quantization import AMAX_FLOOR, BLOCK_SIZE, GROUP_SIZE, SCALE_FMTS

__all__ = [
    "CPU_OPS",
    "available",
    "cast_e4m3",
    "library_path",
    "quantize_blockwise",
    "dequantize_blockwise",
    "quantize_groupwise",
    "dequantize_groupwise",
    "weight_only_linear",
    "fp8_gemm",
]

CPU_OPS = frozenset({
    "quantize_blockwise",
    "dequantize_blockwise",
    "quantize_groupwise",
    "dequantize_groupwise",
    "weight_only_linear",
    "fp8_gemm",
})
"""Ops of ``finefp8.ops`` that have a ``"cpu"`` backend here."""

_SOURCE = Path(__file__).with_name("cpu_kernels.c")
_ABI_VERSION = 5  # must equal ff8_abi_version() in cpu_kernels.c
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_MIN_WORK_PER_THREAD = 1 << 16  # elements; smaller calls run on the calling thread

_i64, _i32, _f32, _ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_void_p
_SIGNATURES = {
    "ff8_abi_version": (_i32, []),
    "ff8_cast_e4m3": (None, [_ptr, _ptr, _i64]),
    "ff8_advise_hugepages": (_i32, [_ptr, _i64]),
    "ff8_quant_block": (_i64, [_ptr, _i32, _i64, _i64, _i64, _i64, _i64, _i64, _f32, _i32,
                               _ptr, _ptr]),
    "ff8_quant_group": (_i64, [_ptr, _i32, _i64, _i64, _i64, _i64, _i64, _f32, _i32, _ptr, _ptr]),
    "ff8_dequant_block": (None, [_ptr, _ptr, _i64, _i64, _i64, _i64, _i64, _i64, _ptr, _i32]),
    "ff8_dequant_group": (None, [_ptr, _ptr, _i64, _i64, _i64, _i64, _i64, _ptr, _i32]),
    "ff8_linear_w8": (_i32, [_ptr, _i64, _i64, _ptr, _ptr, _i64, _i64, _i64, _i64, _i64, _i64,
                             _ptr]),
}
_FLAG_SETS = (
    ["-O3", "-march=native", "-fno-trapping-math", "-fPIC", "-shared"],
    ["-O3", "-fno-trapping-math", "-fPIC", "-shared"],
)


# ----------------------------------------------------------------------------- building


def _cache_dir() -> Path:
    if os.environ.get("FINEFP8_CACHE_DIR"):
        return Path(os.environ["FINEFP8_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "finefp8"


def _cpu_tag() -> str:
    """What ``-march=native`` depends on: the machine and its CPU feature flags."""
    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return f"{platform.machine()} {flags}"


def _compile(compiler: str, out: Path) -> str | None:
    """Compile ``cpu_kernels.c`` into the shared library ``out``; the error text or None."""
    errors = []
    for flags in _FLAG_SETS:
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
        os.close(fd)
        cmd = [compiler, *flags, "-o", tmp, str(_SOURCE), "-lm"]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.SubprocessError) as e:
            res = None
            errors.append(f"{' '.join(cmd)}: {e}")
        if res is not None and res.returncode == 0:
            os.replace(tmp, out)  # atomic: a concurrent process sees a whole library or none
            return None
        if res is not None:
            errors.append(f"{' '.join(cmd)}: {res.stderr.strip()[-300:]}")
        Path(tmp).unlink(missing_ok=True)
    return "; ".join(errors)


def _load() -> tuple[ctypes.CDLL | None, str]:
    """Build (once per source/compiler/CPU) and load the library: ``(lib, path)`` or ``(None, why)``."""
    if os.environ.get("FINEFP8_DISABLE_CPU_KERNELS", "") not in ("", "0"):
        return None, "disabled by FINEFP8_DISABLE_CPU_KERNELS"
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        return None, "no C compiler found (set CC or install gcc)"
    key = hashlib.sha256(_SOURCE.read_bytes() + compiler.encode() + _cpu_tag().encode()
                         + repr(_FLAG_SETS).encode())
    path = _cache_dir() / f"finefp8_cpu_{key.hexdigest()[:16]}.so"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            err = _compile(compiler, path)
            if err is not None:
                return None, f"compiling {_SOURCE.name} failed: {err}"
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        return None, f"loading the kernel library failed: {e}"
    try:
        for fname, (restype, argtypes) in _SIGNATURES.items():
            fn = getattr(lib, fname)
            fn.restype, fn.argtypes = restype, argtypes
    except AttributeError as e:
        return None, f"{path} lacks a kernel: {e}"
    if lib.ff8_abi_version() != _ABI_VERSION:
        return None, f"{path} has ABI {lib.ff8_abi_version()}, expected {_ABI_VERSION}"
    return lib, str(path)


@functools.cache
def _built() -> tuple[ctypes.CDLL | None, str]:
    """``_load()`` once per process; warns (one line) when the kernels are unavailable."""
    lib, info = _load()
    if lib is None:
        warnings.warn(f"finefp8: fast CPU kernels unavailable ({info}); using the pure-torch "
                      f"reference", RuntimeWarning, stacklevel=4)
    return lib, info


def _library() -> ctypes.CDLL | None:
    return _built()[0]


def available() -> bool:
    """True when the compiled CPU kernels can be used (builds them on the first call)."""
    return _library() is not None


def library_path() -> str | None:
    """Path of the loaded kernel library, or None when unavailable."""
    lib, info = _built()
    return info if lib is not None else None


# ----------------------------------------------------------------------------- threading


@functools.cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1),
                              thread_name_prefix="finefp8-cpu")


def _parallel(fn: Callable[[int, int], object], n_items: int, work_per_item: int) -> list:
    """Run ``fn(begin, end)`` over ``range(n_items)`` split in contiguous parts, in threads.

    The number of parts is ``torch.get_num_threads()``, fewer for small jobs. Returns the
    results of the parts in order.
    """
    parts = min(torch.get_num_threads(), n_items,
                max(1, (n_items * work_per_item) // _MIN_WORK_PER_THREAD))
    if parts <= 1:
        return [fn(0, n_items)]
    bounds = [n_items * i // parts for i in range(parts + 1)]
    futures = [_pool().submit(fn, bounds[i], bounds[i + 1]) for i in range(parts)]
    return [f.result() for f in futures]


# ----------------------------------------------------------------------------- helpers


def _is_e4m3(fmt: FP8Format | str) -> bool:
    try:
        return get_format(fmt) is E4M3
    except ValueError:
        return False


def _fast_float(x: object) -> bool:
    """A CPU tensor of a dtype the kernels read (float32, bfloat16, float16), non-empty."""
    return (isinstance(x, torch.Tensor) and x.device.type == "cpu" and x.dtype in _DTYPE_CODES
            and x.numel() > 0)


def _positive_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _ptr_of(t: torch.Tensor) -> int:
    return t.data_ptr()


_HUGE_OUTPUT_BYTES = 1 << 23


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
        _library().ff8_advise_hugepages(out.data_ptr(), nbytes)
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


def _into(out: tuple[torch.Tensor, torch.Tensor] | None,
          compute: Callable[[], tuple[torch.Tensor, torch.Tensor]]) -> Callable[[], tuple]:
    """``compute`` (the reference path), its result also copied into ``out`` when given."""
    def run() -> tuple[torch.Tensor, torch.Tensor]:
        q, scale = compute()
        if out is None:
            return q, scale
        q_out, s_out = _outputs(out, tuple(q.shape), tuple(scale.shape))
        q_out.copy_(q.view(torch.uint8))
        s_out.copy_(scale)
        return q_out.view(q.dtype), s_out
    return run


# ----------------------------------------------------------------------------- quantization


def cast_e4m3(x: torch.Tensor) -> torch.Tensor:
    """The kernels' fp32 -> E4M3 cast on its own: ``uint8`` codes of ``x`` (float32, any shape).

    Round to nearest even, saturating to +-448, NaN -> ``0x7F | sign``: the codes of
    ``finefp8.formats.encode(x, E4M3, saturate=True)``. Needs ``available()``.
    """
    lib = _library()
    if lib is None:
        raise RuntimeError("cast_e4m3 needs the compiled CPU kernels (see available())")
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32 or x.device.type != "cpu":
        raise TypeError("cast_e4m3 expects a float32 CPU tensor")
    src = x.detach().contiguous()
    out = _empty(tuple(x.shape), torch.uint8)
    lib.ff8_cast_e4m3(_ptr_of(src), _ptr_of(out), src.numel())
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
    scale_inv [ceil(M/bm), ceil(N/bn)] float32)``, identical to the reference's.
    ``out``: optional preallocated ``(q, scale_inv)`` to write into (see ``_outputs``).
    """
    lib = _library()
    ref = _into(out, functools.partial(_q.quantize_blockwise, w, block_size, scale_fmt, fmt=fmt,
                                       amax_floor=amax_floor, allow_nonfinite=allow_nonfinite,
                                       name=name))
    if (lib is None or not _fast_float(w) or w.dim() != 2 or not _is_e4m3(fmt)
            or scale_fmt not in SCALE_FMTS or len(tuple(block_size)) != 2
            or not all(_positive_int(b) for b in block_size)):
        return ref()
    x = w.detach().contiguous()
    (m, n), (bm, bn) = x.shape, tuple(block_size)
    gm, gn = math.ceil(m / bm), math.ceil(n / bn)
    q, scale = _outputs(out, (m, n), (gm, gn))
    dt, ue8m0 = _DTYPE_CODES[x.dtype], int(scale_fmt == "ue8m0")

    def part(b0: int, b1: int) -> int:
        return lib.ff8_quant_block(_ptr_of(x), dt, m, n, bm, bn, b0, b1, amax_floor, ue8m0,
                                   _ptr_of(q), _ptr_of(scale))

    if any(bad != 0 for bad in _parallel(part, gm, bm * n)):
        return ref()  # NaN/Inf (or no scratch memory): the reference raises or handles it
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
    lib = _library()
    ref = _into(out, functools.partial(_q.quantize_groupwise, x, group_size, scale_fmt, fmt=fmt,
                                       amax_floor=amax_floor, allow_nonfinite=allow_nonfinite,
                                       name=name))
    if (lib is None or not _fast_float(x) or x.dim() < 1 or not _is_e4m3(fmt)
            or scale_fmt not in SCALE_FMTS or not _positive_int(group_size)):
        return ref()
    k = x.shape[-1]
    t = x.numel() // k
    src = x.detach().contiguous()
    gk = math.ceil(k / group_size)
    q, scale = _outputs(out, tuple(x.shape), (*x.shape[:-1], gk))
    dt, ue8m0 = _DTYPE_CODES[x.dtype], int(scale_fmt == "ue8m0")

    def part(t0: int, t1: int) -> int:
        return lib.ff8_quant_group(_ptr_of(src), dt, t, k, group_size, t0, t1, amax_floor, ue8m0,
                                   _ptr_of(q), _ptr_of(scale))

    if any(bad != 0 for bad in _parallel(part, t, k)):
        return ref()
    return q.view(torch.float8_e4m3fn), scale


# ----------------------------------------------------------------------------- dequantization


def _out_code(dtype: torch.dtype) -> tuple[torch.dtype, int] | None:
    """(dtype the kernel writes, its code); float64 is written as float32 and widened."""
    if dtype in _DTYPE_CODES:
        return dtype, _DTYPE_CODES[dtype]
    if dtype == torch.float64:
        return torch.float32, 0
    return None


def dequantize_blockwise(
    q: torch.Tensor,
    scale_inv: torch.Tensor,
    block_size: tuple[int, int] = BLOCK_SIZE,
    dtype: torch.dtype = torch.bfloat16,
    *,
    name: str | None = None,
) -> torch.Tensor:
    """``finefp8.quantization.dequantize_blockwise``: ``dtype(q.float() * scale_inv)`` per block."""
    lib = _library()
    ref = functools.partial(_q.dequantize_blockwise, q, scale_inv, block_size, dtype, name=name)
    out = _out_code(dtype)
    if (lib is None or not isinstance(q, torch.Tensor) or q.dtype != torch.float8_e4m3fn
            or q.device.type != "cpu" or q.dim() != 2 or q.numel() == 0 or out is None
            or not isinstance(scale_inv, torch.Tensor) or not scale_inv.is_floating_point()
            or scale_inv.device.type != "cpu" or len(tuple(block_size)) != 2
            or not all(_positive_int(b) for b in block_size)):
        return ref()
    (m, n), (bm, bn) = q.shape, tuple(block_size)
    gm, gn = math.ceil(m / bm), math.ceil(n / bn)
    if tuple(scale_inv.shape) != (gm, gn):
        return ref()  # raises the reference's shape error
    codes = q.detach().contiguous().view(torch.uint8)
    s = scale_inv.detach().float().contiguous()
    out_dtype, code = out
    res = _empty((m, n), out_dtype)
    _parallel(lambda b0, b1: lib.ff8_dequant_block(_ptr_of(codes), _ptr_of(s), m, n, bm, bn, b0,
                                                   b1, _ptr_of(res), code), gm, bm * n)
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
    lib = _library()
    ref = functools.partial(_q.dequantize_groupwise, q, scale, group_size, dtype, name=name)
    out = _out_code(dtype)
    if (lib is None or not isinstance(q, torch.Tensor) or q.dtype != torch.float8_e4m3fn
            or q.device.type != "cpu" or q.dim() < 1 or q.numel() == 0 or out is None
            or not isinstance(scale, torch.Tensor) or not scale.is_floating_point()
            or scale.device.type != "cpu" or not _positive_int(group_size)):
        return ref()
    k = q.shape[-1]
    t = q.numel() // k
    gk = math.ceil(k / group_size)
    if tuple(scale.shape) != (*q.shape[:-1], gk):
        return ref()
    codes = q.detach().contiguous().view(torch.uint8)
    s = scale.detach().float().contiguous()
    out_dtype, code = out
    res = _empty(tuple(q.shape), out_dtype)
    _parallel(lambda t0, t1: lib.ff8_dequant_group(_ptr_of(codes), _ptr_of(s), t, k, group_size,
                                                   t0, t1, _ptr_of(res), code), t, k)
    return res.to(dtype)


# ----------------------------------------------------------------------------- linear

FUSED_LINEAR_MAX_TOKENS = 64
"""Up to this many tokens ``weight_only_linear`` runs the fused kernel (it reads one byte per
weight); above, it dequantizes the weight with the fast kernel and calls ``F.linear``."""


def weight_only_linear(x: torch.Tensor, q: torch.Tensor, scale_inv: torch.Tensor,
                       bias: torch.Tensor | None = None, *,
                       block_size: tuple[int, int] = BLOCK_SIZE) -> torch.Tensor:
    """``y = x @ (q * scale_inv).T + bias`` with an E4M3 block-quantized weight, on the CPU.

    Shapes: ``x`` ``[..., K]`` float32/bfloat16/float16, ``q`` ``[N, K]`` float8_e4m3fn,
    ``scale_inv`` ``[ceil(N/bm), ceil(K/bn)]``, ``bias`` ``[N]``; returns ``[..., N]`` in
    ``x.dtype``. For at most ``FUSED_LINEAR_MAX_TOKENS`` tokens the fused kernel computes
    ``sum_blocks scale * (x_block . decode(q_block))`` in fp32 straight from the codes (the
    weight is never materialized; for bf16 inputs this is more accurate than the reference,
    which rounds the dequantized weight to bf16 first); otherwise the weight is dequantized
    to ``x.dtype`` and multiplied by ``F.linear``, as the reference does.
    """
    lib = _library()
    if (lib is None or not _fast_float(x) or not isinstance(q, torch.Tensor)
            or q.dtype != torch.float8_e4m3fn or q.device.type != "cpu" or q.dim() != 2
            or x.shape[-1] != q.shape[1] or q.numel() == 0
            or not isinstance(scale_inv, torch.Tensor) or scale_inv.device.type != "cpu"
            or len(tuple(block_size)) != 2 or not all(_positive_int(b) for b in block_size)
            or tuple(scale_inv.shape) != _q.block_grid(tuple(q.shape), tuple(block_size))):
        w = _q.dequantize_blockwise(q, scale_inv, block_size, dtype=x.dtype)
        return F.linear(x, w, bias)
    (n, k), (bm, bn) = q.shape, tuple(block_size)
    t = x.numel() // k
    if t > FUSED_LINEAR_MAX_TOKENS:
        w = dequantize_blockwise(q, scale_inv, block_size, dtype=x.dtype)
        return F.linear(x, w, bias)
    gk = math.ceil(k / bn)
    bnp = -(-bn // 8) * 8
    xp = torch.zeros((t, gk, bnp), dtype=torch.float32)
    xs = x.detach().reshape(t, k).float()
    full = (k // bn) * bn
    xp[:, : k // bn, :bn] = xs[:, :full].view(t, k // bn, bn)
    if full < k:
        xp[:, -1, : k - full] = xs[:, full:]
    codes = q.detach().contiguous().view(torch.uint8)
    s = scale_inv.detach().float().contiguous()
    y = torch.empty((t, n), dtype=torch.float32)

    def part(n0: int, n1: int) -> int:
        return lib.ff8_linear_w8(_ptr_of(xp), t, k, _ptr_of(codes), _ptr_of(s), n, bm, bn, bnp,
                                 n0, n1, _ptr_of(y))

    if any(rc != 0 for rc in _parallel(part, n, k * max(t, 1))):
        raise MemoryError("weight_only_linear: the CPU kernel could not allocate scratch memory")
    y = y.view(*x.shape[:-1], n)
    if bias is not None:
        y = y + bias.float()
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
    ``out_dtype``. The activations are dequantized to fp32 (``a * sa``, one rounding per
    element) and multiplied by ``weight_only_linear`` with the block-quantized ``b``: the
    same sum as the reference's per-block promotion, within fp32 rounding. The accumulation
    emulator (``accum_bits``), other promotion intervals and E5M2 operands run the reference.
    """
    def ref() -> torch.Tensor:
        return _gemm.fp8_gemm(a, a_scale, b, b_scale, out_dtype, promote_every, accum_bits,
                              block_size=block_size, mma_k=mma_k)

    operands = (a, a_scale, b, b_scale)
    if (_library() is None or accum_bits is not None or promote_every != block_size
            or not _positive_int(block_size)
            or not all(isinstance(t, torch.Tensor) and t.device.type == "cpu" for t in operands)
            or a.dtype != torch.float8_e4m3fn or b.dtype != torch.float8_e4m3fn
            or a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1] or a.numel() == 0
            or b.numel() == 0 or not a_scale.is_floating_point() or not b_scale.is_floating_point()):
        return ref()
    (m, k), n = a.shape, b.shape[0]
    kb = math.ceil(k / block_size)
    if tuple(a_scale.shape) != (m, kb) or tuple(b_scale.shape) != (math.ceil(n / block_size), kb):
        return ref()  # raises the reference's shape error
    x = dequantize_groupwise(a, a_scale, block_size, torch.float32)
    y = weight_only_linear(x, b, b_scale, block_size=(block_size, block_size))
    return y.to(out_dtype)
