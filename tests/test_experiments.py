"""The experiments under experiments/ run at a tiny size and their claims hold qualitatively."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _load(name: str):
    """Import experiments/<name>.py (a script, not a package) as a module."""
    path = REPO / "experiments" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"experiments_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


acc = _load("accumulation")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One ``--quick`` run of experiments/accumulation.py: its return value, stdout and PNG."""
    png = tmp_path_factory.mktemp("accumulation") / "quick.png"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        run = acc.main(["--quick", "--seed", "0", "--out", str(png)])
    return run, out.getvalue(), png


def _err(results, **want) -> float:
    metric = want.pop("metric", "max_rel")
    return getattr(acc.pick(results, **want), metric)


def test_report_claim_holds(quick):
    """K = 4096, 14-bit accumulator: an error of the order of 2% unpromoted, >= 5x less at 128."""
    run, _, _ = quick
    c = run["claims"]
    assert 0.005 < c["never"] < 0.2
    assert c["reduction"] >= 5
    assert c["every128"] < 0.002


def test_error_grows_with_promotion_interval(quick):
    run, _, _ = quick
    cfg, results = run["config"], run["results"]
    for dist, metric in (acc.HEADLINE, acc.SECOND):
        errs = [_err(results, dist=dist, k=cfg.headline_k, promote=p, bits=cfg.accum_bits,
                     model="joint", metric=metric) for p in (*cfg.intervals, None)]
        assert all(a < b for a, b in zip(errs, errs[1:], strict=False)), (dist, errs)


def test_unpromoted_error_grows_with_k_promoted_does_not(quick):
    run, _, _ = quick
    cfg, results = run["config"], run["results"]
    k_small, k_big = min(cfg.ks), max(cfg.ks)
    common = dict(dist=acc.HEADLINE[0], bits=cfg.accum_bits, model="joint")
    never = [_err(results, k=k, promote=None, **common) for k in (k_small, k_big)]
    every = [_err(results, k=k, promote=128, **common) for k in (k_small, k_big)]
    assert never[1] > 4 * never[0]  # K grows 8x: roughly linear growth for positive inputs
    assert 0.5 < every[1] / every[0] < 2


def test_promotion_helps_every_distribution_and_model(quick):
    run, _, _ = quick
    cfg, results = run["config"], run["results"]
    for dist in acc.DISTRIBUTIONS:
        for model in acc.MODELS:
            never, every = acc.never_vs_128(results, dist, cfg.headline_k, cfg.accum_bits, model,
                                            "fro")
            assert never >= 5 * every, (dist, model, never, every)


def test_more_accumulator_bits_less_error(quick):
    run, _, _ = quick
    cfg, results = run["config"], run["results"]
    for model in acc.MODELS:
        for p in (None, 128):
            errs = [_err(results, dist=acc.HEADLINE[0], k=cfg.headline_k, promote=p, bits=b,
                         model=model) for b in cfg.bits]
            assert all(a > b for a, b in zip(errs, errs[1:], strict=False)), (model, p, errs)


def test_fp32_accumulation_is_near_exact(quick):
    run, _, _ = quick
    exact = [r for r in run["results"] if r.bits is None]
    assert exact and all(r.fro < 1e-6 for r in exact)
    assert all(r.max_rel < 1e-5 for r in exact if r.dist == acc.HEADLINE[0])


def test_outputs_written(quick):
    run, text, png = quick
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    assert not list(png.parent.glob("*.tmp.png"))
    assert "seed 0" in text and "| K | fp32 acc |" in text and "| accum_bits |" in text
    assert f"{run['claims']['reduction']:.0f}x" in text


def test_split_dot_truncates_below_accum_bits():
    """Known answers: 1 + 2**-14 needs 15 bits; with 14 the small product is cut off; the
    running sum is truncated too (toward zero, for both signs)."""
    a = torch.tensor([[1.0, 2.0**-14]], dtype=torch.float64)
    b = torch.ones(1, 2, dtype=torch.float64)
    assert acc.split_dot(a, b, 15).item() == 1 + 2.0**-14
    assert acc.split_dot(a, b, 14).item() == 1.0
    assert acc.split_dot(-a, b, 14).item() == -1.0
    # two steps of one product each: the register keeps 14 bits of 1 + 2**-14 -> 1
    assert acc.split_dot(a, b, 14, mma_k=1).item() == 1.0
    assert acc.split_dot(a, b, 15, mma_k=1).item() == 1 + 2.0**-14


def test_split_dot_exact_with_wide_accumulator():
    g = torch.Generator().manual_seed(1)
    a = torch.randn(5, 96, generator=g).to(torch.float8_e4m3fn).double()
    b = torch.randn(7, 96, generator=g).to(torch.float8_e4m3fn).double()
    assert torch.equal(acc.split_dot(a, b, 52), a @ b.T)


def test_operands_are_seeded_and_checked():
    x = acc.make_operands("normal", 4, 3, 256, seed=3)
    y = acc.make_operands("normal", 4, 3, 256, seed=3)
    z = acc.make_operands("normal", 4, 3, 256, seed=4)
    assert torch.equal(x.ref, y.ref) and not torch.equal(x.ref, z.ref)
    assert x.sa.shape == (4, 2) and x.sb.shape == (1, 2)
    with pytest.raises(ValueError, match="unknown distribution"):
        acc.make_operands("cauchy", 4, 3, 256, seed=0)
