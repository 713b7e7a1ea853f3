"""``save_fp8``: write a model with ``FP8Linear`` layers as a DeepSeek/HF ``"fp8"`` checkpoint.

The folder is the one ``finefp8 quantize --format fp8`` writes (docs/checkpoints.md), so
``finefp8.load``, ``finefp8 inspect``, transformers' FineGrainedFP8 and vLLM read it alike::

    model.safetensors (or model-0000k-of-0000n.safetensors + model.safetensors.index.json)
        <module>.weight            [N, K]                       F8_E4M3   (the layer's codes Q)
        <module>.weight_scale_inv  [ceil(N/128), ceil(K/128)]   F32       (W ~= Q * s per block)
        every other tensor of the state dict in its own dtype; a tied output head is stored
        once, under its source name, as transformers expects
        MoE experts (``FP8Experts``) one matrix per expert and projection, under the names
        transformers' conversion mapping gives them (``...experts.{e}.gate_proj.weight`` +
        ``weight_scale_inv``; Mixtral ``block_sparse_moe.experts.{e}.w1`` ...), the layout of
        DeepSeek-V3's release that vLLM and SGLang read; float experts likewise, per expert
    config.json               model.config + quantization_config {"quant_method": "fp8", ...,
                              "weight_block_size": [128, 128], "modules_to_not_convert": [...]}
    generation_config.json    when the model has one
    tokenizer files           when a tokenizer is given

The codes and scales are written exactly as the layers hold them: whatever chose them
(``amax/448`` and nearest rounding, a searched scale, GPTQ), the file is the same layout.

Crash safety follows ``finefp8.checkpoint``'s conventions: everything is written into
``<path>.partial`` (each shard by ``ShardWriter``: ``.partial`` name, fsync, rename),
``config.json`` last, then the folder is renamed to ``<path>``. An interrupted save leaves at
most ``<path>.partial``, never a ``<path>`` that looks complete; the next save to the same
path removes it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ..checkpoint.layout import FP8, quantization_config
from ..checkpoint.reader import INDEX_NAME, SINGLE_NAME, ST_DTYPES, ST_ITEMSIZE
from ..checkpoint.writer import (
    PARTIAL_SUFFIX,
    ShardWriter,
    WriteError,
    atomic_write_bytes,
    fsync_dir,
    write_error,
)
from ..quantization import BLOCK_SIZE, SCALE_FMTS
from .convert import float_module, fp8_modules, kept_linear_modules, serving_problems
from .expert_checkpoint import expert_state, float_expert_state
from .experts import FP8Experts, experts_modules
from .linear import FP8_DTYPES, FP8Linear

__all__ = ["save_fp8", "checkpoint_tensors", "check_saveable", "check_destination",
           "kept_for_serving", "MAX_SHARD_BYTES"]

log = logging.getLogger(__name__)

#: Tensor bytes per safetensors file before a new shard starts (transformers' "5GB").
MAX_SHARD_BYTES = 5 * 10**9
_ST_NAME = {dtype: name for name, dtype in ST_DTYPES.items()}


def _label(path: Path) -> str:
    return f"save_fp8 {str(path)!r}"


def check_destination(path: str | os.PathLike) -> Path:
    """``path`` as a ``Path`` if a checkpoint may be written there: absent or an empty folder.

    Raises ``FileExistsError`` naming ``path`` otherwise (nothing is ever overwritten).
    """
    path = Path(path)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        what = "a folder that is not empty" if path.is_dir() else "a file"
        raise FileExistsError(f"{_label(path)}: the destination is {what}; choose a new folder "
                              f"or remove it first")
    return path


def _scales(layer: FP8Linear | FP8Experts) -> list[torch.Tensor]:
    if isinstance(layer, FP8Experts):
        return [layer.gate_up_proj_scale_inv, layer.down_proj_scale_inv]
    return [layer.weight_scale_inv]


def _check_layer(name: str, layer: FP8Linear | FP8Experts, path: Path) -> None:
    """Refuse a layer the ``"fp8"`` layout cannot describe (ValueError naming it)."""
    c = layer.config
    where = f"{_label(path)}: layer {name!r}"
    if c.mode == "act_only":
        raise ValueError(f"{where} is act_only: its weight is float, there are no FP8 codes to "
                         f"write")
    if c.weight_block is None or tuple(layer.block_size) != BLOCK_SIZE:
        blocks = "one scale per tensor" if c.weight_block is None else \
            "{}x{} blocks".format(*layer.block_size)
        raise ValueError(f"{where} has {blocks}; the fp8 layout stores 128x128 weight blocks. "
                         f"Quantize with FP8Config() (weight_block=(128, 128)) to save it")
    codes = layer.gate_up_proj if isinstance(layer, FP8Experts) else layer.weight
    if codes.dtype != torch.float8_e4m3fn:
        raise ValueError(f"{where} holds {codes.dtype} codes; the fp8 layout stores "
                         f"float8_e4m3fn")
    if c.mode == "w8a8" and (c.act_granularity != "group" or c.act_group_size != BLOCK_SIZE[1]):
        raise ValueError(f"{where} quantizes activations per {c.act_granularity} "
                         f"(group size {c.act_group_size}); the fp8 layout declares dynamic "
                         f"1x128 groups, so the saved model would run differently. Use "
                         f"act_granularity='group', act_group_size=128")


def _is_pow2(s: torch.Tensor) -> bool:
    mantissa, _ = torch.frexp(s.float())
    return bool(((s > 0) & (mantissa == 0.5)).all())


def check_saveable(model: nn.Module, scale_fmt: str | None = None,
                   path: str | os.PathLike = "") -> str:
    """Check ``model`` can be written in the ``"fp8"`` layout; returns the scale format to declare.

    Needs a transformers model (a ``config``) with at least one ``FP8Linear``, every one of
    them holding E4M3 codes with 128x128 block scales (w8a8 layers: dynamic 1x128 activation
    groups). ``scale_fmt=None`` takes the layers' own (they must agree); ``"ue8m0"`` needs every
    scale to be a power of two; ``"fp32"`` is always valid (fp32 holds any scale).
    """
    path = Path(path)
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise TypeError(f"{_label(path)}: needs a transformers model (with a .config), got "
                        f"{type(model).__name__}")
    layers = fp8_modules(model)
    if not layers:
        raise ValueError(f"{_label(path)}: the model has no FP8Linear layer; call "
                         f"finefp8.quantize_model(model) first")
    for name, layer in layers.items():
        _check_layer(name, layer, path)
    own = sorted({layer.config.scale_fmt for layer in layers.values()})
    if scale_fmt is None:
        if len(own) > 1:
            raise ValueError(f"{_label(path)}: the layers mix scale formats {own}; pass "
                             f"scale_fmt= to choose the one to declare")
        return own[0]
    if scale_fmt not in SCALE_FMTS:
        raise ValueError(f"{_label(path)}: scale_fmt must be one of {SCALE_FMTS}, "
                         f"got {scale_fmt!r}")
    if scale_fmt == "ue8m0":
        for name, layer in layers.items():
            if not all(_is_pow2(t) for t in _scales(layer)):
                raise ValueError(f"{_label(path)}: scale_fmt='ue8m0' declares power-of-two "
                                 f"scales, but layer {name!r} has others; quantize with "
                                 f"scale_fmt='ue8m0' or save with scale_fmt='fp32'")
    return scale_fmt


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
            and a.storage_offset() == b.storage_offset() and a.shape == b.shape
            and a.dtype == b.dtype)


def checkpoint_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint of ``model`` stores, by name, in state-dict order.

    ``model.state_dict()`` (an ``FP8Linear`` contributes ``weight`` E4M3 + ``weight_scale_inv``
    fp32), less every tied target of ``model.all_tied_weights_keys`` (``{target: source}``,
    e.g. ``lm_head.weight`` -> ``model.embed_tokens.weight``) that shares the source's storage:
    transformers ties it again on load. Each fused experts module's tensors are replaced,
    where they stood, by its per-expert tensors (``finefp8.nn.expert_checkpoint``).
    """
    state = model.state_dict()
    tied: Mapping[str, str] = getattr(model, "all_tied_weights_keys", None) or {}
    for target, source in tied.items():
        if target in state and source in state and _same_storage(state[target], state[source]):
            del state[target]
    experts = experts_modules(model)
    if not experts:
        return state
    replaced: dict[str, dict[str, torch.Tensor]] = {}
    for name, module in experts.items():
        if isinstance(module, FP8Experts):
            replaced[name] = expert_state(model, name, module)
        else:
            replaced[name] = float_expert_state(model, name, module)
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        owner = key.rpartition(".")[0]
        if owner in replaced:
            out.update(replaced.pop(owner))
        elif owner not in experts:
            out[key] = t
    return out


