"""How ``finefp8 eval`` shows its results: a terminal table, a JSON summary, a report folder.

The report folder holds:

* ``summary.json``: the summary ``evaluate`` returns (without the per-token KL values);
* ``report.md``: the tables, with the plots linked as PNG files next to it;
* ``report.html``: the same, self-contained (the PNGs embedded as base64);
* ``layer_error.png``: output SNR of every FP8 layer, one line per variant;
* ``layer_error_sources.png``: weight vs activation SNR per layer (where the error comes from);
* ``error_histograms.png``: per-token KL divergence and per-layer output SNR, by variant;
* ``metrics_by_variant.png``: KL divergence and perplexity change by variant.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path

__all__ = ["REPORT_FILES", "print_table", "to_json", "write_report"]

REPORT_FILES = ("summary.json", "report.md", "report.html", "layer_error.png",
                "layer_error_sources.png", "error_histograms.png", "metrics_by_variant.png")
_PLOTS = REPORT_FILES[3:]


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _rows(summary: dict) -> list[list[str]]:
    """The table rows: one per variant, formatted."""
    rows = []
    for v in summary["variants"]:
        ref = v["key"] == "reference"
        rows.append([
            v["label"],
            "-" if ref else f"{v['kl']:.4f}",
            "-" if ref else f"{100 * v['top1']:.2f}%",
            f"{v['ppl']:.3f}",
            "-" if ref else f"{100 * v['ppl_rel_change']:+.2f}%",
            _mib(v["resident_weight_bytes"]),
            _mib(v["checkpoint_bytes"]),
            f"{v['wall_time_s']:.1f} s",
        ])
    return rows


_HEADER = ["variant", "KL (nats)", "top-1 agree", "ppl", "ppl change", "Linear weights",
           "checkpoint", "forward time"]


def _strip(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if not k.startswith("_")}


def to_json(summary: dict) -> str:
    """The summary as indented JSON (private keys such as ``_kl_values`` dropped)."""
    return json.dumps(_strip(summary), indent=2, allow_nan=False)


def _caption(summary: dict) -> str:
    t, m = summary["text"], summary["model"]
    return (f"{m['name']} ({m['dtype']}), {summary['scored_tokens']} scored tokens of {t['name']} "
            f"(Python {t['python_version']}, sha256 {t['sha256'][:12]}), "
            f"{summary['window']}-token windows")


def print_table(summary: dict, console=None) -> None:
    """The variants table on the terminal (rich)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    console.width = max(console.width, 130)
    table = Table(title="finefp8 eval: " + _caption(summary), title_justify="left")
    for i, col in enumerate(_HEADER):
        table.add_column(col, justify="left" if i == 0 else "right")
    for row in _rows(summary):
        table.add_row(*row)
    console.print(table)


# ----------------------------------------------------------------------------- plots


def _variants_with_layers(summary: dict) -> list[dict]:
    return [v for v in summary["variants"] if v["layers"]]


def _short(name: str) -> str:
    """``model.layers.3.self_attn.q_proj`` -> ``3.q_proj``."""
    parts = name.split(".")
    if "layers" in parts:
        i = parts.index("layers")
        return f"{parts[i + 1]}.{parts[-1]}"
    return name


