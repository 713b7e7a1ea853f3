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
    "read_json_object",
    "parse_json_object",
    "check_shard_name",
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


def read_json_object(path: str | os.PathLike, what: str) -> dict:
    """Parse the JSON file ``path`` strictly and return it; it must be a JSON object.

    Refused (``CheckpointError`` naming ``path`` and ``what`` it should be): unreadable
    files, invalid UTF-8 or JSON, duplicate keys in any object, the non-standard constants
    ``NaN``/``Infinity``, nesting too deep for the parser, and a top level that is not an
    object.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from e
    return parse_json_object(raw, f"{path}", what)


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise _JSONRefusal(f"duplicate key {k!r}")
        out[k] = v
    return out


def _no_constant(name: str) -> float:
    raise _JSONRefusal(f"non-standard JSON constant {name}")


class _JSONRefusal(ValueError):
    """A JSON document that parses but that the checkpoint formats forbid."""


def parse_json_object(raw: bytes, where: str, what: str) -> dict:
    """``raw`` (UTF-8 JSON) as a dict, with the rules of ``read_json_object``; errors name
    ``where`` and say it should be ``what``."""
    try:
        value = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates,
                           parse_constant=_no_constant)
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{where}: corrupt {what} (not UTF-8: {e})") from e
    except _JSONRefusal as e:
        raise CheckpointError(f"{where}: corrupt {what} ({e})") from e
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{where}: corrupt {what} (not JSON: {e})") from e
    except RecursionError as e:
        raise CheckpointError(f"{where}: corrupt {what} (JSON nested too deeply)") from e
    if not isinstance(value, dict):
        raise CheckpointError(f"{where}: corrupt {what} (a JSON {type(value).__name__}, "
                              f"not an object)")
    return value


def _entry(path: Path, key: str, h: object) -> tuple[str, tuple[int, ...], int, int]:
    """``(dtype, shape, begin, end)`` of one header entry, checked against the format rules."""
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"{path}: corrupt safetensors header: tensor {key!r} {why}")

    if not isinstance(h, dict) or not {"dtype", "shape", "data_offsets"} <= set(h):
        raise bad("must be an object with 'dtype', 'shape' and 'data_offsets'")
    dtype, shape, offsets = h["dtype"], h["shape"], h["data_offsets"]
    if not isinstance(dtype, str) or dtype not in ST_ITEMSIZE:
        raise bad(f"has dtype {dtype!r}, which is not a safetensors dtype this tool knows "
                  f"({', '.join(ST_ITEMSIZE)})")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise bad(f"has shape {shape!r}: it must be a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(type(o) is int and o >= 0 for o in offsets) or offsets[0] > offsets[1]):
        raise bad(f"has data_offsets {offsets!r}: they must be [begin, end] with "
                  f"0 <= begin <= end")
    numel = 1
    for d in shape:
        numel *= d
    if offsets[1] - offsets[0] != numel * ST_ITEMSIZE[dtype]:
        raise bad(f"stores {offsets[1] - offsets[0]} bytes, but shape {shape} of {dtype} needs "
                  f"{numel * ST_ITEMSIZE[dtype]}")
    return dtype, tuple(shape), offsets[0], offsets[1]


def read_header(path: str | os.PathLike) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and check the header of one ``.safetensors`` file against the format's rules.

    Returns ``({key: TensorInfo}, metadata)`` in header order. Raises ``CheckpointError``
    naming the file and what is wrong when: the file is shorter than 8 bytes; the header
    length is 0, over 100 MB or beyond the end of the file; the header is not strict JSON
    (UTF-8, no duplicate keys, no NaN) or not an object; ``__metadata__`` is not an object of
    strings; an entry lacks ``dtype``/``shape``/``data_offsets`` (other fields are ignored, as
    safetensors does); a dtype is
    unknown; a shape is not a list of non-negative integers; ``end - begin`` differs from
    ``prod(shape) * itemsize``; or the data regions, sorted by offset, do not tile the data
    section exactly (a gap, an overlap, a region past the end of the file, or bytes after
    the last tensor: a truncated download or an interrupted write). These are the checks of
    the safetensors library itself, made before any conversion writes a byte.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: not a safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n == 0 or n > _MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{path}: corrupt or truncated safetensors header "
                                      f"(header length {n}, file size {size})")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from e
    header = parse_json_object(raw, str(path), "safetensors header")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: corrupt safetensors header: __metadata__ must be an "
                              f"object of strings")
    base = 8 + n
    data_size = size - base
    infos: dict[str, TensorInfo] = {}
    regions = []
    for key, h in header.items():
        dtype, shape, b, e = _entry(path, key, h)
        regions.append((b, e, key))
        infos[key] = TensorInfo(key, dtype, shape, path.name, base + b, e - b)
    pos = 0
    for b, e, key in sorted(regions):
        if b != pos:
            what = "overlaps the previous tensor" if b < pos else f"leaves a gap of {b - pos} bytes"
            raise CheckpointError(f"{path}: corrupt safetensors header: tensor {key!r} "
                                  f"(data_offsets [{b}, {e}]) {what}; the data regions must "
                                  f"follow each other")
        pos = e
    if pos > data_size:
        raise CheckpointError(f"{path}: truncated: the header needs {base + pos} bytes, the "
                              f"file has {size}. Re-download or re-create it.")
    if pos < data_size:
        raise CheckpointError(f"{path}: corrupt safetensors file: {data_size - pos} bytes after "
                              f"the last tensor that no header entry covers")
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
    # torch's allocator, not a bytearray: its 64-byte alignment is the same on every run, as
    # for any tensor a computation makes. A bytearray's address varies modulo 64 from run to
    # run, and BLAS kernels may round differently on differently aligned inputs, which would
    # make a resumed calibration differ from an uninterrupted one in the last bit.
    t = torch.empty(n, dtype=torch.uint8)
    path = Path(root) / info.shard
    view, got, pos = memoryview(t.numpy()).cast("B"), 0, info.offset + r0 * row_bytes
    with open(path, "rb", buffering=0) as f:
        while got < n:
            k = os.preadv(f.fileno(), [view[got:]], pos + got)
            if not k:
                raise CheckpointError(f"{path}: unexpected end of file reading tensor {info.key!r}")
            got += k
    t = t.view(dtype)
    return t.reshape((r1 - r0, *rest)) if len(info.shape) >= 2 else t.reshape(info.shape)


def check_shard_name(name: str, where: str | os.PathLike) -> None:
    """Refuse (``CheckpointError`` naming ``where``) a shard file name from an index that is not
    a plain file name inside the checkpoint directory: empty, absolute, with a ``/`` or ``\\``,
    ``.`` or ``..``, a NUL byte, or one of the names a conversion writes itself."""
    if (not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name
            or name in (INDEX_NAME, "config.json")):
        raise CheckpointError(f"{where}: shard name {name!r} is not a plain file name in the "
                              f"checkpoint directory (path traversal and special names are "
                              f"refused)")


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
                index = read_json_object(index_path, "index")
                wm = index.get("weight_map")
                if not isinstance(wm, dict) or not wm:
                    raise CheckpointError(f"{index_path}: no weight_map (an object mapping every "
                                          f"tensor name to its shard file)")
                if not isinstance(index.get("metadata", {}), (dict, type(None))):
                    raise CheckpointError(f"{index_path}: 'metadata' must be an object")
                for k, f in wm.items():
                    if not isinstance(f, str):
                        raise CheckpointError(f"{index_path}: maps {k!r} to {f!r}, not a file name")
                    check_shard_name(f, index_path)
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
        self.config: dict = read_json_object(cfg, "config.json") if cfg.is_file() else {}
        qc = self.config.get("quantization_config")
        if qc is not None and not isinstance(qc, dict):
            raise CheckpointError(f"{cfg}: quantization_config must be an object, not "
                                  f"{type(qc).__name__}")
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
    def layout(self) -> str | None:
        """The FP8 on-disk layout (``"fp8"``, ``"compressed-tensors"`` or ``None``): see
        ``format``."""
        return self.format

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
        return _block(qc["weight_block_size"], "quantization_config.weight_block_size")
    groups = qc.get("config_groups") or {}
    if not isinstance(groups, dict) or not all(isinstance(g, (dict, type(None)))
                                               for g in groups.values()):
        raise CheckpointError("config.json: quantization_config.config_groups must be an object "
                              "of objects")
    for group in groups.values():
        w = (group or {}).get("weights") or {}
        if not isinstance(w, dict):
            raise CheckpointError("config.json: a config group's 'weights' must be an object")
        if w.get("strategy") not in (None, "block"):
            raise CheckpointError(f"compressed-tensors weights strategy {w.get('strategy')!r} "
                                  f"is not block-wise FP8; only FP8_BLOCK checkpoints are "
                                  f"supported")
        if w.get("block_structure"):
            return _block(w["block_structure"], "block_structure")
    return 128, 128


def _block(value: object, what: str) -> tuple[int, int]:
    """``value`` as a block ``(rows, cols)`` of two positive integers, else ``CheckpointError``."""
    if (not isinstance(value, list) or len(value) != 2
            or not all(type(v) is int and v > 0 for v in value)):
        raise CheckpointError(f"config.json: {what} is {value!r}; it must be two positive "
                              f"integers such as [128, 128]")
    return value[0], value[1]


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
