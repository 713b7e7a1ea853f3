"""Where the weight side of the FP8 error sits: weight-only KL by kind of projection.

The float32 SmolLM2-135M-Instruct is converted plainly and with ``quantize --calibrate gptq``
(``--calib-tokens`` from the end of the default text, each ``--kv-hessian`` asked for). For
each checkpoint and each kind of projection (q, k, v, o, gate, up, down), only that kind's
FP8 weights (dequantized ``q * s``) are put into the float model, activations float, and the
mean KL(float || that model) over the first ``--tokens`` tokens of the default text is
printed; ``all`` puts every FP8 weight in. The kinds add up to about ``all``, so the table
says which projections cost what.

    python benchmarks/kv_error_smollm2.py --calib-tokens 2048 32768
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def main(argv: list[str] | None = None) -> int:
    from safetensors.torch import load_file

    from finefp8 import ops
    from finefp8.checkpoint.convert import quantize_checkpoint
    from finefp8.eval.models import load_default_model
    from finefp8.eval.text import default_text, tokenize
    from finefp8.nn.calibrate import (
        KV_HESSIANS,
        CalibrationTokens,
        calibration_token_windows,
        quantize_calibrated,
    )

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=2048, help="evaluation tokens")
    p.add_argument("--calib-tokens", type=int, nargs="+", default=[2048])
    p.add_argument("--kv-hessian", nargs="+", choices=KV_HESSIANS, default=list(KV_HESSIANS))
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    loaded = load_default_model()
    model, tok = loaded.model.eval(), loaded.tokenizer
    text = default_text()
    ids = tokenize(tok, text.text)
    evals = ids[:args.tokens]

    def log_probs() -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([torch.log_softmax(model(w[None]).logits[0].double(), -1)
                              for w in evals.split(1024)])

    ref = log_probs()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in"
        model.save_pretrained(src)
        tok.save_pretrained(src)
        runs = {"plain": Path(tmp) / "plain"}
        quantize_checkpoint(src, runs["plain"], progress=False, tp=())
        for n in args.calib_tokens:
            calib = CalibrationTokens(calibration_token_windows(ids, n), text.name, text.sha256)
            for kv in args.kv_hessian:
                runs[f"gptq {n} tokens, kv {kv}"] = out = Path(tmp) / f"gptq-{n}-{kv}"
                quantize_calibrated(src, out, calib, progress=False, tp=(), kv_hessian=kv)
        weights = {name: load_file(str(d / "model.safetensors")) for name, d in runs.items()}

    def kl_with(t: dict[str, torch.Tensor], kind: str | None) -> float:
        keys = [k for k in t if k.endswith("proj.weight") and (kind is None or kind in k)]
        saved = {}
        with torch.no_grad():
            for k in keys:
                prm = model.get_submodule(k[:-len(".weight")]).weight
                saved[k] = prm.detach().clone()
                prm.copy_(ops.dequantize_blockwise(t[k], t[k + "_scale_inv"], (128, 128),
                                                   torch.float32))
        lp = log_probs()
        with torch.no_grad():
            for k, v in saved.items():
                model.get_submodule(k[:-len(".weight")]).weight.copy_(v)
        return float((ref.exp() * (ref - lp)).sum(-1).mean())

    print(f"weight-only KL (nats), first {evals.numel()} tokens of the default text")
    print("| checkpoint | all | " + " | ".join(k.replace("_proj", "") for k in KINDS) + " |")
    print("|---" * (len(KINDS) + 2) + "|")
    for name, t in weights.items():
        row = [kl_with(t, None)] + [kl_with(t, k) for k in KINDS]
        print(f"| {name} | " + " | ".join(f"{v:.5f}" for v in row) + " |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
