"""Streaming, resumable, locked checkpoint conversion: ``quantize_checkpoint`` (BF16/FP16/FP32
-> FP8 blocks) and ``dequantize_checkpoint`` (either FP8 layout -> BF16/FP16/FP32).

A conversion IN -> OUT, and the module that does each step:

1. Read and check IN before any byte is written (``reader``: every safetensors header
   against the format's rules, the index, config.json; ``validate``: for dequantize, every
   scale finite, positive and floating-point, and no overflow of the output dtype).
2. Plan every output tensor (``plan``): its action and why, so every output byte count is
   known and free disk is checked first.
3. Take the exclusive lock on OUT (``lock``) for the whole run; a second writer is refused.
4. Decide how to continue from what OUT holds (``manifest.prepare_out``): fresh, resume
   (finished shards kept only when their SHA-256 still matches), already complete, or
   refused; ``overwrite`` removes only the files a finefp8 conversion wrote.
5. Write the shards (``workers``: in this process or in worker processes that die with it),
   recording each finished one's size and SHA-256 in the manifest.
6. Last: the other files of IN, ``model.safetensors.index.json`` (``metadata.total_size`` =
   the sum of tensor bytes), ``config.json``, then the manifest's ``"status": "complete"``.
   Until then OUT has no config.json: it never looks loadable.

An error in the data (NaN weights, an overflow) removes what this run wrote, since a rerun
cannot succeed without fixing IN; an interruption (kill, SIGTERM, full disk, a dead worker)
keeps the finished shards, and the same command resumes.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import os
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConversionError, ConversionInterrupted
from .layout import (
    COMPRESSED_TENSORS,
    FP8,
    LAYOUTS,
    OTHER_WEIGHT_FORMATS,
    quantization_config,
    skip_reason,
)
from .lock import LOCK_NAME, OutLock
from .manifest import (
    MANIFEST_NAME,
    file_sha256,
    fingerprint,
    prepare_out,
    record_done,
    remove_owned,
    write_manifest,
)
from .plan import DTYPES, OutTensor, ShardPlan, plan_dequantize, plan_quantize
from .progress import Progress
from .reader import INDEX_NAME, CheckpointError, CheckpointReader, block_size_of
from .staged import WORK_DIR, Calibration, remove_work_dir
from .validate import check_dequantize_overflow, check_scales
from .workers import (
    CHUNK_ELEMENTS,
    COPY_CHUNK_BYTES,
    ShardOptions,
    ShardResult,
    run_shards,
    signals_as_exceptions,
)
from .writer import PARTIAL_SUFFIX, atomic_write_bytes, write_error

__all__ = [
    "MANIFEST_NAME",
    "LOCK_NAME",
    "CHUNK_ELEMENTS",
    "COPY_CHUNK_BYTES",
    "DTYPES",
    "ConversionError",
    "OutTensor",
    "ShardPlan",
    "ConversionResult",
    "plan_quantize",
    "plan_dequantize",
    "quantize_checkpoint",
    "dequantize_checkpoint",
]

DISK_MARGIN = 16 * 1024 * 1024


@dataclass
class ConversionResult:
    """What a conversion did. ``redone``: finished files found missing or changed (SHA-256)
    and written again."""

    out_dir: Path
    shards: int = 0
    shards_resumed: int = 0
    quantized: int = 0
    copied: int = 0
    in_bytes: int = 0
    out_bytes: int = 0
    seconds: float = 0.0
    already_complete: bool = False
    kept: list[str] = field(default_factory=list)
    redone: list[str] = field(default_factory=list)
    serving: object | None = None  # serving.ServingPlan of quantize(tp=...), else None


# ----------------------------------------------------------------------------- OUT


def _check_out_path(src: Path, dst: Path) -> None:
    """Refuse an OUT that is a symbolic link, not a directory, inside IN or containing it."""
    if dst.is_symlink():
        raise ConversionError(f"OUT {dst} is a symbolic link (to {os.readlink(dst)}); finefp8 "
                              f"does not write or delete through links. Pass the target "
                              f"directory itself")
    s, d = src.resolve(), dst.resolve()
    if s == d or s in d.parents or d in s.parents:
        raise ConversionError(f"OUT {dst} must be a directory outside IN {src} "
                              f"(and not contain it)")
    if dst.exists() and not dst.is_dir():
        raise ConversionError(f"OUT {dst} exists and is not a directory")


def _other_files(reader: CheckpointReader) -> list[Path]:
    """Files of IN copied as they are: everything but the shards (whatever their names), the
    index, config.json, finefp8's own files, hidden folders, and the weights in any other
    serialization (``layout.OTHER_WEIGHT_FORMATS``: the same weights again, unconverted)."""
    src = reader.root
    skip = {INDEX_NAME, "config.json", MANIFEST_NAME, LOCK_NAME, "pytorch_model.bin.index.json",
            *reader.shards}
    out = []
    for p in sorted(src.rglob("*")):
        rel = p.relative_to(src)
        if not p.is_file() or rel.parts[0].startswith(".") or p.name.endswith(PARTIAL_SUFFIX):
            continue
        if len(rel.parts) == 1 and (p.name in skip or p.suffix == ".safetensors"):
            continue
        if any(fnmatch.fnmatch(p.name, pattern) for pattern in OTHER_WEIGHT_FORMATS):
            continue
        out.append(p)
    return out


def _copy_file(src: Path, dst: Path) -> tuple[int, str]:
    """Copy ``src`` to ``dst`` atomically (``.partial``, fsync, rename); returns the size and
    SHA-256 of the bytes copied."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + PARTIAL_SUFFIX)
    h, size = hashlib.sha256(), 0
    try:
        with open(src, "rb") as fi, open(tmp, "wb") as fo:
            while buf := fi.read(COPY_CHUNK_BYTES):
                fo.write(buf)
                h.update(buf)
                size += len(buf)
            fo.flush()
            os.fsync(fo.fileno())
        os.replace(tmp, dst)
    except OSError as e:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise write_error(dst, e) from e
    return size, h.hexdigest()


