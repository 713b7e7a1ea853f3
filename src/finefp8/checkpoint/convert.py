"""Streaming, resumable checkpoint conversion: ``quantize`` (BF16/FP16/FP32 -> FP8 block) and
``dequantize`` (either FP8 layout -> BF16/FP16/FP32).

How a conversion runs (IN -> OUT):

1. Plan: for every input shard, the list of output tensors (key, dtype, shape, action) in
   order. Output shard ``k`` has the name of input shard ``k``; a quantized weight's scale is
   written right after the weight, in the same shard. A plan fixes every output byte count,
   so free disk is checked before anything is written.
2. Each shard is written by ``ShardWriter`` (``<name>.partial``, fsync, rename), one tensor at
   a time; a weight larger than ``CHUNK_ELEMENTS`` is processed in row ranges that are whole
   128-row block rows (blocks are independent, so the result is the same bit for bit), read
   with ``pread`` (no memory map), so resident memory stays near one chunk's working set
   whatever the checkpoint's size. ``workers > 1`` runs shards in parallel processes.
3. ``.finefp8-manifest.json`` in OUT records a fingerprint of the inputs and options and the
   shards done (name and size). A rerun with the same fingerprint resumes: finished shards
   are kept, others are redone; a different fingerprint is refused (or restarted with
   ``overwrite``).
4. Last: the other files of IN are copied, then ``model.safetensors.index.json`` (with
   ``metadata.total_size`` = the sum of tensor bytes), then ``config.json``, then the manifest
   gets ``"status": "complete"``. Until then OUT has no config.json: it never looks loadable.

The numerics are ``finefp8.ops.quantize_blockwise`` / ``dequantize_blockwise``.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing as mp
import os
import shutil
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import __version__, ops
from .layout import (
    COMPRESSED_TENSORS,
    FORMATS,
    FP8,
    FP8_DTYPES,
    grid_of,
    module_of,
    quantization_config,
    scale_key,
    skip_reason,
)
from .reader import (
    INDEX_NAME,
    ST_DTYPES,
    CheckpointError,
    CheckpointReader,
    TensorInfo,
    block_size_of,
    read_rows,
)
from .writer import PARTIAL_SUFFIX, ShardWriter, atomic_write_bytes, shard_size, write_error

__all__ = [
    "MANIFEST_NAME",
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

MANIFEST_NAME = ".finefp8-manifest.json"
#: elements of one row-range chunk of a large weight (8M: about 32 MB as fp32).
CHUNK_ELEMENTS = 8 * 1024 * 1024
COPY_CHUNK_BYTES = 64 * 1024 * 1024
#: ``--dtype`` names of dequantize and their safetensors dtype names.
DTYPES = {"bf16": "BF16", "fp16": "F16", "fp32": "F32"}
_DISK_MARGIN = 16 * 1024 * 1024


class ConversionError(ValueError):
    """A conversion refused or failed; the message names the file/tensor and what to do."""


@dataclass(frozen=True)
class OutTensor:
    """One output tensor: ``action`` is ``"copy"`` (bytes as stored), ``"quantize"`` (FP8 codes
    of ``src``), ``"scale"`` (the block scales of the preceding quantized ``src``) or
    ``"dequantize"`` (``src`` times its scale ``scale_src``)."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    action: str
    src: TensorInfo
    scale_src: TensorInfo | None = None


@dataclass
class ShardPlan:
    """The output tensors of one shard, in file order."""

    name: str
    tensors: list[OutTensor]
    metadata: dict[str, str]

    @property
    def entries(self) -> list[tuple[str, str, tuple[int, ...]]]:
        return [(t.key, t.dtype, t.shape) for t in self.tensors]

    @property
    def out_bytes(self) -> int:
        """Size of the output file."""
        return shard_size(self.entries, self.metadata)

    @property
    def in_bytes(self) -> int:
        """Bytes read from the input (progress is counted in these)."""
        return sum(t.src.nbytes for t in self.tensors if t.action != "scale")

    @property
    def data_bytes(self) -> int:
        """Tensor bytes written (what ``metadata.total_size`` counts)."""
        from .reader import ST_ITEMSIZE

        return sum(math.prod(t.shape) * ST_ITEMSIZE[t.dtype] for t in self.tensors)