def _entries(tensors: Mapping[str, torch.Tensor], path: Path) -> list[tuple[str, str, tuple]]:
    out = []
    for key, t in tensors.items():
        if t.device.type == "meta":
            raise ValueError(f"{_label(path)}: tensor {key!r} is on the meta device (not loaded)")
        if t.dtype not in _ST_NAME:
            raise ValueError(f"{_label(path)}: tensor {key!r} has dtype {t.dtype}, which "
                             f"safetensors cannot store")
        out.append((key, _ST_NAME[t.dtype], tuple(t.shape)))
    return out


def _shards(entries: list[tuple[str, str, tuple]], max_bytes: int) -> list[list[tuple]]:
    """Split ``entries`` in order into shards of at most ``max_bytes`` tensor bytes each (a single
    larger tensor gets a shard of its own); a scale stays in its weight's shard."""
    shards: list[list[tuple]] = [[]]
    size = 0
    for e in entries:
        n = ST_ITEMSIZE[e[1]] * int(torch.Size(e[2]).numel())
        if shards[-1] and size + n > max_bytes and not e[0].endswith(".weight_scale_inv"):
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += n
    return shards


def _shard_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_NAME]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def _float_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of the model's first high-precision floating-point parameter, if any."""
    return next((p.dtype for p in model.parameters()
                 if p.is_floating_point() and p.dtype not in FP8_DTYPES), None)


