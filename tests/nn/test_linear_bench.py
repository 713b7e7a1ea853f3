"""benchmarks/linear_bench.py runs end to end on small shapes and reports every variant."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "linear_bench.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("linear_bench", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_rows_and_memory(bench):
    rows = bench.run([(200, 576)], [1, 3], repeat=1, w8a8_max_tokens=512)
    assert len(rows) == 2 * 5
    by = {(r["tokens"], r["variant"]): r for r in rows}
    assert by[(1, "nn.Linear bf16")]["vs_bf16"] == 1.0
    assert by[(1, "nn.Linear fp32")]["bytes_per_param"] == 4.0
    assert by[(1, "nn.Linear bf16")]["bytes_per_param"] == 2.0
    fp8 = by[(3, "FP8 weight_only (bf16 x)")]
    assert fp8["bytes"] == 200 * 576 + 4 * 2 * 5  # codes + a 2x5 grid of fp32 scales
    assert all(r["ms"] > 0 for r in rows)


def test_main_writes_markdown(bench, tmp_path, capsys):
    out = tmp_path / "table.md"
    assert bench.main(["--shapes", "130x200", "--tokens", "2", "--repeat", "1",
                       "--markdown", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("| weight [out, in]") and text.count("\n") == 2 + 5
    assert "FP8 w8a8" in capsys.readouterr().out