@dataclass
class ConversionResult:
    """What a conversion did."""

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


# ----------------------------------------------------------------------------- planning


def plan_quantize(reader: CheckpointReader, fmt: str = FP8, ignore: Sequence[str] = (),
                  block_size: tuple[int, int] = (128, 128)) -> tuple[list[ShardPlan], list[str]]:
    """Output shards of ``quantize`` and the Linear-like modules kept in high precision.

    Refuses an input that is already FP8 (``ConversionError`` suggesting ``dequantize``).
    """
    if fmt not in FORMATS:
        raise ConversionError(f"unknown --format {fmt!r}; expected one of {FORMATS}")
    if reader.config.get("quantization_config") or reader.quantized_weights():
        what = reader.config.get("quantization_config", {}).get("quant_method", "FP8 tensors")
        raise ConversionError(f"{reader.root} is already quantized ({what}): nothing to quantize. "
                              f"To convert it back to BF16 run: "
                              f"finefp8 dequantize {reader.root} OUT")
    plans, kept, n_quant = [], set(), 0
    for shard in reader.shards:
        out: list[OutTensor] = []
        for key in reader.shard_keys[shard]:
            info = reader.info(key)
            reason = skip_reason(key, info.shape, info.dtype, ignore)
            if reason is None:
                out.append(OutTensor(key, "F8_E4M3", info.shape, "quantize", info))
                out.append(OutTensor(scale_key(key, fmt), "F32", grid_of(info.shape, block_size),
                                     "scale", info))
                n_quant += 1
            else:
                if key.endswith(".weight") and len(info.shape) == 2 and reason != "embedding":
                    kept.add(module_of(key))
                out.append(OutTensor(key, info.dtype, info.shape, "copy", info))
        plans.append(ShardPlan(shard, out, _shard_metadata(reader, shard)))
    if not n_quant:
        raise ConversionError(f"{reader.root}: no 2-D Linear weight to quantize (every tensor is "
                              f"kept by the rules or by --ignore)")
    return plans, sorted(kept)


def plan_dequantize(reader: CheckpointReader, dtype: str = "BF16") -> list[ShardPlan]:
    """Output shards of ``dequantize``: FP8 weights -> ``dtype``, their scales dropped."""
    fmt = reader.format
    if fmt is None:
        raise ConversionError(f"{reader.root} is not an FP8 checkpoint (no quantization_config and "
                              f"no FP8 weights): nothing to dequantize")
    qc = reader.config.get("quantization_config") or {}
    if fmt == COMPRESSED_TENSORS and qc.get("format", "float-quantized") != "float-quantized":
        raise ConversionError(f"{reader.root}: compressed-tensors format {qc.get('format')!r} is "
                              f"not float-quantized FP8; only FP8_BLOCK checkpoints are supported")
    plans, used_scales = [], set()
    fp8_weights = set(reader.quantized_weights())
    for w in fp8_weights:
        sk = scale_key(w, fmt)
        if sk not in reader:
            raise ConversionError(f"{reader.root}: FP8 tensor {w!r} has no block scale {sk!r} "
                                  f"(in any shard)")
        wshape, sshape = reader.shape(w), reader.shape(sk)
        bs = block_size_of(reader.config)
        if len(wshape) != 2 or tuple(sshape) != grid_of(wshape, bs):
            raise ConversionError(f"{reader.root}: scale {sk!r} has shape {list(sshape)}, expected "
                                  f"{list(grid_of(wshape, bs))} for weight {list(wshape)} with "
                                  f"{bs[0]}x{bs[1]} blocks (only block-wise FP8 is supported)")
        used_scales.add(sk)
    for shard in reader.shards:
        out: list[OutTensor] = []
        for key in reader.shard_keys[shard]:
            info = reader.info(key)
            if key in used_scales or key.endswith(".input_scale"):
                continue
            if key in fp8_weights:
                out.append(OutTensor(key, dtype, info.shape, "dequantize", info,
                                     reader.info(scale_key(key, fmt))))
            elif info.dtype in FP8_DTYPES:
                raise ConversionError(f"{reader.root}: FP8 tensor {key!r} is not a block-quantized "
                                      f"'.weight' with a scale; cannot dequantize it")
            else:
                out.append(OutTensor(key, info.dtype, info.shape, "copy", info))
        if out:  # a shard that held only scales disappears
            plans.append(ShardPlan(shard, out, _shard_metadata(reader, shard)))
    return plans


