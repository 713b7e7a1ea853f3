"""Why DeepSeek-V3 promotes FP8 partial sums to fp32 every 128 elements: the accumulation experiment.

The DeepSeek-V3 report observes that the H800's FP8 tensor-core accumulator keeps only about
14 bits, and that for K = 4096 and random matrices this alone gives a maximum relative error
of nearly 2%; promoting the partial sum to fp32 every N_C = 128 elements (4 WGMMAs) fixes it.
This script measures both effects with the library's emulator (``finefp8.fp8_gemm`` with
``accum_bits``, i.e. ``finefp8.limited_dot``) on random matrices, sweeping K, the promotion
interval, the input distribution and the accumulator width. See docs/accumulation.md.

Set-up (every number it prints comes from this)::

    A = sample(dist, [M, K]), B = sample(dist, [N, K])              # fp32, fixed seed
    qa, sa = quantize_groupwise(A, group_size=K)                    # one scale per row of A
    qb, sb = quantize_blockwise(B, block_size=(128, K))             # one scale per 128 rows of B
    R = (qa @ qb.T) * (sa outer sb)                                 # float64, exact sum
    C = fp8_gemm(qa, sa, qb, sb, fp32, promote_every=P, accum_bits=bits)

Scales constant along K let ``promote_every`` be any length (``None``: never promoted), so
only the accumulator differs between C and R. Error metrics over the ``M x N`` outputs:
``max_rel = max |C - R| / |R|``, ``median_rel`` the median of the same ratio,
``fro = ||C - R||_F / ||R||_F``.

A second accumulator model, ``split``, is measured next to the library's ``joint`` model for
comparison (see ``split_dot``): the report's description of the hardware can be read both ways.

Run: ``python experiments/accumulation.py`` (about 30 s on one core; writes
docs/img/accumulation.png) or ``--quick`` (seconds; tiny matrices, for the tests).
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

import finefp8
from finefp8.gemm import MMA_K

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PNG = REPO / "docs" / "img" / "accumulation.png"
QUICK_PNG = REPO / "docs" / "img" / "accumulation_quick.png"

# name -> (description, sampler(shape, generator) -> fp32 tensor)
DISTRIBUTIONS: dict[str, tuple[str, Callable[[tuple[int, int], torch.Generator], torch.Tensor]]] = {
    "uniform": ("U[0, 1) (torch.rand)", lambda s, g: torch.rand(s, generator=g)),
    "halfnormal": ("abs(N(0, 1))", lambda s, g: torch.randn(s, generator=g).abs()),
    "normal+1": ("N(1, 1)", lambda s, g: torch.randn(s, generator=g) + 1.0),
    "normal+0.5": ("N(0.5, 1)", lambda s, g: torch.randn(s, generator=g) + 0.5),
    "normal": ("N(0, 1) (torch.randn)", lambda s, g: torch.randn(s, generator=g)),
}
MODELS = ("joint", "split")
METRICS = {
    "max_rel": "max_ij |C-R|/|R|",
    "median_rel": "median_ij |C-R|/|R|",
    "fro": "||C-R||_F / ||R||_F",
}
HEADLINE = ("uniform", "max_rel")  # the distribution and metric of the main claim
SECOND = ("normal", "fro")  # zero-mean inputs: the max elementwise ratio is meaningless there
REPORT_ERROR = 0.02  # "a maximum relative error of nearly 2%" (DeepSeek-V3 report, K = 4096)


@dataclass(frozen=True)
class Config:
    """Sizes of one run. ``intervals``: promotion lengths tried (each < K; "never" is added)."""

    m: int
    n: int
    ks: tuple[int, ...]
    intervals: tuple[int, ...]
    bits: tuple[int, ...]
    headline_k: int = 4096
    accum_bits: int = 14
    seed: int = 0


FULL = Config(m=64, n=64, ks=(512, 1024, 2048, 4096, 8192, 16384),
              intervals=(32, 64, 128, 256, 512, 1024, 2048, 4096, 8192), bits=(12, 13, 14, 15, 16))
QUICK = Config(m=16, n=16, ks=(512, 4096), intervals=(32, 128, 512), bits=(12, 14, 16))


@dataclass(frozen=True)
class Operands:
    """fp8 operands in ``fp8_gemm``'s layout and the exact float64 reference ``R``.

    ``qa`` ``[M, K]`` e4m3, ``sa`` ``[M, ceil(K/128)]``; ``qb`` ``[N, K]`` e4m3,
    ``sb`` ``[ceil(N/128), ceil(K/128)]`` (scales constant along K); ``ref`` ``[M, N]`` float64.
    """

    qa: torch.Tensor
    sa: torch.Tensor
    qb: torch.Tensor
    sb: torch.Tensor
    ref: torch.Tensor


@dataclass(frozen=True)
class Result:
    """One measurement. ``promote``: the promotion interval, ``None`` = never promoted;
    ``bits``: accumulator bits, ``None`` = exact fp32 accumulation."""

    dist: str
    k: int
    promote: int | None
    bits: int | None
    model: str
    max_rel: float
    median_rel: float
    fro: float


def make_operands(dist: str, m: int, n: int, k: int, seed: int) -> Operands:
    """Sample A ``[M, K]`` and B ``[N, K]`` from ``dist`` (seeded) and quantize them with scales
    constant along K: one per row of A (1 x K groups), one per 128 rows of B (128 x K blocks)."""
    if dist not in DISTRIBUTIONS:
        raise ValueError(f"unknown distribution {dist!r}; choose from {sorted(DISTRIBUTIONS)}")
    gen = torch.Generator().manual_seed(seed)
    sampler = DISTRIBUTIONS[dist][1]
    a, b = sampler((m, k), gen), sampler((n, k), gen)
    qa, sa = finefp8.quantize_groupwise(a, group_size=k, name="A")  # sa [M, 1]
    qb, sb = finefp8.quantize_blockwise(b, block_size=(128, k), name="B")  # sb [ceil(N/128), 1]
    kb = math.ceil(k / 128)
    sb_rows = sb.double().repeat_interleave(128, 0)[:n]  # [N, 1]
    # e4m3 products span 2**-18 .. 2**18 and K <= 2**14 of them sum within float64's 53 bits:
    # qa @ qb.T is exact, and R has a single rounding (the scale product).
    ref = (qa.double() @ qb.double().T) * (sa.double() * sb_rows.T)
    return Operands(qa, sa.expand(m, kb), qb, sb.expand(-1, kb), ref)


def error_metrics(c: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """``max_rel``, ``median_rel`` (of ``|C - R| / |R|`` over all outputs; an exact zero
    output counts 0 if matched exactly, inf otherwise) and ``fro`` (relative Frobenius)."""
    err = c.double() - ref
    rel = err.abs() / ref.abs()
    rel = torch.where(ref == 0, torch.where(err == 0, 0.0, math.inf), rel)
    return {
        "max_rel": rel.max().item(),
        "median_rel": rel.median().item(),
        "fro": (err.norm() / ref.norm()).item(),
    }


def split_dot(a: torch.Tensor, b: torch.Tensor, accum_bits: int, mma_k: int = MMA_K) -> torch.Tensor:
    """``a @ b.T`` with the "split" accumulator model, for comparison with ``limited_dot``.

    Per step of ``mma_k`` products ``p``: ``2**e > max|p|``, ``s = sum(trunc(p / u)) * u`` with
    ``u = 2**(e - accum_bits)`` (products aligned among themselves, not with the running sum);
    then ``acc = trunc((acc + s) / v) * v`` with ``v = 2**(f - accum_bits)``, ``2**f > |acc + s|``
    (the register keeps ``accum_bits`` bits). ``limited_dot`` instead aligns the running sum
    and the products together. Args: ``a`` ``[M, L]``, ``b`` ``[N, L]`` float64 (exact fp8
    values). Returns ``[M, N]`` float64.
    """

    def truncate(x: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
        _, e = torch.frexp(top)
        ulp = torch.ldexp(torch.ones_like(top), e - accum_bits)
        return torch.trunc(x / ulp) * ulp

    acc = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float64)
    for j in range(0, a.shape[1], mma_k):
        prods = a[:, None, j : j + mma_k] * b[None, :, j : j + mma_k]
        s = truncate(prods, prods.abs().amax(-1, keepdim=True)).sum(-1)
        acc = truncate(acc + s, (acc + s).abs())
    return acc


def split_gemm(op: Operands, promote_every: int | None, accum_bits: int) -> torch.Tensor:
    """``fp8_gemm``'s loop with ``split_dot`` inside each promotion interval: ``[M, N]`` float32."""
    k = op.qa.shape[1]
    step = k if promote_every is None else promote_every
    a, b = op.qa.double(), op.qb.double()
    sa = op.sa[:, :1].float()
    sb = op.sb[:, :1].float().repeat_interleave(128, 0)[: b.shape[0]]
    acc = torch.zeros(a.shape[0], b.shape[0], dtype=torch.float32)
    for k0 in range(0, k, step):
        part = split_dot(a[:, k0 : k0 + step], b[:, k0 : k0 + step], accum_bits).float()
        acc += part * (sa * sb.T)
    return acc


