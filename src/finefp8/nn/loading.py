"""``load``: a transformers model from an FP8 checkpoint, with the FP8 weights kept in FP8.

Either on-disk layout (docs/checkpoints.md) is read through ``finefp8.checkpoint.CheckpointReader``:
``"fp8"`` (``weight`` + ``weight_scale_inv``) and compressed-tensors FP8_BLOCK (``weight`` +
``weight_scale``, scales in any float dtype, widened exactly to fp32). Steps:

1. ``config.json`` -> ``AutoConfig``, with ``quantization_config`` removed so that transformers
   does not run its own FP8 path (which on a CPU dequantizes everything and rejects shapes that
   are not multiples of 128).
2. The model is built with its parameters on the meta device (nothing allocated, nothing
   initialized) and its buffers (rotary tables) computed normally.
3. Every fused MoE experts module (``finefp8.nn.experts``) takes its per-expert tensors
   (``...experts.{e}.gate_proj.weight`` etc., named as transformers' conversion mapping says,
   see ``finefp8.nn.expert_checkpoint``): FP8 ones become an ``FP8Experts`` holding the codes
   and scales as stored, float ones are stacked into the fused parameters.
   Every other FP8 ``<module>.weight`` with a scale becomes an ``FP8Linear`` holding the codes
   and scales exactly as stored (no dequantize / requantize round trip), any shape.
4. Every other tensor is loaded as it is, cast to ``dtype``; tied embeddings are tied; a
   parameter the checkpoint does not provide is an error naming it.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable

import torch
from torch import nn

from ..checkpoint import (
    COMPRESSED_TENSORS,
    CheckpointError,
    CheckpointReader,
    block_size_of,
    scale_key,
)
from ..checkpoint.layout import is_scale_key, module_of
from ..checkpoint.validate import scale_problem
from ..formats import FP8_DTYPES
from ..hub import resolve_model
from .config import FP8Config
from .convert import resolve_config
from .expert_checkpoint import key_renamer, read_experts
from .experts import experts_modules
from .linear import FP8Linear

__all__ = ["load", "checkpoint_fp8_config", "empty_model"]

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def _as_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.replace("torch.", "") in _DTYPES:
        return _DTYPES[dtype.replace("torch.", "")]
    raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")


def _config_dtype(hf_config) -> torch.dtype | None:
    """The float dtype ``config.json`` names (``dtype`` / ``torch_dtype``), if it is one we run."""
    value = getattr(hf_config, "dtype", None)
    try:
        value = _as_dtype(value)
    except ValueError:
        return None
    return value if value in _DTYPES.values() else None


def checkpoint_fp8_config(config: dict) -> FP8Config:
    """The ``FP8Config`` a checkpoint's ``config.json`` describes (mode ``"w8a8"``).

    Weight blocks from ``weight_block_size`` / ``block_structure``; ``scale_fmt`` ``"ue8m0"`` when
    the fp8 layout says so (DeepSeek-V3.1 quantizes activations with power-of-two scales too);
    activations from compressed-tensors' ``input_activations`` strategy (``group``/``token``/
    ``tensor``), otherwise DeepSeek-V3's dynamic 1x128 groups.
    """
    qc = (config or {}).get("quantization_config") or {}
    block = block_size_of(config)
    kwargs: dict = {"weight_block": block}
    if qc.get("scale_fmt") == "ue8m0":
        kwargs["scale_fmt"] = "ue8m0"
    if qc.get("activation_scheme", "dynamic") != "dynamic":
        log.warning("checkpoint declares activation_scheme=%r; activations are quantized "
                    "dynamically (per token group) instead", qc.get("activation_scheme"))
    for group in (qc.get("config_groups") or {}).values():
        act = (group or {}).get("input_activations") or {}
        strategy = act.get("strategy")
        if strategy in ("group", "token", "tensor"):
            kwargs["act_granularity"] = strategy
            if strategy == "group" and act.get("group_size"):
                kwargs["act_group_size"] = int(act["group_size"])
        break
    return FP8Config(**kwargs)


def empty_model(hf_config, dtype: torch.dtype, trust_remote_code: bool) -> nn.Module:
    """The model of ``hf_config`` with parameters on the meta device and real buffers."""
    try:
        from accelerate import init_empty_weights
    except ImportError as e:
        raise ImportError("finefp8.load needs the 'accelerate' package: "
                          "pip install 'finefp8[eval]'") from e
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(hf_config, dtype=dtype,
                                                trust_remote_code=trust_remote_code)


def _experts(model: nn.Module, reader: CheckpointReader, fmt: str, config: FP8Config,
             dtype: torch.dtype) -> tuple[set[str], dict[str, torch.Tensor]]:
    """Read every fused experts module; returns (keys used, float fused tensors to load)."""
    used: set[str] = set()
    state: dict[str, torch.Tensor] = {}
    for name, module in experts_modules(model).items():
        fp8, tensors, keys = read_experts(model, name, module, reader, fmt, config, dtype)
        used |= keys
        state.update(tensors)
        if fp8 is not None:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, fp8)
    return used, state


def _fp8_layers(model: nn.Module, reader: CheckpointReader, fmt: str, config: FP8Config,
                dtype: torch.dtype, skip: list[re.Pattern], claimed: set[str] = frozenset(),
                rename: Callable[[str], str] = str) -> tuple[set[str], list[str]]:
    """Install an ``FP8Linear`` for every FP8 weight not in ``claimed`` (read as experts), at
    the model name ``rename(key)``; returns (keys used, unexpected keys)."""
    used: set[str] = set()
    unexpected: list[str] = []
    for key in reader.quantized_weights():
        if key in claimed:
            continue
        name = module_of(rename(key))
        try:
            module = model.get_submodule(name)
        except AttributeError:
            if not any(p.search(key) for p in skip):
                unexpected.append(key)
            continue
        if not isinstance(module, nn.Linear):
            raise CheckpointError(
                f"{reader.root}: tensor {key!r} is FP8, but {name!r} in the "
                f"{type(model).__name__} model is a {type(module).__name__}, not an nn.Linear "
                f"(transformers fuses some layers, e.g. MoE experts). Convert it with "
                f"'finefp8 dequantize' and load the result with transformers instead."
            )
        skey = scale_key(key, fmt)
        if skey not in reader:
            raise CheckpointError(f"{reader.root}: FP8 tensor {key!r} has no scale {skey!r}")
        q = reader.get(key)
        if tuple(q.shape) != (module.out_features, module.in_features):
            raise CheckpointError(
                f"{reader.root}: tensor {key!r} has shape {list(q.shape)}, but the model's "
                f"{name!r} is [{module.out_features}, {module.in_features}]: config.json does "
                f"not match the weights"
            )
        bkey = f"{module_of(key)}.bias"
        bias = reader.get(bkey).to(dtype) if bkey in reader else None
        scale = reader.get(skey)
        bad_scale = scale_problem(skey, scale)
        if bad_scale is not None:
            raise CheckpointError(f"{reader.root}: {bad_scale}. The checkpoint is corrupt: "
                                  f"re-download or re-create it")
        fp8 = FP8Linear.from_quantized(q, scale, bias, config, name=name)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, fp8)
        used.update(k for k in (key, skey, bkey) if k in reader)
    return used, unexpected


def _meta_tensors(model: nn.Module) -> list[str]:
    named = list(model.named_parameters(remove_duplicate=False))
    named += list(model.named_buffers(remove_duplicate=False))
    return [n for n, t in named if t.is_meta]


def load(path: str | os.PathLike, mode: str = "w8a8", dtype: torch.dtype | str | None = None, *,
         config: FP8Config | None = None, trust_remote_code: bool = False,
         revision: str | None = None):
    """Build a transformers causal-LM from an FP8 checkpoint directory, on the CPU.

    Args:
        path: directory with ``config.json`` and ``*.safetensors`` (one file or sharded) in the
            ``"fp8"`` or compressed-tensors FP8_BLOCK layout, or a Hub ID ``org/name``
            (``finefp8.hub.resolve_model``: the local cache first, ``HF_HUB_OFFLINE`` honoured,
            downloads of the safetensors weights and config only).
        mode: ``"w8a8"`` (default) or ``"weight_only"`` for every ``FP8Linear``.
        dtype: dtype of the non-FP8 tensors and of the activations (``torch.float32``,
            ``torch.bfloat16``, ``torch.float16`` or their names); ``None`` takes ``config.json``'s
            ``dtype`` / ``torch_dtype``, else float32.
        config: the ``FP8Config`` of the layers (default: what the checkpoint declares, see
            ``checkpoint_fp8_config``); ``mode`` overrides its mode.
        trust_remote_code: passed to transformers for models it does not ship.
        revision: branch, tag or commit of a Hub ID ``path`` (``None``: main).

    Returns:
        The model in eval mode; its FP8 layers are ``FP8Linear`` with the stored codes and
        scales (1 byte a weight in memory), everything else as in the checkpoint.
    """
    from transformers import AutoConfig

    if mode == "act_only":
        raise ValueError("load: mode 'act_only' needs float weights; an FP8 checkpoint has none. "
                         "Use mode='w8a8' or 'weight_only'.")
    path = resolve_model(path, revision, purpose="load").path
    reader = CheckpointReader(path)
    try:
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path}: no config.json: load needs a Hugging Face model "
                                  f"directory")
        fmt = reader.format
        if fmt is None or not reader.quantized_weights():
            raise CheckpointError(
                f"{path}: not an FP8 checkpoint (no quantization_config and no FP8 weights). "
                f"Load it with transformers and call finefp8.quantize_model, or convert it "
                f"first with 'finefp8 quantize'."
            )
        fp8_config = resolve_config(config or checkpoint_fp8_config(reader.config), mode)
        hf_config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        if hasattr(hf_config, "quantization_config"):
            del hf_config.quantization_config
        dtype = _as_dtype(dtype) or _config_dtype(hf_config) or torch.float32
        model = empty_model(hf_config, dtype, trust_remote_code)
        skip = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None)
                                        or [])]
        used, state = _experts(model, reader, fmt, fp8_config, dtype)
        rename = key_renamer(model)
        linear_used, unexpected = _fp8_layers(model, reader, fmt, fp8_config, dtype, skip, used,
                                              rename)
        used |= linear_used
        for key in reader.keys():
            if key in used or is_scale_key(key):
                continue
            t = reader.get(key)
            if t.dtype in FP8_DTYPES:
                raise CheckpointError(f"{path}: tensor {key!r} is FP8 but has no "
                                      f"{scale_key(key, fmt) if key.endswith('.weight') else 'scale'}")
            state[rename(key)] = t.to(dtype) if t.is_floating_point() else t
        try:
            result = model.load_state_dict(state, strict=False, assign=True)
        except RuntimeError as e:
            raise CheckpointError(f"{path}: config.json does not match the weights: {e}") from e
        unexpected += [k for k in result.unexpected_keys if not any(p.search(k) for p in skip)]
        if unexpected:
            log.warning("%s: %d checkpoint tensors have no place in the model and were not loaded: "
                        "%s", path, len(unexpected), ", ".join(unexpected[:10]))
        if _meta_tensors(model) and hasattr(model, "tie_weights"):
            model.tie_weights()
        missing = _meta_tensors(model)
        if missing:
            raise CheckpointError(f"{path}: the checkpoint lacks {len(missing)} tensors the model "
                                  f"needs: {', '.join(missing[:10])}")
    finally:
        reader.close()
    if fmt == COMPRESSED_TENSORS:
        log.info("%s: compressed-tensors FP8_BLOCK checkpoint loaded", path)
    model.fp8_config = fp8_config
    return model.eval()
