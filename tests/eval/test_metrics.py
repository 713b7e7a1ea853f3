"""Metrics against hand-computable cases."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from finefp8.eval.metrics import (
    ErrorSums,
    TokenStats,
    perplexity,
    relative_error,
    snr_db,
    token_kl,
    token_nll,
    top1_agree,
)


def test_kl_of_identical_distributions_is_zero():
    logits = torch.randn(7, 50, generator=torch.Generator().manual_seed(1)) * 3
    lp = torch.log_softmax(logits, -1)
    assert torch.allclose(token_kl(lp, lp), torch.zeros(7, dtype=torch.float64), atol=1e-12)


def test_kl_closed_form_two_point():
    # KL(Bern(p) || Bern(q)) = p log(p/q) + (1-p) log((1-p)/(1-q))
    p, q = 0.8, 0.3
    ref = torch.tensor([[math.log(p), math.log(1 - p)]])
    var = torch.tensor([[math.log(q), math.log(1 - q)]])
    want = p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))
    assert token_kl(ref, var).item() == pytest.approx(want, rel=1e-6)


def test_kl_is_asymmetric_and_positive():
    g = torch.Generator().manual_seed(2)
    a = torch.log_softmax(torch.randn(5, 30, generator=g), -1)
    b = torch.log_softmax(torch.randn(5, 30, generator=g), -1)
    assert (token_kl(a, b) > 0).all()
    assert not torch.allclose(token_kl(a, b), token_kl(b, a))


def test_kl_shape_mismatch_raises():
    with pytest.raises(ValueError, match="shapes differ"):
        token_kl(torch.zeros(2, 3), torch.zeros(2, 4))


def test_top1_and_nll_and_ppl():
    ref = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0], [0.0, 0.0, 5.0]])
    var = torch.tensor([[0.0, 1.0, 2.0], [3.0, 1.0, 0.0], [0.0, 0.0, 4.0]])
    assert top1_agree(ref, var).tolist() == [False, True, True]
    uniform = torch.log(torch.full((4, 10), 0.1))
    nll = token_nll(uniform, torch.tensor([0, 3, 9, 5]))
    assert torch.allclose(nll, torch.full((4,), math.log(10), dtype=torch.float64))
    assert perplexity(float(nll.sum()), 4) == pytest.approx(10.0)
    with pytest.raises(ValueError):
        perplexity(1.0, 0)


def test_token_stats_accumulates_windows():
    g = torch.Generator().manual_seed(3)
    ref = torch.randn(12, 20, generator=g)
    var = ref + 0.1 * torch.randn(12, 20, generator=g)
    tgt = torch.randint(0, 20, (12,), generator=g)
    s = TokenStats()
    s.add(ref[:5], var[:5], tgt[:5])
    s.add(ref[5:], var[5:], tgt[5:])
    lp_r, lp_v = torch.log_softmax(ref, -1), torch.log_softmax(var, -1)
    assert s.count == 12
    assert s.mean_kl == pytest.approx(float(token_kl(lp_r, lp_v).mean()), rel=1e-6)
    assert s.top1 == pytest.approx(float(top1_agree(ref, var).float().mean()))
    assert s.ppl == pytest.approx(math.exp(float(token_nll(lp_v, tgt).mean())), rel=1e-6)
    assert s.all_kl().shape == (12,)


@given(st.floats(1e-3, 1e3), st.floats(1e-6, 1.0))
def test_snr_and_relative_error_consistent(signal, ratio):
    noise = signal * ratio
    assert snr_db(signal, noise) == pytest.approx(-20 * math.log10(relative_error(signal, noise)),
                                                  rel=1e-9, abs=1e-9)


def test_error_sums_known_values():
    e = ErrorSums()
    x = torch.tensor([3.0, 4.0])
    e.add(x, torch.tensor([3.0, 3.0]))  # S = 25, N = 1
    assert e.relative_error == pytest.approx(0.2)
    assert e.snr_db == pytest.approx(10 * math.log10(25))
    assert ErrorSums(1.0, 0.0).snr_db == math.inf
    assert relative_error(0.0, 0.0) == 0.0
