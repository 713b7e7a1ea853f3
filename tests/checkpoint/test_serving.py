"""Checkpoints that serve correctly: ``finefp8 quantize --tp`` and ``checkpoint.serving``.

The expected bf16 sets are written out here by hand from the engines' rules (vLLM's
``validate_fp8_block_shape``, its merged-layer scale placement, FusedMoE's intermediate check),
and a numerical emulation of vLLM's loader (``engine_emulation.py``) checks that what
``quantize`` writes by default computes the same logits as its dequantized copy.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from finefp8.checkpoint.convert import dequantize_checkpoint, quantize_checkpoint
from finefp8.checkpoint.inspect import inspect_checkpoint
from finefp8.checkpoint.serving import (
    OK,
    REFUSED,
    UNSPLITTABLE,
    WRONG,
    engine_layers,
    layer_outcome,
    parse_tp,
    scale_placement,
)
from finefp8.cli import main

sys.path.insert(0, str(Path(__file__).parent))
from engine_emulation import _fused, read_tensors, write_engine_checkpoint  # noqa: E402

transformers = pytest.importorskip("transformers")


def _save(model_config, root: Path) -> Path:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(model_config, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # as in trained models: sharp attention (q, k std 0.1) and 64-row
        for name, p in model.named_parameters():  # bands of very different magnitudes
            p.normal_(0, 0.1 if name.endswith(("q_proj.weight", "k_proj.weight")) else 0.05)
            if p.dim() == 2 and p.shape[0] >= 64:
                band = torch.exp(torch.empty(math.ceil(p.shape[0] / 64)).uniform_(-2, 2,
                                                                                  generator=g))
                p.mul_(band.repeat_interleave(64)[: p.shape[0], None].to(p.dtype))
    model.save_pretrained(str(root))
    return root


def llama576_config():
    """SmolLM2's shapes: hidden 576, 9 heads of 64, 3 KV heads, intermediate 1536."""
    return transformers.LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=2,
                                    num_attention_heads=9, num_key_value_heads=3, head_dim=64,
                                    vocab_size=320, tie_word_embeddings=True)


def gqa_config(head_dim: int):
    """hidden 1024, 2 KV heads: head_dim 64 (16 heads, intermediate 1536) or 128 (8 heads,
    intermediate 2048)."""
    heads, inter = (16, 1536) if head_dim == 64 else (8, 2048)
    return transformers.LlamaConfig(hidden_size=1024, intermediate_size=inter, num_hidden_layers=2,
                                    num_attention_heads=heads, num_key_value_heads=2,
                                    head_dim=head_dim, vocab_size=256, tie_word_embeddings=True)


def deepseek_config():
    """DeepSeek-V3's structure, small: MLA with q_lora_rank 192 (not a multiple of 128) and
    kv_lora_rank 64 + rope 32, layer 0 dense (intermediate 512), layer 1 MoE (4 routed experts
    of intermediate 256, 1 shared)."""
    return transformers.DeepseekV3Config(
        vocab_size=320, hidden_size=256, intermediate_size=512, moe_intermediate_size=256,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
        n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
        first_k_dense_replace=1, q_lora_rank=192, kv_lora_rank=64, qk_rope_head_dim=32,
        qk_nope_head_dim=32, v_head_dim=32, tie_word_embeddings=False)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serving")
    return {"llama576": _save(llama576_config(), root / "llama576"),
            "gqa64": _save(gqa_config(64), root / "gqa64"),
            "gqa128": _save(gqa_config(128), root / "gqa128"),
            "deepseek": _save(deepseek_config(), root / "deepseek")}


def _kept(folder: Path, out: Path, tp, layout: str = "fp8") -> set[str]:
    res = quantize_checkpoint(folder, out, layout=layout, tp=tp, progress=False, overwrite=True)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    listed = set(qc.get("modules_to_not_convert") or qc.get("ignore")) - {"lm_head"}
    assert listed - {m for m in listed if m.endswith("mlp.gate")} == set(res.serving.kept)
    return set(res.serving.kept)


# ----------------------------------------------------------------------------- expected sets


def _attn(layers, names, prefix="self_attn"):
    return {f"model.layers.{i}.{prefix}.{n}" for i in layers for n in names}