@contextmanager
def kept_for_serving(model: nn.Module, tp: Sequence[int]) -> Iterator[dict[str, str]]:
    """Within the block, the FP8 modules vLLM would refuse or compute wrong at one of the
    degrees ``tp`` (``finefp8.nn.serving_problems``) are high-precision modules holding their
    dequantized weights ``W = Q * s`` (in the model's float dtype); afterwards the FP8 modules
    are back. Yields ``{module name: why}`` of the swapped modules (empty for ``tp=()``).
    """
    problems = serving_problems(model, tp) if tp else {}
    dtype = _float_dtype(model)
    originals = {name: model.get_submodule(name) for name in problems}

    def put(name: str, module: nn.Module) -> None:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, module)

    try:
        for name, m in originals.items():
            put(name, float_module(m, dtype))
        yield problems
    finally:
        for name, m in originals.items():
            put(name, m)


def _config_dict(model: nn.Module, scale_fmt: str) -> dict:
    """``model.config`` as a dict, its ``quantization_config`` replaced by the fp8 layout's."""
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.pop("_name_or_path", None)
    cfg["architectures"] = [type(model).__name__]
    float_dtype = _float_dtype(model)
    if float_dtype is not None:
        cfg["dtype"] = str(float_dtype).replace("torch.", "")
    kept = list(kept_linear_modules(model))
    kept += [n for n, m in experts_modules(model).items() if not isinstance(m, FP8Experts)]
    cfg["quantization_config"] = quantization_config(FP8, scale_fmt, kept)
    return cfg


