"""What the evaluation measures, as small pure functions and running sums.

Next-token metrics, per scored position ``t`` of a window (``p`` the reference's
next-token distribution, ``q`` the variant's, both from log-softmax of fp32 logits):

* KL divergence, nats: ``KL_t = sum_v p_t(v) * (log p_t(v) - log q_t(v))``; the report
  gives its mean over all scored tokens (the primary measure, docs/eval.md).
* top-1 agreement: ``argmax_v p_t == argmax_v q_t``, as a fraction of scored tokens.
* negative log-likelihood of the actual next token ``y_t``: ``-log q_t(y_t)``;
  perplexity ``= exp(mean NLL)``, relative change ``= ppl / ppl_ref - 1``.

Quantization error of a tensor ``x`` approximated by ``x~`` (weights, activations,
layer outputs), accumulated over calls as ``S = sum x^2`` and ``N = sum (x - x~)^2``:

* SNR in dB: ``10 * log10(S / N)`` (infinite when ``N = 0``);
* relative error: ``sqrt(N / S)``.

Uncertainty of the token means. Neighbouring tokens of a text are not independent (a hard
passage makes several consecutive predictions hard), so the ``N`` per-token values are grouped
into blocks ``j`` of ``block`` consecutive scored tokens of one window (``window_blocks``) and
the blocks are treated as the independent units:

* standard error of a mean ``m = sum_j S_j / N`` of per-token values (``S_j`` the sum and
  ``n_j`` the count of block ``j``, ``J`` blocks), the cluster-robust formula
  ``SE(m) = sqrt(J / (J - 1) * sum_j (S_j - m n_j)^2) / N`` (``block_sem``); with equal
  blocks it is ``std(block means, ddof=1) / sqrt(J)``, with ``block = 1`` the textbook
  ``std(x, ddof=1) / sqrt(N)``;
* a percentile bootstrap interval for ``f(sum_j S_j / sum_j n_j)`` (``block_bootstrap_ci``):
  draw ``J`` blocks with replacement ``resamples`` times from a ``torch.Generator`` with a
  fixed seed, take the ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles. For the
  perplexity change ``S_j`` is the block's summed NLL difference variant minus reference on
  the same tokens (paired), and ``f = expm1``, since ``ppl / ppl_ref - 1 =
  exp(mean NLL - mean NLL_ref) - 1``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

__all__ = [
    "token_kl",
    "top1_agree",
    "token_nll",
    "perplexity",
    "snr_db",
    "relative_error",
    "ErrorSums",
    "TokenStats",
    "DEFAULT_BLOCK_TOKENS",
    "DEFAULT_RESAMPLES",
    "DEFAULT_LEVEL",
    "DEFAULT_SEED",
    "window_blocks",
    "block_sums",
    "block_sem",
    "block_bootstrap_ci",
]

#: Scored tokens per block of the standard errors and the bootstrap (``window_blocks``).
DEFAULT_BLOCK_TOKENS = 64
#: Bootstrap resamples, confidence level and the generator's seed.
DEFAULT_RESAMPLES = 2000
DEFAULT_LEVEL = 0.95
DEFAULT_SEED = 0


def token_kl(ref_logprobs: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """Per-position ``KL(p_ref || p)`` in nats: ``[T, V]`` log-probabilities -> ``[T]`` float64.

    Both inputs are log-probabilities (``log_softmax`` outputs) over the same vocabulary.
    """
    if ref_logprobs.shape != logprobs.shape:
        raise ValueError(f"token_kl: shapes differ: {tuple(ref_logprobs.shape)} vs "
                         f"{tuple(logprobs.shape)}")
    r = ref_logprobs.double()
    return (r.exp() * (r - logprobs.double())).sum(-1).clamp_min(0.0)


def top1_agree(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """``argmax(ref) == argmax(variant)`` per position: ``[T, V]`` -> ``[T]`` bool."""
    return ref_logits.argmax(-1) == logits.argmax(-1)


def token_nll(logprobs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``-log q_t(y_t)``: ``[T, V]`` log-probabilities and ``[T]`` token ids -> ``[T]`` float64."""
    return -logprobs.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1).double()


