"""``finefp8.ops``: explicit signatures, one capability table per backend, and forced backends
that refuse, with the reason, every input class they cannot run."""

from __future__ import annotations

import inspect

import pytest
import torch

from finefp8 import ops
from finefp8 import quantization as Q
from finefp8.kernels import capabilities as C
from finefp8.kernels import cpu

PUBLIC_OPS = ("quantize_blockwise", "dequantize_blockwise", "quantize_groupwise",
              "dequantize_groupwise", "fake_quantize_groupwise", "fp8_gemm", "weight_only_linear")
needs_cpu_kernels = pytest.mark.skipif(not cpu.available(), reason="the CPU kernels did not build")


@pytest.mark.parametrize("name", PUBLIC_OPS)
def test_public_ops_show_every_parameter(name):
    sig = inspect.signature(getattr(ops, name))
    kinds = {p.kind for p in sig.parameters.values()}
    assert inspect.Parameter.VAR_KEYWORD not in kinds and inspect.Parameter.VAR_POSITIONAL not in kinds
    assert sig.parameters["backend"].kind is inspect.Parameter.KEYWORD_ONLY
    if name.startswith(("quantize", "fake_quantize")):
        for p in ("fmt", "amax_floor", "allow_nonfinite", "name"):
            assert sig.parameters[p].kind is inspect.Parameter.KEYWORD_ONLY, p


def test_help_of_quantize_blockwise_lists_its_parameters():
    text = inspect.signature(ops.quantize_blockwise).__str__()
    for p in ("block_size", "scale_fmt", "fmt", "amax_floor", "allow_nonfinite", "name", "backend"):
        assert p in text


def test_positional_parameters_kept():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(130, 200, generator=g)
    q, s = ops.quantize_blockwise(w, (64, 64), "ue8m0")
    assert s.shape == (3, 4) and bool((torch.log2(s) == torch.log2(s).round()).all())
    back = ops.dequantize_blockwise(q, s, (64, 64), torch.float32)
    assert back.dtype == torch.float32 and back.shape == w.shape


def test_every_table_entry_has_an_implementation_and_back():
    for backend in C.BACKEND_TABLE.values():
        for op in backend.ops:
            assert op in C.OPS
            assert backend.name in ops._IMPLEMENTATIONS[op], (backend.name, op)
    for op, impls in ops._IMPLEMENTATIONS.items():
        for name in impls:
            assert op in C.BACKEND_TABLE[name].ops, (name, op)
    assert set(ops.BACKENDS) == {"auto", *C.BACKEND_TABLE}


# ----------------------------------------------------------------------------- forced backends

W64 = torch.randn(130, 260, dtype=torch.float64)
W32 = W64.float()
Q4, S4 = Q.quantize_blockwise(W32)
Q5 = Q4.float().to(torch.float8_e5m2)
XA, XS = Q.quantize_groupwise(torch.randn(4, 260))