def _json_bytes(obj: dict) -> bytes:
    return (json.dumps(obj, indent=2) + "\n").encode()


def save_fp8(model: nn.Module, path: str | os.PathLike, *, tokenizer=None,
             scale_fmt: str | None = None, tp: Sequence[int] = (1,)) -> Path:
    """Write ``model`` (its Linear layers ``FP8Linear``) as an ``"fp8"``-layout checkpoint.

    Args:
        model: a transformers model after ``finefp8.quantize_model`` (or ``finefp8.load``):
            every ``FP8Linear`` holds E4M3 codes with 128x128 fp32 block scales; the
            ``nn.Linear`` layers still in float (``lm_head``, ignored modules) are listed in
            ``modules_to_not_convert``.
        path: the checkpoint folder; must not exist or be empty (``FileExistsError``).
        tokenizer: anything with ``save_pretrained(folder)``; its files go in the folder.
        scale_fmt: ``None`` (the layers' own), ``"fp32"`` or ``"ue8m0"`` (declares power-of-two
            scales; every scale must be one), see ``check_saveable``.
        tp: tensor-parallel degrees the checkpoint must serve at (default TP 1). FP8 layers
            that vLLM would refuse or compute wrong at one of them (``serving_problems``: e.g.
            a q/k/v group whose q part is not a multiple of 128 rows) are written in high
            precision as their dequantized weights and listed in ``modules_to_not_convert``,
            the rule of ``finefp8 quantize --tp``; the model in memory is not changed.
            ``tp=()`` writes every FP8 layer as it is.

    Returns:
        ``path``. ``finefp8.load(path)`` rebuilds the model with the same codes and scales.
    """
    path = check_destination(path)
    with kept_for_serving(model, tp) as kept:
        fmt = check_saveable(model, scale_fmt, path)
        tensors = checkpoint_tensors(model)
        config = _config_dict(model, fmt)
    for name, why in kept.items():
        log.warning("save_fp8: %s written in high precision: %s", name, why)
    shards = _shards(_entries(tensors, path), MAX_SHARD_BYTES)
    names = _shard_names(len(shards))
    tmp = path.with_name(path.name + PARTIAL_SUFFIX)
    try:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp)  # left by an interrupted save to the same path
        elif tmp.exists() or tmp.is_symlink():
            tmp.unlink()
        tmp.mkdir(parents=True)
    except OSError as e:
        raise write_error(tmp, e) from e
    try:
        for name, entries in zip(names, shards, strict=True):
            with ShardWriter(tmp / name, entries, {"format": "pt"}) as w:
                for key, _, _ in entries:
                    w.write(key, tensors[key].detach().cpu())
        if len(shards) > 1:
            total = sum(ST_ITEMSIZE[d] * int(torch.Size(s).numel()) for _, d, s in
                        (e for es in shards for e in es))
            weight_map = {e[0]: n for n, es in zip(names, shards, strict=True) for e in es}
            index = {"metadata": {"total_size": total},
                     "weight_map": dict(sorted(weight_map.items()))}
            atomic_write_bytes(tmp / INDEX_NAME, _json_bytes(index))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        generation = getattr(model, "generation_config", None)
        if generation is not None and hasattr(generation, "to_json_string"):
            atomic_write_bytes(tmp / "generation_config.json",
                               generation.to_json_string(use_diff=True).encode())
        atomic_write_bytes(tmp / "config.json", _json_bytes(config))
        fsync_dir(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and not isinstance(e, WriteError):
            raise write_error(path, e) from e
        raise
    fsync_dir(path.parent)
    log.info("save_fp8: %d FP8 layers written to %s (%s scales)", len(fp8_modules(model)), path,
             fmt)
    return path