def _write_json(path: Path, obj: dict) -> tuple[int, str]:
    data = (json.dumps(obj, indent=2) + "\n").encode()
    atomic_write_bytes(path, data)
    return len(data), hashlib.sha256(data).hexdigest()


def _check_disk(dst: Path, needed: int) -> None:
    free = shutil.disk_usage(dst).free
    if free < needed + DISK_MARGIN:
        raise ConversionError(f"not enough free disk for {dst}: the conversion writes "
                              f"{needed / 1e9:.2f} GB, {free / 1e9:.2f} GB is free. Free space or "
                              f"choose another OUT")


def _plan_digest(plans: Sequence[ShardPlan]) -> str:
    """SHA-256 of every planned output tensor (shard, key, dtype, shape, action): two runs
    whose plans agree (``--ignore`` and ``--tp`` spelled differently, say) resume each other."""
    rows = [[p.name, t.key, t.dtype, list(t.shape), t.action] for p in plans for t in p.tensors]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def _remove_dir_if_empty(dst: Path) -> None:
    try:
        dst.rmdir()
    except OSError:
        pass


# ----------------------------------------------------------------------------- the driver


@dataclass
class _Job:
    """Everything ``_run`` needs besides OUT: the reader, the plan and what to write last.

    ``extra_outputs`` / ``finish``: files written by ``finish(out_dir)`` after config.json
    (a model card...); they are declared up front so that they count as finefp8's own."""

    reader: CheckpointReader
    plans: list[ShardPlan]
    options: dict
    config: dict | None
    shard_options: ShardOptions
    label: str
    extra_outputs: Sequence[str] = ()
    finish: Callable[[Path], None] | None = None
    before_shard: Callable[[str], None] | None = None
    calibration: Calibration | None = None


