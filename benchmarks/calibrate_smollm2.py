"""Plain vs ``quantize --calibrate gptq`` FP8 checkpoints of the embedded SmolLM2-135M-Instruct.

The float32 model (``finefp8.eval.models.load_default_model``) is saved as a safetensors folder,
then converted twice: ``quantize_checkpoint`` (DeepSeek-V3 amax/448 + nearest rounding) and
``quantize_calibrated`` (GPTQ, layer by layer) with calibration tokens from the END of the
default text (Python's pydoc topics), disjoint from the evaluation tokens at its start. Each
checkpoint is loaded with ``finefp8.load`` (W8A8: dynamic 1x128 activations, block-scaled
GEMM) and compared with the float model on the first ``--tokens`` tokens of each text:

* KL(ref || fp8) per token, mean and its standard error (std / sqrt(tokens));
* top-1 agreement;
* ppl change ``ppl_fp8 / ppl_ref - 1`` with a 95% bootstrap interval over 128-token blocks
  (1000 resamples, fixed seed).

Calibration time and peak RSS above the process's RSS before calibrating (psutil, sampled
every 5 ms) are printed too.

    python benchmarks/calibrate_smollm2.py --second-text /usr/share/common-licenses/GPL-3
"""

from __future__ import annotations

import argparse
import math
import tempfile
import threading
import time
from pathlib import Path

import torch

WINDOW = 1024
BLOCK = 128
# name: (label, Hessians of the W8A8 inputs, calibration target)
VARIANTS = {
    "gptq": ("w8a8 GPTQ layer-by-layer", False, "layer"),
    "gptq_w8a8_hessian": ("w8a8 GPTQ layer-by-layer, W8A8-input Hessians", True, "layer"),
    "gptq_float_weights": ("w8a8 GPTQ of GPTAQ-corrected weights (float target)", False,
                           "float-weights"),
    "gptq_float_weights_w8a8": ("w8a8 GPTQ of GPTAQ-corrected weights, W8A8 inputs", True,
                                "float-weights"),
    "gptq_float_scales": ("w8a8 GPTQ, block scales tuned to the float layer outputs", True,
                          "float-scales"),
}


def _peak_rss(fn):
    import psutil

    proc = psutil.Process()
    base = proc.memory_info().rss
    peak, stop = [base], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.005)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    t0 = time.perf_counter()
    try:
        out = fn()
    finally:
        stop.set()
        t.join()
    return out, time.perf_counter() - t0, peak[0] - base


