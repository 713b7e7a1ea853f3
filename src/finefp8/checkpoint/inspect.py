"""``finefp8 inspect``: what a checkpoint holds, whether it is sound, and at which tensor-parallel
degrees vLLM / SGLang would load it.

Per tensor: dtype, shape, role, block grid and scale min/max (FP8 weights), and the count of
NaN/Inf values (FP8 E4M3 NaN codes are 0x7F/0xFF; scales must be floating-point, finite and > 0). Integrity
problems (the checkpoint is unsound): an FP8 weight without its scale or with a scale of the
wrong grid, an orphan scale, non-finite values or scales, non-power-of-two scales under
``scale_fmt: ue8m0``, an FP8 weight listed in ``modules_to_not_convert`` / ``ignore``, FP8 tensors
without a quantization_config or the reverse.

Tensor parallelism: the Linear weights are grouped into the serving engine's layers (fused
q/k/v, gate/up, MLA's fused_qkv_a_proj, FusedMoE...) and, for every requested degree,
``serving.layer_outcome`` says what vLLM does with each layer holding FP8 weights (or, for an
unquantized checkpoint, the weights ``quantize`` would convert, in the default ``fp8`` layout:
the verdict is then a prediction): ok, refuses to load, loads and computes wrong, or cannot split
the layer at that degree. A layer with FP8 and high-precision parts is refused (one engine layer
has one quantization method).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from .errors import ConversionError
from .experts import expert_parameter_count, fp8_expert_stacks
from .layout import (
    COMPRESSED_TENSORS,
    FP8,
    FP8_DTYPES,
    grid_of,
    module_of,
    scale_key,
    skip_reason,
)
from .reader import ST_ITEMSIZE, CheckpointReader, block_size_of, read_rows
from .serving import ENGINE, OK, REFUSED, engine_layers, layer_outcome
from .validate import scale_problem

__all__ = ["DEFAULT_TP", "inspect_checkpoint", "nonfinite_count", "print_report", "tp_verdicts"]

DEFAULT_TP = (1, 2, 4, 8, 16)
_SCAN_BYTES = 64 * 1024 * 1024


def nonfinite_count(t: torch.Tensor) -> int:
    """Number of NaN/Inf values of ``t``; for FP8 codes, of NaN codes (E4M3: 0x7F/0xFF;
    E5M2: exponent all ones)."""
    if t.dtype == torch.float8_e4m3fn:
        return int(((t.view(torch.uint8) & 0x7F) == 0x7F).sum())
    if t.dtype == torch.float8_e5m2:
        return int(((t.view(torch.uint8) & 0x7F) >= 0x7C).sum())
    if t.dtype == torch.float8_e8m0fnu:
        return int((t.view(torch.uint8) == 0xFF).sum())
    if t.is_floating_point():
        return int((~torch.isfinite(t)).sum())
    return 0


def _scan(reader: CheckpointReader, key: str) -> int:
    """Non-finite count of ``key``, read in row ranges of at most ``_SCAN_BYTES``."""
    info = reader.info(key)
    if info.dtype not in ("F16", "BF16", "F32", "F64") + FP8_DTYPES + ("F8_E8M0",):
        return 0
    if len(info.shape) < 2:
        return nonfinite_count(read_rows(reader.root, info, 0, 0))
    row = ST_ITEMSIZE[info.dtype] * math.prod(info.shape[1:])
    step = max(1, _SCAN_BYTES // max(1, row))
    return sum(nonfinite_count(read_rows(reader.root, info, r, min(info.shape[0], r + step)))
               for r in range(0, info.shape[0], step))


def _is_pow2(s: torch.Tensor) -> bool:
    m, _ = torch.frexp(s.float())
    return bool((m == 0.5).all())


def tp_verdicts(fp8: Mapping[str, Sequence[int]], high_precision: Mapping[str, Sequence[int]],
                config: Mapping | None, tp: Sequence[int], layout: str,
                block: tuple[int, int] = (128, 128), predicted: bool = False) -> dict:
    """Per TP degree, what vLLM does with every engine layer holding an FP8 weight.

    ``fp8``: ``{key: shape}`` of the FP8 (or to-be-FP8) weights; ``high_precision``: the other
    Linear weights (they complete merged layers). Returns ``{degree: {"ok", "predicted",
    "layout", "engine", "layers": [{"layer", "engine_class", "modules", "outcome", "reason"}]
    (every layer that is not ok), "problems": [{"tensor", "layer", "outcome", "reason"}]
    (one per FP8 tensor of those layers)}}``.
    """
    shapes = {**{k: tuple(v) for k, v in high_precision.items()},
              **{k: tuple(v) for k, v in fp8.items()}}
    modules = {(module_of(k) if k.endswith(".weight") else k): k for k in shapes}
    layers = []
    for layer in engine_layers(shapes, config):
        keys = [modules[m] for m in layer.modules]
        q = [k for k in keys if k in fp8]
        if q:
            layers.append((layer, keys, q))
    report = {}
    for d in tp:
        bad_layers, problems = [], []
        for layer, keys, q in layers:
            if len(q) != len(keys):
                status = REFUSED
                why = (f"{layer.engine_class} {layer.name} mixes FP8 and high-precision parts "
                       f"({', '.join(k for k in keys if k not in fp8)} not FP8); the engine "
                       f"gives one layer one quantization method")
            else:
                o = layer_outcome(layer, int(d), layout, block)
                status, why = o.status, o.reason
            if status == OK:
                continue
            bad_layers.append({"layer": layer.name, "engine_class": layer.engine_class,
                               "modules": list(layer.modules), "outcome": status,
                               "reason": why})
            problems += [{"tensor": k, "layer": layer.name, "outcome": status, "reason": why}
                         for k in q]
        report[int(d)] = {"ok": not bad_layers, "predicted": predicted, "layout": layout,
                          "engine": ENGINE, "layers": bad_layers, "problems": problems}
    return report


def inspect_checkpoint(path: str | os.PathLike, tp: Sequence[int] = DEFAULT_TP,
                       scan_values: bool = True) -> dict:
    """Report on the checkpoint at ``path`` (see the module docstring).

    Returns a JSON-able dict: ``path``, ``format`` (``"fp8"``, ``"compressed-tensors"`` or
    ``None``), ``quantized`` (bool), ``tensors`` (list of per-tensor dicts), ``tp``
    (``{degree: {"ok": bool, "predicted": bool, "problems": [{"tensor", "reason"}]}}``),
    ``problems`` (integrity problems, list of str), ``sound`` (no integrity problem) and
    ``counts``. ``scan_values=False`` skips reading tensor data (headers and scales only).
    """
    with CheckpointReader(path) as r:
        fmt = r.format
        qc = r.config.get("quantization_config") or {}
        bs = block_size_of(r.config) if fmt else (128, 128)
        fp8_weights = set(r.quantized_weights())
        try:  # fused 3-D experts and their [E, ., .] scales (checkpoint/experts.py)
            stacks, stack_problem = fp8_expert_stacks({k: r.info(k) for k in r.keys()}, r.config,
                                                      fmt, bs, str(r.root)), None
        except ConversionError as e:
            stacks, stack_problem = {}, str(e)
        fp8_weights -= set(stacks)
        quantized = bool(fp8_weights or stacks)
        not_convert = set(qc.get("modules_to_not_convert") or []) | set(qc.get("ignore") or [])
        problems: list[str] = [stack_problem] if stack_problem else []
        if quantized and not qc:
            problems.append("FP8 weights but config.json has no quantization_config: serving "
                            "engines will not know how to load them")
        if qc and fmt in (FP8, COMPRESSED_TENSORS) and not quantized:
            problems.append(f"config.json declares quant_method {qc.get('quant_method')!r} but no "
                            f"tensor is FP8")
        scales = ({scale_key(w, fmt) for w in fp8_weights} if fmt else set()) | set(stacks.values())
        ue8m0 = qc.get("scale_fmt") == "ue8m0"
        linear_hp: dict[str, tuple[int, ...]] = {}  # high-precision Linear weights
        tensors, tp_targets = [], {}
        for key in r.keys():
            info = r.info(key)
            row: dict = {"name": key, "dtype": info.dtype, "shape": list(info.shape),
                         "shard": info.shard}
            if key in stacks:
                row["role"] = "fp8 expert stack"
                tp_targets[key] = info.shape  # judged as a FusedMoE layer (serving.py)
                row["scale"], row["grid"] = stacks[key], list(r.shape(stacks[key]))
                s = r.get(stacks[key]).float()
                row["scale_min"], row["scale_max"] = float(s.min()), float(s.max())
                if not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
                    problems.append(f"{key}: scale {stacks[key]} has non-finite or non-positive "
                                    f"values")
            elif key in fp8_weights:
                row["role"] = "fp8 weight"
                sk = scale_key(key, fmt)
                grid = grid_of(info.shape, bs) if len(info.shape) == 2 else None
                row["grid"] = list(grid) if grid else None
                if module_of(key) in not_convert:
                    problems.append(f"{key}: FP8 weight of a module listed as not converted")
                if sk not in r:
                    problems.append(f"{key}: FP8 weight without its scale {sk}")
                else:
                    raw = r.get(sk)
                    s = raw.float()
                    row["scale"] = sk
                    if s.numel():
                        row["scale_min"], row["scale_max"] = float(s.min()), float(s.max())
                    if grid is None or tuple(s.shape) != grid:
                        problems.append(f"{key}: scale {sk} has shape {list(s.shape)}, expected "
                                        f"{list(grid) if grid else '?'} for {bs[0]}x{bs[1]} blocks")
                    bad_scale = scale_problem(sk, raw)
                    if bad_scale is not None:
                        problems.append(f"{key}: {bad_scale}")
                    elif ue8m0 and not _is_pow2(s):
                        problems.append(f"{key}: scale_fmt is ue8m0 but {sk} has scales that are "
                                        f"not powers of two")
                tp_targets[key] = info.shape
            elif key in scales:
                row["role"] = "scale"
            elif fmt and key.endswith((".weight_scale_inv", ".weight_scale")):
                row["role"] = "scale"
                problems.append(f"{key}: scale without an FP8 weight")
            else:
                reason = skip_reason(key, info.shape, info.dtype)
                if reason is None:
                    linear_hp[key] = info.shape
                if not quantized and reason is None:
                    row["role"] = "would quantize"
                    tp_targets[key] = info.shape
                else:
                    row["role"] = "kept" + (f" ({reason})" if reason else "")
            if scan_values:
                bad = _scan(r, key)
                row["nonfinite"] = bad
                if bad:
                    problems.append(f"{key}: {bad} NaN/Inf values")
            tensors.append(row)

        tp_report = tp_verdicts(tp_targets, linear_hp, r.config, tp, fmt or FP8, bs,
                                predicted=not quantized)
        shapes = {k: r.shape(k) for k in r.keys()}
        counts = {"tensors": len(tensors), "fp8_weights": len(fp8_weights) + len(stacks),
                  "experts": expert_parameter_count(shapes, r.config),
                  "parameters": sum(math.prod(v) for k, v in shapes.items()
                                    if k not in scales and not k.endswith(".input_scale")),
                  "shards": len(r.shards), "bytes": sum(r.nbytes(k) for k in r.keys())}
        return {"path": str(Path(path)), "format": fmt, "quantized": quantized,
                "quantization_config": qc or None, "block_size": list(bs), "tensors": tensors,
                "tp": tp_report, "problems": problems, "sound": not problems, "counts": counts}


def _fmt_scale(v: float | None) -> str:
    return "" if v is None else f"{v:.3g}"


def print_report(report: dict, console=None, max_problems: int = 20, max_layers: int = 6) -> None:
    """Render ``inspect_checkpoint``'s report with rich: the tensor table, the TP verdicts and
    the problems."""
    from rich.console import Console
    from rich.table import Table

    if console is None:
        console = Console()
        console.width = max(console.width, 160)
    t = Table(title=f"{report['path']}  (format: {report['format'] or 'unquantized'}, "
                    f"{report['counts']['tensors']} tensors, {report['counts']['shards']} shards)")
    for col in ("tensor", "dtype", "shape", "role", "grid", "scale min", "scale max", "NaN/Inf"):
        t.add_column(col, overflow="fold", no_wrap=col in ("tensor", "shape", "dtype"))
    for row in report["tensors"]:
        grid = "x".join(map(str, row["grid"])) if row.get("grid") else ""
        bad = row.get("nonfinite")
        t.add_row(row["name"], row["dtype"], "x".join(map(str, row["shape"])) or "scalar",
                  row["role"], grid, _fmt_scale(row.get("scale_min")),
                  _fmt_scale(row.get("scale_max")),
                  "" if bad is None else ("[red]" + str(bad) if bad else "0"))
    console.print(t)
    ex, total = report["counts"].get("experts") or {}, report["counts"].get("parameters") or 0
    if ex.get("expert_params"):
        console.print(f"routed experts: {ex['experts']} per MoE layer, {ex['expert_params']:,} "
                      f"parameters ({ex['expert_params'] / max(total, 1):.1%} of "
                      f"{total:,}) in {ex['stacks']} fused 3-D stacks and "
                      f"{ex['per_expert_tensors']} per-expert tensors")
    first = next(iter(report["tp"].values()), None)
    tt = Table(title="tensor parallelism: what vLLM does with the FP8 layers"
               + (f" ({first['layout']} layout" if first else "")
               + (", prediction for the quantized checkpoint)" if not report["quantized"]
                  else ")" if first else ""),
               caption=f"rules of {first['engine']}" if first else None)
    for col in ("tp", "verdict", "layer", "outcome", "why"):
        tt.add_column(col, overflow="fold")
    for d, v in report["tp"].items():
        if v["ok"]:
            tt.add_row(str(d), "[green]ok", "", "", "")
            continue
        outcomes = sorted({x["outcome"] for x in v["layers"]})
        shown = v["layers"][:max_layers]
        for i, x in enumerate(shown):
            tt.add_row(str(d) if i == 0 else "", "[red]" + " / ".join(outcomes) if i == 0 else "",
                       x["layer"], x["outcome"], x["reason"])
        if len(v["layers"]) > len(shown):
            tt.add_row("", "", f"... and {len(v['layers']) - len(shown)} more layers (--json)",
                       "", "")
    console.print(tt)
    if report["problems"]:
        console.print(f"[red]{len(report['problems'])} problem(s):")
        for p in report["problems"][:max_problems]:
            console.print(f"  - {p}")
        if len(report["problems"]) > max_problems:
            console.print(f"  ... and {len(report['problems']) - max_problems} more (see --json)")
    else:
        console.print("[green]sound: every FP8 weight has a finite, positive scale of the right "
                      "grid; no NaN/Inf" + (" (values not scanned)" if "nonfinite" not in
                                             (report["tensors"] or [{}])[0] else ""))
