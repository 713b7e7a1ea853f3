"""The on-disk FP8 layouts and the naming rules of Hugging Face checkpoints (docs/checkpoints.md).

Two layouts store a block-quantized weight ``W ~= Q * s`` (``Q`` ``[out, in]`` F8_E4M3,
``s`` ``[ceil(out/128), ceil(in/128)]``):

* ``"fp8"`` (DeepSeek-V3 / transformers FineGrainedFP8 / vLLM / SGLang):
  ``<module>.weight`` + ``<module>.weight_scale_inv`` (F32), and in ``config.json``
  ``quantization_config = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
  "weight_block_size": [128, 128], "modules_to_not_convert": [...]}`` (+ ``"scale_fmt": "ue8m0"``).
* ``"compressed-tensors"`` (float-quantized, scheme FP8_BLOCK; llm-compressor / vLLM):
  ``<module>.weight`` + ``<module>.weight_scale`` and a ``config_groups`` quantization_config.
  We write ``weight_scale`` as F32 (compressed-tensors' decompressor and vLLM accept any float
  dtype; F32 keeps the exact ``amax/448`` that produced the codes, where a bf16 scale would not).

Which tensors ``quantize`` converts: every 2-D floating ``<module>.weight`` of a Linear layer.
Kept as they are: embeddings, ``lm_head``, norms, biases, tensors that are not 2-D, MoE routers
(``mlp.gate``, ``router``, ``shared_expert_gate``; ``mlp.gate_proj`` *is* a Linear and is
quantized) and anything matching an ``ignore`` pattern (a glob, or ``re:<regex>`` matched at the
start of the module name as compressed-tensors does).
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Iterable, Sequence

from ..quantization import BLOCK_SIZE

__all__ = [
    "OTHER_WEIGHT_FORMATS",
    "FP8",
    "COMPRESSED_TENSORS",
    "LAYOUTS",
    "FORMATS",
    "FLOAT_DTYPES",
    "FP8_DTYPES",
    "detect_format",
    "scale_key",
    "module_of",
    "is_scale_key",
    "skip_reason",
    "matches_ignore",
    "fp8_quantization_config",
    "compressed_tensors_quantization_config",
    "quantization_config",
    "grid_of",
]

FP8 = "fp8"
COMPRESSED_TENSORS = "compressed-tensors"
#: the on-disk FP8 layouts (``quantize_checkpoint(layout=...)``, ``finefp8 quantize --layout``).
LAYOUTS = (FP8, COMPRESSED_TENSORS)
#: deprecated name of ``LAYOUTS``.
FORMATS = LAYOUTS

#: Other serializations of a model's weights (PyTorch pickles, GGUF, ONNX, TF/Flax, ...).
#: finefp8 reads safetensors only, so it never reads, downloads or copies these: they hold the
#: same weights again, unconverted, and an FP8 folder that carried them would not be FP8.
OTHER_WEIGHT_FORMATS = ("*.bin", "*.pth", "*.pt", "*.gguf", "*.onnx", "*.onnx_data",
                        "*.msgpack", "*.h5", "*.ckpt", "*.tflite", "*.ot")
#: safetensors dtype names of the inputs ``quantize`` accepts and of FP8 codes.
FLOAT_DTYPES = ("BF16", "F16", "F32")
FP8_DTYPES = ("F8_E4M3", "F8_E5M2")

_SCALE_SUFFIX = {FP8: ".weight_scale_inv", COMPRESSED_TENSORS: ".weight_scale"}
_EMBEDDING_PARTS = ("embed_tokens", "embed_positions", "embeddings", "wte", "wpe",
                    "word_embeddings", "tok_embeddings", "embed")
_HEAD_PARTS = ("lm_head", "output", "score", "classifier")
_ROUTER_PARTS = ("gate", "router", "shared_expert_gate")


# ----------------------------------------------------------------------------- formats


def detect_format(config: dict) -> str | None:
    """Which FP8 layout ``config.json``'s ``quantization_config`` declares.

    Returns ``"fp8"`` for ``quant_method == "fp8"``, ``"compressed-tensors"`` for
    ``quant_method == "compressed-tensors"``, ``None`` when there is no quantization_config.
    Any other quant_method (gptq, awq, bitsandbytes...) is a ``ValueError``.
    """
    qc = (config or {}).get("quantization_config")
    if not qc:
        return None
    method = qc.get("quant_method")
    if method == FP8:
        return FP8
    if method == COMPRESSED_TENSORS:
        return COMPRESSED_TENSORS
    raise ValueError(f"quantization_config.quant_method {method!r} is not an FP8 block layout this "
                     f"tool reads (expected 'fp8' or 'compressed-tensors')")


def scale_key(weight_key: str, layout: str) -> str:
    """Name of the block-scale tensor of ``weight_key`` in on-disk layout ``layout``.

    ``"x.weight"`` -> ``"x.weight_scale_inv"`` (fp8) or ``"x.weight_scale"`` (compressed-tensors).
    """
    if layout not in _SCALE_SUFFIX:
        raise ValueError(f"unknown FP8 layout {layout!r}; expected one of {LAYOUTS}")
    if not weight_key.endswith(".weight"):
        raise ValueError(f"tensor {weight_key!r} is not a '.weight' tensor: it has no block scale")
    return weight_key[: -len(".weight")] + _SCALE_SUFFIX[layout]


def is_scale_key(key: str) -> bool:
    """True for ``*.weight_scale_inv`` / ``*.weight_scale`` names."""
    return key.endswith(".weight_scale_inv") or key.endswith(".weight_scale")


def module_of(key: str) -> str:
    """``"model.layers.0.mlp.down_proj.weight"`` -> ``"model.layers.0.mlp.down_proj"``."""
    return key.rsplit(".", 1)[0] if "." in key else key


# ----------------------------------------------------------------------------- what is quantized


def matches_ignore(key: str, patterns: Iterable[str]) -> str | None:
    """The first ``ignore`` pattern that matches tensor ``key`` (or its module), else ``None``.

    ``re:<regex>``: ``re.match`` against the module name (anchored at the start, as
    compressed-tensors does) or the tensor name. Anything else: an ``fnmatch`` glob against
    the module name or the tensor name (``"*.mlp.down_proj"``, ``"model.layers.0.*"``).
    A bare module name such as ``"lm_head"`` also matches as a last-component name.
    """
    module = module_of(key)
    last = module.rsplit(".", 1)[-1]
    for p in patterns:
        if p.startswith("re:"):
            rx = re.compile(p[3:])
            if rx.match(module) or rx.match(key):
                return p
        elif (fnmatch.fnmatchcase(module, p) or fnmatch.fnmatchcase(key, p)
              or fnmatch.fnmatchcase(last, p)):
            return p
    return None


def skip_reason(key: str, shape: Sequence[int], dtype: str,
                ignore: Iterable[str] = ()) -> str | None:
    """Why tensor ``key`` is kept as it is by ``quantize``, or ``None`` when it is quantized.

    ``dtype`` is the safetensors dtype name (``"BF16"``...). Quantized: a 2-D ``*.weight`` of a
    Linear layer in BF16/F16/F32 that no rule below keeps.
    """
    if not key.endswith(".weight"):
        return "not a .weight"
    if len(shape) != 2:
        return f"{len(shape)}-D"
    if dtype not in FLOAT_DTYPES:
        return f"dtype {dtype}"
    if 0 in tuple(shape):
        return "empty"
    module = module_of(key)
    parts = module.split(".")
    last = parts[-1]
    if any(p in _EMBEDDING_PARTS for p in parts) or "embed" in last:
        return "embedding"
    if last in _HEAD_PARTS and len(parts) <= 2:
        return "output head"
    if last == "lm_head":
        return "output head"
    if last in _ROUTER_PARTS or (len(parts) > 1 and parts[-2] == "router"):
        return "MoE router"  # GraniteMoe's router is <...>.router.layer
    if "norm" in last or last.startswith("ln"):
        return "norm"
    hit = matches_ignore(key, ignore)
    if hit is not None:
        return f"ignored ({hit})"
    return None


# ----------------------------------------------------------------------------- config builders


def fp8_quantization_config(scale_fmt: str = "fp32",
                            modules_to_not_convert: Sequence[str] = ("lm_head",),
                            block_size: tuple[int, int] = BLOCK_SIZE) -> dict:
    """``quantization_config`` of the DeepSeek/HF ``"fp8"`` layout (docs/checkpoints.md)."""
    qc = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [int(block_size[0]), int(block_size[1])],
    }
    if scale_fmt == "ue8m0":
        qc["scale_fmt"] = "ue8m0"
    qc["modules_to_not_convert"] = list(modules_to_not_convert)
    return qc


def compressed_tensors_quantization_config(ignore: Sequence[str] = ("lm_head",),
                                           block_size: tuple[int, int] = BLOCK_SIZE) -> dict:
    """``quantization_config`` of compressed-tensors' float-quantized FP8_BLOCK scheme."""
    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": 8, "type": "float", "strategy": "block",
                            "block_structure": [int(block_size[0]), int(block_size[1])],
                            "symmetric": True, "dynamic": False},
                "input_activations": {"num_bits": 8, "type": "float", "strategy": "group",
                                      "group_size": int(block_size[1]), "symmetric": True,
                                      "dynamic": True},
                "output_activations": None,
                "format": "float-quantized",
            }
        },
        "ignore": list(ignore),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
    }


def quantization_config(layout: str, scale_fmt: str, kept_modules: Sequence[str]) -> dict:
    """The ``quantization_config`` for on-disk layout ``layout``; ``kept_modules`` are Linear-like modules
    left unquantized (``lm_head`` is always listed: with tied embeddings it has no tensor)."""
    kept = ["lm_head"] + sorted(m for m in set(kept_modules) if m != "lm_head")
    if layout == FP8:
        return fp8_quantization_config(scale_fmt, kept)
    if layout == COMPRESSED_TENSORS:
        if scale_fmt != "fp32":
            raise ValueError("the compressed-tensors layout has no power-of-two scale flag: "
                             "use --scale-fmt fp32 with --layout compressed-tensors")
        return compressed_tensors_quantization_config(kept)
    raise ValueError(f"unknown FP8 layout {layout!r}; expected one of {LAYOUTS}")


# ----------------------------------------------------------------------------- grids


def grid_of(shape: Sequence[int], block_size: tuple[int, int] = BLOCK_SIZE) -> tuple[int, int]:
    """``(ceil(out/bm), ceil(in/bn))``: the scale grid of a 2-D weight."""
    return math.ceil(shape[0] / block_size[0]), math.ceil(shape[1] / block_size[1])
