"""The eval report: the verdict, the layer grid of the heatmaps, titles, the uncertainty shown."""

from __future__ import annotations

import torch

from finefp8.eval.report import (
    REPORT_FILES,
    layer_grid,
    print_table,
    shipped_variant,
    verdict,
    write_report,
)

PROJ = ("self_attn.q_proj", "mlp.down_proj")


def _layers(snr: list[float]) -> list[dict]:
    rows = []
    for i, x in enumerate(snr):
        rows.append({"name": f"model.layers.{i // 2}.{PROJ[i % 2]}", "shape": [8, 8],
                     "weight_snr_db": x + 2, "weight_rel_error": 0.02, "act_snr_db": x + 3,
                     "act_rel_error": 0.02, "out_snr_db": x, "out_rel_error": 0.03})
    return rows


def _variant(key, label, kl, ppl_change, weight_bytes, snr, vs=None):
    return {"key": key, "label": label, "description": "", "config": None, "calibration": None,
            "kl": kl, "kl_sem": kl / 10, "top1": 0.9, "top1_sem": 0.004, "ppl": 10 * (1 + ppl_change),
            "ppl_rel_change": ppl_change,
            "ppl_rel_change_ci": [ppl_change - 0.004, ppl_change + 0.005],
            "resident_bytes": weight_bytes, "resident_weight_bytes": weight_bytes,
            "checkpoint_bytes": weight_bytes, "wall_time_s": 1.0, "quantize_time_s": 0.1,
            "layers": _layers(snr) if snr else [], "vs_baseline": vs}


def _summary() -> dict:
    snr = [30.0, 31.0, 29.0, 24.5, 32.0, 26.0]  # 3 layers x 2 projections
    return {
        "finefp8_version": "0", "model": {"name": "tiny", "source": "hf", "dtype": "float32",
                                          "parameters": 10, "fp8_layers": 6, "load_time_s": 0},
        "text": {"name": "t.txt", "python_version": "3.11", "sha256": "ab" * 32, "chars": 9,
                 "tokens_total": 900},
        "tokens": 800, "window": 400, "windows": 2, "scored_tokens": 798, "layer_tokens": 64,
        "calibration": None,
        "machine": {"platform": "x", "torch": "2", "threads": 2, "cpus": 2,
                    "deterministic_algorithms": True, "seed": 0},
        "uncertainty": {"block_tokens": 64, "blocks": 14, "bootstrap_resamples": 2000,
                        "level": 0.95, "bootstrap_seed": 0, "baseline": "w8a8"},
        "variants": [
            _variant("reference", "reference", 0.0, 0.0, 4000, None),
            _variant("w8a8", "W8A8 block", 0.0200, 0.012, 1000, snr),
            # lower KL than every FP8 variant, but float weights: never the one to ship
            _variant("act_only", "activations-only", 0.0070, 0.004, 4000, snr),
            _variant("w8a8_gptq", "W8A8 GPTQ", 0.0130, 0.009, 1000,
                     [x + 1 for x in snr], {"baseline": "w8a8", "kl_diff": -0.007,
                                            "kl_diff_sem": 0.0005,
                                            "ppl_ratio_ci": [-0.008, 0.002]}),
        ],
        "saved_variant": None, "wall_time_s": 5.0,
        "_kl_values": {"w8a8": torch.rand(798) * 0.05, "act_only": torch.rand(798) * 0.02,
                       "w8a8_gptq": torch.rand(798) * 0.03},
    }


def test_layer_grid_places_names_by_layer_and_projection():
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.experts.0-7.down_proj",
             "model.layers.10.self_attn.q_proj", "model.layers.2.mlp.experts.0-7.down_proj",
             "lm_head"]
    rows, cols, cells = layer_grid(names)
    assert rows == ["self_attn.q_proj", "mlp.experts.0-7.down_proj", "lm_head"]
    assert cols == ["0", "2", "10", "-"]
    assert cells == [(0, 0), (1, 0), (0, 2), (1, 1), (2, 3)]