QKV = ("q_proj", "k_proj", "v_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def test_llama576_keep_sets(models, tmp_path):
    src = models["llama576"]
    # TP 1: q (576 rows) is not the last part of the fused qkv_proj -> the whole group stays bf16
    assert _kept(src, tmp_path / "a", (1,)) == _attn(range(2), QKV)
    # TP 2 adds o_proj (row-parallel: in 576 / 2 = 288); gate/up 1536/2 = 768, down in 768 fine
    assert _kept(src, tmp_path / "b", (1, 2)) == _attn(range(2), QKV + ("o_proj",))
    # compressed-tensors: same set (there it is refused rather than computed wrong)
    assert _kept(src, tmp_path / "c", (1,), "compressed-tensors") == _attn(range(2), QKV)
    # --tp none: nothing kept for serving
    res = quantize_checkpoint(src, tmp_path / "d", tp=(), progress=False)
    assert res.serving is None and res.kept == []


def test_gqa_replicated_kv_heads(models, tmp_path):
    # 2 KV heads of 64: at TP 4 and 8 each rank holds one K head = 64 rows -> qkv kept
    assert _kept(models["gqa64"], tmp_path / "a", (4,)) == _attn(range(2), QKV)
    # at TP 8 also intermediate 1536 / 8 = 192: gate/up (column) and down (row) refused
    assert _kept(models["gqa64"], tmp_path / "b", (8,)) == (_attn(range(2), QKV)
                                                             | _attn(range(2), MLP, "mlp"))
    # 2 KV heads of 128: one replicated head per rank is 128 rows -> nothing to keep
    assert _kept(models["gqa128"], tmp_path / "c", (4, 8)) == set()


def test_deepseek_mla_moe_keep_sets(models, tmp_path):
    src = models["deepseek"]
    fused_a = _attn(range(2), ("q_a_proj", "kv_a_proj_with_mqa"))  # q_lora_rank 192 first
    assert _kept(src, tmp_path / "a", (1,)) == fused_a
    # TP 2: o_proj in 4 heads x 32 = 128 / 2 = 64; q_b/kv_b out 256/2 = 128, dense 512/2,
    # experts and shared expert 256/2 = 128 are fine
    assert _kept(src, tmp_path / "b", (1, 2)) == fused_a | _attn(range(2), ("o_proj",))
    # TP 4: q_b/kv_b 64 rows per rank, o_proj 32, routed experts 64 (the whole FusedMoE layer),
    # shared expert 64; the dense MLP (512/4 = 128) is fine
    experts = {f"model.layers.1.mlp.experts.{e}.{n}" for e in range(4) for n in MLP}
    shared = {f"model.layers.1.mlp.shared_experts.{n}" for n in MLP}
    assert _kept(src, tmp_path / "c", (1, 2, 4)) == (
        fused_a | _attn(range(2), ("o_proj", "q_b_proj", "kv_b_proj")) | experts | shared)


def test_user_ignored_part_keeps_its_whole_group(models, tmp_path):
    # --ignore k_proj alone would leave a mixed qkv_proj, which the engine refuses
    res = quantize_checkpoint(models["gqa128"], tmp_path / "o", ignore=["*.k_proj"], tp=(1,),
                              progress=False)
    assert set(res.serving.kept) == _attn(range(2), ("q_proj", "v_proj"))
    assert inspect_checkpoint(tmp_path / "o", tp=(1,), scan_values=False)["tp"][1]["ok"]
    # without the check, inspect names the mixed layer as refused
    quantize_checkpoint(models["gqa128"], tmp_path / "m", ignore=["*.k_proj"], tp=(),
                        progress=False)
    v = inspect_checkpoint(tmp_path / "m", tp=(1,), scan_values=False)["tp"][1]
    assert not v["ok"] and v["layers"][0]["outcome"] == REFUSED
    assert "mixes FP8 and high-precision parts" in v["layers"][0]["reason"]


# ----------------------------------------------------------------------------- the engine emulation


def _logits(folder: Path) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder),
                                                              dtype=torch.float32).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 24),
                        generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("name", ["llama576", "deepseek"])
@pytest.mark.parametrize("layout", ["fp8", "compressed-tensors"])
def test_default_checkpoint_serves_like_its_dequantized_copy(models, tmp_path, name, layout):
    q, deq, eng = tmp_path / "q", tmp_path / "deq", tmp_path / "eng"
    assert main(["quantize", str(models[name]), str(q), "--layout", layout, "--quiet"]) == 0
    dequantize_checkpoint(q, deq, progress=False)
    write_engine_checkpoint(q, eng)
    a, b = _logits(deq), _logits(eng)
    assert torch.equal(a, b)


