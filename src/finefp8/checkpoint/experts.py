"""Mixture-of-experts weights fused on disk in 3-D tensors ``[E, ., .]`` (docs/checkpoints.md).

Most MoE checkpoints hold one 2-D tensor per expert (DeepSeek-V3, Qwen3-MoE, Mixtral: each
expert's projection is an ordinary Linear weight and ``quantize`` treats it as one). Some
families keep all experts of a projection in one 3-D tensor:

==================  =================================================  ======================
family              on disk                                            orientation
==================  =================================================  ======================
GraniteMoe(+Shared  ``block_sparse_moe.input_linear.weight [E, 2I, H]``  ``[E, out, in]``
/Hybrid)            ``block_sparse_moe.output_linear.weight [E, H, I]``
JetMoe              ``mlp.input_linear.weight [E, 2I, H]`` ...         ``[E, out, in]``
Llama 4             ``feed_forward.experts.gate_up_proj [E, H, 2I]``    ``[E, in, out]``
                    ``feed_forward.experts.down_proj [E, I, H]``
Aria                ``mlp.experts.fc1.weight [E, H, 2I]`` ...           ``[E, in, out]``
GPT-OSS (bf16)      ``mlp.experts.gate_up_proj [E, H, 2I]`` + biases    ``[E, in, out]``
==================  =================================================  ======================

What reads block FP8 for them: transformers' fine-grained FP8 integration replaces every
module whose name ends in ``.experts`` by its ``FP8Experts``, which holds ``gate_up_proj``
``[E, 2I, H]`` / ``up_proj`` ``[E, I, H]`` / ``down_proj`` ``[E, H, I]`` in FP8 with
``<name>_scale_inv`` ``[E, ceil(out/128), ceil(in/128)]`` (fp32), has no bias, and loads
a checkpoint through the family's weight renamings. So a fused tensor is quantized when,
renamed as transformers renames it for this ``model_type``, it is ``<...>.experts.gate_up_proj``
/ ``up_proj`` / ``down_proj`` stored ``[E, out, in]`` without a bias (GraniteMoe). Everything
else that is recognisably an expert stack is refused before anything is written, naming
the tensor: ``[E, in, out]`` stacks (Llama 4, Aria, GPT-OSS: ``FP8Experts`` expects
``[E, out, in]``, and vLLM's Llama 4 loader transposes fused experts only when they are
unquantized), stacks that transformers does not load into an experts module (JetMoe), and
any stack in the compressed-tensors layout (its FP8_BLOCK scheme targets Linear modules,
one 2-D weight per expert). ``--ignore`` keeps such tensors in high precision instead.

Recognising a stack (``classify``) uses the tensor's name, its shape and config.json: a 3-D
floating tensor is an expert stack when its first dimension is the config's expert count
(``n_routed_experts`` / ``num_local_experts`` / ``num_experts`` / ``moe_num_experts``) and
its other two are the hidden size ``H`` and the expert width ``I`` or ``2I``
(``moe_intermediate_size``, else ``intermediate_size``), or when its name contains
``expert``. Which projection it is comes from the name (``gate_up_proj``, ``down_proj``,
``w1``/``w2``/``w3``, ``input_linear``/``output_linear``, ``fc1``/``fc2``...) and, failing
that, from the shape when only one reading fits; the orientation follows from the shape.
A stack whose expert count, shape or name contradict the config is refused with the
tensor named.

Each expert ``e`` of an accepted stack is quantized on its own, exactly as a 2-D weight:
codes ``Q[e]`` ``[N, K]`` F8_E4M3 and scales ``s[e]`` ``[ceil(N/128), ceil(K/128)]`` (F32),
``W[e] ~= Q[e] * s[e]`` per 128x128 block; ``dequantize`` inverts it expert by expert.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Container, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import ops
from .errors import ConversionError
from .layout import COMPRESSED_TENSORS, FLOAT_DTYPES, FP8, FP8_DTYPES, matches_ignore
from .reader import ST_DTYPES, TensorInfo, read_rows

__all__ = [
    "MoeDims",
    "ExpertStack",
    "ExpertDecision",
    "moe_dims",
    "transformers_name",
    "classify",
    "expert_scale_key",
    "refusal",
    "decide_expert_stack",
    "fp8_expert_stacks",
    "write_quantized_stack",
    "write_dequantized_stack",
    "expert_parameter_count",
]

_EXPERT_COUNT_KEYS = ("n_routed_experts", "num_local_experts", "num_experts", "moe_num_experts")
_INTERMEDIATE_KEYS = ("moe_intermediate_size", "intermediate_size")
#: transformers' ``FP8Experts`` parameters and their ``(out, in)`` in units of (H, I).
_FP8_EXPERTS_PARAMS = {"gate_up_proj": "gate_up", "up_proj": "up", "down_proj": "down"}
#: name parts that say which projection a stack holds (matched as whole ``_``-separated words).
_DOWN_WORDS = ("down", "w2", "output", "fc2", "wo")
_UP_WORDS = ("gate", "up", "w1", "w3", "w13", "input", "fc1", "wi")


@dataclass(frozen=True)
class MoeDims:
    """The expert dimensions config.json declares: ``experts`` (E), ``hidden`` (H) and the
    candidate expert widths ``intermediate`` (I), and the ``model_type`` they came from."""

    experts: int | None
    hidden: int
    intermediate: tuple[int, ...]
    model_type: str


@dataclass(frozen=True)
class ExpertStack:
    """A 3-D tensor holding one projection of every expert.

    ``role``: ``"gate_up"`` (gate and up fused, out = 2I), ``"up"`` (out = I, in = H) or
    ``"down"`` (out = H, in = I). ``transposed``: stored ``[E, in, out]`` rather than
    ``[E, out, in]``. ``loaded_as``: its name once transformers renames it for the family.
    """

    key: str
    experts: int
    out_features: int
    in_features: int
    role: str
    transposed: bool
    loaded_as: str

    @property
    def shape(self) -> tuple[int, int, int]:
        """The shape on disk."""
        a, b = ((self.in_features, self.out_features) if self.transposed
                else (self.out_features, self.in_features))
        return self.experts, a, b

    def scale_shape(self, block: tuple[int, int] = (128, 128)) -> tuple[int, int, int]:
        """``[E, ceil(N/bm), ceil(K/bn)]``: per-expert block scales of an ``[E, N, K]`` stack."""
        return (self.experts, math.ceil(self.out_features / block[0]),
                math.ceil(self.in_features / block[1]))

    def describe(self) -> str:
        """E.g. ``"expert stack [8, 512, 256] (gate_up, [E, out, in])"``."""
        orient = "[E, in, out]" if self.transposed else "[E, out, in]"
        return f"expert stack {list(self.shape)} ({self.role}, {orient})"


@dataclass(frozen=True)
class ExpertDecision:
    """What ``quantize`` does with an expert stack: ``action`` ``"quantize"`` or ``"keep"``,
    ``reason`` in words, ``scale_key`` / ``scale_shape`` of the scales written, and
    ``kept_module``: the module transformers must leave unconverted when it is kept."""

    stack: ExpertStack
    action: str
    reason: str
    scale_key: str | None = None
    scale_shape: tuple[int, int, int] | None = None
    kept_module: str | None = None


# ----------------------------------------------------------------------------- config and names


def moe_dims(config: dict) -> MoeDims | None:
    """E, H and the candidate I of config.json, or ``None`` when it declares no hidden size.

    Read from the top level or, for multimodal models, ``text_config``: the first of them
    that declares an expert count, else the first with a hidden size.
    """
    found = []
    for cfg in (config or {}, (config or {}).get("text_config") or {}):
        hidden = cfg.get("hidden_size")
        if not isinstance(hidden, int):
            continue
        experts = next((cfg[k] for k in _EXPERT_COUNT_KEYS if isinstance(cfg.get(k), int)), None)
        widths = tuple(cfg[k] for k in _INTERMEDIATE_KEYS if isinstance(cfg.get(k), int))
        found.append(MoeDims(experts, hidden, widths,
                             str(cfg.get("model_type") or config.get("model_type"))))
    return next((d for d in found if d.experts is not None), found[0] if found else None)


def transformers_name(key: str, model_type: str) -> str:
    """``key`` as transformers names it after loading a checkpoint of ``model_type``: its
    weight renamings for the family applied in turn (``key`` unchanged when it has none)."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
        from transformers.core_model_loading import WeightRenaming
    except ImportError:  # transformers is a dependency; an old one has no renamings
        return key
    renamings = [t for t in (get_checkpoint_conversion_mapping(model_type) or [])
                 if isinstance(t, WeightRenaming)]
    for r in renamings:
        key, _ = r.rename_source_key(key)
    return key


