"""Fused experts modules <-> the per-expert tensors of a checkpoint: names, reading, writing.

transformers 5 holds a MoE layer's routed experts fused (``<m>.gate_up_proj [E, 2I, H]``,
``<m>.down_proj [E, H, I]``), while checkpoints, DeepSeek-V3's release and what
``save_pretrained`` writes, store one 2-D matrix per expert and projection, named by the
model family: ``<m>.{e}.gate_proj.weight`` / ``up_proj`` / ``down_proj`` (DeepSeek-V3,
Qwen3-MoE), ``...block_sparse_moe.experts.{e}.w1.weight`` / ``w3`` / ``w2`` (Mixtral). vLLM and
SGLang read that per-expert form, FP8 codes plus a ``weight_scale_inv`` (or compressed-tensors
``weight_scale``) per matrix.

The names are not listed here per family: ``expert_keys`` asks transformers' own weight
conversion mapping (``transformers.core_model_loading.revert_weight_conversion``, what
``save_pretrained`` runs) where each expert's rows of the fused parameters go, by reverting
small stand-in tensors whose values encode ``(expert, gate|up)``. A family without a
conversion keeps the fused 3-D names (one tensor per parameter).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..checkpoint import CheckpointError, CheckpointReader, scale_key
from ..formats import FP8_DTYPES
from .config import FP8Config
from .experts import EXPERT_PARAMS, FP8Experts, experts_layout_problem

__all__ = ["ExpertKey", "key_renamer", "expert_keys", "read_experts", "expert_state", "float_expert_state"]

@dataclass(frozen=True)
class ExpertKey:
    """Where one on-disk tensor goes in a fused experts module.

    Attributes:
        key: the checkpoint tensor name (``...experts.3.up_proj.weight``; for a stack fused on
            disk the family's name, e.g. GraniteMoe's ``block_sparse_moe.input_linear.weight``).
        param: ``"gate_up_proj"`` or ``"down_proj"``.
        expert: the expert index, or ``None`` for a fused 3-D tensor holding every expert.
        part: 0 (gate, or all of ``down_proj``) or 1 (up): the half of ``gate_up_proj``.
    """

    key: str
    param: str
    expert: int | None
    part: int


def _revert(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # a transformers without weight conversions stores experts as held
        return tensors
    return revert_weight_conversion(model, dict(tensors))


def key_renamer(model: nn.Module) -> Callable[[str], str]:
    """Checkpoint name -> model name under transformers' plain renamings for ``model`` (e.g.
    Mixtral's ``.block_sparse_moe.`` -> ``.mlp.``); the identity when there are none. The
    fused experts tensors are handled by ``expert_keys``, not here."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import PrefixChange, WeightRenaming, apply_renamings
    except ImportError:
        return lambda key: key
    renamings = [c for c in get_model_conversion_mapping(model, add_legacy=False)
                 if isinstance(c, WeightRenaming) and not isinstance(c, PrefixChange)]
    if not renamings:
        return lambda key: key
    return lambda key: apply_renamings(key, renamings)


def expert_keys(model: nn.Module, name: str, num_experts: int) -> list[ExpertKey]:
    """The checkpoint tensors of the experts module ``name`` of ``model``, for ``num_experts``.

    Reverts a stand-in ``gate_up_proj [E, 2, 1] = 2e + part`` and then ``down_proj
    [E, 1, 1] = e`` through transformers' conversion mapping and reads back which name
    received which value. Raises ``ValueError`` naming the module if the mapping mixes experts
    or halves in one tensor (a layout this module does not know).
    """
    e = int(num_experts)
    parts = {"gate_up_proj": 2, "down_proj": 1}
    keys: list[ExpertKey] = []
    for param, n in parts.items():
        fused = f"{name}.{param}"
        probe = torch.arange(n * e, dtype=torch.float32).view(e, n, 1)
        for key, t in _revert(model, {fused: probe}).items():
            if tuple(t.shape) == tuple(probe.shape) and torch.equal(t, probe):
                keys.append(ExpertKey(key, param, None, 0))  # fused on disk (maybe renamed)
                continue
            values = t.flatten().tolist()
            if len(values) != 1:
                raise ValueError(f"experts module {name!r}: transformers stores {param} on disk "
                                 f"as {key!r} of shape {list(t.shape)}, which mixes experts or "
                                 f"halves; this layout is not supported")
            v = int(values[0])
            keys.append(ExpertKey(key, param, v // n, v % n))
        got = {(k.expert, k.part) for k in keys if k.param == param}
        if (None, 0) not in got and len(got) != n * e:
            raise ValueError(f"experts module {name!r}: transformers' conversion mapping names "
                             f"{len(got)} tensors for {param}, expected {n * e} (one per expert"
                             f"{' and half' if n > 1 else ''}); unsupported layout")
    return keys


# ----------------------------------------------------------------------------- reading


def _expected_grid(shape: tuple[int, int], block: tuple[int, int]) -> tuple[int, int]:
    return math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1])