def measure(op: Operands, dist: str, promote: int | None, bits: int | None, model: str) -> Result:
    """One GEMM of ``op`` with the given accumulator, compared with the exact reference."""
    k = op.qa.shape[1]
    if model == "joint" or bits is None:
        every = 128 if bits is None else promote
        c = finefp8.fp8_gemm(op.qa, op.sa, op.qb, op.sb, out_dtype=torch.float32,
                             promote_every=every, accum_bits=bits)
    else:
        c = split_gemm(op, promote, bits)
    return Result(dist, k, promote, bits, model, **error_metrics(c, op.ref))


def run(cfg: Config, log: Callable[[str], None] = print) -> list[Result]:
    """All measurements of one run: the K x interval sweep (joint model, ``cfg.accum_bits``)
    for the headline and second distributions, then at ``cfg.headline_k`` every distribution
    and every accumulator width, never promoted and promoted every 128, with both models.
    Operands depend only on (distribution, K, seed), so each setting is measured once."""
    done: dict[tuple, Result] = {}

    def once(op: Operands, dist: str, promote: int | None, bits: int | None, model: str) -> None:
        key = (dist, op.qa.shape[1], promote, bits, model)
        if key not in done:
            done[key] = measure(op, dist, promote, bits, model)

    for dist in (HEADLINE[0], SECOND[0]):
        for k in cfg.ks:
            op = make_operands(dist, cfg.m, cfg.n, k, cfg.seed)
            once(op, dist, 128, None, "joint")
            for p in [*(p for p in cfg.intervals if p < k), None]:
                once(op, dist, p, cfg.accum_bits, "joint")
            log(f"  sweep {dist:>10} K={k:<6} done")
    for dist in DISTRIBUTIONS:
        op = make_operands(dist, cfg.m, cfg.n, cfg.headline_k, cfg.seed)
        for bits in cfg.bits if dist == HEADLINE[0] else (cfg.accum_bits,):
            for model in MODELS:
                for p in (None, 128):
                    once(op, dist, p, bits, model)
        log(f"  K={cfg.headline_k} {dist:>10} done")
    return list(done.values())


