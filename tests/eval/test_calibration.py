"""Calibration: MSE block-scale search and GPTQ rounding keep the format and reduce error."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from finefp8 import quantize_blockwise
from finefp8.calibration import (
    attention_hessian_sums,
    block_squared_error,
    float_target_weight,
    gptq_factor,
    gptq_quantize,
    gptq_quantize_rows,
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


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_keeps_a_zero_block_zero_and_still_lowers_the_error(act_order):
    """A 128x128 block that is all zero in the weight (pruned) keeps zero codes and its floor
    scale; GPTQ pushes the other columns' error into those columns, which the floor scale
    could only show as codes saturated at +-448. The rest still beats plain rounding on fresh
    inputs."""
    m, n = 256, 384
    w = torch.randn(m, n, generator=torch.Generator().manual_seed(2)) * 0.05
    w[:128, 128:256] = 0.0
    h = hessian_from_inputs(_correlated_inputs(2048, n, 7))
    q0, s0 = quantize_blockwise(w)
    q, s = gptq_quantize(w, h, act_order=act_order)
    assert torch.equal(s, s0) and s[0, 1] < 1e-12
    assert (q.float()[:128, 128:256] == 0).all()
    assert (q.float()[:128, :128] != q0.float()[:128, :128]).any()  # GPTQ moved the others
    x = _correlated_inputs(1024, n, 8)
    y = x @ w.T
    err0 = ((x @ dequantize_blockwise(q0, s0, dtype=torch.float32).T - y) ** 2).sum()
    err1 = ((x @ dequantize_blockwise(q, s, dtype=torch.float32).T - y) ** 2).sum()
    assert err1 < 0.8 * err0


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


def _inputs(t: int, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float-model inputs ``x_f`` and a perturbed copy ``x_q`` (a systematic error, a gain on
    some channels, plus noise), as the quantized model's inputs differ from the float one's."""
    g = torch.Generator().manual_seed(seed)
    xf = torch.randn(t, n, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3, n,
                                                                               dtype=torch.float64)
    gain = 1 + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)
    xq = xf * gain + 0.05 * torch.randn(t, n, generator=g, dtype=torch.float64)
    return xf, xq


