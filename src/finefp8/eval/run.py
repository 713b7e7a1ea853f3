"""``evaluate``: run every variant on the same tokens and collect the numbers of the report.

Steps (each shown on the progress bar):

1. Load the model (``models.load_model``) and the text (``text.default_text`` or a file);
   tokenize it; the first ``tokens`` ids in windows of ``window`` are the evaluation set.
2. GPTQ only: the Hessians of every converted layer's input from ``calib_tokens`` ids taken
   from the end of the text (disjoint from the evaluation tokens).
3. Build each variant (``variants.build_variant``), timing the quantization.
4. Per-layer error, on the reference's own inputs to each layer (the first ``layer_tokens``
   evaluation tokens): weight error ``W`` vs ``Q*s``, activation error ``x`` vs
   ``dequant(quant(x))`` and output error ``x W^T`` vs the FP8 layer's output on ``x``.
5. For each window: the reference's logits, then each variant's; mean KL, top-1 agreement and
   perplexity (``metrics.TokenStats``), each variant's forward time summed.
6. With ``save_variant``: that variant's model is written with ``finefp8.nn.save_fp8`` (the
   ``"fp8"`` checkpoint layout, with the tokenizer).
7. Uncertainty: each variant's KL and top-1 standard errors over blocks of
   ``DEFAULT_BLOCK_TOKENS`` scored tokens, a bootstrap interval of its perplexity change, and a
   paired comparison with the DeepSeek-V3 baseline ``w8a8`` (``metrics.TokenStats``).

Determinism: the whole run holds ``torch.use_deterministic_algorithms(True)``, oneDNN's
deterministic mode and a fixed seed for torch's global generator (all restored afterwards);
the bootstrap draws from its own seeded generator. With the same thread count (recorded in
``machine.threads``) two runs on one machine give the same numbers; another thread count or
another CPU may round sums differently.
"""

from __future__ import annotations

import functools
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..nn import fp8_modules, resident_bytes, save_fp8
from ..nn.experts import FP8Experts
from ..nn.saving import check_destination
from ..quantization import BLOCK_SIZE
from ..version import __version__
from .metrics import (
    DEFAULT_BLOCK_TOKENS,
    DEFAULT_LEVEL,
    DEFAULT_RESAMPLES,
    DEFAULT_SEED,
    ErrorSums,
    TokenStats,
    block_sem,
)
from .models import load_model
from .moe import (
    capture_expert_inputs,
    collect_expert_hessians,
    convertible_experts,
    expert_layer_errors,
    parameter_counts,
)
from .options import DEFAULT_CALIB_TOKENS, DEFAULT_LAYER_TOKENS, DEFAULT_TOKENS, DEFAULT_WINDOW
from .text import calibration_windows, default_text, eval_windows, read_text_file, tokenize
from .variants import (
    DEFAULT_VARIANTS,
    VARIANTS,
    build_variant,
    checkpoint_bytes,
    collect_hessians,
    convertible_linears,
    linear_weight_bytes,
)

__all__ = ["EvalOptions", "evaluate", "check_save_variant", "DEFAULT_TOKENS", "DEFAULT_WINDOW",
           "DEFAULT_CALIB_TOKENS", "DEFAULT_LAYER_TOKENS"]



@dataclass
class EvalOptions:
    """What ``evaluate`` runs.

    Attributes:
        model: ``None`` for the embedded SmolLM2, else a HF folder or FP8 checkpoint folder,
            or a Hub ID ``org/name`` (``finefp8.hub``).
        revision: the Hub revision of ``model`` (``None``: main).
        text: ``None`` for Python's documentation, else a UTF-8 text file.
        tokens: evaluation tokens (the first ``tokens`` of the text).
        window: tokens per window; each window is scored independently.
        variants: keys of ``variants.VARIANTS`` to compare (``"reference"`` is always run).
        calib_tokens: calibration tokens for GPTQ, from the end of the text.
        layer_tokens: tokens whose per-layer errors are measured.
        threads: torch CPU threads (``None``: leave torch's setting).
        save_variant: ``(key, folder)``: write that variant (added to ``variants`` if missing)
            as an ``"fp8"`` checkpoint after the run; only 128x128-block W8A8 / weight-only
            variants can be saved.
    """

    model: str | None = None
    revision: str | None = None
    text: str | None = None
    tokens: int = DEFAULT_TOKENS
    window: int = DEFAULT_WINDOW
    variants: Sequence[str] = DEFAULT_VARIANTS
    calib_tokens: int = DEFAULT_CALIB_TOKENS
    layer_tokens: int = DEFAULT_LAYER_TOKENS
    threads: int | None = None
    save_variant: tuple[str, str] | None = None
    progress: object = field(default=None, repr=False)


