"""``FP8Experts``: transformers' fused MoE experts with every expert's weights in FP8.

transformers 5 holds the routed experts of a mixture-of-experts layer (DeepSeek-V3, Qwen3-MoE,
Mixtral, ...) as one module with two 3-D parameters and this forward::

    gate_up_proj  [E, 2I, H]     rows 0:I the gate projection, rows I:2I the up projection
    down_proj     [E, H, I]
    forward(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]
        for every expert e that some token chose (an index equal to E means "no expert"):
            x_e = hidden_states[tokens routed to e]
            h   = act_fn(x_e @ gate_e.T) * (x_e @ up_e.T)
            out[tokens] += (h @ down_e.T) * top_k_weights[token, slot]

(``FP8Experts`` adds each token's k weighted expert outputs in slot order, transformers' loop
in expert order: the same sum up to float rounding.)

The router stays in the model (its module is not touched), so the routing is the bf16
model's; ``FP8Experts`` replaces only this computation. Tensors held (``bm x bn`` blocks)::

    gate_up_proj            [E, 2I, H]                          float8_e4m3fn
    gate_up_proj_scale_inv  [E, 2*ceil(I/bm), ceil(H/bn)]       float32 (gate blocks, then up)
    down_proj               [E, H, I]                           float8_e4m3fn
    down_proj_scale_inv     [E, ceil(H/bm), ceil(I/bn)]         float32

Gate and up are blocked separately (vLLM's ``w13_weight_scale_inv`` layout), so each expert's
``gate_proj`` / ``up_proj`` of a per-expert checkpoint keeps its own ``[ceil(I/bm), ceil(H/bn)]``
grid; when ``I % bm == 0`` this is the ``[ceil(2I/bm), ceil(H/bn)]`` grid of the fused matrix.

Modes (``FP8Config.mode``), computed only for the experts some token chose:

* ``"w8a8"``: the routed tokens ``x_e`` are quantized in 1x128 groups, each projection is
  ``fp8_gemm(quant(x_e), W_q)`` (fp32 accumulation promoted every 128 of K), the
  intermediate ``h`` is quantized the same way before ``down``. On CUDA with DeepSeek-V3's
  settings every expert runs in one ``finefp8.ops.grouped_fp8_gemm`` launch per projection;
  elsewhere ``finefp8.ops.fp8_gemm`` runs per expert. Same numbers either way.
* ``"weight_only"``: ``x_e @ (W_q * s).T`` per expert (``finefp8.ops.weight_only_linear``).
* ``"act_only"``: float weights, only ``x_e`` and ``h`` quantized and dequantized (fp32 GEMMs).

Every projection's result is cast to the input's dtype, as ``FP8Linear`` does.
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Callable

import torch
from torch import nn

from .. import ops
from .config import FP8Config
from .linear import (
    FP8_DTYPES,
    WeightQuantizer,
    apply_keeping_codes,
    gemm_scale_index,
    quantize_activation,
)

__all__ = ["FP8Experts", "EXPERT_PARAMS", "is_experts_candidate", "experts_layout_problem",
           "experts_modules", "expert_parameter_count"]

#: The fused parameters of a transformers experts module, in the order they are computed.
EXPERT_PARAMS = ("gate_up_proj", "down_proj")
_FORWARD_ARGS = ("hidden_states", "top_k_index", "top_k_weights")


def _label(name: str | None) -> str:
    return f"FP8Experts {name!r}" if name else "FP8Experts"


def is_experts_candidate(module: nn.Module) -> bool:
    """True for a module that holds MoE experts as 3-D weights (or an ``FP8Experts``): a direct
    3-D floating parameter, in a module that says it holds experts (a ``num_experts``
    attribute, or "expert" in its class name) and is not a convolution. Such a module is
    either converted or refused, never silently skipped."""
    if isinstance(module, FP8Experts):
        return True
    if isinstance(module, nn.modules.conv._ConvNd):
        return False
    if not (hasattr(module, "num_experts") or "expert" in type(module).__name__.lower()):
        return False
    return any(p.dim() == 3 and p.is_floating_point()
               for p in module.parameters(recurse=False))


def experts_layout_problem(module: nn.Module) -> str | None:
    """Why ``module`` is not a fused experts module ``FP8Experts`` can replace, or ``None``.

    Accepted (read from the module, not from its class name): parameters ``gate_up_proj``
    ``[E, 2I, H]`` and ``down_proj`` ``[E, H, I]`` and no others, a ``forward(hidden_states,
    top_k_index, top_k_weights)``, an ``act_fn``, and transformers' experts flags (when
    present) saying: not transposed, gate and up concatenated, no bias, a gate, no norm
    after the experts, the default gating ``act_fn(gate) * up``.
    """
    params = dict(module.named_parameters(recurse=False))
    if set(params) != set(EXPERT_PARAMS):
        return (f"parameters {sorted(params)} (with shapes "
                f"{[list(p.shape) for p in params.values()]}); expected exactly gate_up_proj "
                f"[E, 2I, H] and down_proj [E, H, I]")
    gu, down = params["gate_up_proj"], params["down_proj"]
    if gu.dim() != 3 or down.dim() != 3:
        return f"gate_up_proj {list(gu.shape)} / down_proj {list(down.shape)} are not both 3-D"
    e, two_i, h = gu.shape
    if two_i % 2 or tuple(down.shape) != (e, h, two_i // 2):
        return (f"gate_up_proj {list(gu.shape)} and down_proj {list(down.shape)} are not "
                f"[E, 2I, H] and [E, H, I]")
    try:
        args = list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        args = []
    if tuple(args[:3]) != _FORWARD_ARGS:
        return f"forward{tuple(args)} is not forward(hidden_states, top_k_index, top_k_weights)"
    if not callable(getattr(module, "act_fn", None)):
        return "it has no act_fn"
    flags = {"is_transposed": False, "is_concatenated": True, "has_bias": False,
             "has_gate": True, "has_post_expert_norm": False}
    for flag, want in flags.items():
        if getattr(module, flag, want) != want:
            return f"{flag}={getattr(module, flag)!r} (supported: {want})"
    gate = getattr(type(module), "_apply_gate", None)
    if gate is not None and getattr(gate, "__name__", "") != "_default_apply_gate":
        return f"it has its own gating {type(module).__name__}._apply_gate"
    return None


def experts_modules(model: nn.Module) -> dict[str, nn.Module]:
    """``{name: module}`` of every experts module of ``model`` (``is_experts_candidate``)."""
    return {n: m for n, m in model.named_modules() if is_experts_candidate(m)}


def expert_parameter_count(module: nn.Module) -> int:
    """Weights held by an experts module: ``E * (2I * H + H * I)`` (float or FP8)."""
    if isinstance(module, FP8Experts):
        return module.gate_up_proj.numel() + module.down_proj.numel()
    return sum(p.numel() for p in module.parameters(recurse=False) if p.dim() == 3)


def _split_rows(n: int, block: int) -> int:
    return math.ceil(n / block)


def meta_shell(module: nn.Module) -> nn.Module:
    """A shallow copy of experts ``module`` whose ``gate_up_proj`` / ``down_proj`` are meta
    tensors: its class, config and ``act_fn`` without the weights' memory; ``module`` itself
    is not changed."""
    shell = copy.copy(module)
    shell._parameters = {k: nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
                         if p is not None else None for k, p in module._parameters.items()}
    shell._buffers = dict(module._buffers)
    shell._modules = dict(module._modules)
    return shell


class FP8Experts(nn.Module):
    """A fused experts module with E4M3 weights; see the module docstring for layout and math.

    Build one with ``FP8Experts.from_experts(module, config)`` (quantizes a transformers experts
    module) or ``FP8Experts.from_quantized(...)`` (codes and scales read from a checkpoint).

    Attributes:
        num_experts, hidden_dim, intermediate_dim: ``E``, ``H``, ``I``.
        config: the ``FP8Config``; ``block_size``: the weight block ``(bm, bn)``, or ``None``
            for one scale per expert matrix (``FP8Config.per_tensor()``); ``blocks``: the
            block of each matrix kind (``"gate_up"``, ``"down"``).
        act_fn: the activation of the gate (the original module's).
        name: the module's name in its model (error messages, reports).
        grouped: ``None`` (default) runs W8A8 through ``ops.grouped_fp8_gemm`` on CUDA and
            per expert elsewhere; ``True`` / ``False`` force the choice.
    """

    def __init__(self, num_experts: int, hidden_dim: int, intermediate_dim: int,
                 act_fn: Callable[[torch.Tensor], torch.Tensor], config: FP8Config | None = None,
                 *, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 name: str | None = None) -> None:
        super().__init__()
        self.num_experts, self.hidden_dim = int(num_experts), int(hidden_dim)
        self.intermediate_dim = int(intermediate_dim)
        self.act_fn = act_fn
        self.config = config or FP8Config()
        self.name = name
        self.grouped: bool | None = None
        self._shell: nn.Module | None = None  # the float module's class (float_module)
        e, h, i = self.num_experts, self.hidden_dim, self.intermediate_dim
        self.block_size = self.config.weight_block  # None: one scale per expert matrix
        #: the block of each expert's gate/up matrix ``[I, H]`` and down matrix ``[H, I]``
        self.blocks = {"gate_up": self.config.block_size(i, h), "down": self.config.block_size(h, i)}
        (bm, bn), (dm, dn) = self.blocks["gate_up"], self.blocks["down"]
        if self.config.mode == "act_only":
            for key, shape in (("gate_up_proj", (e, 2 * i, h)), ("down_proj", (e, h, i))):
                self.register_buffer(key, torch.zeros(shape, dtype=dtype, device=device))
                self.register_buffer(f"{key}_scale_inv", None)
        else:
            f8 = torch.float8_e4m3fn
            self.register_buffer("gate_up_proj", torch.zeros(e, 2 * i, h, dtype=f8, device=device))
            self.register_buffer("gate_up_proj_scale_inv", torch.ones(
                e, 2 * _split_rows(i, bm), _split_rows(h, bn), dtype=torch.float32, device=device))
            self.register_buffer("down_proj", torch.zeros(e, h, i, dtype=f8, device=device))
            self.register_buffer("down_proj_scale_inv", torch.ones(
                e, _split_rows(h, dm), _split_rows(i, dn), dtype=torch.float32, device=device))
        self._index: dict[str, tuple] = {}
        if self.config.mode == "w8a8":
            g, lab = self.config.act_group_size, _label(name)
            self._index = {
                "gate_up": (gemm_scale_index(i, bm, g, "rows", lab),
                            gemm_scale_index(h, bn, g, "columns", lab)),
                "down": (gemm_scale_index(h, dm, g, "rows", lab),
                         gemm_scale_index(i, dn, g, "columns", lab)),
            }

    # ------------------------------------------------------------------------- construction

    @classmethod
    def from_experts(cls, module: nn.Module, config: FP8Config | None = None, *,
                     name: str | None = None,
                     weight_quantizer: WeightQuantizer | None = None) -> FP8Experts:
        """Quantize a transformers experts module, each expert's gate, up and down on its own.

        ``weight_quantizer`` (default ``finefp8.ops.quantize_blockwise``) is called once per
        expert matrix with ``name=f"{name}.{e}.gate_proj"`` / ``.up_proj`` / ``.down_proj``.
        A module of another layout is refused (``ValueError`` naming it).
        """
        problem = experts_layout_problem(module)
        if problem is not None:
            raise ValueError(f"{_label(name)}: unsupported experts layout "
                             f"({type(module).__name__}): {problem}. Keep it in high precision "
                             f"with ignore=[{name!r}]")
        config = config or FP8Config()
        gu, down = module.gate_up_proj.detach(), module.down_proj.detach()
        if gu.device.type == "meta":
            raise ValueError(f"{_label(name)}: the weights are on the meta device (not loaded)")
        e, two_i, h = gu.shape
        i = two_i // 2
        mod = cls(e, h, i, module.act_fn, config, dtype=gu.dtype, device=gu.device, name=name)
        mod.set_float_module(module)
        if config.mode == "act_only":
            mod.gate_up_proj, mod.down_proj = gu, down
            return mod
        quantizer = weight_quantizer or ops.quantize_blockwise
        bs, ds, fmt = mod.blocks["gate_up"], mod.blocks["down"], config.scale_fmt
        for x in range(e):
            prefix = f"{name}.{x}" if name else str(x)
            qg, sg = quantizer(gu[x, :i], bs, fmt, name=f"{prefix}.gate_proj")
            qu, su = quantizer(gu[x, i:], bs, fmt, name=f"{prefix}.up_proj")
            qd, sd = quantizer(down[x], ds, fmt, name=f"{prefix}.down_proj")
            mod.set_expert(x, torch.cat([qg, qu]), torch.cat([sg, su]), qd, sd)
        return mod

    @classmethod
    def from_quantized(cls, gate_up: torch.Tensor, gate_up_scale_inv: torch.Tensor,
                       down: torch.Tensor, down_scale_inv: torch.Tensor,
                       act_fn: Callable[[torch.Tensor], torch.Tensor],
                       config: FP8Config | None = None, *, name: str | None = None) -> FP8Experts:
        """Wrap codes and scales as they are stored (no requantization).

        ``gate_up`` ``[E, 2I, H]`` and ``down`` ``[E, H, I]`` E4M3; the scales on the grids of
        the module docstring (any float dtype, kept as fp32).
        """
        config = config or FP8Config()
        if config.mode == "act_only":
            raise ValueError(f"{_label(name)}: mode 'act_only' needs the float weights; use "
                             f"from_experts")
        if gate_up.dim() != 3 or down.dim() != 3:
            raise ValueError(f"{_label(name)}: codes must be 3-D [E, 2I, H] and [E, H, I], got "
                             f"{list(gate_up.shape)} and {list(down.shape)}")
        e, two_i, h = gate_up.shape
        mod = cls(e, h, two_i // 2, act_fn, config, device=gate_up.device, name=name)
        mod._install("gate_up_proj", gate_up, gate_up_scale_inv)
        mod._install("down_proj", down, down_scale_inv)
        return mod

    def set_float_module(self, module: nn.Module) -> None:
        """Remember ``module``'s class and settings (not its weights) for ``float_module``."""
        object.__setattr__(self, "_shell", meta_shell(module))

    def float_module(self, weights: dict[str, torch.Tensor]) -> nn.Module:
        """The original experts module (same class, config, ``act_fn``) holding ``weights``
        (``{"gate_up_proj": [E, 2I, H], "down_proj": [E, H, I]}``) as its parameters."""
        if self._shell is None:
            raise ValueError(f"{_label(self.name)}: built without the original experts module; "
                             f"call set_float_module(module) first")
        m = copy.copy(self._shell)
        m._parameters = {k: nn.Parameter(w, requires_grad=False) for k, w in weights.items()}
        m._buffers, m._modules = dict(self._shell._buffers), dict(self._shell._modules)
        return m

    def _install(self, key: str, q: torch.Tensor, s: torch.Tensor) -> None:
        """Check and set the codes ``key`` and their scales ``key + "_scale_inv"``."""
        want_q = tuple(getattr(self, key).shape)
        want_s = tuple(getattr(self, f"{key}_scale_inv").shape)
        if q.dtype not in FP8_DTYPES:
            raise TypeError(f"{_label(self.name)}: {key} codes must be float8_e4m3fn, got {q.dtype}")
        if tuple(q.shape) != want_q:
            raise ValueError(f"{_label(self.name)}: {key} codes have shape {list(q.shape)}, "
                             f"expected {list(want_q)}")
        if not s.is_floating_point() or tuple(s.shape) != want_s:
            raise ValueError(f"{_label(self.name)}: {key} scales have shape {list(s.shape)}, "
                             f"expected {list(want_s)} for blocks {self.blocks}")
        setattr(self, key, q.contiguous())
        setattr(self, f"{key}_scale_inv", s.detach().to(torch.float32).contiguous())

    def set_expert(self, e: int, gate_up: torch.Tensor, gate_up_scale_inv: torch.Tensor,
                   down: torch.Tensor, down_scale_inv: torch.Tensor) -> None:
        """Set expert ``e``'s codes ``[2I, H]`` / ``[H, I]`` and scale grids in place."""
        for key, q, s in (("gate_up_proj", gate_up, gate_up_scale_inv),
                          ("down_proj", down, down_scale_inv)):
            dst, dst_s = getattr(self, key), getattr(self, f"{key}_scale_inv")
            if q.dtype != dst.dtype or tuple(q.shape) != tuple(dst.shape[1:]):
                raise ValueError(f"{_label(self.name)}: expert {e} {key}: codes {q.dtype} "
                                 f"{list(q.shape)}, expected {dst.dtype} {list(dst.shape[1:])}")
            if tuple(s.shape) != tuple(dst_s.shape[1:]):
                raise ValueError(f"{_label(self.name)}: expert {e} {key}: scales "
                                 f"{list(s.shape)}, expected {list(dst_s.shape[1:])}")
            dst[e].copy_(q)
            dst_s[e].copy_(s.to(torch.float32))

    # ------------------------------------------------------------------------- per-expert views

    def expert_weights(self, e: int) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """Expert ``e``'s matrices as ``{"gate_proj"|"up_proj"|"down_proj": (codes, scales)}``
        (views; in act_only the float weight and ``None``)."""
        i = self.intermediate_dim
        gi = _split_rows(i, self.blocks["gate_up"][0])
        gu, gus = self.gate_up_proj[e], self.gate_up_proj_scale_inv
        gus = None if gus is None else gus[e]
        down_s = None if self.down_proj_scale_inv is None else self.down_proj_scale_inv[e]
        return {"gate_proj": (gu[:i], None if gus is None else gus[:gi]),
                "up_proj": (gu[i:], None if gus is None else gus[gi:]),
                "down_proj": (self.down_proj[e], down_s)}

    def matrix_block(self, part: str) -> tuple[int, int]:
        """The weight block of ``"gate_proj"`` / ``"up_proj"`` / ``"down_proj"`` (``(bm, bn)``,
        the whole matrix with one scale per matrix)."""
        return self.blocks["down" if part == "down_proj" else "gate_up"]

    def dequantize_weights(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor,
                                                                              torch.Tensor]:
        """``(gate_up [E, 2I, H], down [E, H, I])`` as ``W = Q * s`` per block, in ``dtype``."""
        if self.config.mode == "act_only":
            return self.gate_up_proj.to(dtype), self.down_proj.to(dtype)
        gate_up, down = [], []
        for e in range(self.num_experts):
            w = {k: ops.dequantize_blockwise(q, s, self.matrix_block(k), dtype,
                                             name=f"{self.name}.{e}.{k}")
                 for k, (q, s) in self.expert_weights(e).items()}
            gate_up.append(torch.cat([w["gate_proj"], w["up_proj"]]))
            down.append(w["down_proj"])
        return torch.stack(gate_up), torch.stack(down)

    # ------------------------------------------------------------------------- math

    def expert_linear(self, x: torch.Tensor, q: torch.Tensor, s: torch.Tensor | None,
                      which: str) -> torch.Tensor:
        """One expert projection ``x [T, K] -> [T, N]`` in the configured mode, in x's dtype.

        ``(q, s)`` from ``expert_weights``; ``which`` is ``"gate_up"`` (gate or up) or
        ``"down"`` (it selects the matrix's block size)."""
        c = self.config
        if c.mode == "weight_only":
            return ops.weight_only_linear(x, q, s, None, block_size=self.blocks[which])
        if c.mode == "act_only":
            xf = ops.dequantize_groupwise(*quantize_activation(x, c, self.name),
                                          c.act_group_size, torch.float32)
            return (xf @ q.float().T).to(x.dtype)
        rows, cols = self._index[which]
        if rows is not None:
            s = s.index_select(0, rows.to(s.device))
        if cols is not None:
            s = s.index_select(1, cols.to(s.device))
        xq, xs = quantize_activation(x, c, self.name)
        y = ops.fp8_gemm(xq, xs, q, s, torch.float32, c.promote_every, c.accum_bits,
                         block_size=c.act_group_size)
        return y.to(x.dtype)

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` on its tokens ``x [T, H]``: ``down(act(gate(x)) * up(x))`` ``[T, H]``."""
        w = self.expert_weights(e)
        gate = self.expert_linear(x, *w["gate_proj"], "gate_up")
        up = self.expert_linear(x, *w["up_proj"], "gate_up")
        return self.expert_linear(self.act_fn(gate) * up, *w["down_proj"], "down")

    def _use_grouped(self, device: torch.device) -> bool:
        """Whether W8A8 runs as two grouped GEMMs (needs DeepSeek-V3's 128 settings)."""
        c = self.config
        fits = (c.mode == "w8a8" and c.act_granularity == "group" and c.act_group_size == 128
                and self.block_size == (128, 128) and c.promote_every == 128
                and c.accum_bits is None and self.intermediate_dim % 128 == 0
                and hasattr(ops, "grouped_fp8_gemm"))
        wanted = device.type == "cuda" if self.grouped is None else self.grouped
        return bool(fits and wanted)

    def _grouped_w8a8(self, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """W8A8 for rows ``x [M, H]`` sorted by expert (``offsets [E+1]``): two grouped GEMMs."""
        c, i = self.config, self.intermediate_dim
        xq, xs = quantize_activation(x, c, self.name)
        gu = ops.grouped_fp8_gemm(xq, xs, self.gate_up_proj, self.gate_up_proj_scale_inv,
                                  offsets, torch.float32).to(x.dtype)
        h = self.act_fn(gu[:, :i]) * gu[:, i:]
        hq, hs = quantize_activation(h, c, self.name)
        return ops.grouped_fp8_gemm(hq, hs, self.down_proj, self.down_proj_scale_inv, offsets,
                                    torch.float32).to(x.dtype)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        """The experts' output ``[T, H]`` for routing ``top_k_index`` / ``top_k_weights [T, k]``."""
        x = hidden_states
        if x.shape[-1] != self.hidden_dim:
            raise ValueError(f"{_label(self.name)}: input has {x.shape[-1]} features, expected "
                             f"{self.hidden_dim}")
        k = top_k_index.shape[-1]
        flat = top_k_index.reshape(-1)
        order = torch.argsort(flat, stable=True)
        chosen = flat[order]
        keep = chosen < self.num_experts  # index E: a slot routed to no expert
        order, chosen = order[keep], chosen[keep]
        if order.numel() == 0:
            return torch.zeros_like(x)
        tokens, slots = order // k, order % k
        counts = torch.bincount(chosen, minlength=self.num_experts)
        weights = top_k_weights[tokens, slots].unsqueeze(-1)
        rows = x[tokens]
        if self._use_grouped(x.device):
            offsets = torch.zeros(self.num_experts + 1, dtype=torch.int64, device=x.device)
            offsets[1:] = torch.cumsum(counts, 0)
            y = self._grouped_w8a8(rows, offsets)
        else:
            y = torch.empty_like(rows)
            bounds = [0, *torch.cumsum(counts, 0).tolist()]
            for e in range(self.num_experts):
                r0, r1 = bounds[e], bounds[e + 1]
                if r1 > r0:
                    y[r0:r1] = self.expert_forward(e, rows[r0:r1])
        # back to (token, slot) order, then the weighted sum over each token's k slots
        per_slot = x.new_zeros(x.shape[0] * k, x.shape[-1])
        per_slot[tokens * k + slots] = (y * weights).to(x.dtype)
        return per_slot.view(x.shape[0], k, -1).sum(1)

    # ------------------------------------------------------------------------- memory, printing

    def _apply(self, fn, recurse: bool = True):
        """Keep the codes and the fp32 scales in their dtypes through ``.to(dtype)``."""
        return apply_keeping_codes(self, super()._apply, fn, recurse,
                                   ("gate_up_proj", "gate_up_proj_scale_inv", "down_proj",
                                    "down_proj_scale_inv"))

    def weight_bytes(self) -> int:
        """Bytes held: codes + scales of every expert."""
        return sum(t.numel() * t.element_size() for t in self.buffers(recurse=False))

    def parameter_count(self) -> int:
        """Weights held (``E * 3 * I * H``)."""
        return self.gate_up_proj.numel() + self.down_proj.numel()

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, hidden_dim={self.hidden_dim}, "
                f"intermediate_dim={self.intermediate_dim}, {self.config.describe()}")
