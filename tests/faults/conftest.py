"""Fixtures of the fault-injection suite: one tiny source checkpoint and its reference
conversion, built once per session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from faultkit import make_ckpt  # noqa: E402

from finefp8.checkpoint.convert import quantize_checkpoint  # noqa: E402


@pytest.fixture(scope="session")
def src(tmp_path_factory) -> Path:
    """3 shards + index, config.json, tokenizer.json, generation_config.json."""
    return make_ckpt(tmp_path_factory.mktemp("faults") / "in")


@pytest.fixture(scope="session")
def ref(src, tmp_path_factory) -> Path:
    """The uninterrupted quantize of ``src`` (library defaults)."""
    out = tmp_path_factory.mktemp("faults-ref") / "out"
    quantize_checkpoint(src, out, progress=False, tp=())
    return out
