"""The ``finefp8`` command line: one sub-command per job, each a thin layer over the library."""

from __future__ import annotations

import argparse
import math
import sys

from .formats import FORMATS
from .version import __version__


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


def _resolve_model(command: str, name: str, revision: str | None, purpose: str,
                   quiet: bool = False, stream_weights: bool = False):
    """A model argument (local path or Hub ID, ``finefp8.hub``) as a ``ResolvedModel``, or
    ``None`` after printing the error (``finefp8 COMMAND: ...``) on stderr."""
    from .hub import resolve_model

    try:
        return resolve_model(name, revision, purpose=purpose, progress=not quiet,
                             stream_weights=stream_weights)
    except (OSError, ValueError) as e:
        print(f"finefp8 {command}: {e}", file=sys.stderr)
        return None


def _command_line(args: argparse.Namespace) -> str:
    """The command as typed (``finefp8 quantize ...``), for a model card."""
    import shlex

    return shlex.join(["finefp8", *getattr(args, "argv", [])])


def _card_source(resolved, base_model: str | None):
    """The model card's ``CardSource`` of a resolved model argument."""
    from .checkpoint.card import CardSource

    if resolved.is_hub:
        return CardSource(resolved.repo_id, resolved.repo_id, resolved.revision, resolved.commit,
                          base_model or resolved.repo_id)
    return CardSource.from_path(resolved.path, base_model)


def _cmd_generate(args: argparse.Namespace) -> int:
    """Greedy generation with an FP8 checkpoint loaded by ``finefp8.load`` (FP8Linear layers)."""
    import time

    import torch

    from .checkpoint import CheckpointError
    from .nn import load

    resolved = _resolve_model("generate", args.checkpoint, args.revision, "generate")
    if resolved is None:
        return 1
    args.checkpoint = str(resolved.path)
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
    for line in getattr(res, "redone", []):
        print(f"finefp8 {name}: redone (failed its check against the manifest): {line}",
              file=sys.stderr)
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
    if getattr(res, "serving", None) is not None:
        from .checkpoint.serving import summary_lines

        for line in summary_lines(res.serving):
            print(f"finefp8 {name}: {line}", file=sys.stderr)


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
    from .checkpoint.serving import parse_tp

    try:
        tp = () if args.no_serving_check else parse_tp(args.tp)
    except ValueError as e:
        print(f"finefp8 quantize: {e}", file=sys.stderr)
        return 1
    resolved = _resolve_model("quantize", args.src, args.revision, "quantize", args.quiet,
                              stream_weights=True)
    if resolved is None:
        return 1
    layout = args.layout
    if args.format is not None:
        print("finefp8 quantize: --format is deprecated, use --layout", file=sys.stderr)
        layout = args.format
    from .checkpoint.card import CARD_NAME, write_card
    from .hub import StagedInput

    source = _card_source(resolved, args.base_model)
    # the card describes the quantization_config, which an IN without config.json cannot have
    with_card = resolved.path.is_dir() and (resolved.path / "config.json").is_file()

    def card(out) -> None:
        write_card(out, source, command=_command_line(args), ignore=args.ignore,
                   source_card_path=resolved.path / CARD_NAME)

    if args.calibrate:
        return _run_conversion("quantize", args, lambda: _quantize_calibrated(
            args, resolved, layout, tp, card, (CARD_NAME,)))

    def convert(src, before_shard=None):
        return quantize_checkpoint(
            src, args.dst, layout=layout, scale_fmt=args.scale_fmt,
            ignore=args.ignore, workers=args.workers, overwrite=args.overwrite,
            progress=not args.quiet, tp=tp, allow_nonfinite=args.allow_nonfinite,
            before_shard=before_shard, finish=card if with_card else None,
            extra_outputs=(CARD_NAME,) if with_card else ())

    def streamed():
        # a Hub model: plan from the shard headers, fetch shard i+1 while shard i converts
        with StagedInput(resolved, purpose="quantize", progress=not args.quiet) as staged:
            return convert(staged.root, staged.before_shard)

    return _run_conversion("quantize", args,
                           streamed if resolved.is_hub else lambda: convert(resolved.path))


