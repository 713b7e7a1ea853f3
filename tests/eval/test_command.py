"""``finefp8 eval`` end to end: a tiny random Llama (offline), and the embedded SmolLM2 (slow)."""

from __future__ import annotations

import json
import math

import pytest

from finefp8.cli import main
from finefp8.eval.options import DEFAULT_VARIANT_KEYS
from finefp8.eval.report import REPORT_FILES

VARIANT_FIELDS = {"key", "label", "description", "config", "calibration", "kl", "top1", "ppl",
                  "ppl_rel_change", "resident_bytes", "resident_weight_bytes", "checkpoint_bytes",
                  "wall_time_s", "quantize_time_s", "layers", "kl_sem", "top1_sem",
                  "ppl_rel_change_ci", "vs_baseline"}
LAYER_FIELDS = {"name", "shape", "weight_snr_db", "weight_rel_error", "act_snr_db", "act_rel_error",
                "out_snr_db", "out_rel_error"}
TOP_FIELDS = {"finefp8_version", "model", "text", "tokens", "window", "windows", "scored_tokens",
              "layer_tokens", "calibration", "machine", "variants", "wall_time_s", "uncertainty"}


def _check_summary(summary: dict, tokens: int, window: int, n_layers: int) -> dict:
    assert TOP_FIELDS <= set(summary)
    assert {"name", "python_version", "sha256", "chars", "tokens_total"} <= set(summary["text"])
    assert len(summary["text"]["sha256"]) == 64
    assert summary["tokens"] == tokens and summary["window"] == window
    assert summary["scored_tokens"] == tokens - math.ceil(tokens / window)
    by_key = {v["key"]: v for v in summary["variants"]}
    assert list(by_key) == list(DEFAULT_VARIANT_KEYS)
    for key, v in by_key.items():
        assert VARIANT_FIELDS <= set(v), key
        assert 0.0 <= v["top1"] <= 1.0 and v["ppl"] > 0 and v["kl"] >= 0
        if key == "reference":
            assert v["kl"] == pytest.approx(0.0, abs=1e-9) and v["top1"] == 1.0
            assert v["layers"] == []
            continue
        assert len(v["layers"]) == n_layers
        for row in v["layers"]:
            assert LAYER_FIELDS <= set(row)
    ref = by_key["reference"]
    # W8A8 variants hold 1 byte a weight + scales: about a quarter of fp32
    for key in ("w8a8", "weight_only", "per_tensor", "ue8m0", "w8a8_gptq"):
        assert by_key[key]["resident_weight_bytes"] < 0.3 * ref["resident_weight_bytes"]
        assert by_key[key]["checkpoint_bytes"] < ref["checkpoint_bytes"]
        assert by_key[key]["layers"][0]["weight_snr_db"] > 20
    assert by_key["act_only"]["checkpoint_bytes"] == ref["checkpoint_bytes"]
    assert by_key["weight_only"]["layers"][0]["act_snr_db"] is None
    assert by_key["w8a8"]["layers"][0]["act_snr_db"] > 20
    assert by_key["w8a8"]["kl"] > 0
    return by_key


