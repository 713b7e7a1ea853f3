"""FP8 quantization throughput on the CPU: ours against a naive torch reference and the copy bandwidth.

One run measures, on the same machine and in the same process:

* (a) the memory bandwidth of a large ``torch`` copy (bytes read + bytes written per second);
* (b) a naive torch reference, the way transformers and compressed-tensors quantize on a CPU:
  ``float()``, reshape into blocks / groups, ``abs().amax()``, divide, clamp, cast;
* (c) ours, ``finefp8.ops`` with ``backend="auto"`` (the fused C kernels when they build),
  and for information the pure-torch reference backend of ``finefp8.ops``;
* (d) unless ``--no-linear``: ``finefp8.ops.weight_only_linear`` (FP8 weight, 1 byte a
  parameter) against a bf16 ``F.linear`` on DeepSeek-V3 weight shapes at 1 and 16 tokens;
* (e) the compute rate of one core with the data in cache (the arithmetic bound of (c));

for block quantization of a 7168 x 18432 bf16 matrix (a DeepSeek-V3 MLP weight) and group
quantization of a 4096 x 7168 bf16 activation, and the matching dequantizations back to bf16.
Each timing is the best of ``--repeat`` runs (other processes share the machine: the best run
is the one least disturbed). Throughput is given as GB/s of input processed and as GB/s
moved (3 bytes per element: 2 bytes of bf16 + 1 byte of fp8); the ratios are ours / naive
and moved GB/s / copy bandwidth. Ours is checked to give the same codes and scales as the
naive reference (the same fp32 math) before it is timed.

    python benchmarks/quantize_bench.py [--repeat 5] [--small] [--no-linear]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable

import torch

from finefp8 import ops
from finefp8.kernels import cpu as cpu_kernels

FP8_MAX = 448.0
AMAX_FLOOR = 1e-10


def best_time(fn: Callable[[], object], repeat: int) -> float:
    """Best wall time of ``repeat`` calls of ``fn`` (seconds), after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def copy_bandwidth(repeat: int, nbytes: int = 1 << 29) -> tuple[float, float]:
    """GB/s of a large tensor copy, counting the bytes read and the bytes written.

    Returns ``(into_existing, into_fresh)``: the copy into a destination allocated once (the
    memory bandwidth), and ``src.clone()``, whose destination is new memory each time, as
    every op that returns a new tensor (ours and the naive reference) gets it: the operating
    system's page faults and page zeroing are then part of the time.
    """
    src = torch.empty(nbytes // 4, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    t = best_time(lambda: dst.copy_(src), repeat)
    t_fresh = best_time(lambda: src.clone(), repeat)
    return 2 * nbytes / t / 1e9, 2 * nbytes / t_fresh / 1e9


def naive_quantize_blocks(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Block quantization as transformers / compressed-tensors write it in torch (M, N % 128 == 0)."""
    m, n = w.shape
    x = w.float().reshape(m // block, block, n // block, block)
    amax = x.abs().amax(dim=(1, 3), keepdim=True).clamp(min=AMAX_FLOOR)
    scale = amax / FP8_MAX
    q = (x / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.reshape(m, n), scale.reshape(m // block, n // block)


def naive_quantize_groups(x: torch.Tensor, group: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token group quantization in torch (K % 128 == 0)."""
    t, k = x.shape
    g = x.float().reshape(t, k // group, group)
    scale = g.abs().amax(dim=-1, keepdim=True).clamp(min=AMAX_FLOOR) / FP8_MAX
    q = (g / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.reshape(t, k), scale.squeeze(-1)


def naive_dequantize_blocks(q: torch.Tensor, scale: torch.Tensor, block: int = 128) -> torch.Tensor:
    m, n = q.shape
    x = q.float().reshape(m // block, block, n // block, block) * scale[:, None, :, None]
    return x.reshape(m, n).to(torch.bfloat16)


def naive_dequantize_groups(q: torch.Tensor, scale: torch.Tensor, group: int = 128) -> torch.Tensor:
    t, k = q.shape
    return (q.float().reshape(t, k // group, group) * scale[..., None]).reshape(t, k).to(torch.bfloat16)


def same_result(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> bool:
    return torch.equal(a[0].view(torch.uint8), b[0].view(torch.uint8)) and torch.equal(a[1], b[1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per case (best is kept)")
    parser.add_argument("--small", action="store_true", help="1/8 of the shapes (a quick check)")
    parser.add_argument("--no-linear", action="store_true",
                        help="skip (d), the weight-only FP8 linear op against bf16 F.linear")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    div = 8 if args.small else 1
    wm, wn = 7168 // div, 18432 // div
    xt, xk = 4096 // div, 7168
    w = torch.randn(wm, wn, dtype=torch.bfloat16)
    x = torch.randn(xt, xk, dtype=torch.bfloat16) * torch.rand(xt, 1, dtype=torch.bfloat16) * 10

    ours_backend = ops.select_backend("quantize_blockwise", w.device, "auto")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.2f}")
    print(f"ours = finefp8.ops backend {ours_backend!r}"
          + (f" ({cpu_kernels.library_path()}; {cpu_kernels.instruction_set()})"
             if ours_backend == "cpu" else ""))
    print(f"best of {args.repeat} runs each\n")

    bw, bw_fresh = copy_bandwidth(args.repeat)
    print(f"(a) copy bandwidth (read + write): {bw:.1f} GB/s into an existing buffer; "
          f"{bw_fresh:.1f} GB/s into fresh memory (clone)\n")

    qw_ours = ops.quantize_blockwise(w)
    qw_naive = naive_quantize_blocks(w)
    if not same_result(qw_ours, qw_naive):
        raise SystemExit("block quantization: ours and the naive reference disagree")
    qx_ours = ops.quantize_groupwise(x)
    qx_naive = naive_quantize_groups(x)
    if not same_result(qx_ours, qx_naive):
        raise SystemExit("group quantization: ours and the naive reference disagree")

    cases = [
        (f"block quantize {wm}x{wn} bf16 -> e4m3, 128x128", w.numel(), 2,
         lambda: naive_quantize_blocks(w),
         lambda: ops.quantize_blockwise(w, backend="reference"),
         lambda: ops.quantize_blockwise(w)),
        (f"group quantize {xt}x{xk} bf16 -> e4m3, 1x128", x.numel(), 2,
         lambda: naive_quantize_groups(x),
         lambda: ops.quantize_groupwise(x, backend="reference"),
         lambda: ops.quantize_groupwise(x)),
        (f"block dequantize {wm}x{wn} e4m3 -> bf16", w.numel(), 1,
         lambda: naive_dequantize_blocks(*qw_ours),
         lambda: ops.dequantize_blockwise(*qw_ours, backend="reference"),
         lambda: ops.dequantize_blockwise(*qw_ours)),
        (f"group dequantize {xt}x{xk} e4m3 -> bf16", x.numel(), 1,
         lambda: naive_dequantize_groups(*qx_ours),
         lambda: ops.dequantize_groupwise(*qx_ours, backend="reference"),
         lambda: ops.dequantize_groupwise(*qx_ours)),
    ]
    header = (f"{'case':48s} {'naive ms':>9s} {'ref ms':>8s} {'ours ms':>8s} {'ours in GB/s':>12s} "
              f"{'moved GB/s':>10s} {'ours/naive':>10s} {'ours/copy':>9s} {'ours/clone':>10s}")
    print(header)
    print("-" * len(header))
    for label, numel, in_bytes, naive, reference, ours in cases:
        t_naive = best_time(naive, args.repeat)
        t_ref = best_time(reference, args.repeat)
        t_ours = best_time(ours, args.repeat)
        moved = 3 * numel / t_ours / 1e9
        print(f"{label:48s} {t_naive * 1e3:9.1f} {t_ref * 1e3:8.1f} {t_ours * 1e3:8.1f} "
              f"{in_bytes * numel / t_ours / 1e9:12.2f} {moved:10.2f} {t_naive / t_ours:9.1f}x "
              f"{moved / bw:8.0%} {moved / bw_fresh:9.0%}")
    if ours_backend == "cpu":
        into_existing(w, x, bw, args.repeat)
    print("\nin GB/s: input bytes / time; moved: 3 bytes per element (bf16 + fp8) / time; "
          "ours/copy: moved GB/s / copy bandwidth; ours/clone: the same against the copy into fresh "
          "memory (targets: ours/naive >= 3x, ours/copy >= 40%)")
    if not args.no_linear:
        linear_table(args.repeat, div)
    compute_rates(args.repeat)


def into_existing(w: torch.Tensor, x: torch.Tensor, bw: float, repeat: int) -> None:
    """(c') ours writing into outputs allocated once, like the copy in (a): like for like."""
    for label, fn, t in (
        ("block quantize, into existing outputs", cpu_kernels.quantize_blockwise, w),
        ("group quantize, into existing outputs", cpu_kernels.quantize_groupwise, x),
    ):
        out = tuple(r.view(torch.uint8) if r.dtype == torch.float8_e4m3fn else r for r in fn(t))
        t_ours = best_time(lambda fn=fn, t=t, out=out: fn(t, out=out), repeat)
        moved = 3 * t.numel() / t_ours / 1e9
        print(f"{label:48s} {'':9s} {'':8s} {t_ours * 1e3:8.1f} {2 * t.numel() / t_ours / 1e9:12.2f} "
              f"{moved:10.2f} {'':10s} {moved / bw:8.0%}")


def compute_rates(repeat: int) -> None:
    """(e) what one core computes with the data in cache: the arithmetic bound of (c).

    One thread, a 128 x 4096 bf16 strip (1 MiB, rewritten into the same output each time);
    the E4M3 cast alone on 256 Ki fp32 values (no division, no amax).
    """
    if ops.select_backend("quantize_blockwise", torch.device("cpu")) != "cpu":
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        strip = torch.randn(128, 4096).to(torch.bfloat16)
        vals = torch.randn(1 << 18) * 100
        rows = [
            ("block quantize (amax pass + divide + cast)", strip.numel(),
             lambda: ops.quantize_blockwise(strip)),
            ("block quantize, ue8m0 (amax + multiply + cast)", strip.numel(),
             lambda: ops.quantize_blockwise(strip, scale_fmt="ue8m0")),
            ("group quantize (amax + divide + cast)", strip.numel(),
             lambda: ops.quantize_groupwise(strip)),
            ("fp32 -> e4m3 cast alone", vals.numel(), lambda: cpu_kernels.cast_e4m3(vals)),
        ]
        print("\n(e) one core, data in cache (G elements/s; ns per element)")
        for label, numel, fn in rows:
            t = best_time(fn, max(repeat, 20))
            print(f"{label:48s} {numel / t / 1e9:6.2f} G/s {t / numel * 1e9:6.2f} ns")
    finally:
        torch.set_num_threads(threads)


def linear_table(repeat: int, div: int) -> None:
    """(d) the op behind weight-only FP8Linear against a bf16 ``F.linear`` on the same weights.

    DeepSeek-V3 weight shapes ``[out, in]``; activations bf16; the FP8 weight is read at one
    byte per parameter (plus the fp32 block scales). Targets (issue 5): fp8 / bf16 time
    <= 1.0 at 1 token, <= 1.5 at 16 tokens.
    """
    print(f"\n(d) weight-only FP8 linear (finefp8.ops.weight_only_linear, backend "
          f"{ops.select_backend('weight_only_linear', torch.device('cpu'))!r}) vs bf16 F.linear")
    header = f"{'weight [out, in]':18s} {'tokens':>6s} {'bf16 ms':>8s} {'fp8 ms':>8s} {'fp8/bf16':>8s}"
    print(header)
    print("-" * len(header))
    g = torch.Generator().manual_seed(1)
    for out_f, in_f in ((18432, 7168), (7168, 18432), (2112, 7168)):
        out_f //= div
        w = torch.randn(out_f, in_f, generator=g).to(torch.bfloat16)
        q, s = ops.quantize_blockwise(w)
        for tokens in (1, 16):
            x = torch.randn(tokens, in_f, generator=g).to(torch.bfloat16)
            t_bf16 = best_time(lambda x=x, w=w: torch.nn.functional.linear(x, w), repeat)
            t_fp8 = best_time(lambda x=x, q=q, s=s: ops.weight_only_linear(x, q, s), repeat)
            print(f"{f'{out_f} x {in_f}':18s} {tokens:6d} {t_bf16 * 1e3:8.1f} {t_fp8 * 1e3:8.1f} "
                  f"{t_fp8 / t_bf16:8.2f}")


if __name__ == "__main__":
    main()
