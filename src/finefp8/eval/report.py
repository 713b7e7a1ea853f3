"""How ``finefp8 eval`` shows its results: a terminal table, a JSON summary, a report folder.

The report opens with a verdict (``verdict``): the variant to ship, its KL divergence and
perplexity change with their uncertainty, and the layers that hurt most. The folder holds:

* ``summary.json``: the summary ``evaluate`` returns (without the per-token KL values);
* ``report.md``: the verdict, the tables, and the plots linked as PNG files next to it;
* ``report.html``: the same, self-contained (the PNGs embedded as base64);
* ``metrics_by_variant.png``: KL divergence (+- 1.96 standard errors) and perplexity change
  (95% bootstrap interval) by variant;
* ``layer_error.png``: output SNR of every FP8 layer as a heatmap, layer index x projection,
  one panel per variant;
* ``layer_error_sources.png``: weight and activation SNR heatmaps of the baseline variant,
  and the shipped variant's output SNR minus the baseline's;
* ``error_histograms.png``: per-token KL divergence and per-layer output SNR, by variant.

The heatmaps read the layer index and the projection from each layer's module name
(``layer_grid``), so any module naming with a numbered layer works: attention and MLP
projections, fused or per-expert-group MoE entries alike.
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
from pathlib import Path

__all__ = ["REPORT_FILES", "print_table", "to_json", "write_report", "verdict", "layer_grid",
           "shipped_variant"]

REPORT_FILES = ("summary.json", "report.md", "report.html", "metrics_by_variant.png",
                "layer_error.png", "layer_error_sources.png", "error_histograms.png")
#: Each plot's file and its section title, in report order.
_PLOTS = {
    "metrics_by_variant.png": "Accuracy by variant, with uncertainty",
    "layer_error.png": "Output error per layer and projection",
    "layer_error_sources.png": "Where the error comes from: weights, activations, calibration",
    "error_histograms.png": "Distribution of per-token KL and per-layer output SNR",
}
#: z of a two-sided 95% normal interval: the KL error bars are +- this many standard errors.
_Z95 = 1.959963984540054


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _num(x, spec: str, scale: float = 1.0) -> str:
    """``format(scale * x, spec)``, or ``-`` for a missing value."""
    return "-" if x is None else format(scale * x, spec)


def _ci(pair, scale: float = 100.0, spec: str = "+.2f") -> str:
    """``[lo, hi]`` formatted, or ``-`` when the interval is unknown."""
    if not pair or pair[0] is None or pair[1] is None:
        return "-"
    return f"[{format(scale * pair[0], spec)}, {format(scale * pair[1], spec)}]"


def _rows(summary: dict) -> list[list[str]]:
    """The table rows: one per variant, formatted."""
    rows = []
    for v in summary["variants"]:
        ref = v["key"] == "reference"
        rows.append([
            v["label"],
            "-" if ref else f"{v['kl']:.4f} ± {_num(v.get('kl_sem'), '.4f')}",
            "-" if ref else f"{100 * v['top1']:.2f}% ± {_num(v.get('top1_sem'), '.2f', 100)}",
            f"{v['ppl']:.3f}",
            "-" if ref else f"{100 * v['ppl_rel_change']:+.2f}% "
                            f"{_ci(v.get('ppl_rel_change_ci'))}",
            _mib(v["resident_weight_bytes"]),
            _mib(v["checkpoint_bytes"]),
            f"{v['wall_time_s']:.1f} s",
        ])
    return rows


_HEADER = ["variant", "KL (nats) ± SE", "top-1 agree ± SE", "ppl", "ppl change [95% CI]",
           "Linear weights", "checkpoint", "forward time"]


def _uncertainty_note(summary: dict) -> str:
    u = summary.get("uncertainty") or {}
    return (f"± one standard error over blocks of {u.get('block_tokens', '?')} consecutive "
            f"scored tokens ({u.get('blocks', '?')} blocks); [95% CI]: bootstrap over the same "
            f"blocks ({u.get('bootstrap_resamples', '?')} resamples, seed "
            f"{u.get('bootstrap_seed', '?')}), paired with the reference token by token")


def _strip(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if not k.startswith("_")}


def to_json(summary: dict) -> str:
    """The summary as indented JSON (private keys such as ``_kl_values`` dropped)."""
    return json.dumps(_strip(summary), indent=2, allow_nan=False)


def _caption(summary: dict) -> str:
    t, m = summary["text"], summary["model"]
    return (f"{m['name']} ({m['dtype']}), {summary['scored_tokens']} scored tokens of {t['name']} "
            f"(Python {t['python_version']}, sha256 {t['sha256'][:12]}), "
            f"{summary['window']}-token windows, {summary['machine']['threads']} threads")


def print_table(summary: dict, console=None) -> None:
    """The variants table on the terminal (rich), the verdict below it."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    console.width = max(console.width, 150)
    table = Table(title="finefp8 eval: " + _caption(summary), title_justify="left",
                  caption=_uncertainty_note(summary), caption_justify="left")
    for i, col in enumerate(_HEADER):
        table.add_column(col, justify="left" if i == 0 else "right")
    for row in _rows(summary):
        table.add_row(*row)
    console.print(table)
    text = verdict(summary)
    if text:
        console.print(text.replace("**", ""), highlight=False)