def _name_role(key: str) -> str | None:
    """``"down"`` / ``"up"`` from the words of the tensor's last name part, else ``None``."""
    last = key.removesuffix(".weight").rsplit(".", 1)[-1].lower()
    words = set(re.split(r"[_\W]+", last))
    if words & set(_DOWN_WORDS):
        return "down"
    if words & set(_UP_WORDS):
        return "up"
    return None


def _readings(b: int, c: int, hidden: int,
              widths: Sequence[int]) -> list[tuple[str, bool, int, int]]:
    """Every ``(role, transposed, out, in)`` that a ``[E, b, c]`` stack can be."""
    out = []
    for i in widths:
        for role, n, k in (("gate_up", 2 * i, hidden), ("up", i, hidden), ("down", hidden, i)):
            if (b, c) == (n, k):
                out.append((role, False, n, k))
            if (b, c) == (k, n):
                out.append((role, True, n, k))
    return list(dict.fromkeys(out))


def classify(key: str, shape: Sequence[int], config: dict) -> ExpertStack | None:
    """The expert stack that 3-D tensor ``key`` of ``shape`` holds, or ``None`` when it is
    not one (it is then copied as it is).

    Raises ``ConversionError`` naming the tensor when it is recognisably an expert stack
    (named ``*expert*``, or first dimension = the config's expert count and the others
    built from H and I) but its expert count, shape or name disagree with config.json,
    or when its shape fits more than one projection and its name does not say which.
    """
    if len(shape) != 3:
        return None
    e, b, c = (int(v) for v in shape)
    named = "expert" in key.lower()
    dims = moe_dims(config)
    if dims is None or dims.experts is None:
        if named:
            raise ConversionError(
                f"tensor {key!r} {list(shape)} looks like a fused expert stack, but config.json "
                f"declares no expert count ({' / '.join(_EXPERT_COUNT_KEYS)}) and hidden size, so "
                f"its layout cannot be checked. Add the model's config.json, or keep the tensor "
                f"in high precision with --ignore")
        return None
    loaded_as = transformers_name(key, dims.model_type)
    param_role = _FP8_EXPERTS_PARAMS.get(loaded_as.rsplit(".", 1)[-1])
    readings = _readings(b, c, dims.hidden, dims.intermediate)
    if e != dims.experts:
        if named:
            raise ConversionError(
                f"tensor {key!r} {list(shape)} holds {e} experts but config.json declares "
                f"{dims.experts}: the checkpoint and its config disagree. Use the config.json "
                f"that belongs to these weights")
        return None
    if not readings:
        if named or param_role is not None:
            raise ConversionError(
                f"tensor {key!r} has the unexpected shape {list(shape)} for an expert stack: with "
                f"hidden_size {dims.hidden} and expert width(s) {list(dims.intermediate)} from "
                f"config.json it should be [{e}, out, in] (or [{e}, in, out]) with (out, in) one "
                f"of (2I, H), (I, H), (H, I). Check that config.json belongs to these weights")
        return None
    role = param_role or _name_role(key)
    if role is not None:
        wanted = ("gate_up", "up") if role in ("up", "gate_up") else ("down",)
        if param_role is not None:
            wanted = (param_role,)
        fits = [r for r in readings if r[0] in wanted]
        if not fits:
            raise ConversionError(
                f"tensor {key!r} {list(shape)}: its name says it is a {role} projection, but its "
                f"shape fits only {', '.join(f'{r[0]} {_orient(r[1])}' for r in readings)} with "
                f"hidden_size {dims.hidden}, expert width(s) {list(dims.intermediate)}. "
                f"Check config.json, or keep the tensor in high precision with --ignore")
        readings = fits
    if len(readings) > 1:
        raise ConversionError(
            f"tensor {key!r} {list(shape)} is an expert stack whose shape fits "
            f"{' or '.join(f'{r[0]} {_orient(r[1])}' for r in readings)}, and its name does not "
            f"say which projection it is; refusing to guess its orientation. Keep it in high "
            f"precision with --ignore")
    role, transposed, n, k = readings[0]
    return ExpertStack(key, e, n, k, role, transposed, loaded_as)


