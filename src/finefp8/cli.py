"""The ``finefp8`` command line: one sub-command per job, each a thin layer over the library."""

from __future__ import annotations

import argparse
import math
import sys

from . import __version__
from .formats import FORMATS


def _pow2_label(v: float | None) -> str:
    """``2^e`` for powers of two (with the decimal value when it is short), else ``%g``."""
    if v is None:
        return "none"
    m, e = math.frexp(v)
    if m != 0.5:
        return f"{v:g}"
    label = f"2^{e - 1}"
    return f"{label} = {v!r}" if len(repr(v)) <= 12 else label


def _cmd_formats(args: argparse.Namespace) -> int:
    """Print the table of format constants (docs/numerics.md)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="8-bit float formats")
    for col in ("format", "torch dtype", "bias", "max", "min normal", "min subnormal", "eps",
                "inf", "NaN codes"):
        table.add_column(col, no_wrap=True)
    for f in FORMATS.values():
        nans = ", ".join(f"0x{c:02X}" for c in f.nan_codes)
        table.add_row(
            f.name.upper(), str(f.torch_dtype).replace("torch.", ""), str(f.bias),
            f"{f.max:g}" if f.max < 1e6 else _pow2_label(f.max), _pow2_label(f.min_normal),
            _pow2_label(f.min_subnormal), _pow2_label(f.eps), "yes" if f.has_inf else "no", nans,
        )
    console = Console()
    console.width = max(console.width, 150)
    console.print(table)
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    """Greedy generation with an FP8 checkpoint loaded by ``finefp8.load`` (FP8Linear layers)."""
    import time

    import torch

    from .checkpoint import CheckpointError
    from .nn import load

    try:
        model = load(args.checkpoint, mode=args.mode, dtype=args.dtype)
    except (CheckpointError, ValueError, OSError) as e:
        print(f"finefp8 generate: {e}", file=sys.stderr)
        return 1
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(args.checkpoint)
    except (OSError, ValueError) as e:
        print(f"finefp8 generate: no usable tokenizer in {args.checkpoint}: {e}", file=sys.stderr)
        return 1
    if args.chat:
        if not getattr(tok, "chat_template", None):
            print(f"finefp8 generate: --chat: the tokenizer in {args.checkpoint} has no chat "
                  f"template", file=sys.stderr)
            return 1
        text = tok.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=False,
                                       add_generation_prompt=True)
        inputs = tok(text, return_tensors="pt", add_special_tokens=False)
    else:
        inputs = tok(args.prompt, return_tensors="pt")
    n_in = inputs["input_ids"].shape[1]
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None
                             else tok.eos_token_id)
    dt = time.perf_counter() - t0
    new = out[0, n_in:]
    print(args.prompt if not args.chat else "", end="")
    print(tok.decode(new, skip_special_tokens=True))
    print(f"[{len(new)} tokens in {dt:.2f} s, {len(new) / max(dt, 1e-9):.1f} tokens/s, "
          f"{args.mode}, greedy]", file=sys.stderr)
    return 0


def _checkpoint_errors() -> tuple[type[BaseException], ...]:
    """Errors a checkpoint command reports as a one-line message (exit status 1)."""
    from .checkpoint import CheckpointError
    from .checkpoint.convert import ConversionError
    from .checkpoint.writer import WriteError

    return CheckpointError, ConversionError, WriteError, OSError, ValueError


def _print_conversion(name: str, res, quiet: bool) -> None:
    if quiet:
        return
    if res.already_complete:
        print(f"finefp8 {name}: {res.out_dir} is already complete (same inputs and options)",
              file=sys.stderr)
        return
    rate = res.in_bytes / max(res.seconds, 1e-9) / 1e6
    resumed = f", {res.shards_resumed} resumed" if res.shards_resumed else ""
    print(f"finefp8 {name}: {res.quantized} weights converted, {res.copied} tensors copied, "
          f"{res.shards} shards{resumed}; {res.in_bytes / 1e9:.2f} GB read in {res.seconds:.1f} s "
          f"({rate:.0f} MB/s) -> {res.out_dir} ({res.out_bytes / 1e9:.2f} GB)", file=sys.stderr)


def _run_conversion(command: str, args: argparse.Namespace, convert) -> int:
    """Run a checkpoint conversion: its summary and exit 0, or its error on stderr and exit 1."""
    try:
        res = convert()
    except _checkpoint_errors() as e:
        print(f"finefp8 {command}: {e}", file=sys.stderr)
        return 1
    _print_conversion(command, res, args.quiet)
    return 0


def _cmd_quantize(args: argparse.Namespace) -> int:
    """Quantize a Hugging Face checkpoint to FP8 128x128 blocks (streaming, resumable)."""
    from .checkpoint.convert import quantize_checkpoint

    return _run_conversion("quantize", args, lambda: quantize_checkpoint(
        args.src, args.dst, fmt=args.format, scale_fmt=args.scale_fmt, ignore=args.ignore,
        workers=args.workers, overwrite=args.overwrite, progress=not args.quiet))


def _cmd_dequantize(args: argparse.Namespace) -> int:
    """Dequantize an FP8 block checkpoint (either layout) to bf16/fp16/fp32."""
    from .checkpoint.convert import dequantize_checkpoint

    return _run_conversion("dequantize", args, lambda: dequantize_checkpoint(
        args.src, args.dst, dtype=args.dtype, workers=args.workers, overwrite=args.overwrite,
        progress=not args.quiet))


def _cmd_inspect(args: argparse.Namespace) -> int:
    """Per-tensor report and TP support; exit 0 sound, 1 problems, 3 a TP degree refused."""
    import json

    from .checkpoint.inspect import inspect_checkpoint, print_report

    try:
        tp = [int(v) for v in args.tp.split(",") if v.strip()]
        if not tp or min(tp) < 1:
            raise ValueError(f"--tp needs positive integers, got {args.tp!r}")
        report = inspect_checkpoint(args.checkpoint, tp, scan_values=not args.no_scan)
    except _checkpoint_errors() as e:
        print(f"finefp8 inspect: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print_report(report)
    if not report["sound"]:
        return 1
    return 0 if all(v["ok"] for v in report["tp"].values()) else 3


def _cmd_eval(args: argparse.Namespace) -> int:
    """Compare FP8 variants of a model on the same tokens (``finefp8.eval``)."""
    from .eval.command import run_command

    return run_command(args)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every sub-command."""
    parser = argparse.ArgumentParser(prog="finefp8", description=__doc__)
    parser.add_argument("--version", action="version", version=f"finefp8 {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("formats", help="print the FP8 format constants")
    p.set_defaults(func=_cmd_formats)
    p = sub.add_parser("generate", help="greedy text generation with an FP8 checkpoint")
    p.add_argument("checkpoint", metavar="CKPT", help="FP8 checkpoint directory (with tokenizer)")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (32)")
    p.add_argument("--mode", choices=("w8a8", "weight_only"), default="w8a8",
                   help="FP8Linear forward: W8A8 block-scaled GEMM (default) or weight-only")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="dtype of activations and non-FP8 weights (default: config.json's)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.set_defaults(func=_cmd_generate)
    p = sub.add_parser("quantize", help="quantize a checkpoint to FP8 128x128 blocks")
    p.add_argument("src", metavar="IN", help="Hugging Face model directory (safetensors)")
    p.add_argument("dst", metavar="OUT", help="output directory (created; must be empty)")
    p.add_argument("--format", choices=("fp8", "compressed-tensors"), default="fp8",
                   help="on-disk layout: fp8 (DeepSeek/HF weight_scale_inv, default) or "
                        "compressed-tensors (FP8_BLOCK weight_scale)")
    p.add_argument("--scale-fmt", choices=("fp32", "ue8m0"), default="fp32",
                   help="block scales: fp32 amax/448 (default) or ue8m0 powers of two")
    p.add_argument("--ignore", nargs="+", default=[], metavar="PATTERN",
                   help="keep matching modules in high precision: glob, or re:REGEX")
    p.add_argument("--workers", type=int, default=1, help="shards converted in parallel (1)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.set_defaults(func=_cmd_quantize)
    p = sub.add_parser("dequantize", help="dequantize an FP8 block checkpoint to bf16/fp16/fp32")
    p.add_argument("src", metavar="IN", help="FP8 checkpoint (fp8 or compressed-tensors layout)")
    p.add_argument("dst", metavar="OUT", help="output directory (created; must be empty)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16",
                   help="dtype of the dequantized weights (bf16)")
    p.add_argument("--workers", type=int, default=1, help="shards converted in parallel (1)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.set_defaults(func=_cmd_dequantize)
    p = sub.add_parser("inspect", help="per-tensor report and tensor-parallel support")
    p.add_argument("checkpoint", metavar="CKPT", help="checkpoint directory or .safetensors file")
    p.add_argument("--tp", default="1,2,4,8,16", help="TP degrees to check (1,2,4,8,16)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--no-scan", action="store_true",
                   help="read headers and scales only (skip the NaN/Inf scan of every value)")
    p.set_defaults(func=_cmd_inspect)
    p = sub.add_parser("eval", help="accuracy and memory of FP8 variants of a model, with a report")
    from .eval.command import add_arguments as _eval_arguments

    _eval_arguments(p)
    p.set_defaults(func=_cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``finefp8`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
