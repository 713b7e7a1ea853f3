"""The variants ``finefp8 eval`` compares, each built from the reference model by ``quantize_model``.

=================  =====================================================================
key                what it is
=================  =====================================================================
``reference``      the model in its own precision (nothing quantized)
``w8a8``           DeepSeek-V3: 128x128 weight blocks ``s = amax/448``, activations 1x128
                   per token, fp32 scales, block-scaled FP8 GEMM (the default, exact math)
``weight_only``    the same FP8 weights, dequantized for a float GEMM (activations float)
``act_only``       float weights, only the activations quantized (1x128): error attribution
``per_tensor``     W8A8 with one scale per weight matrix and one per activation tensor
``ue8m0``          W8A8 with power-of-two scales (DeepSeek-V3.1) for weights and activations
``w8a8_mse``       W8A8, each weight block's scale chosen to minimise the block's squared
                   error (``finefp8.calibration.quantize_blockwise_mse``); same on-disk format
``w8a8_gptq``      W8A8, the same ``amax/448`` block scales, codes chosen by GPTQ error-compensating
                   rounding with a Hessian from calibration text disjoint from the evaluation
                   tokens
                   (``finefp8.calibration.gptq_quantize``); same on-disk format
=================  =====================================================================

A variant is a model that shares every tensor it does not quantize (embeddings, norms, the
output head) with the reference, so all variants fit in memory at once.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import calibration, ops
from ..nn import FP8Config, fp8_modules, quantize_model
from ..nn.linear import unique_tensor_bytes
from .options import DEFAULT_VARIANT_KEYS, VARIANT_KEYS

__all__ = ["Variant", "VARIANTS", "DEFAULT_VARIANTS", "build_variant", "collect_hessians",
           "checkpoint_bytes", "linear_weight_bytes"]


@dataclass(frozen=True)
class Variant:
    """One compared configuration.

    Attributes:
        key: short identifier used in JSON and file names.
        label: the name shown in tables and plots.
        description: one sentence for the report.
        config: the ``FP8Config`` of the FP8 layers; ``None`` for the reference.
        calibration: ``None`` (DeepSeek-V3's ``amax/448`` and nearest rounding), ``"mse"``
            (per-block scale search) or ``"gptq"`` (scale search then GPTQ rounding).
    """

    key: str
    label: str
    description: str
    config: FP8Config | None = None
    calibration: str | None = None
    tags: tuple[str, ...] = field(default_factory=tuple)


VARIANTS: dict[str, Variant] = {v.key: v for v in (
    Variant("reference", "reference", "the model in its own precision"),
    Variant("w8a8", "W8A8 block (DeepSeek-V3)",
            "128x128 weight blocks and 1x128 activation groups, fp32 scales amax/448, "
            "block-scaled FP8 GEMM", FP8Config()),
    Variant("weight_only", "weight-only block",
            "the same FP8 block weights, dequantized for a float GEMM",
            FP8Config(mode="weight_only")),
    Variant("act_only", "activations-only",
            "float weights, activations quantized in 1x128 groups (error attribution)",
            FP8Config(mode="act_only")),
    Variant("per_tensor", "W8A8 per-tensor",
            "one scale per weight matrix and one per activation tensor", FP8Config.per_tensor()),
    Variant("ue8m0", "W8A8 block ue8m0",
            "as W8A8 block with power-of-two (UE8M0) scales for weights and activations",
            FP8Config(scale_fmt="ue8m0")),
    Variant("w8a8_mse", "W8A8 block + MSE scales",
            "as W8A8 block, each weight block's scale chosen to minimise its squared error",
            FP8Config(), "mse"),
    Variant("w8a8_gptq", "W8A8 block + GPTQ",
            "as W8A8 block (same amax/448 scales), codes rounded by GPTQ (act-order) with a "
            "Hessian from calibration text disjoint from the evaluation tokens", FP8Config(), "gptq"),
)}

DEFAULT_VARIANTS: tuple[str, ...] = DEFAULT_VARIANT_KEYS
if tuple(VARIANTS) != VARIANT_KEYS:
    raise ImportError("finefp8.eval.options.VARIANT_KEYS must list finefp8.eval.variants.VARIANTS")


_EXPERT_MATRIX = re.compile(r"\.\d+\.(gate_proj|up_proj|down_proj)$")


def _shared_copy(model: nn.Module) -> nn.Module:
    """A structural copy of ``model`` whose parameters and buffers are the reference's own tensors."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)


def collect_hessians(model: nn.Module, names: list[str], windows: list[torch.Tensor],
                     on_window: Callable[[], None] | None = None) -> dict[str, torch.Tensor]:
    """``H = 2 X^T X / T`` of each named ``nn.Linear``'s input over the calibration ``windows``.

    Runs the (reference) model on each window of token ids ``[L]``; returns ``{name: [K, K]}``
    float32. Layers fed the same tensor (q/k/v, gate/up) get the same Hessian object, so a
    GPTQ factor can be computed once for them.
    """
    group_of: dict[str, int] = {}  # layer -> index of its input group (fixed by window 1)
    sums: list[torch.Tensor] = []
    seen: dict[int, tuple[torch.Tensor, int]] = {}  # id(input) -> (input kept alive, group)
    done: set[int] = set()
    count = 0

    def hook(name: str):
        def pre(_mod, args):
            x = args[0]
            hit = seen.get(id(x))
            if name not in group_of:
                if hit is not None and hit[0] is x:
                    group_of[name] = hit[1]
                else:
                    group_of[name] = len(sums)
                    sums.append(torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float64))
            g = group_of[name]
            seen[id(x)] = (x, g)
            if g not in done:
                x2 = x.reshape(-1, x.shape[-1]).float()
                sums[g] += (x2.T @ x2).double()
                done.add(g)
        return pre

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            for w in windows:
                seen.clear()
                done.clear()
                model(w.unsqueeze(0))
                count += int(w.numel())
                if on_window:
                    on_window()
    finally:
        for h in handles:
            h.remove()
        seen.clear()
    hessians = [(2.0 * s / max(count, 1)).float() for s in sums]
    return {n: hessians[g] for n, g in group_of.items()}