def test_verdict_names_the_fp8_variant_with_lowest_kl_and_its_uncertainty():
    s = _summary()
    assert shipped_variant(s)["key"] == "w8a8_gptq"
    text = verdict(s)
    assert text.startswith("**Ship W8A8 GPTQ** (`w8a8_gptq`)")
    assert "0.0130 ± 0.0013 nats" in text  # kl_sem = kl / 10
    assert "+0.90% (95% CI [+0.50, +1.40]%)" in text
    assert "KL -0.0070 ± 0.0005 nats (beyond the noise)" in text
    assert "perplexity [-0.80, +0.20]% (within the noise)" in text
    assert "Runner-up among the FP8-weight variants: W8A8 block, KL 0.0200 ± 0.0020" in text
    # GPTQ's layers are the base SNRs + 1: worst 25.5 (layer 1 down_proj), 27.0, 30.0
    assert ("`layers.1.mlp.down_proj` (25.5 dB), `layers.2.mlp.down_proj` (27.0 dB), "
            "`layers.1.self_attn.q_proj` (30.0 dB)") in text
    only_float = dict(s, variants=[v for v in s["variants"] if v["key"] in ("reference",
                                                                           "act_only")])
    assert verdict(only_float) == ""


def test_report_opens_with_the_verdict_and_titles_its_sections(tmp_path):
    out = write_report(_summary(), tmp_path / "r")
    assert sorted(p.name for p in out.iterdir()) == sorted(REPORT_FILES)
    page = (out / "report.html").read_text()
    body = page[page.index("<body>"):]
    assert body.index("<h1>FP8 evaluation of tiny</h1>") < body.index("Ship") < body.index(
        "<table>")
    for title in ("Accuracy and memory by variant", "Output error per layer and projection",
                  "Where the error comes from", "Each variant against W8A8 block"):
        assert f"<h2>{title}" in body
    assert ".png</h" not in body  # no section is titled with a file name
    assert "0.0200 ± 0.0020" in body and "+1.20% [+0.80, +1.70]" in body
    md = (out / "report.md").read_text()
    assert md.startswith("# FP8 evaluation of tiny\n\n**Ship W8A8 GPTQ**")
    assert "## Output error per layer and projection\n\n![Output error per layer and " \
           "projection](layer_error.png)" in md
    assert "| W8A8 GPTQ | -0.0070 ± 0.0005 | [-0.80, +0.20]% |" in md


def test_terminal_table_shows_errors_and_intervals():
    from rich.console import Console

    console = Console(record=True, width=200)
    print_table(_summary(), console)
    text = console.export_text()
    assert "0.0200 ± 0.0020" in text and "+1.20% [+0.80, +1.70]" in text
    assert "90.00% ± 0.40" in text
    assert "blocks of 64 consecutive scored tokens" in text
    assert "Ship W8A8 GPTQ" in text


def test_a_run_too_short_for_uncertainty_still_reports(tiny_model_dir, tiny_text_file, tmp_path):
    """One scored token: no standard error or interval exists; they are null in the JSON and
    ``-`` in the table, and the report is still written."""
    import json

    from finefp8.eval.run import EvalOptions, evaluate

    summary = evaluate(EvalOptions(model=str(tiny_model_dir), text=str(tiny_text_file),
                                   tokens=2, window=2, layer_tokens=2, variants=("w8a8",)))
    w8a8 = summary["variants"][1]
    assert summary["scored_tokens"] == 1 and summary["uncertainty"]["blocks"] == 1
    assert w8a8["kl_sem"] is None and w8a8["ppl_rel_change_ci"] == [None, None]
    out = write_report(summary, tmp_path / "r")
    assert json.loads((out / "summary.json").read_text())["variants"][1]["kl_sem"] is None
    assert f"{w8a8['kl']:.4f} ± -" in (out / "report.md").read_text()
