"""What each backend can run: one capability table per backend, and the one check that reads it.

A backend (``"reference"``, ``"cpu"``, ``"triton"``, ``"scaled_mm"``, ``"dequant"``) is a
``Backend``: for every op it implements, an ``OpSupport`` row says which input dtypes,
FP8 code formats, scale formats, output dtypes, block/group sizes and devices its kernel
takes; ``runtime_limit`` adds what only this process can tell (did the C library build, is
Triton installed, is the GPU sm_90). A call is described by an ``OpCall`` (built by
``finefp8.ops`` from the actual arguments) and ``Backend.limit(call)`` returns ``None`` when
the backend can run it, else one sentence saying why not.

The same answer is used twice: by ``finefp8.ops.select_backend`` (``"auto"`` takes the first
backend without a limit; a forced backend with a limit raises that sentence) and by each
kernel's own guard (``finefp8.kernels.cpu`` and ``finefp8.kernels.triton_quant`` raise it
when called directly on an input they cannot take), so the two can never disagree.

Adding an op: add its ``OpSupport`` row to the backends that implement it (below) and its
implementations to ``finefp8.ops._IMPLEMENTATIONS``. Adding a backend: a ``Backend`` here,
listed in ``BACKEND_TABLE`` and in ``AUTO_ORDER`` for the devices where ``"auto"`` may pick it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import torch

from ..formats import FP8_DTYPES, get_format
from ..quantization import FLOAT_INPUT_DTYPES, SCALE_FMTS
from .scaled_mm import GemmProblem

__all__ = [
    "OpCall",
    "OpSupport",
    "Backend",
    "OPS",
    "KERNEL_OUT_DTYPES",
    "REFERENCE",
    "CPU",
    "TRITON",
    "SCALED_MM",
    "DEQUANT",
    "BACKEND_TABLE",
    "AUTO_ORDER",
    "format_name",
    "as_sizes",
]

#: Every op of ``finefp8.ops`` that dispatches through the tables.
OPS = ("quantize_blockwise", "dequantize_blockwise", "quantize_groupwise", "dequantize_groupwise",
       "fake_quantize_groupwise", "fp8_gemm", "grouped_fp8_gemm", "weight_only_linear")

#: Output dtypes the GPU kernels write.
KERNEL_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_C_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_ALL_OUT = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_E4M3_DTYPE = (torch.float8_e4m3fn,)


def as_sizes(block_size: object) -> tuple:
    """A block size ``(bm, bn)`` or group size ``g`` as a tuple, for ``OpCall.sizes``."""
    try:
        return tuple(block_size)
    except TypeError:
        return (block_size,)


def format_name(fmt: object) -> str:
    """The code format's name (``"e4m3"``, ``"e5m2"``) of an ``FP8Format``, a name or an FP8 dtype;
    the ``repr`` of anything else (so a limit can say what it got)."""
    if isinstance(fmt, torch.dtype):
        return {torch.float8_e4m3fn: "e4m3", torch.float8_e5m2: "e5m2"}.get(fmt, str(fmt))
    try:
        return get_format(fmt).name
    except (ValueError, TypeError):
        return repr(fmt)


@dataclass(frozen=True)
class OpCall:
    """What a backend choice needs to know about one call of an op.

    ``dtype``: the main input's dtype (the float input of a quantizer, the FP8 codes of a
    dequantizer or GEMM operand A, the activations of ``weight_only_linear``); ``codes``: the
    FP8 dtype of every code operand (e.g. ``(a.dtype, b.dtype)`` of a GEMM); ``fmt``: the code
    format a quantizer writes; ``sizes``: the block or group sizes; ``out_dtype``: the result
    dtype; ``accum_bits``/``promote_every``: the GEMM's accumulation; ``gemm``: its problem
    shape. ``None`` means "not given / not applicable" and is not checked.
    """

    op: str
    device: torch.device
    dtype: torch.dtype | None = None
    codes: tuple[torch.dtype, ...] = ()
    fmt: str | None = None
    scale_fmt: str | None = None
    sizes: tuple[int, ...] = ()
    out_dtype: torch.dtype | None = None
    accum_bits: int | None = None
    promote_every: int | None = None
    gemm: GemmProblem | None = None


def _is_pos_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _is_pow2(v: object) -> bool:
    return _is_pos_int(v) and (v & (v - 1)) == 0


def _names(dtypes: tuple[torch.dtype, ...]) -> str:
    return "/".join(str(d).replace("torch.", "") for d in dtypes)


@dataclass(frozen=True)
class OpSupport:
    """What one backend's kernel for one op takes (every field is checked by ``Backend.limit``).

    ``sizes``: ``"any"`` (positive integers), ``"pow2"`` (powers of two) or ``"pow2>=16"``.
    ``out_dtypes=None``: the op has no separate output dtype (the result has the input's).
    ``gemm_promotion``: the kernel promotes to fp32 once per scale block, so
    ``promote_every`` must equal the block size and ``accum_bits`` must be ``None``.
    ``same_codes``: all code operands must share one FP8 dtype.
    """

    dtypes: tuple[torch.dtype, ...]
    devices: tuple[str, ...]
    formats: tuple[str, ...] = ("e4m3", "e5m2")
    scale_fmts: tuple[str, ...] = SCALE_FMTS
    out_dtypes: tuple[torch.dtype, ...] | None = None
    sizes: str = "any"
    gemm_promotion: bool = False
    same_codes: bool = False

    def limit(self, call: OpCall) -> str | None:
        """Why this kernel cannot run ``call``, or ``None`` if it can."""
        if call.device.type not in self.devices:
            return f"tensors are on {call.device}; it runs on {'/'.join(self.devices)}"
        if call.dtype is not None and call.dtype not in self.dtypes:
            return f"input dtype {call.dtype} is not {_names(self.dtypes)}"
        for code in call.codes:
            if format_name(code) not in self.formats:
                return f"{code} codes: it reads {'/'.join(self.formats).upper()} codes only"
        if self.same_codes and len(set(call.codes)) > 1:
            return f"operands of different FP8 dtypes ({', '.join(str(c) for c in call.codes)})"
        if call.fmt is not None and call.fmt not in self.formats:
            return f"it writes {'/'.join(self.formats).upper()} codes only, not {call.fmt!r}"
        if call.scale_fmt is not None and call.scale_fmt not in self.scale_fmts:
            return f"scale format {call.scale_fmt!r} is not one of {self.scale_fmts}"
        if self.out_dtypes is not None and call.out_dtype is not None \
                and call.out_dtype not in self.out_dtypes:
            return f"output dtype {call.out_dtype} is not {_names(self.out_dtypes)}"
        why = self._sizes_limit(call.sizes)
        if why is not None:
            return why
        if self.gemm_promotion:
            if call.accum_bits is not None:
                return "accum_bits (the accumulator emulator) runs only on the reference backend"
            block = call.sizes[0] if call.sizes else None
            if block is not None and call.promote_every != block:
                return f"promote_every={call.promote_every!r} differs from block_size={block}"
        return None

    def _sizes_limit(self, sizes: tuple[int, ...]) -> str | None:
        if self.sizes == "any":
            bad = [s for s in sizes if not _is_pos_int(s)]
            return f"block/group size {bad[0]!r} is not a positive integer" if bad else None
        bad = [s for s in sizes if not _is_pow2(s) or (self.sizes == "pow2>=16" and s < 16)]
        if bad:
            rule = "a power of two >= 16" if self.sizes == "pow2>=16" else "a power of two"
            return f"block/group size {bad[0]!r} is not {rule}"
        return None


def _always(call: OpCall) -> str | None:
    return None


@dataclass(frozen=True)
class Backend:
    """One backend: its name, its capability table (op -> ``OpSupport``) and a runtime check.

    ``runtime_limit(call)`` says why the backend cannot run here and now (its library did not
    build, Triton is missing, the GPU lacks a feature, a shape the vendor GEMM rejects), or
    ``None``; it is consulted only after the table accepts the call.
    """

    name: str
    ops: Mapping[str, OpSupport]
    runtime_limit: Callable[[OpCall], str | None] = field(default=_always, compare=False)

    def table_limit(self, call: OpCall) -> str | None:
        """Why this backend's capability table excludes ``call``, or ``None`` if it covers it."""
        support = self.ops.get(call.op)
        if support is None:
            return (f"backend {self.name!r} does not implement {call.op} (it runs "
                    f"{', '.join(sorted(self.ops))})")
        return support.limit(call)

    def limit(self, call: OpCall) -> str | None:
        """Why this backend cannot run ``call`` (its table, then ``runtime_limit``), or ``None``."""
        why = self.table_limit(call)
        return why if why is not None else self.runtime_limit(call)

    def check(self, call: OpCall, what: str = "") -> None:
        """Raise when this backend cannot run ``call``, naming the backend, the op and the reason.

        ``ValueError`` when its table excludes the call (``"... cannot run this call: ..."``),
        ``RuntimeError`` when it cannot run here at all (``"... is unavailable: ..."``).
        """
        where = f" ({what})" if what else ""
        why = self.table_limit(call)
        if why is not None:
            raise ValueError(f"{call.op}{where}: backend {self.name!r} cannot run this call: {why}")
        why = self.runtime_limit(call)
        if why is not None:
            raise RuntimeError(f"{call.op}{where}: backend {self.name!r} is unavailable: {why}")


def _table(rows: dict[str, OpSupport]) -> Mapping[str, OpSupport]:
    return MappingProxyType(dict(rows))


# ----------------------------------------------------------------------------- runtime checks


def _cpu_runtime(call: OpCall) -> str | None:
    from . import cpu_build

    if cpu_build.available():
        return None
    return (f"its C kernels did not build ({cpu_build.unavailable_reason()}); "
            f"use backend='reference'")


def _triton_runtime(call: OpCall) -> str | None:
    from . import cuda_fp8_supported, interpreter_enabled, triton_available

    if not triton_available():
        return "Triton is not installed (pip install triton)"
    if call.device.type == "cuda" and cuda_fp8_supported(call.device):
        return None
    if call.device.type != "cuda" and interpreter_enabled():
        return None
    return (f"tensors are on {call.device}: it needs a CUDA GPU of compute capability >= 8.9, "
            f"or TRITON_INTERPRET=1 to interpret the kernels on the CPU")


def _scaled_mm_runtime(call: OpCall) -> str | None:
    from . import scaled_mm_blockwise_limit, scaled_mm_blockwise_supported

    if scaled_mm_blockwise_supported(call.device, call.gemm):
        return None
    return (scaled_mm_blockwise_limit(call.device, call.gemm)
            or "torch._scaled_mm block-wise scaling is not supported for this problem")


# ----------------------------------------------------------------------------- the tables

_ANY = ("cpu", "cuda")

#: The pure-torch code of ``finefp8.quantization`` / ``finefp8.gemm``: everything, anywhere.
REFERENCE = Backend("reference", _table({
    "quantize_blockwise": OpSupport(FLOAT_INPUT_DTYPES, _ANY + ("meta",)),
    "quantize_groupwise": OpSupport(FLOAT_INPUT_DTYPES, _ANY + ("meta",)),
    "fake_quantize_groupwise": OpSupport(FLOAT_INPUT_DTYPES, _ANY + ("meta",)),
    "dequantize_blockwise": OpSupport(FP8_DTYPES, _ANY + ("meta",), out_dtypes=_ALL_OUT),
    "dequantize_groupwise": OpSupport(FP8_DTYPES, _ANY + ("meta",), out_dtypes=_ALL_OUT),
    "weight_only_linear": OpSupport(FLOAT_INPUT_DTYPES, _ANY + ("meta",)),
    "fp8_gemm": OpSupport(FP8_DTYPES, _ANY + ("meta",), out_dtypes=_ALL_OUT),
    "grouped_fp8_gemm": OpSupport(FP8_DTYPES, _ANY, out_dtypes=_ALL_OUT),
}))

#: The compiled C kernels (``finefp8.kernels.cpu``): E4M3 codes, fp32/bf16/fp16 inputs.
CPU = Backend("cpu", _table({
    "quantize_blockwise": OpSupport(_C_FLOATS, ("cpu",), formats=("e4m3",)),
    "quantize_groupwise": OpSupport(_C_FLOATS, ("cpu",), formats=("e4m3",)),
    "fake_quantize_groupwise": OpSupport(_C_FLOATS, ("cpu",), formats=("e4m3",)),
    "dequantize_blockwise": OpSupport(_E4M3_DTYPE, ("cpu",), formats=("e4m3",),
                                      out_dtypes=_ALL_OUT),
    "dequantize_groupwise": OpSupport(_E4M3_DTYPE, ("cpu",), formats=("e4m3",),
                                      out_dtypes=_ALL_OUT),
    "weight_only_linear": OpSupport(_C_FLOATS, ("cpu",), formats=("e4m3",)),
    "fp8_gemm": OpSupport(_E4M3_DTYPE, ("cpu",), formats=("e4m3",), out_dtypes=_ALL_OUT,
                          gemm_promotion=True),
}), _cpu_runtime)

#: The Triton kernels (``triton_quant``, ``triton_gemm``): CUDA cc >= 8.9, or the interpreter.
TRITON = Backend("triton", _table({
    "quantize_groupwise": OpSupport(FLOAT_INPUT_DTYPES, _ANY, formats=("e4m3",), sizes="pow2"),
    "quantize_blockwise": OpSupport(FLOAT_INPUT_DTYPES, _ANY, formats=("e4m3",), sizes="pow2"),
    "dequantize_blockwise": OpSupport(FP8_DTYPES, _ANY, out_dtypes=KERNEL_OUT_DTYPES,
                                      sizes="pow2"),
    "weight_only_linear": OpSupport(KERNEL_OUT_DTYPES, _ANY, sizes="pow2"),
    "fp8_gemm": OpSupport(FP8_DTYPES, _ANY, out_dtypes=KERNEL_OUT_DTYPES, sizes="pow2>=16",
                          gemm_promotion=True, same_codes=True),
    "grouped_fp8_gemm": OpSupport(FP8_DTYPES, _ANY, out_dtypes=KERNEL_OUT_DTYPES,
                                  sizes="pow2>=16", gemm_promotion=True, same_codes=True),
}), _triton_runtime)

#: ``torch._scaled_mm`` with block-wise scales (cuBLAS, sm_90): the GEMM only.
SCALED_MM = Backend("scaled_mm", _table({
    "fp8_gemm": OpSupport(_E4M3_DTYPE, _ANY, formats=("e4m3",), out_dtypes=KERNEL_OUT_DTYPES,
                          sizes="pow2>=16", gemm_promotion=True, same_codes=True),
}), _scaled_mm_runtime)

#: Both GEMM operands dequantized to bf16, one bf16 GEMM: GPUs without FP8 tensor cores.
DEQUANT = Backend("dequant", _table({
    "fp8_gemm": OpSupport(FP8_DTYPES, _ANY, out_dtypes=_ALL_OUT, sizes="pow2>=16",
                          gemm_promotion=True),
}))

BACKEND_TABLE: Mapping[str, Backend] = MappingProxyType(
    {b.name: b for b in (REFERENCE, CPU, TRITON, SCALED_MM, DEQUANT)})

#: The order ``backend="auto"`` tries on each device type (the first without a limit wins).
AUTO_ORDER: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "cuda": ("scaled_mm", "triton", "dequant", "reference"),
    "cpu": ("cpu", "reference"),
})