def _calibrated_quantizer(kind: str, hessians: dict[str, torch.Tensor] | None, cache: dict):
    """A ``WeightQuantizer`` (see ``finefp8.nn.FP8Linear.from_linear``) for ``kind``.

    ``"mse"``: per-block scale search. ``"gptq"``: DeepSeek-V3's ``amax/448`` block scales and
    GPTQ rounding, columns in act-order (decreasing ``H[j, j]``); ``cache`` keeps each
    Hessian's factor (shared by layers with one input). A routed expert's matrix
    (``<experts>.<e>.gate_proj``...) calibrates on its own tokens' Hessian
    (``finefp8.eval.moe.collect_expert_hessians``); one without (no calibration token routed
    to it) keeps ``amax/448`` and nearest rounding, and its name goes in
    ``cache["uncalibrated"]`` for the report.
    """
    def quantize(w, block_size, scale_fmt, *, name=None):
        if scale_fmt != "fp32":
            raise ValueError(f"calibrated variants use fp32 scales, got scale_fmt={scale_fmt!r}")
        if kind == "mse":
            return calibration.quantize_blockwise_mse(w, block_size, name=name)
        if name and _EXPERT_MATRIX.search(name) and (hessians is None or name not in hessians):
            # a routed expert no calibration token reached: nothing to calibrate on
            cache.setdefault("uncalibrated", set()).add(name)
            return ops.quantize_blockwise(w, block_size, scale_fmt, name=name)
        if hessians is None or name not in hessians:
            raise ValueError(f"GPTQ needs the calibration Hessian of layer {name!r}")
        h = hessians[name]
        key = ("gptq_factor", id(h))
        if key not in cache:
            cache[key] = (h, calibration.gptq_factor(h, act_order=True))
        return calibration.gptq_quantize(w, None, None, block_size, factor=cache[key][1],
                                         name=name)
    return quantize


def build_variant(reference: nn.Module, variant: Variant,
                  hessians: dict[str, torch.Tensor] | None = None,
                  cache: dict | None = None) -> nn.Module:
    """The model of ``variant``: the reference itself, or a copy with its Linear layers in FP8.

    ``hessians``: per-layer calibration Hessians (GPTQ); ``cache``: a dict shared between calls
    that keeps the per-block scale search of each layer.
    """
    if variant.config is None:
        return reference
    model = _shared_copy(reference)
    quantizer = None if variant.calibration is None else _calibrated_quantizer(
        variant.calibration, hessians, {} if cache is None else cache)
    return quantize_model(model, config=variant.config, weight_quantizer=quantizer).eval()


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes of the weights, scales and biases of the layers that FP8 variants convert.

    For the reference these are the float ``nn.Linear`` layers and fused experts modules that
    ``quantize_model`` would convert; for an FP8 variant its ``FP8Linear`` / ``FP8Experts``
    modules (1 byte a weight + 4 bytes a scale).
    """
    fp8 = fp8_modules(model)
    if fp8:
        return sum(m.weight_bytes() for m in fp8.values())
    from .moe import convertible_experts

    total = 0
    for name in convertible_linears(model):
        m = model.get_submodule(name)
        total += sum(t.numel() * t.element_size() for t in (m.weight, m.bias) if t is not None)
    for name in convertible_experts(model):
        total += sum(t.numel() * t.element_size()
                     for t in model.get_submodule(name).parameters(recurse=False))
    return total


def convertible_linears(model: nn.Module) -> list[str]:
    """Names of the ``nn.Linear`` layers ``quantize_model`` converts (lm_head etc. excluded)."""
    from ..nn.convert import linear_skip_reason

    return [n for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and linear_skip_reason(n, m) is None]


def checkpoint_bytes(model: nn.Module) -> int:
    """Bytes of the tensors a checkpoint of ``model`` would store (tied tensors counted once).

    FP8 layers: 1 byte a weight element, 4 bytes a scale, the bias in its dtype; every other
    parameter and persistent buffer in its own dtype. An ``act_only`` layer stores its float
    weight (nothing is quantized on disk). Headers and metadata are not counted.
    """
    return unique_tensor_bytes(model.state_dict(keep_vars=True).values())