class _Steps:
    """A thin wrapper over an optional ``rich.progress.Progress``: one task per step."""

    def __init__(self, progress) -> None:
        self.progress = progress
        self.task = None

    def start(self, description: str, total: float | None) -> None:
        if self.progress is None:
            return
        self.finish()
        self.task = self.progress.add_task(description, total=total)

    def advance(self, n: float = 1) -> None:
        if self.progress is not None and self.task is not None:
            self.progress.advance(self.task, n)

    def finish(self) -> None:
        if self.progress is not None and self.task is not None:
            task = self.progress.tasks[-1]
            done = task.total or max(task.completed, 1)  # an open-ended step ends as 1/1
            self.progress.update(self.task, total=done, completed=done)


def _check_variants(keys: Sequence[str]) -> list[str]:
    unknown = [k for k in keys if k not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    return ["reference"] + [k for k in dict.fromkeys(keys) if k != "reference"]


def check_save_variant(key: str, folder: str) -> None:
    """Refuse (``ValueError``/``FileExistsError``) a variant the ``"fp8"`` layout cannot hold, or
    a destination that is not new, before anything runs."""
    def saveable(cfg) -> bool:
        return (cfg is not None and cfg.mode in ("w8a8", "weight_only")
                and cfg.weight_block == BLOCK_SIZE)

    if key not in VARIANTS:
        raise ValueError(f"--save-variant: unknown variant {key!r}; choose from {list(VARIANTS)}")
    if not saveable(VARIANTS[key].config):
        ok = [k for k, v in VARIANTS.items() if saveable(v.config)]
        raise ValueError(f"--save-variant: {key!r} is not an FP8 variant with 128x128 weight "
                         f"blocks, so the fp8 checkpoint layout cannot hold it; saveable: "
                         f"{', '.join(ok)}")
    check_destination(folder)


def _capture_inputs(model: torch.nn.Module, names: list[str], ids: torch.Tensor) -> dict:
    """Each named layer's input when the model runs on ``ids [L]``: ``{name: [L, K]}`` fp32."""
    captured: dict[str, torch.Tensor] = {}
    handles = [model.get_submodule(n).register_forward_pre_hook(
        lambda _m, args, n=n: captured.__setitem__(n, args[0].detach().reshape(
            -1, args[0].shape[-1]).float().clone())) for n in names]
    try:
        with torch.no_grad():
            model(ids.unsqueeze(0))
    finally:
        for h in handles:
            h.remove()
    return captured


def _layer_errors(reference: torch.nn.Module, variant_model: torch.nn.Module,
                  inputs: dict[str, torch.Tensor], quantizes_acts: bool) -> list[dict]:
    """Weight, activation and output error of every FP8 layer of ``variant_model``."""
    rows = []
    fp8 = fp8_modules(variant_model)
    with torch.no_grad():
        for name, layer in fp8.items():
            if isinstance(layer, FP8Experts):  # one row per expert group (finefp8.eval.moe)
                rows += expert_layer_errors(reference, layer, name, inputs[name], quantizes_acts)
                continue
            ref = reference.get_submodule(name)
            w = ref.weight.detach().float()
            x = inputs[name]
            ws, acts, outs = ErrorSums(), ErrorSums(), ErrorSums()
            ws.add(w, layer.dequantize_weight(torch.float32))
            if quantizes_acts:
                acts.add(x, layer.fake_quantize_input(x))
            y_ref = torch.nn.functional.linear(x, w, None)
            outs.add(y_ref, layer(x.to(ref.weight.dtype)).float()
                     - (0 if layer.bias is None else layer.bias.float()))
            rows.append({
                "name": name,
                "shape": [layer.out_features, layer.in_features],
                "weight_snr_db": ws.snr_db if layer.config.mode != "act_only" else None,
                "weight_rel_error": ws.relative_error if layer.config.mode != "act_only" else None,
                "act_snr_db": acts.snr_db if quantizes_acts else None,
                "act_rel_error": acts.relative_error if quantizes_acts else None,
                "out_snr_db": outs.snr_db,
                "out_rel_error": outs.relative_error,
            })
    return rows


def _finite(v):
    """JSON-safe float: ``None`` for NaN or infinities."""
    return None if v is None or (isinstance(v, float) and not math.isfinite(v)) else v


#: Seed of torch's global generator during ``evaluate``.
EVAL_SEED = 0
#: The variant every other one is compared with, token by token, when it is in the run.
BASELINE_VARIANT = "w8a8"


def _deterministic(fn: Callable[[EvalOptions], dict]) -> Callable[[EvalOptions], dict]:
    """Run ``fn`` with deterministic algorithms (torch and oneDNN) and a seeded global
    generator; restore all three afterwards."""
    @functools.wraps(fn)
    def wrapper(options: EvalOptions) -> dict:
        was = torch.are_deterministic_algorithms_enabled()
        warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
        onednn = torch.backends.mkldnn.deterministic
        rng = torch.random.get_rng_state()
        torch.use_deterministic_algorithms(True)
        torch.backends.mkldnn.deterministic = True
        torch.manual_seed(EVAL_SEED)
        try:
            return fn(options)
        finally:
            torch.use_deterministic_algorithms(was, warn_only=warn_only)
            torch.backends.mkldnn.deterministic = onednn
            torch.random.set_rng_state(rng)
    return wrapper


def _uncertainty(stats: dict[str, TokenStats], key: str) -> dict:
    """The JSON fields of ``key``'s standard errors, interval and baseline comparison."""
    if key == "reference":
        return {"kl_sem": 0.0, "top1_sem": 0.0, "ppl_rel_change_ci": [0.0, 0.0],
                "vs_baseline": None}
    out = stats[key].uncertainty(stats["reference"])
    vs = None
    if BASELINE_VARIANT in stats and key != BASELINE_VARIANT:
        vs = {"baseline": BASELINE_VARIANT, **stats[key].compare(stats[BASELINE_VARIANT])}
    return _finite_tree({**out, "vs_baseline": vs})


def _finite_tree(obj):
    """``_finite`` applied to every float in nested dicts and lists."""
    if isinstance(obj, dict):
        return {k: _finite_tree(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite_tree(v) for v in obj]
    return _finite(obj)


def _sem_by_block(stats: dict[str, TokenStats]) -> dict:
    """Each variant's KL standard error with blocks of 1 (tokens independent), 16, 64 and 256
    tokens: how much the correlation between neighbouring tokens widens it."""
    return {k: {str(b): _finite(block_sem(torch.cat(s.kl_values), s.blocks(b)))
                for b in (1, 16, 64, 256)}
            for k, s in stats.items() if k != "reference"}


@_deterministic
def evaluate(options: EvalOptions) -> dict:
    """Run the evaluation described by ``options``; returns the JSON-ready summary.

    The summary's fields are documented in ``docs/eval.md``; ``kl_values`` (every position's
    KL, per variant) is returned under the private key ``"_kl_values"`` for the plots.
    """
    t_start = time.perf_counter()
    if options.threads:
        torch.set_num_threads(options.threads)
    variant_keys = list(options.variants)
    if options.save_variant is not None:
        check_save_variant(*options.save_variant)
        variant_keys.append(options.save_variant[0])
    keys = _check_variants(variant_keys)
    steps = _Steps(options.progress)

    steps.start("loading model", None)
    t0 = time.perf_counter()
    loaded = load_model(options.model, revision=options.revision)
    load_s = time.perf_counter() - t0
    reference = loaded.model
    source = default_text() if options.text is None else read_text_file(options.text)
    ids = tokenize(loaded.tokenizer, source.text)
    windows = eval_windows(ids, options.tokens, options.window)
    names = convertible_linears(reference)
    expert_names = convertible_experts(reference)
    if not names and not expert_names:
        raise ValueError(f"{loaded.name}: the model has no nn.Linear layer that FP8 converts")

    hessians = None
    calib_info = None
    if any(VARIANTS[k].calibration == "gptq" for k in keys):
        calib = calibration_windows(ids, options.tokens, options.calib_tokens, options.window)
        steps.start("calibration (GPTQ Hessians)", len(calib))
        t0 = time.perf_counter()
        hessians = collect_hessians(reference, names, calib, steps.advance)
        hessians.update(collect_expert_hessians(reference, expert_names, calib))
        calib_info = {"tokens": int(sum(c.numel() for c in calib)),
                      "first_token": int(ids.numel() - options.calib_tokens),
                      "last_token": int(ids.numel() - 1),
                      "seconds": time.perf_counter() - t0,
                      "note": "taken from the end of the text, disjoint from the evaluation tokens"}

    steps.start("quantizing variants", len(keys))
    models: dict[str, torch.nn.Module] = {}
    quant_s: dict[str, float] = {}
    search_cache: dict = {}
    for k in keys:
        t0 = time.perf_counter()
        models[k] = build_variant(reference, VARIANTS[k], hessians, search_cache)
        quant_s[k] = time.perf_counter() - t0
        steps.advance()
    uncalibrated = sorted(search_cache.get("uncalibrated", ()))
    search_cache.clear()
    if calib_info is not None:
        calib_info["uncalibrated"] = uncalibrated
        if uncalibrated:
            calib_info["uncalibrated_reason"] = (
                "routed experts that no calibration token was routed to: GPTQ has no Hessian "
                "for them, so they keep DeepSeek-V3's amax/448 scales and nearest rounding")

    steps.start("per-layer error", len(keys) - 1)
    sample = ids[: min(options.layer_tokens, options.tokens, options.window)]
    inputs = _capture_inputs(reference, names, sample)
    inputs.update(capture_expert_inputs(reference, expert_names, sample))
    layers = {}
    for k in keys[1:]:
        cfg = VARIANTS[k].config
        layers[k] = _layer_errors(reference, models[k], inputs, cfg.mode != "weight_only")
        steps.advance()
    del inputs

    steps.start(f"scoring {options.tokens} tokens x {len(keys)} variants",
                len(windows) * len(keys))
    stats = {k: TokenStats() for k in keys}
    fwd_s = dict.fromkeys(keys, 0.0)
    with torch.no_grad():
        for w in windows:
            batch, targets = w.unsqueeze(0), w[1:]
            t0 = time.perf_counter()
            ref_logits = reference(batch).logits[0, :-1].float()
            fwd_s["reference"] += time.perf_counter() - t0
            ref_lp = torch.log_softmax(ref_logits, -1)
            stats["reference"].add(ref_logits, ref_logits, targets, ref_lp)
            steps.advance()
            for k in keys[1:]:
                t0 = time.perf_counter()
                logits = models[k](batch).logits[0, :-1].float()
                fwd_s[k] += time.perf_counter() - t0
                stats[k].add(ref_logits, logits, targets, ref_lp)
                steps.advance()
    saved = None
    if options.save_variant is not None:
        key, folder = options.save_variant
        steps.start(f"saving {key}", 1)
        saved = {"key": key, "path": str(save_fp8(models[key], folder,
                                                  tokenizer=loaded.tokenizer))}
        steps.advance()
    steps.finish()

    ref_ppl = stats["reference"].ppl
    results = []
    for k in keys:
        v, s, m = VARIANTS[k], stats[k], models[k]
        results.append({
            "key": k,
            "label": v.label,
            "description": v.description,
            "config": None if v.config is None else v.config.describe(),
            "calibration": v.calibration,
            "kl": s.mean_kl,
            "top1": s.top1,
            "ppl": s.ppl,
            "ppl_rel_change": s.ppl / ref_ppl - 1.0,
            **_uncertainty(stats, k),
            "resident_bytes": resident_bytes(m),
            "resident_weight_bytes": linear_weight_bytes(m),
            "checkpoint_bytes": checkpoint_bytes(m),
            "wall_time_s": fwd_s[k],
            "quantize_time_s": quant_s[k],
            "layers": [{f: _finite(x) for f, x in row.items()} for row in layers.get(k, [])],
        })
    counts = parameter_counts(reference)
    summary = {
        "finefp8_version": __version__,
        "model": {"name": loaded.name, "source": loaded.source, "dtype": loaded.dtype,
                  "parameters": sum(p.numel() for p in reference.parameters()),
                  "fp8_layers": len(names), "experts_modules": len(expert_names),
                  "fp8_parameters": counts["fp8"], "expert_parameters": counts["experts"],
                  "fp8_parameter_share": counts["fp8"] / max(counts["total"], 1),
                  "load_time_s": load_s},
        "text": {"name": source.name, "python_version": source.python_version,
                 "sha256": source.sha256, "chars": source.chars, "tokens_total": int(ids.numel())},
        "tokens": options.tokens,
        "window": options.window,
        "windows": len(windows),
        "scored_tokens": stats["reference"].count,
        "layer_tokens": int(sample.numel()),
        "calibration": calib_info,
        "machine": {"platform": platform.platform(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                    "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
                    "seed": EVAL_SEED},
        "uncertainty": {"block_tokens": DEFAULT_BLOCK_TOKENS,
                        "blocks": int(stats["reference"].blocks().max()) + 1,
                        "bootstrap_resamples": DEFAULT_RESAMPLES, "level": DEFAULT_LEVEL,
                        "bootstrap_seed": DEFAULT_SEED, "baseline": (
                            BASELINE_VARIANT if BASELINE_VARIANT in stats else None),
                        "kl_sem_by_block_tokens": _sem_by_block(stats)},
        "variants": results,
        "saved_variant": saved,
        "wall_time_s": time.perf_counter() - t_start,
        "_kl_values": {k: stats[k].all_kl() for k in keys},
    }
    return summary
