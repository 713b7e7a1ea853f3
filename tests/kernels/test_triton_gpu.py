"""The GPU kernels, compiled, on a CUDA device, against the CPU reference.

On a GPU the fp8 cast is the hardware's (``cvt.rn.satfinite``), so the quantization
kernels must match the reference code for code, with no allowance at all. The GEMMs
differ from the reference only by summation order, and on Hopper by the tensor cores'
reduced-precision accumulation inside one 128-element K block (docs/numerics.md: the
reason for promoting to fp32 every 128 elements), hence ``GEMM_REL`` below.

Skipped without CUDA (marker ``gpu``) and when ``TRITON_INTERPRET=1`` is set.
"""

from __future__ import annotations

import pytest
import torch

from finefp8 import gemm as G
from finefp8 import ops
from finefp8 import quantization as Q

pytest.importorskip("triton")

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("require_compiled_triton")]

GEMM_REL = 1e-3  # normwise; fp32 accumulation measures ~1e-7, a 14-bit accumulator per block ~1e-4
DEQUANT_REL = 1e-2  # the "dequant" backend rounds both operands to bf16


@pytest.fixture(scope="module")
def dev():
    from finefp8.kernels import cuda_fp8_supported

    d = torch.device("cuda")
    if not cuda_fp8_supported(d):
        pytest.skip("the FP8 kernels need compute capability >= 8.9")
    return d


def codes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