# ----------------------------------------------------------------------------- verdict


def _variants_with_layers(summary: dict) -> list[dict]:
    return [v for v in summary["variants"] if v["layers"]]


def _short(name: str) -> str:
    """``model.layers.3.self_attn.q_proj`` -> ``layers.3.self_attn.q_proj`` (from the first
    numbered component's parent on)."""
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p.isdigit() and i > 0:
            return ".".join(parts[i - 1:])
    return name


def shipped_variant(summary: dict) -> dict | None:
    """The variant to ship: the lowest mean KL among those that store FP8 weights (their
    converted layers take less than half the reference's bytes); ``None`` if there is none."""
    fp8 = _fp8_weight_variants(summary)
    return fp8[0] if fp8 else None


def _fp8_weight_variants(summary: dict) -> list[dict]:
    """The variants whose converted layers take less than half the reference's bytes (FP8
    weights), lowest mean KL first."""
    ref = summary["variants"][0]["resident_weight_bytes"]
    return sorted((v for v in summary["variants"] if v["key"] != "reference"
                   and v["resident_weight_bytes"] < 0.5 * ref), key=lambda v: v["kl"])


def _worst_layers(v: dict, n: int = 8) -> list[dict]:
    rows = [r for r in v["layers"] if r["out_snr_db"] is not None]
    return sorted(rows, key=lambda r: r["out_snr_db"])[:n]


