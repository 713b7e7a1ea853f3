"""Run-to-run determinism of ``evaluate``: the same numbers twice with the same thread count."""

from __future__ import annotations

import pytest
import torch

from finefp8.eval.run import EvalOptions, evaluate

#: Fields that measure time, not the model: they differ between runs.
TIMING = {"wall_time_s", "quantize_time_s", "load_time_s", "seconds"}


def _without_timing(obj):
    if isinstance(obj, dict):
        return {k: _without_timing(v) for k, v in obj.items() if k not in TIMING}
    if isinstance(obj, list):
        return [_without_timing(v) for v in obj]
    return obj


@pytest.mark.parametrize("n_threads", [1, 2])
def test_tiny_eval_twice_gives_identical_numbers(tiny_model_dir, tiny_text_file, n_threads):
    threads = torch.get_num_threads()
    opts = dict(model=str(tiny_model_dir), text=str(tiny_text_file), tokens=300, window=100,
                calib_tokens=200, layer_tokens=32, threads=n_threads,
                variants=("w8a8", "weight_only", "w8a8_gptq"))
    torch.manual_seed(123)
    first = evaluate(EvalOptions(**opts))
    torch.rand(7)  # the global generator moves between the runs: evaluate must not depend on it
    second = evaluate(EvalOptions(**opts))
    torch.set_num_threads(threads)
    assert not torch.are_deterministic_algorithms_enabled()  # restored after the run

    kl1, kl2 = first.pop("_kl_values"), second.pop("_kl_values")
    assert list(kl1) == list(kl2)
    for k in kl1:
        assert torch.equal(kl1[k], kl2[k]), k
    assert _without_timing(first) == _without_timing(second)  # exact, every float
    assert first["machine"]["threads"] == n_threads
    assert first["machine"]["deterministic_algorithms"]
    w8a8 = {v["key"]: v for v in first["variants"]}["w8a8"]
    assert w8a8["kl"] > 0 and w8a8["kl_sem"] > 0
    lo, hi = w8a8["ppl_rel_change_ci"]
    assert lo <= w8a8["ppl_rel_change"] <= hi
