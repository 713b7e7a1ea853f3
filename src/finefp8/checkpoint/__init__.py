"""FP8 checkpoints on disk: read, convert (quantize / dequantize) and inspect.

* ``CheckpointReader(path)``: lazy, index-aware reader of a safetensors checkpoint directory.
* ``detect_format(config)`` / ``scale_key(weight_key, fmt)``: the two on-disk FP8 layouts
  (``"fp8"``: ``weight_scale_inv``; ``"compressed-tensors"``: ``weight_scale``).
* ``dequantized_weight(reader, key, dtype)``: ``W = Q * s`` of one FP8 weight.
* ``quantize_checkpoint`` / ``dequantize_checkpoint``: streaming, resumable conversion.
* ``inspect_checkpoint``: per-tensor report and tensor-parallel support.
"""

from .layout import (
    COMPRESSED_TENSORS,
    FORMATS,
    FP8,
    detect_format,
    layer_kind,
    quantization_config,
    scale_key,
    skip_reason,
    tp_problems,
)
from .reader import (
    CheckpointError,
    CheckpointReader,
    TensorInfo,
    block_size_of,
    dequantized_weight,
    read_header,
)

__all__ = [
    "FP8",
    "COMPRESSED_TENSORS",
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
    "quantization_config",
    "block_size_of",
    "dequantized_weight",
]
