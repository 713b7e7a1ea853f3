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
    """Print the table of format constants (SPEC.md section 1)."""
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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every sub-command."""
    parser = argparse.ArgumentParser(prog="finefp8", description=__doc__)
    parser.add_argument("--version", action="version", version=f"finefp8 {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("formats", help="print the FP8 format constants")
    p.set_defaults(func=_cmd_formats)
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