@settings(max_examples=8, deadline=None)
@given(st.integers(1, 70), st.integers(2, 60), st.integers(0, 2**31 - 1))
def test_float_target_weight_is_the_least_squares_solution(m, n, seed):
    """Undamped, ``W*`` minimises ``||X_f W^T - X_q W*^T||``: compare with
    ``torch.linalg.lstsq`` on the raw inputs (an independent solver)."""
    xf, xq = _inputs(4 * n + 8, n, seed)
    w = torch.randn(m, n, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    t = xq.shape[0]
    got = float_target_weight(w.float(), (xq.T @ xq / t).float(),
                              ((xf - xq).T @ xq / t).float(), percdamp=0.0)
    ref = torch.linalg.lstsq(xq, xf @ w.T).solution.T
    rel = (got.double() - ref).norm() / ref.norm()
    assert rel < 1e-4, rel


def test_float_target_weight_is_w_when_inputs_agree_and_lowers_the_output_error():
    xf, xq = _inputs(512, 64, seed=3)
    w = torch.randn(40, 64, generator=torch.Generator().manual_seed(4))
    t = xq.shape[0]
    h = (xq.T @ xq / t).float()
    same = float_target_weight(w, h, torch.zeros(64, 64), percdamp=0.01)
    assert torch.equal(same, w)
    wstar = float_target_weight(w, h, ((xf - xq).T @ xq / t).float(), percdamp=0.01)
    target = xf @ w.double().T
    before = (target - xq @ w.double().T).norm()
    after = (target - xq @ wstar.double().T).norm()
    assert after < 0.5 * before, (float(before), float(after))
    # and GPTQ on W* with the Hessian of X_q beats GPTQ on W for the float target
    hess = 2 * h
    q0, s0 = gptq_quantize(w, hess, act_order=True)
    q1, s1 = gptq_quantize(wstar, hess, act_order=True)
    e0 = (target - xq @ dequantize_blockwise(q0, s0).double().T).norm()
    e1 = (target - xq @ dequantize_blockwise(q1, s1).double().T).norm()
    assert e1 < 0.7 * e0, (float(e0), float(e1))


def test_float_target_weight_errors():
    w = torch.randn(4, 8)
    with pytest.raises(ValueError, match="must both be"):
        float_target_weight(w, torch.eye(8), torch.zeros(7, 7), name="x.weight")
    bad = torch.zeros(8, 8)
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        float_target_weight(w, torch.eye(8), bad, name="x.weight")
    # all-zero inputs: damping falls back to 1 and the weight is unchanged
    assert torch.equal(float_target_weight(w, torch.zeros(8, 8), torch.zeros(8, 8)), w)


# ----------------------------------------------------------------------------- row groups


def test_gptq_rows_each_group_fits_its_own_inputs():
    """Rows 0..64 calibrated on inputs X1 and rows 64..128 on X2 (another distribution): each
    group's output error on fresh samples of its own inputs is lower than with the Hessian of
    the other group's inputs, and the scales are the plain amax/448 ones."""
    n = 256
    w = torch.randn(128, n, generator=torch.Generator().manual_seed(4)) * 0.05
    g = torch.Generator().manual_seed(9)
    mix2 = torch.randn(n, n, generator=g) / n**0.5
    x1, t1 = _correlated_inputs(2048, n, 1), _correlated_inputs(1024, n, 2)
    x2 = torch.randn(2048, n, generator=g) @ mix2 * torch.linspace(0.1, 3.0, n)
    t2 = torch.randn(1024, n, generator=g) @ mix2 * torch.linspace(0.1, 3.0, n)
    f1, f2 = (gptq_factor(hessian_from_inputs(x), act_order=True) for x in (x1, x2))
    q, s = gptq_quantize_rows(w, [(0, 64, f1), (64, 128, f2)])
    q_swapped, _ = gptq_quantize_rows(w, [(0, 64, f2), (64, 128, f1)])
    assert torch.equal(s, quantize_blockwise(w)[1])
    deq = dequantize_blockwise(q, s, dtype=torch.float32)
    deq_sw = dequantize_blockwise(q_swapped, s, dtype=torch.float32)

    def err(d: torch.Tensor, rows: slice, x: torch.Tensor) -> float:
        return float(((x @ (d[rows] - w[rows]).T) ** 2).sum())

    assert err(deq, slice(0, 64), t1) < 0.9 * err(deq_sw, slice(0, 64), t1)
    assert err(deq, slice(64, 128), t2) < 0.9 * err(deq_sw, slice(64, 128), t2)
    for bad in ([(0, 64, f1)], [(0, 64, f1), (60, 128, f2)], [(0, 0, f1), (0, 128, f2)]):
        with pytest.raises(ValueError, match="row groups"):
            gptq_quantize_rows(w, bad)


# ------------------------------------------------------------------------ attention Hessians


def _attention(x, wq, wk, wv, heads, kv_heads, d):
    """Causal softmax attention, float64, ``x [T, N]`` -> per-head outputs ``[H, T, D]`` and
    probabilities ``[H, T, T]`` (query head ``h`` reads key/value head ``h // (H / G)``)."""
    t = x.shape[0]
    q = (x @ wq.T).view(t, heads, d).transpose(0, 1)
    k = (x @ wk.T).view(t, kv_heads, d).transpose(0, 1).repeat_interleave(heads // kv_heads, 0)
    v = (x @ wv.T).view(t, kv_heads, d).transpose(0, 1).repeat_interleave(heads // kv_heads, 0)
    scores = q @ k.transpose(1, 2) / d**0.5
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    a = torch.softmax(scores, -1)
    return a @ v, a


def _attention_case(t=24, n=32, heads=4, kv_heads=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, n, generator=g, dtype=torch.float64)
    x[0] *= 6.0  # an attention sink: the first token's key and value count for every query
    wq, wk, wv = (torch.randn(rows, n, generator=g, dtype=torch.float64) / n**0.5
                  for rows in (heads * d, kv_heads * d, kv_heads * d))
    return x, wq, wk, wv


@pytest.mark.parametrize("seed", [0, 1])
def test_attention_value_sums_are_the_exact_output_error(seed):
    """For any error ``dW`` of ``v_proj``'s rows of head ``g``, the squared change of the
    outputs of the query heads reading ``g`` is ``tr(dW Sv[g] dW^T)`` exactly."""
    heads, kv_heads, d = 4, 2, 8
    x, wq, wk, wv = _attention_case(heads=heads, kv_heads=kv_heads, d=d, seed=seed)
    out, a = _attention(x, wq, wk, wv, heads, kv_heads, d)
    q = (x @ wq.T).view(-1, heads, d)
    v = (x @ wv.T).view(-1, kv_heads, d)
    _, sv = attention_hessian_sums(x.float(), a.float(), q.float(), v.float())
    g = torch.Generator().manual_seed(seed + 10)
    for head in range(kv_heads):
        dw = torch.zeros_like(wv)
        dw[head * d:(head + 1) * d] = torch.randn(d, x.shape[1], generator=g,
                                                  dtype=torch.float64) * 0.01
        out2, _ = _attention(x, wq, wk, wv + dw, heads, kv_heads, d)
        want = float((out2 - out).pow(2).sum())
        rows = dw[head * d:(head + 1) * d]
        got = float(torch.trace(rows @ sv[head] @ rows.T))
        assert got == pytest.approx(want, rel=1e-4)
        other = 1 - head
        assert float(torch.trace(rows @ sv[other] @ rows.T)) != pytest.approx(want, rel=0.01)


def test_attention_key_weights_are_the_first_order_error_of_each_key():
    """Inputs ``x_s = e_s`` (one basis vector a token) make ``Sk[g]`` diagonal, its entry
    ``s`` the weight of token ``s``'s key. An error of that key alone changes the outputs, to
    first order, by the Jacobian of the real attention with respect to that key; summed over
    every direction of the error its squared norm is ``Sk[g][s, s] / D`` (the ``1/sqrt(D)``
    score scale squared)."""
    heads, kv_heads, d, t = 4, 2, 8, 8
    _, wq, wk, wv = _attention_case(t=t, n=t, heads=heads, kv_heads=kv_heads, d=d, seed=3)
    x = torch.eye(t, dtype=torch.float64) * torch.linspace(0.5, 3.0, t, dtype=torch.float64)[:, None]
    out, a = _attention(x, wq, wk, wv, heads, kv_heads, d)
    q = (x @ wq.T).view(-1, heads, d)
    v = (x @ wv.T).view(-1, kv_heads, d)
    sk, _ = attention_hessian_sums(x.float(), a.float(), q.float(), v.float())
    for g in range(kv_heads):
        assert torch.allclose(sk[g], torch.diag(torch.diagonal(sk[g])), atol=1e-9)
        for s in range(t):
            def outputs(col: torch.Tensor, g=g, s=s) -> torch.Tensor:
                w2 = wk.clone()
                w2[g * d:(g + 1) * d, s] = col  # only token s's key of head g moves
                return _attention(x, wq, w2, wv, heads, kv_heads, d)[0]
            jac = torch.autograd.functional.jacobian(outputs, wk[g * d:(g + 1) * d, s].clone())
            c = float(x[s, s])
            want = float(jac.pow(2).sum()) / c**2  # per unit of key, not of weight
            got = float(sk[g][s, s]) / c**2 / d
            assert got == pytest.approx(want, rel=1e-3, abs=1e-12), (g, s)


def test_attention_sums_check_shapes():
    with pytest.raises(ValueError, match="shapes"):
        attention_hessian_sums(torch.randn(5, 8), torch.rand(4, 5, 5), torch.randn(5, 4, 2),
                               torch.randn(5, 3, 2))
