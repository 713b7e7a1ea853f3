"""Upper-bound check: end-to-end tuning of the float parameters a DeepSeek-format FP8
checkpoint keeps (RMSNorm weights, fp32 block scales), codes fixed, on the embedded SmolLM2.

This is not a finefp8 feature: it needs the whole model and its gradients in memory, which
``quantize --calibrate`` (one decoder layer at a time) avoids. It answers one question: with
the GPTQ codes of ``quantize --calibrate gptq`` fixed, how far can the KL fall if every float
parameter the format allows to change is tuned for it directly?

Steps: the float32 model is saved and converted with ``quantize_calibrated`` (GPTQ, 2,048
tokens from the end of the default text, every Linear FP8); its codes ``q`` and scales ``s0``
are loaded into a copy of the model whose Linear weights are ``q * s0 * exp(u)`` per 128x128
block, with the Linear inputs 1x128 fake-quantized (``fake_quantize_activation``, straight-
through gradient). ``u`` (and with ``--norms`` the RMSNorm weights) are trained with Adam
(``--lr``) for ``--epochs`` passes over the last ``--calib-tokens`` tokens of the default text
(512-token windows) on ``KL(float || fp8)``. KL, top-1 and ppl change (``calibrate_smollm2``'s
measures) are printed before and after, on the first 3,072 tokens of the default text and of
``--second-text``.

    python benchmarks/e2e_tune_smollm2.py --norms --calib-tokens 8192 --epochs 3 --lr 2e-4 \
        --second-text /usr/share/common-licenses/GPL-3
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from calibrate_smollm2 import eval_texts, summarize, token_stats  # noqa: E402


def _report(tag: str, ref, model, texts) -> None:
    with torch.no_grad():
        for name, ids in texts:
            r = summarize(token_stats(ref, model, ids))
            print(f"| {tag} | {name} | {r['kl']:.4f} +- {r['kl_se']:.4f} | {r['top1']:.3f} | "
                  f"{100 * r['ppl']:+.2f}% [{100 * r['ppl_lo']:+.2f}, {100 * r['ppl_hi']:+.2f}] |",
                  flush=True)


def main(argv: list[str] | None = None) -> int:
    from safetensors import safe_open

    from finefp8.eval.models import load_default_model
    from finefp8.eval.text import default_text, tokenize
    from finefp8.nn.calibrate import (
        CalibrationTokens,
        calibration_token_windows,
        fake_quantize_activation,
        quantize_calibrated,
    )
    from finefp8.quantization import expand_block_scales

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--calib-tokens", type=int, default=8192)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--norms", action="store_true", help="tune the RMSNorm weights too")
    p.add_argument("--second-text", default=None, metavar="FILE")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    loaded = load_default_model()
    ref, tok = loaded.model.eval(), loaded.tokenizer
    text = default_text()
    ids = tokenize(tok, text.text)
    texts = eval_texts(tok, ids, 3072, args.second_text)
    with tempfile.TemporaryDirectory() as tmp:
        ref.save_pretrained(Path(tmp) / "in")
        tok.save_pretrained(Path(tmp) / "in")
        calib = CalibrationTokens(calibration_token_windows(ids, 2048), text.name, text.sha256)
        # the input-Hessian GPTQ codes the tuning in docs/eval.md started from
        quantize_calibrated(Path(tmp) / "in", Path(tmp) / "gptq", calib, progress=False, tp=(),
                            kv_hessian="input")
        with safe_open(str(Path(tmp) / "gptq" / "model.safetensors"), "pt") as f:
            stored = {k: f.get_tensor(k) for k in f.keys()}
    model = copy.deepcopy(ref)
    for prm in model.parameters():
        prm.requires_grad_(False)
    blocks: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def ste(_m, a):
        x = a[0].detach()
        return (a[0] + (fake_quantize_activation(x) - x),)

    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in name:
            q = stored[name + ".weight"].float()
            s0 = stored[name + ".weight_scale_inv"].float()
            blocks[name] = (q, s0, torch.zeros_like(s0, requires_grad=True))
            mod.register_forward_pre_hook(ste)
            del mod.weight

    def set_weights() -> None:
        for name, (q, s0, u) in blocks.items():
            model.get_submodule(name).weight = q * expand_block_scales(s0 * torch.exp(u),
                                                                       tuple(q.shape))

    norms = [prm for n, prm in model.named_parameters() if "norm" in n] if args.norms else []
    for prm in norms:
        prm.requires_grad_(True)
    print("| model | text | KL (nats) +- s.e. | top-1 | ppl change [95% CI] |")
    print("|---|---|---|---|---|")
    set_weights()
    _report("GPTQ codes, amax/448 scales", ref, model, texts)
    windows = ids[-args.calib_tokens:].reshape(-1, 512)
    with torch.no_grad():
        wanted = [torch.log_softmax(ref(w[None]).logits[0].float(), -1) for w in windows]
    opt = torch.optim.Adam([u for _, _, u in blocks.values()] + norms, lr=args.lr)
    t0 = time.perf_counter()
    for epoch in range(args.epochs):
        total = 0.0
        for w, target in zip(windows, wanted, strict=True):
            set_weights()
            got = torch.log_softmax(model(w[None]).logits[0].float(), -1)
            loss = (target.exp() * (target - got)).sum(-1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach())
        print(f"epoch {epoch}: calibration KL {total / len(windows):.4f}, "
              f"{time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    set_weights()
    tag = "tuned: block scales" + (" + RMSNorm weights" if args.norms else "")
    _report(tag, ref, model, texts)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
