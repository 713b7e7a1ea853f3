"""FP8Linear forward on the CPU against nn.Linear in bf16 and fp32, DeepSeek-V3 shapes.

For each weight shape ``[out, in]`` and each token count, one run times, in the same process:

* ``nn.Linear`` fp32 (fp32 input) and ``nn.Linear`` bf16 (bf16 input): the baselines;
* ``FP8Linear`` ``weight_only`` with a bf16 input and with an fp32 input
  (``finefp8.ops.weight_only_linear``: the fused CPU kernel when it builds);
* ``FP8Linear`` ``w8a8`` with a bf16 input: per-token 1x128 activation quantization plus the
  block-scaled GEMM, which on a CPU is an exact emulation of the FP8 tensor-core math;

and reports the best of ``--repeat`` runs, the variants interleaved round by round so that a
burst of load from other processes hits the baseline and the variants alike (the best run is
the least disturbed one), the ratio of each variant's time to bf16 and to fp32 ``nn.Linear`` (> 1:
slower), and the resident bytes each variant holds for its weight (parameters + buffers: 4,
2, and 1 byte a parameter plus the fp32 block scales). Targets: at 1 token weight-only FP8 at
least as fast as bf16 (ratio <= 1), at 16 tokens within 1.5x.

    python benchmarks/linear_bench.py [--tokens 1 16 512] [--shapes 7168x18432 ...] [--repeat 5]
        [--threads N] [--clock wall|cpu]

The first line printed names the CPU's vector extensions and the paths compiled into the
kernel library (``FINEFP8_CPU_ARCH=avx2`` builds the AVX2 paths only; with
``ONEDNN_MAX_CPU_ISA=AVX2`` oneDNN's bf16 GEMM is held to AVX2 as well: an AVX2 machine's view).
``--clock cpu`` measures the process's CPU time instead of wall time (meaningful with
``--threads 1`` on a loaded machine, where wall time mostly measures the other processes).
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import time
from collections.abc import Callable

import torch
from torch import nn

from finefp8.kernels import cpu_build
from finefp8.nn import FP8Config, FP8Linear, resident_bytes

#: ``[out, in]`` weights of DeepSeek-V3: the dense MLP's down projection, its gate/up
#: projections, and the fused q_a/kv_a projection of MLA (1536 + 576 = 2112 rows).
DEFAULT_SHAPES = ("7168x18432", "18432x7168", "2112x7168")
DEFAULT_TOKENS = (1, 16, 512)
BASELINE = "nn.Linear bf16"
BASELINE_FP32 = "nn.Linear fp32"


def cpu_flags() -> str:
    """The CPU's vector extensions that matter here, from /proc/cpuinfo (``"unknown"`` elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            line = next((ln for ln in f if ln.startswith(("flags", "Features"))), "")
    except OSError:
        return "unknown"
    have = set(line.split(":", 1)[-1].split())
    wanted = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_bf16", "amx_bf16", "asimd")
    return " ".join(f for f in wanted if f in have) or "none of avx2/avx512"


