"""SmoothQuant rescaling (``finefp8.nn.smooth``) before W8A8 on the embedded SmolLM2, in memory.

For each ``--alpha`` (``0`` = no rescaling): a copy of the float32 model is smoothed with
activation maxima from the calibration tokens (the last ``--calib-tokens`` of the default text),
then turned into W8A8 (DeepSeek-V3 blocks) with plain rounding and, with ``--gptq``, with GPTQ
codes (``finefp8.eval.variants``: Hessians of the smoothed float model over the same calibration
tokens). Each is compared with the unsmoothed float model on the first ``--tokens`` tokens (KL
mean and standard error, top-1, ppl change with a 95% block-bootstrap interval, as
``calibrate_smollm2.py`` computes them).

    python benchmarks/smooth_smollm2.py --alpha 0 0.5 --gptq
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from calibrate_smollm2 import summarize, token_stats  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    from finefp8.eval.models import load_default_model
    from finefp8.eval.text import default_text, tokenize
    from finefp8.eval.variants import VARIANTS, build_variant, collect_hessians, convertible_linears
    from finefp8.nn import quantize_model
    from finefp8.nn.smooth import collect_input_absmax, smooth_model, smoothable_groups

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--alpha", type=float, nargs="+", default=[0.0, 0.5])
    p.add_argument("--gptq", action="store_true")
    p.add_argument("--tokens", type=int, default=3072)
    p.add_argument("--calib-tokens", type=int, default=2048)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    loaded = load_default_model()
    ref, tok = loaded.model.eval(), loaded.tokenizer
    ids = tokenize(tok, default_text().text)
    eval_ids = ids[:args.tokens]
    calib = list(ids[ids.numel() - args.calib_tokens:].split(1024))
    print("| variant | alpha | KL (nats) +- s.e. | top-1 | ppl change [95% CI] | s |")
    print("|---|---|---|---|---|---|")
    for alpha in args.alpha:
        t0 = time.perf_counter()
        model = copy.deepcopy(ref)
        layers = model.model.layers
        if alpha > 0:
            names = [f"model.layers.{i}.{lins[0]}" for i, layer in enumerate(layers)
                     for _, lins in smoothable_groups(layer)]

            def run(m=model):
                for w in calib:
                    m(w[None])

            absmax = collect_input_absmax(model, names, run)
            smooth_model(model, layers, "model.layers", absmax, alpha)
        kinds = [("w8a8 plain", None)] + ([("w8a8 GPTQ", "gptq")] if args.gptq else [])
        for label, kind in kinds:
            t1 = time.perf_counter()
            if kind is None:
                q = quantize_model(copy.deepcopy(model))
            else:
                hs = collect_hessians(model, convertible_linears(model), calib)
                q = build_variant(model, VARIANTS["w8a8_gptq"], hs, {})
            r = summarize(token_stats(ref, q.eval(), eval_ids))
            secs = time.perf_counter() - t1 + (t1 - t0 if kind is None else 0.0)
            print(f"| {label} | {alpha:g} | {r['kl']:.4f} +- {r['kl_se']:.4f} | {r['top1']:.3f} "
                  f"| {100 * r['ppl']:+.2f}% [{100 * r['ppl_lo']:+.2f}, "
                  f"{100 * r['ppl_hi']:+.2f}] | {secs:.0f} |", flush=True)
            del q
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