def _calibration_tokens(args: argparse.Namespace, src):
    """The ``--calibrate`` token windows: ``--text`` (default: the evaluation's default text,
    from its end, disjoint from what ``finefp8 eval`` evaluates on) tokenized by IN's tokenizer;
    ``--calib-tokens`` of them, or by default up to ``DEFAULT_CALIB_TOKENS`` (all a shorter
    text has; the default text's first ``DEFAULT_TOKENS`` are left out)."""
    import torch
    from transformers import AutoTokenizer

    from .eval.options import DEFAULT_TOKENS
    from .eval.text import default_text, read_text_file
    from .nn.calibrate import DEFAULT_CALIB_TOKENS, CalibrationTokens, calibration_token_windows

    source = read_text_file(args.text) if args.text else default_text()
    try:
        tok = AutoTokenizer.from_pretrained(src)
    except (OSError, ValueError) as e:
        raise ValueError(f"--calibrate needs IN's tokenizer to tokenize the calibration text: "
                         f"{e}") from e
    ids = torch.tensor(tok(source.text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    tokens = args.calib_tokens
    if tokens is None:  # the default: up to DEFAULT_CALIB_TOKENS, what the text has
        # the default text's first DEFAULT_TOKENS are what `finefp8 eval` evaluates on
        usable = ids.numel() - (0 if args.text else DEFAULT_TOKENS)
        tokens = max(min(DEFAULT_CALIB_TOKENS, usable), 0)
        if tokens < DEFAULT_CALIB_TOKENS and not args.quiet:
            print(f"finefp8 quantize: the calibration text has {usable} usable tokens, fewer "
                  f"than the default {DEFAULT_CALIB_TOKENS}: calibrating on all of them",
                  file=sys.stderr)
    return CalibrationTokens(calibration_token_windows(ids, tokens), source.name, source.sha256)


def _quantize_calibrated(args: argparse.Namespace, resolved, layout: str, tp, card, extra):
    """``quantize --calibrate``: codes chosen layer by layer (finefp8.nn.calibrate)."""
    from .hub import StagedInput
    from .nn.calibrate import quantize_calibrated

    if args.scale_fmt != "fp32":
        raise ValueError("--calibrate chooses codes for fp32 block scales; drop --scale-fmt ue8m0")

    def run(src):
        res = quantize_calibrated(
            src, args.dst, _calibration_tokens(args, src), method=args.calibrate, layout=layout,
            ignore=args.ignore, tp=tp, overwrite=args.overwrite, progress=not args.quiet,
            allow_nonfinite=args.allow_nonfinite, min_expert_tokens=args.min_expert_tokens,
            act_quant_inputs=args.calib_hessian == "w8a8", target=args.calib_target,
            kv_hessian=args.kv_hessian, finish=card, extra_outputs=extra)
        meta = res.metadata
        if not args.quiet and "calibrated" in meta:
            print(f"finefp8 quantize: {meta['method']} calibrated {meta['calibrated']} weights "
                  f"on {meta['tokens']} tokens of {meta['text']}; plain: {len(meta['plain'])}"
                  + (f" ({', '.join(meta['plain'][:5])}...)" if meta["plain"] else ""),
                  file=sys.stderr)
        return res.conversion

    if resolved.is_hub:  # calibration reads every shard: fetch them all first
        from .checkpoint import CheckpointReader

        with StagedInput(resolved, purpose="quantize", progress=not args.quiet) as staged:
            with CheckpointReader(staged.root) as reader:
                shards = list(reader.shards)
            for name in shards:
                staged.before_shard(name)
            return run(staged.root)
    return run(resolved.path)


def _cmd_dequantize(args: argparse.Namespace) -> int:
    """Dequantize an FP8 block checkpoint (either layout) to bf16/fp16/fp32."""
    from .checkpoint.convert import dequantize_checkpoint

    resolved = _resolve_model("dequantize", args.src, args.revision, "dequantize", args.quiet)
    if resolved is None:
        return 1
    from .checkpoint.card import CARD_NAME, is_finefp8_card, restore_source_card

    # a finefp8 card (copied from IN) would call the output FP8: give back the source's card
    ours = resolved.path.is_dir() and is_finefp8_card(resolved.path)

    def convert(src):
        return dequantize_checkpoint(
            src, args.dst, dtype=args.dtype, workers=args.workers, overwrite=args.overwrite,
            progress=not args.quiet, allow_nonfinite=args.allow_nonfinite,
            finish=(lambda out: restore_source_card(out, args.src)) if ours else None,
            extra_outputs=(CARD_NAME,) if ours else ())

    def from_hub():
        from .hub import StagedInput

        # only the files dequantize uses: a cached snapshot may hold other weight formats
        with StagedInput(resolved, purpose="dequantize", stream=False) as staged:
            return convert(staged.root)

    return _run_conversion("dequantize", args,
                           from_hub if resolved.is_hub else lambda: convert(resolved.path))


def _cmd_inspect(args: argparse.Namespace) -> int:
    """Per-tensor report and TP support; exit 0 sound, 1 problems, 3 a TP degree refused."""
    import json

    from .checkpoint.inspect import inspect_checkpoint, print_report

    resolved = _resolve_model("inspect", args.checkpoint, args.revision, "inspect")
    if resolved is None:
        return 1
    args.checkpoint = str(resolved.path)
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


def _add_revision(p: argparse.ArgumentParser) -> None:
    p.add_argument("--revision", default=None, metavar="REV",
                   help="branch, tag or commit of a Hub ID (default main); see docs/hub.md")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every sub-command."""
    parser = argparse.ArgumentParser(prog="finefp8", description=__doc__)
    parser.add_argument("--version", action="version", version=f"finefp8 {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("formats", help="print the FP8 format constants")
    p.set_defaults(func=_cmd_formats)
    p = sub.add_parser("generate", help="greedy text generation with an FP8 checkpoint")
    p.add_argument("checkpoint", metavar="CKPT",
                   help="FP8 checkpoint directory (with tokenizer) or Hub ID org/name")
    _add_revision(p)
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (32)")
    p.add_argument("--mode", choices=("w8a8", "weight_only"), default="w8a8",
                   help="FP8Linear forward: W8A8 block-scaled GEMM (default) or weight-only")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="dtype of activations and non-FP8 weights (default: config.json's)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.set_defaults(func=_cmd_generate)
    p = sub.add_parser("quantize", help="quantize a checkpoint to FP8 128x128 blocks")
    p.add_argument("src", metavar="IN",
                   help="Hugging Face model directory (safetensors) or Hub ID org/name")
    _add_revision(p)
    p.add_argument("dst", metavar="OUT", help="output directory (created; must be empty)")
    p.add_argument("--layout", choices=("fp8", "compressed-tensors"), default="fp8",
                   help="on-disk layout: fp8 (DeepSeek/HF weight_scale_inv, default) or "
                        "compressed-tensors (FP8_BLOCK weight_scale)")
    p.add_argument("--format", choices=("fp8", "compressed-tensors"), default=None,
                   help="deprecated alias of --layout")
    p.add_argument("--scale-fmt", choices=("fp32", "ue8m0"), default="fp32",
                   help="block scales: fp32 amax/448 (default) or ue8m0 powers of two")
    p.add_argument("--ignore", nargs="+", default=[], metavar="PATTERN",
                   help="keep matching modules in high precision: glob, or re:REGEX")
    p.add_argument("--base-model", default=None, metavar="ORG/NAME",
                   help="Hub ID for the model card's base_model when IN is a local folder "
                        "(default: the Hub ID IN was resolved from)")
    p.add_argument("--tp", default="1", metavar="N[,M...]",
                   help="tensor-parallel degrees the output must serve at in vLLM/SGLang (1): "
                        "layers the engine would refuse or compute wrong stay bf16; 'none' = "
                        "no check")
    p.add_argument("--no-serving-check", action="store_true",
                   help="same as --tp none: quantize every Linear layer the rules allow")
    p.add_argument("--workers", type=int, default=1, help="shards converted in parallel (1)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a previous finefp8 conversion in OUT (removes only its files)")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="write NaN/Inf results (non-finite weights or scales, overflows) instead "
                        "of refusing")
    p.add_argument("--calibrate", choices=("gptq",), default=None,
                   help="choose the codes by GPTQ on calibration text, one decoder layer at a "
                        "time (same layout; fp32 scales)")
    p.add_argument("--text", default=None, metavar="FILE",
                   help="--calibrate: UTF-8 calibration text (default: the eval's default "
                        "text, its last tokens)")
    p.add_argument("--calib-tokens", type=int, default=None, metavar="N",
                   help="--calibrate: calibration tokens from the end of the text, in windows "
                        "of 1024 (default: 65536, or all the text has if fewer)")
    p.add_argument("--calib-hessian", choices=("float", "w8a8"), default="float",
                   help="--calibrate: GPTQ Hessians of the float inputs (default) or of the "
                        "1x128 FP8 inputs W8A8 computes with")
    p.add_argument("--kv-hessian", choices=("attention", "input"), default="attention",
                   help="--calibrate: k_proj / v_proj Hessians weighted by what their errors do "
                        "to the attention output, one per key/value head (attention, default), "
                        "or of their input as every other Linear (input)")
    p.add_argument("--calib-target", choices=("layer", "float-weights", "float-scales"),
                   default="layer",
                   help="--calibrate: what each FP8 layer is made to reproduce: its float weights "
                        "on the quantized model's inputs (layer, default), or the float model's "
                        "outputs through corrected weights (float-weights) or tuned block scales "
                        "(float-scales); docs/calibration.md")
    p.add_argument("--min-expert-tokens", type=int, default=16, metavar="N",
                   help="--calibrate: routed experts given fewer tokens keep plain rounding (16)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.set_defaults(func=_cmd_quantize)
    p = sub.add_parser("dequantize", help="dequantize an FP8 block checkpoint to bf16/fp16/fp32")
    p.add_argument("src", metavar="IN",
                   help="FP8 checkpoint (fp8 or compressed-tensors layout): folder or Hub ID")
    _add_revision(p)
    p.add_argument("dst", metavar="OUT", help="output directory (created; must be empty)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16",
                   help="dtype of the dequantized weights (bf16)")
    p.add_argument("--workers", type=int, default=1, help="shards converted in parallel (1)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a previous finefp8 conversion in OUT (removes only its files)")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="write NaN/Inf results (non-finite weights or scales, overflows) instead "
                        "of refusing")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.set_defaults(func=_cmd_dequantize)
    p = sub.add_parser("inspect", help="per-tensor report and tensor-parallel support")
    p.add_argument("checkpoint", metavar="CKPT",
                   help="checkpoint directory, .safetensors file or Hub ID org/name")
    _add_revision(p)
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
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
