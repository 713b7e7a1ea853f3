"""Codes chosen before the shards are written: a calibrated conversion's scratch folder.

A calibrated ``quantize`` (``finefp8.nn.calibrate``) chooses every weight's FP8 codes layer by
layer, in an order that has nothing to do with the input shards. It stages them in
``OUT/.finefp8-work/`` while it holds OUT's lock, and the shard writer then takes each staged
weight's ``(codes, scales)`` instead of computing DeepSeek-V3's ``amax/448`` + nearest rounding
(``workers._write_quantized``). Staged files:

* ``codes-<name>.safetensors``: for every staged weight key ``K``, ``K`` (F8_E4M3 ``[m, n]``) and
  ``K + STAGED_SCALE_SUFFIX`` (F32 ``[ceil(m/128), ceil(n/128)]``); ``__metadata__`` is the
  caller's (a layer index, the experts that fell back to the plain method...). Written
  atomically (``.partial``, fsync, rename), so a file that exists is whole.

The folder belongs to the conversion (``manifest.prepare_out`` never calls it foreign,
``manifest.remove_owned`` deletes it) and is removed once the conversion is complete.
``Calibration`` is what ``quantize_checkpoint(calibration=...)`` takes: the method's options
(part of the fingerprint, so a rerun with other options is refused instead of resumed), the
metadata for ``config.json`` and the function that stages the codes.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import ConversionError
from .reader import read_header, read_rows
from .writer import PARTIAL_SUFFIX, ShardWriter, fsync_dir

__all__ = ["WORK_DIR", "STAGED_SCALE_SUFFIX", "Calibration", "write_staged", "read_staged_meta",
           "staged_path", "StagedCodes", "remove_work_dir"]

WORK_DIR = ".finefp8-work"
STAGED_SCALE_SUFFIX = "::scale_inv"
_PREFIX = "codes-"


@dataclass
class Calibration:
    """A calibrated quantize: ``options`` (JSON-able, fingerprinted), ``metadata`` (written to
    ``config.json`` as ``"finefp8_calibration"``) and ``stage(work_dir, keys)``, which writes the
    codes of (a subset of) the planned 2-D weights ``keys`` into ``work_dir`` with
    ``write_staged`` and returns more metadata (merged into ``metadata``). ``stage`` runs under
    OUT's lock, after the resume decision and before any shard is written; it must itself skip
    what a previous run already staged."""

    options: dict
    metadata: dict
    stage: Callable[[Path, frozenset[str]], dict]
    result: dict = field(default_factory=dict)


def write_staged(work_dir: str | os.PathLike, name: str,
                 codes: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                 metadata: Mapping[str, str]) -> Path:
    """Write ``{key: (q [m, n] fp8, scale_inv [gm, gn] fp32)}`` atomically to
    ``work_dir/<name>.safetensors``; returns its path."""
    d = Path(work_dir)
    d.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for key, (q, s) in codes.items():
        if q.dtype != torch.float8_e4m3fn or q.dim() != 2:
            raise ValueError(f"staged codes of {key!r} must be 2-D float8_e4m3fn, got "
                             f"{q.dtype} {tuple(q.shape)}")
        tensors[key] = q.contiguous()
        tensors[key + STAGED_SCALE_SUFFIX] = s.to(torch.float32).contiguous()
    entries = [(k, "F8_E4M3" if t.dtype == torch.float8_e4m3fn else "F32", tuple(t.shape))
               for k, t in tensors.items()]
    path = staged_path(d, name)
    with ShardWriter(path, entries, dict(metadata)) as w:
        for k, t in tensors.items():
            w.write(k, t)
    fsync_dir(d)
    return path


def staged_path(work_dir: str | os.PathLike, name: str) -> Path:
    """Where ``write_staged(work_dir, name, ...)`` writes: ``work_dir/codes-<name>.safetensors``
    (other files in the folder, a caller's own, are not read as codes)."""
    return Path(work_dir) / f"{_PREFIX}{name}.safetensors"


def read_staged_meta(path: str | os.PathLike) -> dict[str, str] | None:
    """The ``__metadata__`` of a staged file, or ``None`` when it is missing or unreadable."""
    try:
        return read_header(path)[1]
    except (OSError, ValueError):
        return None


class StagedCodes:
    """The staged codes of ``work_dir``: ``get(key)`` -> ``(q, scale_inv)`` or ``None``."""

    def __init__(self, work_dir: str | os.PathLike):
        self.root = Path(work_dir)
        self._where: dict[str, tuple[str, object, object]] = {}
        if not self.root.is_dir():
            return
        for p in sorted(self.root.glob(_PREFIX + "*.safetensors")):
            infos, _ = read_header(p)
            for key, info in infos.items():
                if key.endswith(STAGED_SCALE_SUFFIX):
                    continue
                sinfo = infos.get(key + STAGED_SCALE_SUFFIX)
                if sinfo is None:
                    raise ConversionError(f"staged file {p} has codes {key!r} without scales; "
                                          f"delete {self.root} and rerun")
                self._where[key] = (p.name, info, sinfo)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def keys(self) -> list[str]:
        """Every staged weight key."""
        return sorted(self._where)

    def get(self, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(q [m, n] float8_e4m3fn, scale_inv [gm, gn] float32)`` of ``key``, read from disk."""
        hit = self._where.get(key)
        if hit is None:
            return None
        _, info, sinfo = hit
        return (read_rows(self.root, info, 0, info.shape[0]),
                read_rows(self.root, sinfo, 0, sinfo.shape[0]))


def remove_work_dir(out: str | os.PathLike) -> None:
    """Delete ``out/.finefp8-work`` (never through a symbolic link) and its ``.partial``."""
    d = Path(out) / WORK_DIR
    for p in (d, Path(str(d) + PARTIAL_SUFFIX)):
        if p.is_symlink():
            p.unlink()
        elif p.is_dir():
            shutil.rmtree(p)
