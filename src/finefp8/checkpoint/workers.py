"""Writing output shards: one shard in this process (``convert_shard``), or many in worker
processes tied to this one (``run_shards``).

One shard: ``ShardWriter`` writes ``<name>.partial`` tensor by tensor and renames it when
complete. A weight larger than ``CHUNK_ELEMENTS`` is processed in row ranges of whole
block rows (blocks are independent: the bytes are the same as for the whole tensor), read
with ``pread``, so resident memory stays near one chunk's working set. The numerics are
``finefp8.ops.quantize_blockwise`` / ``dequantize_blockwise``. Non-finite results are refused
with the tensor and position named unless ``allow_nonfinite``: NaN/Inf weights, and values
whose dequantization overflows (``scale_fmt="ue8m0"`` rounds scales up, so values near the
dtype's maximum can come back as Inf; fp16 output above 65504).

Workers (``workers > 1``): spawned processes that take shards from a queue. Each worker ends
itself when its parent dies, whatever the signal: on Linux through
``prctl(PR_SET_PDEATHSIG, SIGKILL)`` set in the worker, and everywhere by comparing
``os.getppid()`` with the parent's PID before each shard and each chunk. The parent
terminates the workers on any exception, including the ``Terminated`` that
``signals_as_exceptions`` raises on SIGTERM/SIGHUP (and ``KeyboardInterrupt`` on SIGINT),
so no worker outlives the run or writes into OUT after it.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import multiprocessing as mp
import os
import pickle
import queue
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import ops
from .errors import ConversionError, ConversionInterrupted
from .experts import write_dequantized_stack, write_quantized_stack
from .plan import OutTensor, ShardPlan
from .reader import ST_DTYPES, CheckpointError, read_rows
from .staged import StagedCodes
from .validate import FP8_MAX_CODE, first_nonfinite
from .writer import ShardWriter

__all__ = [
    "CHUNK_ELEMENTS",
    "COPY_CHUNK_BYTES",
    "ShardOptions",
    "ShardResult",
    "Terminated",
    "convert_shard",
    "run_shards",
    "signals_as_exceptions",
]

#: elements of one row-range chunk of a large weight (8M: about 32 MB as fp32).
CHUNK_ELEMENTS = 8 * 1024 * 1024
COPY_CHUNK_BYTES = 64 * 1024 * 1024
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class ShardOptions:
    """How shards are converted: ``scale_fmt`` (``"fp32"``/``"ue8m0"``), the weight
    ``block_size``, whether non-finite output is allowed, and ``staged_dir``: a folder of codes
    chosen beforehand (``staged.StagedCodes``, a calibrated quantize) that replace the plain
    ``amax/448`` + nearest rounding for the weights it holds."""

    scale_fmt: str = "fp32"
    block_size: tuple[int, int] = (128, 128)
    allow_nonfinite: bool = False
    staged_dir: str | None = None


@dataclass(frozen=True)
class ShardResult:
    """A finished output shard: file name, size in bytes and SHA-256 (hex)."""

    name: str
    size: int
    sha256: str


class Terminated(BaseException):
    """The process received SIGTERM or SIGHUP during a conversion (``signum``)."""

    def __init__(self, signum: int):
        super().__init__(f"received signal {signal.Signals(signum).name}")
        self.signum = signum


@contextlib.contextmanager
def signals_as_exceptions() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise ``Terminated`` in the main thread, so the
    conversion cleans up (workers terminated, partial files removed, lock released). On the
    way out the previous handlers come back and a caught signal is raised again, so the
    process still ends the way the signal asks. Outside the main thread: a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated(signum)

    sigs = [signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])
    previous = {s: signal.signal(s, handler) for s in sigs}
    caught = None
    try:
        yield
    except Terminated as e:
        caught = e.signum
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
    if caught is not None:
        signal.raise_signal(caught)
        raise Terminated(caught)  # the previous handler chose not to end the process


# ----------------------------------------------------------------------------- one shard


def rows_per_chunk(shape: Sequence[int], bm: int) -> int:
    """Whole block rows per chunk: ``bm * max(1, CHUNK_ELEMENTS // (bm * cols))``."""
    cols = max(1, int(math.prod(shape[1:])))
    return bm * max(1, CHUNK_ELEMENTS // (bm * cols))


def _block_text(r: int, c: int, bs: tuple[int, int]) -> str:
    i, j = r // bs[0], c // bs[1]
    return (f"block ({i}, {j}): rows {i * bs[0]}:{(i + 1) * bs[0]}, columns "
            f"{j * bs[1]}:{(j + 1) * bs[1]}")


def _nonfinite_message(key: str, chunk: torch.Tensor, r0: int, bs: tuple[int, int]) -> str:
    bad = torch.nonzero(~torch.isfinite(chunk))
    r, c = int(bad[0, 0]) + r0, int(bad[0, 1])
    return (f"tensor {key!r} has NaN or Inf at row {r}, column {c} ({_block_text(r, c, bs)}); "
            f"{len(bad)} non-finite values in rows {r0}:{r0 + chunk.shape[0]}. Fix the source "
            f"weights, keep the tensor in high precision with --ignore, or pass "
            f"--allow-nonfinite to quantize it anyway (NaN stays NaN, Inf saturates)")


def _check_roundtrip(key: str, chunk: torch.Tensor, q: torch.Tensor, s: torch.Tensor, r0: int,
                     bs: tuple[int, int]) -> None:
    """Refuse codes whose dequantization ``Q * s`` overflows the source dtype. Only blocks
    with ``s * 448 > finfo(dtype).max`` can; the others are not recomputed."""
    fmax = torch.finfo(chunk.dtype).max
    if not bool((s.double() * FP8_MAX_CODE["F8_E4M3"] > fmax).any()):
        return
    back = ops.dequantize_blockwise(q, s, bs, chunk.dtype, name=key)
    where = first_nonfinite(back)
    if where is None:
        return
    r, c = (int(v) for v in torch.nonzero(~torch.isfinite(back))[0])
    raise ConversionError(
        f"tensor {key!r}: its FP8 codes times their scale overflow "
        f"{str(chunk.dtype).replace('torch.', '')} at row {r + r0}, column {c} "
        f"({_block_text(r + r0, c, bs)}): values this close to the dtype's maximum dequantize "
        f"to Inf (with --scale-fmt ue8m0 the scale is rounded up to a power of two). Use "
        f"--scale-fmt fp32, keep the tensor with --ignore, or pass --allow-nonfinite")


def _write_staged(w: ShardWriter, t: OutTensor, scale_t: OutTensor,
                  staged: tuple[torch.Tensor, torch.Tensor],
                  report: Callable[[int], None]) -> None:
    """Write codes chosen beforehand (a calibrated quantize), after checking their shapes."""
    q, s = staged
    if tuple(q.shape) != tuple(t.shape) or tuple(s.shape) != tuple(scale_t.shape):
        raise ConversionError(f"staged codes of {t.key!r} have shapes {list(q.shape)} / "
                              f"{list(s.shape)}, the plan expects {list(t.shape)} / "
                              f"{list(scale_t.shape)}; rerun with --overwrite")
    w.write(t.key, q)
    w.write(scale_t.key, s.to(torch.float32))
    report(t.src.nbytes)


def _write_quantized(w: ShardWriter, root: Path, t: OutTensor, scale_t: OutTensor,
                     opts: ShardOptions, report: Callable[[int], None]) -> None:
    bs = opts.block_size
    m = t.shape[0]
    step = rows_per_chunk(t.shape, bs[0])
    scales = []
    for r0 in range(0, m, step):
        r1 = min(m, r0 + step)
        chunk = read_rows(root, t.src, r0, r1)
        try:
            q, s = ops.quantize_blockwise(chunk, bs, opts.scale_fmt,
                                          allow_nonfinite=opts.allow_nonfinite, name=t.key)
        except ValueError as e:
            if not bool(torch.isfinite(chunk).all()):
                raise ConversionError(_nonfinite_message(t.key, chunk, r0, bs)) from e
            raise
        if not opts.allow_nonfinite:
            _check_roundtrip(t.key, chunk, q, s, r0, bs)
        w.write(t.key, q)
        scales.append(s)
        report(chunk.numel() * chunk.element_size())
    w.write(scale_t.key, torch.cat(scales).to(torch.float32) if scales
            else torch.empty(scale_t.shape, dtype=torch.float32))


def _write_dequantized(w: ShardWriter, root: Path, t: OutTensor, opts: ShardOptions,
                       report: Callable[[int], None]) -> None:
    bs = opts.block_size
    m = t.shape[0]
    scale = read_rows(root, t.scale_src, 0, t.scale_src.shape[0])
    step = rows_per_chunk(t.shape, bs[0])
    out_dtype = ST_DTYPES[t.dtype]
    for r0 in range(0, m, step):
        r1 = min(m, r0 + step)
        q = read_rows(root, t.src, r0, r1)
        s = scale[r0 // bs[0]: math.ceil(r1 / bs[0])]
        out = ops.dequantize_blockwise(q, s, bs, out_dtype, name=t.key)
        if not opts.allow_nonfinite:
            where = first_nonfinite(out, r0)
            if where is not None:
                raise ConversionError(
                    f"dequantizing {t.key!r} gives NaN or Inf at {where} (NaN codes in the "
                    f"weight, or Q * s above the largest finite "
                    f"{str(out_dtype).replace('torch.', '')}). Re-create the checkpoint, choose "
                    f"a wider --dtype, or pass --allow-nonfinite to write it anyway")
        w.write(t.key, out)
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


def convert_shard(src_root: str | os.PathLike, dst_dir: str | os.PathLike, plan: ShardPlan,
                  opts: ShardOptions,
                  report: Callable[[int, int], None] | None = None) -> ShardResult:
    """Write output shard ``plan`` into ``dst_dir`` (atomically: ``.partial`` then rename).

    ``report(bytes_read, tensors_done)`` is called as the work advances. Returns the file's
    name, size and SHA-256.
    """
    root = Path(src_root)
    rep = report or (lambda b, n: None)
    staged = StagedCodes(opts.staged_dir) if opts.staged_dir else None
    with ShardWriter(Path(dst_dir) / plan.name, plan.entries, plan.metadata) as w:
        tensors = plan.tensors
        for i, t in enumerate(tensors):
            if t.action == "quantize" and len(t.shape) == 3:  # fused experts, per expert
                write_quantized_stack(w.write, root, t.src, tensors[i + 1].key, opts.block_size,
                                      opts.scale_fmt, opts.allow_nonfinite, lambda b: rep(b, 0))
            elif t.action == "quantize" and staged is not None and t.key in staged:
                _write_staged(w, t, tensors[i + 1], staged.get(t.key), lambda b: rep(b, 0))
            elif t.action == "quantize":
                _write_quantized(w, root, t, tensors[i + 1], opts, lambda b: rep(b, 0))
            elif t.action == "dequantize" and len(t.shape) == 3:
                write_dequantized_stack(w.write, root, t.src, t.scale_src, t.dtype,
                                        opts.block_size, opts.allow_nonfinite, lambda b: rep(b, 0))
            elif t.action == "dequantize":
                _write_dequantized(w, root, t, opts, lambda b: rep(b, 0))
            elif t.action == "copy":
                _copy_raw(w, root, t, lambda b: rep(b, 0))
            if t.action != "scale":
                rep(0, 1)
    return ShardResult(plan.name, w.size, w.sha256)


# ----------------------------------------------------------------------------- workers


def _die_with_parent(parent: int) -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux), and exit now if
    the parent is already gone."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the getppid() checks below remain
    _check_parent(parent)


def _check_parent(parent: int) -> None:
    """Exit at once (no cleanup: the parent is gone) when this process was orphaned."""
    if os.getppid() != parent:
        os._exit(1)


def _picklable(exc: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def _worker_main(parent: int, tasks, results, src: str, dst: str, opts: ShardOptions,
                 threads: int) -> None:
    """A worker: convert shards from ``tasks`` until ``None``; send progress, results and
    errors to ``results``."""
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides what Ctrl-C does
    torch.set_num_threads(max(1, threads))

    def report(b: int, n: int) -> None:
        _check_parent(parent)
        results.put(("progress", b, n))

    while True:
        _check_parent(parent)
        plan = tasks.get()
        if plan is None:
            return
        try:
            results.put(("done", convert_shard(src, dst, plan, opts, report)))
        except BaseException as e:  # noqa: BLE001 - sent to the parent, which raises it
            results.put(("error", plan.name, _picklable(e)))
            return


def _stop(procs: list) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join()


def run_shards(src: Path, dst: Path, plans: Sequence[ShardPlan], opts: ShardOptions,
               workers: int, on_progress: Callable[[int, int], None],
               on_done: Callable[[ShardResult], None],
               before_shard: Callable[[str], None] | None = None) -> None:
    """Convert every shard of ``plans`` into ``dst``; ``on_done`` is called in this process
    for each finished shard (in completion order), ``on_progress(bytes, tensors)`` as work
    advances. ``workers > 1`` (and more than one shard): that many spawned worker processes,
    each with ``cores / workers`` torch threads, tied to this process (module doc). The first
    error of any shard is raised here after every worker has been stopped.

    ``before_shard(name)``, when given, is called in this process for each input shard an
    output shard reads, before it is read (a Hub input fetches it there,
    ``finefp8.hub.StagedInput``): right before that output shard's conversion with one worker,
    so the next shard downloads while this one converts; for every shard before the workers
    start otherwise."""
    def fetch_inputs(p: ShardPlan) -> None:
        if before_shard is not None:
            names = [t.src.shard for t in p.tensors]
            names += [t.scale_src.shard for t in p.tensors if t.scale_src is not None]
            for name in dict.fromkeys(names):
                before_shard(name)

    if workers <= 1 or len(plans) <= 1:
        for p in plans:
            fetch_inputs(p)
            on_done(convert_shard(src, dst, p, opts, on_progress))
        return
    for p in plans:
        fetch_inputs(p)
    ctx = mp.get_context("spawn")
    tasks, results = ctx.Queue(), ctx.Queue()
    for p in plans:
        tasks.put(p)
    n = min(workers, len(plans))
    for _ in range(n):
        tasks.put(None)
    threads = max(1, (os.cpu_count() or 1) // n)
    procs = [ctx.Process(target=_worker_main, name=f"finefp8-worker-{i}", daemon=True,
                         args=(os.getpid(), tasks, results, str(src), str(dst), opts, threads))
             for i in range(n)]
    try:
        for p in procs:
            p.start()
        remaining = len(plans)
        while remaining:
            try:
                msg = results.get(timeout=0.2)
            except queue.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise ConversionInterrupted(
                        f"a worker process died (exit code {dead[0].exitcode}) while "
                        f"converting; rerun the same command to resume") from None
                continue
            if msg[0] == "progress":
                on_progress(msg[1], msg[2])
            elif msg[0] == "done":
                on_done(msg[1])
                remaining -= 1
            else:
                raise msg[2]
    finally:
        _stop(procs)
        tasks.cancel_join_thread()
        results.cancel_join_thread()
        tasks.close()
        results.close()