def read_experts(model: nn.Module, name: str, module: nn.Module, reader: CheckpointReader,
                 fmt: str, config: FP8Config, dtype: torch.dtype) -> tuple[nn.Module | None,
                                                                         dict[str, torch.Tensor],
                                                                         set[str]]:
    """Read the experts module ``name`` (a meta-device transformers experts module) from ``reader``.

    Returns ``(fp8_module, float_tensors, used_keys)``: an ``FP8Experts`` holding the stored
    codes and scales when the experts are FP8 on disk (``float_tensors`` empty), else ``None``
    and ``{f"{name}.gate_up_proj": [E, 2I, H], f"{name}.down_proj": [E, H, I]}`` in ``dtype``
    assembled from the float per-expert tensors. ``({}, set())`` when the checkpoint stores
    nothing for the module.

    Raises ``CheckpointError`` naming the tensor for: an FP8 expert without its scale, a tensor
    of unexpected shape, more or fewer experts on disk than the config says, FP8 and float
    experts mixed in one module, FP8 tensors for a module whose layout ``FP8Experts`` cannot
    hold (its float tensors are left to the ordinary state-dict loading).
    """
    where = str(reader.root)
    problem = experts_layout_problem(module)
    if problem is not None:  # float experts load as ordinary parameters; FP8 ones cannot
        rename = key_renamer(model)
        for key in reader.keys():
            if reader.dtype(key) in FP8_DTYPES and rename(key).startswith(f"{name}."):
                raise CheckpointError(f"{where}: tensor {key!r} is FP8, but experts module "
                                      f"{name!r} ({type(module).__name__}) has a layout "
                                      f"FP8Experts does not hold: {problem}. Convert it with "
                                      f"'finefp8 dequantize' or keep it in high precision")
        return None, {}, set()
    e_cfg = int(module.gate_up_proj.shape[0])
    h, i = int(module.down_proj.shape[1]), int(module.down_proj.shape[2])
    keys = expert_keys(model, name, e_cfg)
    present = [k for k in keys if k.key in reader]
    if not present:  # stored fused on disk, as the module holds them?
        keys = [ExpertKey(f"{name}.{p}", p, None, 0) for p in EXPERT_PARAMS]
        present = [k for k in keys if k.key in reader]
        if not present:
            return None, {}, set()
    extra = expert_keys(model, name, e_cfg + 1)
    for k in extra:
        if k.expert == e_cfg and k.key in reader:
            raise CheckpointError(f"{where}: tensor {k.key!r} is expert {e_cfg}, but config.json "
                                  f"gives {e_cfg} experts (0..{e_cfg - 1}) to {name!r}: the "
                                  f"expert count in config.json does not match the checkpoint")
    for k in keys:
        if k.key not in reader:
            have = sorted({p.expert for p in present if p.expert is not None})
            raise CheckpointError(
                f"{where}: the checkpoint lacks tensor {k.key!r} of experts module {name!r}: the "
                f"config gives {e_cfg} experts, the checkpoint has tensors for "
                f"{len(have)} ({', '.join(map(str, have[:8]))}{'...' if len(have) > 8 else ''})")
    kinds = {k.key: reader.dtype(k.key) in FP8_DTYPES for k in keys}
    if len(set(kinds.values())) > 1:
        fp8 = next(k for k, v in kinds.items() if v)
        flt = next(k for k, v in kinds.items() if not v)
        raise CheckpointError(f"{where}: experts module {name!r} mixes FP8 ({fp8!r}) and float "
                              f"({flt!r}) tensors; quantize or keep all its experts alike")
    is_fp8 = next(iter(kinds.values()))
    shapes = {"gate_up_proj": (i, h), "down_proj": (h, i)}
    block = config.weight_block or (1 << 30, 1 << 30)
    used: set[str] = set()
    codes = {"gate_up_proj": [[None, None] for _ in range(e_cfg)],
             "down_proj": [[None] for _ in range(e_cfg)]}
    scales = {"gate_up_proj": [[None, None] for _ in range(e_cfg)],
              "down_proj": [[None] for _ in range(e_cfg)]}
    fused: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    for k in keys:
        shape = tuple(reader.shape(k.key))
        if k.expert is None:
            want = (e_cfg, 2 * i, h) if k.param == "gate_up_proj" else (e_cfg, h, i)
        else:
            want = shapes[k.param]
        if shape != want:
            raise CheckpointError(f"{where}: tensor {k.key!r} has shape {list(shape)}, but "
                                  f"{name!r} of the config expects {list(want)} "
                                  f"(E={e_cfg}, hidden={h}, intermediate={i})")
        t = reader.get(k.key)
        s = None
        if is_fp8:
            # a fused stack's scale sits under the name transformers gives the stack
            # (finefp8.checkpoint.experts.expert_scale_key), per-expert ones under the weight's
            skey = (f"{name}.{k.param}_scale_inv" if k.expert is None
                    else scale_key(k.key, fmt))
            if skey not in reader:
                raise CheckpointError(f"{where}: FP8 tensor {k.key!r} has no scale {skey!r}")
            if k.expert is None:
                grid = (e_cfg, *_expected_grid(shape[1:], block))
                if k.param == "gate_up_proj" and i % block[0]:
                    raise CheckpointError(
                        f"{where}: fused FP8 stack {k.key!r} has gate/up blocks of {block[0]} "
                        f"rows across I={i} rows: a block straddles the gate and up halves, "
                        f"which FP8Experts (gate and up blocked apart) cannot hold; keep it "
                        f"in high precision (quantize --ignore) instead")
            else:
                grid = _expected_grid(shape, block)
            if tuple(reader.shape(skey)) != grid:
                raise CheckpointError(f"{where}: scale {skey!r} has shape "
                                      f"{list(reader.shape(skey))}, expected {list(grid)} for "
                                      f"{k.key!r} {list(shape)} with {block[0]}x{block[1]} blocks")
            s = reader.get(skey)
            used.add(skey)
        used.add(k.key)
        if k.expert is None:
            fused[k.param] = (t, s)
        else:
            codes[k.param][k.expert][k.part] = t
            scales[k.param][k.expert][k.part] = s
    stacked = {}
    for p in EXPERT_PARAMS:
        if p in fused:
            stacked[p] = fused[p]
            continue
        q = torch.stack([torch.cat(parts) for parts in codes[p]])
        s = torch.stack([torch.cat(parts) for parts in scales[p]]) if is_fp8 else None
        stacked[p] = (q, s)
    if not is_fp8:
        return None, {f"{name}.{p}": stacked[p][0].to(dtype) for p in EXPERT_PARAMS}, used
    fp8 = FP8Experts.from_quantized(stacked["gate_up_proj"][0], stacked["gate_up_proj"][1],
                                    stacked["down_proj"][0], stacked["down_proj"][1],
                                    module.act_fn, config, name=name)
    fp8.set_float_module(module)
    return fp8, {}, used


