"""Metrics against hand-computable cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from finefp8.eval.metrics import (
    ErrorSums,
    TokenStats,
    block_bootstrap_ci,
    block_sem,
    perplexity,
    relative_error,
    snr_db,
    token_kl,
    token_nll,
    top1_agree,
    window_blocks,
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


# ----------------------------------------------------------------------------- uncertainty

def test_window_blocks_hand_example():
    assert window_blocks([5, 3], 2).tolist() == [0, 0, 1, 1, 2, 3, 3, 4]
    assert window_blocks([4], 4).tolist() == [0, 0, 0, 0]
    assert window_blocks([], 8).numel() == 0
    with pytest.raises(ValueError, match="at least 1"):
        window_blocks([3], 0)


@given(st.integers(2, 300), st.integers(0, 2**31 - 1))
def test_block_sem_of_single_tokens_is_the_textbook_sem(n, seed):
    x = np.random.default_rng(seed).gamma(0.5, 0.02, n)  # skewed and positive, like per-token KL
    want = np.std(x, ddof=1) / np.sqrt(n)
    got = block_sem(torch.from_numpy(x), window_blocks([n], 1))
    assert got == pytest.approx(want, rel=1e-9, abs=1e-15)


def test_block_sem_of_equal_blocks_is_the_sem_of_block_means():
    x = np.random.default_rng(4).normal(3.0, 2.0, 40 * 16)
    means = x.reshape(40, 16).mean(1)
    want = np.std(means, ddof=1) / np.sqrt(40)
    assert block_sem(torch.from_numpy(x), window_blocks([640], 16)) == pytest.approx(want,
                                                                                    rel=1e-12)
    assert math.isnan(block_sem(torch.ones(5), window_blocks([5], 8)))  # one block: unknown


def _ar1(rng: np.random.Generator, reps: int, n: int, phi: float) -> np.ndarray:
    """``reps`` AR(1) series ``x_t = phi x_{t-1} + e_t`` of length ``n``, stationary start."""
    e = rng.normal(size=(reps, n))
    x = np.empty_like(e)
    x[:, 0] = e[:, 0] / np.sqrt(1 - phi**2)
    for t in range(1, n):
        x[:, t] = phi * x[:, t - 1] + e[:, t]
    return x


def test_block_sem_accounts_for_correlated_tokens():
    """On correlated series (AR(1), phi = 0.8: neighbouring tokens alike) the block SE matches
    the actual spread of the mean over many series, while the independent-token SE is about
    three times too small (variance inflation (1 + phi) / (1 - phi) = 9)."""
    rng = np.random.default_rng(5)
    lengths = [1023, 1023]  # two windows, each ending in a short block
    x = _ar1(rng, 400, sum(lengths), 0.8)
    actual_var = x.mean(1).var(ddof=1)
    blocks, singles = window_blocks(lengths, 64), window_blocks(lengths, 1)
    est_var = np.mean([block_sem(torch.from_numpy(r), blocks) ** 2 for r in x])
    naive_var = np.mean([block_sem(torch.from_numpy(r), singles) ** 2 for r in x])
    assert 0.75 < est_var / actual_var < 1.3
    assert naive_var / actual_var < 0.2


def test_bootstrap_ci_covers_a_known_mean():
    """95% intervals of the mean of skewed blocked data contain the true mean about 95% of the
    time (exponential tokens, mean 0.02, in 48 blocks of 64)."""
    rng = np.random.default_rng(6)
    blocks = window_blocks([1024, 1024, 1024], 64)
    hits = 0
    for i in range(200):
        x = torch.from_numpy(rng.exponential(0.02, blocks.numel()))
        lo, hi = block_bootstrap_ci(x, blocks, resamples=1000, seed=i)
        hits += lo <= 0.02 <= hi
    assert 0.88 <= hits / 200 <= 0.99


def test_bootstrap_ci_matches_the_normal_interval_and_is_seeded():
    x = torch.from_numpy(np.random.default_rng(7).normal(0.5, 1.0, 4096))
    blocks = window_blocks([4096], 32)
    lo, hi = block_bootstrap_ci(x, blocks, resamples=4000, seed=1)
    m, se = float(x.mean()), block_sem(x, blocks)
    assert lo == pytest.approx(m - 1.96 * se, abs=0.15 * se)
    assert hi == pytest.approx(m + 1.96 * se, abs=0.15 * se)
    assert block_bootstrap_ci(x, blocks, resamples=4000, seed=1) == (lo, hi)
    assert block_bootstrap_ci(x, blocks, resamples=4000, seed=2) != (lo, hi)
    elo, ehi = block_bootstrap_ci(x, blocks, torch.expm1, resamples=4000, seed=1)
    assert elo == pytest.approx(math.expm1(lo), rel=1e-3) and ehi == pytest.approx(
        math.expm1(hi), rel=1e-3)  # a monotone transform moves the quantiles with it
    with pytest.raises(ValueError, match="level"):
        block_bootstrap_ci(x, blocks, level=1.5)


def test_token_stats_uncertainty_and_paired_comparison():
    g = torch.Generator().manual_seed(8)
    ref = torch.randn(600, 20, generator=g) * 2
    tgt = torch.randint(0, 20, (600,), generator=g)
    a = ref + 0.2 * torch.randn(600, 20, generator=g)
    b = ref + 0.6 * torch.randn(600, 20, generator=g)
    s_ref, s_a, s_b = TokenStats(), TokenStats(), TokenStats()
    for lo, hi in ((0, 300), (300, 600)):
        s_ref.add(ref[lo:hi], ref[lo:hi], tgt[lo:hi])
        s_a.add(ref[lo:hi], a[lo:hi], tgt[lo:hi])
        s_b.add(ref[lo:hi], b[lo:hi], tgt[lo:hi])
    u = s_a.uncertainty(s_ref, block=30)
    kl = token_kl(torch.log_softmax(ref, -1), torch.log_softmax(a, -1)).numpy()
    means = kl.reshape(20, 30).mean(1)  # 2 windows of 300 = 20 equal blocks of 30
    assert u["kl_sem"] == pytest.approx(np.std(means, ddof=1) / np.sqrt(20), rel=1e-6)
    lo, hi = u["ppl_rel_change_ci"]
    assert lo < s_a.ppl / s_ref.ppl - 1 < hi
    c = s_b.compare(s_a, block=30)
    assert c["kl_diff"] == pytest.approx(s_b.mean_kl - s_a.mean_kl, rel=1e-6)
    assert c["kl_diff"] > 4 * c["kl_diff_sem"] > 0  # b is clearly worse than a
    assert c["ppl_ratio_ci"][0] < s_b.ppl / s_a.ppl - 1 < c["ppl_ratio_ci"][1]
    short = TokenStats()
    short.add(ref[:10], a[:10], tgt[:10])
    with pytest.raises(ValueError, match="other windows"):
        short.uncertainty(s_ref)