def pick(results: Sequence[Result], **want) -> Result:
    """The single result whose fields equal ``want``."""
    found = [r for r in results if all(getattr(r, f) == v for f, v in want.items())]
    if len(found) != 1:
        raise KeyError(f"{len(found)} results match {want}")
    return found[0]


def never_vs_128(results: Sequence[Result], dist: str, k: int, bits: int, model: str,
                 metric: str) -> tuple[float, float]:
    """``metric`` never promoted and promoted every 128 elements."""
    return tuple(getattr(pick(results, dist=dist, k=k, promote=p, bits=bits, model=model), metric)
                 for p in (None, 128))


def _fmt(x: float) -> str:
    return f"{x:.2e}"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.0f}x" if b > 0 else "inf"


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def sweep_table(results: Sequence[Result], cfg: Config, dist: str, metric: str) -> str:
    """Rows K, columns: fp32 accumulation, each promotion interval < K, never promoted."""
    header = ["K", "fp32 acc", *(f"P={p}" for p in cfg.intervals), "never"]
    rows = []
    for k in cfg.ks:
        row = [str(k), _fmt(getattr(pick(results, dist=dist, k=k, bits=None), metric))]
        for p in cfg.intervals:
            r = pick(results, dist=dist, k=k, promote=p, bits=cfg.accum_bits, model="joint") \
                if p < k else None
            row.append(_fmt(getattr(r, metric)) if r else "")
        never = pick(results, dist=dist, k=k, promote=None, bits=cfg.accum_bits, model="joint")
        rows.append([*row, _fmt(getattr(never, metric))])
    return _markdown(header, rows)


