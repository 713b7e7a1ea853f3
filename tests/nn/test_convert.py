"""quantize_model on a tiny transformers Llama: what is converted, what is kept, how close."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import finefp8
from finefp8.nn import FP8Config, FP8Linear, fp8_modules, kept_linear_modules, resident_bytes

PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def test_converts_projections_and_keeps_the_rest(tiny_model):
    model = copy.deepcopy(tiny_model)
    embed, head = model.model.embed_tokens.weight, model.lm_head
    norms = {n: p.clone() for n, p in model.named_parameters() if "norm" in n}
    out = finefp8.quantize_model(model)
    assert out is model
    names = set(fp8_modules(model))
    assert names == {f"model.layers.{i}.{'self_attn' if p.endswith(('q_proj', 'k_proj', 'v_proj', 'o_proj')) else 'mlp'}.{p}"
                     for i in range(2) for p in PROJ}
    assert model.lm_head is head and type(model.lm_head) is nn.Linear
    assert model.model.embed_tokens.weight is embed
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    for n, p in model.named_parameters():
        if "norm" in n:
            assert torch.equal(p, norms[n])
    assert kept_linear_modules(model) == {"lm_head": "output head"}
    for m in fp8_modules(model).values():
        assert m.weight.dtype == torch.float8_e4m3fn


@pytest.mark.parametrize("config,max_kl", [
    (FP8Config(), 0.01),
    (FP8Config(mode="weight_only"), 0.01),
    (FP8Config(scale_fmt="ue8m0"), 0.02),
    (FP8Config.per_tensor(), 0.03),
    (FP8Config(mode="act_only"), 0.01),
], ids=lambda c: c.describe() if isinstance(c, FP8Config) else str(c))
def test_outputs_stay_close(tiny_model, tokens, config, max_kl, helpers):
    ref = logits(tiny_model, tokens)
    q = finefp8.quantize_model(copy.deepcopy(tiny_model), config=config)
    kl = helpers.mean_kl(ref, logits(q, tokens))
    assert 0 < kl < max_kl
    top1 = (ref.argmax(-1) == logits(q, tokens).argmax(-1)).float().mean()
    assert top1 > 0.8


def test_mode_and_scale_fmt_override_config(tiny_model):
    model = finefp8.quantize_model(copy.deepcopy(tiny_model), mode="weight_only", scale_fmt="ue8m0",
                                   config=FP8Config.per_tensor())
    m = next(iter(fp8_modules(model).values()))
    assert m.config == FP8Config.per_tensor(mode="weight_only", scale_fmt="ue8m0")


def test_ignore_globs_and_regexes(tiny_model):
    ignore = ["*.down_proj", "re:model\\.layers\\.1\\.self_attn"]
    model = finefp8.quantize_model(copy.deepcopy(tiny_model), ignore=ignore)
    kept = kept_linear_modules(model, ignore)
    assert kept["model.layers.0.mlp.down_proj"].startswith("ignored")
    assert kept["model.layers.1.self_attn.q_proj"].startswith("ignored")
    assert "model.layers.0.self_attn.q_proj" in fp8_modules(model)
    assert "model.layers.1.mlp.up_proj" in fp8_modules(model)
    assert len(fp8_modules(model)) == 14 - 2 - 4


class _MoEBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = nn.Module()
        self.mlp.gate = nn.Linear(256, 8, bias=False)        # the router: kept
        self.mlp.gate_proj = nn.Linear(256, 384, bias=False)  # a projection: converted
        self.mlp.shared_expert_gate = nn.Linear(256, 1, bias=False)
        self.out = nn.Linear(384, 256)


def test_moe_router_is_kept_but_gate_proj_converted():
    model = finefp8.quantize_model(_MoEBlock())
    assert type(model.mlp.gate) is nn.Linear
    assert type(model.mlp.shared_expert_gate) is nn.Linear
    assert isinstance(model.mlp.gate_proj, FP8Linear)
    assert isinstance(model.out, FP8Linear) and model.out.bias is not None


def test_resident_memory_drops(tiny_model):
    before = resident_bytes(tiny_model)
    model = finefp8.quantize_model(copy.deepcopy(tiny_model))
    linear_params = sum(m.in_features * m.out_features for m in fp8_modules(model).values())
    scales = sum(m.weight_scale_inv.numel() for m in fp8_modules(model).values())
    assert before - resident_bytes(model) == 3 * linear_params - 4 * scales


def test_weight_quantizer_hook(tiny_model):
    calls = []

    def quantizer(w, block_size, scale_fmt, *, name=None):
        calls.append(name)
        return finefp8.quantize_blockwise(w, block_size, scale_fmt, name=name)

    finefp8.quantize_model(copy.deepcopy(tiny_model), weight_quantizer=quantizer)
    assert len(calls) == 14 and "model.layers.0.mlp.down_proj" in calls


def test_meta_weights_are_refused():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="meta"):
        finefp8.quantize_model(model)


def test_bf16_model(tokens, helpers):
    model = helpers.tiny_llama().to(torch.bfloat16)
    ref = logits(model, tokens)
    q = finefp8.quantize_model(copy.deepcopy(model))
    out = logits(q, tokens)
    assert out.dtype == torch.bfloat16 and helpers.mean_kl(ref, out) < 0.02


def test_dequantize_model_gives_the_weight_only_model(tiny_model, tokens):
    wo = finefp8.quantize_model(copy.deepcopy(tiny_model), mode="weight_only")
    expected = logits(wo, tokens)
    codes = {n: m.dequantize_weight() for n, m in fp8_modules(wo).items()}
    back = finefp8.nn.dequantize_model(wo)
    assert not fp8_modules(back)
    for n, w in codes.items():
        layer = back.get_submodule(n)
        assert type(layer) is nn.Linear and torch.equal(layer.weight, w)
    out = logits(back, tokens)
    assert float((out - expected).norm() / expected.norm()) < 1e-5


def test_dequantize_model_casts_to_dtype(tiny_model, tokens):
    q = finefp8.quantize_model(copy.deepcopy(tiny_model))
    back = finefp8.nn.dequantize_model(q, torch.bfloat16)
    assert {p.dtype for p in back.parameters()} == {torch.bfloat16}
    assert logits(back, tokens).dtype == torch.bfloat16
