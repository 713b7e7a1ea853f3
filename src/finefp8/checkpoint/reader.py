"""Lazy, index-aware reading of a Hugging Face safetensors checkpoint.

A checkpoint directory holds ``model.safetensors`` or shards listed by
``model.safetensors.index.json`` (``{"metadata": {"total_size": N}, "weight_map": {key: shard}}``).
Headers are parsed and checked up front (a truncated or corrupt file is an error naming it);
tensor data is read only when asked, through safetensors' memory-mapped ``safe_open``, so a
reader over a 700 GB checkpoint costs a few MB. A weight's scale may sit in another shard:
lookups go through the key -> shard map, never through "the current file".

safetensors file layout: ``u64 little-endian n``, ``n`` bytes of JSON header
``{key: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, then the
data; offsets are relative to the first byte after the header.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import ops
from .layout import COMPRESSED_TENSORS, FP8, detect_format, scale_key

__all__ = [
    "ST_DTYPES",
    "ST_ITEMSIZE",
    "INDEX_NAME",
    "SINGLE_NAME",
    "CheckpointError",
    "TensorInfo",
    "read_header",
    "read_rows",
    "CheckpointReader",
    "block_size_of",
    "dequantized_weight",
]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

#: safetensors dtype name -> torch dtype.
ST_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16,
    "U16": torch.uint16, "I32": torch.int32, "U32": torch.uint32, "I64": torch.int64,
    "U64": torch.uint64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
    "F64": torch.float64, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "F8_E8M0": torch.float8_e8m0fnu,
}
#: safetensors dtype name -> bytes per element.
ST_ITEMSIZE: dict[str, int] = {
    "BOOL": 1, "U8": 1, "I8": 1, "I16": 2, "U16": 2, "I32": 4, "U32": 4, "I64": 8, "U64": 8,
    "F16": 2, "BF16": 2, "F32": 4, "F64": 8, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1,
}
_MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as it is (the message names the file and what is wrong)."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: ``shard`` (file name), absolute byte ``offset`` and ``nbytes``."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    shard: str
    offset: int
    nbytes: int


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and check the header of one ``.safetensors`` file.

    Returns ``({key: TensorInfo}, metadata)``. Raises ``CheckpointError`` naming the file when
    the header is unreadable, a dtype unknown, a size inconsistent with the shape, or the file
    shorter than its header says (a truncated download or an interrupted write).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{path}: corrupt or truncated safetensors header "
                                      f"(header length {n}, file size {size})")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from e
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: corrupt safetensors header (not JSON: {e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    base = 8 + n
    infos: dict[str, TensorInfo] = {}
    data_end = 0
    for key, h in header.items():
        try:
            dtype, shape, (b, e) = h["dtype"], tuple(int(d) for d in h["shape"]), h["data_offsets"]
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path}: corrupt header entry for tensor {key!r}") from exc
        if dtype not in ST_ITEMSIZE:
            raise CheckpointError(f"{path}: tensor {key!r} has dtype {dtype!r}, which this tool "
                                  f"does not know")
        numel = 1
        for d in shape:
            numel *= d
        if e - b != numel * ST_ITEMSIZE[dtype] or b < 0:
            raise CheckpointError(f"{path}: tensor {key!r}: {e - b} bytes stored for shape "
                                  f"{list(shape)} {dtype}")
        data_end = max(data_end, e)
        infos[key] = TensorInfo(key, dtype, shape, path.name, base + b, e - b)
    if base + data_end > size:
        raise CheckpointError(f"{path}: truncated: the header needs {base + data_end} bytes, the "
                              f"file has {size}. Re-download or re-create it.")
    return infos, dict(metadata)


def read_rows(root: str | os.PathLike, info: TensorInfo, r0: int, r1: int) -> torch.Tensor:
    """Rows ``r0:r1`` of a tensor, read with plain ``pread`` (no memory map, so resident memory
    stays at the size of the rows read). A 0-D or 1-D tensor is read whole.

    Returns a new CPU tensor of the tensor's dtype, shape ``(r1 - r0, *shape[1:])``.
    """
    dtype = ST_DTYPES[info.dtype]
    if len(info.shape) < 2:
        r0, r1, rest = 0, (info.shape[0] if info.shape else 1), ()
    else:
        rest = info.shape[1:]
    row_bytes = ST_ITEMSIZE[info.dtype]
    for d in rest:
        row_bytes *= d
    n = (r1 - r0) * row_bytes
    buf = bytearray(n)
    path = Path(root) / info.shard
    view, got, pos = memoryview(buf), 0, info.offset + r0 * row_bytes
    with open(path, "rb", buffering=0) as f:
        while got < n:
            k = os.preadv(f.fileno(), [view[got:]], pos + got)
            if not k:
                raise CheckpointError(f"{path}: unexpected end of file reading tensor {info.key!r}")
            got += k
    t = torch.frombuffer(buf, dtype=torch.uint8) if n else torch.empty(0, dtype=torch.uint8)
    t = t.view(dtype)
    return t.reshape((r1 - r0, *rest)) if len(info.shape) >= 2 else t.reshape(info.shape)


def _load_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from e
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON: {e}") from e


class CheckpointReader:
    """Read-only, lazy view of a safetensors checkpoint directory (or one ``.safetensors`` file).

    ``reader.config`` is ``config.json`` as a dict (``{}`` when absent); ``keys()`` lists every
    tensor; ``shape``/``dtype``/``shard_of`` answer from the headers; ``get(key)`` reads one
    tensor (memory-mapped through ``safe_open``), ``get_rows(key, r0, r1)`` a row range of it.
    Use as a context manager or call ``close()``.
    """

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        if not path.exists():
            raise CheckpointError(f"{path}: no such file or directory")
        if path.is_file():
            self.root, files = path.parent, [path.name]
            index_shards = None
        else:
            self.root = path
            index_path = path / INDEX_NAME
            if index_path.exists():
                index = _load_json(index_path)
                wm = index.get("weight_map")
                if not isinstance(wm, dict) or not wm:
                    raise CheckpointError(f"{index_path}: no weight_map")
                index_shards = wm
                files = sorted(set(wm.values()))
                for f in files:
                    if not (path / f).is_file():
                        raise CheckpointError(f"{index_path}: lists shard {f!r}, which is missing "
                                              f"from {path}")
            else:
                index_shards = None
                files = sorted(p.name for p in path.glob("*.safetensors"))
                if not files:
                    raise CheckpointError(f"{path}: no *.safetensors file and no {INDEX_NAME}: "
                                          f"not a safetensors checkpoint")
        self.shards: list[str] = files
        self._infos: dict[str, TensorInfo] = {}
        self.shard_metadata: dict[str, dict[str, str]] = {}
        self.shard_keys: dict[str, list[str]] = {}
        for f in files:
            infos, meta = read_header(self.root / f)
            self.shard_metadata[f] = meta
            self.shard_keys[f] = list(infos)
            for k, info in infos.items():
                if k in self._infos:
                    raise CheckpointError(f"{self.root}: tensor {k!r} is in both "
                                          f"{self._infos[k].shard} and {f}")
                self._infos[k] = info
        if index_shards is not None:
            for k, f in index_shards.items():
                if k not in self._infos or self._infos[k].shard != f:
                    raise CheckpointError(f"{self.root / INDEX_NAME}: maps {k!r} to {f}, but that "
                                          f"shard does not hold it")
        cfg = self.root / "config.json"
        self.config: dict = _load_json(cfg) if cfg.is_file() else {}
        self.has_index = index_shards is not None
        self._handles: dict[str, object] = {}

    # -- headers

    def keys(self) -> list[str]:
        """Every tensor name, in shard order then header order."""
        return list(self._infos)

    def __contains__(self, key: str) -> bool:
        return key in self._infos

    def info(self, key: str) -> TensorInfo:
        """Header facts of ``key`` (``KeyError`` naming the checkpoint when absent)."""
        try:
            return self._infos[key]
        except KeyError:
            raise KeyError(f"tensor {key!r} is not in checkpoint {self.root}") from None

    def shape(self, key: str) -> tuple[int, ...]:
        """Shape of ``key``."""
        return self.info(key).shape

    def dtype(self, key: str) -> torch.dtype:
        """torch dtype of ``key``."""
        return ST_DTYPES[self.info(key).dtype]

    def st_dtype(self, key: str) -> str:
        """safetensors dtype name of ``key`` (``"BF16"``, ``"F8_E4M3"``...)."""
        return self.info(key).dtype

    def shard_of(self, key: str) -> str:
        """File name (relative to the checkpoint directory) that holds ``key``."""
        return self.info(key).shard

    def nbytes(self, key: str) -> int:
        """Bytes of ``key``'s data."""
        return self.info(key).nbytes

    @property
    def format(self) -> str | None:
        """The FP8 layout ``config.json`` declares (``detect_format``), or the one the tensor
        names show when the config says nothing."""
        fmt = detect_format(self.config)
        if fmt is None:
            if any(k.endswith(".weight_scale_inv") for k in self._infos):
                return FP8
            if any(k.endswith(".weight_scale") for k in self._infos):
                return COMPRESSED_TENSORS
        return fmt

    def quantized_weights(self) -> list[str]:
        """Names of the FP8 ``*.weight`` tensors that have a block scale."""
        out = []
        for k, info in self._infos.items():
            if k.endswith(".weight") and info.dtype in ("F8_E4M3", "F8_E5M2"):
                out.append(k)
        return out

    # -- data

    def _handle(self, shard: str):
        h = self._handles.get(shard)
        if h is None:
            from safetensors import safe_open

            try:
                h = safe_open(str(self.root / shard), framework="pt", device="cpu")
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f"{self.root / shard}: cannot open: {e}") from e
            self._handles[shard] = h
        return h

    def get(self, key: str) -> torch.Tensor:
        """Tensor ``key`` on the CPU."""
        info = self.info(key)
        return self._handle(info.shard).get_tensor(key)

    def get_rows(self, key: str, r0: int, r1: int) -> torch.Tensor:
        """Rows ``r0:r1`` of tensor ``key`` (reads only those bytes)."""
        info = self.info(key)
        if not info.shape:
            return self.get(key)
        return self._handle(info.shard).get_slice(key)[r0:r1]

    def read_rows(self, key: str, r0: int, r1: int) -> torch.Tensor:
        """Rows ``r0:r1`` of ``key`` read without a memory map (see ``read_rows``)."""
        return read_rows(self.root, self.info(key), r0, r1)

    def read_bytes(self, key: str) -> bytes:
        """The raw little-endian bytes of ``key`` as stored."""
        info = self.info(key)
        with open(self.root / info.shard, "rb") as f:
            f.seek(info.offset)
            return f.read(info.nbytes)

    def close(self) -> None:
        """Release the memory maps."""
        self._handles.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"CheckpointReader({str(self.root)!r}, {len(self._infos)} tensors, "
                f"{len(self.shards)} shards)")


