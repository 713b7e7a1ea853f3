"""The ``finefp8`` command line: one sub-command per job, each a thin layer over the library."""

from __future__ import annotations

import argparse
import sys

from . import __version__
from .formats import FORMATS


def _cmd_formats(args: argparse.Namespace) -> int:
    """Print the table of format constants (SPEC.md section 1)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="8-bit float formats")
    for col in ("format", "torch dtype", "bias", "max", "min normal", "min subnormal", "eps",
                "inf", "NaN codes"):
        table.add_column(col)
    for f in FORMATS.values():
        table.add_row(
            f.name.upper(), str(f.torch_dtype).replace("torch.", ""), str(f.bias), f"{f.max:g}",
            f"{f.min_normal:g}", "none" if f.min_subnormal is None else f"{f.min_subnormal:g}",
            f"{f.eps:g}", "yes" if f.has_inf else "no", ", ".join(f"0x{c:02X}" for c in f.nan_codes),
        )
    Console().print(table)
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
