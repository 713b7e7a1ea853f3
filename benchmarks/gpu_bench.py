"""One-shot GPU benchmark of finefp8's FP8 kernels (one H100/H200, under 5 minutes).

    python benchmarks/gpu_bench.py [--out docs/gpu_bench.md] [--budget-s 240] [--reps 30]
    python benchmarks/gpu_bench.py --smoke --out /tmp/gpu_bench_smoke.md   # CPU check of the script

In order:

1. Correctness against finefp8's reference: ``act_quant`` / ``weight_quant`` /
   ``weight_dequant`` code for code and scale for scale (CPU reference), the Triton
   ``fp8_gemm`` and ``torch._scaled_mm`` block-wise against the reference GEMM
   (normwise relative error, fp32 output). Nothing is timed if a check fails.
2. GEMM ``C = A @ B.T`` with bf16 output on DeepGEMM's DeepSeek-V3 shapes, M in
   (64, 128, 4096) x (N, K) in (2112 x 7168, 24576 x 1536, 32768 x 512, 7168 x 16384,
   4096 x 7168, 7168 x 2048): our Triton ``fp8_gemm`` (autotuned; its tuning time is
   reported), ``torch._scaled_mm`` with 1x128 x 128x128 scales (cuBLAS, sm_90 only),
   and bf16 ``F.linear`` as the baseline; TFLOP/s and the ratio to bf16.
3. The grouped GEMM over experts (``finefp8.ops.grouped_fp8_gemm``, DeepGEMM's contiguous
   layout), checked against the reference first, then timed on DeepSeek-V3's routed experts:
   256 experts, 8 per token, (N, K) = (4096, 7168) (gate_up) and (7168, 2048) (down), tokens
   in (16, 256, 4096), tokens routed uniformly at random: the one-launch Triton kernel
   against a loop of one Triton ``fp8_gemm`` per non-empty expert and against bf16
   ``torch._grouped_mm`` on the same routing.
4. ``act_quant`` / ``weight_quant`` / ``weight_dequant`` GB/s (bytes read + written)
   against a device-to-device copy measured in the same run.

Timings: CUDA events around each call, the L2 cache flushed before each, the median of
``--reps`` runs after ``--warmup`` runs. Shapes not started within ``--budget-s`` seconds
(autotuning and warm-up included) are listed as skipped. The Markdown report goes to
``--out`` and to stdout.

``--grouped-only`` runs the checks and the grouped GEMM timings only.

``--smoke`` runs the same code on the CPU under Triton's interpreter with tiny shapes:
the correctness checks (codes within the interpreter's known fp8 cast defect, see
docs/gpu.md) and every GEMM / kernel call once; nothing is timed and the report says so.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

DEEPSEEK_NK = [(2112, 7168), (24576, 1536), (32768, 512), (7168, 16384), (4096, 7168), (7168, 2048)]
DEEPSEEK_M = [64, 128, 4096]
SMOKE_NK = [(96, 256), (64, 200)]
SMOKE_M = [1, 16]
GEMM_REL = 1e-3  # normwise bound for the GPU GEMMs (tensor-core accumulation inside a 128-block)
SMOKE_GEMM_REL = 1e-6  # the interpreter sums in fp32 with numpy
GROUPED_E, GROUPED_TOPK = 256, 8  # DeepSeek-V3: routed experts, experts per token
GROUPED_NK = [(4096, 7168), (7168, 2048)]  # gate_up [2I, H], down [H, I]
GROUPED_TOKENS = [16, 256, 4096]
SMOKE_GROUPED = (4, 2, [(96, 256), (64, 200)], [1, 5])  # experts, top-k, (N, K), tokens
SMOKE_DEFECT = 0.10  # the interpreter's fp32 -> fp8 cast: ~2-6% of codes, all of a known kind (docs/gpu.md)


@dataclass
class Report:
    """What the run found; rendered to Markdown by ``render``."""

    command: str
    device: str
    smoke: bool
    checks: list[tuple[str, str, str, str, bool]] = field(default_factory=list)
    gemm: list[dict] = field(default_factory=list)
    quant: list[dict] = field(default_factory=list)
    grouped: list[dict] = field(default_factory=list)
    copy_gbs: float | None = None
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    tune_seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(c[4] for c in self.checks)


# ----------------------------------------------------------------------------- timing


class Timer:
    """Median CUDA-event time of a call (ms), L2 flushed before each run; on the CPU: one call, no time."""

    def __init__(self, device: torch.device, warmup: int, reps: int):
        self.device, self.warmup, self.reps = device, warmup, reps
        self.flush = torch.empty(256 << 20, dtype=torch.uint8, device=device) if device.type == "cuda" else None

    def __call__(self, fn: Callable[[], object]) -> float | None:
        if self.flush is None:
            fn()  # --smoke: exercise the call, time nothing
            return None
        for _ in range(self.warmup):
            fn()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.reps)]
        for s, e in zip(starts, ends, strict=True):
            self.flush.zero_()
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize(self.device)
        return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- correctness


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.float().cpu(), want.float().cpu()
    return float((got - want).norm() / want.norm())


def sample(shape, g: torch.Generator, smoke: bool) -> torch.Tensor:
    """bf16 test data. ``smoke``: every value >= 1% of its group's amax, so no subnormal codes
    (the interpreter truncates those, see ``finefp8.kernels.interpreter``)."""
    x = torch.randn(shape, generator=g)
    if smoke:
        x = torch.sign(x) * (x.abs() + 0.05)
    return x.bfloat16()


def code_check(rep: Report, what: str, shape, y, want_q, q, same_scales: bool) -> None:
    """Record a code-for-code comparison; under the interpreter its known cast defect is set apart."""
    from finefp8.kernels.interpreter import cast_defect_mask

    q = q.cpu()
    differ = q.view(torch.uint8) != want_q.view(torch.uint8)
    defect = cast_defect_mask(y, want_q, q) if rep.smoke else torch.zeros_like(differ)
    other, frac = int((differ & ~defect).sum()), float(defect.float().mean())
    result = f"scales {'equal' if same_scales else 'DIFFER'}, {other} of {q.numel()} codes differ"
    if rep.smoke:
        result += f" (+{frac:.1%} interpreter cast defect)"
    bound = f"0 (+<= {SMOKE_DEFECT:.0%} defect)" if rep.smoke else "0"
    rep.checks.append((what, "x".join(map(str, shape)), result, bound,
                       same_scales and other == 0 and frac <= SMOKE_DEFECT))


def check_quant(rep: Report, device: torch.device) -> None:
    """Quantization kernels against the CPU reference: scales equal, codes equal."""
    from finefp8 import quantization as Q
    from finefp8.kernels.triton_quant import act_quant, weight_dequant, weight_quant

    g = torch.Generator().manual_seed(0)
    act_shapes = [(3, 5, 576), (1, 200)] + ([] if rep.smoke else [(4096, 7168)])
    w_shapes = [(200, 300)] + ([] if rep.smoke else [(576, 1536), (7168, 2048)])
    for shape in act_shapes:
        x = sample(shape, g, rep.smoke) * 3
        for fmt in ("fp32", "ue8m0"):
            q, s = act_quant(x.to(device), 128, fmt)
            wq, ws = Q.quantize_groupwise(x, 128, fmt)
            y = x.float() / ws.repeat_interleave(128, -1)[..., : shape[-1]]
            code_check(rep, f"act_quant {fmt}", shape, y, wq, q, torch.equal(s.cpu(), ws))
    for shape in w_shapes:
        w = sample(shape, g, rep.smoke) * 0.02
        q, s = weight_quant(w.to(device))
        wq, ws = Q.quantize_blockwise(w)
        y = w.float() / Q.expand_block_scales(ws, shape)
        code_check(rep, "weight_quant", shape, y, wq, q, torch.equal(s.cpu(), ws))
        dtype = torch.float32 if rep.smoke else torch.bfloat16  # the interpreter's bf16 store truncates
        d = weight_dequant(wq.to(device), ws.to(device), dtype=dtype)
        same = torch.equal(d.cpu(), Q.dequantize_blockwise(wq, ws, dtype=dtype))
        rep.checks.append((f"weight_dequant -> {str(dtype)[6:]}", "x".join(map(str, shape)),
                           "equal" if same else "DIFFER", "equal", same))


def check_gemm(rep: Report, device: torch.device) -> None:
    """Triton fp8_gemm and torch._scaled_mm against the reference GEMM (fp32 output)."""
    from finefp8 import gemm as G
    from finefp8 import quantization as Q
    from finefp8.kernels import GemmProblem, scaled_mm_blockwise_limit
    from finefp8.kernels.scaled_mm import fp8_gemm_scaled_mm
    from finefp8.kernels.triton_gemm import fp8_gemm

    g = torch.Generator().manual_seed(1)
    shapes = ([(1, 576, 200), (5, 96, 259)] if rep.smoke else
              [(1, 576, 200), (64, 2112, 7168), (130, 576, 1536), (4096, 7168, 2048)])
    bound = SMOKE_GEMM_REL if rep.smoke else GEMM_REL
    for m, n, k in shapes:
        a, sa = Q.quantize_groupwise(torch.randn(m, k, generator=g))
        b, sb = Q.quantize_blockwise(torch.randn(n, k, generator=g) * 0.05)
        ad, sad, bd, sbd = (t.to(device) for t in (a, sa, b, sb))
        want = G.fp8_gemm(ad, sad, bd, sbd, torch.float32)  # the reference, on the device (TF32 off)
        err = rel_err(fp8_gemm(ad, sad, bd, sbd, torch.float32), want)
        rep.checks.append(("Triton fp8_gemm", f"{m}x{n}x{k}", f"rel. error {err:.2e}", f"< {bound:.0e}",
                           err < bound))
        why = scaled_mm_blockwise_limit(device, GemmProblem(m, n, k))
        if why is None:
            err = rel_err(fp8_gemm_scaled_mm(ad, sad, bd, sbd, torch.float32), want)
            rep.checks.append(("torch._scaled_mm block-wise", f"{m}x{n}x{k}", f"rel. error {err:.2e}",
                               f"< {bound:.0e}", err < bound))
        elif (m, n, k) == shapes[-1]:
            rep.notes.append(f"torch._scaled_mm block-wise not checked or timed: {why}.")


def route(tokens: int, experts: int, topk: int, g: torch.Generator) -> torch.Tensor:
    """``offsets [E+1]`` int64 of ``tokens`` each sent to ``topk`` distinct experts, uniformly at random."""
    chosen = torch.rand(tokens, experts, generator=g).topk(topk, dim=1).indices
    counts = torch.bincount(chosen.flatten(), minlength=experts)
    return torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])


def check_grouped(rep: Report, device: torch.device) -> None:
    """The Triton grouped GEMM against the grouped reference (fp32 output), empty experts included."""
    from finefp8 import gemm as G
    from finefp8 import quantization as Q
    from finefp8.kernels.triton_grouped_gemm import grouped_fp8_gemm

    g = torch.Generator().manual_seed(2)
    cases = ([(5, 4, 2, 96, 200), (1, 4, 2, 64, 259)] if rep.smoke else
             [(1, 256, 8, 4096, 7168), (64, 32, 8, 4096, 7168), (200, 32, 8, 7168, 2048)])
    bound = SMOKE_GEMM_REL if rep.smoke else GEMM_REL
    for tokens, e, topk, n, k in cases:
        offsets = route(tokens, e, topk, g)
        m = int(offsets[-1])
        a, sa = Q.quantize_groupwise(torch.randn(m, k, generator=g))
        qs = [Q.quantize_blockwise(torch.randn(n, k, generator=g) * 0.05) for _ in range(e)]
        b, sb = torch.stack([q for q, _ in qs]), torch.stack([s for _, s in qs])
        ops_ = [t.to(device) for t in (a, sa, b, sb, offsets)]
        want = G.grouped_fp8_gemm(*ops_, torch.float32)
        err = rel_err(grouped_fp8_gemm(*ops_, torch.float32), want)
        rep.checks.append(("Triton grouped_fp8_gemm", f"{tokens} tok x top-{topk} of {e}, {n}x{k}",
                           f"rel. error {err:.2e}", f"< {bound:.0e}", err < bound))


# ----------------------------------------------------------------------------- timing runs


def expert_loop(a: torch.Tensor, sa: torch.Tensor, b: torch.Tensor, sb: torch.Tensor,
                busy: list[tuple[int, int, int]]) -> torch.Tensor:
    """The baseline: one Triton ``fp8_gemm`` per busy expert ``(e, row0, row1)``, bf16 ``[M, N]``."""
    from finefp8.kernels.triton_gemm import fp8_gemm

    out = torch.empty(a.shape[0], b.shape[1], device=a.device, dtype=torch.bfloat16)
    for i, r0, r1 in busy:
        out[r0:r1] = fp8_gemm(a[r0:r1], sa[r0:r1], b[i], sb[i], torch.bfloat16)
    return out


def time_grouped(rep: Report, device: torch.device, timer: Timer, budget_s: float, t0: float) -> None:
    """Grouped FP8 GEMM vs a per-expert loop of fp8_gemm vs bf16 torch._grouped_mm, same routing."""
    from finefp8.kernels.triton_grouped_gemm import grouped_fp8_gemm
    from finefp8.kernels.triton_quant import act_quant, weight_quant

    e, topk, nks, token_list = (SMOKE_GROUPED if rep.smoke else
                                (GROUPED_E, GROUPED_TOPK, GROUPED_NK, GROUPED_TOKENS))
    g = torch.Generator().manual_seed(3)
    for n, k in nks:
        if time.perf_counter() - t0 > budget_s:
            rep.grouped += [{"E": e, "topk": topk, "N": n, "K": k, "tokens": t, "skipped": "time budget"}
                            for t in token_list]
            continue
        w16 = torch.empty(e, n, k, device=device, dtype=torch.bfloat16)
        b = torch.empty(e, n, k, device=device, dtype=torch.float8_e4m3fn)
        sb = torch.empty(e, -(-n // 128), -(-k // 128), device=device, dtype=torch.float32)
        for i in range(e):
            w16[i].normal_(0, 0.02)
            b[i], sb[i] = weight_quant(w16[i], allow_nonfinite=True)
        for tokens in token_list:
            row = {"E": e, "topk": topk, "N": n, "K": k, "tokens": tokens}
            rep.grouped.append(row)
            if time.perf_counter() - t0 > budget_s:
                row["skipped"] = "time budget"
                continue
            offsets = route(tokens, e, topk, g).to(device)
            bounds = offsets.cpu().tolist()
            busy = [(i, bounds[i], bounds[i + 1]) for i in range(e) if bounds[i + 1] > bounds[i]]
            row["busy"] = len(busy)
            x = torch.randn(bounds[-1], k, device=device, dtype=torch.bfloat16)
            a, sa = act_quant(x, allow_nonfinite=True)
            loop = partial(expert_loop, a, sa, b, sb, busy)
            tune0 = time.perf_counter()
            grouped_fp8_gemm(a, sa, b, sb, offsets, torch.bfloat16)  # autotunes once per (BLOCK_M, N, K)
            loop()
            sync(device)
            if not rep.smoke:
                row["tune_s"] = time.perf_counter() - tune0
                rep.tune_seconds += row["tune_s"]
            row["grouped"] = timer(partial(grouped_fp8_gemm, a, sa, b, sb, offsets, torch.bfloat16))
            row["loop"] = timer(loop)
            ends = offsets[1:].to(torch.int32)
            try:
                row["bf16"] = timer(partial(torch._grouped_mm, x, w16.transpose(-2, -1), offs=ends))
            except RuntimeError as err:  # bf16 grouped GEMM missing on this GPU / torch build
                rep.notes.append(f"bf16 torch._grouped_mm not timed: {str(err).splitlines()[0]}")
            timed = [f"{key} {row[key]:.4f} ms" for key in ("grouped", "loop", "bf16") if row.get(key)]
            print(f"  grouped E={e} top-{topk} tokens={tokens} N={n} K={k}: "
                  f"{', '.join(timed) or 'ran once, not timed'}", flush=True)
        del w16, b, sb




def time_gemms(rep: Report, device: torch.device, timer: Timer, budget_s: float, t0: float) -> None:
    from finefp8.kernels import GemmProblem, scaled_mm_blockwise_limit
    from finefp8.kernels.scaled_mm import scaled_mm_scale_layouts
    from finefp8.kernels.triton_gemm import fp8_gemm
    from finefp8.kernels.triton_quant import act_quant, weight_quant

    nks = SMOKE_NK if rep.smoke else DEEPSEEK_NK
    ms = SMOKE_M if rep.smoke else DEEPSEEK_M
    for n, k in nks:
        w = torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02
        b, sb = weight_quant(w, allow_nonfinite=True)
        for m in ms:
            row = {"M": m, "N": n, "K": k}
            rep.gemm.append(row)
            if time.perf_counter() - t0 > budget_s:
                row["skipped"] = "time budget"
                continue
            x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
            a, sa = act_quant(x, allow_nonfinite=True)
            tune0 = time.perf_counter()
            fp8_gemm(a, sa, b, sb, torch.bfloat16)  # autotunes on the first call of a (M bucket, N, K)
            sync(device)
            if not rep.smoke:  # the interpreter does not autotune: that call is not tuning time
                row["tune_s"] = time.perf_counter() - tune0
                rep.tune_seconds += row["tune_s"]
            row["triton"] = timer(partial(fp8_gemm, a, sa, b, sb, torch.bfloat16))
            if scaled_mm_blockwise_limit(device, GemmProblem(m, n, k)) is None:
                la, lb = scaled_mm_scale_layouts(sa, sb)
                row["scaled_mm"] = timer(partial(torch._scaled_mm, a, b.t(), la, lb, out_dtype=torch.bfloat16))
            row["bf16"] = timer(partial(F.linear, x, w))
            timed = [f"{key} {row[key]:.4f} ms" for key in ("triton", "scaled_mm", "bf16") if row.get(key)]
            print(f"  gemm M={m} N={n} K={k}: {', '.join(timed) or 'ran once, not timed'}", flush=True)


def time_quant(rep: Report, device: torch.device, timer: Timer) -> None:
    from finefp8.kernels.triton_quant import act_quant, weight_dequant, weight_quant

    nbytes = (1 << 20) if rep.smoke else (1 << 30)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))
    rep.copy_gbs = None if ms is None else 2 * nbytes / ms / 1e6
    act = (64, 256) if rep.smoke else (4096, 7168)
    wt = (128, 384) if rep.smoke else (7168, 16384)
    x = torch.randn(act, device=device, dtype=torch.bfloat16)
    w = torch.randn(wt, device=device, dtype=torch.bfloat16) * 0.02
    q, s = weight_quant(w, allow_nonfinite=True)
    cases = [
        ("act_quant (bf16 -> e4m3 + fp32 scales)", act, lambda: act_quant(x, allow_nonfinite=True),
         3 * x.numel() + 4 * x.numel() // 128),
        ("weight_quant (bf16 -> e4m3 + fp32 scales)", wt, lambda: weight_quant(w, allow_nonfinite=True),
         3 * w.numel() + 4 * s.numel()),
        ("weight_dequant (e4m3 -> bf16)", wt, lambda: weight_dequant(q, s), 3 * q.numel() + 4 * s.numel()),
    ]
    for name, shape, fn, moved in cases:
        ms = timer(fn)
        rep.quant.append({"kernel": name, "shape": "x".join(map(str, shape)),
                          "gbs": None if ms is None else moved / ms / 1e6})


# ----------------------------------------------------------------------------- report


def _num(v: float | None, fmt: str) -> str:
    return "—" if v is None else format(v, fmt)


def render(rep: Report) -> str:
    lines = [f"# FP8 kernels: {rep.device}", "",
             f"Produced by `{rep.command}` on {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC "
             f"(torch {torch.__version__}, triton {_triton_version()}, CUDA {torch.version.cuda}, "
             f"Python {platform.python_version()}); {rep.seconds:.0f} s in all, "
             f"{rep.tune_seconds:.0f} s of it Triton autotuning.", ""]
    if rep.smoke:
        lines += ["**Smoke run** (`--smoke`): CPU, Triton interpreter, tiny shapes. It checks that the "
                  "script and kernels run and agree with the reference; **nothing is timed**, so the "
                  "tables below hold no performance figures.", ""]
    lines += ["## Correctness against the reference", "",
              "| check | shape | result | bound | ok |", "|---|---|---|---|---|"]
    lines += [f"| {c[0]} | {c[1]} | {c[2]} | {c[3]} | {'yes' if c[4] else '**NO**'} |" for c in rep.checks]
    lines += [""]
    if not rep.ok:
        lines += ["**A correctness check failed: nothing was timed.**", ""]
    else:
        lines += ["## GEMM C = A B^T, bf16 output (TFLOP/s)", "",
                  "Triton: `finefp8.kernels.triton_gemm.fp8_gemm` (1x128 activation and 128x128 weight "
                  "scales, fp32 promotion per 128 of K); `_scaled_mm`: `torch._scaled_mm` with the same "
                  "scales (cuBLAS); bf16: `F.linear` on bf16 operands. Median of CUDA-event timings, L2 "
                  "flushed before each run. *tune s*: the Triton autotuning time of that shape.", "",
                  "| M | N | K | Triton fp8 | _scaled_mm | bf16 | Triton / bf16 | _scaled_mm / bf16 | tune s |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in rep.gemm:
            if "skipped" in r:
                lines.append(f"| {r['M']} | {r['N']} | {r['K']} | skipped ({r['skipped']}) | | | | | |")
                continue
            flop = 2 * r["M"] * r["N"] * r["K"]
            tf = {key: (None if r.get(key) is None else flop / r[key] / 1e9) for key in ("triton", "scaled_mm", "bf16")}
            ratio = {key: (None if tf[key] is None or tf["bf16"] is None else tf[key] / tf["bf16"])
                     for key in ("triton", "scaled_mm")}
            lines.append(f"| {r['M']} | {r['N']} | {r['K']} | {_num(tf['triton'], '.0f')} | "
                         f"{_num(tf['scaled_mm'], '.0f')} | {_num(tf['bf16'], '.0f')} | "
                         f"{_num(ratio['triton'], '.2f')} | {_num(ratio['scaled_mm'], '.2f')} | "
                         f"{_num(r.get('tune_s'), '.1f')} |")
        lines += _render_grouped(rep)
        lines += ["", "## Quantization kernels (GB/s read + written)", "",
                  f"Device-to-device copy, measured in the same run: {_num(rep.copy_gbs, '.0f')} GB/s.", "",
                  "| kernel | shape | GB/s | of copy |", "|---|---|---:|---:|"]
        for r in rep.quant:
            frac = None if r["gbs"] is None or rep.copy_gbs is None else r["gbs"] / rep.copy_gbs
            lines.append(f"| {r['kernel']} | {r['shape']} | {_num(r['gbs'], '.0f')} | {_num(frac, '.0%')} |")
        lines += ["", "Targets (issue 4): Triton fp8_gemm >= 1.5x bf16 at M=4096; quantization kernels "
                  ">= 70% of the copy bandwidth."]
    if rep.notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in rep.notes]
    return "\n".join(lines) + "\n"


def _render_grouped(rep: Report) -> list[str]:
    """The grouped GEMM table: ms per call and the loop's and bf16's time over the grouped kernel's."""
    if not rep.grouped:
        return []
    lines = ["", "## Grouped GEMM over experts, bf16 output (ms per call)", "",
             "Rows: routed tokens x top-k, each to distinct experts chosen uniformly at random; "
             "*busy*: experts with at least one row. Grouped: `finefp8.ops.grouped_fp8_gemm`'s "
             "Triton kernel, one launch for all experts; loop: one Triton `fp8_gemm` per busy "
             "expert (a host loop); bf16: `torch._grouped_mm` on bf16 weights, same routing. "
             "Ratios above 1 mean the grouped FP8 kernel is faster.", "",
             "| N x K | experts | top-k | tokens | busy | grouped fp8 | fp8 loop | bf16 grouped "
             "| loop / grouped | bf16 / grouped | tune s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rep.grouped:
        head = f"| {r['N']}x{r['K']} | {r['E']} | {r['topk']} | {r['tokens']} |"
        if "skipped" in r:
            lines.append(f"{head} skipped ({r['skipped']}) | | | | | | |")
            continue
        ratio = {key: (None if r.get(key) is None or r.get("grouped") is None else r[key] / r["grouped"])
                 for key in ("loop", "bf16")}
        lines.append(f"{head} {r.get('busy', '—')} | {_num(r.get('grouped'), '.4f')} | "
                     f"{_num(r.get('loop'), '.4f')} | {_num(r.get('bf16'), '.4f')} | "
                     f"{_num(ratio['loop'], '.2f')} | {_num(ratio['bf16'], '.2f')} | "
                     f"{_num(r.get('tune_s'), '.1f')} |")
    return lines


def _triton_version() -> str:
    import triton

    return triton.__version__


def _device_name(device: torch.device) -> str:
    if device.type != "cuda":
        return f"CPU ({platform.processor() or platform.machine()}), Triton interpreter"
    p = torch.cuda.get_device_properties(device)
    return f"{p.name} (sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB)"


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("docs/gpu_bench.md"), help="Markdown report path")
    ap.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, tiny shapes, no timing")
    ap.add_argument("--budget-s", type=float, default=240.0, help="start no GEMM shape after this many seconds")
    ap.add_argument("--reps", type=int, default=30, help="timed runs per measurement (median)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed runs before the timed ones")
    ap.add_argument("--grouped-only", action="store_true",
                    help="after the checks, time only the grouped GEMM over experts")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()

    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            if "triton" in sys.modules:
                ap.error("--smoke needs TRITON_INTERPRET=1 before triton is imported")
            os.environ["TRITON_INTERPRET"] = "1"
        device = torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            ap.error("no CUDA device: run on a GPU, or use --smoke to check the script on the CPU")
        if os.environ.get("TRITON_INTERPRET") == "1":
            ap.error("TRITON_INTERPRET=1 is set: unset it to time the compiled kernels")
        device = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = False  # the reference GEMM runs in true fp32

    command = "python benchmarks/gpu_bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    rep = Report(command=command.strip(), device=_device_name(device), smoke=args.smoke)
    print(f"gpu_bench: {rep.device}", flush=True)
    check_quant(rep, device)
    check_gemm(rep, device)
    check_grouped(rep, device)
    if rep.ok:
        timer = Timer(device, args.warmup, args.reps)
        if not args.grouped_only:
            time_gemms(rep, device, timer, args.budget_s, t0)
        time_grouped(rep, device, timer, args.budget_s + (0 if args.grouped_only else 60), t0)
        if not args.grouped_only:
            time_quant(rep, device, timer)
    rep.seconds = time.perf_counter() - t0
    text = render(rep)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text, flush=True)
    return 0 if rep.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