def activations(shape, seed: int) -> torch.Tensor:
    """Rows of magnitudes 1e-4..1e4 with values down to zero (subnormal codes included)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    return x * 10.0 ** torch.empty(*shape[:-1], 1).uniform_(-4, 4, generator=g)


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float().cpu() - want.float().cpu()).norm() / want.float().cpu().norm())


@pytest.mark.parametrize("shape", [(1, 200), (3, 5, 576), (17, 128 * 3 + 17), (4096, 7168)])
@pytest.mark.parametrize("scale_fmt", ["fp32", "ue8m0"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_act_quant_code_for_code(dev, shape, scale_fmt, dtype):
    from finefp8.kernels.triton_quant import act_quant

    x = activations(shape, seed=shape[-1]).to(dtype)
    if shape[-1] >= 256:
        x[..., 128:256] = 0.0  # an all-zero group: finite scale, zero codes
    q, s = act_quant(x.to(dev), 128, scale_fmt)
    want_q, want_s = Q.quantize_groupwise(x, 128, scale_fmt)
    assert torch.equal(s.cpu(), want_s)
    assert torch.equal(codes(q.cpu()), codes(want_q))


def test_act_quant_nonfinite(dev):
    from finefp8.kernels.triton_quant import act_quant

    x = activations((4, 300), seed=1)
    x[0, 5], x[1, 6], x[2, 7] = float("inf"), float("-inf"), float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        act_quant(x.to(dev))
    q, s = act_quant(x.to(dev), allow_nonfinite=True)
    want_q, want_s = Q.quantize_groupwise(x, allow_nonfinite=True)
    assert torch.equal(s.cpu(), want_s)
    got = q.cpu()
    assert torch.isnan(got[2, 7].float())
    got[2, 7], want_q[2, 7] = 0, 0
    assert torch.equal(codes(got), codes(want_q))


@pytest.mark.parametrize("shape", [(129, 257), (576, 1536), (7168, 2048), (1, 1)])
@pytest.mark.parametrize("scale_fmt", ["fp32", "ue8m0"])
def test_weight_quant_and_dequant_code_for_code(dev, shape, scale_fmt):
    from finefp8.kernels.triton_quant import weight_dequant, weight_quant

    w = torch.randn(shape, generator=torch.Generator().manual_seed(shape[0])).bfloat16()
    q, s = weight_quant(w.to(dev), (128, 128), scale_fmt)
    want_q, want_s = Q.quantize_blockwise(w, (128, 128), scale_fmt)
    assert torch.equal(s.cpu(), want_s)
    assert torch.equal(codes(q.cpu()), codes(want_q))
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        got = weight_dequant(q, s, (128, 128), dtype)
        assert torch.equal(got.cpu(), Q.dequantize_blockwise(want_q, want_s, (128, 128), dtype))


def gemm_operands(m, n, k, seed):
    g = torch.Generator().manual_seed(seed)
    a, sa = Q.quantize_groupwise(torch.randn(m, k, generator=g))
    b, sb = Q.quantize_blockwise(torch.randn(n, k, generator=g) * 0.05)
    return a, sa, b, sb


@pytest.mark.parametrize("m,n,k", [(1, 576, 200), (64, 2112, 7168), (130, 576, 1536), (4096, 4096, 512),
                                   (33, 7168, 128 * 5 + 3)])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_triton_fp8_gemm(dev, m, n, k, out_dtype):
    from finefp8.kernels.triton_gemm import fp8_gemm

    a, sa, b, sb = gemm_operands(m, n, k, seed=m + n)
    got = fp8_gemm(a.to(dev), sa.to(dev), b.to(dev), sb.to(dev), out_dtype)
    assert got.dtype == out_dtype and got.shape == (m, n)
    assert rel_err(got, G.fp8_gemm(a, sa, b, sb, torch.float32)) < GEMM_REL


def test_triton_fp8_gemm_split_k_config(dev):
    from finefp8.kernels.triton_gemm import fp8_gemm

    a, sa, b, sb = gemm_operands(16, 512, 1024, seed=3)
    cfg = {"BLOCK_M": 16, "BLOCK_N": 64, "SPLIT_K": 4, "GROUP_M": 8, "num_warps": 4, "num_stages": 3}
    got = fp8_gemm(a.to(dev), sa.to(dev), b.to(dev), sb.to(dev), torch.float32, config=cfg)
    assert rel_err(got, G.fp8_gemm(a, sa, b, sb, torch.float32)) < GEMM_REL


def test_scaled_mm_backend(dev):
    from finefp8.kernels import GemmProblem, scaled_mm_blockwise_limit

    why = scaled_mm_blockwise_limit(dev, GemmProblem(64, 2112, 7168))
    if why is not None:
        pytest.skip(f"torch._scaled_mm block-wise unavailable here: {why}")
    for m, n, k in [(64, 2112, 7168), (128, 4096, 512), (4096, 7168, 2048)]:
        a, sa, b, sb = gemm_operands(m, n, k, seed=k)
        assert ops.select_backend("fp8_gemm", dev, gemm=GemmProblem(m, n, k)) == "scaled_mm"
        got = ops.fp8_gemm(a.to(dev), sa.to(dev), b.to(dev), sb.to(dev), torch.float32)
        assert rel_err(got, G.fp8_gemm(a, sa, b, sb, torch.float32)) < GEMM_REL
    assert ops.select_backend("fp8_gemm", dev, gemm=GemmProblem(1, 576, 200)) == "triton"


def test_ops_auto_on_cuda_runs_the_kernels(dev):
    x = activations((3, 576), seed=9)
    q, s = ops.quantize_groupwise(x.to(dev))
    want_q, want_s = Q.quantize_groupwise(x)
    assert torch.equal(codes(q.cpu()), codes(want_q)) and torch.equal(s.cpu(), want_s)
    w = torch.randn(576, 1536)
    wq, ws = ops.quantize_blockwise(w.to(dev))
    assert torch.equal(codes(wq.cpu()), codes(Q.quantize_blockwise(w)[0]))
    y = ops.weight_only_linear(x.to(dev).bfloat16(), wq.t().contiguous(), ws.t().contiguous())
    w_back = Q.dequantize_blockwise(wq.cpu().t().contiguous(), ws.cpu().t().contiguous(), dtype=torch.float32)
    assert y.shape == (3, 1536) and rel_err(y, x.bfloat16().float() @ w_back.T) < DEQUANT_REL
    a, sa, b, sb = gemm_operands(7, 576, 1536, seed=4)
    got = ops.fp8_gemm(a.to(dev), sa.to(dev), b.to(dev), sb.to(dev), torch.float32)
    assert rel_err(got, G.fp8_gemm(a, sa, b, sb, torch.float32)) < GEMM_REL
    got = ops.fp8_gemm(a.to(dev), sa.to(dev), b.to(dev), sb.to(dev), torch.float32, backend="dequant")
    assert rel_err(got, G.fp8_gemm(a, sa, b, sb, torch.float32)) < DEQUANT_REL
