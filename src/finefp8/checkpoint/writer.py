"""Streaming safetensors shard writer: header first, then each tensor's bytes in order.

safetensors' own ``save_file`` needs every tensor in memory at once; a converter that holds
one tensor (or one block row range of a huge one) at a time writes the file itself. The
format is small (see ``reader.py``): since every output tensor's dtype and shape are known
before its data is computed, the header is written first and the data appended in header
order. Data offsets follow the header order; the header is padded with spaces to a multiple
of 8 bytes, as safetensors does, so every tensor starts 8-byte aligned in the file.

Crash safety: the file is written as ``<name>.partial``, flushed, ``fsync``-ed and renamed to
``<name>`` only once every byte is in; an ``OSError`` (ENOSPC...) removes the partial file.
Byte-identical output for the same inputs: the header JSON is built deterministically.
The SHA-256 of every byte written is computed on the way (``ShardWriter.sha256``), so a
conversion can record it without reading the file again.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import queue
import threading
from collections.abc import Sequence
from pathlib import Path

import torch

from .reader import ST_ITEMSIZE

__all__ = ["PARTIAL_SUFFIX", "ShardWriter", "build_header", "shard_size", "fsync_dir",
           "atomic_write_bytes", "tensor_bytes", "WriteError", "write_error"]

PARTIAL_SUFFIX = ".partial"


class WriteError(OSError):
    """Writing an output file failed; the partial file has been removed."""


def build_header(entries: Sequence[tuple[str, str, Sequence[int]]],
                 metadata: dict[str, str] | None = None) -> tuple[bytes, list[int]]:
    """The header bytes (length prefix included) and each entry's data size in bytes.

    ``entries``: ``(key, safetensors dtype, shape)`` in the order the data will follow.
    """
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    sizes, off = [], 0
    for key, dtype, shape in entries:
        numel = 1
        for d in shape:
            numel *= int(d)
        n = numel * ST_ITEMSIZE[dtype]
        header[key] = {"dtype": dtype, "shape": [int(d) for d in shape],
                       "data_offsets": [off, off + n]}
        sizes.append(n)
        off += n
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * ((-len(raw)) % 8)
    return len(raw).to_bytes(8, "little") + raw, sizes


def shard_size(entries: Sequence[tuple[str, str, Sequence[int]]],
               metadata: dict[str, str] | None = None) -> int:
    """Bytes of the file ``ShardWriter`` writes for ``entries``."""
    head, sizes = build_header(entries, metadata)
    return len(head) + sum(sizes)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of ``t`` (made contiguous; little-endian as on every supported CPU)."""
    t = t.detach().contiguous().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy())


def fsync_dir(path: str | os.PathLike) -> None:
    """``fsync`` a directory so a rename inside it survives a power cut."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def write_error(path: Path, e: OSError) -> WriteError:
    """The ``WriteError`` for ``e`` raised while writing ``path`` (ENOSPC gets a resume hint)."""
    if e.errno == errno.ENOSPC:
        msg = (f"no space left on device while writing {path.name}; the partial file was removed. "
               f"Free some space and rerun the same command: finished shards are kept and the "
               f"conversion resumes")
    else:
        msg = f"cannot write {path}: {e.strerror or e}"
    return WriteError(e.errno or errno.EIO, msg)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via ``path.partial`` + fsync + rename."""
    path = Path(path)
    tmp = path.with_name(path.name + PARTIAL_SUFFIX)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        _remove_quietly(tmp)
        raise write_error(path, e) from e
    fsync_dir(path.parent)