def test_emulation_detects_the_bug_without_the_check(models, tmp_path):
    q, deq, eng = tmp_path / "q", tmp_path / "deq", tmp_path / "eng"
    assert main(["quantize", str(models["llama576"]), str(q), "--no-serving-check",
                 "--quiet"]) == 0
    dequantize_checkpoint(q, deq, progress=False)
    write_engine_checkpoint(q, eng)
    a, b = _logits(deq), _logits(eng)
    # the default checkpoints above match bit for bit; this one is off by far more than rounding
    assert (a - b).abs().max() > 1e-3
    # the cause: k_proj's rows get other blocks' scales (v_proj, the last part, is placed right)
    w_deq, w_eng = read_tensors(deq), read_tensors(eng)
    k = "model.layers.0.self_attn.k_proj.weight"
    err = (w_eng[k].float() - w_deq[k].float()).norm() / w_deq[k].float().norm()
    assert err > 0.1
    v = "model.layers.0.self_attn.v_proj.weight"
    assert torch.equal(w_eng[v], w_deq[v])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 12).map(lambda k: 32 * k), min_size=2, max_size=3))
def test_scale_placement_agrees_with_the_numeric_emulation(rows):
    """``scale_placement`` says OK exactly when the fused weights equal every part's own
    ``Q * s`` (distinct random scales, so a misplaced scale always shows)."""
    g = torch.Generator().manual_seed(sum(rows))
    codes = [torch.randn(r, 128, generator=g).clamp(-4, 4).to(torch.float8_e4m3fn) for r in rows]
    codes = [torch.where(c.float() == 0, torch.ones(()), c.float()).to(torch.float8_e4m3fn)
             for c in codes]
    scales = [torch.rand(math.ceil(r / 128), 1, generator=g) + 1 + i
              for i, r in enumerate(rows)]
    own = [c.float() * s.repeat_interleave(128, 0)[: c.shape[0]] for c, s in zip(codes, scales,
                                                                                 strict=True)]
    status, _ = scale_placement([(r, r, 0) for r in rows])
    if status == REFUSED:  # a part's scales would be copied past the fused grid's end
        with pytest.raises(AssertionError, match="outside the grid"):
            _fused(codes, scales)
        assert any(r % 128 for r in rows[:-1])
        return
    fused = _fused(codes, scales)
    same = all(torch.equal(a, b) for a, b in zip(fused, own, strict=True))
    assert (status == OK) == same
    # the engines' shape rule: only the last part may be ragged
    assert same == all(r % 128 == 0 for r in rows[:-1])


# ----------------------------------------------------------------------------- verdicts


def _layer(shapes, config, name):
    return next(x for x in engine_layers(shapes, config) if x.name == name)