def verdict(summary: dict) -> str:
    """The report's first paragraph (Markdown bold marks): which variant to ship, its KL and
    perplexity change with their uncertainty, how it compares with the baseline, which layers
    hurt most. Empty when no variant stores FP8 weights."""
    ship = shipped_variant(summary)
    if ship is None:
        return ""
    ref = summary["variants"][0]
    parts = [
        f"**Ship {ship['label']}** (`{ship['key']}`): mean KL divergence from the reference "
        f"{ship['kl']:.4f} ± {_num(ship.get('kl_sem'), '.4f')} nats (± one standard error), "
        f"perplexity {100 * ship['ppl_rel_change']:+.2f}% (95% CI "
        f"{_ci(ship.get('ppl_rel_change_ci'))}%), top-1 agreement {100 * ship['top1']:.2f}%, "
        f"{_mib(ship['resident_weight_bytes'])} of Linear weights instead of "
        f"{_mib(ref['resident_weight_bytes'])}."
    ]
    vs = ship.get("vs_baseline")
    if vs and vs.get("kl_diff_sem") is not None:
        base = next(v for v in summary["variants"] if v["key"] == vs["baseline"])
        lo, hi = vs["ppl_ratio_ci"]
        sig = abs(vs["kl_diff"]) > _Z95 * vs["kl_diff_sem"]
        ppl_sig = lo is not None and (lo > 0 or hi < 0)
        parts.append(
            f"Against {base['label']} on the same tokens: KL {vs['kl_diff']:+.4f} ± "
            f"{vs['kl_diff_sem']:.4f} nats ({'beyond' if sig else 'within'} the noise), "
            f"perplexity {_ci(vs['ppl_ratio_ci'])}% "
            f"({'beyond' if ppl_sig else 'within'} the noise).")
    others = _fp8_weight_variants(summary)[1:]
    if others:
        nxt = others[0]
        parts.append(f"Runner-up among the FP8-weight variants: {nxt['label']}, KL "
                     f"{nxt['kl']:.4f} ± {_num(nxt.get('kl_sem'), '.4f')}.")
    worst = _worst_layers(ship, 3)
    if worst:
        names = ", ".join(f"`{_short(r['name'])}` ({r['out_snr_db']:.1f} dB)" for r in worst)
        parts.append(f"The layers that hurt most (lowest output SNR): {names}.")
    return " ".join(parts)


# ----------------------------------------------------------------------------- plots


def layer_grid(names: list[str]) -> tuple[list[str], list[str], list[tuple[int, int]]]:
    """Place module names on a (projection, layer) grid.

    The layer is the first all-digit component of the name (``model.layers.3.mlp.up_proj`` ->
    3), the projection what follows it (``mlp.up_proj``); a name with no number gets the row
    ``name`` and a column of its own at the end, labelled ``-``. Returns ``(rows, columns,
    cells)``: projection labels in order of first appearance, layer labels in numeric order,
    and each name's ``(row, column)``.
    """
    keys = []
    for n in names:
        m = re.search(r"(?:^|\.)(\d+)\.(.+)$", n)
        keys.append((int(m.group(1)), m.group(2)) if m else (None, n))
    rows = list(dict.fromkeys(p for _, p in keys))
    layers = sorted({i for i, _ in keys if i is not None})
    columns = [str(i) for i in layers] + (["-"] if any(i is None for i, _ in keys) else [])
    col = {i: c for c, i in enumerate(layers)}
    cells = [(rows.index(p), col[i] if i is not None else len(layers)) for i, p in keys]
    return rows, columns, cells


def _grid_values(v: dict, field: str):
    """``[projections, layers]`` array of ``field`` per layer (NaN where missing)."""
    import numpy as np

    rows, cols, cells = layer_grid([r["name"] for r in v["layers"]])
    grid = np.full((len(rows), len(cols)), np.nan)
    for (i, j), r in zip(cells, v["layers"], strict=True):
        if r.get(field) is not None:
            grid[i, j] = r[field]
    return rows, cols, grid