def block_size_of(config: dict) -> tuple[int, int]:
    """The weight block of a quantized checkpoint's ``config.json`` (default ``(128, 128)``).

    fp8 layout: ``quantization_config.weight_block_size``; compressed-tensors: the first config
    group's ``weights.block_structure``.
    """
    qc = (config or {}).get("quantization_config") or {}
    if qc.get("weight_block_size"):
        b = qc["weight_block_size"]
        return int(b[0]), int(b[1])
    for group in (qc.get("config_groups") or {}).values():
        w = (group or {}).get("weights") or {}
        if w.get("strategy") not in (None, "block"):
            raise CheckpointError(f"compressed-tensors weights strategy {w.get('strategy')!r} "
                                  f"is not block-wise FP8; only FP8_BLOCK checkpoints are "
                                  f"supported")
        if w.get("block_structure"):
            b = w["block_structure"]
            return int(b[0]), int(b[1])
    return 128, 128


def dequantized_weight(reader: CheckpointReader, weight_key: str,
                       dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``W = Q * s`` of FP8 ``weight_key`` (either layout) as ``dtype``; its scale may sit in
    another shard. A weight that is not FP8 is returned as stored, cast to ``dtype``."""
    if reader.st_dtype(weight_key) not in ("F8_E4M3", "F8_E5M2"):
        return reader.get(weight_key).to(dtype)
    fmt = reader.format
    if fmt is None:
        raise CheckpointError(f"{reader.root}: tensor {weight_key!r} is FP8 but the checkpoint has "
                              f"no scale tensors and no quantization_config")
    skey = scale_key(weight_key, fmt)
    if skey not in reader:
        raise CheckpointError(f"{reader.root}: FP8 tensor {weight_key!r} has no scale {skey!r}")
    return ops.dequantize_blockwise(reader.get(weight_key), reader.get(skey),
                                    block_size_of(reader.config), dtype, name=weight_key)
