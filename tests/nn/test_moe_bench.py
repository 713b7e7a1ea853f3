"""benchmarks/moe_bench.py runs end to end on small expert shapes and reports every variant."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("transformers")
BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "moe_bench.py"


def test_rows_ratios_and_memory():
    spec = importlib.util.spec_from_file_location("moe_bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.run(8, [1, 3], repeat=1, w8a8=True, hidden=256, intermediate=128)
    assert len(rows) == 2 * 4
    by = {(r["tokens"], r["variant"].split(" (")[0]): r for r in rows}
    assert by[(1, "transformers bf16")]["vs_bf16"] == 1.0
    params = 8 * 3 * 128 * 256
    assert by[(1, "transformers bf16")]["bytes"] == 2 * params
    # codes (1 byte a weight) + fp32 scales: gate/up 8x2x2 blocks, down 8x2x1 blocks
    assert by[(3, "FP8 weight_only")]["bytes"] == params + 4 * (8 * 2 * 2 + 8 * 2 * 1)
    assert by[(3, "FP8 w8a8")]["bytes"] == by[(3, "FP8 weight_only")]["bytes"]
    assert all(r["ms"] > 0 for r in rows)