def _orient(transposed: bool) -> str:
    return "[E, in, out]" if transposed else "[E, out, in]"


def expert_scale_key(key: str, model_type: str) -> str:
    """Name of the block scales of FP8 expert stack ``key`` in the ``fp8`` layout: the name
    transformers gives the stack once loaded, plus ``_scale_inv``, which is where its
    ``FP8Experts`` reads them (its renamings match the weight's name only, so a scale saved
    next to an on-disk name such as ``input_linear.weight`` would not be found).

    ``mlp.experts.gate_up_proj`` -> ``mlp.experts.gate_up_proj_scale_inv``; GraniteMoe's
    ``block_sparse_moe.input_linear.weight`` -> ``block_sparse_moe.experts.gate_up_proj_scale_inv``.
    """
    return transformers_name(key, model_type) + "_scale_inv"


# ----------------------------------------------------------------------------- who reads it


def refusal(stack: ExpertStack, layout: str, has_bias: bool) -> str | None:
    """Why no engine would read ``stack`` quantized to block FP8 in ``layout`` (a sentence
    naming the tensor and what to do), or ``None`` when transformers' ``FP8Experts`` reads it."""
    every_layer = re.sub(r"\.\d+\.", ".*.", stack.key.removesuffix(".weight"))
    keep = f"Keep it (in every layer) in high precision with --ignore '{every_layer}'"
    head = f"cannot quantize fused {stack.describe()} {stack.key!r}"
    if layout == COMPRESSED_TENSORS:
        return (f"{head} in the compressed-tensors layout: its FP8_BLOCK scheme quantizes Linear "
                f"modules (one 2-D weight per expert), and no engine reads block-FP8 scales for a "
                f"fused 3-D expert tensor in it. Use --layout fp8 (transformers' FP8 experts "
                f"read it), or: {keep}")
    if stack.transposed:
        return (f"{head}: it is stored [E, in, out], and transformers' FP8 experts module reads "
                f"fused expert weights only as [E, out, in] with scales [E, ceil(out/128), "
                f"ceil(in/128)], while vLLM loads this family's fused experts only unquantized; "
                f"an FP8 copy would load in no engine. {keep}")
    module, _, param = stack.loaded_as.rpartition(".")
    in_experts_module = module == "experts" or module.endswith(".experts")
    if not in_experts_module or param not in _FP8_EXPERTS_PARAMS:
        return (f"{head}: transformers loads it as {stack.loaded_as!r}, not into an experts "
                f"module (<...>.experts.gate_up_proj / up_proj / down_proj), so its FP8 "
                f"integration would not read block-FP8 codes for it, and no other engine reads "
                f"this fused layout in FP8. {keep}")
    if has_bias:
        return (f"{head}: it has a bias, and transformers' FP8 experts module has no expert "
                f"biases. {keep}")
    return None


