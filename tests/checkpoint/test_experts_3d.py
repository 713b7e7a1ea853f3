"""Checkpoints that store experts fused on disk as 3-D tensors: quantize per expert, dequantize,
refuse what no engine reads (checkpoint/experts.py).

The expectations are computed here, independently: each expert's 128x128 block amax / 448
in float64 for the scales, and ``|W - Q*s| <= |W| * 2**-4 + s * 2**-10`` (E4M3 keeps 3
mantissa bits: half an ulp is 2**-4 of the value, and 2**-10 * s below the smallest normal).
One test loads the quantized checkpoint into transformers' own FP8 experts module.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open

from finefp8.checkpoint.convert import dequantize_checkpoint, quantize_checkpoint
from finefp8.checkpoint.errors import ConversionError
from finefp8.checkpoint.experts import classify, expert_parameter_count
from finefp8.checkpoint.inspect import inspect_checkpoint

from .ckpt_utils import write_checkpoint

E, H, INTER = 4, 200, 72  # odd sizes: 200 = 128 + 72, 2I = 144 = 128 + 16


def granite_config(**over) -> dict:
    cfg = {
        "architectures": ["GraniteMoeForCausalLM"],
        "model_type": "granitemoe",
        "hidden_size": H,
        "intermediate_size": INTER,
        "num_local_experts": E,
        "num_experts_per_tok": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_hidden_layers": 1,
        "vocab_size": 64,
    }
    cfg.update(over)
    return cfg


def rand(*shape, seed: int) -> torch.Tensor:
    """bf16 weights with per-expert magnitudes 1e-3..1 (each expert needs its own scales)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g)
    if len(shape) == 3:
        w = w * 10.0 ** torch.empty(shape[0], 1, 1).uniform_(-3, 0, generator=g)
    return w.to(torch.bfloat16)


def granite_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    p = "model.layers.0."
    return {
        "model.embed_tokens.weight": rand(64, H, seed=seed),
        p + "self_attn.q_proj.weight": rand(H, H, seed=seed + 1),
        p + "block_sparse_moe.input_linear.weight": rand(E, 2 * INTER, H, seed=seed + 2),
        p + "block_sparse_moe.output_linear.weight": rand(E, H, INTER, seed=seed + 3),
        p + "block_sparse_moe.router.layer.weight": rand(E, H, seed=seed + 4),
        p + "input_layernorm.weight": torch.ones(H, dtype=torch.bfloat16),
        "model.norm.weight": torch.ones(H, dtype=torch.bfloat16),
    }