def test_verdicts_per_layout_and_degree():
    cfg = {"num_attention_heads": 9, "num_key_value_heads": 3}
    shapes = {"m.q_proj.weight": (576, 576), "m.k_proj.weight": (192, 576),
              "m.v_proj.weight": (192, 576), "m.o_proj.weight": (576, 576)}
    qkv = _layer(shapes, cfg, "m.qkv_proj")
    assert qkv.engine_class == "QKVParallelLinear" and qkv.part_rows == (576, 192, 192)
    assert layer_outcome(qkv, 1, "fp8").status == WRONG
    assert layer_outcome(qkv, 1, "compressed-tensors").status == REFUSED
    # TP 3: q 192 rows per rank = 2 scale rows, rank 2 would copy rows 4:6 of q's 5-row grid
    assert layer_outcome(qkv, 3, "fp8").status == REFUSED
    assert layer_outcome(qkv, 2, "fp8").status == UNSPLITTABLE  # 9 heads
    o = _layer(shapes, cfg, "m.o_proj")
    assert layer_outcome(o, 1).status == OK and layer_outcome(o, 2).status == REFUSED
    # DeepSeek-V3's real shapes: fused_qkv_a_proj = q_a 1536 + kv_a 576 (last), never split
    ds = {"a.q_a_proj.weight": (1536, 7168), "a.kv_a_proj_with_mqa.weight": (576, 7168),
          "a.q_b_proj.weight": (24576, 1536), "a.kv_b_proj.weight": (32768, 512)}
    fused = _layer(ds, {}, "a.fused_qkv_a_proj")
    assert fused.engine_class == "MergedColumnParallelLinear" and not fused.tp_split
    assert all(layer_outcome(fused, d).status == OK for d in (1, 8, 32))
    # dense intermediate 18432 at TP 32 = 576 per rank; routed experts 2048 at TP 32 = 64
    mlp = {"b.gate_proj.weight": (18432, 7168), "b.up_proj.weight": (18432, 7168),
           "b.down_proj.weight": (7168, 18432),
           "b.experts.0.gate_proj.weight": (2048, 7168), "b.experts.0.up_proj.weight": (2048, 7168),
           "b.experts.0.down_proj.weight": (7168, 2048)}
    gu, down = _layer(mlp, {}, "b.gate_up_proj"), _layer(mlp, {}, "b.down_proj")
    moe = _layer(mlp, {}, "b.experts")
    assert moe.engine_class == "FusedMoE" and moe.intermediate == 2048
    for layer in (gu, down):
        assert layer_outcome(layer, 16).status == OK and layer_outcome(layer, 32).status == REFUSED
    assert layer_outcome(moe, 16).status == OK and layer_outcome(moe, 32).status == REFUSED
    # fused 3-D experts on disk: [E, 2I, H] and [E, H, I]
    fused3 = {"c.experts.gate_up_proj": (8, 2 * 192, 256), "c.experts.down_proj": (8, 256, 192)}
    m3 = _layer(fused3, {}, "c.experts")
    assert m3.intermediate == 192 and layer_outcome(m3, 1).status == REFUSED
    granite = {"d.block_sparse_moe.input_linear.weight": (8, 2 * 512, 256),
               "d.block_sparse_moe.output_linear.weight": (8, 256, 512)}
    g3 = _layer(granite, {}, "d.block_sparse_moe")
    assert g3.engine_class == "FusedMoE" and g3.intermediate == 512
    assert layer_outcome(g3, 4).status == OK and layer_outcome(g3, 8).status == REFUSED


def test_parse_tp():
    assert parse_tp("4,1,2") == (1, 2, 4) and parse_tp("none") == () and parse_tp(None) == ()
    for bad in ("0", "a", "1,-2"):
        with pytest.raises(ValueError, match="--tp"):
            parse_tp(bad)


# ----------------------------------------------------------------------------- CLI, inspect, nn


def test_cli_summary_names_kept_layers_and_bytes(models, tmp_path, capsys):
    assert main(["quantize", str(models["llama576"]), str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    assert "6 Linear weights kept" in err and "loads and computes wrong at TP 1" in err
    assert "model.layers.{0-1}.self_attn.qkv_proj" in err and "MB" in err
    assert "% of the Linear parameters are FP8" in err
    assert main(["quantize", str(models["llama576"]), str(tmp_path / "p"), "--tp", "1,2"]) == 0
    assert "warning: TP 2 cannot serve" in capsys.readouterr().err
    assert main(["quantize", str(models["llama576"]), str(tmp_path / "q"), "--tp", "x"]) == 1


def test_inspect_reports_per_layer_and_degree(models, tmp_path, capsys):
    src = models["llama576"]
    for layout, outcome in (("fp8", WRONG), ("compressed-tensors", REFUSED)):
        out = tmp_path / layout
        quantize_checkpoint(src, out, layout=layout, tp=(), progress=False)
        rep = inspect_checkpoint(out, tp=(1,), scan_values=False)
        v = rep["tp"][1]
        assert not v["ok"] and v["layout"] == layout and "vLLM 0.32" in v["engine"]
        assert {x["layer"]: x["outcome"] for x in v["layers"]} == {
            f"model.layers.{i}.self_attn.qkv_proj": outcome for i in range(2)}
        assert main(["inspect", str(out), "--tp", "1", "--no-scan"]) == 3
        assert outcome in capsys.readouterr().out
    good = tmp_path / "good"
    quantize_checkpoint(src, good, tp=(1,), progress=False)
    assert main(["inspect", str(good), "--tp", "1", "--json", "--no-scan"]) == 0
    assert json.loads(capsys.readouterr().out)["tp"]["1"]["ok"]


def test_quantize_model_keeps_the_same_layers(models, tmp_path):
    from finefp8.nn import fp8_modules
    from finefp8.nn.convert import quantize_model

    model = transformers.AutoModelForCausalLM.from_pretrained(str(models["deepseek"]),
                                                              dtype=torch.float32)
    quantize_model(model, tp=(1, 2))
    kept = _kept(models["deepseek"], tmp_path / "o", (1, 2))
    linear = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert kept <= linear and not kept & set(fp8_modules(model))