def _run(job: _Job, dst: Path, workers: int, overwrite: bool, progress: bool) -> ConversionResult:
    """Lock OUT, then convert (see the module doc); OUT is created when missing and removed
    again when this run refuses or fails before leaving anything of its own in it."""
    src = job.reader.root
    _check_out_path(src, dst)
    created = not os.path.lexists(dst)
    try:
        dst.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConversionError(f"cannot create OUT {dst}: {e.strerror or e}") from e
    try:
        with signals_as_exceptions(), OutLock(dst):
            return _run_locked(job, dst, workers, overwrite, progress)
    finally:
        if created:
            _remove_dir_if_empty(dst)


def _run_locked(job: _Job, dst: Path, workers: int, overwrite: bool,
                progress: bool) -> ConversionResult:
    t0 = time.perf_counter()
    reader, plans = job.reader, job.plans
    src = reader.root
    others = _other_files(reader)
    tail = [str(f.relative_to(src)) for f in others]
    tail += [INDEX_NAME] if reader.has_index else []
    tail += ["config.json"] if job.config is not None else []
    tail += list(job.extra_outputs)
    outputs = [p.name for p in plans] + tail
    options = dict(job.options, plan=_plan_digest(plans), config=job.config)
    manifest, redone = prepare_out(dst, fingerprint(reader, options), outputs,
                                   [p.name for p in plans], overwrite)
    result = ConversionResult(out_dir=dst, shards=len(plans), redone=redone)
    if manifest["status"] == "complete":
        result.already_complete = True
        return result
    pending = [p for p in plans if p.name not in manifest["done"]]
    result.shards_resumed = len(plans) - len(pending)
    _check_disk(dst, sum(p.out_bytes for p in pending) + sum(f.stat().st_size for f in others))
    write_manifest(dst, manifest)
    shard_options = job.shard_options
    if job.calibration is not None:  # codes chosen layer by layer first (staged.py)
        work = dst / WORK_DIR
        keys = frozenset(t.key for p in plans for t in p.tensors
                         if t.action == "quantize" and len(t.shape) == 2)
        try:
            job.calibration.result = dict(job.calibration.stage(work, keys))
        except (ConversionError, CheckpointError, ValueError) as e:
            if isinstance(e, ConversionInterrupted):
                raise
            remove_owned(dst, manifest)  # bad data: a rerun cannot succeed without fixing IN
            raise
        shard_options = dataclasses.replace(shard_options, staged_dir=str(work))
        if job.config is not None:
            job.config = dict(job.config, finefp8_calibration=dict(
                job.calibration.metadata, **job.calibration.result))

    bar = Progress(progress, sum(p.in_bytes for p in pending),
                   sum(sum(t.action != "scale" for t in p.tensors) for p in pending), job.label)

    def done(r: ShardResult) -> None:
        record_done(manifest, r.name, r.size, r.sha256)
        write_manifest(dst, manifest)

    try:
        run_shards(src, dst, pending, shard_options, workers, bar.advance, done,
                   job.before_shard)
    except (ConversionError, CheckpointError) as e:
        bar.close()
        if not isinstance(e, ConversionInterrupted):
            remove_owned(dst, manifest)  # bad data: a rerun cannot succeed without fixing IN
        raise
    finally:
        bar.close()

    for f in others:
        rel = str(f.relative_to(src))
        record_done(manifest, rel, *_copy_file(f, dst / rel))
    if reader.has_index:
        index = json.loads((src / INDEX_NAME).read_text(encoding="utf-8"))
        meta = dict(index.get("metadata") or {})
        meta["total_size"] = sum(p.data_bytes for p in plans)
        weight_map = {t.key: p.name for p in plans for t in p.tensors}
        record_done(manifest, INDEX_NAME, *_write_json(
            dst / INDEX_NAME, {"metadata": meta, "weight_map": dict(sorted(weight_map.items()))}))
    if job.config is not None:
        record_done(manifest, "config.json", *_write_json(dst / "config.json", job.config))
    if job.finish is not None:
        job.finish(dst)
        for rel in job.extra_outputs:
            record_done(manifest, rel, (dst / rel).stat().st_size, file_sha256(dst / rel))
    manifest["status"] = "complete"
    write_manifest(dst, manifest)
    remove_work_dir(dst)

    result.in_bytes = sum(p.in_bytes for p in pending)
    result.out_bytes = sum((dst / p.name).stat().st_size for p in plans)
    result.quantized = sum(t.action in ("quantize", "dequantize") for p in plans for t in p.tensors)
    result.copied = sum(t.action == "copy" for p in plans for t in p.tensors)
    result.seconds = time.perf_counter() - t0
    return result