def tensors_of(path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            out.update({k: h.get_tensor(k) for k in h.keys()})
    return out


def block_amax_scales(w: torch.Tensor) -> torch.Tensor:
    """``[E, ceil(N/128), ceil(K/128)]``: amax / 448 of each expert's 128x128 blocks (float64)."""
    e, n, k = w.shape
    nb, kb = math.ceil(n / 128), math.ceil(k / 128)
    p = torch.zeros(e, nb * 128, kb * 128, dtype=torch.float64)
    p[:, :n, :k] = w.double().abs()
    return p.view(e, nb, 128, kb, 128).amax(dim=(2, 4)) / 448


def expand(s: torch.Tensor, n: int, k: int) -> torch.Tensor:
    return s.repeat_interleave(128, 1).repeat_interleave(128, 2)[:, :n, :k]


# ----------------------------------------------------------------------------- round trip


def test_granite_stacks_quantized_per_expert_and_round_trip(tmp_path):
    src = write_checkpoint(tmp_path / "in", granite_tensors(), n_shards=2, config=granite_config())
    res = quantize_checkpoint(src, tmp_path / "out", progress=False, tp=())
    out = tensors_of(tmp_path / "out")
    orig = granite_tensors()
    for key, loaded in (("input_linear", "gate_up_proj"), ("output_linear", "down_proj")):
        wkey = f"model.layers.0.block_sparse_moe.{key}.weight"
        skey = f"model.layers.0.block_sparse_moe.experts.{loaded}_scale_inv"
        w, q, s = orig[wkey], out[wkey], out[skey]
        assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
        assert s.dtype == torch.float32 and s.shape == (
            E,
            math.ceil(w.shape[1] / 128),
            math.ceil(w.shape[2] / 128),
        )
        want_s = block_amax_scales(w)
        assert torch.allclose(s.double(), want_s, rtol=1e-6, atol=0)
        err = (q.double() * expand(s.double(), *w.shape[1:]) - w.double()).abs()
        bound = w.double().abs() * 2.0**-4 + expand(want_s, *w.shape[1:]) * 2.0**-10
        assert bool((err <= bound * (1 + 1e-6)).all())
    # the router and the norms stay as they were; the 2-D attention weight is quantized as usual
    router = "model.layers.0.block_sparse_moe.router.layer.weight"
    assert torch.equal(out[router], orig[router])
    assert "model.layers.0.self_attn.q_proj.weight_scale_inv" in out
    assert "model.layers.0.block_sparse_moe.router.layer" in res.kept

    dequantize_checkpoint(tmp_path / "out", tmp_path / "back", progress=False)
    back = tensors_of(tmp_path / "back")
    assert not any(k.endswith("_scale_inv") for k in back)
    wkey = "model.layers.0.block_sparse_moe.input_linear.weight"
    q, s = out[wkey], out["model.layers.0.block_sparse_moe.experts.gate_up_proj_scale_inv"]
    want = (q.double() * expand(s.double(), 2 * INTER, H)).to(torch.bfloat16)
    assert back[wkey].dtype == torch.bfloat16 and torch.equal(back[wkey], want)
    cfg = json.loads((tmp_path / "back" / "config.json").read_text())
    assert "quantization_config" not in cfg


def test_transformers_fp8_experts_reads_the_stacks(tmp_path, monkeypatch):
    """transformers' FineGrainedFP8 integration puts the codes and scales in its FP8Experts.

    Its CUDA check is bypassed (loading only; no forward), so the module is built on the CPU.
    """
    pytest.importorskip("accelerate")
    from transformers import GraniteMoeConfig, GraniteMoeForCausalLM
    from transformers.quantizers.quantizer_finegrained_fp8 import FineGrainedFP8HfQuantizer

    cfg = GraniteMoeConfig(
        vocab_size=64,
        hidden_size=H,
        intermediate_size=INTER,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=E,
        num_experts_per_tok=2,
    )
    torch.manual_seed(0)
    GraniteMoeForCausalLM(cfg).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    quantize_checkpoint(tmp_path / "bf16", tmp_path / "fp8", progress=False, tp=())
    out = tensors_of(tmp_path / "fp8")
    monkeypatch.setattr(
        FineGrainedFP8HfQuantizer, "validate_environment", lambda self, *a, **k: None
    )
    model = GraniteMoeForCausalLM.from_pretrained(tmp_path / "fp8")
    experts = model.model.layers[0].block_sparse_moe.experts
    assert type(experts).__name__.startswith("FP8Experts") or "FP8" in type(experts).__name__
    p = "model.layers.0.block_sparse_moe."
    assert torch.equal(
        experts.gate_up_proj.view(torch.uint8), out[p + "input_linear.weight"].view(torch.uint8)
    )
    assert torch.equal(experts.gate_up_proj_scale_inv, out[p + "experts.gate_up_proj_scale_inv"])
    assert torch.equal(
        experts.down_proj.view(torch.uint8), out[p + "output_linear.weight"].view(torch.uint8)
    )
    assert torch.equal(experts.down_proj_scale_inv, out[p + "experts.down_proj_scale_inv"])


def test_ignored_stack_is_kept_and_listed(tmp_path):
    src = write_checkpoint(tmp_path / "in", granite_tensors(), n_shards=1, config=granite_config())
    res = quantize_checkpoint(src, tmp_path / "out", ignore=["*.output_linear"], progress=False, tp=())
    out = tensors_of(tmp_path / "out")
    key = "model.layers.0.block_sparse_moe.output_linear.weight"
    assert torch.equal(out[key], granite_tensors()[key])
    assert out["model.layers.0.block_sparse_moe.input_linear.weight"].dtype == torch.float8_e4m3fn
    assert "model.layers.0.block_sparse_moe.experts" in res.kept
    qc = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert "model.layers.0.block_sparse_moe.experts" in qc["modules_to_not_convert"]


def test_non_expert_3d_tensor_is_copied(tmp_path):
    t = granite_tensors()
    t["model.layers.0.conv.weight"] = rand(16, 1, 4, seed=9)  # not E experts, not named expert
    src = write_checkpoint(tmp_path / "in", t, n_shards=1, config=granite_config())
    quantize_checkpoint(src, tmp_path / "out", progress=False, tp=())
    assert torch.equal(
        tensors_of(tmp_path / "out")["model.layers.0.conv.weight"], t["model.layers.0.conv.weight"]
    )


# ----------------------------------------------------------------------------- refusals


def refused(tmp_path, tensors, config, match, **kw):
    src = write_checkpoint(tmp_path / "in", tensors, n_shards=1, config=config)
    with pytest.raises(ConversionError, match=match):
        quantize_checkpoint(src, tmp_path / "out", progress=False, **kw)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def llama4_tensors() -> dict[str, torch.Tensor]:
    p = "language_model.model.layers.0.feed_forward."
    return {
        p + "experts.gate_up_proj": rand(E, H, 2 * INTER, seed=1),
        p + "experts.down_proj": rand(E, INTER, H, seed=2),
        p + "shared_expert.gate_proj.weight": rand(INTER, H, seed=3),
    }


def test_transposed_stacks_are_refused_before_writing(tmp_path):
    cfg = {
        "model_type": "llama4",
        "text_config": {
            "model_type": "llama4_text",
            "hidden_size": H,
            "intermediate_size": INTER,
            "num_local_experts": E,
        },
    }
    refused(
        tmp_path,
        llama4_tensors(),
        cfg,
        r"'language_model\.model\.layers\.0\.feed_forward\.experts\.(gate_up|down)_proj'.*"
        r"\[E, in, out\].*--ignore",
    )


def test_transposed_stacks_can_be_kept_with_ignore(tmp_path):
    cfg = {
        "model_type": "llama4_text",
        "hidden_size": H,
        "intermediate_size": INTER,
        "num_local_experts": E,
    }
    src = write_checkpoint(tmp_path / "in", llama4_tensors(), n_shards=1, config=cfg)
    quantize_checkpoint(src, tmp_path / "out", ignore=["*.experts.*"], progress=False, tp=())
    out = tensors_of(tmp_path / "out")
    assert (
        out["language_model.model.layers.0.feed_forward.experts.gate_up_proj"].dtype
        == torch.bfloat16
    )


def test_compressed_tensors_layout_refuses_fused_experts(tmp_path):
    refused(
        tmp_path,
        granite_tensors(),
        granite_config(),
        r"input_linear\.weight'.*compressed-tensors.*--layout fp8",
        layout="compressed-tensors",
    )


def test_stack_not_loaded_into_an_experts_module_is_refused(tmp_path):
    """JetMoe-style names: transformers keeps them as mlp.input_linear, not an experts module."""
    t = {
        "model.layers.0.mlp.input_linear.weight": rand(E, 2 * INTER, H, seed=1),
        "model.layers.0.mlp.output_linear.weight": rand(E, H, INTER, seed=2),
    }
    refused(
        tmp_path,
        t,
        granite_config(model_type="jetmoe"),
        r"'model\.layers\.0\.mlp\.(in|out)put_linear\.weight'.*not into an experts module",
    )


def test_stack_with_bias_is_refused(tmp_path):
    t = {
        "model.layers.0.mlp.experts.gate_up_proj": rand(E, 2 * INTER, H, seed=1),
        "model.layers.0.mlp.experts.gate_up_proj_bias": rand(E, 2 * INTER, seed=2),
    }
    refused(
        tmp_path,
        t,
        granite_config(model_type="qwen3_moe", moe_intermediate_size=INTER),
        r"'model\.layers\.0\.mlp\.experts\.gate_up_proj'.*bias",
    )


def test_expert_count_that_disagrees_with_config(tmp_path):
    t = {"model.layers.0.mlp.experts.gate_up_proj": rand(E + 1, 2 * INTER, H, seed=1)}
    refused(
        tmp_path,
        t,
        granite_config(model_type="qwen3_moe"),
        r"'model\.layers\.0\.mlp\.experts\.gate_up_proj' \[5, 144, 200\] holds 5 experts but "
        r"config\.json declares 4",
    )


def test_unexpected_shape_is_refused(tmp_path):
    t = {"model.layers.0.mlp.experts.down_proj": rand(E, H, 100, seed=1)}
    refused(
        tmp_path,
        t,
        granite_config(model_type="qwen3_moe"),
        r"'model\.layers\.0\.mlp\.experts\.down_proj' has the unexpected shape \[4, 200, 100\]",
    )


def test_name_contradicting_shape_is_refused(tmp_path):
    t = {"model.layers.0.mlp.experts.down_proj": rand(E, 2 * INTER, H, seed=1)}
    refused(tmp_path, t, granite_config(model_type="qwen3_moe"), r"down_proj.*fits only gate_up")


# ----------------------------------------------------------------------------- classify / inspect


@pytest.mark.parametrize(
    "key,shape,role,transposed",
    [
        ("m.experts.gate_up_proj", (E, 2 * INTER, H), "gate_up", False),
        ("m.experts.gate_up_proj", (E, H, 2 * INTER), "gate_up", True),
        ("m.experts.down_proj", (E, H, INTER), "down", False),
        ("m.experts.down_proj", (E, INTER, H), "down", True),
        ("m.experts.w2", (E, INTER, H), "down", True),
        ("m.experts.w1", (E, INTER, H), "up", False),
        ("m.block_sparse_moe.input_linear.weight", (E, 2 * INTER, H), "gate_up", False),
    ],
)
def test_classify_orientation(key, shape, role, transposed):
    cfg = granite_config(model_type="none")
    s = classify(key, shape, cfg)
    assert (s.role, s.transposed, s.experts) == (role, transposed, E)
    assert s.shape == tuple(shape)
    n, k = {"gate_up": (2 * INTER, H), "up": (INTER, H), "down": (H, INTER)}[role]
    assert (s.out_features, s.in_features) == (n, k)
    assert s.scale_shape() == (E, math.ceil(n / 128), math.ceil(k / 128))


def test_classify_ambiguous_shape_without_a_telling_name():
    with pytest.raises(ConversionError, match="refusing to guess"):
        classify("m.experts.proj", (E, INTER, H), granite_config(model_type="none"))
    assert classify("m.other", (E + 1, INTER, H), granite_config()) is None


def test_expert_parameter_count():
    shapes = {k: tuple(v.shape) for k, v in granite_tensors().items()}
    shapes["model.layers.0.block_sparse_moe.experts.gate_up_proj_scale_inv"] = (E, 2, 2)
    got = expert_parameter_count(shapes, granite_config())
    assert got == {
        "experts": E,
        "expert_params": E * 2 * INTER * H + E * H * INTER,
        "stacks": 2,
        "per_expert_tensors": 0,
    }
    per_expert = {
        f"model.layers.1.mlp.experts.{e}.{p}.weight": (INTER, H)
        for e in range(E)
        for p in ("gate_proj", "up_proj")
    }
    got = expert_parameter_count(per_expert, granite_config())
    assert got["expert_params"] == 2 * E * INTER * H and got["per_expert_tensors"] == 2 * E


def test_inspect_reports_stacks_and_expert_parameters(tmp_path):
    src = write_checkpoint(tmp_path / "in", granite_tensors(), n_shards=2, config=granite_config())
    quantize_checkpoint(src, tmp_path / "out", progress=False, tp=())
    rep = inspect_checkpoint(tmp_path / "out", tp=(1,))
    assert rep["sound"], rep["problems"]
    rows = {t["name"]: t for t in rep["tensors"]}
    stack = rows["model.layers.0.block_sparse_moe.input_linear.weight"]
    assert stack["role"] == "fp8 expert stack" and stack["grid"] == [E, 2, 2]
    assert rows["model.layers.0.block_sparse_moe.experts.gate_up_proj_scale_inv"]["role"] == "scale"
    n_experts = E * 2 * INTER * H + E * H * INTER
    assert rep["counts"]["experts"]["expert_params"] == n_experts
    assert rep["counts"]["parameters"] == sum(v.numel() for v in granite_tensors().values())
