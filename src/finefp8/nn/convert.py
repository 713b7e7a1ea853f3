"""``quantize_model``: swap a model's ``nn.Linear`` layers for ``FP8Linear`` and its fused MoE
experts modules for ``FP8Experts``, in place.

Which layers stay in high precision is the rule the checkpoint converter uses
(``finefp8.checkpoint.layout.skip_reason``), applied to ``<module>.weight``: the output head
(``lm_head``), embeddings, norms, MoE routers (``mlp.gate``; ``gate_proj`` *is* converted) and
anything matching an ``ignore`` pattern (a glob, or ``re:<regex>``), so a model quantized in
memory and one loaded from a converted checkpoint hold the same FP8 layers.

Fused experts modules (3-D ``gate_up_proj`` / ``down_proj``, see ``finefp8.nn.experts``) are
found by their structure; each becomes an ``FP8Experts`` unless an ``ignore`` pattern names it.
A module holding experts as 3-D weights in any other layout is refused with an error naming it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from ..checkpoint.layout import matches_ignore, skip_reason
from .config import FP8Config
from .experts import FP8Experts, experts_layout_problem, experts_modules
from .linear import FP8Linear, WeightQuantizer

__all__ = ["quantize_model", "dequantize_model", "fp8_modules", "kept_linear_modules",
           "linear_skip_reason", "resolve_config", "experts_skip_reason",
           "serving_kept_modules", "serving_problems", "float_module"]

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


def experts_skip_reason(name: str, module: nn.Module, ignore: Iterable[str] = ()) -> str | None:
    """Why the experts module ``name`` stays in high precision (an ``ignore`` pattern names it,
    as a module or through ``<name>.weight``), or ``None`` to convert it."""
    hit = matches_ignore(f"{name}.weight", tuple(ignore))
    return None if hit is None else f"ignored ({hit})"


def _serving_kept(model: nn.Module, shapes: dict[str, tuple[int, ...]], quantized: set[str],
                  owner: dict[str, str], tp: Sequence[int]) -> dict[str, str]:
    """``{module name: why}`` of the modules ``checkpoint.serving.serving_plan`` keeps in high
    precision, given ``{tensor key: shape}``, the keys that would be FP8 and each key's module."""
    from ..checkpoint.serving import serving_plan

    cfg = getattr(getattr(model, "config", None), "to_dict", dict)()
    plan = serving_plan(shapes, quantized, cfg, tp)
    kept = {}
    for key, name in owner.items():
        k = plan.kept.get(key[: -len(".weight")] if key.endswith(".weight") else key)
        if k is not None:
            kept[name] = f"vLLM {k.status} at TP {k.tp} in FP8 ({k.layer})"
    return kept


def _expert_keys(name: str, module: nn.Module) -> dict[str, tuple[int, ...]]:
    """``{"<name>.gate_up_proj": shape, "<name>.down_proj": shape}`` of a fused experts module."""
    return {f"{name}.{p}": tuple(getattr(module, p).shape) for p in ("gate_up_proj", "down_proj")
            if getattr(module, p, None) is not None and getattr(module, p).dim() == 3}


def serving_kept_modules(model: nn.Module, tp: Sequence[int],
                         ignore: Iterable[str] = ()) -> dict[str, str]:
    """``{module name: why}`` of the Linear layers and experts modules of ``model`` that
    ``finefp8 quantize --tp`` keeps in high precision for the same shapes (vLLM would refuse or
    compute them wrong in FP8 at one of the degrees ``tp``; ``checkpoint.serving``)."""
    ignore = tuple(ignore or ())
    shapes: dict[str, tuple[int, ...]] = {}
    quantized: set[str] = set()
    owner: dict[str, str] = {}
    experts = experts_modules(model)
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            why = linear_skip_reason(name, m, ignore)
            if why is not None and not why.startswith("ignored"):
                continue
            keys = {f"{name}.weight": tuple(m.weight.shape)}
        elif name in experts:
            why = experts_skip_reason(name, m, ignore)
            keys = _expert_keys(name, m)
        else:
            continue
        shapes.update(keys)
        owner.update({k: name for k in keys})
        if why is None:
            quantized.update(keys)
    return _serving_kept(model, shapes, quantized, owner, tp)