def perplexity(nll_sum: float, count: int) -> float:
    """``exp(nll_sum / count)``: perplexity from a summed NLL over ``count`` tokens."""
    if count <= 0:
        raise ValueError("perplexity needs at least one scored token")
    return math.exp(nll_sum / count)


def snr_db(signal_sq: float, noise_sq: float) -> float:
    """``10 * log10(signal_sq / noise_sq)``; ``inf`` for zero noise, ``-inf`` for zero signal."""
    if noise_sq <= 0.0:
        return math.inf
    if signal_sq <= 0.0:
        return -math.inf
    return 10.0 * math.log10(signal_sq / noise_sq)


def relative_error(signal_sq: float, noise_sq: float) -> float:
    """``sqrt(noise_sq / signal_sq)`` (``||x - x~|| / ||x||``); ``inf`` for zero signal and noise > 0."""
    if signal_sq <= 0.0:
        return 0.0 if noise_sq <= 0.0 else math.inf
    return math.sqrt(noise_sq / signal_sq)


def window_blocks(window_lengths: Sequence[int], block: int) -> torch.Tensor:
    """Block index of every scored token: ``[sum(window_lengths)]`` int64.

    The tokens of each window, in order, are cut into runs of ``block`` (the last run of a
    window may be shorter); a block never spans two windows. Example: lengths ``[5, 3]``,
    ``block=2`` -> ``[0, 0, 1, 1, 2, 3, 3, 4]``.
    """
    if block < 1:
        raise ValueError(f"window_blocks: block must be at least 1 token, got {block}")
    ids, first = [], 0
    for n in window_lengths:
        if n < 0:
            raise ValueError(f"window_blocks: negative window length {n}")
        ids.append(torch.arange(n, dtype=torch.int64) // block + first)
        first += -(-n // block)
    return torch.cat(ids) if ids else torch.zeros(0, dtype=torch.int64)


def block_sums(values: torch.Tensor, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block sum and count: ``values [N]``, ``blocks [N]`` int64 ids ``0..J-1`` ->
    ``(sums [J] float64, counts [J] float64)``."""
    if values.shape != blocks.shape or values.dim() != 1:
        raise ValueError(f"block_sums: values {tuple(values.shape)} and blocks "
                         f"{tuple(blocks.shape)} must be 1-D of the same length")
    n_blocks = int(blocks.max()) + 1 if blocks.numel() else 0
    sums = torch.zeros(n_blocks, dtype=torch.float64).index_add_(0, blocks, values.double())
    counts = torch.bincount(blocks, minlength=n_blocks).double()
    return sums, counts


def block_sem(values: torch.Tensor, blocks: torch.Tensor) -> float:
    """Standard error of ``values.mean()`` with blocks as the independent units.

    ``sqrt(J / (J - 1) * sum_j (S_j - m n_j)^2) / N`` (``S_j``, ``n_j`` each block's sum and
    count, ``m`` the overall mean, ``N = sum_j n_j``); ``nan`` with fewer than 2 blocks.
    ``values`` ``[N]`` any real dtype, ``blocks`` ``[N]`` int64 (``window_blocks``).
    """
    sums, counts = block_sums(values, blocks)
    n_blocks = int((counts > 0).sum())
    if n_blocks < 2:
        return math.nan
    total = float(counts.sum())
    mean = float(sums.sum()) / total
    resid = sums - mean * counts
    return math.sqrt(n_blocks / (n_blocks - 1) * float((resid * resid).sum())) / total


def block_bootstrap_ci(values: torch.Tensor, blocks: torch.Tensor,
                       transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                       resamples: int = DEFAULT_RESAMPLES, level: float = DEFAULT_LEVEL,
                       seed: int = DEFAULT_SEED) -> tuple[float, float]:
    """Percentile bootstrap interval of ``transform(mean of values)``, resampling blocks.

    Each of ``resamples`` draws picks ``J`` blocks with replacement (``torch.randint`` from a
    ``torch.Generator`` seeded with ``seed``, so the interval is the same on every run) and
    computes ``transform(sum of their sums / sum of their counts)``; the interval is the
    ``(1 - level) / 2`` and ``(1 + level) / 2`` quantiles of the draws. ``transform`` maps a
    float64 tensor elementwise (``None``: identity; ``torch.expm1`` turns a mean NLL
    difference into a perplexity ratio minus 1). ``(nan, nan)`` with fewer than 2 blocks.
    """
    if resamples < 1 or not 0.0 < level < 1.0:
        raise ValueError(f"block_bootstrap_ci: need resamples >= 1 and 0 < level < 1, got "
                         f"{resamples}, {level}")
    sums, counts = block_sums(values, blocks)
    keep = counts > 0
    sums, counts = sums[keep], counts[keep]
    if sums.numel() < 2:
        return math.nan, math.nan
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, sums.numel(), (resamples, sums.numel()), generator=g)
    means = sums[idx].sum(1) / counts[idx].sum(1)
    if transform is not None:
        means = transform(means)
    q = torch.tensor([(1.0 - level) / 2.0, (1.0 + level) / 2.0], dtype=torch.float64)
    lo, hi = torch.quantile(means, q).tolist()
    return lo, hi


@dataclass
class ErrorSums:
    """Running ``S = sum x^2`` and ``N = sum (x - x~)^2`` of one tensor's approximation."""

    signal_sq: float = 0.0
    noise_sq: float = 0.0

    def add(self, exact: torch.Tensor, approx: torch.Tensor) -> None:
        """Add one pair of tensors of the same shape (fp32 dot products, summed in Python floats)."""
        if exact.shape != approx.shape:
            raise ValueError(f"ErrorSums.add: shapes differ: {tuple(exact.shape)} vs "
                             f"{tuple(approx.shape)}")
        e = exact.detach().float().reshape(-1)
        d = e - approx.detach().float().reshape(-1)
        self.signal_sq += float(torch.dot(e, e))
        self.noise_sq += float(torch.dot(d, d))

    @property
    def snr_db(self) -> float:
        """SNR of everything added so far, dB."""
        return snr_db(self.signal_sq, self.noise_sq)

    @property
    def relative_error(self) -> float:
        """``||x - x~|| / ||x||`` of everything added so far."""
        return relative_error(self.signal_sq, self.noise_sq)


@dataclass
class TokenStats:
    """Running next-token metrics of one variant against the reference.

    Every position's KL (float64; float32 copies feed the histograms), NLL (float64) and
    top-1 agreement (bool) are kept, with each window's number of scored positions, for the
    standard errors and bootstrap intervals (``window_blocks``).
    """

    kl_sum: float = 0.0
    agree: int = 0
    nll_sum: float = 0.0
    count: int = 0
    kl_values: list[torch.Tensor] = field(default_factory=list)
    nll_values: list[torch.Tensor] = field(default_factory=list)
    agree_values: list[torch.Tensor] = field(default_factory=list)
    window_lengths: list[int] = field(default_factory=list)

    def add(self, ref_logits: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor,
            ref_logprobs: torch.Tensor | None = None) -> None:
        """Score positions ``[T, V]`` of one window whose next tokens are ``targets [T]``."""
        ref_lp = ref_logprobs if ref_logprobs is not None else torch.log_softmax(
            ref_logits.float(), -1)
        lp = torch.log_softmax(logits.float(), -1)
        kl = token_kl(ref_lp, lp)
        agree = top1_agree(ref_logits, logits)
        nll = token_nll(lp, targets)
        self.kl_sum += float(kl.sum())
        self.kl_values.append(kl)
        self.agree += int(agree.sum())
        self.agree_values.append(agree)
        self.nll_sum += float(nll.sum())
        self.nll_values.append(nll)
        self.count += int(targets.numel())
        self.window_lengths.append(int(targets.numel()))

    @property
    def mean_kl(self) -> float:
        """Mean per-token KL divergence from the reference, nats."""
        return self.kl_sum / self.count if self.count else math.nan

    @property
    def top1(self) -> float:
        """Fraction of positions whose top-1 token matches the reference's."""
        return self.agree / self.count if self.count else math.nan

    @property
    def ppl(self) -> float:
        """Perplexity ``exp(mean NLL)`` of the actual next tokens."""
        return perplexity(self.nll_sum, self.count)

    def all_kl(self) -> torch.Tensor:
        """Every scored position's KL, concatenated: ``[count]`` float32."""
        return torch.cat(self.kl_values).float() if self.kl_values else torch.zeros(0)

    def all_nll(self) -> torch.Tensor:
        """Every scored position's NLL of the actual next token: ``[count]`` float64."""
        return torch.cat(self.nll_values) if self.nll_values else torch.zeros(0, dtype=torch.float64)

    def blocks(self, block: int = DEFAULT_BLOCK_TOKENS) -> torch.Tensor:
        """``window_blocks`` of the windows added so far: ``[count]`` int64."""
        return window_blocks(self.window_lengths, block)

    def uncertainty(self, reference: TokenStats, block: int = DEFAULT_BLOCK_TOKENS,
                    resamples: int = DEFAULT_RESAMPLES, level: float = DEFAULT_LEVEL,
                    seed: int = DEFAULT_SEED) -> dict:
        """Standard errors and the perplexity-change interval against ``reference``.

        ``reference`` must have scored the same windows (the NLL differences are paired token
        by token). Returns ``kl_sem`` and ``top1_sem`` (``block_sem``) and
        ``ppl_rel_change_ci`` ``[lo, hi]``: the ``block_bootstrap_ci`` of
        ``expm1(mean(NLL - NLL_ref))``.
        """
        if reference.window_lengths != self.window_lengths:
            raise ValueError("TokenStats.uncertainty: the reference scored other windows "
                             f"({reference.window_lengths} vs {self.window_lengths})")
        blocks = self.blocks(block)
        diff = self.all_nll() - reference.all_nll()
        lo, hi = block_bootstrap_ci(diff, blocks, torch.expm1, resamples, level, seed)
        return {
            "kl_sem": block_sem(torch.cat(self.kl_values), blocks),
            "top1_sem": block_sem(torch.cat(self.agree_values).double(), blocks),
            "ppl_rel_change_ci": [lo, hi],
        }

    def compare(self, other: TokenStats, block: int = DEFAULT_BLOCK_TOKENS,
                resamples: int = DEFAULT_RESAMPLES, level: float = DEFAULT_LEVEL,
                seed: int = DEFAULT_SEED) -> dict:
        """This variant against ``other`` on the same tokens (paired, token by token).

        Returns ``kl_diff = mean KL - other's mean KL`` with its ``block_sem`` (``kl_diff_sem``)
        and ``ppl_ratio_ci``: the ``block_bootstrap_ci`` of ``ppl / other's ppl - 1``. A
        difference whose interval excludes 0 is larger than the sampling noise of the text.
        """
        if other.window_lengths != self.window_lengths:
            raise ValueError("TokenStats.compare: the two variants scored other windows")
        blocks = self.blocks(block)
        kl_diff = torch.cat(self.kl_values) - torch.cat(other.kl_values)
        lo, hi = block_bootstrap_ci(self.all_nll() - other.all_nll(), blocks, torch.expm1,
                                    resamples, level, seed)
        return {"kl_diff": float(kl_diff.mean()), "kl_diff_sem": block_sem(kl_diff, blocks),
                "ppl_ratio_ci": [lo, hi]}