def _heatmap(ax, rows: list[str], cols: list[str], grid, title: str, norm, cmap):
    """One panel: ``grid [projections, layers]``, projections down, layer index across; a
    layer without that projection (NaN) is light grey."""
    import matplotlib
    import numpy as np

    colours = matplotlib.colormaps[cmap].with_extremes(bad="#e6e6e6")
    im = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", norm=norm, cmap=colours,
                   interpolation="nearest")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(rows, fontsize=7)
    step = max(1, len(cols) // 32)
    ax.set_xticks(range(0, len(cols), step))
    ax.set_xticklabels(cols[::step], fontsize=7)
    ax.set_title(title, fontsize=9, loc="left")
    return im


def _snr_norm(values):
    """A shared colour scale for SNR panels: the 2nd..98th percentile of ``values``."""
    import numpy as np
    from matplotlib.colors import Normalize

    arr = np.asarray([x for x in values if x is not None and math.isfinite(x)])
    if arr.size == 0:
        return Normalize(0.0, 1.0)
    lo, hi = np.percentile(arr, [2, 98])
    return Normalize(lo, hi if hi > lo else lo + 1.0)


def _layer_figure(n_panels: int, n_rows: int):
    import matplotlib.pyplot as plt

    height = max(1.1, 0.22 * n_rows + 0.55)
    return plt.subplots(n_panels, 1, figsize=(12, 0.6 + height * n_panels), squeeze=False,
                        sharex=True, layout="constrained")


def _plot_layer_error(summary: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    vs = _variants_with_layers(summary)
    norm = _snr_norm([r["out_snr_db"] for v in vs for r in v["layers"]])
    rows, _, _ = layer_grid([r["name"] for r in vs[0]["layers"]])
    fig, axes = _layer_figure(len(vs), len(rows))
    for ax, v in zip(axes[:, 0], vs, strict=True):
        mean = [r["out_snr_db"] for r in v["layers"] if r["out_snr_db"] is not None]
        label = f"{v['label']}  (mean {sum(mean) / len(mean):.1f} dB)" if mean else v["label"]
        im = _heatmap(ax, *_grid_values(v, "out_snr_db"), label, norm, "RdYlGn")
    axes[-1, 0].set_xlabel("layer index")
    fig.colorbar(im, ax=axes[:, 0], shrink=0.6, pad=0.01,
                 label="layer output SNR, dB (red: worse)")
    fig.suptitle("Output SNR of each FP8 layer on the reference's inputs, per variant",
                 x=0.01, ha="left")
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)


def _baseline(summary: dict) -> dict:
    """The variant the sources plot explains: the uncertainty baseline if it quantizes both
    weights and activations, else the first such variant, else the first with layers."""
    vs = _variants_with_layers(summary)
    both = [v for v in vs if any(r.get("weight_snr_db") is not None for r in v["layers"])
            and any(r.get("act_snr_db") is not None for r in v["layers"])]
    key = (summary.get("uncertainty") or {}).get("baseline")
    for v in both:
        if v["key"] == key:
            return v
    return both[0] if both else vs[0]


def _plot_sources(summary: dict, path: Path) -> None:
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import TwoSlopeNorm

    base = _baseline(summary)
    ship = shipped_variant(summary)
    def mean(field: str) -> str:
        xs = [r[field] for r in base["layers"] if r.get(field) is not None]
        return f" (mean {sum(xs) / len(xs):.1f} dB)" if xs else ""

    panels = [(base, "weight_snr_db",
               f"{base['label']}: weight quantization SNR{mean('weight_snr_db')}"),
              (base, "act_snr_db",
               f"{base['label']}: activation quantization SNR{mean('act_snr_db')}")]
    panels = [p for p in panels if any(r.get(p[1]) is not None for r in base["layers"])]
    norm = _snr_norm([r.get(f) for _, f, _ in panels for r in base["layers"]])
    rows, _, _ = layer_grid([r["name"] for r in base["layers"]])
    diff = ship is not None and ship["key"] != base["key"] and len(ship["layers"]) == len(
        base["layers"])
    fig, axes = _layer_figure(len(panels) + diff, len(rows))
    im = None
    for ax, (v, field, title) in zip(axes[:, 0], panels, strict=False):
        im = _heatmap(ax, *_grid_values(v, field), title, norm, "RdYlGn")
    if im is not None:
        fig.colorbar(im, ax=axes[:len(panels), 0], shrink=0.8, pad=0.01,
                     label="SNR, dB (red: worse)")
    if diff:
        rws, cls, a = _grid_values(ship, "out_snr_db")
        d = a - _grid_values(base, "out_snr_db")[2]
        # the colour range is the 98th percentile of |difference|, so one outlier layer does
        # not wash out the rest (values beyond it saturate)
        lim = float(np.nanpercentile(np.abs(d), 98)) if np.isfinite(d).any() else 1.0
        lim = max(lim, 1e-6)
        im2 = _heatmap(axes[-1, 0], rws, cls, d,
                       f"{ship['label']} minus {base['label']}: output SNR difference, mean "
                       f"{float(np.nanmean(d)):+.1f} dB (blue: {ship['label']} better)",
                       TwoSlopeNorm(0.0, -lim, lim), "RdBu")
        fig.colorbar(im2, ax=axes[-1, 0], shrink=0.8, pad=0.01, extend="both", label="dB")
    axes[-1, 0].set_xlabel("layer index")
    fig.suptitle("Where the error comes from", x=0.01, ha="left")
    fig.savefig(path, dpi=90, bbox_inches="tight")
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
    import numpy as np

    vs = [v for v in summary["variants"] if v["key"] != "reference"]
    labels = [v["label"] for v in vs]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.2))
    kl_err = [_Z95 * (v.get("kl_sem") or 0.0) for v in vs]
    a1.barh(labels, [v["kl"] for v in vs], xerr=kl_err, color="tab:blue", capsize=3)
    a1.set_xlabel("mean KL divergence from the reference, nats (lower is better)\n"
                  "error bars: ± 1.96 standard errors over token blocks")
    a1.invert_yaxis()
    chg = np.array([100 * v["ppl_rel_change"] for v in vs])
    ci = [v.get("ppl_rel_change_ci") or [None, None] for v in vs]
    lo = np.array([chg[i] - 100 * c[0] if c[0] is not None else 0.0 for i, c in enumerate(ci)])
    hi = np.array([100 * c[1] - chg[i] if c[1] is not None else 0.0 for i, c in enumerate(ci)])
    a2.barh(labels, chg, xerr=np.vstack([lo, hi]), color="tab:orange", capsize=3)
    a2.axvline(0.0, color="black", lw=0.8)
    a2.set_xlabel(f"perplexity change vs reference ({summary['variants'][0]['ppl']:.3f}), %\n"
                  "error bars: 95% bootstrap interval over token blocks")
    a2.invert_yaxis()
    a2.set_yticklabels([])
    for ax in (a1, a2):
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle("Accuracy by variant")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ----------------------------------------------------------------------------- documents