def test_eval_tiny_model_writes_every_file(tiny_model_dir, tiny_text_file, tmp_path, capsys):
    out = tmp_path / "report"
    rc = main(["eval", str(tiny_model_dir), "--text", str(tiny_text_file), "--tokens", "300",
               "--window", "100", "--calib-tokens", "200", "--layer-tokens", "64",
               "--report", str(out), "--json", "--quiet"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    summary = json.loads(captured.out)
    by_key = _check_summary(summary, 300, 100, n_layers=2 * 7)
    assert summary["model"]["source"] == "hf"
    assert summary["calibration"]["tokens"] == 200
    assert "W8A8 block (DeepSeek-V3)" in captured.err  # the table went to stderr with --json
    for name in REPORT_FILES:
        f = out / name
        assert f.is_file() and f.stat().st_size > 0, name
    assert not list(out.glob(".partial-*"))
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["variants"][1]["kl"] == pytest.approx(by_key["w8a8"]["kl"])
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "W8A8 per-tensor" in html
    md = (out / "report.md").read_text()
    assert "![Accuracy by variant, with uncertainty](metrics_by_variant.png)" in md
    w8a8 = by_key["w8a8"]
    assert w8a8["kl_sem"] > 0 and w8a8["ppl_rel_change_ci"][0] < w8a8["ppl_rel_change_ci"][1]
    assert by_key["w8a8_gptq"]["vs_baseline"]["baseline"] == "w8a8"
    assert summary["uncertainty"]["blocks"] == 6  # 3 windows of 99 scored tokens, blocks of 64


def test_eval_bad_input_messages(tiny_model_dir, tiny_text_file, tmp_path, capsys):
    assert main(["eval", str(tmp_path / "missing"), "--no-report", "--quiet"]) == 1
    assert "missing: no such file or directory, and not a Hugging Face Hub ID" in \
        capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["eval", str(tmp_path / "empty"), "--no-report", "--quiet"]) == 1
    assert "not a Hugging Face model folder" in capsys.readouterr().err
    assert main(["eval", str(tiny_model_dir), "--text", str(tiny_text_file), "--tokens",
                 "100000", "--no-report", "--quiet"]) == 1
    assert "fewer than --tokens" in capsys.readouterr().err
    assert main(["eval", "--tokens", "1", "--no-report"]) == 1
    assert "--tokens must be at least 2" in capsys.readouterr().err


def test_eval_fp8_checkpoint_as_model(tiny_model_dir, tiny_text_file, tmp_path, capsys):
    from finefp8.checkpoint.convert import quantize_checkpoint

    ckpt = tmp_path / "fp8"
    quantize_checkpoint(str(tiny_model_dir), str(ckpt), progress=False, tp=())
    rc = main(["eval", str(ckpt), "--text", str(tiny_text_file), "--tokens", "200", "--window",
               "100", "--variants", "w8a8", "weight_only", "--no-report", "--json", "--quiet"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    summary = json.loads(captured.out)
    assert summary["model"]["source"] == "fp8-checkpoint"
    by_key = {v["key"]: v for v in summary["variants"]}
    # the reference holds the checkpoint's dequantized weights, which FP8 represents exactly again
    assert by_key["weight_only"]["kl"] < 1e-8
    assert by_key["w8a8"]["layers"][0]["weight_snr_db"] is None or \
        by_key["w8a8"]["layers"][0]["weight_snr_db"] > 100


@pytest.mark.slow
def test_eval_default_smollm2(tmp_path, capsys):
    out = tmp_path / "report"
    rc = main(["eval", "--tokens", "1024", "--window", "512", "--calib-tokens", "512",
               "--variants", "w8a8", "per_tensor", "w8a8_gptq", "--report", str(out), "--json",
               "--quiet"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    summary = json.loads(captured.out)
    assert summary["model"]["source"] == "gguf" and summary["model"]["fp8_layers"] == 210
    assert summary["text"]["name"] == "pydoc_data.topics"
    by_key = {v["key"]: v for v in summary["variants"]}
    assert 5 < by_key["reference"]["ppl"] < 40
    assert 0.005 < by_key["w8a8"]["kl"] < 0.06
    assert by_key["w8a8"]["kl"] < by_key["per_tensor"]["kl"]
    assert by_key["w8a8"]["top1"] > 0.85
    assert by_key["w8a8_gptq"]["kl"] < by_key["w8a8"]["kl"]
    for name in REPORT_FILES:
        assert (out / name).is_file()


def test_eval_save_variant_writes_gptq_checkpoint(tiny_model_dir, tiny_text_file, tmp_path,
                                                  capsys):
    """``--save-variant w8a8_gptq DIR``: an fp8 checkpoint with DeepSeek's amax/448 block
    scales and the GPTQ-chosen codes, which ``finefp8.load`` and ``inspect`` read."""
    import torch
    from transformers import AutoModelForCausalLM

    import finefp8
    from finefp8.nn import fp8_modules
    from finefp8.quantization import quantize_blockwise

    assert main(["eval", str(tiny_model_dir), "--save-variant", "per_tensor",
                 str(tmp_path / "pt"), "--no-report", "--quiet"]) == 1
    assert "not an FP8 variant with 128x128 weight blocks" in capsys.readouterr().err
    dest = tmp_path / "gptq"
    rc = main(["eval", str(tiny_model_dir), "--text", str(tiny_text_file), "--tokens", "200",
               "--window", "100", "--calib-tokens", "200", "--layer-tokens", "32",
               "--variants", "w8a8", "--save-variant", "w8a8_gptq", str(dest), "--no-report",
               "--json", "--quiet"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    summary = json.loads(captured.out)
    assert summary["saved_variant"] == {"key": "w8a8_gptq", "path": str(dest)}
    assert [v["key"] for v in summary["variants"]] == ["reference", "w8a8", "w8a8_gptq"]
    assert (dest / "tokenizer.json").is_file()
    assert main(["inspect", str(dest), "--json"]) in (0, 3)  # 3: odd shapes refused by TP rules
    assert json.loads(capsys.readouterr().out)["sound"]

    saved = finefp8.load(dest)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    changed = 0
    for name, layer in fp8_modules(saved).items():
        q, s = quantize_blockwise(reference.get_submodule(name).weight.detach())
        assert torch.equal(layer.weight_scale_inv, s), name  # the same on-disk scales
        changed += int((layer.weight.view(torch.uint8) != q.view(torch.uint8)).sum())
    assert changed > 0  # GPTQ rounded some codes differently from nearest
    ids = torch.arange(3, 40).unsqueeze(0)
    with torch.no_grad():
        assert torch.isfinite(saved(ids).logits).all()
