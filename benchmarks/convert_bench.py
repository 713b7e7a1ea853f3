"""Checkpoint conversion benchmark: ``finefp8 quantize`` / ``dequantize`` against a plain copy of
the same files and against the naive approach (load the whole state dict, convert, save).

Builds a synthetic BF16 checkpoint of ``--size-gb`` (default 8) in several shards with
DeepSeek-V3 shapes (MLP 18432 x 7168 and 7168 x 18432, MLA 576 x 7168, norms), then in the same
run measures, each as a child process (wall time, peak RSS = the child's VmHWM):

* plain copy of the shards (``shutil.copyfile`` + fsync): the disk's speed here;
* ``finefp8 quantize IN OUT`` and ``finefp8 dequantize OUT DEQ``;
* naive quantize / dequantize of ONE shard (``safetensors.torch.load_file`` of the whole shard,
  ``finefp8.quantize_blockwise`` per weight, ``save_file``): run on a subset to protect the
  shared machine; its memory grows with the shard, so it is reported per GB of input.

Prints a Markdown table with throughput ratios (vs the copy) and peak RSS against the bound
``2 x largest tensor + 500 MB``; ``--doc docs/checkpoints.md`` also writes the table between the
``convert-bench`` markers of that file. The synthetic files are deleted at the end (``--keep``
keeps them).

    python benchmarks/convert_bench.py --size-gb 8 --doc docs/checkpoints.md
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from finefp8.checkpoint.writer import ShardWriter

LAYER = [  # (name, shape) of one synthetic DeepSeek-V3-like layer, in BF16
    ("mlp.gate_proj.weight", (18432, 7168)),
    ("mlp.up_proj.weight", (18432, 7168)),
    ("mlp.down_proj.weight", (7168, 18432)),
    ("self_attn.kv_a_proj_with_mqa.weight", (576, 7168)),
    ("input_layernorm.weight", (7168,)),
]
MARK_START, MARK_END = "<!-- convert-bench:start -->", "<!-- convert-bench:end -->"


def build_checkpoint(root: Path, size_gb: float, shard_gb: float = 2.0, seed: int = 0) -> int:
    """Write the synthetic checkpoint (streaming, one tensor in memory); returns its bytes."""
    import json
    import math

    root.mkdir(parents=True, exist_ok=True)
    layer_bytes = sum(2 * math.prod(s) for _, s in LAYER)
    n_layers = max(1, math.ceil(size_gb * 1e9 / layer_bytes))
    per_shard = max(1, round(shard_gb * 1e9 / layer_bytes))
    n_shards = math.ceil(n_layers / per_shard)
    g = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for s in range(n_shards):
        name = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        layers = range(s * per_shard, min(n_layers, (s + 1) * per_shard))
        entries = [(f"model.layers.{i}.{k}", "BF16", shape) for i in layers for k, shape in LAYER]
        with ShardWriter(root / name, entries, {"format": "pt"}) as w:
            for key, _, shape in entries:
                t = (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)
                w.write(key, t)
                weight_map[key] = name
                total += t.numel() * 2
                del t
    (root / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (root / "config.json").write_text(json.dumps({"model_type": "deepseek_v3",
                                                  "hidden_size": 7168}, indent=2))
    return total


_HWM = """
import runpy, sys
out, kind, target = sys.argv[1], sys.argv[2], sys.argv[3]
sys.argv = [target] + sys.argv[4:]
try:
    if kind == "module":
        runpy.run_module(target, run_name="__main__")
    else:
        exec(compile(target, "<bench>", "exec"), {"__name__": "__main__"})
finally:
    with open("/proc/self/status") as f:
        hwm = next(line for line in f if line.startswith("VmHWM:"))
    with open(out, "w") as f:
        f.write(hwm.split()[1])
