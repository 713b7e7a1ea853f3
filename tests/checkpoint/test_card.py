"""The README.md model card of ``finefp8 quantize`` (``finefp8.checkpoint.card``)."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import yaml

from finefp8.checkpoint import card as C
from finefp8.cli import main

from .ckpt_utils import llama_tensors, write_checkpoint

SOURCE_CARD = ("---\nlicense: mit\nlanguage:\n- en\n- fr\ntags:\n- llama\n- fp8\n"
               "base_model: someone/original\n---\n\n# The source model\n\nIts own words, "
               "with `code` and a table:\n\n| a | b |\n|---|---|\n| 1 | 2 |\n")


@pytest.fixture()
def src(tmp_path) -> Path:
    root = write_checkpoint(tmp_path / "src", llama_tensors(), n_shards=2)
    (root / "README.md").write_text(SOURCE_CARD)
    return root


def _quantize(src: Path, out: Path, *extra: str) -> str:
    argv = ["quantize", str(src), str(out), "--quiet", "--tp", "none", *extra]
    assert main(argv) == 0
    return shlex.join(["finefp8", *argv])


def test_card_front_matter_and_body(src, tmp_path):
    out = tmp_path / "out"
    cmd = _quantize(src, out, "--ignore", "model.layers.0.mlp.down_proj", "--base-model",
                    "someone/original")
    text = (out / "README.md").read_text()
    meta, raw, body = C.split_front_matter(text)
    # the Hub's model-card metadata
    assert meta["base_model"] == "someone/original"
    assert meta["base_model_relation"] == "quantized"
    assert meta["library_name"] == "transformers"
    assert meta["license"] == "mit" and meta["language"] == ["en", "fr"]
    assert meta["tags"][:3] == ["fp8", "finefp8", "quantized"]
    assert meta["tags"].count("fp8") == 1 and "llama" in meta["tags"]  # source tags merged
    qc = meta["quantization_config"]
    assert qc["quant_method"] == "fp8" and qc["weight_block_size"] == [128, 128]
    assert qc["scale_fmt"] == "fp32" and qc["activation_scheme"] == "dynamic"
    # 2 layers x 4 attention + 3 MLP (layer 0, one --ignore'd) + 2 experts x 3 = 16
    assert qc["quantized_layers"] == 8 + 2 + 6
    cfg = json.loads((out / "config.json").read_text())
    assert qc["modules_not_converted"] == len(cfg["quantization_config"]["modules_to_not_convert"])
    # the body: source, method, what was kept and why, version, command
    assert C.CARD_MARKER in body
    assert f"the local folder `{src}`" in body
    assert "128x128 block" in body and "amax" in body and "448" in body
    assert "`fp8`" in body and "weight_scale_inv" in body
    assert "embedding (1): `model.embed_tokens`" in body
    assert "MoE router (1): `model.layers.1.mlp.gate`" in body
    assert "ignored (1): `model.layers.0.mlp.down_proj`: kept by the --ignore" in body
    assert "arXiv:2412.19437" in body
    assert f"finefp8 version: {C.__version__}" in body and f"command: `{cmd}`" in body
    # the source card, kept below ours, whole
    i = body.index("## Model card of the source model")
    assert body.index("## Evaluation") < i
    assert "# The source model" in body[i:] and "| 1 | 2 |" in body[i:]
    assert "```yaml\nlicense: mit" in body[i:]
    assert C.source_card_text(text) == SOURCE_CARD


def test_card_is_a_conversion_output_and_atomic(src, tmp_path):
    out = tmp_path / "out"
    _quantize(src, out)
    manifest = json.loads((out / ".finefp8-manifest.json").read_text())
    assert manifest["status"] == "complete"
    assert "README.md" in manifest["outputs"] and "README.md" in manifest["done"]
    assert not list(out.glob("*.partial"))
    # --overwrite may delete it (finefp8 wrote it) and writes it again
    (out / "README.md").write_text("stale")
    _quantize(src, out, "--overwrite", "--layout", "compressed-tensors")
    meta, _, body = C.split_front_matter((out / "README.md").read_text())
    assert meta["quantization_config"]["quant_method"] == "compressed-tensors"
    assert "compressed-tensors" in meta["tags"] and "weight_scale`" not in body.split("\n")[0]
    assert "`<module>.weight_scale`" in body


def test_card_without_source_card_and_ue8m0(tmp_path):
    src = write_checkpoint(tmp_path / "src", llama_tensors(), n_shards=1)
    out = tmp_path / "out"
    _quantize(src, out, "--scale-fmt", "ue8m0")
    text = (out / "README.md").read_text()
    meta, _, body = C.split_front_matter(text)
    assert "base_model" not in meta  # a local folder, no --base-model: nothing to claim
    assert "ue8m0" in meta["tags"] and meta["quantization_config"]["scale_fmt"] == "ue8m0"
    assert "power of two" in body
    assert "## Model card of the source model" not in body
    assert C.source_card_text(text) is None
    assert C.checkpoint_variant(json.loads((out / "config.json").read_text())) == "ue8m0"


def test_dequantize_restores_the_source_card(src, tmp_path):
    out, back = tmp_path / "out", tmp_path / "back"
    _quantize(src, out)
    assert main(["dequantize", str(out), str(back), "--quiet"]) == 0
    assert (back / "README.md").read_text() == SOURCE_CARD
    assert "README.md" in json.loads((back / ".finefp8-manifest.json").read_text())["done"]


def _summary(variants: list[tuple[str, float, float, float]]) -> dict:
    ref_ppl = variants[0][3]
    return {
        "finefp8_version": "9.9", "model": {"name": "/m", "source": "hf", "dtype": "bfloat16"},
        "text": {"name": "python docs"}, "tokens": 512,
        "uncertainty": {"block_tokens": 64, "blocks": 8, "level": 0.95}, "window": 256, "scored_tokens": 510,
        "variants": [{"key": k, "description": f"{k} description", "kl": kl, "top1": t,
                      "ppl": p, "ppl_rel_change": p / ref_ppl - 1,
                      **({"ppl_rel_change_ci": [0.001, 0.004], "kl_sem": 0.0002,
                          "top1_sem": 0.011} if k == "w8a8" else {})}
                     for k, kl, t, p in variants],
    }


def test_evaluation_section_and_update(src, tmp_path):
    out = tmp_path / "out"
    _quantize(src, out)
    summary = _summary([("reference", 0.0, 1.0, 10.0), ("w8a8", 0.00123, 0.987, 10.025),
                        ("weight_only", 0.0004, 0.995, 10.01)])
    section = C.evaluation_section(summary, "w8a8")
    lines = section.splitlines()
    assert ("| **`w8a8` (this checkpoint)** | 0.00123 ± 0.00020 | 98.70% ± 1.10% | 10.025 | "
            "+0.25% [+0.10%, +0.40%] |") in lines
    assert "| `weight_only` | 0.00040 | 99.50% | 10.010 | +0.10% |" in lines
    assert "| `reference` | 0.00000 | 100.00% | 10.000 | - |" in lines
    assert "510 scored tokens of python docs" in section
    assert "blocks of 64 consecutive scored tokens (8 blocks)" in section
    assert "95% bootstrap interval" in section
    before = (out / "README.md").read_text()
    C.add_evaluation(out, section)
    after = (out / "README.md").read_text()
    assert section in after and "No evaluation yet" not in after
    C.add_evaluation(out, C.evaluation_section(summary, None))  # replaced, not appended
    again = (out / "README.md").read_text()
    assert again.count("| `weight_only` |") == 1 and "(this checkpoint)" not in again
    # everything outside the evaluation section is untouched
    assert before.split("## Evaluation")[0] == again.split("## Evaluation")[0]
    assert C.source_card_text(again) == SOURCE_CARD
    with pytest.raises(ValueError, match="no finefp8 model card"):
        C.add_evaluation(src, section)


def test_card_source_from_a_cache_path(tmp_path):
    snap = tmp_path / "hub" / "models--org--name" / "snapshots" / ("c" * 40)
    snap.mkdir(parents=True)
    s = C.CardSource.from_path(snap)
    assert s.repo_id == "org/name" and s.commit == "c" * 40 and s.base_model == "org/name"
    assert C.CardSource.from_path(tmp_path).repo_id is None


def test_front_matter_edge_cases():
    assert C.split_front_matter("# no header\n") == ({}, "", "# no header\n")
    meta, raw, body = C.split_front_matter("---\n- a list\n---\nbody\n")
    assert meta == {} and raw == "- a list" and body == "body\n"
    meta, raw, body = C.split_front_matter("---\nkey: [unclosed\n---\nbody\n")
    assert meta == {} and raw == "key: [unclosed" and body == "body\n"
    assert yaml.safe_load("a: 1") == {"a": 1}
