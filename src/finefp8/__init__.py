"""finefp8: DeepSeek-V3-style fine-grained FP8 quantization.

The public API reads like the math::

    q, s = finefp8.quantize_blockwise(w)            # 128x128 blocks, s = amax / 448
    xq, xs = finefp8.quantize_groupwise(x)          # 1x128 groups per token
    y = finefp8.fp8_gemm(xq, xs, q, s)              # x @ w.T, fp32 promotion every 128 of K
"""

from .formats import E4M3, E5M2, UE8M0, FP8Format, decode, encode
from .gemm import limited_dot
from .ops import (
    dequantize_blockwise,
    dequantize_groupwise,
    fp8_gemm,
    grouped_fp8_gemm,
    quantize_blockwise,
    quantize_groupwise,
    select_backend,
)
from .version import __version__

#: Inference names, imported from ``finefp8.nn`` on first use (keeps ``import finefp8`` light).
_NN_EXPORTS = ("FP8Config", "FP8Linear", "FP8Experts", "quantize_model", "load", "save_fp8")


def __getattr__(name: str):
    if name in _NN_EXPORTS:
        from . import nn

        return getattr(nn, name)
    raise AttributeError(f"module 'finefp8' has no attribute {name!r}")

__all__ = [
    "E4M3",
    "E5M2",
    "UE8M0",
    "FP8Format",
    "encode",
    "decode",
    "quantize_blockwise",
    "dequantize_blockwise",
    "quantize_groupwise",
    "dequantize_groupwise",
    "fp8_gemm",
    "grouped_fp8_gemm",
    "limited_dot",
    "select_backend",
    "FP8Config",
    "FP8Linear",
    "FP8Experts",
    "quantize_model",
    "load",
    "save_fp8",
    "__version__",
]
