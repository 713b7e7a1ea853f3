"""The errors of checkpoint conversion (``quantize`` / ``dequantize``)."""

from __future__ import annotations

__all__ = ["ConversionError", "ConversionInterrupted"]


class ConversionError(ValueError):
    """A conversion refused or failed; the message names the file/tensor and what to do."""


class ConversionInterrupted(ConversionError):
    """A conversion stopped by something outside its data (a worker process died): the
    finished shards are kept and rerunning the same command resumes."""

