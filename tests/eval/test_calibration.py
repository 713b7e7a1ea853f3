"""Calibration: MSE block-scale search and GPTQ rounding keep the format and reduce error."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from finefp8 import quantize_blockwise
from finefp8.calibration import (
    block_squared_error,
    gptq_quantize,
    hessian_from_inputs,
    quantize_blockwise_mse,
)
from finefp8.quantization import dequantize_blockwise, quantize_with_block_scales


def _check_format(w, q, s, block=(128, 128)):
    m, n = w.shape
    assert q.dtype == torch.float8_e4m3fn and tuple(q.shape) == (m, n)
    assert s.dtype == torch.float32
    assert tuple(s.shape) == (-(-m // block[0]), -(-n // block[1]))
    assert torch.isfinite(q.float()).all() and (q.float().abs() <= 448).all()
    assert torch.isfinite(s).all() and (s > 0).all()


@settings(max_examples=10)
@given(st.integers(1, 300), st.integers(1, 300), st.integers(0, 2**31 - 1),
       st.sampled_from(["normal", "heavy", "lowrange"]))
def test_mse_never_increases_block_error(m, n, seed, kind):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=g)
    if kind == "heavy":
        w = w * torch.exp(2 * torch.randn(m, n, generator=g))
    elif kind == "lowrange":
        w = w * 1e-3
    q0, s0 = quantize_blockwise(w)
    q, s = quantize_blockwise_mse(w)
    _check_format(w, q, s)
    e0 = block_squared_error(w, q0, s0)
    e1 = block_squared_error(w, q, s)
    assert (e1 <= e0 * (1 + 1e-6) + 1e-30).all()
    # the codes are exactly what the chosen scales give: a standard reader reproduces them
    assert torch.equal(quantize_with_block_scales(w, s).view(torch.uint8), q.view(torch.uint8))


def test_mse_reduces_total_error_on_gaussian_weights():
    w = torch.randn(512, 640, generator=torch.Generator().manual_seed(0))
    q0, s0 = quantize_blockwise(w)
    q, s = quantize_blockwise_mse(w)
    assert block_squared_error(w, q, s).sum() < 0.995 * block_squared_error(w, q0, s0).sum()


def test_mse_zero_block_and_errors():
    w = torch.zeros(130, 130)
    w[:128, :128] = torch.randn(128, 128)
    q, s = quantize_blockwise_mse(w)
    _check_format(w, q, s)
    assert (q.float()[128:, :] == 0).all()
    with pytest.raises(ValueError, match="NaN"):
        quantize_blockwise_mse(torch.tensor([[float("nan"), 1.0]]))
    with pytest.raises(ValueError, match="2-D"):
        quantize_blockwise_mse(torch.ones(3))


def _correlated_inputs(t: int, k: int, seed: int) -> torch.Tensor:
    """``t`` samples of one fixed correlated distribution over ``k`` channels (``seed``: samples)."""
    g = torch.Generator().manual_seed(1234)
    mix = torch.randn(k, k, generator=g) / k**0.5
    scales = torch.exp(torch.randn(k, generator=g))
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(t, k, generator=g) @ mix) * scales + 0.5 * torch.randn(t, 1, generator=g)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("shape", [(256, 384), (200, 300)])
def test_gptq_reduces_layer_output_error(shape, act_order):
    m, n = shape
    g = torch.Generator().manual_seed(5)
    w = torch.randn(m, n, generator=g) * 0.05
    x_cal = _correlated_inputs(2048, n, 7)
    x_test = _correlated_inputs(1024, n, 8)  # fresh inputs from the same distribution
    h = hessian_from_inputs(x_cal)
    q0, s0 = quantize_blockwise(w)
    q, s = gptq_quantize(w, h, act_order=act_order)
    _check_format(w, q, s)
    assert torch.equal(s, s0)  # scales are kept: only the codes change
    y = x_test @ w.T
    err0 = ((x_test @ dequantize_blockwise(q0, s0, dtype=torch.float32).T - y) ** 2).sum()
    err1 = ((x_test @ dequantize_blockwise(q, s, dtype=torch.float32).T - y) ** 2).sum()
    assert err1 < 0.8 * err0


def test_gptq_keeps_given_scales_and_checks_shapes():
    w = torch.randn(130, 260)
    _, s = quantize_blockwise_mse(w)
    h = hessian_from_inputs(torch.randn(500, 260))
    q, s2 = gptq_quantize(w, h, s)
    assert torch.equal(s, s2)
    _check_format(w, q, s2)
    with pytest.raises(ValueError, match="Hessian"):
        gptq_quantize(w, torch.eye(100))
    with pytest.raises(ValueError, match="scale grid"):
        gptq_quantize(w, h, torch.ones(1, 1))


def test_gptq_dead_inputs_give_zero_codes():
    w = torch.randn(64, 128)
    x = torch.randn(400, 128)
    x[:, 5] = 0.0
    q, _ = gptq_quantize(w, hessian_from_inputs(x))
    assert (q.float()[:, 5] == 0).all()


def test_gptq_factor_shared_gives_same_codes():
    from finefp8.calibration import gptq_factor

    w = torch.randn(96, 256)
    h = hessian_from_inputs(_correlated_inputs(600, 256, 3))
    q1, _ = gptq_quantize(w, h)
    q2, _ = gptq_quantize(w, None, factor=gptq_factor(h))
    assert torch.equal(q1.view(torch.uint8), q2.view(torch.uint8))
    q3, _ = gptq_quantize(w, h, act_order=True)
    q4, _ = gptq_quantize(w, None, factor=gptq_factor(h, act_order=True))
    assert torch.equal(q3.view(torch.uint8), q4.view(torch.uint8))