def distribution_table(results: Sequence[Result], cfg: Config) -> str:
    """At ``headline_k``: every distribution x metric, never vs every 128, both models."""
    header = ["inputs", "metric", "joint never", "joint P=128", "ratio", "split never",
              "split P=128", "ratio"]
    rows = []
    for dist, (desc, _) in DISTRIBUTIONS.items():
        for metric in METRICS:
            row = [desc, metric]
            for model in MODELS:
                never, every = never_vs_128(results, dist, cfg.headline_k, cfg.accum_bits, model,
                                            metric)
                row += [_fmt(never), _fmt(every), _ratio(never, every)]
            rows.append(row)
    return _markdown(header, rows)


def bits_table(results: Sequence[Result], cfg: Config) -> str:
    """At ``headline_k``, headline distribution and metric: each accumulator width."""
    dist, metric = HEADLINE
    header = ["accum_bits", "joint never", "joint P=128", "ratio", "split never", "split P=128",
              "ratio"]
    rows = []
    for bits in cfg.bits:
        row = [str(bits)]
        for model in MODELS:
            never, every = never_vs_128(results, dist, cfg.headline_k, bits, model, metric)
            row += [_fmt(never), _fmt(every), _ratio(never, every)]
        rows.append(row)
    return _markdown(header, rows)


def claims(results: Sequence[Result], cfg: Config) -> dict[str, float]:
    """The numbers the report's claim is about (headline distribution and metric, joint model,
    ``accum_bits``, K = ``headline_k``): the error never promoted, promoted every 128, ratio."""
    never, every128 = never_vs_128(results, HEADLINE[0], cfg.headline_k, cfg.accum_bits, "joint",
                                   HEADLINE[1])
    return {"never": never, "every128": every128, "reduction": never / every128}