def interleaved_best(fns: list[Callable[[], object]], repeat: int,
                     clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Best time (seconds) of each of ``fns`` over ``repeat`` rounds; every round runs each
    function once, in order, after one warm-up call of each."""
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(repeat):
        for i, fn in enumerate(fns):
            t0 = clock()
            fn()
            best[i] = min(best[i], clock() - t0)
    return best


def parse_shape(s: str) -> tuple[int, int]:
    """``"7168x18432"`` -> ``(7168, 18432)`` (out, in)."""
    try:
        out, inp = (int(v) for v in s.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {s!r}: expected OUTxIN, e.g. 7168x18432") from None
    return out, inp


def variants(out_f: int, in_f: int) -> list[tuple[str, nn.Module, torch.dtype]]:
    """``(name, module, input dtype)`` for every variant of one weight shape."""
    torch.manual_seed(0)
    ref = nn.Linear(in_f, out_f, bias=False)
    with torch.no_grad():
        ref.weight.normal_(0, in_f ** -0.5)
    bf16 = nn.Linear(in_f, out_f, bias=False, dtype=torch.bfloat16)
    with torch.no_grad():
        bf16.weight.copy_(ref.weight)
    wo = FP8Linear.from_linear(ref, FP8Config(mode="weight_only"))
    w8a8 = FP8Linear.from_quantized(wo.weight, wo.weight_scale_inv, None, FP8Config())
    return [
        (BASELINE_FP32, ref, torch.float32),
        (BASELINE, bf16, torch.bfloat16),
        ("FP8 weight_only (bf16 x)", wo, torch.bfloat16),
        ("FP8 weight_only (fp32 x)", wo, torch.float32),
        ("FP8 w8a8 (bf16 x)", w8a8, torch.bfloat16),
    ]


def run(shapes: list[tuple[int, int]], tokens: list[int], repeat: int,
        w8a8_max_tokens: int, clock: Callable[[], float] = time.perf_counter) -> list[dict]:
    """Time every variant, interleaved; one dict per (shape, tokens, variant)."""
    rows = []
    for out_f, in_f in shapes:
        vs = variants(out_f, in_f)
        for m in tokens:
            x32 = torch.randn(m, in_f)
            chosen = [(name, mod, x32.to(dtype)) for name, mod, dtype in vs
                      if not ("w8a8" in name and m > w8a8_max_tokens)]
            fns = [lambda mod=mod, x=x: mod(x) for _, mod, x in chosen]
            with torch.inference_mode():
                times = interleaved_best(fns, repeat if m < 512 else max(2, repeat // 2), clock)
            by_name = {name: t for (name, _, _), t in zip(chosen, times, strict=True)}
            base, base32 = by_name.get(BASELINE), by_name.get(BASELINE_FP32)
            for (name, mod, _), t in zip(chosen, times, strict=True):
                rows.append({"shape": f"{out_f}x{in_f}", "tokens": m, "variant": name,
                             "ms": t * 1e3, "vs_bf16": t / base if base else float("nan"),
                             "vs_fp32": t / base32 if base32 else float("nan"),
                             "bytes": resident_bytes(mod),
                             "bytes_per_param": resident_bytes(mod) / (out_f * in_f)})
        del vs
        gc.collect()
    return rows


def markdown(rows: list[dict]) -> str:
    """The results as a Markdown table."""
    lines = ["| weight [out, in] | tokens | variant | time (ms) | / bf16 nn.Linear | "
             "/ fp32 nn.Linear | resident weight MB | bytes / param |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['shape']} | {r['tokens']} | {r['variant']} | {r['ms']:.2f} | "
                     f"{r['vs_bf16']:.2f} | {r['vs_fp32']:.2f} | {r['bytes'] / 1e6:.1f} | "
                     f"{r['bytes_per_param']:.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", type=parse_shape,
                   default=[parse_shape(s) for s in DEFAULT_SHAPES], help="OUTxIN weight shapes")
    p.add_argument("--tokens", nargs="+", type=int, default=list(DEFAULT_TOKENS))
    p.add_argument("--repeat", type=int, default=5, help="timed runs per case (best is kept)")
    p.add_argument("--w8a8-max-tokens", type=int, default=512,
                   help="skip the (emulated, slow) w8a8 variant above this many tokens")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall time, or the process's CPU time (use with --threads 1)")
    p.add_argument("--markdown", metavar="FILE", help="also write the table as Markdown to FILE")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs, {args.clock} clock")
    print(f"CPU vector extensions: {cpu_flags()}; oneDNN ISA limit: "
          f"{os.environ.get('ONEDNN_MAX_CPU_ISA', 'none')}")
    print(f"fused CPU kernels: {cpu_build.instruction_set()} "
          f"(FINEFP8_CPU_ARCH={cpu_build.arch()})")
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    rows = run(args.shapes, args.tokens, args.repeat, args.w8a8_max_tokens, clock)
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"FP8Linear vs nn.Linear, CPU (best of runs, {args.clock} clock)")
    for col in ("weight [out, in]", "tokens", "variant", "ms", "/ bf16", "/ fp32", "MB", "B/param"):
        table.add_column(col, justify="left" if col in ("variant", "weight [out, in]") else "right",
                         no_wrap=True)
    for r in rows:
        table.add_row(r["shape"], str(r["tokens"]), r["variant"], f"{r['ms']:.2f}",
                      f"{r['vs_bf16']:.2f}", f"{r['vs_fp32']:.2f}", f"{r['bytes'] / 1e6:.1f}",
                      f"{r['bytes_per_param']:.4f}")
    Console(width=max(120, Console().width)).print(table)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(markdown(rows) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
