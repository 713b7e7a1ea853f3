"""The command line's own commands (the others are tested with their packages)."""

from __future__ import annotations

import subprocess
import sys

import pytest

import finefp8
from finefp8.cli import main


def test_formats_table(capsys):
    assert main(["formats"]) == 0
    out = capsys.readouterr().out
    for needle in ("E4M3", "448", "2^-9 = 0.001953125", "57344", "2^-16", "float8_e8m0fnu", "0x7F, 0xFF"):
        assert needle in out


def test_version_and_help():
    r = subprocess.run([sys.executable, "-m", "finefp8.cli", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == f"finefp8 {finefp8.__version__}"
    with pytest.raises(SystemExit):
        main(["no-such-command"])