def plot(results: Sequence[Result], cfg: Config, path: Path) -> None:
    """Four log-scale panels: error vs promotion interval for each K (headline and second
    distribution; the last point of each curve, P = K, is "never promoted"), error vs K, and
    error vs accumulator bits at ``headline_k``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 9.5))
    for ax, (dist, metric) in zip((axes[0, 0], axes[1, 0]), (HEADLINE, SECOND), strict=True):
        for k in cfg.ks:
            xs = [p for p in cfg.intervals if p < k] + [k]
            ys = [getattr(pick(results, dist=dist, k=k, bits=cfg.accum_bits, model="joint",
                               promote=None if p == k else p), metric) for p in xs]
            ax.plot(xs, ys, marker="o", label=f"K = {k}")
            ax.plot([k], [ys[-1]], marker="s", color="black", markersize=4)
        if dist == HEADLINE[0]:
            ax.axhline(REPORT_ERROR, color="gray", linestyle="--", label="report: nearly 2%")
        ax.axvline(128, color="gray", linestyle=":", label="N_C = 128")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("promotion interval P (elements of K); last point (square) = never")
        _finish(ax, METRICS[metric], f"{DISTRIBUTIONS[dist][0]}, {cfg.accum_bits}-bit accumulator")

    ax = axes[0, 1]
    for (dist, metric), style in zip((HEADLINE, SECOND), ("-", "--"), strict=True):
        for p, bits, color, what in ((None, cfg.accum_bits, "tab:red", "never"),
                                     (128, cfg.accum_bits, "tab:blue", "P = 128"),
                                     (128, None, "tab:green", "fp32 accumulation")):
            ys = [getattr(pick(results, dist=dist, k=k, promote=p, bits=bits, model="joint"),
                          metric) for k in cfg.ks]
            ax.plot(cfg.ks, ys, style, marker="o", color=color,
                    label=f"{DISTRIBUTIONS[dist][0].split(' (')[0]} {metric}, {what}")
    ax.axhline(REPORT_ERROR, color="gray", linestyle="--", label="report: nearly 2%")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("K")
    _finish(ax, "relative error", f"error vs K ({cfg.accum_bits}-bit accumulator, joint model)")

    ax = axes[1, 1]
    dist, metric = HEADLINE
    for model, style in zip(MODELS, ("-", "--"), strict=True):
        for p, color in ((None, "tab:red"), (128, "tab:blue")):
            ys = [getattr(pick(results, dist=dist, k=cfg.headline_k, promote=p, bits=b,
                               model=model), metric) for b in cfg.bits]
            label = f"{model} model, {'never' if p is None else 'P = 128'}"
            ax.plot(cfg.bits, ys, style, marker="o", color=color, label=label)
    ax.axhline(REPORT_ERROR, color="gray", linestyle="--", label="report: nearly 2%")
    ax.set_xticks(list(cfg.bits))
    ax.set_xlabel("accumulator bits")
    _finish(ax, METRICS[metric], f"K = {cfg.headline_k}, {DISTRIBUTIONS[dist][0]}")

    fig.suptitle(f"FP8 GEMM with a limited-precision accumulator (M = {cfg.m}, N = {cfg.n}, "
                 f"seed {cfg.seed})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def _finish(ax, ylabel: str, title: str) -> None:
    ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes (seconds), for the tests")
    p.add_argument("--seed", type=int, default=0, help="RNG seed of the random matrices (0)")
    p.add_argument("--out", type=Path, default=None,
                   help=f"PNG to write (default {DEFAULT_PNG.relative_to(REPO)}, "
                        f"or {QUICK_PNG.relative_to(REPO)} with --quick)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1)")
    return p


def main(argv: Sequence[str] | None = None) -> dict:
    """Run, print the tables, write the PNG. Returns ``{"config", "results", "claims", "png"}``."""
    args = build_parser().parse_args(argv)
    if args.threads < 1:
        raise SystemExit("--threads must be >= 1")
    torch.set_num_threads(args.threads)
    base = QUICK if args.quick else FULL
    cfg = Config(**{**base.__dict__, "seed": args.seed})
    out = args.out or (QUICK_PNG if args.quick else DEFAULT_PNG)
    shown = list(sys.argv[1:] if argv is None else argv)
    print("# python experiments/accumulation.py " + " ".join(shown))
    print(f"seed {cfg.seed}; M = {cfg.m}, N = {cfg.n}; accumulator {cfg.accum_bits} bits, "
          f"{MMA_K} products per MMA step; torch {torch.__version__}, "
          f"Python {platform.python_version()}, {args.threads} thread(s)")
    t0 = time.perf_counter()
    results = run(cfg, log=lambda s: print(s, flush=True))
    elapsed = time.perf_counter() - t0

    print(f"\n## {METRICS[HEADLINE[1]]}, inputs {DISTRIBUTIONS[HEADLINE[0]][0]}, joint model "
          f"(finefp8.limited_dot), {cfg.accum_bits} bits; P = promotion interval\n")
    print(sweep_table(results, cfg, *HEADLINE))
    print(f"\n## {METRICS[SECOND[1]]}, inputs {DISTRIBUTIONS[SECOND[0]][0]}, same accumulator\n")
    print(sweep_table(results, cfg, *SECOND))
    print(f"\n## K = {cfg.headline_k}, {cfg.accum_bits} bits: input distributions x metrics, "
          f"both accumulator models\n")
    print(distribution_table(results, cfg))
    print(f"\n## K = {cfg.headline_k}, {DISTRIBUTIONS[HEADLINE[0]][0]}, {METRICS[HEADLINE[1]]}: "
          f"accumulator width\n")
    print(bits_table(results, cfg))

    c = claims(results, cfg)
    print(f"\nclaim (K = {cfg.headline_k}, {DISTRIBUTIONS[HEADLINE[0]][0]}, {HEADLINE[1]}, "
          f"{cfg.accum_bits} bits, joint model): never promoted {c['never']:.2%}, promoted every "
          f"128 {c['every128']:.3%}, reduction {c['reduction']:.0f}x (report: nearly 2%, "
          f"and promotion needed)")
    plot(results, cfg, out)
    print(f"wrote {out}; measurements took {elapsed:.1f} s")
    return {"config": cfg, "results": results, "claims": c, "png": out}


if __name__ == "__main__":
    main()