def decide_expert_stack(key: str, info: TensorInfo, config: dict, layout: str,
                        ignore: Sequence[str], keys: Container[str],
                        block: tuple[int, int] = (128, 128)) -> ExpertDecision | None:
    """``quantize``'s decision for 3-D tensor ``key``: ``None`` when it is not an expert
    stack (copied like any 3-D tensor), else quantize it or keep it (``--ignore``).

    ``keys``: every tensor name of the checkpoint (to find a bias ``<key>_bias`` /
    ``<module>.bias``). Raises ``ConversionError`` (``refusal``'s message) when the stack is
    not ignored and no engine would read it in FP8, so nothing is written.
    """
    if len(info.shape) != 3 or info.dtype not in FLOAT_DTYPES or 0 in info.shape:
        return None
    stack = classify(key, info.shape, config)
    if stack is None:
        return None
    module = stack.loaded_as.rpartition(".")[0]
    hit = matches_ignore(key, ignore)
    if hit is not None:
        return ExpertDecision(stack, "keep", f"kept: ignored ({hit})", kept_module=module)
    bias = (key + "_bias") if not key.endswith(".weight") else key[: -len("weight")] + "bias"
    why = refusal(stack, layout, bias in keys)
    if why is not None:
        raise ConversionError(why)
    return ExpertDecision(stack, "quantize", f"fused {stack.describe()}",
                          stack.loaded_as + "_scale_inv", stack.scale_shape(block))


