"""Function-preserving per-channel rescaling folded into the preceding RMSNorm (SmoothQuant).

SmoothQuant (Xiao et al. 2023, "SmoothQuant: Accurate and Efficient Post-Training Quantization
for Large Language Models", arXiv:2211.10438) moves the activation outliers of a Linear's
input channel ``j`` into its weight column ``j``. When the input is an RMSNorm's output
``y = g * x_hat`` (weight ``g [H]``) feeding Linear layers ``W_k [out_k, H]`` and nothing else,
for any positive ``s [H]``::

    g'   = g / s                 # the norm's weight
    W_k' = W_k * s[None, :]      # every consumer's input columns
    W_k' (g' * x_hat) = W_k (g * x_hat)        exactly, in real arithmetic

so the float model computes the same function and the checkpoint keeps its format (the norm
weight stays a float vector, the Linear weights are still quantized as 128x128 blocks).
SmoothQuant's choice, with ``a_j = max |y_j|`` over calibration tokens and
``w_j = max_k max_i |W_k[i, j]|``::

    s_j = a_j ** alpha / w_j ** (1 - alpha)      (alpha = 0.5; s_j = 1 where a_j or w_j is 0)

In a decoder layer the pairs are ``input_layernorm -> q/k/v_proj`` and
``post_attention_layernorm -> gate/up_proj`` (dense MLPs only: a MoE block's router also reads
the norm's output). ``smooth_model`` checks each rescaled layer on a probe input and undoes a
rescaling that changes the layer's output (a norm of another form, such as ``1 + weight``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

__all__ = ["smoothing_scales", "smoothable_groups", "collect_input_absmax", "apply_smoothing",
           "smooth_model"]


def smoothing_scales(act_absmax: torch.Tensor, weights: list[torch.Tensor],
                     alpha: float = 0.5, clamp: tuple[float, float] = (1e-2, 1e2)
                     ) -> torch.Tensor:
    """``s = a ** alpha / w ** (1 - alpha)`` per input channel (module doc), float32 ``[H]``.

    Args:
        act_absmax: ``[H]`` max ``|y_j|`` of the shared input over calibration tokens.
        weights: the consumers' ``[out_k, H]`` weights.
        alpha: migration strength in ``[0, 1]`` (0: nothing moves, 1: all to the weights).
        clamp: bounds of ``s`` (a channel is never scaled by more than 100x either way).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    a = act_absmax.detach().double()
    w = torch.stack([x.detach().abs().amax(0).double() for x in weights]).amax(0)
    if a.shape != w.shape:
        raise ValueError(f"activation max {tuple(a.shape)} does not match the weights' input "
                         f"width {tuple(w.shape)}")
    s = a.pow(alpha) / w.pow(1.0 - alpha)
    s = torch.where((a > 0) & (w > 0) & torch.isfinite(s), s, torch.ones_like(s))
    return s.clamp(*clamp).float()


def smoothable_groups(layer: nn.Module) -> list[tuple[str, list[str]]]:
    """``[(norm name, [consumer Linear names])]`` of one decoder layer (names inside the layer):
    ``input_layernorm -> self_attn.{q,k,v}_proj`` and, for a dense MLP,
    ``post_attention_layernorm -> mlp.{gate,up}_proj``; a group whose modules are missing is left
    out."""
    def linear(name: str) -> bool:
        try:
            return isinstance(layer.get_submodule(name), nn.Linear)
        except AttributeError:
            return False

    def norm(name: str) -> bool:
        try:
            w = getattr(layer.get_submodule(name), "weight", None)
        except AttributeError:
            return False
        return isinstance(w, torch.Tensor) and w.dim() == 1

    out = []
    attn = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
    if norm("input_layernorm") and all(linear(n) for n in attn):
        out.append(("input_layernorm", attn))
    mlp = ["mlp.gate_proj", "mlp.up_proj"]
    if norm("post_attention_layernorm") and all(linear(n) for n in mlp):
        out.append(("post_attention_layernorm", mlp))
    return out


def collect_input_absmax(model: nn.Module, names: list[str],
                         run: Callable[[], None]) -> dict[str, torch.Tensor]:
    """``max |x_j|`` over every token of the input of each named module while ``run()`` runs
    the model: ``{name: [H] float32}``."""
    out: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def pre(_m, args):
            x = args[0].detach().abs().reshape(-1, args[0].shape[-1]).amax(0).float()
            out[name] = x if name not in out else torch.maximum(out[name], x)
        return pre

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    return out


def apply_smoothing(norm: nn.Module, linears: list[nn.Linear], s: torch.Tensor) -> None:
    """In place: ``norm.weight /= s`` and every ``linear.weight *= s`` (columns)."""
    with torch.no_grad():
        norm.weight.div_(s.to(norm.weight.dtype))
        for lin in linears:
            lin.weight.mul_(s.to(lin.weight.dtype)[None, :])


def smooth_model(model: nn.Module, layers: nn.ModuleList, prefix: str,
                 act_absmax: dict[str, torch.Tensor], alpha: float = 0.5,
                 probe: Callable[[nn.Module], torch.Tensor] | None = None,
                 rtol: float = 1e-3) -> list[str]:
    """Smooth every group of ``smoothable_groups`` in ``layers`` (named ``prefix.i``) in place.

    ``act_absmax`` is keyed by the first consumer's full name (``collect_input_absmax``).
    ``probe(layer)``: the layer's output on a fixed input; when given, a group whose rescaling
    changes it by more than ``rtol`` (relative L2) is undone. Returns the norms smoothed.
    """
    done = []
    for i, layer in enumerate(layers):
        for norm_name, lin_names in smoothable_groups(layer):
            first = f"{prefix}.{i}.{lin_names[0]}"
            if first not in act_absmax:
                continue
            norm = layer.get_submodule(norm_name)
            lins = [layer.get_submodule(n) for n in lin_names]
            s = smoothing_scales(act_absmax[first], [m.weight for m in lins], alpha)
            before = probe(layer) if probe is not None else None
            saved = [norm.weight.detach().clone()] + [m.weight.detach().clone() for m in lins]
            apply_smoothing(norm, lins, s)
            if before is not None:
                after = probe(layer)
                rel = float((after - before).norm() / before.norm().clamp_min(1e-30))
                if not rel <= rtol:  # restore the exact previous weights
                    with torch.no_grad():
                        for p, old in zip([norm.weight] + [m.weight for m in lins], saved,
                                          strict=True):
                            p.copy_(old)
                    continue
            done.append(f"{prefix}.{i}.{norm_name}")
    return done