"""


def run_child(kind: str, target: str, args: list[str], scratch: Path) -> tuple[float, float]:
    """Run ``python -m target args`` (kind "module") or ``python -c target args`` (kind "code")
    in a child; returns (wall seconds, peak RSS in MB). The peak is the child's own ``VmHWM``
    (``ru_maxrss`` of a child also counts its parent's memory at fork), so with
    ``--workers > 1`` it covers the main process only."""
    hwm = scratch / "hwm.txt"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _HWM, str(hwm), kind, target, *args])
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"child failed ({proc.returncode}): {target} {' '.join(args)}")
    return wall, int(hwm.read_text()) / 1024


_COPY = """
import os, shutil, sys
src, dst = sys.argv[1], sys.argv[2]
os.makedirs(dst, exist_ok=True)
for name in sorted(os.listdir(src)):
    shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
    with open(os.path.join(dst, name), "rb+") as f:
        os.fsync(f.fileno())
"""

_NAIVE = """
import sys, torch, finefp8
from safetensors.torch import load_file, save_file
op, src, dst = sys.argv[1], sys.argv[2], sys.argv[3]
sd = load_file(src)
out = {}
for k, v in sd.items():
    if op == "quantize" and v.dim() == 2:
        out[k], out[k + "_scale_inv"] = finefp8.quantize_blockwise(v, name=k)
    elif op == "dequantize" and k.endswith("_scale_inv"):
        continue
    elif op == "dequantize" and v.dtype == torch.float8_e4m3fn:
        out[k] = finefp8.dequantize_blockwise(v, sd[k + "_scale_inv"], name=k)
    else:
        out[k] = v
save_file(out, dst, metadata={"format": "pt"})
"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gb", type=float, default=8.0, help="synthetic checkpoint size (8)")
    ap.add_argument("--shard-gb", type=float, default=2.0, help="shard size (2)")
    ap.add_argument("--dir", default="/tmp/finefp8-convert-bench", help="scratch directory")
    ap.add_argument("--workers", type=int, default=1, help="finefp8 --workers (1)")
    ap.add_argument("--doc", default=None, help="write the table into this Markdown file")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic files")
    args = ap.parse_args(argv)

    root = Path(args.dir)
    if root.exists():
        shutil.rmtree(root)
    src, copy, q, dq = root / "in", root / "copy", root / "fp8", root / "bf16"
    t0 = time.perf_counter()
    total = build_checkpoint(src, args.size_gb, args.shard_gb)
    shards = sorted(src.glob("*.safetensors"))
    print(f"built {total / 1e9:.2f} GB in {len(shards)} shards in {time.perf_counter() - t0:.0f} s",
          file=sys.stderr)
    largest = max(2 * 18432 * 7168, 0) / 2 ** 20
    bound = 2 * largest + 500
    rows = []
    try:
        wall, rss = run_child("code", _COPY, [str(src), str(copy)], root)
        copy_rate = total / wall
        rows.append(("plain copy (shutil.copyfile + fsync)", total, wall, rss, 1.0))
        shutil.rmtree(copy)
        wall, rss = run_child("module", "finefp8.cli", ["quantize", str(src), str(q), "--quiet",
                                                      "--workers", str(args.workers)], root)
        rows.append(("finefp8 quantize", total, wall, rss, total / wall / copy_rate))
        wall, rss = run_child("module", "finefp8.cli", ["dequantize", str(q), str(dq), "--quiet",
                                                      "--workers", str(args.workers)], root)
        rows.append(("finefp8 dequantize", total, wall, rss, total / wall / copy_rate))
        shutil.rmtree(dq)
        one = shards[0]
        one_bytes = one.stat().st_size
        wall, rss = run_child("code", _NAIVE, ["quantize", str(one), str(root / "naive_q.st")],
                              root)
        rows.append((f"naive quantize, 1 shard ({one_bytes / 1e9:.1f} GB)", one_bytes, wall, rss,
                     one_bytes / wall / copy_rate))
        qone = root / "naive_q.st"
        wall, rss = run_child("code", _NAIVE, ["dequantize", str(qone), str(root / "naive_d.st")],
                              root)
        rows.append((f"naive dequantize, 1 shard ({one_bytes / 1e9:.1f} GB)", one_bytes, wall, rss,
                     one_bytes / wall / copy_rate))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    given = argv if argv is not None else sys.argv[1:]
    cmd = "python benchmarks/convert_bench.py " + " ".join(given)
    lines = [
        f"Command: `{cmd}`  ",
        f"Machine: {os.cpu_count()} cores ({platform.processor() or platform.machine()}), "
        f"torch {torch.__version__}, shared with other jobs. Synthetic BF16 checkpoint: "
        f"{total / 1e9:.2f} GB in {len(shards)} shards (DeepSeek-V3 shapes 18432x7168, "
        f"7168x18432, 576x7168). Largest tensor {largest:.0f} MB, so the RSS bound "
        f"2 x largest + 500 MB is {bound:.0f} MB.",
        "",
        "Throughput counts the BF16 side of each conversion (what quantize reads, what dequantize "
        "writes), so every row compares with copying the same BF16 bytes.",
        "",
        "| run | BF16 GB | wall s | BF16 GB/s | vs plain copy | peak RSS MB | RSS MB per BF16 GB |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, nbytes, wall, rss, ratio in rows:
        lines.append(f"| {name} | {nbytes / 1e9:.2f} | {wall:.1f} | {nbytes / wall / 1e9:.3f} | "
                     f"{ratio:.2f}x | {rss:.0f} | {rss / (nbytes / 1e9):.0f} |")
    qrss = rows[1][3], rows[2][3]
    lines += ["", f"Peak RSS of finefp8 quantize / dequantize: {qrss[0]:.0f} / {qrss[1]:.0f} MB "
                  f"= {qrss[0] / bound:.2f} / {qrss[1] / bound:.2f} of the bound ({bound:.0f} MB)."]
    table = "\n".join(lines)
    print(table)
    if args.doc:
        doc = Path(args.doc)
        text = doc.read_text()
        if MARK_START not in text or MARK_END not in text:
            raise SystemExit(f"{doc} has no {MARK_START} ... {MARK_END} section")
        head, rest = text.split(MARK_START, 1)
        _, tail = rest.split(MARK_END, 1)
        doc.write_text(f"{head}{MARK_START}\n{table}\n{MARK_END}{tail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
