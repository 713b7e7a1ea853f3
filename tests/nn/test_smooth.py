"""SmoothQuant-style rescaling folded into the RMSNorm (finefp8.nn.smooth): the float model's
logits do not change, the scales follow the formula, a rescaling that changes a layer is undone."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from finefp8.nn.smooth import (
    collect_input_absmax,
    smooth_model,
    smoothable_groups,
    smoothing_scales,
)

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_llama  # noqa: E402

pytest.importorskip("transformers")


def test_scales_match_the_formula_by_hand():
    a = torch.tensor([4.0, 0.0, 1.0, 9.0])
    w1 = torch.tensor([[1.0, -2.0, 0.25, 0.0], [-0.5, 1.0, 0.1, 0.0]])
    w2 = torch.tensor([[0.2, 0.0, -0.2, 0.0]])
    # alpha 0.5: sqrt(4)/sqrt(1) = 2; a = 0 -> 1; sqrt(1)/sqrt(0.25) = 2; w = 0 -> 1
    assert torch.equal(smoothing_scales(a, [w1, w2], 0.5), torch.tensor([2.0, 1.0, 2.0, 1.0]))
    # alpha 1: s = a (clamped to [0.01, 100])
    s = smoothing_scales(torch.tensor([1e4, 3.0]), [torch.ones(2, 2)], 1.0)
    assert torch.equal(s, torch.tensor([100.0, 3.0]))
    with pytest.raises(ValueError, match="alpha"):
        smoothing_scales(a, [w1], 1.5)


def _smooth(model, ids, alpha=0.5):
    layers = model.model.layers
    names = [f"model.layers.{i}.{lins[0]}" for i, layer in enumerate(layers)
             for _, lins in smoothable_groups(layer)]
    absmax = collect_input_absmax(model, names, lambda: model(ids))
    return smooth_model(model, layers, "model.layers", absmax, alpha)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_llama_logits_unchanged(dtype, tol):
    model = tiny_llama(tie=False).to(dtype)
    ids = torch.randint(3, 300, (2, 40), generator=torch.Generator().manual_seed(0))
    # outlier channels, as real activations have: without them s would be near 1
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight[:4] *= 30
        model.model.layers[1].post_attention_layernorm.weight[5:9] *= 20
    norms = {n: p.clone() for n, p in model.named_parameters() if "layernorm" in n}
    with torch.no_grad():
        before = model(ids).logits
    done = _smooth(model, ids)
    assert len(done) == 4  # 2 layers x (attention, MLP)
    with torch.no_grad():
        after = model(ids).logits
    changed = [n for n, p in model.named_parameters() if "layernorm" in n
               and not torch.allclose(p, norms[n])]
    assert len(changed) == 4
    rel = float((after - before).norm() / before.norm())
    assert rel < tol, rel


def test_moe_block_keeps_its_norm_and_attention_is_smoothed():
    from moe_models import qwen3_moe

    model = qwen3_moe()  # float32: the experts grouped GEMM has no float64
    assert [g for g, _ in smoothable_groups(model.model.layers[0])] == ["input_layernorm"]
    ids = torch.randint(3, 320, (1, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(ids).logits
    assert len(_smooth(model, ids)) == 2
    with torch.no_grad():
        after = model(ids).logits
    assert float((after - before).norm() / before.norm()) < 1e-5


class _OnePlusNorm(nn.Module):
    """A norm of the form ``x * (1 + w)`` (Gemma): dividing ``w`` by s is not equivalent."""

    def __init__(self, h: int):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(h, dtype=torch.float64))

    def forward(self, x):
        return x * (1 + self.weight)


class _Layer(nn.Module):
    def __init__(self, h: int = 8):
        super().__init__()
        self.input_layernorm = _OnePlusNorm(h)
        self.self_attn = nn.Module()
        for n in ("q_proj", "k_proj", "v_proj"):
            setattr(self.self_attn, n, nn.Linear(h, h, bias=False, dtype=torch.float64))

    def forward(self, x):
        y = self.input_layernorm(x)
        return sum(getattr(self.self_attn, n)(y) for n in ("q_proj", "k_proj", "v_proj"))


def test_rescaling_that_changes_the_layer_is_undone():
    torch.manual_seed(0)
    layers = nn.ModuleList([_Layer()])
    x = torch.randn(5, 8, dtype=torch.float64)
    before = {n: p.clone() for n, p in layers.named_parameters()}
    absmax = {"m.0.self_attn.q_proj": torch.rand(8) * 10 + 0.5}
    done = smooth_model(layers, layers, "m", absmax, 0.5, probe=lambda layer: layer(x))
    assert done == []
    for n, p in layers.named_parameters():
        assert torch.allclose(p, before[n], rtol=1e-12, atol=0), n
