"""The mixture-of-experts parts of ``finefp8 eval``: parameter counts, per-expert-group errors,
per-expert GPTQ Hessians.

Routed experts are fused modules (``finefp8.nn.experts``), not ``nn.Linear`` layers, so:

* ``parameter_counts``: how many of the model's parameters FP8 variants hold in FP8 (every
  converted Linear weight and every routed expert weight) and how many are experts.
* ``expert_layer_errors``: one row per projection group (``gate_up_proj``, ``down_proj``) per
  experts module: weight, activation and output error summed over all experts, each expert
  fed the reference's tokens routed to it (``down_proj`` is fed the reference's intermediate
  ``act(x Wg^T) * (x Wu^T)``), and the expert with the lowest output SNR named.
* ``collect_expert_hessians``: ``H = 2 X_e^T X_e / T_e`` of each expert's routed tokens
  (shared by its gate and up projections) and of its intermediate (down projection), keyed
  ``<module>.<e>.gate_proj`` / ``up_proj`` / ``down_proj`` as ``FP8Experts.from_experts``
  names them; an expert no calibration token reached gets no Hessian.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..nn.convert import experts_skip_reason, linear_skip_reason
from ..nn.experts import FP8Experts, expert_parameter_count, experts_layout_problem, experts_modules
from .metrics import ErrorSums

__all__ = ["convertible_experts", "parameter_counts", "capture_expert_inputs",
           "expert_layer_errors", "collect_expert_hessians", "routed_rows"]


def convertible_experts(model: nn.Module) -> list[str]:
    """Names of the fused experts modules ``quantize_model`` converts (float ones in ``model``)."""
    return [n for n, m in experts_modules(model).items()
            if not isinstance(m, FP8Experts) and experts_layout_problem(m) is None
            and experts_skip_reason(n, m) is None]


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """``{"total", "fp8", "experts"}`` parameters of the float ``model``: ``fp8`` is what an FP8
    variant holds in FP8 (converted Linear weights + routed expert weights)."""
    total = sum(p.numel() for p in model.parameters())
    linear = sum(m.weight.numel() for n, m in model.named_modules()
                 if isinstance(m, nn.Linear) and linear_skip_reason(n, m) is None)
    experts = sum(expert_parameter_count(model.get_submodule(n))
                  for n in convertible_experts(model))
    return {"total": int(total), "fp8": int(linear + experts), "experts": int(experts)}


def routed_rows(top_k_index: torch.Tensor, num_experts: int) -> list[torch.Tensor]:
    """For each expert ``e``, the token rows whose top-k choice includes ``e`` (``[T_e]`` int64)."""
    return [torch.nonzero((top_k_index == e).any(-1)).flatten() for e in range(num_experts)]


def capture_expert_inputs(model: nn.Module, names: list[str], ids: torch.Tensor) -> dict:
    """Each named experts module's ``(hidden_states [T, H] fp32, top_k_index [T, k])`` when the
    model runs on ``ids [L]``."""
    captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(name: str):
        def pre(_m, args):
            captured[name] = (args[0].detach().float().clone(), args[1].detach().clone())
        return pre

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            model(ids.unsqueeze(0))
    finally:
        for h in handles:
            h.remove()
    return captured


def _reference_expert(module: nn.Module, e: int) -> tuple[torch.Tensor, torch.Tensor,
                                                          torch.Tensor]:
    """``(gate [I, H], up [I, H], down [H, I])`` of float experts ``module``'s expert ``e``, fp32."""
    gu = module.gate_up_proj[e].detach().float()
    i = gu.shape[0] // 2
    return gu[:i], gu[i:], module.down_proj[e].detach().float()


