"""``finefp8.ops.select_backend``: the documented order for CUDA tensors, and forced backends.

The CUDA decisions are checked on the CPU by replacing the capability checks of
``finefp8.kernels`` (what a given GPU would answer); nothing here launches a kernel.
"""

from __future__ import annotations

import pytest
import torch

import finefp8.kernels as K
from finefp8 import gemm as G
from finefp8 import ops
from finefp8 import quantization as Q

CUDA = torch.device("cuda")
GEMM = K.GemmProblem(64, 2112, 7168)
QUANT_OPS = ("quantize_groupwise", "quantize_blockwise", "dequantize_blockwise", "weight_only_linear")


def fake_gpu(monkeypatch, *, sm90_scaled_mm: bool, fp8: bool, triton: bool) -> None:
    """Make ``finefp8.kernels`` answer as a GPU with these properties would."""
    monkeypatch.setattr(K, "scaled_mm_blockwise_supported",
                        lambda device, problem=None: sm90_scaled_mm and problem is not None
                        and K.scaled_mm.scaled_mm_shape_limit(problem) is None)
    monkeypatch.setattr(K, "cuda_fp8_supported", lambda device: fp8)
    monkeypatch.setattr(K, "triton_available", lambda: triton)


def test_h200_prefers_scaled_mm_then_triton(monkeypatch):
    fake_gpu(monkeypatch, sm90_scaled_mm=True, fp8=True, triton=True)
    assert ops.select_backend("fp8_gemm", CUDA, gemm=GEMM) == "scaled_mm"
    # a shape cuBLAS's block scaling does not take (M=1, K=576) goes to Triton
    assert ops.select_backend("fp8_gemm", CUDA, gemm=K.GemmProblem(1, 576, 576)) == "triton"
    for op in QUANT_OPS:
        assert ops.select_backend(op, CUDA) == "triton"
    assert ops.select_backend("dequantize_groupwise", CUDA) == "reference"


def test_ada_or_hopper_without_block_scaling_uses_triton(monkeypatch):
    fake_gpu(monkeypatch, sm90_scaled_mm=False, fp8=True, triton=True)
    assert ops.select_backend("fp8_gemm", CUDA, gemm=GEMM) == "triton"


def test_gpu_without_fp8_dequantizes(monkeypatch):
    fake_gpu(monkeypatch, sm90_scaled_mm=False, fp8=False, triton=True)
    assert ops.select_backend("fp8_gemm", CUDA, gemm=GEMM) == "dequant"
    for op in QUANT_OPS:
        assert ops.select_backend(op, CUDA) == "reference"


def test_fp8_gpu_without_triton(monkeypatch):
    fake_gpu(monkeypatch, sm90_scaled_mm=False, fp8=True, triton=False)
    assert ops.select_backend("fp8_gemm", CUDA, gemm=GEMM) == "dequant"
    assert ops.select_backend("quantize_groupwise", CUDA) == "reference"


def test_a_limit_sends_auto_to_the_reference(monkeypatch):
    fake_gpu(monkeypatch, sm90_scaled_mm=True, fp8=True, triton=True)
    limit = K.gemm_limit(torch.float32, 128, 14, 128)
    assert "accum_bits" in limit
    assert ops.select_backend("fp8_gemm", CUDA, limit=limit, gemm=GEMM) == "reference"
    assert ops.select_backend("quantize_groupwise", CUDA, limit="group size") == "reference"


def test_forced_backends_are_checked(monkeypatch):
    fake_gpu(monkeypatch, sm90_scaled_mm=False, fp8=True, triton=True)
    assert ops.select_backend("fp8_gemm", CUDA, "reference") == "reference"
    assert ops.select_backend("fp8_gemm", CUDA, "dequant") == "dequant"
    with pytest.raises(ValueError, match="unknown backend 'cublas'"):
        ops.select_backend("fp8_gemm", CUDA, "cublas")
    with pytest.raises(ValueError, match="does not implement"):
        ops.select_backend("quantize_groupwise", CUDA, "dequant")
    with pytest.raises(ValueError, match="cannot run this call: accum_bits"):
        ops.select_backend("fp8_gemm", CUDA, "triton", limit=K.gemm_limit(torch.float32, 128, 14, 128))


def test_forced_scaled_mm_says_why_not():
    with pytest.raises(RuntimeError, match="backend 'scaled_mm' is unavailable: needs a CUDA device"):
        ops.select_backend("fp8_gemm", torch.device("cpu"), "scaled_mm", gemm=GEMM)


def test_kernel_limits():
    x = torch.zeros(2, 256)
    assert K.act_quant_limit(x, 128) is None
    assert "power of two" in K.act_quant_limit(x, 96)
    assert "E4M3" in K.act_quant_limit(x, 128, "e5m2")
    assert "dtype" in K.act_quant_limit(x.to(torch.int32), 128)
    assert K.weight_quant_limit(x, (128, 128)) is None
    assert "power of two" in K.weight_quant_limit(x, (128, 100))
    q = torch.zeros(2, 256, dtype=torch.float8_e4m3fn)
    assert K.weight_dequant_limit(q, (128, 128), torch.bfloat16) is None
    assert "output dtype" in K.weight_dequant_limit(q, (128, 128), torch.float64)
    assert "float8" in K.weight_dequant_limit(x, (128, 128), torch.bfloat16)
    assert K.gemm_limit(torch.bfloat16, 128, None, 128) is None
    assert "promote_every" in K.gemm_limit(torch.bfloat16, None, None, 128)
    assert ">= 16" in K.gemm_limit(torch.bfloat16, 8, None, 8)
    assert "different FP8" in K.gemm_limit(torch.bfloat16, 128, None, 128,
                                           torch.float8_e4m3fn, torch.float8_e5m2)


def test_dequant_backend_runs_anywhere_and_is_close():
    """The bf16 fallback on CPU tensors: within bf16 rounding of the reference."""
    g = torch.Generator().manual_seed(0)
    a, sa = Q.quantize_groupwise(torch.randn(8, 300, generator=g))
    b, sb = Q.quantize_blockwise(torch.randn(200, 300, generator=g))
    got = ops.fp8_gemm(a, sa, b, sb, torch.float32, backend="dequant")
    want = G.fp8_gemm(a, sa, b, sb, torch.float32)
    assert got.dtype == torch.float32
    assert float((got - want).norm() / want.norm()) < 1e-2
    assert not torch.equal(got, want)  # it really went through bf16


def test_accum_bits_on_auto_is_the_emulator():
    g = torch.Generator().manual_seed(1)
    a, sa = Q.quantize_groupwise(torch.randn(4, 256, generator=g))
    b, sb = Q.quantize_blockwise(torch.randn(32, 256, generator=g))
    got = ops.fp8_gemm(a, sa, b, sb, torch.float32, accum_bits=14)
    assert torch.equal(got, G.fp8_gemm(a, sa, b, sb, torch.float32, accum_bits=14))
