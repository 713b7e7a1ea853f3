"""Interop with the libraries that read and write block-FP8 checkpoints.

(1) transformers loads our ``--format fp8`` output on CPU (it dequantizes to bf16 itself) and its
    logits equal our own dequantized checkpoint's; (2) compressed-tensors' own decompressor
    reads our ``--format compressed-tensors`` output and gets our weights; (3) we dequantize an
    FP8_BLOCK checkpoint that compressed-tensors itself wrote.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from finefp8.checkpoint import CheckpointReader, dequantized_weight
from finefp8.checkpoint.convert import dequantize_checkpoint, quantize_checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from ckpt_utils import llama_tensors, write_checkpoint  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _tiny_llama(hidden: int, inter: int, heads: int, kv: int, vocab: int = 512, seed: int = 0):
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=inter,
                                   num_attention_heads=heads, num_key_value_heads=kv,
                                   num_hidden_layers=2, vocab_size=vocab,
                                   tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    with torch.no_grad():  # weights of a realistic spread (the init is very small)
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.05)
    return model


def test_transformers_loads_our_fp8_output(tmp_path):
    """Dims are multiples of 128: transformers 5.24's CPU dequantizer rejects other shapes."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed")
    model = _tiny_llama(256, 512, heads=2, kv=1)
    model.save_pretrained(tmp_path / "bf16")
    quantize_checkpoint(tmp_path / "bf16", tmp_path / "fp8", progress=False, tp=())
    dequantize_checkpoint(tmp_path / "fp8", tmp_path / "deq", progress=False)
    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "fp8")
    ours = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "deq", dtype=torch.bfloat16)
    ref = model.eval()
    w_theirs = theirs.model.layers[1].mlp.down_proj.weight
    assert w_theirs.dtype == torch.bfloat16
    assert torch.equal(w_theirs, ours.model.layers[1].mlp.down_proj.weight)
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b, r = (m(ids).logits.float() for m in (theirs, ours, ref))
    assert torch.equal(a, b)
    # and the quantized model is close to, but not the same as, the bf16 original
    rel = float((a - r).norm() / r.norm())
    assert 0 < rel < 0.1


def test_compressed_tensors_decompresses_our_output(tmp_path):
    """Odd shapes (576 x 1536, 192 x 576) included: the decompressor handles them."""
    ct = pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed")
    from compressed_tensors.compressors.naive_quantized.base import FloatQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig

    src = write_checkpoint(tmp_path / "in", llama_tensors(seed=5))
    quantize_checkpoint(src, tmp_path / "ct", layout="compressed-tensors", progress=False, tp=())
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())
    qc = QuantizationConfig.model_validate(cfg["quantization_config"])
    assert qc.format == "float-quantized" and str(qc.quantization_status.value) == "compressed"
    scheme = qc.config_groups["group_0"]
    assert scheme.weights.strategy == "block" and list(scheme.weights.block_structure) == [128, 128]
    with CheckpointReader(tmp_path / "ct") as r:
        keys = r.quantized_weights()
        assert len(keys) == 17
        for k in keys:
            state = {"weight": r.get(k), "weight_scale": r.get(k + "_scale")}
            theirs = FloatQuantizationCompressor.decompress(state, scheme)["weight"]
            assert torch.equal(theirs, dequantized_weight(r, k, theirs.dtype)), k
    assert ct is not None


def _ct_write_fp8_block(model, path: Path) -> None:
    """Write ``model`` as a compressed-tensors FP8_BLOCK checkpoint with compressed-tensors'
    own machinery; the block scales come from calculate_qparams on each block's min/max (the
    job of llm-compressor's observer), stored in the model's dtype (bf16) as llm-compressor does."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.quant_scheme import FP8_BLOCK
    from compressed_tensors.quantization.utils.helpers import (
        calculate_qparams,
        maybe_pad_tensor_for_block_quant,
    )

    qc = QuantizationConfig(config_groups={"group_0": QuantizationScheme(targets=["Linear"],
                                                                         **FP8_BLOCK)},
                            ignore=["lm_head"])
    apply_quantization_config(model, qc)
    for _, mod in model.named_modules():
        if hasattr(mod, "weight_scale"):
            w = maybe_pad_tensor_for_block_quant(mod.weight.data, (128, 128))
            blocks = w.view(w.shape[0] // 128, 128, w.shape[1] // 128, 128)
            scale, _ = calculate_qparams(blocks.amin(dim=(1, 3)), blocks.amax(dim=(1, 3)),
                                         mod.quantization_scheme.weights)
            mod.weight_scale.data.copy_(scale)
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(path)
    compressor.update_config(path)


def test_we_dequantize_a_compressed_tensors_checkpoint(tmp_path):
    pytest.importorskip("compressed_tensors", reason="compressed-tensors is not installed")
    from compressed_tensors.compressors.naive_quantized.base import FloatQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig

    model = _tiny_llama(576, 1536, heads=9, kv=3, vocab=256)
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    _ct_write_fp8_block(model, tmp_path / "ct")
    cfg = json.loads((tmp_path / "ct" / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "compressed-tensors"
    scheme = QuantizationConfig.model_validate(cfg["quantization_config"]).config_groups["group_0"]
    out = tmp_path / "deq"
    dequantize_checkpoint(tmp_path / "ct", out, dtype="fp32", progress=False)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    with CheckpointReader(tmp_path / "ct") as ct_r, CheckpointReader(out) as r:
        keys = ct_r.quantized_weights()
        assert keys and ct_r.st_dtype(keys[0] + "_scale") == "BF16"
        for k in keys:
            state = {"weight": ct_r.get(k), "weight_scale": ct_r.get(k + "_scale")}
            theirs = FloatQuantizationCompressor.decompress(state, scheme)["weight"].float()
            mine = r.get(k)
            assert mine.dtype == torch.float32 and not any(x.endswith("_scale") for x in r.keys())
            assert torch.allclose(mine, theirs, rtol=2 ** -7, atol=0), k
            w = original[k].float()
            assert float((mine - w).norm() / w.norm()) < 0.05, k
