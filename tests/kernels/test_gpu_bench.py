"""benchmarks/gpu_bench.py --smoke: the one-shot GPU benchmark, run on the CPU under the interpreter."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_bench.py"


@pytest.fixture(scope="module")
def gpu_bench():
    """The script as a module (registered while in use: its dataclass needs sys.modules)."""
    spec = importlib.util.spec_from_file_location("finefp8_gpu_bench", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    try:
        spec.loader.exec_module(mod)
        yield mod
    finally:
        sys.modules.pop(spec.name, None)


def test_smoke_run_writes_an_honest_report(gpu_bench, tmp_path, require_interpreter, capsys):
    out = tmp_path / "report" / "gpu_bench.md"
    assert gpu_bench.main(["--smoke", "--out", str(out)]) == 0
    text = out.read_text()
    printed = capsys.readouterr().out
    assert text in printed and "ran once, not timed" in printed
    assert "Triton interpreter" in text and "**nothing is timed**" in text
    assert "`python benchmarks/gpu_bench.py --smoke --out" in text
    correctness = text.split("## Correctness", 1)[1].split("\n## ", 1)[0]
    checks = [line for line in correctness.splitlines() if line.startswith(("| act_quant", "| weight_", "| Triton"))]
    assert len(checks) == 4 + 1 + 1 + 2 + 2 and all(line.endswith("| yes |") for line in checks)
    assert sum("Triton grouped_fp8_gemm" in line for line in checks) == 2
    assert all(" 0 of " in line for line in checks if "codes" in line)
    # every GEMM shape and kernel ran once, with no figure in the tables
    rows = [line for line in text.splitlines() if line.startswith(("| 1 |", "| 16 |"))]
    assert len(rows) == len(gpu_bench.SMOKE_M) * len(gpu_bench.SMOKE_NK)
    assert all(r.endswith("| — | — | — | — | — | — |") for r in rows)  # no time, no ratio, no tuning
    # every grouped GEMM shape ran once (grouped kernel, per-expert loop, bf16), untimed
    experts, topk, nks, tokens = gpu_bench.SMOKE_GROUPED
    grouped = [line for line in text.split("## Grouped GEMM", 1)[1].split("\n## ", 1)[0].splitlines()
               if line.startswith("| ") and "x" in line.split("|")[1] and "---" not in line][1:]
    assert len(grouped) == len(nks) * len(tokens)
    assert all(r.endswith("| — | — | — | — | — | — |") for r in grouped)
    kernels = [line for line in text.split("## Quantization", 1)[1].splitlines() if line.startswith("| ")][1:]
    assert len(kernels) == 3 and all(line.endswith("| — | — |") for line in kernels)
    assert "torch._scaled_mm block-wise not checked or timed: needs a CUDA device" in text


def test_render_of_a_timed_run(gpu_bench):
    rep = gpu_bench.Report(command="python benchmarks/gpu_bench.py", device="H200", smoke=False)
    rep.checks.append(("Triton fp8_gemm", "64x2112x7168", "rel. error 1e-07", "< 1e-03", True))
    rep.gemm = [{"M": 4096, "N": 7168, "K": 2048, "triton": 0.1, "scaled_mm": None, "bf16": 0.2, "tune_s": 1.5},
                {"M": 64, "N": 2112, "K": 7168, "skipped": "time budget"}]
    rep.quant = [{"kernel": "act_quant", "shape": "4096x7168", "gbs": 3000.0}]
    rep.copy_gbs = 4000.0
    text = gpu_bench.render(rep)
    flop = 2 * 4096 * 7168 * 2048
    assert f"| 4096 | 7168 | 2048 | {flop / 0.1 / 1e9:.0f} | — | {flop / 0.2 / 1e9:.0f} | 2.00 | — | 1.5 |" in text
    assert "| 64 | 2112 | 7168 | skipped (time budget) |" in text
    assert "| act_quant | 4096x7168 | 3000 | 75% |" in text
    rep.grouped = [{"E": 256, "topk": 8, "N": 4096, "K": 7168, "tokens": 16, "busy": 100,
                    "grouped": 0.1, "loop": 0.5, "bf16": 0.2, "tune_s": 2.0},
                   {"E": 256, "topk": 8, "N": 7168, "K": 2048, "tokens": 4096, "skipped": "time budget"}]
    text = gpu_bench.render(rep)
    assert "| 4096x7168 | 256 | 8 | 16 | 100 | 0.1000 | 0.5000 | 0.2000 | 5.00 | 2.00 | 2.0 |" in text
    assert "| 7168x2048 | 256 | 8 | 4096 | skipped (time budget) |" in text
    rep.checks.append(("weight_quant", "1x1", "codes differing 1%", "0", False))
    assert "nothing was timed" in gpu_bench.render(rep)
