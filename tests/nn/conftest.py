"""Fixtures of the nn tests: a tiny Llama with odd sizes, FP8 checkpoints of it, a tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from finefp8.checkpoint.layout import skip_reason
from finefp8.quantization import quantize_blockwise, quantize_with_block_scales

#: Not multiples of 128 on purpose: hidden 192 (1.5 blocks), intermediate 320, head_dim 64.
TINY = dict(vocab_size=300, hidden_size=192, intermediate_size=320, num_hidden_layers=2,
            num_attention_heads=3, num_key_value_heads=1, max_position_embeddings=128,
            rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def tiny_llama(tie: bool = True, seed: int = 0, **overrides):
    """A randomly initialised float32 ``LlamaForCausalLM`` with the TINY sizes."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # finefp8.load builds models with init_empty_weights
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(**{**TINY, "tie_word_embeddings": tie, **overrides})
    model = transformers.LlamaForCausalLM(cfg).eval()
    # Spread the weights a little (init std 0.02 makes every block look alike).
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(1 + torch.rand(p.shape[0], 1) * 3)
    return model


def write_fp8_checkpoint(model, out: Path, fmt: str = "fp8", shards: int = 1,
                         scale_dtype: torch.dtype = torch.float32, scale_fmt: str = "fp32") -> dict:
    """Write ``model`` as an FP8 checkpoint in layout ``fmt`` with safetensors directly.

    Returns ``{weight_key: (q, scale)}`` of what was written. With ``shards=2`` the tensors are
    split over two files and every scale sits in the *other* shard than its weight.
    """
    out.mkdir(parents=True, exist_ok=True)
    suffix = "weight_scale_inv" if fmt == "fp8" else "weight_scale"
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight")
    tensors: dict[str, torch.Tensor] = {}
    written = {}
    for key, t in sd.items():
        if skip_reason(key, tuple(t.shape), "F32") is None:
            q, s = quantize_blockwise(t, scale_fmt=scale_fmt)
            if scale_dtype != torch.float32:
                s = s.to(scale_dtype)
                q = quantize_with_block_scales(t, s.float())
            tensors[key] = q
            tensors[key[: -len("weight")] + suffix] = s
            written[key] = (q, s)
        else:
            tensors[key] = t
    keys = list(tensors)
    if shards == 1:
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        shard_of = {k: 1 if k.endswith(suffix) else 0 for k in keys}
        names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
        for j, name in enumerate(names):
            save_file({k: tensors[k] for k in keys if shard_of[k] == j}, str(out / name),
                      metadata={"format": "pt"})
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
                 "weight_map": {k: names[shard_of[k]] for k in keys}}
        (out / "model.safetensors.index.json").write_text(json.dumps(index))
    cfg = model.config.to_dict()
    if fmt == "fp8":
        qc = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
              "weight_block_size": [128, 128], "modules_to_not_convert": ["lm_head"]}
        if scale_fmt == "ue8m0":
            qc["scale_fmt"] = "ue8m0"
    else:
        qc = {"quant_method": "compressed-tensors", "format": "float-quantized",
              "quantization_status": "compressed",
              "config_groups": {"group_0": {
                  "targets": ["Linear"],
                  "weights": {"num_bits": 8, "type": "float", "strategy": "block",
                              "block_structure": [128, 128], "symmetric": True, "dynamic": False},
                  "input_activations": {"num_bits": 8, "type": "float", "strategy": "group",
                                        "group_size": 128, "symmetric": True, "dynamic": True}}},
              "ignore": ["lm_head"]}
    cfg["quantization_config"] = qc
    (out / "config.json").write_text(json.dumps(cfg))
    return written


def write_tokenizer(out: Path) -> None:
    """A small byte-level BPE tokenizer trained offline on a few sentences, saved to ``out``."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=TINY["vocab_size"],
                                  special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = ["The quick brown fox jumps over the lazy dog.",
            "Fine-grained FP8 quantization keeps one scale per block of weights.",
            "Python is a programming language that lets you work quickly."] * 20
    tok.train_from_iterator(text, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>",
                                                eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(str(out))


def mean_kl(ref_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean per-token KL(ref || q) of next-token distributions, nats."""
    lp = torch.log_softmax(ref_logits.double(), -1)
    lq = torch.log_softmax(logits.double(), -1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


@pytest.fixture(scope="module")
def tiny_model():
    return tiny_llama()


@pytest.fixture(scope="module")
def tokens():
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, TINY["vocab_size"], (2, 24), generator=g)


@pytest.fixture(scope="session")
def helpers():
    """The helper functions of this file, for test modules (conftest is not importable by name)."""

    class _H:
        tiny_llama = staticmethod(tiny_llama)
        write_fp8_checkpoint = staticmethod(write_fp8_checkpoint)
        write_tokenizer = staticmethod(write_tokenizer)
        mean_kl = staticmethod(mean_kl)

    return _H
