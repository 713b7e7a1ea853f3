"""Where the activation side of W8A8 loses accuracy on the embedded SmolLM2, and whether an
orthogonal rotation of the residual stream (QuaRot / SpinQuant style) would recover it.

The float32 SmolLM2-135M-Instruct, with weights left in float, gets DeepSeek-V3's dynamic 1x128
E4M3 activation quantization (``finefp8.nn.calibrate.fake_quantize_activation``: exactly what a
W8A8 layer's GEMM sees) on the inputs of one kind of projection at a time, and the KL to the
float model is measured on the first ``--tokens`` tokens of the default text (KL mean and
standard error as ``calibrate_smollm2.py`` computes them).

``--rotate``: the same, but for the projections that read an RMSNorm's output (q/k/v and
gate/up) the normalized input ``n`` is quantized in a rotated basis, ``R^T fq(R n)``, with ``R``
a random orthogonal matrix and the norm weight ``g`` applied after: exactly what a model whose
residual stream is rotated by ``R`` (``g`` folded into the projections, the norm weightless)
would compute, without building that model.

``--shrink A [A ...]``: instead, every Linear weight becomes ``W H (H + A D)^-1`` with ``H``
the second moment ``X^T X / T`` of its float inputs and ``D`` the diagonal of its measured
activation rounding noise ``mean((x - fq(x))^2)`` over the last ``--calib-tokens`` tokens of the
default text (a ridge shrinkage where the activation noise dominates), and all activations are
quantized; ``A = 0`` is the plain row.

    python benchmarks/act_error_smollm2.py --rotate
    python benchmarks/act_error_smollm2.py --shrink 0 0.1 0.3 1 --calib-tokens 8192
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from calibrate_smollm2 import summarize, token_stats  # noqa: E402

KINDS = {
    "all": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "q/k/v": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate/up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}
NORM_OF = {"q_proj": "input_layernorm", "k_proj": "input_layernorm",
           "v_proj": "input_layernorm", "gate_proj": "post_attention_layernorm",
           "up_proj": "post_attention_layernorm"}


def _hooks(model, parts: tuple[str, ...], rotation: torch.Tensor | None) -> list:
    from finefp8.nn.calibrate import fake_quantize_activation as fq

    handles = []
    for layer in model.model.layers:
        for name, mod in layer.named_modules():
            part = name.rsplit(".", 1)[-1]
            if part not in parts:
                continue
            if rotation is not None and part in NORM_OF:
                g = getattr(layer, NORM_OF[part]).weight.detach()

                def pre(_m, a, g=g):
                    return ((fq(a[0] / g @ rotation.T) @ rotation) * g,)
            else:
                def pre(_m, a):
                    return (fq(a[0]),)
            handles.append(mod.register_forward_pre_hook(pre))
    return handles


def _shrink(ref, ids: torch.Tensor, calib: torch.Tensor, strengths: list[float]) -> int:
    """The ``--shrink`` rows (module doc)."""
    import copy

    from finefp8.nn.calibrate import fake_quantize_activation as fq

    linears = {n: m for n, m in ref.named_modules()
               if isinstance(m, torch.nn.Linear) and ".layers." in n}
    second: dict[str, torch.Tensor] = {}
    noise: dict[str, torch.Tensor] = {}

    def collect(name):
        def pre(_m, a):
            x = a[0].reshape(-1, a[0].shape[-1]).double()
            e = x - fq(a[0]).reshape(x.shape).double()
            second[name] = second.get(name, 0) + x.T @ x
            noise[name] = noise.get(name, 0) + (e * e).sum(0)
        return pre

    handles = [m.register_forward_pre_hook(collect(n)) for n, m in linears.items()]
    with torch.no_grad():
        for w in calib:
            ref(w[None])
    for h in handles:
        h.remove()
    t = calib.numel()
    print("| activations quantized (1x128 E4M3), weights float | shrinkage A | KL (nats) +- s.e. |")
    print("|---|---|---|")
    for a in strengths:
        model = copy.deepcopy(ref)
        with torch.no_grad():
            for name, mod in model.named_modules():
                if name not in linears:
                    continue
                h = second[name] / t
                d = torch.diag(noise[name] / t * a)
                eye = torch.eye(h.shape[0], dtype=h.dtype) * 1e-8 * float(h.diag().mean())
                w = mod.weight.double()
                mod.weight.copy_(torch.linalg.solve(h + d + eye, h @ w.T).T.float())
                mod.register_forward_pre_hook(lambda _m, x: (fq(x[0]),))
        r = summarize(token_stats(ref, model, ids))
        print(f"| all | {a:g} | {r['kl']:.4f} +- {r['kl_se']:.4f} |", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    import copy

    from finefp8.eval.models import load_default_model
    from finefp8.eval.text import default_text, tokenize

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rotate", action="store_true", help="also the rotated-residual rows")
    p.add_argument("--shrink", type=float, nargs="+", default=None, metavar="A")
    p.add_argument("--calib-tokens", type=int, default=8192)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    loaded = load_default_model()
    ref = loaded.model.eval()
    ids = tokenize(loaded.tokenizer, default_text().text)[:args.tokens]
    if args.shrink is not None:
        all_ids = tokenize(loaded.tokenizer, default_text().text)
        return _shrink(ref, ids, all_ids[-args.calib_tokens:].reshape(-1, 1024), args.shrink)
    model = copy.deepcopy(ref)
    hidden = ref.config.hidden_size
    gen = torch.Generator().manual_seed(0)
    rot = torch.linalg.qr(torch.randn(hidden, hidden, generator=gen, dtype=torch.float64))[0]
    print("| activations quantized (1x128 E4M3) | residual stream | KL (nats) +- s.e. |")
    print("|---|---|---|")
    for kind, parts in KINDS.items():
        for rotated in ((False, True) if args.rotate and kind in ("q/k/v", "gate/up")
                        else (False,)):
            handles = _hooks(model, parts, rot.float() if rotated else None)
            try:
                r = summarize(token_stats(ref, model, ids))
            finally:
                for h in handles:
                    h.remove()
            print(f"| {kind} | {'rotated' if rotated else 'as is'} | "
                  f"{r['kl']:.4f} +- {r['kl_se']:.4f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
