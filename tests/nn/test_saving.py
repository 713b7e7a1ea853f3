"""finefp8.nn.save_fp8: the "fp8" layout of `finefp8 quantize`, load round trip, safety."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open

import finefp8
from finefp8.calibration import quantize_blockwise_mse
from finefp8.checkpoint.writer import PARTIAL_SUFFIX
from finefp8.cli import main
from finefp8.nn import FP8Config, fp8_modules, quantize_model, save_fp8
from finefp8.nn import saving as saving_module


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def read_tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            out.update({k: st.get_tensor(k) for k in st.keys()})
    return out


def mse_quantizer(w, block_size, scale_fmt, *, name=None):
    """Per-block scale search: scales that are not amax/448, in the same layout."""
    return quantize_blockwise_mse(w, block_size, name=name)


@pytest.fixture(scope="module")
def fp8_model(tiny_model):
    """The tiny tied Llama with its Linear layers in FP8, down_proj of layer 1 kept in float."""
    return quantize_model(copy.deepcopy(tiny_model), ignore=["model.layers.1.mlp.down_proj"])


@pytest.mark.parametrize("quantizer", [None, mse_quantizer], ids=["amax448", "mse-scales"])
def test_round_trip_identical_logits_and_codes(tiny_model, tokens, tmp_path, quantizer):
    model = quantize_model(copy.deepcopy(tiny_model), ignore=["model.layers.1.mlp.down_proj"],
                           weight_quantizer=quantizer)
    path = save_fp8(model, tmp_path / "ckpt", tp=())  # every FP8 layer as it is
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "generation_config.json",
                                                      "model.safetensors"]
    stored = read_tensors(path)
    layers = fp8_modules(model)
    assert len(layers) == 13
    for name, m in layers.items():
        assert stored[f"{name}.weight"].dtype == torch.float8_e4m3fn
        assert torch.equal(stored[f"{name}.weight"].view(torch.uint8), m.weight.view(torch.uint8))
        assert stored[f"{name}.weight_scale_inv"].dtype == torch.float32
        assert torch.equal(stored[f"{name}.weight_scale_inv"], m.weight_scale_inv)
    kept = "model.layers.1.mlp.down_proj.weight"
    assert stored[kept].dtype == torch.float32 and kept + "_scale_inv" not in stored
    assert "lm_head.weight" not in stored  # tied: stored once, as model.embed_tokens.weight
    config = json.loads((path / "config.json").read_text())
    assert config["quantization_config"] == {
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
        "modules_to_not_convert": ["lm_head", "model.layers.1.mlp.down_proj"]}
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"]

    loaded = finefp8.load(path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert set(fp8_modules(loaded)) == set(layers)
    assert torch.equal(logits(loaded, tokens), logits(model, tokens))
    # sound; exit 3 only because 192/320 are not multiples of 128 (vLLM's tensor-parallel rules)
    assert main(["inspect", str(path)]) == 3


def test_same_layout_and_bytes_as_quantize_command(tokens, tmp_path, helpers):
    """The in-memory DeepSeek quantization saved == ``finefp8 quantize --format fp8`` of the
    same float model: same names, dtypes, shapes, codes, scales and quantization_config."""
    from finefp8.checkpoint.convert import quantize_checkpoint

    # multiples of 128 (head_dim 128), so vLLM's rules accept it and inspect exits 0
    model = helpers.tiny_llama(tie=False, seed=3, hidden_size=256, intermediate_size=512,
                               num_attention_heads=2)
    model.save_pretrained(tmp_path / "float")
    quantize_checkpoint(tmp_path / "float", tmp_path / "converted", progress=False, tp=())
    save_fp8(quantize_model(model), tmp_path / "saved")
    converted, saved = read_tensors(tmp_path / "converted"), read_tensors(tmp_path / "saved")
    assert sorted(converted) == sorted(saved)
    for key, t in converted.items():
        assert (t.dtype, t.shape) == (saved[key].dtype, saved[key].shape), key
        assert torch.equal(t.view(torch.uint8), saved[key].view(torch.uint8)), key
    qc = [json.loads((tmp_path / d / "config.json").read_text())["quantization_config"]
          for d in ("converted", "saved")]
    assert qc[0] == qc[1]
    assert torch.equal(logits(finefp8.load(tmp_path / "converted"), tokens),
                       logits(finefp8.load(tmp_path / "saved"), tokens))
    assert main(["inspect", str(tmp_path / "saved"), "--tp", "1,2"]) == 0


def test_default_keeps_what_vllm_would_serve_wrong(tiny_model, tokens, tmp_path):
    """By default (TP 1) the layers vLLM would mis-serve in FP8 are written in high precision
    as their dequantized weights: the tiny model's q/k/v (q has 192 rows, not a multiple of 128:
    the engine would misplace k's and v's scales) and gate/up (intermediate not a multiple of
    128: refused); o_proj and down_proj stay FP8. The model in memory is unchanged."""
    model = quantize_model(copy.deepcopy(tiny_model))
    before = {n: (m.weight.clone(), m.weight_scale_inv.clone()) for n, m in fp8_modules(model).items()}
    path = save_fp8(model, tmp_path / "ckpt")
    assert {n: (m.weight, m.weight_scale_inv) for n, m in fp8_modules(model).items()}.keys() \
        == before.keys()
    stored = read_tensors(path)
    kept_parts = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
    kept = sorted(n for n in before if n.rsplit(".", 1)[-1] in kept_parts)
    assert len(kept) == 10
    for name, (q, s) in before.items():
        w = stored[f"{name}.weight"]
        if name in kept:
            # independent reference: every code times its block's scale, in float64
            ref = q.double() * s.double().repeat_interleave(128, 0)[: q.shape[0]] \
                .repeat_interleave(128, 1)[:, : q.shape[1]]
            assert w.dtype == torch.float32 and f"{name}.weight_scale_inv" not in stored
            assert torch.allclose(w.double(), ref, rtol=2**-23, atol=0)
        else:
            assert w.dtype == torch.float8_e4m3fn
            assert torch.equal(w.view(torch.uint8), q.view(torch.uint8))
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    assert sorted(qc["modules_to_not_convert"]) == sorted(["lm_head", *kept])
    reloaded = finefp8.load(path)
    assert sorted(set(before) - set(fp8_modules(reloaded))) == kept
    assert main(["inspect", str(path), "--tp", "1"]) in (0, 1)  # nothing refused or mis-served


def test_ue8m0_and_tokenizer(tiny_model, tokens, tmp_path, helpers):
    from transformers import AutoTokenizer

    helpers.write_tokenizer(tmp_path / "tok")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "tok")
    model = quantize_model(copy.deepcopy(tiny_model), scale_fmt="ue8m0")
    path = save_fp8(model, tmp_path / "ckpt", tokenizer=tokenizer, tp=())
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    assert qc["scale_fmt"] == "ue8m0"
    assert (path / "tokenizer.json").is_file()
    assert AutoTokenizer.from_pretrained(path)("the quick fox").input_ids == \
        tokenizer("the quick fox").input_ids
    loaded = finefp8.load(path)
    assert loaded.fp8_config.scale_fmt == "ue8m0"
    assert torch.equal(logits(loaded, tokens), logits(model, tokens))


def test_sharded(fp8_model, tokens, tmp_path, monkeypatch):
    monkeypatch.setattr(saving_module, "MAX_SHARD_BYTES", 200_000)
    path = save_fp8(fp8_model, tmp_path / "ckpt", tp=())
    shards = sorted(p.name for p in path.glob("*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((path / "model.safetensors.index.json").read_text())
    stored = read_tensors(path)
    assert set(index["weight_map"]) == set(stored)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size()
                                                  for t in stored.values())
    for key, shard in index["weight_map"].items():
        if key.endswith(".weight_scale_inv"):  # a scale sits in its weight's shard
            assert index["weight_map"][key[: -len("_scale_inv")]] == shard
    assert torch.equal(logits(finefp8.load(path), tokens), logits(fp8_model, tokens))


def test_refusals_name_the_path(tiny_model, fp8_model, tmp_path):
    dest = tmp_path / "out"
    for config, what in ((FP8Config.per_tensor(), "one scale per tensor"),
                         (FP8Config(mode="act_only"), "act_only"),
                         (FP8Config(mode="weight_only", weight_block=(64, 128)), "64x128 blocks"),
                         (FP8Config(act_granularity="token"), "1x128 groups")):
        model = quantize_model(copy.deepcopy(tiny_model), config=config)
        with pytest.raises(ValueError, match=what) as e:
            save_fp8(model, dest)
        assert str(dest) in str(e.value)
    with pytest.raises(ValueError, match="no FP8Linear layer"):
        save_fp8(tiny_model, dest)
    with pytest.raises(TypeError, match="transformers model"):
        save_fp8(torch.nn.Sequential(torch.nn.Linear(4, 4)), dest)
    with pytest.raises(ValueError, match="power-of-two"):
        save_fp8(fp8_model, dest, scale_fmt="ue8m0")
    assert not dest.exists()
    dest.mkdir()
    (dest / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        save_fp8(fp8_model, dest)
    assert [p.name for p in dest.iterdir()] == ["notes.txt"]


def test_interrupted_save_leaves_nothing_that_looks_complete(fp8_model, tokens, tmp_path):
    class FailingTokenizer:
        def save_pretrained(self, folder):
            raise RuntimeError("disk unplugged")

    dest = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk unplugged"):
        save_fp8(fp8_model, dest, tokenizer=FailingTokenizer())
    assert list(tmp_path.iterdir()) == []
    # a stale partial folder (a killed process) is replaced by the next save
    stale = tmp_path / ("out" + PARTIAL_SUFFIX)
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"junk")
    dest.mkdir()  # an empty destination folder is accepted
    save_fp8(fp8_model, dest, tp=())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert torch.equal(logits(finefp8.load(dest), tokens), logits(fp8_model, tokens))
