"""``finefp8 inspect``: what a checkpoint holds, whether it is sound, and at which tensor-parallel
degrees vLLM / SGLang would load it.

Per tensor: dtype, shape, role, block grid and scale min/max (FP8 weights), and the count of
NaN/Inf values (FP8 E4M3 NaN codes are 0x7F/0xFF; scales must be finite and > 0). Integrity
problems (the checkpoint is unsound): an FP8 weight without its scale or with a scale of the
wrong grid, an orphan scale, non-finite values or scales, non-power-of-two scales under
``scale_fmt: ue8m0``, an FP8 weight listed in ``modules_to_not_convert`` / ``ignore``, FP8 tensors
without a quantization_config or the reverse.

Tensor parallelism: for every block-FP8 weight (or, for an unquantized checkpoint, every weight
``quantize`` would convert: the verdict is then a prediction) and every requested degree,
``layout.tp_problems`` applies vLLM's ``validate_fp8_block_shape`` rules.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from .layout import (
    COMPRESSED_TENSORS,
    FP8,
    FP8_DTYPES,
    grid_of,
    module_of,
    scale_key,
    skip_reason,
    tp_problems,
)
from .reader import ST_ITEMSIZE, CheckpointReader, block_size_of, read_rows

__all__ = ["DEFAULT_TP", "inspect_checkpoint", "nonfinite_count", "print_report"]

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
        quantized = bool(fp8_weights)
        not_convert = set(qc.get("modules_to_not_convert") or []) | set(qc.get("ignore") or [])
        problems: list[str] = []
        if quantized and not qc:
            problems.append("FP8 weights but config.json has no quantization_config: serving "
                            "engines will not know how to load them")
        if qc and fmt in (FP8, COMPRESSED_TENSORS) and not quantized:
            problems.append(f"config.json declares quant_method {qc.get('quant_method')!r} but no "
                            f"tensor is FP8")
        scales = {scale_key(w, fmt) for w in fp8_weights} if fmt else set()
        ue8m0 = qc.get("scale_fmt") == "ue8m0"
        tensors, tp_targets = [], []
        for key in r.keys():
            info = r.info(key)
            row: dict = {"name": key, "dtype": info.dtype, "shape": list(info.shape),
                         "shard": info.shard}
            if key in fp8_weights:
                row["role"] = "fp8 weight"
                sk = scale_key(key, fmt)
                grid = grid_of(info.shape, bs) if len(info.shape) == 2 else None
                row["grid"] = list(grid) if grid else None
                if module_of(key) in not_convert:
                    problems.append(f"{key}: FP8 weight of a module listed as not converted")
                if sk not in r:
                    problems.append(f"{key}: FP8 weight without its scale {sk}")
                else:
                    s = r.get(sk).float()
                    row["scale"] = sk
                    row["scale_min"], row["scale_max"] = float(s.min()), float(s.max())
                    if grid is None or tuple(s.shape) != grid:
                        problems.append(f"{key}: scale {sk} has shape {list(s.shape)}, expected "
                                        f"{list(grid) if grid else '?'} for {bs[0]}x{bs[1]} blocks")
                    if not bool(torch.isfinite(s).all()) or not bool((s > 0).all()):
                        problems.append(f"{key}: scale {sk} has non-finite or non-positive values")
                    elif ue8m0 and not _is_pow2(s):
                        problems.append(f"{key}: scale_fmt is ue8m0 but {sk} has scales that are "
                                        f"not powers of two")
                tp_targets.append((key, info.shape))
            elif key in scales:
                row["role"] = "scale"
            elif fmt and key.endswith((".weight_scale_inv", ".weight_scale")):
                row["role"] = "scale"
                problems.append(f"{key}: scale without an FP8 weight")
            else:
                reason = skip_reason(key, info.shape, info.dtype)
                if not quantized and reason is None:
                    row["role"] = "would quantize"
                    tp_targets.append((key, info.shape))
                else:
                    row["role"] = "kept" + (f" ({reason})" if reason else "")
            if scan_values:
                bad = _scan(r, key)
                row["nonfinite"] = bad
                if bad:
                    problems.append(f"{key}: {bad} NaN/Inf values")
            tensors.append(row)

        tp_report = {}
        for d in tp:
            fails = [{"tensor": k, "reason": why} for k, shape in tp_targets
                     for why in tp_problems(k, shape, d, r.config, bs)]
            tp_report[int(d)] = {"ok": not fails, "predicted": not quantized, "problems": fails}
        counts = {"tensors": len(tensors), "fp8_weights": len(fp8_weights),
                  "shards": len(r.shards), "bytes": sum(r.nbytes(k) for k in r.keys())}
        return {"path": str(Path(path)), "format": fmt, "quantized": quantized,
                "quantization_config": qc or None, "block_size": list(bs), "tensors": tensors,
                "tp": tp_report, "problems": problems, "sound": not problems, "counts": counts}


def _fmt_scale(v: float | None) -> str:
    return "" if v is None else f"{v:.3g}"


def print_report(report: dict, console=None, max_problems: int = 20) -> None:
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
    tt = Table(title="tensor parallelism (vLLM / SGLang block-FP8 rules)"
               + (": prediction for the quantized checkpoint" if not report["quantized"] else ""))
    for col in ("tp", "verdict", "layers refused", "first refusal"):
        tt.add_column(col, overflow="fold")
    for d, v in report["tp"].items():
        first = (f"{v['problems'][0]['tensor']}: {v['problems'][0]['reason']}"
                 if v["problems"] else "")
        layers = len({p["tensor"] for p in v["problems"]})
        tt.add_row(str(d), "[green]ok" if v["ok"] else "[red]refused", str(layers), first)
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