# ----------------------------------------------------------------------------- writing


def expert_state(model: nn.Module, name: str, module: FP8Experts) -> dict[str, torch.Tensor]:
    """The per-expert checkpoint tensors of ``FP8Experts`` ``name``: for each expert matrix its
    E4M3 codes under the family's on-disk name (``expert_keys``) and its fp32 scale grid under
    ``<name>.weight_scale_inv``; a family stored fused gets its stack under its on-disk name and
    the scales under ``<module>.<param>_scale_inv`` (where transformers' FineGrainedFP8 and
    ``finefp8.checkpoint.experts`` put them).
    """
    out: dict[str, torch.Tensor] = {}
    for k in expert_keys(model, name, module.num_experts):
        if k.expert is None:  # a family that stores the stack fused (GraniteMoe)
            bm = module.blocks["gate_up"][0]
            if k.param == "gate_up_proj" and module.intermediate_dim % bm:
                raise ValueError(f"experts module {name!r}: its family stores gate_up_proj fused "
                                 f"on disk ({k.key!r}), whose {bm}-row blocks would straddle the "
                                 f"gate and up halves (I={module.intermediate_dim}); it cannot be "
                                 f"saved in FP8")
            out[k.key] = getattr(module, k.param)
            out[f"{name}.{k.param}_scale_inv"] = getattr(module, f"{k.param}_scale_inv")
            continue
        part = ("gate_proj", "up_proj")[k.part] if k.param == "gate_up_proj" else "down_proj"
        q, s = module.expert_weights(k.expert)[part]
        out[k.key] = q
        out[scale_key(k.key, "fp8")] = s
    return dict(sorted(out.items(), key=lambda kv: _natural(kv[0])))


def _natural(key: str) -> list:
    return [int(p) if p.isdigit() else p for p in key.split(".")]


def float_expert_state(model: nn.Module, name: str, module: nn.Module) -> dict[str, torch.Tensor]:
    """The checkpoint tensors of a float experts module ``name`` (kept in high precision), in
    the form ``save_pretrained`` writes (transformers' conversion mapping, reverted)."""
    fused = {f"{name}.{p}": t.detach() for p, t in module.named_parameters(recurse=False)}
    return dict(sorted(_revert(model, fused).items(), key=lambda kv: _natural(kv[0])))