def expert_layer_errors(reference: nn.Module, layer: FP8Experts, name: str,
                        captured: tuple[torch.Tensor, torch.Tensor],
                        quantizes_acts: bool) -> list[dict]:
    """The rows ``f"{name}.gate_up_proj"`` and ``f"{name}.down_proj"`` of the per-layer table.

    Each aggregates every expert (sums of squares over experts, ``ErrorSums``); ``experts`` is
    ``E``, ``routed_experts`` how many got a sample token, ``worst_expert`` the one with the
    lowest output SNR and ``worst_expert_out_snr_db`` that SNR.
    """
    ref = reference.get_submodule(name)
    x, idx = captured
    act_only = layer.config.mode == "act_only"
    groups = {g: {"w": ErrorSums(), "a": ErrorSums(), "o": ErrorSums(), "worst": None}
              for g in ("gate_up_proj", "down_proj")}
    rows_of = routed_rows(idx, layer.num_experts)
    with torch.no_grad():
        for e in range(layer.num_experts):
            wg, wu, wd = _reference_expert(ref, e)
            wts = layer.expert_weights(e)
            deq = {k: (q.float() if act_only else _dequant(layer, k, q, s))
                   for k, (q, s) in wts.items()}
            groups["gate_up_proj"]["w"].add(torch.cat([wg, wu]),
                                            torch.cat([deq["gate_proj"], deq["up_proj"]]))
            groups["down_proj"]["w"].add(wd, deq["down_proj"])
            rows = rows_of[e]
            if rows.numel() == 0:
                continue
            xe = x[rows]
            h = layer.act_fn(xe @ wg.T) * (xe @ wu.T)
            pairs = {"gate_up_proj": (xe, [("gate_proj", wg), ("up_proj", wu)]),
                     "down_proj": (h, [("down_proj", wd)])}
            for g, (inp, mats) in pairs.items():
                y_ref = torch.cat([inp @ w.T for _, w in mats], -1)
                y = torch.cat([layer.expert_linear(inp, *wts[k], "gate_up" if g == "gate_up_proj"
                                                   else "down").float() for k, _ in mats], -1)
                one = ErrorSums()
                one.add(y_ref, y)
                groups[g]["o"].add(y_ref, y)
                if quantizes_acts:
                    groups[g]["a"].add(inp, _fake_quant(layer, inp))
                worst = groups[g]["worst"]
                if worst is None or one.snr_db < worst[1]:
                    groups[g]["worst"] = (e, one.snr_db)
    out = []
    shapes = {"gate_up_proj": [layer.num_experts, 2 * layer.intermediate_dim, layer.hidden_dim],
              "down_proj": [layer.num_experts, layer.hidden_dim, layer.intermediate_dim]}
    routed = sum(1 for r in rows_of if r.numel())
    for g, s in groups.items():
        worst = s["worst"]
        out.append({
            "name": f"{name}.{g}",
            "shape": shapes[g],
            "weight_snr_db": None if act_only else s["w"].snr_db,
            "weight_rel_error": None if act_only else s["w"].relative_error,
            "act_snr_db": s["a"].snr_db if quantizes_acts and routed else None,
            "act_rel_error": s["a"].relative_error if quantizes_acts and routed else None,
            "out_snr_db": s["o"].snr_db if routed else None,
            "out_rel_error": s["o"].relative_error if routed else None,
            "experts": layer.num_experts,
            "routed_experts": routed,
            "worst_expert": None if worst is None else worst[0],
            "worst_expert_out_snr_db": None if worst is None else worst[1],
        })
    return out


def _dequant(layer: FP8Experts, part: str, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    from .. import ops

    return ops.dequantize_blockwise(q, s, layer.matrix_block(part), torch.float32)


def _fake_quant(layer: FP8Experts, x: torch.Tensor) -> torch.Tensor:
    from .. import ops
    from ..nn.linear import quantize_activation

    q, s = quantize_activation(x, layer.config, layer.name)
    return ops.dequantize_groupwise(q, s, layer.config.act_group_size, torch.float32)


def collect_expert_hessians(model: nn.Module, names: list[str], windows: list[torch.Tensor],
                            on_window: Callable[[], None] | None = None
                            ) -> dict[str, torch.Tensor]:
    """Per-expert GPTQ Hessians of the float experts modules ``names`` over ``windows``.

    For expert ``e`` of module ``m`` with routed tokens ``X_e`` ``[T_e, H]`` (all windows) and
    intermediate ``Z_e = act(X_e Wg^T) * (X_e Wu^T)``: ``H = 2 X_e^T X_e / T_e`` under
    ``m.e.gate_proj`` and ``m.e.up_proj`` (one object), ``2 Z_e^T Z_e / T_e`` under
    ``m.e.down_proj``, float32. Experts no token was routed to are absent.
    """
    sums: dict[tuple[str, int], list] = {}

    def hook(name: str):
        module = model.get_submodule(name)

        def pre(_m, args):
            x, idx = args[0].detach().float(), args[1]
            for e, rows in enumerate(routed_rows(idx, module.gate_up_proj.shape[0])):
                if rows.numel() == 0:
                    continue
                wg, wu, _ = _reference_expert(module, e)
                xe = x[rows]
                z = module.act_fn(xe @ wg.T) * (xe @ wu.T)
                entry = sums.setdefault((name, e), [0, 0.0, 0.0])
                entry[0] += int(rows.numel())
                entry[1] = entry[1] + (xe.T @ xe).double()
                entry[2] = entry[2] + (z.T @ z).double()
        return pre

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            for w in windows:
                model(w.unsqueeze(0))
                if on_window:
                    on_window()
    finally:
        for h in handles:
            h.remove()
    out: dict[str, torch.Tensor] = {}
    for (name, e), (count, sx, sz) in sums.items():
        hx = (2.0 * sx / count).float()
        out[f"{name}.{e}.gate_proj"] = hx
        out[f"{name}.{e}.up_proj"] = hx
        out[f"{name}.{e}.down_proj"] = (2.0 * sz / count).float()
    return out