def token_stats(ref, model, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per predicted token: KL(ref || model), top-1 agreement, NLL of ref and of model."""
    kl, agree, nll_r, nll_q = [], [], [], []
    with torch.no_grad():
        for w in ids.split(WINDOW):
            if w.numel() < 2:
                continue
            a = torch.log_softmax(ref(w[None]).logits[0, :-1].double(), -1)
            b = torch.log_softmax(model(w[None]).logits[0, :-1].double(), -1)
            tgt = w[1:]
            kl.append((a.exp() * (a - b)).sum(-1))
            agree.append((a.argmax(-1) == b.argmax(-1)).double())
            nll_r.append(-a.gather(-1, tgt[:, None])[:, 0])
            nll_q.append(-b.gather(-1, tgt[:, None])[:, 0])
    return {k: torch.cat(v) for k, v in
            (("kl", kl), ("agree", agree), ("nll_r", nll_r), ("nll_q", nll_q))}


def summarize(s: dict[str, torch.Tensor], seed: int = 0, resamples: int = 1000) -> dict:
    """KL mean and standard error, top-1, ppl change and its 95% block-bootstrap interval."""
    n = s["kl"].numel()
    change = math.exp(float(s["nll_q"].mean() - s["nll_r"].mean())) - 1
    nb = n // BLOCK
    dr = s["nll_r"][:nb * BLOCK].view(nb, BLOCK).sum(1)
    dq = s["nll_q"][:nb * BLOCK].view(nb, BLOCK).sum(1)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, nb, (resamples, nb), generator=g)
    boot = torch.exp((dq[idx].sum(1) - dr[idx].sum(1)) / (nb * BLOCK)) - 1
    lo, hi = torch.quantile(boot, torch.tensor([0.025, 0.975], dtype=boot.dtype)).tolist()
    return {"kl": float(s["kl"].mean()), "kl_se": float(s["kl"].std() / math.sqrt(n)),
            "top1": float(s["agree"].mean()), "ppl": change, "ppl_lo": lo, "ppl_hi": hi,
            "tokens": n}


def eval_texts(tok, ids: torch.Tensor, tokens: int, second_text: str | None
               ) -> list[tuple[str, torch.Tensor]]:
    """``(name, token ids)`` to evaluate on: the first ``tokens`` of the default text's ``ids``
    and, given ``second_text`` (a file), the first ``tokens`` of that file."""
    from finefp8.eval.text import read_text_file, tokenize

    texts = [("default (pydoc topics)", ids[:tokens])]
    if second_text:
        texts.append((Path(second_text).name,
                      tokenize(tok, read_text_file(second_text).text)[:tokens]))
    return texts


def main(argv: list[str] | None = None) -> int:
    import finefp8
    from finefp8.checkpoint.convert import quantize_checkpoint
    from finefp8.eval.models import load_default_model
    from finefp8.eval.text import default_text, tokenize
    from finefp8.nn.calibrate import (
        CalibrationTokens,
        calibration_token_windows,
        quantize_calibrated,
    )

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=3072, help="evaluation tokens per text")
    p.add_argument("--calib-tokens", type=int, default=2048)
    p.add_argument("--second-text", default=None, metavar="FILE")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variants", nargs="+", default=["plain", "gptq"],
                   choices=("plain", *VARIANTS),
                   help="; ".join(f"{k}: {v[0]}" for k, v in VARIANTS.items()))
    p.add_argument("--kv-hessian", choices=("attention", "input"), default="attention",
                   help="k_proj / v_proj Hessians, as quantize --kv-hessian (attention)")
    p.add_argument("--tp", type=int, nargs="*", default=[],
                   help="serving-check degrees (default none: every Linear FP8, the DeepSeek-V3 "
                        "scheme; 1 keeps SmolLM2's q/k/v in bf16 as `quantize` does by default)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    loaded = load_default_model()
    ref, tok = loaded.model.eval(), loaded.tokenizer
    text = default_text()
    ids = tokenize(tok, text.text)
    if ids.numel() < args.tokens + args.calib_tokens:
        raise SystemExit("the default text is too short for disjoint eval and calibration")
    texts = eval_texts(tok, ids, args.tokens, args.second_text)
    calib = CalibrationTokens(calibration_token_windows(ids, args.calib_tokens), text.name,
                              text.sha256)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "smollm2"
        ref.save_pretrained(src)
        tok.save_pretrained(src)
        runs = []
        for v in args.variants:
            if v == "plain":
                _, secs, mem = _peak_rss(lambda: quantize_checkpoint(
                    src, Path(tmp) / "plain", progress=False, tp=tuple(args.tp)))
                runs.append(("w8a8 plain", v, secs, mem))
                continue
            label, act_quant_inputs, target = VARIANTS[v]
            res, secs, mem = _peak_rss(lambda v=v, aq=act_quant_inputs, t=target:
                                       quantize_calibrated(src, Path(tmp) / v, calib,
                                                           progress=False, tp=tuple(args.tp),
                                                           act_quant_inputs=aq, target=t,
                                                           kv_hessian=args.kv_hessian))
            print(f"{v} (kv Hessians: {res.metadata['kv_hessian']}): "
                  f"{res.metadata['calibrated']} weights GPTQ, "
                  f"{len(res.metadata['plain'])} plain, {calib.ids.numel()} tokens, "
                  f"{secs:.0f} s", flush=True)
            runs.append((label, v, secs, mem))
        for name, folder, secs, mem in runs:
            model = finefp8.load(Path(tmp) / folder)
            for tname, tids in texts:
                rows.append((name, tname, summarize(token_stats(ref, model, tids)), secs, mem))
            del model
    print("| variant | text | KL (nats) +- s.e. | top-1 | ppl change [95% CI] | convert s "
          "| peak RSS MB |")
    print("|---|---|---|---|---|---|---|")
    for name, tname, r, secs, mem in rows:
        print(f"| {name} | {tname} | {r['kl']:.4f} +- {r['kl_se']:.4f} | {r['top1']:.3f} | "
              f"{100 * r['ppl']:+.2f}% [{100 * r['ppl_lo']:+.2f}, {100 * r['ppl_hi']:+.2f}] | "
              f"{secs:.1f} | {mem / 1e6:.0f} |")
    for name, tname, r, _secs, _mem in rows:  # the table rounds; thresholds need more digits
        print(f"{name}, {tname}: KL {r['kl']:.6f} +- {r['kl_se']:.6f}, ppl {100 * r['ppl']:+.4f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
