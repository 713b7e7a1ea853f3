"""finefp8.load: both on-disk layouts, odd shapes, sharding, tying, errors; and generation."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import finefp8
from finefp8.checkpoint import CheckpointError
from finefp8.cli import main
from finefp8.nn import FP8Config, FP8Linear, fp8_modules, resident_bytes


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens).logits


def meta_tensors(model):
    return [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]


@pytest.fixture(scope="module")
def fp8_ckpt(tmp_path_factory, tiny_model, helpers):
    """fp8 layout, one shard, tied embeddings, plus a tokenizer."""
    path = tmp_path_factory.mktemp("fp8")
    written = helpers.write_fp8_checkpoint(tiny_model, path)
    helpers.write_tokenizer(path)
    return path, written


def test_fp8_layout_keeps_stored_codes_and_matches_quantize_model(fp8_ckpt, tiny_model, tokens):
    path, written = fp8_ckpt
    model = finefp8.load(path)
    assert not meta_tensors(model)
    assert not hasattr(model.config, "quantization_config")
    layers = fp8_modules(model)
    assert len(layers) == len(written) == 14
    for key, (q, s) in written.items():
        m = layers[key[: -len(".weight")]]
        assert torch.equal(m.weight.view(torch.uint8), q.view(torch.uint8))
        assert torch.equal(m.weight_scale_inv, s)
        assert m.weight.shape[1] in (192, 320)  # not multiples of 128
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert type(model.lm_head) is torch.nn.Linear
    # The same codes and the same math as quantizing in memory: identical logits.
    ref = finefp8.quantize_model(copy.deepcopy(tiny_model))
    assert torch.equal(logits(model, tokens), logits(ref, tokens))


def test_weight_only_mode(fp8_ckpt, tiny_model, tokens, helpers):
    model = finefp8.load(fp8_ckpt[0], mode="weight_only")
    assert all(m.config.mode == "weight_only" for m in fp8_modules(model).values())
    assert helpers.mean_kl(logits(tiny_model, tokens), logits(model, tokens)) < 0.01


def test_resident_bytes_one_byte_a_parameter(fp8_ckpt):
    model = finefp8.load(fp8_ckpt[0])
    layers = fp8_modules(model).values()
    params = sum(m.weight.numel() for m in layers)
    scales = sum(m.weight_scale_inv.numel() for m in layers)
    assert sum(resident_bytes(m) for m in layers) == params + 4 * scales
    others = resident_bytes(model) - params - 4 * scales
    floats = sum(p.numel() for n, p in model.named_parameters())  # FP8 codes are buffers
    assert others >= 4 * floats  # float32 embeddings, norms (+ rotary buffers)


def test_sharded_untied_scale_in_other_shard(tmp_path, tokens, helpers):
    model = helpers.tiny_llama(tie=False, seed=3)
    helpers.write_fp8_checkpoint(model, tmp_path, shards=2)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    k = "model.layers.0.mlp.down_proj"
    assert index[f"{k}.weight"] != index[f"{k}.weight_scale_inv"]
    loaded = finefp8.load(tmp_path)
    assert loaded.lm_head.weight is not loaded.model.embed_tokens.weight
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    assert torch.equal(logits(loaded, tokens), logits(finefp8.quantize_model(model), tokens))


def test_compressed_tensors_layout_bf16_scales(tmp_path, tiny_model, tokens, helpers):
    written = helpers.write_fp8_checkpoint(tiny_model, tmp_path, fmt="compressed-tensors",
                                           scale_dtype=torch.bfloat16)
    model = finefp8.load(tmp_path)
    layers = fp8_modules(model)
    for key, (q, s) in written.items():
        m = layers[key[: -len(".weight")]]
        assert torch.equal(m.weight.view(torch.uint8), q.view(torch.uint8))
        assert m.weight_scale_inv.dtype == torch.float32
        assert torch.equal(m.weight_scale_inv, s.float())
    assert helpers.mean_kl(logits(tiny_model, tokens), logits(model, tokens)) < 0.01


def test_ue8m0_checkpoint_quantizes_activations_with_pow2_scales(tmp_path, tiny_model, helpers):
    helpers.write_fp8_checkpoint(tiny_model, tmp_path, scale_fmt="ue8m0")
    model = finefp8.load(tmp_path)
    assert model.fp8_config == FP8Config(scale_fmt="ue8m0")


def test_bf16_dtype(fp8_ckpt, tiny_model, tokens, helpers):
    model = finefp8.load(fp8_ckpt[0], dtype="bfloat16")
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert all(m.weight.dtype == torch.float8_e4m3fn for m in fp8_modules(model).values())
    out = logits(model, tokens)
    assert out.dtype == torch.bfloat16
    assert helpers.mean_kl(logits(tiny_model, tokens), out) < 0.02


def test_explicit_config_overrides(fp8_ckpt):
    model = finefp8.load(fp8_ckpt[0], config=FP8Config(act_granularity="tensor"))
    assert all(m.config.act_granularity == "tensor" for m in fp8_modules(model).values())


def test_refuses_plain_checkpoint(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="not an FP8 checkpoint"):
        finefp8.load(tmp_path)


def test_refuses_missing_scale(tmp_path, tiny_model, helpers):
    from safetensors.torch import load_file, save_file

    helpers.write_fp8_checkpoint(tiny_model, tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    del sd["model.layers.1.mlp.up_proj.weight_scale_inv"]
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="up_proj.weight.*no scale"):
        finefp8.load(tmp_path)


def test_refuses_config_that_does_not_match_weights(tmp_path, tiny_model, helpers):
    helpers.write_fp8_checkpoint(tiny_model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 384
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="_proj.weight.*does not match"):
        finefp8.load(tmp_path)


def test_refuses_float_tensor_of_wrong_shape(tmp_path, tiny_model, helpers):
    helpers.write_fp8_checkpoint(tiny_model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["vocab_size"] = 310
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="embed_tokens"):
        finefp8.load(tmp_path)


def test_refuses_missing_tensor(tmp_path, tiny_model, helpers):
    from safetensors.torch import load_file, save_file

    helpers.write_fp8_checkpoint(tiny_model, tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    del sd["model.norm.weight"]
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="lacks 1 tensors.*model.norm.weight"):
        finefp8.load(tmp_path)


def test_act_only_is_refused(fp8_ckpt):
    with pytest.raises(ValueError, match="act_only"):
        finefp8.load(fp8_ckpt[0], mode="act_only")


# ----------------------------------------------------------------------------- generation


def test_generate_greedy_matches_in_memory_model(fp8_ckpt, tiny_model):
    from transformers import AutoTokenizer

    path = fp8_ckpt[0]
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok("The quick brown fox", return_tensors="pt")
    loaded = finefp8.load(path)
    ref = finefp8.quantize_model(copy.deepcopy(tiny_model))
    with torch.inference_mode():
        a = loaded.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        b = ref.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert a.shape == (1, ids["input_ids"].shape[1] + 6)
    assert torch.equal(a, b)


def test_generate_cli(fp8_ckpt, capsys):
    rc = main(["generate", str(fp8_ckpt[0]), "--prompt", "Python is", "--max-new-tokens", "5"])
    out, err = capsys.readouterr()
    assert rc == 0
    assert out.startswith("Python is") and len(out.strip()) > len("Python is")
    assert "5 tokens" in err and "greedy" in err


def test_generate_cli_refuses_plain_checkpoint(tmp_path, tiny_model, capsys):
    tiny_model.save_pretrained(tmp_path)
    rc = main(["generate", str(tmp_path), "--prompt", "hi"])
    assert rc == 1 and "not an FP8 checkpoint" in capsys.readouterr().err


def test_loaded_layers_are_fp8linear(fp8_ckpt):
    model = finefp8.load(fp8_ckpt[0])
    assert isinstance(model.model.layers[0].mlp.down_proj, FP8Linear)
    assert model.model.layers[0].mlp.down_proj.name == "model.layers.0.mlp.down_proj"


@pytest.mark.parametrize("fmt", ["fp8", "compressed-tensors"])
def test_loads_what_finefp8_quantize_writes(tmp_path, tiny_model, tokens, fmt):
    from finefp8.checkpoint.convert import quantize_checkpoint

    src, dst = tmp_path / "float", tmp_path / fmt
    tiny_model.save_pretrained(src)
    quantize_checkpoint(src, dst, layout=fmt, progress=False, tp=())
    model = finefp8.load(dst)
    assert len(fp8_modules(model)) == 14
    # The converter and quantize_model apply the same rule and the same math.
    ref = finefp8.quantize_model(copy.deepcopy(tiny_model))
    assert torch.equal(logits(model, tokens), logits(ref, tokens))