def fp8_expert_stacks(infos: dict[str, TensorInfo], config: dict, layout: str | None,
                      block: tuple[int, int], where: str) -> dict[str, str]:
    """The FP8 3-D expert stacks of a quantized checkpoint and their scale tensors
    (``{stack key: scale key}``), for ``dequantize``.

    A 3-D F8 tensor ``x`` needs the scale ``expert_scale_key(x, model_type)`` of shape
    ``[E, ceil(N/bm), ceil(K/bn)]``; anything else is a ``ConversionError`` naming the tensor
    (``where``: the checkpoint, for the message).
    """
    dims = moe_dims(config)
    model_type = dims.model_type if dims else str((config or {}).get("model_type"))
    out = {}
    for key, info in infos.items():
        if len(info.shape) != 3 or info.dtype not in FP8_DTYPES:
            continue
        sk = expert_scale_key(key, model_type)
        if layout != FP8 or sk not in infos:
            raise ConversionError(f"{where}: FP8 expert stack {key!r} {list(info.shape)} has no "
                                  f"block scale {sk!r} (fused experts are read in the fp8 layout "
                                  f"only)")
        e, n, k = info.shape
        want = (e, math.ceil(n / block[0]), math.ceil(k / block[1]))
        if tuple(infos[sk].shape) != want:
            raise ConversionError(f"{where}: scale {sk!r} has shape {list(infos[sk].shape)}, "
                                  f"expected {list(want)} for FP8 expert stack {key!r} "
                                  f"{list(info.shape)} with {block[0]}x{block[1]} blocks per "
                                  f"expert")
        out[key] = sk
    return out


# ----------------------------------------------------------------------------- writing


def _expert_info(info: TensorInfo, e: int) -> TensorInfo:
    """Expert ``e`` of 3-D stack ``info`` as a 2-D tensor ``[N, K]`` (same file, offset moved)."""
    _, n, k = info.shape
    size = info.nbytes // info.shape[0]
    return TensorInfo(f"{info.key}[expert {e}]", info.dtype, (n, k), info.shard,
                      info.offset + e * size, size)