def serving_problems(model: nn.Module, tp: Sequence[int]) -> dict[str, str]:
    """``{module name: why}`` of the FP8 modules of ``model``, as it is now, that vLLM would
    refuse or compute wrong at one of the degrees ``tp`` (``checkpoint.serving``).

    Unlike ``serving_kept_modules`` (what ``quantize_model`` *would* convert), this judges the
    model's current state: ``FP8Linear`` / ``FP8Experts`` are FP8, everything else is not.
    Every engine layer (merged q/k/v, gate/up, ...) is judged as a whole.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    quantized: set[str] = set()
    owner: dict[str, str] = {}
    experts = experts_modules(model)
    for name, m in model.named_modules():
        if isinstance(m, FP8Linear):
            keys = {f"{name}.weight": (m.out_features, m.in_features)}
        elif isinstance(m, nn.Linear):
            keys = {f"{name}.weight": tuple(m.weight.shape)}
        elif isinstance(m, FP8Experts) or name in experts:
            keys = _expert_keys(name, m)
        else:
            continue
        shapes.update(keys)
        owner.update({k: name for k in keys})
        if isinstance(m, (FP8Linear, FP8Experts)):
            quantized.update(keys)
    kept = _serving_kept(model, shapes, quantized, owner, tp)
    fp8 = fp8_modules(model)
    return {name: why for name, why in kept.items() if name in fp8}


def quantize_model(model: nn.Module, ignore: Iterable[str] = (), mode: str | None = None,
                   scale_fmt: str | None = None, config: FP8Config | None = None, *,
                   weight_quantizer: WeightQuantizer | None = None,
                   tp: Sequence[int] = ()) -> nn.Module:
    """Replace every ``nn.Linear`` of ``model`` that the rule converts by an ``FP8Linear``, and
    every fused experts module by an ``FP8Experts``, in place.

    Args:
        model: any ``nn.Module`` (e.g. a transformers model) with loaded, non-meta weights.
        ignore: extra modules to keep: globs (``"*.down_proj"``, ``"model.layers.0.*"``) or
            ``"re:<regex>"`` matched at the start of the module name.
        mode, scale_fmt: shortcuts that override the same fields of ``config``.
        config: the ``FP8Config`` of every converted layer (default: DeepSeek-V3 W8A8).
        weight_quantizer: replaces ``finefp8.ops.quantize_blockwise`` for choosing codes and
            scales (same signature; see ``FP8Linear.from_linear``).
        tp: tensor-parallel degrees; keeps the layers ``finefp8 quantize --tp`` keeps for
            them (``serving_kept_modules``), so the model matches that checkpoint. Default
            ``()``: no serving check.

    Returns:
        ``model``. ``fp8_modules(model)`` lists what was converted, ``kept_linear_modules(model)``
        what was kept and why; both are logged at INFO level.

    Raises:
        ValueError: a module holds experts as 3-D weights in a layout ``FP8Experts`` does not
            know (the message names it; ``ignore`` it to keep it in high precision).
    """
    config = resolve_config(config, mode, scale_fmt)
    ignore = tuple(ignore or ())
    serving = serving_kept_modules(model, tp, ignore) if tp else {}
    converted: list[str] = []
    kept: list[tuple[str, str]] = []
    experts = [(n, m) for n, m in experts_modules(model).items() if not isinstance(m, FP8Experts)]
    for name, module in experts:
        reason = experts_skip_reason(name, module, ignore)
        if reason is None and experts_layout_problem(module) is not None:
            raise ValueError(f"quantize_model: module {name!r} ({type(module).__name__}) holds "
                             f"3-D expert weights in an unsupported layout: "
                             f"{experts_layout_problem(module)}. Pass ignore=[{name!r}] to keep "
                             f"it in high precision")
    for name, module in experts:
        reason = experts_skip_reason(name, module, ignore) or serving.get(name)
        if reason is not None:
            kept.append((name, reason))
            continue
        _set_submodule(model, name, FP8Experts.from_experts(module, config, name=name,
                                                            weight_quantizer=weight_quantizer))
        converted.append(name)
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    for name, linear in targets:
        reason = linear_skip_reason(name, linear, ignore) or serving.get(name)
        if reason is not None:
            kept.append((name, reason))
            continue
        _set_submodule(model, name, FP8Linear.from_linear(linear, config, name=name,
                                                          weight_quantizer=weight_quantizer))
        converted.append(name)
    log.info("quantize_model (%s): %d layers / experts modules converted, %d kept: %s", config.describe(),
             len(converted), len(kept), ", ".join(f"{n} ({r})" for n, r in kept) or "none")
    return model


def dequantize_model(model: nn.Module, dtype: torch.dtype | None = torch.float32) -> nn.Module:
    """Replace every ``FP8Linear`` of ``model`` by an ``nn.Linear`` holding ``W = Q * s``, and every
    ``FP8Experts`` by its original transformers experts module holding the same, in place.

    With ``dtype`` (default float32) the whole model is then cast to it, so the new float
    layers and the rest of the model agree; ``dtype=None`` leaves every other tensor as it is
    and gives the new layers their bias's dtype (float32 without a bias). Returns ``model``.
    """
    for name, m in list(fp8_modules(model).items()):
        _set_submodule(model, name, float_module(m, dtype))
    return model.to(dtype) if dtype is not None else model


def float_module(m: FP8Linear | FP8Experts, dtype: torch.dtype | None) -> nn.Module:
    """The high-precision module of ``m`` holding ``W = Q * s`` per block in ``dtype``.

    An ``FP8Linear`` becomes an ``nn.Linear`` (``dtype=None``: its bias's dtype, else float32),
    an ``FP8Experts`` its original transformers experts module (``dtype=None``: float32).
    """
    if isinstance(m, FP8Experts):
        gate_up, down = m.dequantize_weights(dtype or torch.float32)
        return m.float_module({"gate_up_proj": gate_up, "down_proj": down})
    wdtype = dtype or (m.bias.dtype if m.bias is not None else torch.float32)
    linear = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None,
                       device="meta", dtype=wdtype)
    linear.weight = nn.Parameter(m.dequantize_weight(wdtype))
    if m.bias is not None:
        linear.bias = nn.Parameter(m.bias.detach().to(wdtype))
    return linear


def fp8_modules(model: nn.Module) -> dict[str, FP8Linear | FP8Experts]:
    """``{name: FP8Linear | FP8Experts}`` of every FP8 module in ``model``, in module order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (FP8Linear, FP8Experts))}


def kept_linear_modules(model: nn.Module, ignore: Iterable[str] = ()) -> dict[str, str]:
    """``{name: reason}`` of every ``nn.Linear`` still in high precision in ``model``."""
    ignore = tuple(ignore or ())
    return {n: linear_skip_reason(n, m, ignore) or "not converted"
            for n, m in model.named_modules() if isinstance(m, nn.Linear)}