def _title(summary: dict) -> str:
    """``FP8 evaluation of NAME``; a model given as a file path is named by its file name."""
    name = summary["model"]["name"]
    if name.startswith(("/", "./", "../", "~")) or "\\" in name:
        name = Path(name).name
    return f"FP8 evaluation of {name}"


def _fp8_share(m: dict) -> str:
    """``", 8 MoE experts modules; 96.1% of parameters FP8"`` for a model with routed experts
    (``finefp8.eval.moe.parameter_counts``), ``""`` otherwise."""
    if not m.get("experts_modules"):
        return ""
    return (f" and {m['experts_modules']} MoE experts modules ({m['expert_parameters']:,} "
            f"expert parameters); {100 * m['fp8_parameter_share']:.1f}% of all parameters FP8")


def _run_details(summary: dict) -> list[str]:
    """The run's facts, one Markdown list item each."""
    t, m, mach = summary["text"], summary["model"], summary["machine"]
    lines = [
        f"- model: `{m['name']}` ({m['source']}, {m['dtype']}, {m['parameters']:,} parameters, "
        f"{m['fp8_layers']} Linear layers converted{_fp8_share(m)})",
        f"- text: `{t['name']}`, Python {t['python_version']}, sha256 `{t['sha256']}`, "
        f"{t['chars']:,} characters, {t['tokens_total']:,} tokens",
        f"- evaluation: first {summary['tokens']:,} tokens in {summary['windows']} windows of "
        f"{summary['window']} ({summary['scored_tokens']:,} scored next-token predictions)",
    ]
    if summary.get("calibration"):
        c = summary["calibration"]
        lines.append(f"- GPTQ calibration: {c['tokens']:,} tokens {c['first_token']:,}..."
                     f"{c['last_token']:,} of the text ({c['note']})")
        if c.get("uncalibrated"):
            lines.append(f"- GPTQ left {len(c['uncalibrated'])} expert matrices uncalibrated "
                         f"({c['uncalibrated_reason']}): "
                         f"{', '.join(_short(n) for n in c['uncalibrated'][:12])}"
                         f"{' ...' if len(c['uncalibrated']) > 12 else ''}")
    det = "on" if mach.get("deterministic_algorithms") else "off"
    lines += [
        f"- uncertainty: {_uncertainty_note(summary)}",
        f"- finefp8 {summary['finefp8_version']}, torch {mach['torch']}, {mach['threads']} "
        f"threads, deterministic algorithms {det}, total {summary['wall_time_s']:.0f} s",
    ]
    return lines


