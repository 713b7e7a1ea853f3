"""``quantize_model``: swap a model's ``nn.Linear`` layers for ``FP8Linear`` in place.

Which layers stay in high precision is the rule the checkpoint converter uses
(``finefp8.checkpoint.layout.skip_reason``), applied to ``<module>.weight``: the output head
(``lm_head``), embeddings, norms, MoE routers (``mlp.gate``; ``gate_proj`` *is* converted) and
anything matching an ``ignore`` pattern (a glob, or ``re:<regex>``), so a model quantized in
memory and one loaded from a converted checkpoint hold the same FP8 layers.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from torch import nn

from ..checkpoint.layout import skip_reason
from .config import FP8Config
from .linear import FP8Linear, WeightQuantizer

__all__ = ["quantize_model", "dequantize_model", "fp8_modules", "kept_linear_modules",
           "linear_skip_reason", "resolve_config"]

log = logging.getLogger(__name__)


def resolve_config(config: FP8Config | None = None, mode: str | None = None,
                   scale_fmt: str | None = None) -> FP8Config:
    """``config`` (default ``FP8Config()``) with ``mode`` / ``scale_fmt`` overriding when given."""
    config = config or FP8Config()
    changes = {k: v for k, v in (("mode", mode), ("scale_fmt", scale_fmt)) if v is not None}
    return config.replace(**changes) if changes else config


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def linear_skip_reason(name: str, linear: nn.Linear, ignore: Iterable[str] = ()) -> str | None:
    """Why the ``nn.Linear`` called ``name`` stays in high precision, or ``None`` to convert it.

    The checkpoint converter's rule on the tensor ``name + ".weight"`` (its shape; dtype checks
    are about files and do not apply to a module in memory).
    """
    return skip_reason(f"{name}.weight", tuple(linear.weight.shape), "F32", tuple(ignore))


def quantize_model(model: nn.Module, ignore: Iterable[str] = (), mode: str | None = None,
                   scale_fmt: str | None = None, config: FP8Config | None = None, *,
                   weight_quantizer: WeightQuantizer | None = None) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` that the rule converts by an ``FP8Linear``, in place.

    Args:
        model: any ``nn.Module`` (e.g. a transformers model) with loaded, non-meta weights.
        ignore: extra modules to keep: globs (``"*.down_proj"``, ``"model.layers.0.*"``) or
            ``"re:<regex>"`` matched at the start of the module name.
        mode, scale_fmt: shortcuts that override the same fields of ``config``.
        config: the ``FP8Config`` of every converted layer (default: DeepSeek-V3 W8A8).
        weight_quantizer: replaces ``finefp8.ops.quantize_blockwise`` for choosing codes and
            scales (same signature; see ``FP8Linear.from_linear``).

    Returns:
        ``model``. ``fp8_modules(model)`` lists what was converted, ``kept_linear_modules(model)``
        what was kept and why; both are logged at INFO level.
    """
    config = resolve_config(config, mode, scale_fmt)
    ignore = tuple(ignore or ())
    converted: list[str] = []
    kept: list[tuple[str, str]] = []
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    for name, linear in targets:
        reason = linear_skip_reason(name, linear, ignore)
        if reason is not None:
            kept.append((name, reason))
            continue
        _set_submodule(model, name, FP8Linear.from_linear(linear, config, name=name,
                                                          weight_quantizer=weight_quantizer))
        converted.append(name)
    log.info("quantize_model (%s): %d Linear layers converted, %d kept: %s", config.describe(),
             len(converted), len(kept), ", ".join(f"{n} ({r})" for n, r in kept) or "none")
    return model


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = torch.float32) -> nn.Module:
    """Replace every ``FP8Linear`` of ``model`` by an ``nn.Linear`` holding ``W = Q * s``, in place.

    With ``dtype`` (default float32) the whole model is then cast to it, so the new float
    layers and the rest of the model agree; ``dtype=None`` leaves every other tensor as it is
    and gives the new layers their bias's dtype (float32 without a bias). Returns ``model``.
    """
    for name, m in list(fp8_modules(model).items()):
        wdtype = dtype or (m.bias.dtype if m.bias is not None else torch.float32)
        linear = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None,
                           device="meta", dtype=wdtype)
        linear.weight = nn.Parameter(m.dequantize_weight(wdtype))
        if m.bias is not None:
            linear.bias = nn.Parameter(m.bias.detach().to(wdtype))
        _set_submodule(model, name, linear)
    return model.to(dtype) if dtype is not None else model


def fp8_modules(model: nn.Module) -> dict[str, FP8Linear]:
    """``{name: FP8Linear}`` of every FP8 layer in ``model``, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, FP8Linear)}


def kept_linear_modules(model: nn.Module, ignore: Iterable[str] = ()) -> dict[str, str]:
    """``{name: reason}`` of every ``nn.Linear`` still in high precision in ``model``."""
    ignore = tuple(ignore or ())
    return {n: linear_skip_reason(n, m, ignore) or "not converted"
            for n, m in model.named_modules() if isinstance(m, nn.Linear)}
