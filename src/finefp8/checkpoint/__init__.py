"""FP8 checkpoints on disk: read, convert (quantize / dequantize) and inspect.

* ``CheckpointReader(path)``: lazy, index-aware reader of a safetensors checkpoint directory.
* ``detect_format(config)`` / ``scale_key(weight_key, layout)``: the two on-disk FP8 layouts
  (``"fp8"``: ``weight_scale_inv``; ``"compressed-tensors"``: ``weight_scale``).
* ``dequantized_weight(reader, key, dtype)``: ``W = Q * s`` of one FP8 weight.
* ``quantize_checkpoint`` / ``dequantize_checkpoint``: streaming, resumable conversion.
* ``scale_problem(key, scale)``: why a block-scale tensor is unsound (NaN/Inf, <= 0, integer).
* ``inspect_checkpoint``: per-tensor report and tensor-parallel support.
* ``engine_layers`` / ``layer_outcome`` / ``serving_plan``: what vLLM does with each layer at
  each TP degree, and what to keep in high precision so that it serves right (``serving``).
"""

from .layout import (
    COMPRESSED_TENSORS,
    FORMATS,
    FP8,
    LAYOUTS,
    detect_format,
    quantization_config,
    scale_key,
    skip_reason,
)
from .reader import (
    CheckpointError,
    CheckpointReader,
    TensorInfo,
    block_size_of,
    dequantized_weight,
    read_header,
)
from .serving import engine_layers, layer_kind, layer_outcome, serving_plan, tp_problems
from .validate import scale_problem

__all__ = [
    "FP8",
    "COMPRESSED_TENSORS",
    "LAYOUTS",
    "FORMATS",
    "CheckpointError",
    "CheckpointReader",
    "TensorInfo",
    "read_header",
    "detect_format",
    "scale_key",
    "skip_reason",
    "layer_kind",
    "tp_problems",
    "engine_layers",
    "layer_outcome",
    "serving_plan",
    "quantization_config",
    "block_size_of",
    "dequantized_weight",
    "scale_problem",
]