def _layer_axis(ax, summary: dict) -> None:
    """Label the x axis with the FP8 layers' short names (at most about 30 ticks)."""
    names = [_short(r["name"]) for r in _variants_with_layers(summary)[0]["layers"]]
    step = max(1, len(names) // 30)
    ax.set_xticks(range(0, len(names), step))
    ax.set_xticklabels(names[::step], rotation=90, fontsize=7)


def _plot_layer_error(summary: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 4.5))
    for v in _variants_with_layers(summary):
        ys = [r["out_snr_db"] if r["out_snr_db"] is not None else math.nan for r in v["layers"]]
        ax.plot(range(len(ys)), ys, label=v["label"], lw=1.0)
    _layer_axis(ax, summary)
    ax.set_ylabel("layer output SNR (dB, higher is better)")
    ax.set_title("Per-layer output error of each FP8 variant (reference inputs)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _plot_sources(summary: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 4.5))
    for v in _variants_with_layers(summary):
        if v["config"] is None:
            continue
        w = [r["weight_snr_db"] for r in v["layers"]]
        a = [r["act_snr_db"] for r in v["layers"]]
        if any(x is not None for x in w):
            ax.plot([x if x is not None else math.nan for x in w], lw=1.0,
                    label=f"{v['label']}: weight")
        if any(x is not None for x in a) and v["key"] in ("w8a8", "per_tensor", "ue8m0"):
            ax.plot([x if x is not None else math.nan for x in a], lw=1.0, ls="--",
                    label=f"{v['label']}: activation")
    _layer_axis(ax, summary)
    ax.set_ylabel("SNR (dB)")
    ax.set_title("Where the error comes from: weight and activation quantization SNR per layer")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _plot_histograms(summary: dict, path: Path) -> None:
    import matplotlib.pyplot as plt
    import numpy as np

    kl_values = summary.get("_kl_values") or {}
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.2))
    bins = np.logspace(-6, 1, 60)
    for v in summary["variants"]:
        vals = kl_values.get(v["key"])
        if v["key"] == "reference" or vals is None or len(vals) == 0:
            continue
        arr = np.clip(np.asarray(vals, dtype=np.float64), 1e-6, 10)
        a1.hist(arr, bins=bins, histtype="step", label=v["label"])
    a1.set_xscale("log")
    a1.set_xlabel("per-token KL divergence from the reference (nats)")
    a1.set_ylabel("tokens")
    a1.set_title("Per-token KL divergence")
    a1.legend(fontsize=7)
    for v in _variants_with_layers(summary):
        snr = [r["out_snr_db"] for r in v["layers"] if r["out_snr_db"] is not None]
        if snr:
            a2.hist(snr, bins=40, histtype="step", label=v["label"])
    a2.set_xlabel("layer output SNR (dB)")
    a2.set_ylabel("layers")
    a2.set_title("Per-layer output SNR")
    a2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _plot_metrics(summary: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    vs = [v for v in summary["variants"] if v["key"] != "reference"]
    labels = [v["label"] for v in vs]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.2))
    a1.barh(labels, [v["kl"] for v in vs], color="tab:blue")
    a1.set_xlabel("mean KL divergence from the reference (nats, lower is better)")
    a1.invert_yaxis()
    a2.barh(labels, [100 * v["ppl_rel_change"] for v in vs], color="tab:orange")
    a2.set_xlabel(f"perplexity change vs reference ({summary['variants'][0]['ppl']:.3f}), %")
    a2.invert_yaxis()
    a2.set_yticklabels([])
    for ax in (a1, a2):
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle("Accuracy by variant")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ----------------------------------------------------------------------------- documents


def _worst_layers(v: dict, n: int = 8) -> list[dict]:
    rows = [r for r in v["layers"] if r["out_snr_db"] is not None]
    return sorted(rows, key=lambda r: r["out_snr_db"])[:n]


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _markdown(summary: dict, images: dict[str, str]) -> str:
    """The report in Markdown; ``images`` maps plot file names to the link to use."""
    t, m = summary["text"], summary["model"]
    lines = [
        "# finefp8 eval report",
        "",
        f"- model: `{m['name']}` ({m['source']}, {m['dtype']}, {m['parameters']:,} parameters, "
        f"{m['fp8_layers']} Linear layers converted)",
        f"- text: `{t['name']}`, Python {t['python_version']}, sha256 `{t['sha256']}`, "
        f"{t['chars']:,} characters, {t['tokens_total']:,} tokens",
        f"- evaluation: first {summary['tokens']:,} tokens in {summary['windows']} windows of "
        f"{summary['window']} ({summary['scored_tokens']:,} scored next-token predictions)",
    ]
    if summary.get("calibration"):
        c = summary["calibration"]
        lines.append(f"- GPTQ calibration: {c['tokens']:,} tokens {c['first_token']:,}..."
                     f"{c['last_token']:,} of the text ({c['note']})")
    lines += [
        f"- finefp8 {summary['finefp8_version']}, torch {summary['machine']['torch']}, "
        f"{summary['machine']['threads']} threads, total {summary['wall_time_s']:.0f} s",
        "",
        "KL is the mean per-token KL divergence of the variant's next-token distribution from "
        "the reference's (nats; the primary measure), top-1 agree the share of positions whose "
        "most likely token is the reference's. Linear weights: resident bytes of the converted "
        "layers; checkpoint: bytes the tensors of a checkpoint would take.",
        "",
        "| " + " | ".join(_HEADER) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(_HEADER) - 1)) + "|",
    ]
    lines += ["| " + " | ".join(r) + " |" for r in _rows(summary)]
    lines += ["", "## Plots", ""]
    for name, title in (("metrics_by_variant.png", "Accuracy by variant"),
                        ("layer_error.png", "Per-layer output error"),
                        ("layer_error_sources.png", "Weight vs activation error per layer"),
                        ("error_histograms.png", "Error histograms")):
        lines += [f"![{title}]({images[name]})", ""]
    lines += ["## Layers with the largest error", ""]
    for v in _variants_with_layers(summary):
        lines += [f"### {v['label']}", "",
                  "| layer | out SNR dB | out rel err | weight SNR dB | act SNR dB |",
                  "|---|---:|---:|---:|---:|"]
        for r in _worst_layers(v):
            lines.append(f"| {r['name']} | {_fmt(r['out_snr_db'], '.1f')} | "
                         f"{_fmt(r['out_rel_error'], '.4f')} | {_fmt(r['weight_snr_db'], '.1f')} | "
                         f"{_fmt(r['act_snr_db'], '.1f')} |")
        lines.append("")
    return "\n".join(lines)


