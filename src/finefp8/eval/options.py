"""Defaults of ``finefp8 eval``, importable without torch (the CLI parser reads them)."""

from __future__ import annotations

__all__ = ["DEFAULT_TOKENS", "DEFAULT_WINDOW", "DEFAULT_CALIB_TOKENS", "DEFAULT_LAYER_TOKENS",
           "DEFAULT_REPORT_DIR", "VARIANT_KEYS",
           "DEFAULT_VARIANT_KEYS"]

#: Evaluation tokens and window of the default run (sized to finish in < 5 min on 2 cores).
DEFAULT_TOKENS = 3072
DEFAULT_WINDOW = 1024
#: GPTQ calibration tokens, taken from the end of the text.
DEFAULT_CALIB_TOKENS = 2048
#: Tokens whose per-layer errors are measured.
DEFAULT_LAYER_TOKENS = 256
DEFAULT_REPORT_DIR = "finefp8-report"
#: The variants, in report order (``finefp8.eval.variants.VARIANTS`` defines them); the
#: default run leaves out ``w8a8_mse`` (``--variants`` adds it).
VARIANT_KEYS = ("reference", "w8a8", "weight_only", "act_only", "per_tensor", "ue8m0", "w8a8_mse",
                "w8a8_gptq")
DEFAULT_VARIANT_KEYS = tuple(k for k in VARIANT_KEYS if k != "w8a8_mse")
