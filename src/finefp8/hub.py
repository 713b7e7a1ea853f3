"""Model arguments: a local folder or a Hugging Face Hub ID, resolved the way transformers does.

Every command and function that reads a model (``finefp8 quantize``, ``dequantize``, ``inspect``,
``eval``, ``generate``, ``finefp8.load``) passes its argument through ``resolve_model``:

1. **An existing path wins.** If ``MODEL`` names a file or folder that exists (relative to the
   current directory, ``~`` expanded), it is used as it is, even when it also reads like a Hub ID
   (``org/name``). This is transformers' rule (``from_pretrained`` checks ``os.path.isdir``
   first). ``revision`` is refused for a local path: a folder has no revisions.
2. **Otherwise ``org/name`` is a Hub model ID** (one ``/``, the characters the Hub allows). It is
   looked up in the local Hugging Face cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
   ``~/.cache/huggingface/hub``) at ``revision`` (a branch, tag or commit; default ``main``).
   A cached snapshot that holds every file the command needs is used without any network call.
3. **Downloads** happen only when the cache lacks a needed file and ``HF_HUB_OFFLINE`` is not
   set: ``huggingface_hub.snapshot_download`` with ``allow_patterns`` naming exactly the files
   of the command (``FILE_SETS``), never whole repositories: ``.bin``/``.pth``/``.pt``/GGUF/ONNX/
   msgpack/h5 copies of the same weights are never fetched. Weights are the safetensors shards
   ``model.safetensors.index.json`` lists (or ``model.safetensors``), so a repository's other
   safetensors copies (``consolidated.safetensors``, ``original/``) are not fetched either.
   huggingface_hub draws its progress bars on stderr.
4. Anything else is an error naming the ID, the revision and what was tried (the cache only,
   or the cache and then the network): ``ModelNotFoundError`` (a ``FileNotFoundError``).

``ShardStream`` is the streaming side of a large Hub model: it downloads shard ``i + 1`` in a
background thread while the caller converts shard ``i`` (at most one shard ahead).
``StagedInput`` is the input folder a conversion reads for a Hub model: links to the command's
files only, and (streaming) shard stubs planned from their headers, each swapped for the
downloaded shard right before it converts. docs/hub.md describes all of it.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from .checkpoint.layout import OTHER_WEIGHT_FORMATS

__all__ = [
    "WEIGHT_INDEX",
    "WEIGHT_SINGLE",
    "CONFIG_FILES",
    "TOKENIZER_FILES",
    "GENERATION_FILES",
    "CARD_FILES",
    "FILE_SETS",
    "NEVER_FETCHED",
    "ModelNotFoundError",
    "ResolvedModel",
    "ShardStream",
    "StagedInput",
    "remote_header",
    "hub_cache_dir",
    "hub_offline",
    "is_hub_id",
    "resolve_model",
    "allow_patterns_for",
]

WEIGHT_INDEX = "model.safetensors.index.json"
WEIGHT_SINGLE = "model.safetensors"
CONFIG_FILES = ("config.json",)
#: The tokenizer files transformers' ``AutoTokenizer`` reads, whichever of them a model has.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "tokenizer.model", "vocab.json", "merges.txt",
                   "vocab.txt", "spiece.model", "chat_template.jinja", "chat_template.json")
GENERATION_FILES = ("generation_config.json",)
#: The source's model card (kept below finefp8's in a quantized checkpoint) and its legal
#: files, which a converted checkpoint carries on.
CARD_FILES = ("README.md", "LICENSE", "LICENSE.txt", "LICENSE.md", "NOTICE", "USE_POLICY.md")

#: Files each command needs besides the safetensors weights (which every command needs: even
#: ``inspect`` reads the shard headers, and the values unless ``--no-scan``).
FILE_SETS: dict[str, tuple[str, ...]] = {
    "quantize": CONFIG_FILES + TOKENIZER_FILES + GENERATION_FILES + CARD_FILES,
    "dequantize": CONFIG_FILES + TOKENIZER_FILES + GENERATION_FILES + CARD_FILES,
    "inspect": CONFIG_FILES,
    "eval": CONFIG_FILES + TOKENIZER_FILES + GENERATION_FILES,
    "generate": CONFIG_FILES + TOKENIZER_FILES + GENERATION_FILES,
    "load": CONFIG_FILES + GENERATION_FILES,
}

#: Weight formats finefp8 never reads, so never downloads (the same weights in other files).
NEVER_FETCHED = OTHER_WEIGHT_FORMATS

_TRUE = {"1", "ON", "YES", "TRUE"}
_ID_PART = r"[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
_HUB_ID = re.compile(rf"^{_ID_PART}/{_ID_PART}$")


class ModelNotFoundError(FileNotFoundError):
    """A model argument that is neither an existing path nor a Hub ID that could be resolved.

    The message names the argument, the revision and what was tried.
    """


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model argument points on this machine.

    Attributes:
        path: the local folder (or ``.safetensors`` file) to read.
        repo_id: the Hub ID, ``None`` for a local path.
        revision: the revision asked for (``None``: ``main``), Hub IDs only.
        commit: the commit hash of the snapshot used, Hub IDs only.
        origin: ``"local"`` (a path), ``"cache"`` (a complete cached snapshot, no network) or
            ``"download"`` (missing files were downloaded).
    """

    path: Path
    repo_id: str | None = None
    revision: str | None = None
    commit: str | None = None
    origin: str = "local"

    @property
    def is_hub(self) -> bool:
        """Whether the argument was a Hub ID."""
        return self.repo_id is not None

    def describe(self) -> str:
        """``org/name@rev (commit 0123abc, from the cache)`` or the local path."""
        if not self.is_hub:
            return str(self.path)
        rev = f"@{self.revision}" if self.revision else ""
        commit = f"commit {self.commit[:12]}, " if self.commit else ""
        where = {"cache": "from the cache", "download": "downloaded"}.get(self.origin, self.origin)
        return f"{self.repo_id}{rev} ({commit}{where})"


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` forbids network access (read now, not at import time)."""
    env = os.environ.get("HF_HUB_OFFLINE")
    if env is not None:
        return env.strip().upper() in _TRUE
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache: ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
    ``~/.cache/huggingface/hub`` (huggingface_hub's order, read now)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "huggingface" / "hub"


def is_hub_id(name: str) -> bool:
    """Whether ``name`` has the form of a Hub model ID ``org/name`` (no ``--``/``..``)."""
    return bool(_HUB_ID.match(name)) and "--" not in name and ".." not in name


def allow_patterns_for(purpose: str, shards: Sequence[str] = ()) -> list[str]:
    """The exact file names ``purpose`` downloads: its ``FILE_SETS`` entry, the weight index,
    and ``shards`` (the safetensors files that index lists, or ``model.safetensors``)."""
    if purpose not in FILE_SETS:
        raise ValueError(f"unknown purpose {purpose!r}; expected one of {sorted(FILE_SETS)}")
    return sorted(set(FILE_SETS[purpose]) | {WEIGHT_INDEX} | set(shards))


def _check_patterns(patterns: Sequence[str]) -> None:
    """Refuse any pattern that would fetch another weight format (a programming error)."""
    for p in patterns:
        if any(fnmatch.fnmatch(p, bad) for bad in NEVER_FETCHED):
            raise ValueError(f"refusing to download {p!r}: finefp8 reads safetensors weights only")


def _snapshot_dir(cache: Path, repo_id: str, revision: str) -> tuple[Path | None, str | None]:
    """The cached snapshot folder of ``repo_id`` at ``revision`` and its commit, if cached."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = None
    if re.fullmatch(r"[0-9a-f]{40}", revision):
        commit = revision
    else:
        ref = repo / "refs" / revision
        if ref.is_file():
            commit = ref.read_text().strip()
    if commit is None:
        return None, None
    snap = repo / "snapshots" / commit
    return (snap if snap.is_dir() else None), commit


def _weight_files(folder: Path) -> list[str] | None:
    """The safetensors files ``folder``'s index lists, ``[model.safetensors]`` without an index,
    or ``None`` when neither the index nor ``model.safetensors`` is there."""
    index = folder / WEIGHT_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            return sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
    if (folder / WEIGHT_SINGLE).is_file():
        return [WEIGHT_SINGLE]
    return None


def _has_required(snap: Path, purpose: str, weights: bool = True) -> bool:
    """Whether a cached snapshot holds what ``purpose`` cannot do without: config.json, the
    weight index (or ``model.safetensors``), every listed shard (unless ``weights`` is false),
    and (for the commands that tokenize) a tokenizer config."""
    if not (snap / "config.json").is_file():
        return False
    shards = _weight_files(snap)
    if not shards or weights and not all((snap / s).is_file() for s in shards):
        return False
    if purpose in ("eval", "generate"):
        return any((snap / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    return True


def _has_everything(snap: Path, purpose: str, repo_id: str, cache: Path,
                    weights: bool = True) -> bool:
    """``_has_required`` and every other file of ``purpose`` the repository has. The
    repository's file list is known offline when huggingface_hub cached it (``trees/``); without
    it, a tokenizer config must be there for the purposes that copy or use the tokenizer."""
    if not _has_required(snap, purpose, weights):
        return False
    wanted = set(FILE_SETS[purpose])
    try:
        from huggingface_hub import get_cached_repo_tree

        listed = {f.path for f in get_cached_repo_tree(repo_id, revision=snap.name,
                                                        cache_dir=str(cache))}
    except Exception:  # no cached listing (or an older huggingface_hub): judge by the files
        listed = None
    if listed is not None:
        return all((snap / f).is_file() for f in wanted & listed)
    if set(TOKENIZER_FILES) & wanted:
        return any((snap / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    return True


def _label(repo_id: str, revision: str | None) -> str:
    return f"{repo_id!r} at revision {revision or 'main'!r}"


class _Quiet:
    """Turns huggingface_hub's progress bars off inside a ``with`` when ``quiet``."""

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.was_disabled = False

    def __enter__(self) -> _Quiet:
        if self.quiet:
            from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars

            self.was_disabled = are_progress_bars_disabled()
            disable_progress_bars()
        return self

    def __exit__(self, *exc) -> None:
        if self.quiet and not self.was_disabled:
            from huggingface_hub.utils import enable_progress_bars

            enable_progress_bars()


def _download(repo_id: str, revision: str | None, patterns: list[str], cache: Path,
              progress: bool) -> Path:
    """``snapshot_download`` of exactly ``patterns``; returns the snapshot folder."""
    from huggingface_hub import snapshot_download

    _check_patterns(patterns)
    with _Quiet(not progress):
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=str(cache),
                                      allow_patterns=patterns))


def _network_error(repo_id: str, revision: str | None, cache: Path, e: Exception
                   ) -> ModelNotFoundError:
    from huggingface_hub.errors import (
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(e, GatedRepoError):
        why = "the repository is gated: accept its terms on the Hub and log in (hf auth login)"
    elif isinstance(e, RepositoryNotFoundError):
        why = "no such repository on the Hub (or it is private: log in with hf auth login)"
    elif isinstance(e, RevisionNotFoundError):
        why = "the repository has no such revision (branch, tag or commit)"
    else:
        why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return ModelNotFoundError(f"model {_label(repo_id, revision)}: not complete in the cache "
                              f"{cache}, then tried the network: {why}")


def resolve_model(model: str | os.PathLike, revision: str | None = None, *,
                  purpose: str = "quantize", progress: bool = True,
                  stream_weights: bool = False) -> ResolvedModel:
    """Resolve a model argument to a local path (see the module docstring for the rules).

    Args:
        model: a local folder / ``.safetensors`` file, or a Hub ID ``org/name``.
        revision: branch, tag or commit of a Hub ID (``None``: ``main``); refused for a path.
        purpose: a ``FILE_SETS`` key: which files are needed besides the weights.
        progress: show huggingface_hub's download progress bars (stderr).
        stream_weights: fetch everything but the weight shards; the caller fetches them with
            ``ShardStream`` (used by conversions that stream a large model shard by shard).

    Returns:
        a ``ResolvedModel``; ``path`` holds config.json and the weights (unless
        ``stream_weights``), and whichever of the purpose's other files the model has.

    Raises:
        ModelNotFoundError: a path that does not exist and is not a Hub ID, or a Hub ID that
            is not in the cache while ``HF_HUB_OFFLINE`` is set, or that the Hub refused.
        ValueError: ``revision`` given for a local path, or an unknown ``purpose``.
    """
    if purpose not in FILE_SETS:
        raise ValueError(f"unknown purpose {purpose!r}; expected one of {sorted(FILE_SETS)}")
    name = os.fspath(model)
    path = Path(name).expanduser()
    if path.exists():
        if revision is not None:
            raise ValueError(f"--revision {revision!r} applies to Hub IDs, but {name!r} is a "
                             f"local path (an existing path always wins over a Hub ID)")
        return ResolvedModel(path)
    if not is_hub_id(name):
        raise ModelNotFoundError(f"{name}: no such file or directory, and not a Hugging Face "
                                 f"Hub ID of the form org/name")
    cache = hub_cache_dir()
    snap, commit = _snapshot_dir(cache, name, revision or "main")
    offline = hub_offline()
    weights = not stream_weights or offline  # offline, every shard must be cached already
    if snap is not None and (_has_required(snap, purpose, weights) if offline
                             else _has_everything(snap, purpose, name, cache, weights)):
        return ResolvedModel(snap, name, revision, commit, "cache")
    if offline:
        what = ("is not in" if snap is None else
                "is only partly in (config.json, a weight shard or the tokenizer is missing from)")
        raise ModelNotFoundError(
            f"model {_label(name, revision)} {what} the Hugging Face cache {cache}, and "
            f"HF_HUB_OFFLINE=1 forbids the network (and no local folder {name!r} exists): run "
            f"once with network access (unset HF_HUB_OFFLINE), or pass a local folder")
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        snap = _download(name, revision, allow_patterns_for(purpose), cache, progress)
        shards = _weight_files(snap)
        if shards is None:
            snap = _download(name, snap.name, allow_patterns_for(purpose, [WEIGHT_SINGLE]),
                             cache, progress)
            shards = _weight_files(snap)
        if shards is None:
            raise ModelNotFoundError(
                f"model {_label(name, revision)}: the repository has no safetensors weights "
                f"({WEIGHT_INDEX} or {WEIGHT_SINGLE}); finefp8 reads safetensors only")
        if not stream_weights:
            snap = _download(name, snap.name, allow_patterns_for(purpose, shards), cache,
                             progress)
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as e:
        if isinstance(e, ModelNotFoundError):
            raise
        raise _network_error(name, revision, cache, e) from e
    if not (snap / "config.json").is_file():
        raise ModelNotFoundError(f"model {_label(name, revision)}: the repository has no "
                                 f"config.json; finefp8 needs a transformers model repository")
    return ResolvedModel(snap, name, revision, snap.name, "download")


class ShardStream:
    """A Hub model's weight shards as local files, shard ``i + 1`` downloading in a background
    thread while the caller works on shard ``i`` (bounded: one download at a time, at most one
    shard ahead of the caller).

    ``get(name)`` returns the local path of shard ``name`` (waiting for its prefetch, or
    fetching it now), then starts fetching the shard after it in ``shards`` order;
    ``for path in stream`` gets every shard in order. A shard already in the snapshot is not
    downloaded again. Download errors surface, as ``ModelNotFoundError``, when the failed shard
    is asked for. Every fetched shard stays in the Hugging Face cache.

    Args:
        resolved: a ``ResolvedModel`` of a Hub ID (``resolve_model(..., stream_weights=True)``).
        shards: the shard file names, in the order they will be used.
        progress: show huggingface_hub's per-file download bars.
        fetch: the download function, with ``huggingface_hub.hf_hub_download``'s signature
            (``fetch(repo_id, filename, revision=, cache_dir=)`` -> local path); default that.
    """

    def __init__(self, resolved: ResolvedModel, shards: Sequence[str], *, progress: bool = True,
                 fetch: Callable[..., str] | None = None):
        if not resolved.is_hub:
            raise ValueError("ShardStream needs a Hub model; a local folder has its shards")
        _check_patterns(shards)
        self.resolved = resolved
        self.shards = list(shards)
        self.progress = progress
        self._fetch = fetch
        self.fetched: list[str] = []  # shards that were downloaded, in order
        self._ready: dict[str, Path | BaseException] = {}
        self._thread: threading.Thread | None = None
        self._thread_shard: str | None = None

    def _download(self, shard: str) -> Path:
        local = self.resolved.path / shard
        if local.is_file():
            return local
        label = _label(self.resolved.repo_id, self.resolved.revision)
        if hub_offline():
            raise ModelNotFoundError(f"model {label}: shard {shard} is not in the cache and "
                                     f"HF_HUB_OFFLINE=1 forbids the network")
        fetch = self._fetch
        if fetch is None:
            from huggingface_hub import hf_hub_download as fetch
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

        try:
            with _Quiet(not self.progress):
                got = Path(fetch(self.resolved.repo_id, shard,
                                 revision=self.resolved.commit or self.resolved.revision,
                                 cache_dir=str(hub_cache_dir())))
        except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as e:
            raise _network_error(self.resolved.repo_id, self.resolved.revision,
                                 hub_cache_dir(), e) from e
        self.fetched.append(shard)
        return got

    def _work(self, shard: str) -> None:
        try:
            self._ready[shard] = self._download(shard)
        except BaseException as e:  # re-raised in the caller's thread by get()
            self._ready[shard] = e

    def _join(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread, self._thread_shard = None, None

    def get(self, shard: str) -> Path:
        """The local path of ``shard``; then the next shard starts downloading."""
        if shard not in self.shards:
            raise KeyError(f"{shard!r} is not one of the shards of {self.resolved.repo_id}")
        self._join()  # one download at a time: the prefetch in flight (usually this shard)
        if shard not in self._ready:
            self._work(shard)
        got = self._ready.pop(shard)
        if isinstance(got, BaseException):
            raise got
        i = self.shards.index(shard)
        nxt = next((s for s in self.shards[i + 1:] if s not in self._ready), None)
        if nxt is not None and not (self.resolved.path / nxt).is_file():
            self._thread_shard = nxt
            self._thread = threading.Thread(target=self._work, args=(nxt,), daemon=True,
                                            name=f"finefp8-prefetch-{nxt}")
            self._thread.start()
        return got

    def __iter__(self) -> Iterator[Path]:
        for shard in self.shards:
            yield self.get(shard)

    def close(self) -> None:
        """Wait for a prefetch in flight (its file stays in the cache)."""
        self._join()


def _local_header(path: Path) -> bytes:
    """The first ``8 + n`` bytes (length prefix and JSON header) of a local safetensors file."""
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 0 or n > 100_000_000:
            raise ModelNotFoundError(f"{path}: not a safetensors file (no header)")
        return head + f.read(n)


def remote_header(repo_id: str, filename: str, revision: str) -> bytes:
    """The first ``8 + n`` bytes of a safetensors file on the Hub, read with HTTP range
    requests (huggingface_hub's own ``parse_safetensors_file_metadata`` does the same): the
    8-byte little-endian header length ``n``, then the JSON header."""
    from huggingface_hub import hf_hub_url
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    url = hf_hub_url(repo_id, filename, revision=revision)
    headers = build_hf_headers()
    r = get_session().get(url, headers={**headers, "range": "bytes=0-100000"})
    hf_raise_for_status(r)
    data = r.content
    n = int.from_bytes(data[:8], "little")
    if len(data) < 8 + n:
        r = get_session().get(url, headers={**headers, "range": f"bytes=8-{n + 7}"})
        hf_raise_for_status(r)
        data = data[:8] + r.content
    return data[: 8 + n]


def _file_size_from_header(raw: bytes, name: str) -> int:
    """A safetensors file's size from its header: ``8 + n + max(data end)`` (the data buffer
    has no holes and nothing after it)."""
    n = int.from_bytes(raw[:8], "little")
    try:
        header = json.loads(raw[8: 8 + n])
        end = max([int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
                  or [0])
    except (ValueError, KeyError, TypeError) as e:
        raise ModelNotFoundError(f"{name}: corrupt safetensors header on the Hub ({e})") from e
    return 8 + n + end


#: mtime of every not-yet-linked shard of a staged input (fixed, so the conversion's input
#: fingerprint is the same on every run of the same Hub commit).
_STUB_MTIME_NS = 946_684_800 * 10**9


class StagedInput:
    """The conversion input folder of a Hub model: only the files of ``purpose``, and with
    ``stream`` its shards fetched while it converts.

    The folder (a temporary directory) holds links to the snapshot's files that ``purpose``
    uses (``FILE_SETS``: config, index, tokenizer, card; a cached snapshot may hold more, such
    as ``.bin``/GGUF copies of the weights, which a conversion must neither read nor copy).
    Without ``stream`` every shard is linked too (they must be cached). With ``stream`` each
    shard starts as a *stub*: a sparse file of the shard's size holding only its header (read
    from the cache, or from the Hub with a range request), so the conversion can plan every
    tensor before any shard is downloaded; ``before_shard(name)`` (the conversion's hook,
    called right before it reads shard ``name``) waits for that shard's download
    (``ShardStream``: the next one starts at once, in the background) and swaps the stub for a
    link to the downloaded file. Stubs carry a fixed mtime, so an interrupted conversion of the
    same commit resumes.

    Use as a context manager; the folder is removed on exit, the cache is kept.
    """

    def __init__(self, resolved: ResolvedModel, *, purpose: str = "quantize",
                 stream: bool = True, progress: bool = True,
                 fetch: Callable[..., str] | None = None,
                 header: Callable[[str, str, str], bytes] | None = None):
        if not resolved.is_hub:
            raise ValueError("StagedInput needs a Hub model")
        shards = _weight_files(resolved.path)
        if not shards:
            raise ModelNotFoundError(f"model {_label(resolved.repo_id, resolved.revision)}: no "
                                     f"{WEIGHT_INDEX} or {WEIGHT_SINGLE} in {resolved.path}")
        self.resolved = resolved
        self.shards = shards
        self.wanted = set(FILE_SETS[purpose]) | {WEIGHT_INDEX}
        self.streaming = stream
        self.stream = ShardStream(resolved, shards, progress=progress, fetch=fetch)
        self._header = header or remote_header
        self.root: Path | None = None

    def __enter__(self) -> StagedInput:
        import tempfile

        self.root = Path(tempfile.mkdtemp(prefix="finefp8-hub-input-"))
        try:
            for name in sorted(self.wanted - set(self.shards)):
                p = self.resolved.path / name
                if p.is_file():
                    (self.root / name).symlink_to(p.resolve())
            for shard in self.shards:
                local = self.resolved.path / shard
                if not self.streaming:
                    if not local.is_file():
                        raise ModelNotFoundError(f"{local}: shard missing from the snapshot")
                    (self.root / shard).parent.mkdir(parents=True, exist_ok=True)
                    (self.root / shard).symlink_to(local.resolve())
                    continue
                raw = (_local_header(local) if local.is_file() else
                       self._header(self.resolved.repo_id, shard,
                                    self.resolved.commit or self.resolved.revision or "main"))
                stub = self.root / shard
                stub.parent.mkdir(parents=True, exist_ok=True)
                with open(stub, "wb") as f:
                    f.write(raw)
                    f.truncate(_file_size_from_header(raw, shard))
                os.utime(stub, ns=(_STUB_MTIME_NS, _STUB_MTIME_NS))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def before_shard(self, shard: str) -> None:
        """Make ``shard`` in the staged folder the real, downloaded file (blocks until it is)."""
        assert self.root is not None, "use StagedInput as a context manager"
        if not self.streaming:
            return
        target = self.stream.get(shard).resolve()
        link = self.root / shard
        tmp = link.with_name(link.name + ".link")
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        tmp.symlink_to(target)
        os.replace(tmp, link)

    def __exit__(self, exc_type, exc, tb) -> None:
        import shutil

        if exc_type is None:  # on an error or Ctrl-C, do not wait for a prefetch (a daemon)
            self.stream.close()
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