def quantize_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, *, layout: str = FP8,
                        scale_fmt: str = "fp32", ignore: Sequence[str] = (), workers: int = 1,
                        overwrite: bool = False, progress: bool = True,
                        allow_nonfinite: bool = False, tp: Sequence[int] = (1,),
                        fmt: str | None = None,
                        before_shard: Callable[[str], None] | None = None,
                        finish: Callable[[Path], None] | None = None,
                        extra_outputs: Sequence[str] = (),
                        calibration: Calibration | None = None) -> ConversionResult:
    """Quantize the checkpoint in ``src`` to DeepSeek-style FP8 blocks in ``dst``.

    Every 2-D Linear ``*.weight`` (see ``layout.skip_reason``) becomes F8_E4M3 ``Q`` with
    F32 block scales ``s = amax / 448`` (``scale_fmt="ue8m0"``: rounded up to a power of two),
    ``W ~= Q * s`` per 128x128 block; the scale is ``weight_scale_inv`` (``layout="fp8"``) or
    ``weight_scale`` (``layout="compressed-tensors"``). Everything else is copied byte for
    byte. Resumable: rerun the same call after an interruption. NaN/Inf weights, and codes
    whose ``Q * s`` overflows the weight's dtype, are refused (tensor and block named) unless
    ``allow_nonfinite``. A ``src`` without ``config.json`` is refused (the output would have
    no ``quantization_config``). ``tp``: TP degrees the output
    must serve at (default TP 1, as ``finefp8 quantize``); the engine layers vLLM would refuse
    or compute wrong in FP8 at one of them are kept in high precision
    (``serving.serving_decide``; ``result.serving`` reports them). ``tp=()`` turns the check
    off: every Linear weight the naming rules allow is quantized.
    ``fmt`` is the deprecated name of ``layout``.

    ``before_shard(name)`` is called before input shard ``name`` is read (a Hub model streamed
    shard by shard, ``finefp8.hub.StagedInput``). ``finish(dst)`` writes the files
    ``extra_outputs`` (relative names: the model card ``README.md``) after config.json and
    before the manifest says complete, so they count as the conversion's own files.

    ``calibration`` (``staged.Calibration``, built by ``finefp8.nn.calibrate``): codes chosen by
    a calibrated method are staged in ``OUT/.finefp8-work/`` under the lock before the shards
    are written, and replace the plain codes of the weights they cover (same layouts, same
    keep-rules); its options join the fingerprint and its metadata goes into ``config.json``
    as ``"finefp8_calibration"``. Only fp32 scales.
    """
    if fmt is not None:
        warnings.warn("quantize_checkpoint(fmt=...) is deprecated: use layout=...",
                      DeprecationWarning, stacklevel=2)
        layout = fmt
    if layout not in LAYOUTS:
        raise ConversionError(f"unknown --layout {layout!r}; expected one of {LAYOUTS}")
    if layout == COMPRESSED_TENSORS and scale_fmt != "fp32":
        raise ConversionError("--scale-fmt ue8m0 is only for --layout fp8 (compressed-tensors has "
                              "no power-of-two scale flag)")
    if scale_fmt not in ("fp32", "ue8m0"):
        raise ConversionError(f"unknown --scale-fmt {scale_fmt!r}; expected fp32 or ue8m0")
    if calibration is not None and scale_fmt != "fp32":
        raise ConversionError("--calibrate chooses codes for fp32 block scales; drop "
                              "--scale-fmt ue8m0")
    src, dst = Path(src), Path(dst)
    with CheckpointReader(src) as reader:
        decide, serving = skip_reason, None
        if tp:
            from .serving import serving_decide

            tensors = [(k, reader.shape(k), reader.st_dtype(k)) for k in reader.keys()]
            decide, serving = serving_decide(tensors, reader.config, tuple(tp), layout,
                                             tuple(ignore))
        plans, kept = plan_quantize(reader, layout, tuple(ignore), decide=decide)
        config = None
        if (reader.root / "config.json").is_file():
            config = dict(reader.config)
            config["quantization_config"] = quantization_config(layout, scale_fmt, kept)
        else:
            raise ConversionError(f"{src} has no config.json: the output would have no "
                                  f"quantization_config, so transformers, vLLM and SGLang would "
                                  f"not know its weights are FP8. Add the model's config.json "
                                  f"to IN and rerun")
        options = {"op": "quantize", "layout": layout, "scale_fmt": scale_fmt,
                   "allow_nonfinite": allow_nonfinite}
        if calibration is not None:
            options["calibration"] = calibration.options
        job = _Job(reader, plans, options, config,
                   ShardOptions(scale_fmt, (128, 128), allow_nonfinite), "quantize",
                   tuple(extra_outputs), finish, before_shard, calibration)
        result = _run(job, dst, workers, overwrite, progress)
    result.kept = kept
    result.serving = serving
    return result


