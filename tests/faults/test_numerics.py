"""Numbers that would silently break a checkpoint are refused with the tensor named, unless
``--allow-nonfinite`` says otherwise (issue 10 item 4): unsound scales (NaN, Inf, zero,
negative, integer) in dequantize, inspect and finefp8.load; fp16 output above 65504; ue8m0
scales that dequantize values near the bf16 maximum to Inf."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
from faultkit import SHARDS, make_ckpt, manifest, tiny_tensors  # noqa: E402

from finefp8.checkpoint import CheckpointError, scale_problem  # noqa: E402
from finefp8.checkpoint.inspect import inspect_checkpoint  # noqa: E402
from finefp8.cli import main  # noqa: E402

W = "model.layers.0.self_attn.q_proj.weight"
S = "model.layers.0.self_attn.q_proj.weight_scale_inv"


def _set_scale(ckpt: Path, value: float | None, dtype: torch.dtype | None = None) -> Path:
    """Put ``value`` in block (1, 0) of scale ``S`` (or cast it to ``dtype``), in place."""
    shard = next(ckpt / n for n in SHARDS if S in load_file(str(ckpt / n)))
    t = load_file(str(shard))
    if value is not None:
        t[S][1, 0] = value
    if dtype is not None:
        t[S] = t[S].to(dtype)
    save_file(t, str(shard), metadata={"format": "pt"})
    return ckpt


@pytest.fixture
def fp8(ref, tmp_path) -> Path:
    out = tmp_path / "fp8"
    shutil.copytree(ref, out)
    return out


@pytest.mark.parametrize("value,expect", [
    (float("nan"), "NaN/Inf"), (float("inf"), "NaN/Inf"), (0.0, "zero or negative"),
    (-1e-3, "zero or negative")])
def test_unsound_scale_refused_by_dequantize(fp8, tmp_path, capsys, value, expect):
    _set_scale(fp8, value)
    out = tmp_path / "out"
    assert main(["dequantize", str(fp8), str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert S in err and expect in err and "block (1, 0)" in err, err
    assert not out.exists()


def test_integer_scale_refused_everywhere(fp8, tmp_path, capsys):
    _set_scale(fp8, None, torch.int32)
    assert main(["dequantize", str(fp8), str(tmp_path / "out"), "--quiet"]) == 1
    assert "integer dtype int32" in capsys.readouterr().err
    report = inspect_checkpoint(fp8, (1,), scan_values=False)
    assert not report["sound"] and any("integer dtype" in p for p in report["problems"])


def test_nan_scale_allowed_only_on_request(fp8, tmp_path):
    _set_scale(fp8, float("nan"))
    out = tmp_path / "out"
    assert main(["dequantize", str(fp8), str(out), "--quiet", "--allow-nonfinite"]) == 0
    w = next(load_file(str(out / n))[W] for n in SHARDS if (out / n).exists()
             and W in load_file(str(out / n)))
    assert bool(w[128:256, :128].float().isnan().all()) and bool(w[:128].isfinite().all())
    assert manifest(out)["status"] == "complete"
    _set_scale(fp8, 0.0)  # a zero scale is never allowed: it is wrong, not non-finite
    assert main(["dequantize", str(fp8), str(tmp_path / "out2"), "--quiet",
                 "--allow-nonfinite"]) == 1


def test_inspect_flags_unsound_scales(fp8):
    assert inspect_checkpoint(fp8, (1,), scan_values=False)["sound"]
    _set_scale(fp8, -2.0)
    report = inspect_checkpoint(fp8, (1,), scan_values=False)
    assert not report["sound"]
    assert any(S in p and "zero or negative" in p for p in report["problems"])


def test_scale_problem_reference_cases():
    good = torch.tensor([[1e-3, 2.0]], dtype=torch.float32)
    assert scale_problem("s", good) is None
    assert scale_problem("s", good.to(torch.bfloat16)) is None
    assert "integer" in scale_problem("s", torch.ones(1, 2, dtype=torch.int64))
    assert "block (0, 1)" in scale_problem("s", torch.tensor([[1.0, float("-inf")]]))


def test_finefp8_load_refuses_an_unsound_scale(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    import finefp8
    from finefp8.checkpoint.convert import quantize_checkpoint

    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=256, intermediate_size=384,
                                   num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "bf16")
    quantize_checkpoint(tmp_path / "bf16", tmp_path / "fp8", progress=False, tp=())
    path = tmp_path / "fp8" / "model.safetensors"
    t = load_file(str(path))
    t[S][0, 1] = float("nan")
    save_file(t, str(path), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"scale '{S}' has 1 NaN/Inf values"):
        finefp8.load(tmp_path / "fp8")


def _fp8_overflow_ckpt(root: Path) -> Path:
    """One FP8 weight with codes 448 in block (0, 1) and scale 1024 there: Q * s = 458752 (exact in bf16)."""
    root.mkdir()
    q = torch.zeros(256, 256)
    q[5, 130] = 448.0
    s = torch.full((2, 2), 1e-3)
    s[0, 1] = 1024.0
    save_file({W: q.to(torch.float8_e4m3fn), S: s, "model.norm.weight": torch.ones(4)},
              str(root / "model.safetensors"))
    (root / "config.json").write_text(json.dumps({"quantization_config": {
        "quant_method": "fp8", "weight_block_size": [128, 128]}}))
    return root


def test_fp16_overflow_refused_with_tensor_named(tmp_path, capsys):
    src = _fp8_overflow_ckpt(tmp_path / "fp8")
    out = tmp_path / "out"
    assert main(["dequantize", str(src), str(out), "--dtype", "fp16", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert W in err and "overflows" in err and "65504" in err and "row 5, column 130" in err
    assert not out.exists()
    assert main(["dequantize", str(src), str(out), "--dtype", "bf16", "--quiet"]) == 0
    assert float(load_file(str(out / "model.safetensors"))[W][5, 130]) == 458752.0
    out16 = tmp_path / "out16"
    assert main(["dequantize", str(src), str(out16), "--dtype", "fp16", "--quiet",
                 "--allow-nonfinite"]) == 0
    assert load_file(str(out16 / "model.safetensors"))[W][5, 130].isinf()


def test_ue8m0_near_bf16_max_refused(tmp_path, capsys):
    """bf16 weights near 3.39e38: ue8m0 rounds the scale up to 2^120, a code rounds up to 288,
    and 288 * 2^120 = 3.8e38 is Inf in bf16 and fp32: refused, OUT removed."""
    t = tiny_tensors(seed=4)
    k = "model.layers.0.mlp.down_proj.weight"
    t[k][3, 7] = 3.3e38
    t[k][3, 8] = 2.9e38
    src = make_ckpt(tmp_path / "in", t)
    out = tmp_path / "out"
    assert main(["quantize", str(src), str(out), "--scale-fmt", "ue8m0", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert k in err and "overflow" in err and "row 3" in err, err
    assert not out.exists()
    assert main(["quantize", str(src), str(out), "--scale-fmt", "ue8m0", "--quiet",
                 "--allow-nonfinite"]) == 0
    assert manifest(out)["status"] == "complete"
