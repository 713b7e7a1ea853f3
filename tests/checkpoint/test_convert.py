"""quantize / dequantize on small synthetic checkpoints: layout, round trip, resume, refusals."""

from __future__ import annotations

import errno
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import finefp8
from finefp8.checkpoint import CheckpointError, CheckpointReader, dequantized_weight, scale_key
from finefp8.checkpoint import convert as conv
from finefp8.checkpoint import workers as wk
from finefp8.checkpoint.convert import (
    MANIFEST_NAME,
    ConversionError,
    dequantize_checkpoint,
    quantize_checkpoint,
)
from finefp8.checkpoint.writer import ShardWriter, WriteError
from finefp8.cli import main

sys.path.insert(0, str(Path(__file__).parent))
from ckpt_utils import llama_tensors, write_checkpoint  # noqa: E402

QUANTIZED = {
    f"model.layers.{i}.self_attn.{p}.weight" for i in range(2)
    for p in ("q_proj", "k_proj", "v_proj", "o_proj")
} | {f"model.layers.0.mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")} | {
    f"model.layers.1.mlp.experts.{e}.{p}.weight" for e in range(2)
    for p in ("gate_proj", "up_proj", "down_proj")
}


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "in", llama_tensors())


@pytest.fixture(scope="module")
def quantized(src, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("q") / "out"
    quantize_checkpoint(src, out, progress=False, tp=())
    return out


def _all_tensors(root: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(root.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def _max_rel_bound_violation(w: torch.Tensor, wq: torch.Tensor, s: torch.Tensor) -> float:
    """max over elements of |w - w~| - (2^-4 |w| + 2^-10 s + 2^-21 |w|), the per-element bound
    of docs/numerics.md section 3 for fp32 output (<= 0 when the bound holds)."""
    m, n = w.shape
    se = s.repeat_interleave(128, 0)[:m].repeat_interleave(128, 1)[:, :n]
    bound = w.abs() * (2 ** -4 + 2 ** -21) + se * 2 ** -10
    return float(((w - wq).abs() - bound).max())


# ----------------------------------------------------------------------------- layout


def test_quantize_layout_and_config(src, quantized):
    t_in, t_out = _all_tensors(src), _all_tensors(quantized)
    for k in QUANTIZED:
        assert t_out[k].dtype == torch.float8_e4m3fn, k
        s = t_out[scale_key(k, "fp8")]
        m, n = t_in[k].shape
        assert s.dtype == torch.float32 and tuple(s.shape) == (-(-m // 128), -(-n // 128))
        assert bool(torch.isfinite(s).all()) and bool((s > 0).all())
    kept = set(t_in) - QUANTIZED
    assert "model.layers.1.mlp.gate.weight" in kept and "model.embed_tokens.weight" in kept
    for k in kept:
        assert torch.equal(t_in[k], t_out[k]), k
    assert "lm_head.weight" not in t_out  # tied embeddings stay tied: nothing materialised
    cfg = json.loads((quantized / "config.json").read_text())
    assert cfg["tie_word_embeddings"] is True
    assert cfg["quantization_config"] == {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
        "modules_to_not_convert": ["lm_head", "model.layers.1.mlp.gate"],
    }
    index = json.loads((quantized / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(t_out)
    total = sum(v.numel() * v.element_size() for v in t_out.values())
    assert index["metadata"]["total_size"] == total
    for k, shard in index["weight_map"].items():
        with safe_open(str(quantized / shard), "pt") as f:
            assert k in f.keys()
    assert (quantized / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    assert json.loads((quantized / MANIFEST_NAME).read_text())["status"] == "complete"
    assert not list(quantized.glob("*.partial"))


def _ref_e4m3(x: torch.Tensor) -> torch.Tensor:
    """Round float64 ``x`` to the nearest E4M3 value (ties to even), saturating at 448:
    3 mantissa bits, normals from 2^-6, subnormal step 2^-9. Written from the OCP FP8 spec,
    independent of finefp8 and of torch's fp8 cast."""
    v = x.abs().clamp(max=448.0)
    e = torch.floor(torch.log2(v.clamp(min=2.0 ** -6)))
    step = torch.exp2(e - 3)
    q = torch.round(v / step) * step  # torch.round: half to even
    return torch.sign(x) * q.clamp(max=448.0)


def _ref_quantize(w: torch.Tensor, scale_fmt: str = "fp32") -> tuple[torch.Tensor, torch.Tensor]:
    """float64 reference of 128x128 block quantization: ``s = max(amax, 1e-10) / 448`` rounded
    to fp32 (ue8m0: up to a power of two), codes = E4M3(fp32(w / s)). Returns (code values as
    float64, scales as float32)."""
    m, n = w.shape
    wd = w.double()
    gm, gn = -(-m // 128), -(-n // 128)
    s = torch.empty(gm, gn, dtype=torch.float64)
    codes = torch.empty(m, n, dtype=torch.float64)
    for i in range(gm):
        for j in range(gn):
            blk = wd[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
            si = float(torch.tensor(max(float(blk.abs().max()), 1e-10) / 448.0,
                                    dtype=torch.float32))
            if scale_fmt == "ue8m0":
                mant, ex = math.frexp(si)
                si = math.ldexp(1.0, ex - 1) if mant == 0.5 else math.ldexp(1.0, ex)
            s[i, j] = si
            x = (blk / si).float().double()  # the division is rounded to fp32
            codes[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] = _ref_e4m3(x)
    return codes, s.float()


def test_quantized_codes_match_float64_reference(src, quantized):
    """The streamed codes and scales equal a hand-written float64 reference of the format."""
    t_in, t_out = _all_tensors(src), _all_tensors(quantized)
    for k in ("model.layers.0.mlp.down_proj.weight", "model.layers.0.self_attn.k_proj.weight",
              "model.layers.1.self_attn.o_proj.weight"):
        codes, s = _ref_quantize(t_in[k])
        assert torch.equal(t_out[k].double(), codes), k
        assert torch.equal(s, t_out[scale_key(k, "fp8")]), k


def test_zero_weight_has_finite_scale_and_zero_codes(quantized):
    t = _all_tensors(quantized)
    k = "model.layers.1.self_attn.o_proj.weight"
    assert bool(torch.isfinite(t[scale_key(k, "fp8")]).all())
    assert int(t[k].view(torch.uint8).count_nonzero()) == 0


def test_round_trip(src, quantized, tmp_path):
    out = tmp_path / "deq"
    dequantize_checkpoint(quantized, out, dtype="fp32", progress=False)
    t_in, t_out = _all_tensors(src), _all_tensors(out)
    assert set(t_in) == set(t_out)
    t_q = _all_tensors(quantized)
    for k, w in t_in.items():
        if k in QUANTIZED:
            assert t_out[k].dtype == torch.float32
            s = t_q[scale_key(k, "fp8")]
            assert _max_rel_bound_violation(w.float(), t_out[k], s) <= 0, k
            rel = float((w.float() - t_out[k]).norm() / max(float(w.float().norm()), 1e-30))
            assert rel < 0.05 or float(w.abs().max()) == 0, k
        else:
            assert t_out[k].dtype == w.dtype and torch.equal(t_out[k], w), k  # bit-identical
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["torch_dtype"] == "float32"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size()
                                                  for v in t_out.values())


def test_chunked_equals_whole(src, quantized, tmp_path, monkeypatch):
    """Row-range chunks (128 rows) give the same bytes as whole-tensor processing."""
    monkeypatch.setattr(wk, "CHUNK_ELEMENTS", 1)
    out = tmp_path / "chunked"
    quantize_checkpoint(src, out, progress=False, tp=())
    for f in quantized.glob("*.safetensors"):
        assert f.read_bytes() == (out / f.name).read_bytes(), f.name
    d1, d2 = tmp_path / "d1", tmp_path / "d2"
    dequantize_checkpoint(out, d1, progress=False)
    monkeypatch.setattr(wk, "CHUNK_ELEMENTS", 8 * 1024 * 1024)
    dequantize_checkpoint(out, d2, progress=False)
    assert _tree_bytes(d1) == _tree_bytes(d2)


def test_compressed_tensors_layout(src, tmp_path):
    out = tmp_path / "ct"
    quantize_checkpoint(src, out, layout="compressed-tensors", progress=False, tp=())
    t = _all_tensors(out)
    k = "model.layers.0.mlp.down_proj.weight"
    assert t[k].dtype == torch.float8_e4m3fn and t[k + "_scale"].dtype == torch.float32
    assert not any(key.endswith("_scale_inv") for key in t)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "float-quantized"
    assert qc["quantization_status"] == "compressed"
    g = qc["config_groups"]["group_0"]
    assert g["targets"] == ["Linear"]
    assert g["weights"] == {"num_bits": 8, "type": "float", "strategy": "block",
                            "block_structure": [128, 128], "symmetric": True, "dynamic": False}
    assert g["input_activations"] == {"num_bits": 8, "type": "float", "strategy": "group",
                                      "group_size": 128, "symmetric": True, "dynamic": True}
    assert qc["ignore"] == ["lm_head", "model.layers.1.mlp.gate"]
    back = tmp_path / "ct_deq"
    dequantize_checkpoint(out, back, dtype="fp32", progress=False)
    assert "quantization_config" not in json.loads((back / "config.json").read_text())
    w = _all_tensors(src)[k].float()
    assert _max_rel_bound_violation(w, _all_tensors(back)[k], t[k + "_scale"]) <= 0


def test_ue8m0_scales(src, tmp_path):
    out = tmp_path / "ue"
    quantize_checkpoint(src, out, scale_fmt="ue8m0", progress=False, tp=())
    t = _all_tensors(out)
    s = t["model.layers.0.mlp.up_proj.weight_scale_inv"]
    m, _ = torch.frexp(s)
    assert bool((m == 0.5).all())
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["scale_fmt"] == "ue8m0"
    codes, s_ref = _ref_quantize(_all_tensors(src)["model.layers.0.mlp.up_proj.weight"],
                                 scale_fmt="ue8m0")
    assert torch.equal(s, s_ref)
    assert torch.equal(t["model.layers.0.mlp.up_proj.weight"].double(), codes)


def test_ignore_patterns_and_router_vs_gate_proj(src, tmp_path):
    out = tmp_path / "ign"
    quantize_checkpoint(src, out, ignore=["*.down_proj", "re:model\\.layers\\.1\\.self_attn\\.q"],
                        progress=False, tp=())
    t = _all_tensors(out)
    assert t["model.layers.0.mlp.down_proj.weight"].dtype == torch.bfloat16
    assert t["model.layers.1.mlp.experts.0.down_proj.weight"].dtype == torch.bfloat16
    assert t["model.layers.1.self_attn.q_proj.weight"].dtype == torch.bfloat16
    assert t["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float8_e4m3fn
    assert t["model.layers.0.mlp.gate_proj.weight"].dtype == torch.float8_e4m3fn  # a Linear
    assert t["model.layers.1.mlp.gate.weight"].dtype == torch.bfloat16  # the router
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert "model.layers.0.mlp.down_proj" in qc["modules_to_not_convert"]
    assert "model.layers.1.self_attn.q_proj" in qc["modules_to_not_convert"]


def test_single_file_checkpoint_and_lm_head(tmp_path):
    tensors = llama_tensors(seed=3)
    tensors["lm_head.weight"] = torch.randn(320, 576).to(torch.bfloat16)
    src = write_checkpoint(tmp_path / "in", tensors, n_shards=1,
                           config={"tie_word_embeddings": False})
    out = tmp_path / "out"
    assert main(["quantize", str(src), str(out), "--quiet"]) == 0
    assert (out / "model.safetensors").is_file()
    assert not (out / "model.safetensors.index.json").exists()
    t = _all_tensors(out)
    assert torch.equal(t["lm_head.weight"], tensors["lm_head.weight"])


def test_workers_give_identical_output(src, quantized, tmp_path):
    out = tmp_path / "par"
    quantize_checkpoint(src, out, workers=2, progress=False, tp=())
    assert _tree_bytes(out) == _tree_bytes(quantized)


# ----------------------------------------------------------------------------- dequantize inputs


def test_dequantize_scale_in_another_shard(tmp_path):
    g = torch.Generator().manual_seed(7)
    w = torch.randn(576, 1536, generator=g) * 0.02
    q, s = finefp8.quantize_blockwise(w)
    root = tmp_path / "fp8"
    root.mkdir()
    save_file({"model.layers.0.mlp.down_proj.weight": q, "model.norm.weight": torch.ones(8)},
              str(root / "a.safetensors"), metadata={"format": "pt"})
    save_file({"model.layers.0.mlp.down_proj.weight_scale_inv": s},
              str(root / "b.safetensors"), metadata={"format": "pt"})
    wm = {"model.layers.0.mlp.down_proj.weight": "a.safetensors",
          "model.norm.weight": "a.safetensors",
          "model.layers.0.mlp.down_proj.weight_scale_inv": "b.safetensors"}
    index = {"metadata": {}, "weight_map": wm}
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    (root / "config.json").write_text(json.dumps({"quantization_config": {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
        "weight_block_size": [128, 128]}}))
    with CheckpointReader(root) as r:
        assert r.shard_of("model.layers.0.mlp.down_proj.weight_scale_inv") == "b.safetensors"
        ref = dequantized_weight(r, "model.layers.0.mlp.down_proj.weight", torch.float32)
    # float64 reference: each code times its block's scale (exact in float64), rounded once
    expanded = s.double().repeat_interleave(128, 0)[:576].repeat_interleave(128, 1)[:, :1536]
    assert torch.equal(ref, (q.double() * expanded).float())
    out = tmp_path / "bf16"
    assert main(["dequantize", str(root), str(out), "--quiet"]) == 0
    t = _all_tensors(out)
    assert set(t) == {"model.layers.0.mlp.down_proj.weight", "model.norm.weight"}
    assert torch.equal(t["model.layers.0.mlp.down_proj.weight"], ref.to(torch.bfloat16))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(t)
    assert not (out / "b.safetensors").exists()  # it held only a scale
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in t.values())


# ----------------------------------------------------------------------------- crash safety

_SLOW_RUN = """
import sys, time
import finefp8.checkpoint.writer as w
orig = w.ShardWriter.write
def slow(self, key, data):
    if self.path.name.startswith("model-00002"):
        time.sleep(0.3)
    return orig(self, key, data)
w.ShardWriter.write = slow
from finefp8.checkpoint.convert import quantize_checkpoint
quantize_checkpoint(sys.argv[1], sys.argv[2], progress=False, tp=())
"""


def test_sigkill_midway_then_resume_is_byte_identical(src, quantized, tmp_path):
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_RUN, str(src), str(out)])
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            if list(out.glob("model-00002*.partial")):
                break
            assert proc.poll() is None, "conversion finished before it could be killed"
            time.sleep(0.02)
        else:
            pytest.fail("the conversion never reached shard 2")
        time.sleep(0.5)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["status"] == "in-progress"
    assert list(manifest["done"]) == ["model-00001-of-00003.safetensors"]
    assert not (out / "config.json").exists()
    assert not (out / "model.safetensors.index.json").exists()
    res = quantize_checkpoint(src, out, progress=False, tp=())
    assert res.shards_resumed == 1
    assert _tree_bytes(out) == _tree_bytes(quantized)
    again = quantize_checkpoint(src, out, progress=False, tp=())
    assert again.already_complete


def test_enospc_leaves_nothing_marked_complete(src, quantized, tmp_path, monkeypatch):
    out = tmp_path / "full"

    class FullFile:
        """The shard-2 file behaves like a full disk: every write raises ENOSPC."""

        def __init__(self, f):
            self.f = f

        def write(self, b):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

    orig_enter = ShardWriter.__enter__

    def enter(self):
        r = orig_enter(self)
        if self.path.name.startswith("model-00002"):
            self._f = FullFile(self._f)
        return r

    monkeypatch.setattr(ShardWriter, "__enter__", enter)
    with pytest.raises(WriteError, match="no space left on device while writing model-00002"):
        quantize_checkpoint(src, out, progress=False, tp=())
    assert not list(out.glob("*.partial"))
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["status"] == "in-progress"
    assert "model-00002-of-00003.safetensors" not in manifest["done"]
    assert not (out / "model-00002-of-00003.safetensors").exists()
    assert not (out / "config.json").exists()
    monkeypatch.setattr(ShardWriter, "__enter__", orig_enter)
    quantize_checkpoint(src, out, progress=False, tp=())
    assert _tree_bytes(out) == _tree_bytes(quantized)


# ----------------------------------------------------------------------------- refusals


def test_refuse_missing_input(tmp_path, capsys):
    assert main(["quantize", str(tmp_path / "nope"), str(tmp_path / "out")]) == 1
    assert "no such file or directory" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_refuse_truncated_shard(src, tmp_path, capsys):
    bad = write_checkpoint(tmp_path / "bad", llama_tensors())
    shard = bad / "model-00002-of-00003.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    assert main(["quantize", str(bad), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "model-00002-of-00003.safetensors" in err and "truncated" in err
    assert not (tmp_path / "out").exists()
    shard.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError, match="model-00002-of-00003.safetensors: corrupt"):
        quantize_checkpoint(bad, tmp_path / "out", progress=False, tp=())


def test_refuse_already_fp8(quantized, tmp_path, capsys):
    assert main(["quantize", str(quantized), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "already quantized" in err and "finefp8 dequantize" in err


def test_refuse_dequantize_unquantized(src, tmp_path):
    with pytest.raises(ConversionError, match="not an FP8 checkpoint"):
        dequantize_checkpoint(src, tmp_path / "out", progress=False)


def test_refuse_non_empty_out(src, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    assert main(["quantize", str(src), str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "not empty" in err and "--overwrite" in err
    assert (out / "precious.txt").read_text() == "keep me"
    assert main(["quantize", str(src), str(out), "--quiet", "--overwrite"]) == 1
    err = capsys.readouterr().err
    assert "removes only files a finefp8 conversion wrote" in err and "precious.txt" in err
    assert (out / "precious.txt").read_text() == "keep me"


def test_refuse_resume_with_other_options(src, tmp_path):
    out = tmp_path / "out"
    quantize_checkpoint(src, out, progress=False, tp=())
    with pytest.raises(ConversionError, match="other options"):
        quantize_checkpoint(src, out, scale_fmt="ue8m0", progress=False, tp=())
    res = quantize_checkpoint(src, out, scale_fmt="ue8m0", overwrite=True, progress=False, tp=())
    assert not res.already_complete
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["scale_fmt"] == "ue8m0"


def test_refuse_out_inside_in(src):
    with pytest.raises(ConversionError, match="outside IN"):
        quantize_checkpoint(src, src / "sub", progress=False, tp=())


def test_refuse_nan_names_tensor_and_block(tmp_path, capsys):
    tensors = llama_tensors(seed=1)
    k = "model.layers.0.mlp.down_proj.weight"
    tensors[k][300, 1000] = float("nan")
    src = write_checkpoint(tmp_path / "nan", tensors)
    out = tmp_path / "out"
    assert main(["quantize", str(src), str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert k in err and "block (2, 7)" in err and "row 300, column 1000" in err
    assert not out.exists()  # cleaned


def test_refuse_insufficient_disk(src, tmp_path, monkeypatch, capsys):
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(conv.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    out = tmp_path / "out"
    assert main(["quantize", str(src), str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "not enough free disk" in err and "GB is free" in err
    assert not out.exists()  # created by this run, removed again


def test_refuse_ct_with_ue8m0(src, tmp_path):
    with pytest.raises(ConversionError, match="ue8m0"):
        quantize_checkpoint(src, tmp_path / "o", layout="compressed-tensors", scale_fmt="ue8m0",
                            progress=False, tp=())


def test_refuse_dequantize_non_fp8_compressed_tensors(src, tmp_path):
    out = tmp_path / "ct"
    quantize_checkpoint(src, out, layout="compressed-tensors", progress=False, tp=())
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"]["format"] = "pack-quantized"
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match="pack-quantized"):
        dequantize_checkpoint(out, tmp_path / "deq", progress=False)


def test_other_weight_formats_are_not_copied(tmp_path):
    """Copies of the weights in other serializations (PyTorch pickles, GGUF, ONNX, a Meta
    ``original/consolidated.pth``) stay behind; other files, in folders too, are copied."""
    src = write_checkpoint(tmp_path / "in", llama_tensors(seed=9), n_shards=1)
    others = ["pytorch_model.bin", "model.Q4_K_M.gguf", "onnx/model.onnx",
              "original/consolidated.00.pth", "flax_model.msgpack", "tf_model.h5"]
    for rel in others:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(b"the same weights again")
    (src / "sub").mkdir()
    (src / "sub" / "notes.txt").write_text("kept")
    quantize_checkpoint(src, tmp_path / "out", progress=False, tp=())
    for rel in others:
        assert not (tmp_path / "out" / rel).exists(), rel
    assert (tmp_path / "out" / "sub" / "notes.txt").read_text() == "kept"
    assert (tmp_path / "out" / "tokenizer.json").exists()


def test_layout_keyword_and_deprecated_aliases(src, tmp_path, capsys):
    """``layout=`` / ``--layout`` name the on-disk layout; ``fmt=`` / ``--format`` still work
    (deprecated) and give the same bytes."""
    from finefp8.checkpoint.layout import FORMATS, LAYOUTS

    assert LAYOUTS == ("fp8", "compressed-tensors") and FORMATS == LAYOUTS
    new, old = tmp_path / "new", tmp_path / "old"
    quantize_checkpoint(src, new, layout="compressed-tensors", progress=False, tp=())
    with pytest.warns(DeprecationWarning, match="layout"):
        quantize_checkpoint(src, old, fmt="compressed-tensors", progress=False, tp=())
    assert _tree_bytes(new) == _tree_bytes(old)
    cli = tmp_path / "cli"
    assert main(["quantize", str(src), str(cli), "--format", "compressed-tensors", "--quiet",
                 "--no-serving-check"]) == 0
    assert "--format is deprecated" in capsys.readouterr().err
    t = _all_tensors(cli)
    assert "model.layers.0.mlp.down_proj.weight_scale" in t
    with pytest.raises(ConversionError, match="unknown --layout"):
        quantize_checkpoint(src, tmp_path / "bad", layout="gguf", progress=False, tp=())


def test_library_default_serves_at_tp1(src, tmp_path):
    """``quantize_checkpoint`` defaults to TP 1 like the command: the fixture's q/k/v groups
    (q has 576 rows, not a multiple of 128, so an engine that fuses q/k/v would misplace the
    k and v scales) stay in bf16, byte for byte, and are declared; nothing else is kept."""
    quantize_checkpoint(src, tmp_path / "out", progress=False)
    out = _all_tensors(tmp_path / "out")
    inp = _all_tensors(src)
    qkv = {f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qkv"}
    for key, t in inp.items():
        module = key.rsplit(".", 1)[0]
        if module in qkv:
            assert out[key].dtype == torch.bfloat16 and torch.equal(out[key], t), key
            assert f"{module}.weight_scale_inv" not in out
        elif key.endswith("o_proj.weight") or key.endswith("up_proj.weight"):
            assert out[key].dtype == torch.float8_e4m3fn, key
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    kept = set(config["quantization_config"]["modules_to_not_convert"])
    assert kept - qkv == {"lm_head", "model.layers.1.mlp.gate"}  # head and router, as always
