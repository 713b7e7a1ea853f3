"""FP8 routed experts (``FP8Experts``) on the CPU against transformers' bf16 experts module.

DeepSeek-V3 expert shapes: hidden 7168, moe intermediate 2048, 8 experts chosen per token
(DeepSeek-V3 model card / config.json). One layer has 256 experts; a slice of 32 (the
default) keeps the bf16 module and its FP8 copy in memory together on a 24 GiB machine.
For each token count one run times, in the same process, on the same routing (random top-8
of the ``--experts`` experts, fixed seed) and the same bf16 input:

* ``transformers bf16``: ``DeepseekV3Experts`` in bf16 with the experts implementation
  transformers 5.24 picks for a model built on a CPU, ``"grouped_mm"`` (the baseline), and
  with ``"eager"`` (transformers' per-expert loop);
* ``FP8 weight_only``: ``FP8Experts`` in mode ``weight_only`` (``finefp8.ops.weight_only_linear``
  per chosen expert: the fused CPU kernel reads the E4M3 codes directly for up to 64 tokens);
* ``FP8 w8a8`` (``--w8a8``): the block-scaled GEMM, an exact CPU emulation of the FP8
  tensor-core math (slow, for reference).

Reported: best of ``--repeat`` runs (the machine is shared: the best run is the least
disturbed one), the ratio to the bf16 baseline (> 1: slower), and the resident bytes of each
module (``finefp8.nn.resident_bytes``). Target: FP8 weight-only no slower than bf16 at one
token, at half the memory.

    python benchmarks/moe_bench.py [--experts 32] [--tokens 1 16] [--repeat 5] [--w8a8]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable

import torch

from finefp8.kernels import cpu as cpu_kernels
from finefp8.nn import FP8Config, resident_bytes
from finefp8.nn.experts import FP8Experts

HIDDEN, INTERMEDIATE, TOP_K = 7168, 2048, 8
BASELINE = "transformers bf16"


def best_time(fn: Callable[[], object], repeat: int) -> float:
    """Best wall time of ``repeat`` calls of ``fn`` (seconds), after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def bf16_experts(experts: int, hidden: int, intermediate: int, implementation: str,
                 weights: torch.nn.Module | None = None):
    """transformers' ``DeepseekV3Experts`` in bf16: random weights (std ``hidden**-0.5``), or
    the very tensors of ``weights`` (another experts module) when given."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Experts

    cfg = DeepseekV3Config(hidden_size=hidden, moe_intermediate_size=intermediate,
                           n_routed_experts=experts, num_experts_per_tok=TOP_K)
    cfg._experts_implementation = implementation
    with torch.device("meta"):
        module = DeepseekV3Experts(cfg)
    if weights is not None:
        module.gate_up_proj, module.down_proj = weights.gate_up_proj, weights.down_proj
        return module.eval()
    g = torch.Generator().manual_seed(0)
    for name in ("gate_up_proj", "down_proj"):
        shape = getattr(module, name).shape
        w = torch.empty(shape, dtype=torch.bfloat16)
        for e in range(shape[0]):  # expert by expert: no fp32 copy of the whole tensor
            w[e] = (torch.randn(shape[1:], generator=g) * hidden ** -0.5).to(torch.bfloat16)
        setattr(module, name, torch.nn.Parameter(w, requires_grad=False))
    return module.eval()


def routing(tokens: int, experts: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Random top-``TOP_K`` choices ``[T, 8]`` (distinct per token) and weights summing to 1."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(experts, generator=g)[:TOP_K] for _ in range(tokens)])
    w = torch.rand(tokens, TOP_K, generator=g)
    return idx, w / w.sum(-1, keepdim=True)


def run(experts: int, tokens: list[int], repeat: int, w8a8: bool, hidden: int = HIDDEN,
        intermediate: int = INTERMEDIATE) -> list[dict]:
    """Time every variant; one dict per (tokens, variant)."""
    base = bf16_experts(experts, hidden, intermediate, "grouped_mm")
    eager = bf16_experts(experts, hidden, intermediate, "eager", weights=base)
    fp8 = FP8Experts.from_experts(base, FP8Config(mode="weight_only"), name="experts")
    mods = [(BASELINE, base), ("transformers bf16 eager", eager), ("FP8 weight_only", fp8)]
    if w8a8:
        mods.append(("FP8 w8a8", FP8Experts.from_quantized(
            fp8.gate_up_proj, fp8.gate_up_proj_scale_inv, fp8.down_proj, fp8.down_proj_scale_inv,
            fp8.act_fn, FP8Config(), name="experts")))
    impl = getattr(base.config, "_experts_implementation", None)
    rows = []
    for t in tokens:
        x = torch.randn(t, hidden, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
        idx, w = routing(t, experts)
        times = {}
        for name, mod in mods:
            with torch.inference_mode():
                times[name] = best_time(lambda m=mod, a=(x, idx, w): m(*a), repeat)
        for name, mod in mods:
            label = f"{name} ({impl})" if name == BASELINE and impl else name
            rows.append({"tokens": t, "variant": label, "ms": times[name] * 1e3,
                         "vs_bf16": times[name] / times[BASELINE],
                         "bytes": resident_bytes(mod),
                         "bytes_vs_bf16": resident_bytes(mod) / resident_bytes(base)})
    return rows


def markdown(rows: list[dict]) -> str:
    """The results as a Markdown table."""
    lines = ["| tokens | variant | time (ms) | / bf16 | resident MB | memory / bf16 |",
             "|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['tokens']} | {r['variant']} | {r['ms']:.1f} | {r['vs_bf16']:.2f} | "
                     f"{r['bytes'] / 1e6:.0f} | {r['bytes_vs_bf16']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experts", type=int, default=32, help="experts held (DeepSeek-V3: 256)")
    p.add_argument("--tokens", nargs="+", type=int, default=[1, 16])
    p.add_argument("--repeat", type=int, default=5, help="timed runs per case (best is kept)")
    p.add_argument("--w8a8", action="store_true", help="also time the emulated W8A8 path")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--markdown", metavar="FILE", help="also write the table as Markdown to FILE")
    args = p.parse_args(argv)
    if args.experts < TOP_K:
        p.error(f"--experts must be at least {TOP_K} (experts chosen per token)")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs; fused CPU kernels: "
          f"{'yes' if cpu_kernels.available() else 'no'}; {args.experts} experts of "
          f"[{2 * INTERMEDIATE}, {HIDDEN}] + [{HIDDEN}, {INTERMEDIATE}], top-{TOP_K}")
    rows = run(args.experts, args.tokens, args.repeat, args.w8a8)
    print(markdown(rows))
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(markdown(rows) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
