"""Variants: shared tensors, Hessian groups, byte counts on the tiny Llama."""

from __future__ import annotations

import torch

from finefp8.eval.models import load_model
from finefp8.eval.variants import (
    VARIANTS,
    build_variant,
    checkpoint_bytes,
    collect_hessians,
    convertible_linears,
    linear_weight_bytes,
)
from finefp8.nn import FP8Linear


def test_variants_share_untouched_tensors_and_count_bytes(tiny_model_dir):
    ref = load_model(str(tiny_model_dir)).model
    names = convertible_linears(ref)
    assert len(names) == 14 and "lm_head" not in names
    v = build_variant(ref, VARIANTS["w8a8"])
    assert v is not ref
    assert v.model.embed_tokens.weight is ref.model.embed_tokens.weight
    assert isinstance(v.get_submodule(names[0]), FP8Linear)
    assert isinstance(ref.get_submodule(names[0]), torch.nn.Linear)  # reference untouched
    n_weights = sum(ref.get_submodule(n).weight.numel() for n in names)
    assert linear_weight_bytes(ref) == 4 * n_weights
    fp8_bytes = linear_weight_bytes(v)
    assert n_weights < fp8_bytes < n_weights * 1.01  # 1 byte a weight + a few fp32 scales
    assert checkpoint_bytes(ref) - checkpoint_bytes(v) == 4 * n_weights - fp8_bytes


def test_hessians_grouped_by_shared_input(tiny_model_dir):
    ref = load_model(str(tiny_model_dir)).model
    names = convertible_linears(ref)
    windows = [torch.randint(0, 60, (40,)), torch.randint(0, 60, (30,))]
    h = collect_hessians(ref, names, windows)
    p = "model.layers.0."
    assert h[p + "self_attn.q_proj"] is h[p + "self_attn.k_proj"] is h[p + "self_attn.v_proj"]
    assert h[p + "mlp.gate_proj"] is h[p + "mlp.up_proj"]
    assert h[p + "mlp.down_proj"].shape == (320, 320)
    # the same as 2 X^T X / T computed directly from the captured inputs
    xs = []
    hook = ref.get_submodule(p + "mlp.down_proj").register_forward_pre_hook(
        lambda _m, a: xs.append(a[0].reshape(-1, a[0].shape[-1]).double()))
    with torch.no_grad():
        for w in windows:
            ref(w.unsqueeze(0))
    hook.remove()
    x = torch.cat(xs)
    want = (2 * x.T @ x / x.shape[0]).float()
    assert torch.allclose(h[p + "mlp.down_proj"], want, rtol=1e-4, atol=1e-5)
