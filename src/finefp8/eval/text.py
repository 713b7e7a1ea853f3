"""The evaluation text and its tokens.

The default text is Python's own documentation (docs/eval.md):
``pydoc_data.topics.topics``, a dict of plain-English sections present in every CPython,
sorted by key and joined with blank lines. It differs between Python versions, so every
result records the Python version and the SHA-256 of the text.

Evaluation takes the first ``tokens`` tokens of the text, cut into non-overlapping windows
of ``window`` tokens; each window is scored on its own (its first token has no context and
is not scored). Calibration (GPTQ) takes its tokens from the *end* of the same token
stream, disjoint from the evaluation tokens.
"""

from __future__ import annotations

import hashlib
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["TextSource", "default_text", "read_text_file", "tokenize", "eval_windows",
           "calibration_windows"]


@dataclass(frozen=True)
class TextSource:
    """A text and how to identify it in a report.

    Attributes:
        text: the text itself.
        name: ``"pydoc_data.topics"`` or the file path.
        python_version: the interpreter's version (the default text depends on it).
        sha256: hex SHA-256 of ``text`` encoded as UTF-8.
    """

    text: str
    name: str
    python_version: str
    sha256: str

    @property
    def chars(self) -> int:
        """Length of the text in characters."""
        return len(self.text)


def _source(text: str, name: str) -> TextSource:
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return TextSource(text, name, platform.python_version(), digest)


def default_text() -> TextSource:
    """Python's documentation topics, sorted by key and joined with ``"\\n\\n"``."""
    from pydoc_data.topics import topics

    return _source("\n\n".join(topics[k] for k in sorted(topics)), "pydoc_data.topics")


def read_text_file(path: str | Path) -> TextSource:
    """A UTF-8 text file as a ``TextSource``; a clear error if it is missing, empty or not UTF-8."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--text {str(p)!r}: no such file")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"--text {str(p)!r} is not UTF-8 text ({exc})") from exc
    if not text.strip():
        raise ValueError(f"--text {str(p)!r} is empty")
    return _source(text, str(p))


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """All token ids of ``text`` (no special tokens added): 1-D int64 tensor."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def eval_windows(ids: torch.Tensor, tokens: int, window: int) -> list[torch.Tensor]:
    """The first ``tokens`` ids cut into windows of ``window`` (the last one may be shorter).

    Raises ``ValueError`` when the text has fewer than ``tokens`` tokens or a window of
    fewer than 2 tokens would result.
    """
    if tokens < 2 or window < 2:
        raise ValueError(f"--tokens ({tokens}) and --window ({window}) must both be at least 2")
    if ids.numel() < tokens:
        raise ValueError(f"the text has only {ids.numel()} tokens, fewer than --tokens {tokens}; "
                         f"pass a smaller --tokens or a longer --text")
    chunks = list(ids[:tokens].split(window))
    if chunks[-1].numel() < 2:
        chunks = chunks[:-1]
    return chunks


def calibration_windows(ids: torch.Tensor, eval_tokens: int, tokens: int,
                        window: int) -> list[torch.Tensor]:
    """``tokens`` ids from the end of the stream, in windows, disjoint from the first ``eval_tokens``.

    Raises ``ValueError`` when the text is too short for both.
    """
    if ids.numel() < eval_tokens + tokens:
        raise ValueError(f"the text has {ids.numel()} tokens: too few for {eval_tokens} evaluation "
                         f"tokens plus {tokens} disjoint calibration tokens; lower --tokens or "
                         f"--calib-tokens")
    return [c for c in ids[ids.numel() - tokens:].split(window) if c.numel() >= 2]