class ShardWriter:
    """Write one safetensors file tensor by tensor, in the order of ``entries``.

    Usage::

        with ShardWriter(path, entries, metadata) as w:
            for key, ... in entries:
                w.write(key, chunk1); w.write(key, chunk2)   # rows in order
        # on a clean exit: all bytes checked, fsync, rename path.partial -> path

    ``write(key, data)`` appends ``data`` (a tensor or bytes) to tensor ``key``; tensors must
    be written in header order and completely. The bytes go to the file from a background
    thread (at most ``queue_depth`` buffers wait), so computing the next chunk overlaps with
    the disk write of the previous one; a write error surfaces at the next ``write`` or at the
    end. Any exception inside the ``with`` block (or a missing byte) removes the partial file
    and leaves ``path`` untouched.
    """

    def __init__(self, path: str | os.PathLike, entries: Sequence[tuple[str, str, Sequence[int]]],
                 metadata: dict[str, str] | None = None, queue_depth: int = 2):
        self.path = Path(path)
        self.tmp = self.path.with_name(self.path.name + PARTIAL_SUFFIX)
        self.header, sizes = build_header(entries, metadata)
        self._order = [e[0] for e in entries]
        self._sizes = dict(zip(self._order, sizes, strict=True))
        self._pos = 0
        self._written = 0
        self._f = None
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, queue_depth))
        self._thread: threading.Thread | None = None
        self._error: OSError | None = None
        self._hash = hashlib.sha256(self.header)
        self._skip_empty()

    @property
    def sha256(self) -> str:
        """Hex SHA-256 of the file's bytes (complete once the ``with`` block has exited)."""
        return self._hash.hexdigest()

    def _skip_empty(self) -> None:
        """Advance past zero-byte tensors: they have no data to write."""
        while self._pos < len(self._order) and self._sizes[self._order[self._pos]] == 0:
            self._pos += 1

    @property
    def size(self) -> int:
        """Total bytes of the finished file."""
        return len(self.header) + sum(self._sizes.values())

    def __enter__(self) -> ShardWriter:
        try:
            self._f = open(self.tmp, "wb")
            self._f.write(self.header)
        except OSError as e:
            self._abort()
            raise write_error(self.tmp, e) from e
        self._thread = threading.Thread(target=self._drain, name=f"write {self.path.name}",
                                        daemon=True)
        self._thread.start()
        return self

    def _drain(self) -> None:
        """Background thread: write queued buffers until the ``None`` sentinel."""
        while True:
            item = self._queue.get()
            if item is None:
                return
            if self._error is None:
                try:
                    self._f.write(item[0])
                    self._hash.update(item[0])
                except OSError as e:
                    self._error = e

    def _raise_pending(self) -> None:
        if self._error is not None:
            raise write_error(self.path, self._error) from self._error

    def write(self, key: str, data: torch.Tensor | bytes | memoryview) -> None:
        """Append ``data`` to tensor ``key`` (the current one, in header order). Writing zero
        bytes to a zero-byte tensor is accepted wherever it comes (it has nothing to write)."""
        self._raise_pending()
        empty = data.numel() == 0 if isinstance(data, torch.Tensor) else memoryview(data).nbytes == 0
        if empty and self._sizes.get(key) == 0:
            return
        if self._pos >= len(self._order) or self._order[self._pos] != key:
            expected = self._order[self._pos] if self._pos < len(self._order) else "nothing"
            raise RuntimeError(f"{self.path.name}: wrote {key!r} out of order, "
                               f"expected {expected!r}")
        if isinstance(data, torch.Tensor):
            data = data.detach().contiguous()
            buf = tensor_bytes(data)
        else:
            buf = memoryview(data)
        n = buf.nbytes
        if self._written + n > self._sizes[key]:
            raise RuntimeError(f"{self.path.name}: too many bytes for {key!r}")
        self._queue.put((buf, data))  # ``data`` keeps the buffer's owner alive
        self._written += n
        if self._written == self._sizes[key]:
            self._pos += 1
            self._written = 0
            self._skip_empty()

    def _stop_thread(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def _abort(self) -> None:
        self._error = self._error or OSError(errno.ECANCELED, "aborted")
        self._stop_thread()
        if self._f is not None:
            try:
                self._f.close()
            except OSError:
                pass
            self._f = None
        _remove_quietly(self.tmp)

    def _finish(self) -> None:
        self._skip_empty()
        if self._pos != len(self._order):
            raise RuntimeError(f"{self.path.name}: tensor {self._order[self._pos]!r} was not "
                               f"written completely")
        self._stop_thread()
        self._raise_pending()
        try:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            self._f = None
            os.replace(self.tmp, self.path)
        except OSError as e:
            raise write_error(self.path, e) from e
        fsync_dir(self.path.parent)

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._abort()
            return
        try:
            self._finish()
        except BaseException:
            self._abort()
            raise