def dequantize_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, *, dtype: str = "bf16",
                          workers: int = 1, overwrite: bool = False, progress: bool = True,
                          allow_nonfinite: bool = False,
                          finish: Callable[[Path], None] | None = None,
                          extra_outputs: Sequence[str] = ()) -> ConversionResult:
    """Dequantize an FP8 block checkpoint (``fp8`` or ``compressed-tensors`` layout) in ``src``
    to ``dtype`` (``"bf16"``, ``"fp16"``, ``"fp32"``) in ``dst``: ``W = Q * s`` per block,
    scales dropped, ``quantization_config`` removed from config.json, all else copied.

    Before anything is written, every scale is checked (floating-point, finite, > 0) and every
    weight whose scales allow an overflow of ``dtype`` is dequantized once to check it
    (fp16 tops out at 65504); a problem is a ``ConversionError`` naming the tensor.
    ``allow_nonfinite`` lets NaN/Inf scales and overflows through (written as NaN/Inf).
    ``finish`` / ``extra_outputs``: as for ``quantize_checkpoint`` (the model card).
    """
    if dtype not in DTYPES:
        raise ConversionError(f"unknown --dtype {dtype!r}; expected one of {tuple(DTYPES)}")
    src, dst = Path(src), Path(dst)
    with CheckpointReader(src) as reader:
        block = block_size_of(reader.config)
        plans = plan_dequantize(reader, DTYPES[dtype])
        pairs = [(t.key, t.scale_src.key) for p in plans for t in p.tensors
                 if t.action == "dequantize"]
        check_scales(reader, [s for _, s in pairs], allow_nonfinite)
        if not allow_nonfinite:
            check_dequantize_overflow(reader, pairs, block, DTYPES[dtype])
        config = None
        if (reader.root / "config.json").is_file():
            config = {k: v for k, v in reader.config.items() if k != "quantization_config"}
            torch_name = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype]
            for k in ("torch_dtype", "dtype"):
                if k in config:
                    config[k] = torch_name
        options = {"op": "dequantize", "dtype": dtype, "allow_nonfinite": allow_nonfinite}
        job = _Job(reader, plans, options, config,
                   ShardOptions("fp32", block, allow_nonfinite), "dequantize",
                   tuple(extra_outputs), finish)
        return _run(job, dst, workers, overwrite, progress)
