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
"""

from __future__ import annotations

import math
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
]


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

    ``kl_values`` keeps every position's KL (float32) for histograms.
    """

    kl_sum: float = 0.0
    agree: int = 0
    nll_sum: float = 0.0
    count: int = 0
    kl_values: list[torch.Tensor] = field(default_factory=list)

    def add(self, ref_logits: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor,
            ref_logprobs: torch.Tensor | None = None) -> None:
        """Score positions ``[T, V]`` of one window whose next tokens are ``targets [T]``."""
        ref_lp = ref_logprobs if ref_logprobs is not None else torch.log_softmax(
            ref_logits.float(), -1)
        lp = torch.log_softmax(logits.float(), -1)
        kl = token_kl(ref_lp, lp)
        self.kl_sum += float(kl.sum())
        self.kl_values.append(kl.float())
        self.agree += int(top1_agree(ref_logits, logits).sum())
        self.nll_sum += float(token_nll(lp, targets).sum())
        self.count += int(targets.numel())

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
        return torch.cat(self.kl_values) if self.kl_values else torch.zeros(0)