#: (backend, call, what the error says): each input class a backend's table excludes.
REFUSALS = [
    ("cpu", lambda: ops.quantize_blockwise(W64, backend="cpu"), "float64"),
    ("cpu", lambda: ops.quantize_groupwise(W64, backend="cpu"), "float64"),
    ("cpu", lambda: ops.fake_quantize_groupwise(W64, backend="cpu"), "float64"),
    ("cpu", lambda: ops.quantize_blockwise(W32, fmt="e5m2", backend="cpu"), "E4M3 codes only"),
    ("cpu", lambda: ops.quantize_groupwise(W32, fmt="e5m2", backend="cpu"), "E4M3 codes only"),
    ("cpu", lambda: ops.dequantize_blockwise(Q5, S4, backend="cpu"), "float8_e5m2"),
    ("cpu", lambda: ops.dequantize_groupwise(Q5, torch.ones(130, 3), backend="cpu"), "float8_e5m2"),
    ("cpu", lambda: ops.weight_only_linear(torch.randn(2, 260), Q5, S4, backend="cpu"), "E4M3"),
    ("cpu", lambda: ops.weight_only_linear(torch.randn(2, 260, dtype=torch.float64), Q4, S4,
                                           backend="cpu"), "float64"),
    ("cpu", lambda: ops.fp8_gemm(XA, XS, Q5, S4, backend="cpu"), "E4M3"),
    ("cpu", lambda: ops.fp8_gemm(XA, XS, Q4, S4, accum_bits=14, backend="cpu"), "accum_bits"),
    ("cpu", lambda: ops.fp8_gemm(XA, XS, Q4, S4, promote_every=64, backend="cpu"),
     "promote_every"),
    ("triton", lambda: ops.quantize_groupwise(W32, 96, backend="triton"), "power of two"),
    ("triton", lambda: ops.quantize_blockwise(W32, (128, 100), backend="triton"), "power of two"),
    ("triton", lambda: ops.quantize_blockwise(W32, fmt="e5m2", backend="triton"), "E4M3"),
    ("triton", lambda: ops.dequantize_blockwise(Q4, S4, dtype=torch.float64, backend="triton"),
     "output dtype"),
    ("triton", lambda: ops.dequantize_groupwise(XA, XS, backend="triton"), "does not implement"),
    ("triton", lambda: ops.weight_only_linear(torch.randn(2, 260, dtype=torch.float64), Q4, S4,
                                              backend="triton"), "float64"),
    ("triton", lambda: ops.fp8_gemm(XA, XS, Q5, S4, backend="triton"), "different FP8"),
    ("triton", lambda: ops.fp8_gemm(XA, XS, Q4, S4, accum_bits=14, backend="triton"),
     "accum_bits"),
    ("scaled_mm", lambda: ops.quantize_blockwise(W32, backend="scaled_mm"), "does not implement"),
    ("scaled_mm", lambda: ops.fp8_gemm(XA, XS, Q5, S4, backend="scaled_mm"), "E4M3"),
    ("scaled_mm", lambda: ops.fp8_gemm(XA, XS, Q4, S4, accum_bits=14, backend="scaled_mm"),
     "accum_bits"),
    ("dequant", lambda: ops.quantize_groupwise(W32, backend="dequant"), "does not implement"),
    ("dequant", lambda: ops.fp8_gemm(XA, XS, Q4, S4, promote_every=None, backend="dequant"),
     "promote_every"),
    ("reference", lambda: ops.quantize_blockwise(W32, backend="cublas"), "unknown backend"),
]


@pytest.mark.parametrize("backend,call,says", REFUSALS,
                         ids=[f"{b}-{i}" for i, (b, _, _) in enumerate(REFUSALS)])
def test_forced_backend_refuses_with_the_reason(backend, call, says):
    if backend == "cpu" and not cpu.available():
        pytest.skip("the CPU kernels did not build")
    with pytest.raises(ValueError, match=says) as err:
        call()
    if "unknown" not in says:
        assert f"backend '{backend}' cannot run this call" in str(err.value)


def test_forced_gpu_backends_are_unavailable_on_cpu_tensors(monkeypatch):
    """Inputs they do take, but on the CPU without a GPU (Triton without its interpreter)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="backend 'scaled_mm' is unavailable: needs a CUDA"):
        ops.fp8_gemm(XA, XS, Q4, S4, backend="scaled_mm")
    with pytest.raises(RuntimeError, match="backend 'triton' is unavailable"):
        ops.quantize_groupwise(W32, backend="triton")


@needs_cpu_kernels
def test_auto_sends_what_cpu_cannot_run_to_the_reference():
    dev = torch.device("cpu")
    cases = [
        C.OpCall("quantize_blockwise", dev, torch.float64, fmt="e4m3", sizes=(128, 128)),
        C.OpCall("quantize_groupwise", dev, torch.float32, fmt="e5m2", sizes=(128,)),
        C.OpCall("dequantize_blockwise", dev, torch.float8_e5m2, codes=(torch.float8_e5m2,)),
        C.OpCall("fp8_gemm", dev, torch.float8_e4m3fn, codes=(torch.float8_e4m3fn,) * 2,
                 sizes=(128,), accum_bits=14, promote_every=128),
    ]
    for call in cases:
        assert ops.select_backend(call.op, dev, call=call) == "reference", call
    assert ops.select_backend("quantize_blockwise", dev, call=C.OpCall(
        "quantize_blockwise", dev, torch.bfloat16, fmt="e4m3", sizes=(128, 128))) == "cpu"


def test_auto_results_for_reference_only_inputs_are_correct():
    """float64 and E5M2 through "auto": the codes decode to w / scale rounded to the format."""
    q, s = ops.quantize_blockwise(W64, fmt="e5m2")
    assert q.dtype == torch.float8_e5m2
    full = s.double().repeat_interleave(128, 0)[:130].repeat_interleave(128, 1)[:, :260]
    ratio = W64 / full
    # E5M2 has 2 mantissa bits: every code is within half a step (2**-3 relative) of w / s
    assert bool(((q.double() - ratio).abs() <= 2.0**-3 * ratio.abs() + 2.0**-17).all())