def _html(summary: dict, images: dict[str, str]) -> str:
    """A self-contained HTML page: the table and the plots (``images``: data URIs)."""
    t = summary["text"]
    head = "".join(f"<th>{html.escape(h)}</th>" for h in _HEADER)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>"
                   for r in _rows(summary))
    plots = "".join(f'<h3>{html.escape(n)}</h3><img src="{u}" alt="{html.escape(n)}">'
                    for n, u in images.items())
    layer_tables = ""
    for v in _variants_with_layers(summary):
        rows = "".join(
            f"<tr><td>{html.escape(r['name'])}</td><td>{_fmt(r['out_snr_db'], '.1f')}</td>"
            f"<td>{_fmt(r['weight_snr_db'], '.1f')}</td><td>{_fmt(r['act_snr_db'], '.1f')}</td></tr>"
            for r in _worst_layers(v))
        layer_tables += (f"<h3>{html.escape(v['label'])}</h3><table><tr><th>layer</th>"
                         f"<th>out SNR dB</th><th>weight SNR dB</th><th>act SNR dB</th></tr>"
                         f"{rows}</table>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;"
             "text-align:right}td:first-child,th:first-child{text-align:left}img{max-width:100%}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>finefp8 eval report</title>"
            f"<style>{style}</style></head><body><h1>finefp8 eval report</h1>"
            f"<p>{html.escape(_caption(summary))}. Text sha256 <code>{t['sha256']}</code>, "
            f"total {summary['wall_time_s']:.0f} s.</p>"
            f"<table><tr>{head}</tr>{body}</table><h2>Plots</h2>{plots}"
            f"<h2>Layers with the largest error</h2>{layer_tables}</body></html>")


def write_report(summary: dict, folder: str | Path) -> Path:
    """Write every file of ``REPORT_FILES`` into ``folder`` (created); returns the folder.

    Files are written under temporary names and renamed at the end, so an interrupted run
    never leaves a report that looks complete.
    """
    import matplotlib

    matplotlib.use("Agg")
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    if not _variants_with_layers(summary):
        raise ValueError("write_report: the summary has no FP8 variant with per-layer errors")
    tmp = {name: out / f".partial-{name}" for name in REPORT_FILES}
    _plot_layer_error(summary, tmp["layer_error.png"])
    _plot_sources(summary, tmp["layer_error_sources.png"])
    _plot_histograms(summary, tmp["error_histograms.png"])
    _plot_metrics(summary, tmp["metrics_by_variant.png"])
    tmp["summary.json"].write_text(to_json(summary) + "\n")
    tmp["report.md"].write_text(_markdown(summary, {n: n for n in _PLOTS}) + "\n")
    uris = {n: "data:image/png;base64," + base64.b64encode(tmp[n].read_bytes()).decode()
            for n in _PLOTS}
    tmp["report.html"].write_text(_html(summary, uris) + "\n")
    for name, path in tmp.items():
        path.replace(out / name)
    return out