def write_quantized_stack(write: Callable[[str, torch.Tensor], None], root: str | Path,
                          info: TensorInfo, scale_key: str, block: tuple[int, int],
                          scale_fmt: str, allow_nonfinite: bool,
                          report: Callable[[int], None]) -> None:
    """Quantize stack ``info`` ``[E, N, K]`` expert by expert and ``write`` its codes
    (``[E, N, K]`` F8_E4M3, streamed expert after expert) then ``scale_key``
    (``[E, ceil(N/bm), ceil(K/bn)]`` F32). Reads one expert at a time.

    NaN/Inf in an expert, or codes whose ``Q * s`` overflows the source dtype, raise
    ``ConversionError`` naming the tensor and the expert unless ``allow_nonfinite``.
    """
    scales = []
    for e in range(info.shape[0]):
        sub = _expert_info(info, e)
        w = read_rows(root, sub, 0, sub.shape[0])
        try:
            q, s = ops.quantize_blockwise(w, block, scale_fmt, allow_nonfinite=allow_nonfinite,
                                          name=sub.key)
        except ValueError as err:
            raise ConversionError(f"{err}. Fix the source weights, keep the tensor in high "
                                  f"precision with --ignore, or pass --allow-nonfinite") from err
        if not allow_nonfinite:
            back = ops.dequantize_blockwise(q, s, block, w.dtype)
            if not bool(torch.isfinite(back).all()):
                raise ConversionError(
                    f"tensor {sub.key!r}: its FP8 codes times their scale overflow "
                    f"{str(w.dtype).replace('torch.', '')} (values this close to the dtype's "
                    f"maximum dequantize to Inf). Use --scale-fmt fp32, keep the tensor with "
                    f"--ignore, or pass --allow-nonfinite")
        write(info.key, q)
        scales.append(s.to(torch.float32))
        report(sub.nbytes)
    write(scale_key, torch.stack(scales))


def write_dequantized_stack(write: Callable[[str, torch.Tensor], None], root: str | Path,
                            info: TensorInfo, scale: TensorInfo, out_dtype: str,
                            block: tuple[int, int], allow_nonfinite: bool,
                            report: Callable[[int], None]) -> None:
    """``W[e] = Q[e] * s[e]`` for every expert of FP8 stack ``info``, written as safetensors
    dtype ``out_dtype`` expert after expert (the inverse of ``write_quantized_stack``)."""
    s_all = read_rows(root, scale, 0, scale.shape[0])
    dtype = ST_DTYPES[out_dtype]
    for e in range(info.shape[0]):
        sub = _expert_info(info, e)
        q = read_rows(root, sub, 0, sub.shape[0])
        w = ops.dequantize_blockwise(q, s_all[e], block, dtype, name=sub.key)
        if not allow_nonfinite and not bool(torch.isfinite(w).all()):
            raise ConversionError(
                f"dequantizing {sub.key!r} gives NaN or Inf (NaN codes, or Q * s above the "
                f"largest finite {str(dtype).replace('torch.', '')}). Choose a wider --dtype or "
                f"pass --allow-nonfinite to write it anyway")
        write(info.key, w)
        report(sub.nbytes)


# ----------------------------------------------------------------------------- inspect


def expert_parameter_count(shapes: dict[str, Sequence[int]], config: dict) -> dict[str, int]:
    """Parameters of the routed experts in a checkpoint, from tensor names and shapes.

    Counted: the 3-D expert stacks ``classify`` recognises, and the 2-D weights of per-expert
    modules (``...experts.<e>.<proj>.weight``, the DeepSeek-V3 / Mixtral / Qwen3-MoE layout).
    Returns ``{"experts": E, "expert_params": n, "stacks": n_3d, "per_expert_tensors": n_2d}``
    (``E`` from config.json, 0 when it declares none). Malformed stacks count as not experts
    here: ``inspect`` reports, ``quantize`` refuses.
    """
    per_expert = re.compile(r"(^|\.)experts\.\d+\.")
    params = stacks = tensors = 0
    for key, shape in shapes.items():
        if key.endswith(("_scale_inv", "_scale", ".input_scale")):
            continue
        if len(shape) == 3:
            try:
                stack = classify(key, shape, config)
            except ConversionError:
                stack = None
            if stack is not None:
                params += math.prod(shape)
                stacks += 1
        elif len(shape) == 2 and per_expert.search(key) and key.endswith(".weight"):
            params += math.prod(shape)
            tensors += 1
    dims = moe_dims(config)
    return {"experts": (dims.experts or 0) if dims else 0, "expert_params": params,
            "stacks": stacks, "per_expert_tensors": tensors}