def _shard_metadata(reader: CheckpointReader, shard: str) -> dict[str, str]:
    meta = dict(reader.shard_metadata.get(shard) or {})
    meta.setdefault("format", "pt")
    return meta


# ----------------------------------------------------------------------------- one shard


def _rows_per_chunk(shape: Sequence[int], bm: int) -> int:
    """Whole block rows per chunk: ``bm * max(1, CHUNK_ELEMENTS // (bm * cols))``."""
    cols = max(1, int(math.prod(shape[1:])))
    return bm * max(1, CHUNK_ELEMENTS // (bm * cols))


def _nonfinite_message(key: str, chunk: torch.Tensor, r0: int, bs: tuple[int, int]) -> str:
    bad = torch.nonzero(~torch.isfinite(chunk))
    r, c = int(bad[0, 0]) + r0, int(bad[0, 1])
    i, j = r // bs[0], c // bs[1]
    return (f"tensor {key!r} has NaN or Inf at row {r}, column {c} (block ({i}, {j}): rows "
            f"{i * bs[0]}:{(i + 1) * bs[0]}, columns {j * bs[1]}:{(j + 1) * bs[1]}); "
            f"{len(bad)} non-finite values in rows {r0}:{r0 + chunk.shape[0]}. Fix the source "
            f"weights, or keep the tensor in high precision with --ignore")


def _write_quantized(w: ShardWriter, root: Path, t: OutTensor, scale_t: OutTensor,
                     scale_fmt: str, bs: tuple[int, int], report: Callable[[int], None]) -> None:
    m = t.shape[0]
    step = _rows_per_chunk(t.shape, bs[0])
    scales = []
    for r0 in range(0, m, step):
        r1 = min(m, r0 + step)
        chunk = read_rows(root, t.src, r0, r1)
        try:
            q, s = ops.quantize_blockwise(chunk, bs, scale_fmt, name=t.key)
        except ValueError as e:
            if not bool(torch.isfinite(chunk).all()):
                raise ConversionError(_nonfinite_message(t.key, chunk, r0, bs)) from e
            raise
        w.write(t.key, q)
        scales.append(s)
        report(chunk.numel() * chunk.element_size())
    w.write(scale_t.key, torch.cat(scales).to(torch.float32))


def _write_dequantized(w: ShardWriter, root: Path, t: OutTensor, bs: tuple[int, int],
                       report: Callable[[int], None]) -> None:
    m = t.shape[0]
    scale = read_rows(root, t.scale_src, 0, t.scale_src.shape[0])
    step = _rows_per_chunk(t.shape, bs[0])
    out_dtype = ST_DTYPES[t.dtype]
    for r0 in range(0, m, step):
        r1 = min(m, r0 + step)
        q = read_rows(root, t.src, r0, r1)
        s = scale[r0 // bs[0]: math.ceil(r1 / bs[0])]
        w.write(t.key, ops.dequantize_blockwise(q, s, bs, out_dtype, name=t.key))
        report(q.numel())


def _copy_raw(w: ShardWriter, root: Path, t: OutTensor, report: Callable[[int], None]) -> None:
    path = root / t.src.shard
    with open(path, "rb", buffering=0) as f:
        done = 0
        while done < t.src.nbytes:
            n = min(COPY_CHUNK_BYTES, t.src.nbytes - done)
            buf = os.pread(f.fileno(), n, t.src.offset + done)
            if len(buf) != n:
                raise CheckpointError(f"{path}: unexpected end of file reading tensor {t.key!r}")
            w.write(t.key, buf)
            done += n
            report(n)
    if t.src.nbytes == 0:
        w.write(t.key, b"")


def convert_shard(src_root: str, dst_dir: str, plan: ShardPlan, scale_fmt: str,
                  block_size: tuple[int, int],
                  report: Callable[[int, int], None] | None = None) -> int:
    """Write output shard ``plan`` into ``dst_dir``; returns its size in bytes.

    ``report(bytes_read, tensors_done)`` is called as the work advances.
    """
    root, bs = Path(src_root), tuple(block_size)
    rep = report or (lambda b, n: None)
    with ShardWriter(Path(dst_dir) / plan.name, plan.entries, plan.metadata) as w:
        tensors = plan.tensors
        for i, t in enumerate(tensors):
            if t.action == "quantize":
                _write_quantized(w, root, t, tensors[i + 1], scale_fmt, bs, lambda b: rep(b, 0))
            elif t.action == "dequantize":
                _write_dequantized(w, root, t, bs, lambda b: rep(b, 0))
            elif t.action == "copy":
                _copy_raw(w, root, t, lambda b: rep(b, 0))
            if t.action != "scale":
                rep(0, 1)
    return w.size


_QUEUE = None


def _worker_init(queue, threads: int) -> None:
    global _QUEUE
    _QUEUE = queue
    torch.set_num_threads(max(1, threads))


def _worker_run(src_root: str, dst_dir: str, plan: ShardPlan, scale_fmt: str,
                block_size: tuple[int, int]) -> tuple[str, int]:
    def report(b: int, n: int) -> None:
        _QUEUE.put((b, n))

    return plan.name, convert_shard(src_root, dst_dir, plan, scale_fmt, block_size, report)


# ----------------------------------------------------------------------------- the driver


def _fingerprint(reader: CheckpointReader, options: dict) -> str:
    """sha256 of the options, the finefp8 version and every input file's name, size and mtime."""
    files = []
    for p in sorted(reader.root.iterdir()):
        if p.is_file():
            st = p.stat()
            files.append([p.name, st.st_size, st.st_mtime_ns])
    blob = json.dumps({"finefp8": __version__, "options": options, "files": files}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _read_manifest(dst: Path) -> dict | None:
    try:
        with open(dst / MANIFEST_NAME, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def _write_manifest(dst: Path, manifest: dict) -> None:
    text = json.dumps(manifest, indent=1, sort_keys=True) + "\n"
    atomic_write_bytes(dst / MANIFEST_NAME, text.encode())


def _empty_dir(dst: Path) -> None:
    for p in dst.iterdir():
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def _prepare_out(src: Path, dst: Path, fingerprint: str, overwrite: bool) -> dict:
    """Create / check OUT; returns the manifest to continue from (``done`` may be non-empty)."""
    s, d = src.resolve(), dst.resolve()
    if s == d or s in d.parents or d in s.parents:
        raise ConversionError(f"OUT {dst} must be a directory outside IN {src} "
                              f"(and not contain it)")
    if dst.exists() and not dst.is_dir():
        raise ConversionError(f"OUT {dst} exists and is not a directory")
    dst.mkdir(parents=True, exist_ok=True)
    fresh = {"fingerprint": fingerprint, "status": "in-progress", "done": {}}
    if not any(dst.iterdir()):
        return fresh
    manifest = _read_manifest(dst)
    if manifest and manifest.get("fingerprint") == fingerprint and not overwrite:
        for p in dst.glob("*" + PARTIAL_SUFFIX):
            p.unlink()
        done = {}
        for name, size in manifest.get("done", {}).items():
            f = dst / name
            if f.is_file() and f.stat().st_size == size:
                done[name] = size
        manifest["done"] = done
        return manifest
    if not overwrite:
        if manifest:
            raise ConversionError(f"OUT {dst} holds a conversion of other inputs or with other "
                                  f"options; pass --overwrite to replace it")
        raise ConversionError(f"OUT {dst} is not empty; pass --overwrite to replace its contents")
    _empty_dir(dst)
    return fresh


def _other_files(src: Path) -> list[Path]:
    """Files of IN copied as they are: everything but the safetensors shards and index,
    config.json, our manifest, hidden folders, and PyTorch ``pytorch_model*.bin`` weights (the
    same weights again, unconverted)."""
    skip = {INDEX_NAME, "config.json", MANIFEST_NAME, "pytorch_model.bin.index.json"}
    out = []
    for p in sorted(src.rglob("*")):
        rel = p.relative_to(src)
        if not p.is_file() or rel.parts[0].startswith("."):
            continue
        if len(rel.parts) == 1 and (p.name in skip or p.suffix == ".safetensors"
                                    or (p.name.startswith("pytorch_model") and p.suffix == ".bin")):
            continue
        out.append(p)
    return out


def _copy_file(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + PARTIAL_SUFFIX)
    try:
        shutil.copyfile(src, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dst)
    except OSError as e:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise write_error(dst, e) from e


def _check_disk(dst: Path, needed: int) -> None:
    free = shutil.disk_usage(dst).free
    if free < needed + _DISK_MARGIN:
        raise ConversionError(f"not enough free disk for {dst}: the conversion writes "
                              f"{needed / 1e9:.2f} GB, {free / 1e9:.2f} GB is free. Free space or "
                              f"choose another OUT")


class _Progress:
    """A rich progress bar (tensors done, bytes/s, time left) on stderr, or nothing."""

    def __init__(self, enabled: bool, total_bytes: int, total_tensors: int, label: str):
        self.enabled = enabled
        self.tensors, self.total_tensors = 0, total_tensors
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self.bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                            TextColumn("{task.fields[tensors]} tensors"), DownloadColumn(),
                            TransferSpeedColumn(), TimeRemainingColumn(),
                            console=Console(stderr=True))
        self.task = self.bar.add_task(label, total=total_bytes, tensors=f"0/{total_tensors}")
        self.bar.start()

    def advance(self, nbytes: int, ntensors: int) -> None:
        self.tensors += ntensors
        if self.enabled:
            self.bar.update(self.task, advance=nbytes,
                            tensors=f"{self.tensors}/{self.total_tensors}")

    def close(self) -> None:
        if self.enabled:
            self.bar.stop()


def _run(reader: CheckpointReader, dst: Path, plans: list[ShardPlan], options: dict,
         config: dict | None, scale_fmt: str, block_size: tuple[int, int], workers: int,
         overwrite: bool, progress: bool, label: str) -> ConversionResult:
    t0 = time.perf_counter()
    src = reader.root
    fingerprint = _fingerprint(reader, options)
    created = not dst.exists()
    manifest = _prepare_out(src, dst, fingerprint, overwrite)
    result = ConversionResult(out_dir=dst, shards=len(plans))
    if manifest.get("status") == "complete":
        result.already_complete = True
        return result
    done: dict[str, int] = manifest["done"]
    pending_shards = [p for p in plans if p.name not in done]
    result.shards_resumed = len(plans) - len(pending_shards)
    others = _other_files(src)
    try:
        _check_disk(dst, sum(p.out_bytes for p in pending_shards)
                    + sum(f.stat().st_size for f in others))
    except ConversionError:
        if created:
            shutil.rmtree(dst, ignore_errors=True)
        raise
    _write_manifest(dst, manifest)

    bar = _Progress(progress, sum(p.in_bytes for p in pending_shards),
                    sum(sum(t.action != "scale" for t in p.tensors) for p in pending_shards), label)
    try:
        if workers <= 1 or len(pending_shards) <= 1:
            for p in pending_shards:
                done[p.name] = convert_shard(str(src), str(dst), p, scale_fmt, block_size,
                                             bar.advance)
                _write_manifest(dst, manifest)
        else:
            _run_parallel(src, dst, pending_shards, scale_fmt, block_size, workers, bar, manifest)
    except ConversionError:
        bar.close()
        bar.enabled = False
        if created:
            shutil.rmtree(dst, ignore_errors=True)
        else:
            _empty_dir(dst)
        raise
    finally:
        bar.close()

    for f in others:
        _copy_file(f, dst / f.relative_to(src))
    weight_map = {t.key: p.name for p in plans for t in p.tensors}
    if reader.has_index:
        with open(src / INDEX_NAME, encoding="utf-8") as f:
            index = json.load(f)
        meta = dict(index.get("metadata") or {})
        meta["total_size"] = sum(p.data_bytes for p in plans)
        index = {"metadata": meta, "weight_map": dict(sorted(weight_map.items()))}
        atomic_write_bytes(dst / INDEX_NAME, (json.dumps(index, indent=2) + "\n").encode())
    if config is not None:
        atomic_write_bytes(dst / "config.json", (json.dumps(config, indent=2) + "\n").encode())
    manifest["status"] = "complete"
    _write_manifest(dst, manifest)

    result.in_bytes = sum(p.in_bytes for p in pending_shards)
    result.out_bytes = sum((dst / p.name).stat().st_size for p in plans)
    result.quantized = sum(t.action in ("quantize", "dequantize") for p in plans for t in p.tensors)
    result.copied = sum(t.action == "copy" for p in plans for t in p.tensors)
    result.seconds = time.perf_counter() - t0
    return result


def _run_parallel(src: Path, dst: Path, pending_shards: list[ShardPlan], scale_fmt: str,
                  block_size: tuple[int, int], workers: int, bar: _Progress,
                  manifest: dict) -> None:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    threads = max(1, (os.cpu_count() or 1) // workers)
    with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init,
                             initargs=(queue, threads)) as pool:
        pending = {pool.submit(_worker_run, str(src), str(dst), p, scale_fmt, block_size)
                   for p in pending_shards}
        try:
            while pending:
                finished, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
                while not queue.empty():
                    bar.advance(*queue.get())
                for fut in finished:
                    name, size = fut.result()
                    manifest["done"][name] = size
                    _write_manifest(dst, manifest)
        except BaseException:
            for fut in pending:
                fut.cancel()
            raise
        while not queue.empty():
            bar.advance(*queue.get())


def quantize_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, *, fmt: str = FP8,
                        scale_fmt: str = "fp32", ignore: Sequence[str] = (), workers: int = 1,
                        overwrite: bool = False, progress: bool = True) -> ConversionResult:
    """Quantize the checkpoint in ``src`` to DeepSeek-style FP8 blocks in ``dst``.

    Every 2-D Linear ``*.weight`` (see ``layout.skip_reason``) becomes F8_E4M3 ``Q`` with
    F32 block scales ``s = amax / 448`` (``scale_fmt="ue8m0"``: rounded up to a power of two),
    ``W ~= Q * s`` per 128x128 block; the scale is ``weight_scale_inv`` (``fmt="fp8"``) or
    ``weight_scale`` (``fmt="compressed-tensors"``). Everything else is copied byte for byte.
    Resumable: rerun the same call after an interruption.
    """
    if fmt == COMPRESSED_TENSORS and scale_fmt != "fp32":
        raise ConversionError("--scale-fmt ue8m0 is only for --format fp8 (compressed-tensors has "
                              "no power-of-two scale flag)")
    if scale_fmt not in ("fp32", "ue8m0"):
        raise ConversionError(f"unknown --scale-fmt {scale_fmt!r}; expected fp32 or ue8m0")
    src, dst = Path(src), Path(dst)
    with CheckpointReader(src) as reader:
        plans, kept = plan_quantize(reader, fmt, tuple(ignore))
        config = None
        if (src / "config.json").is_file():
            config = dict(reader.config)
            config["quantization_config"] = quantization_config(fmt, scale_fmt, kept)
        options = {"op": "quantize", "fmt": fmt, "scale_fmt": scale_fmt, "ignore": list(ignore)}
        result = _run(reader, dst, plans, options, config, scale_fmt, (128, 128), workers,
                      overwrite, progress, "quantize")
    result.kept = kept
    return result


def dequantize_checkpoint(src: str | os.PathLike, dst: str | os.PathLike, *, dtype: str = "bf16",
                          workers: int = 1, overwrite: bool = False,
                          progress: bool = True) -> ConversionResult:
    """Dequantize an FP8 block checkpoint (``fp8`` or ``compressed-tensors`` layout) in ``src``
    to ``dtype`` (``"bf16"``, ``"fp16"``, ``"fp32"``) in ``dst``: ``W = Q * s`` per block,
    scales dropped, ``quantization_config`` removed from config.json, all else copied."""
    if dtype not in DTYPES:
        raise ConversionError(f"unknown --dtype {dtype!r}; expected one of {tuple(DTYPES)}")
    src, dst = Path(src), Path(dst)
    with CheckpointReader(src) as reader:
        block = block_size_of(reader.config)
        plans = plan_dequantize(reader, DTYPES[dtype])
        config = None
        if (src / "config.json").is_file():
            config = {k: v for k, v in reader.config.items() if k != "quantization_config"}
            torch_name = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[dtype]
            for k in ("torch_dtype", "dtype"):
                if k in config:
                    config[k] = torch_name
        options = {"op": "dequantize", "dtype": dtype}
        return _run(reader, dst, plans, options, config, "fp32", block, workers, overwrite,
                    progress, "dequantize")
