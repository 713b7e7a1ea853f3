"""``finefp8 inspect`` and the tensor-parallel rules of layout.tp_problems."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from finefp8.checkpoint import layer_kind, skip_reason, tp_problems
from finefp8.checkpoint.convert import quantize_checkpoint
from finefp8.checkpoint.inspect import inspect_checkpoint, nonfinite_count
from finefp8.cli import main

sys.path.insert(0, str(Path(__file__).parent))
from ckpt_utils import llama_tensors, write_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def quantized(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("insp")
    src = write_checkpoint(root / "in", llama_tensors(seed=2))
    quantize_checkpoint(src, root / "out", progress=False, tp=())
    return root / "out"


# ----------------------------------------------------------------------------- rules


@pytest.mark.parametrize("key,kind", [
    ("model.layers.0.self_attn.q_proj.weight", "column"),
    ("model.layers.0.self_attn.o_proj.weight", "row"),
    ("model.layers.0.mlp.gate_proj.weight", "column"),
    ("model.layers.0.mlp.down_proj.weight", "row"),
    ("model.layers.3.mlp.experts.7.up_proj.weight", "expert_in"),
    ("model.layers.3.mlp.experts.7.down_proj.weight", "expert_out"),
    ("model.layers.3.mlp.shared_experts.down_proj.weight", "row"),
    ("model.layers.0.self_attn.q_a_proj.weight", "replicated"),
    ("model.layers.0.self_attn.kv_a_proj_with_mqa.weight", "replicated"),
    ("model.layers.0.self_attn.kv_b_proj.weight", "column"),
])
def test_layer_kind(key, kind):
    assert layer_kind(key) == kind


def test_skip_rules():
    assert skip_reason("model.layers.0.mlp.gate.weight", (256, 7168), "BF16") == "MoE router"
    assert skip_reason("model.layers.0.mlp.gate_proj.weight", (18432, 7168), "BF16") is None
    assert skip_reason("lm_head.weight", (100, 64), "BF16") == "output head"
    assert skip_reason("model.embed_tokens.weight", (100, 64), "BF16") == "embedding"
    assert skip_reason("model.norm.weight", (64,), "BF16") == "1-D"
    assert skip_reason("model.layers.0.self_attn.q_a_layernorm.weight", (1536, 2), "F32") == "norm"
    assert skip_reason("model.layers.0.self_attn.q_proj.bias", (64,), "BF16") == "not a .weight"
    assert skip_reason("model.layers.0.mlp.experts.gate_up_proj", (8, 64, 64), "BF16")
    assert skip_reason("x.q_proj.weight", (64, 64), "I8") == "dtype I8"
    assert skip_reason("model.layers.0.mlp.down_proj.weight", (64, 64), "BF16",
                       ["re:model\\.layers\\.0\\."]) .startswith("ignored")
    assert skip_reason("model.layers.10.mlp.down_proj.weight", (64, 64), "BF16",
                       ["re:model\\.layers\\.1\\."]) is None


def test_known_tp_failures_from_spec():
    # DeepSeek-V3 MoE intermediate 2048 and dense 18432: 18432 / 32 = 576 is refused
    assert tp_problems("model.layers.0.mlp.down_proj.weight", (7168, 18432), 32)
    assert not tp_problems("model.layers.0.mlp.down_proj.weight", (7168, 18432), 16)
    assert tp_problems("model.layers.0.mlp.gate_proj.weight", (18432, 7168), 32)
    # 3072 / 16 = 192 is refused
    msg = tp_problems("model.layers.0.mlp.up_proj.weight", (3072, 1024), 16)
    assert msg and "192" in msg[0]
    assert not tp_problems("model.layers.0.mlp.up_proj.weight", (3072, 1024), 8)
    assert tp_problems("model.layers.3.mlp.experts.1.down_proj.weight", (7168, 2048), 32)
    assert not tp_problems("model.layers.3.mlp.experts.1.down_proj.weight", (7168, 2048), 16)
    # row parallel at tp=1 is never split; replicated layers never refuse
    assert not tp_problems("model.layers.0.self_attn.o_proj.weight", (576, 576), 1)
    assert not tp_problems("model.layers.0.self_attn.q_a_proj.weight", (1536, 7168), 64)
    # merged q/k/v at tp=1: every part but the last (v) must be a multiple of 128
    assert tp_problems("model.layers.0.self_attn.q_proj.weight", (576, 576), 1)
    assert not tp_problems("model.layers.0.self_attn.v_proj.weight", (192, 576), 1)
    # KV heads replicated when tp > num_key_value_heads (Llama-3-8B: 8 KV heads of 128)
    cfg = {"num_attention_heads": 32, "num_key_value_heads": 8}
    assert not tp_problems("model.layers.0.self_attn.k_proj.weight", (1024, 4096), 16, cfg)


def test_nonfinite_count_fp8_codes():
    codes = torch.tensor([0x00, 0x7F, 0xFF, 0x7E], dtype=torch.uint8).view(torch.float8_e4m3fn)
    assert nonfinite_count(codes) == 2
    assert nonfinite_count(torch.tensor([1.0, float("inf"), float("nan")])) == 2


# ----------------------------------------------------------------------------- reports


def test_inspect_sound_checkpoint(quantized):
    rep = inspect_checkpoint(quantized, tp=(1, 2))
    assert rep["sound"] and rep["format"] == "fp8" and rep["quantized"]
    rows = {r["name"]: r for r in rep["tensors"]}
    down = rows["model.layers.0.mlp.down_proj.weight"]
    assert down["dtype"] == "F8_E4M3" and down["grid"] == [5, 12] and down["nonfinite"] == 0
    assert 0 < down["scale_min"] <= down["scale_max"]
    assert rows["model.layers.1.mlp.gate.weight"]["role"] == "kept (MoE router)"
    assert not rep["tp"][1]["ok"]  # 576-wide q_proj merged into qkv_proj
    assert any("k_proj" in p["tensor"] for p in rep["tp"][2]["problems"])


def test_inspect_predicts_for_unquantized(tmp_path):
    src = write_checkpoint(tmp_path / "in", llama_tensors(seed=4))
    rep = inspect_checkpoint(src, tp=(2,))
    assert rep["sound"] and not rep["quantized"] and rep["tp"][2]["predicted"]
    assert rep["tp"][2]["problems"]


def test_inspect_cli_exit_codes_and_json(quantized, tmp_path, capsys):
    assert main(["inspect", str(quantized), "--tp", "1", "--json"]) == 3  # TP refused only
    rep = json.loads(capsys.readouterr().out)
    assert rep["sound"] and rep["tp"]["1"]["problems"]
    # a checkpoint with 128-multiple shapes is accepted at tp 1, 2, 4
    t = {"model.layers.0.mlp.down_proj.weight": torch.randn(512, 1024).bfloat16(),
         "model.layers.0.mlp.up_proj.weight": torch.randn(1024, 512).bfloat16()}
    good = write_checkpoint(tmp_path / "good", t, n_shards=1)
    quantize_checkpoint(good, tmp_path / "goodq", progress=False, tp=())
    assert main(["inspect", str(tmp_path / "goodq"), "--tp", "1,2,4"]) == 0
    assert main(["inspect", str(tmp_path / "goodq"), "--tp", "1,2,4,8,16"]) == 3


def test_inspect_finds_problems(quantized, tmp_path, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(quantized, bad)
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    k = "model.layers.0.mlp.down_proj.weight"
    shard = bad / index["weight_map"][k]
    t = load_file(str(shard))
    codes = t[k].view(torch.uint8).clone()
    codes[3, 5] = 0x7F  # an E4M3 NaN code
    t[k] = codes.view(torch.float8_e4m3fn)
    sk = next(x for x in t if x.endswith("_scale_inv") and x != k + "_scale_inv")
    del t[sk]
    save_file(t, str(shard), metadata={"format": "pt"})
    index["weight_map"].pop(sk)
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    assert main(["inspect", str(bad), "--tp", "1"]) == 1
    out = capsys.readouterr().out
    assert "NaN/Inf" in out and k in out
    rep = inspect_checkpoint(bad, tp=(1,))
    assert not rep["sound"]
    assert any(k in p and "1 NaN/Inf" in p for p in rep["problems"])
    assert any("without its scale" in p and sk in p for p in rep["problems"])
