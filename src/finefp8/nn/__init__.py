"""FP8 inference in PyTorch: ``FP8Linear``, ``FP8Config``, ``quantize_model`` and ``load``.

* ``FP8Config``: the quantization settings (mode, scale format, weight blocks, activation groups).
* ``FP8Linear``: a linear layer holding its weight as E4M3 codes + fp32 block scales.
* ``FP8Experts``: transformers' fused MoE experts with every expert's weights in FP8.
* ``quantize_model(model, ...)``: swap a model's ``nn.Linear`` layers for ``FP8Linear`` and its
  fused experts for ``FP8Experts``, in place.
* ``dequantize_model(model, dtype)``: the reverse, ``W = Q * s`` back in ``nn.Linear`` layers.
* ``load(path, ...)``: a transformers model built from an FP8 checkpoint, FP8 weights kept in FP8.
* ``save_fp8(model, path, ...)``: the reverse: write a model's FP8 layers as an ``"fp8"`` checkpoint.
"""

from .config import ACT_GRANULARITIES, MODES, FP8Config
from .convert import (
    dequantize_model,
    fp8_modules,
    kept_linear_modules,
    linear_skip_reason,
    quantize_model,
)
from .experts import FP8Experts
from .linear import FP8Linear, WeightQuantizer, resident_bytes
from .loading import checkpoint_fp8_config, load
from .saving import save_fp8

__all__ = [
    "FP8Config",
    "FP8Linear",
    "FP8Experts",
    "MODES",
    "ACT_GRANULARITIES",
    "WeightQuantizer",
    "quantize_model",
    "dequantize_model",
    "load",
    "save_fp8",
    "checkpoint_fp8_config",
    "fp8_modules",
    "kept_linear_modules",
    "linear_skip_reason",
    "resident_bytes",
]