_MEASURES = ("KL is the mean per-token KL divergence of the variant's next-token distribution "
             "from the reference's (nats; the primary measure), top-1 agree the share of "
             "positions whose most likely token is the reference's. Linear weights: resident "
             "bytes of the converted layers; checkpoint: bytes the tensors of a checkpoint "
             "would take.")


def _comparison_rows(summary: dict) -> list[list[str]]:
    """Each variant against the baseline, paired on the same tokens."""
    rows = []
    for v in summary["variants"]:
        vs = v.get("vs_baseline")
        if not vs:
            continue
        rows.append([v["label"], f"{vs['kl_diff']:+.4f} ± {_num(vs['kl_diff_sem'], '.4f')}",
                     _ci(vs["ppl_ratio_ci"]) + "%"])
    return rows


def _baseline_label(summary: dict) -> str | None:
    key = (summary.get("uncertainty") or {}).get("baseline")
    return next((v["label"] for v in summary["variants"] if v["key"] == key), None)


def _markdown(summary: dict, images: dict[str, str]) -> str:
    """The report in Markdown; ``images`` maps plot file names to the link to use."""
    lines = [f"# {_title(summary)}", "", verdict(summary), "",
             "## Accuracy and memory by variant", "", _MEASURES + " " +
             _uncertainty_note(summary)[0].upper() + _uncertainty_note(summary)[1:] + ".", "",
             "| " + " | ".join(_HEADER) + " |",
             "|" + "|".join(["---"] + ["---:"] * (len(_HEADER) - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in _rows(summary)]
    comp = _comparison_rows(summary)
    if comp:
        lines += ["", f"## Each variant against {_baseline_label(summary)} on the same tokens",
                  "", "A difference larger than about two standard errors, or an interval "
                  "that excludes 0, is beyond the sampling noise of the text.", "",
                  "| variant | KL difference ± SE | ppl ratio change [95% CI] |",
                  "|---|---:|---:|"]
        lines += ["| " + " | ".join(r) + " |" for r in comp]
    for name, title in _PLOTS.items():
        lines += ["", f"## {title}", "", f"![{title}]({images[name]})"]
    lines += ["", "## Layers with the largest error", ""]
    for v in _variants_with_layers(summary):
        lines += [f"### {v['label']}", "",
                  "| layer | out SNR dB | out rel err | weight SNR dB | act SNR dB |",
                  "|---|---:|---:|---:|---:|"]
        for r in _worst_layers(v):
            lines.append(f"| {_layer_label(r)} | {_num(r['out_snr_db'], '.1f')} | "
                         f"{_num(r['out_rel_error'], '.4f')} | {_num(r['weight_snr_db'], '.1f')} | "
                         f"{_num(r['act_snr_db'], '.1f')} |")
        lines.append("")
    lines += ["## Run details", ""] + _run_details(summary)
    return "\n".join(lines)


def _layer_label(row: dict) -> str:
    """A per-layer row's name; an MoE expert group (``finefp8.eval.moe``) adds its expert count
    and its worst expert: ``...experts.down_proj (8 experts, worst: 3 at 28.7 dB)``."""
    if row.get("experts") is None or row.get("worst_expert") is None:
        return row["name"]
    return (f"{row['name']} ({row['experts']} experts, worst: {row['worst_expert']} at "
            f"{_num(row.get('worst_expert_out_snr_db'), '.1f')} dB)")


def _md_inline(text: str) -> str:
    """HTML of a line with Markdown ``**bold**`` and ``code`` marks (the rest escaped)."""
    out = html.escape(text)
    out = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", out)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", out)


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>"
                   for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _html(summary: dict, images: dict[str, str]) -> str:
    """A self-contained HTML page: verdict, tables, plots (``images``: data URIs), details."""
    parts = [f"<h1>{html.escape(_title(summary))}</h1>",
             f"<p class='verdict'>{_md_inline(verdict(summary))}</p>",
             "<h2>Accuracy and memory by variant</h2>",
             _html_table(_HEADER, _rows(summary)),
             f"<p class='note'>{html.escape(_MEASURES)} {html.escape(_uncertainty_note(summary))}"
             ".</p>"]
    comp = _comparison_rows(summary)
    if comp:
        parts += [f"<h2>Each variant against {html.escape(_baseline_label(summary))} on the "
                  "same tokens</h2>",
                  _html_table(["variant", "KL difference ± SE", "ppl ratio change [95% CI]"],
                              comp),
                  "<p class='note'>A difference larger than about two standard errors, or an "
                  "interval that excludes 0, is beyond the sampling noise of the text.</p>"]
    for name, title in _PLOTS.items():
        parts.append(f'<h2>{html.escape(title)}</h2><img src="{images[name]}" '
                     f'alt="{html.escape(title)}">')
    parts.append("<h2>Layers with the largest error</h2>")
    for v in _variants_with_layers(summary):
        parts += [f"<h3>{html.escape(v['label'])}</h3>",
                  _html_table(["layer", "out SNR dB", "weight SNR dB", "act SNR dB"],
                              [[_layer_label(r), _num(r["out_snr_db"], ".1f"),
                                _num(r["weight_snr_db"], ".1f"), _num(r["act_snr_db"], ".1f")]
                               for r in _worst_layers(v)])]
    items = "".join(f"<li>{_md_inline(line[2:])}</li>" for line in _run_details(summary))
    parts += ["<h2>Run details</h2>", f"<ul>{items}</ul>"]
    style = ("body{font-family:sans-serif;max-width:1180px;margin:1.2em auto;line-height:1.35}"
             "h1{margin:0 0 .4em}h2{margin:1.2em 0 .4em;font-size:1.2em}"
             ".verdict{font-size:1.08em;background:#f3f7ee;border-left:4px solid #5a8f29;"
             "padding:.6em .9em}.note{color:#555;font-size:.85em}"
             "table{border-collapse:collapse;font-size:.92em}td,th{border:1px solid #ccc;"
             "padding:3px 8px;text-align:right;white-space:nowrap}"
             "td:first-child,th:first-child{text-align:left}img{max-width:100%}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'>"
            f"<title>{html.escape(_title(summary))}</title><style>{style}</style></head><body>"
            + "".join(parts) + "</body></html>")


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
    _plot_metrics(summary, tmp["metrics_by_variant.png"])
    _plot_layer_error(summary, tmp["layer_error.png"])
    _plot_sources(summary, tmp["layer_error_sources.png"])
    _plot_histograms(summary, tmp["error_histograms.png"])
    tmp["summary.json"].write_text(to_json(summary) + "\n")
    tmp["report.md"].write_text(_markdown(summary, {n: n for n in _PLOTS}) + "\n")
    uris = {n: "data:image/png;base64," + base64.b64encode(tmp[n].read_bytes()).decode()
            for n in _PLOTS}
    tmp["report.html"].write_text(_html(summary, uris) + "\n")
    for name, path in tmp.items():
        path.replace(out / name)
    return out
