"""Conversion plans: for every input shard, the output tensors in file order, each with the
decision taken for it and why.

A plan fixes every output byte count before anything is written (free disk is checked from
it), and is the single place that decides what happens to a tensor: ``OutTensor.action`` is
``"copy"``, ``"quantize"``, ``"scale"`` or ``"dequantize"`` and ``OutTensor.reason`` says why
(``"2-D Linear weight"``, ``"kept: embedding"``, ``"kept: ignored (*.down_proj)"``...). Output
shard ``k`` has the name of input shard ``k``; a quantized weight's scale follows the weight
in the same shard.

``plan_quantize`` takes its per-tensor rule as a parameter (``decide``, default
``layout.skip_reason``), so a caller can keep more tensors (a serving constraint, a keep-set)
without touching the planner.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .errors import ConversionError
from .experts import decide_expert_stack, fp8_expert_stacks
from .layout import (
    COMPRESSED_TENSORS,
    FP8_DTYPES,
    LAYOUTS,
    grid_of,
    module_of,
    scale_key,
    skip_reason,
)
from .reader import ST_ITEMSIZE, CheckpointReader, TensorInfo, block_size_of
from .writer import shard_size

__all__ = [
    "DTYPES",
    "OutTensor",
    "ShardPlan",
    "plan_quantize",
    "plan_dequantize",
    "shard_metadata",
]

#: ``--dtype`` names of dequantize and their safetensors dtype names.
DTYPES = {"bf16": "BF16", "fp16": "F16", "fp32": "F32"}

#: ``decide(key, shape, dtype, ignore)`` -> why the tensor is kept, or ``None`` to quantize it.
Decide = Callable[[str, tuple[int, ...], str, Sequence[str]], "str | None"]


@dataclass(frozen=True)
class OutTensor:
    """One output tensor and the decision behind it.

    ``action``: ``"copy"`` (bytes as stored), ``"quantize"`` (FP8 codes of ``src``),
    ``"scale"`` (the block scales of the preceding quantized ``src``) or ``"dequantize"``
    (``src`` times its scale ``scale_src``). ``reason``: why, in words.
    """

    key: str
    dtype: str
    shape: tuple[int, ...]
    action: str
    src: TensorInfo
    scale_src: TensorInfo | None = None
    reason: str = ""


@dataclass
class ShardPlan:
    """The output tensors of one shard, in file order."""

    name: str
    tensors: list[OutTensor]
    metadata: dict[str, str]

    @property
    def entries(self) -> list[tuple[str, str, tuple[int, ...]]]:
        """``(key, dtype, shape)`` of every tensor, in file order (the writer's header)."""
        return [(t.key, t.dtype, t.shape) for t in self.tensors]

    @property
    def out_bytes(self) -> int:
        """Size of the output file."""
        return shard_size(self.entries, self.metadata)

    @property
    def in_bytes(self) -> int:
        """Bytes read from the input (progress is counted in these)."""
        return sum(t.src.nbytes for t in self.tensors if t.action != "scale")

    @property
    def data_bytes(self) -> int:
        """Tensor bytes written (what ``metadata.total_size`` counts)."""
        return sum(math.prod(t.shape) * ST_ITEMSIZE[t.dtype] for t in self.tensors)


def shard_metadata(reader: CheckpointReader, shard: str) -> dict[str, str]:
    """The ``__metadata__`` of output shard ``shard``: the input's, with ``format: pt``."""
    meta = dict(reader.shard_metadata.get(shard) or {})
    meta.setdefault("format", "pt")
    return meta


def plan_quantize(reader: CheckpointReader, layout: str, ignore: Sequence[str] = (),
                  block_size: tuple[int, int] = (128, 128), *,
                  decide: Decide = skip_reason) -> tuple[list[ShardPlan], list[str]]:
    """Output shards of ``quantize`` and the Linear-like modules kept in high precision.

    ``decide(key, shape, dtype, ignore)`` returns why a tensor is kept (``None``: quantize
    it); the default is ``layout.skip_reason``. A quantized ``[m, n]`` weight becomes F8_E4M3
    ``[m, n]`` plus an F32 scale ``[ceil(m/bm), ceil(n/bn)]`` named by ``layout``. Refuses an
    input that is already FP8 (``ConversionError`` suggesting ``dequantize``) and one with
    nothing to quantize.
    """
    if layout not in LAYOUTS:
        raise ConversionError(f"unknown --layout {layout!r}; expected one of {LAYOUTS}")
    if reader.config.get("quantization_config") or reader.quantized_weights():
        what = (reader.config.get("quantization_config") or {}).get("quant_method",
                                                                     "FP8 tensors")
        raise ConversionError(f"{reader.root} is already quantized ({what}): nothing to quantize. "
                              f"To convert it back to BF16 run: "
                              f"finefp8 dequantize {reader.root} OUT")
    plans, kept, n_quant = [], set(), 0
    for shard in reader.shards:
        out: list[OutTensor] = []
        for key in reader.shard_keys[shard]:
            info = reader.info(key)
            stack = decide_expert_stack(key, info, reader.config, layout, ignore, reader,
                                        block_size)  # fused 3-D experts: checkpoint/experts.py
            if stack is not None and stack.action == "quantize":
                out.append(OutTensor(key, "F8_E4M3", info.shape, "quantize", info,
                                     reason=stack.reason))
                out.append(OutTensor(stack.scale_key, "F32", stack.scale_shape, "scale", info,
                                     reason=f"per-expert block scales of {key}"))
                n_quant += 1
                continue
            if stack is not None:
                kept.add(stack.kept_module)
            why = decide(key, info.shape, info.dtype, ignore)
            if why is None:
                out.append(OutTensor(key, "F8_E4M3", info.shape, "quantize", info,
                                     reason="2-D Linear weight"))
                out.append(OutTensor(scale_key(key, layout), "F32",
                                     grid_of(info.shape, block_size), "scale", info,
                                     reason=f"block scales of {key}"))
                n_quant += 1
            else:
                if key.endswith(".weight") and len(info.shape) == 2 and why != "embedding":
                    kept.add(module_of(key))
                out.append(OutTensor(key, info.dtype, info.shape, "copy", info,
                                     reason=f"kept: {why}"))
        plans.append(ShardPlan(shard, out, shard_metadata(reader, shard)))
    if not n_quant:
        raise ConversionError(f"{reader.root}: no 2-D Linear weight to quantize (every tensor is "
                              f"kept by the rules or by --ignore)")
    return plans, sorted(kept)


def plan_dequantize(reader: CheckpointReader, dtype: str = "BF16") -> list[ShardPlan]:
    """Output shards of ``dequantize``: FP8 weights -> safetensors ``dtype``, their scales
    (and ``input_scale`` tensors) dropped; a shard that held only scales disappears."""
    layout = reader.layout
    if layout is None:
        raise ConversionError(f"{reader.root} is not an FP8 checkpoint (no quantization_config and "
                              f"no FP8 weights): nothing to dequantize")
    qc = reader.config.get("quantization_config") or {}
    if layout == COMPRESSED_TENSORS and qc.get("format", "float-quantized") != "float-quantized":
        raise ConversionError(f"{reader.root}: compressed-tensors format {qc.get('format')!r} is "
                              f"not float-quantized FP8; only FP8_BLOCK checkpoints are supported")
    bs = block_size_of(reader.config)
    stacks = fp8_expert_stacks({k: reader.info(k) for k in reader.keys()}, reader.config, layout,
                               bs, str(reader.root))  # fused 3-D experts: checkpoint/experts.py
    plans, used_scales = [], set(stacks.values())
    fp8_weights = set(reader.quantized_weights()) - set(stacks)
    for w in sorted(fp8_weights):
        sk = scale_key(w, layout)
        if sk not in reader:
            raise ConversionError(f"{reader.root}: FP8 tensor {w!r} has no block scale {sk!r} "
                                  f"(in any shard)")
        wshape, sshape = reader.shape(w), reader.shape(sk)
        if len(wshape) != 2 or tuple(sshape) != grid_of(wshape, bs):
            raise ConversionError(f"{reader.root}: scale {sk!r} has shape {list(sshape)}, expected "
                                  f"{list(grid_of(wshape, bs)) if len(wshape) == 2 else '?'} for "
                                  f"weight {list(wshape)} with {bs[0]}x{bs[1]} blocks (only "
                                  f"block-wise FP8 is supported)")
        used_scales.add(sk)
    for shard in reader.shards:
        out: list[OutTensor] = []
        for key in reader.shard_keys[shard]:
            info = reader.info(key)
            if key in used_scales or key.endswith(".input_scale"):
                continue
            if key in stacks:
                out.append(OutTensor(key, dtype, info.shape, "dequantize", info,
                                     reader.info(stacks[key]), reason="FP8 expert stack"))
            elif key in fp8_weights:
                out.append(OutTensor(key, dtype, info.shape, "dequantize", info,
                                     reader.info(scale_key(key, layout)),
                                     reason="FP8 block-quantized weight"))
            elif info.dtype in FP8_DTYPES:
                raise ConversionError(f"{reader.root}: FP8 tensor {key!r} is not a block-quantized "
                                      f"'.weight' with a scale; cannot dequantize it")
            else:
                out.append(OutTensor(key, info.dtype, info.shape, "copy", info,
                                     reason="kept: not FP8"))
        if out:
            plans.append(ShardPlan(shard, out, shard_metadata(reader, shard)))
    return plans
