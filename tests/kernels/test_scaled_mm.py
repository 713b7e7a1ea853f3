"""The ``torch._scaled_mm`` backend's pure-Python parts, on the CPU.

The GEMM itself needs an sm_90 GPU (tests/kernels/test_triton_gpu.py). Here: the scale
layouts, checked against torch's own shape/stride rules through meta tensors (no data,
no GPU), the shape rules, and the capability decision on a machine without CUDA.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from finefp8.kernels.scaled_mm import (
    GemmProblem,
    fp8_gemm_scaled_mm,
    scaled_mm_blockwise_limit,
    scaled_mm_blockwise_supported,
    scaled_mm_scale_layouts,
    scaled_mm_shape_limit,
)

DEEPSEEK_NK = [(2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)]


def _grids(m: int, n: int, k: int, device="cpu"):
    kb = math.ceil(k / 128)
    return torch.rand(m, kb, device=device), torch.rand(math.ceil(n / 128), kb, device=device)


def test_layouts_are_the_ones_cublas_reads():
    m, n, k = 64, 300, 1024
    sa, sb = _grids(m, n, k)
    la, lb = scaled_mm_scale_layouts(sa, sb)
    assert la.shape == (m, 8) and la.stride() == (1, m)  # 1x128: M-major
    assert lb.shape == (8, 3) and lb.stride() == (1, 8)  # 128x128: transpose of a row-major grid
    assert torch.equal(la, sa) and torch.equal(lb, sb.t())
    assert la.dtype == lb.dtype == torch.float32
    la16, _ = scaled_mm_scale_layouts(sa.bfloat16(), sb)
    assert la16.dtype == torch.float32


@pytest.mark.parametrize("m", [64, 128, 4096])
@pytest.mark.parametrize("n,k", DEEPSEEK_NK)
def test_torch_scaled_mm_accepts_the_layouts_for_deepseek_shapes(m, n, k):
    """``torch._scaled_mm``'s meta function takes our operands as 1x128 x 128x128 scaling."""
    assert scaled_mm_shape_limit(GemmProblem(m, n, k)) is None
    a = torch.empty(m, k, dtype=torch.float8_e4m3fn, device="meta")
    b = torch.empty(n, k, dtype=torch.float8_e4m3fn, device="meta")
    sa, sb = scaled_mm_scale_layouts(*_grids(m, n, k, device="meta"))
    out = torch._scaled_mm(a, b.t(), sa, sb, out_dtype=torch.bfloat16)
    assert out.shape == (m, n) and out.dtype == torch.bfloat16


@pytest.mark.skipif(not hasattr(F, "scaled_mm"), reason="this torch has no torch.nn.functional.scaled_mm")
@pytest.mark.parametrize("m,n,k", [(64, 24576, 1536), (128, 7168, 2048), (4096, 4096, 7168)])
def test_functional_scaled_mm_checks_our_strides(m, n, k):
    """The newer API's meta function checks strides too; our layouts pass it when K % 512 == 0.

    (Its meta check floors N / 128, so only N multiples of 128 are asked here.)
    """
    a = torch.empty(m, k, dtype=torch.float8_e4m3fn, device="meta")
    b = torch.empty(n, k, dtype=torch.float8_e4m3fn, device="meta")
    sa, sb = scaled_mm_scale_layouts(*_grids(m, n, k, device="meta"))
    out = F.scaled_mm(a, b.t(), sa, F.ScalingType.BlockWise1x128, sb, F.ScalingType.BlockWise128x128,
                      output_dtype=torch.float32)
    assert out.shape == (m, n)
    with pytest.raises(RuntimeError, match="1x128"):  # an M-major scale_a is required
        F.scaled_mm(a, b.t(), sa.contiguous(), F.ScalingType.BlockWise1x128, sb,
                    F.ScalingType.BlockWise128x128, output_dtype=torch.float32)


@pytest.mark.parametrize("problem,needle", [
    (GemmProblem(1, 2112, 7168), "M=1"),
    (GemmProblem(63, 2112, 7168), "M=63"),
    (GemmProblem(64, 576, 1000), "K=1000"),
    (GemmProblem(64, 576, 576), "512"),
    (GemmProblem(64, 200, 512), "N=200"),
    (GemmProblem(64, 256, 512, block_size=64), "block size"),
    (GemmProblem(64, 256, 512, b_dtype=torch.float8_e5m2), "float8_e4m3fn"),
    (GemmProblem(64, 256, 512, out_dtype=torch.float8_e4m3fn), "out_dtype"),
])
def test_shape_limits(problem, needle):
    why = scaled_mm_shape_limit(problem)
    assert why is not None and needle in why


def test_not_supported_without_cuda():
    assert not scaled_mm_blockwise_supported("cpu")
    assert "CUDA device" in scaled_mm_blockwise_limit("cpu", GemmProblem(64, 256, 512))
    if not torch.cuda.is_available():
        assert not scaled_mm_blockwise_supported("cuda", GemmProblem(64, 256, 512))


def test_scaled_mm_checks_operands_first():
    a = torch.zeros(64, 512, dtype=torch.float8_e4m3fn)
    b = torch.zeros(256, 512, dtype=torch.float8_e4m3fn)
    sa, sb = _grids(64, 256, 512)
    with pytest.raises(ValueError, match="b_scale has shape"):
        fp8_gemm_scaled_mm(a, sa, b, sb[:1])
