"""The conversion manifest ``OUT/.finefp8-manifest.json``: what a run will write, what it has
finished (with each file's size and SHA-256), and whether it is complete.

Format (version 2)::

    {"manifest_version": 2, "finefp8": "<version>", "fingerprint": "<sha256>",
     "status": "in-progress" | "complete",
     "outputs": ["model-00001-of-00002.safetensors", ..., "tokenizer.json", "config.json"],
     "done": {"model-00001-of-00002.safetensors": {"size": 123, "sha256": "<hex>"}, ...}}

* ``fingerprint``: SHA-256 of the finefp8 version, the options and every input file's name,
  size and mtime. A rerun with the same fingerprint resumes; another one is refused (or, with
  ``overwrite``, replaces the old conversion).
* Resume and "already complete" trust nothing but the bytes: every ``done`` file is re-hashed;
  one that is missing or changed is dropped from ``done`` (and redone), and a complete OUT
  with such a file goes back to in-progress (its ``config.json`` removed first, so it never
  looks loadable while it is repaired).
* Ownership: the files a finefp8 conversion wrote are the manifest's ``outputs`` and ``done``
  entries, their ``.partial`` files, the manifest and the lock file. ``overwrite`` deletes
  those and nothing else; any other entry in OUT (a file, a dotfile, a folder, a symbolic
  link) makes it refuse, naming the entries. The scratch folder ``.finefp8-work/`` of a
  calibrated quantize (``staged``) is the conversion's own when OUT has a manifest. Paths in a manifest that are absolute, contain
  ``..`` or pass through a symbolic link are never followed.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..version import __version__
from .errors import ConversionError
from .lock import LOCK_NAME
from .reader import CheckpointReader
from .staged import WORK_DIR, remove_work_dir
from .writer import PARTIAL_SUFFIX, atomic_write_bytes

__all__ = [
    "MANIFEST_NAME",
    "MANIFEST_VERSION",
    "fingerprint",
    "file_sha256",
    "new_manifest",
    "read_manifest",
    "write_manifest",
    "record_done",
    "out_entries",
    "owned_paths",
    "remove_owned",
    "prepare_out",
]

MANIFEST_NAME = ".finefp8-manifest.json"
MANIFEST_VERSION = 2
_HASH_CHUNK = 8 * 1024 * 1024
_LIST_NAMES = 10


def fingerprint(reader: CheckpointReader, options: dict) -> str:
    """SHA-256 of the options, the finefp8 version and every input file's name, size and
    mtime (the top level of IN)."""
    files = []
    for p in sorted(reader.root.iterdir()):
        if p.is_file():
            st = p.stat()
            files.append([p.name, st.st_size, st.st_mtime_ns])
    blob = json.dumps({"finefp8": __version__, "options": options, "files": files}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of the file at ``path``, read in 8 MB pieces."""
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        while True:
            buf = f.read(_HASH_CHUNK)
            if not buf:
                return h.hexdigest()
            h.update(buf)


def new_manifest(fp: str, outputs: list[str]) -> dict:
    """An in-progress manifest with nothing done."""
    return {"manifest_version": MANIFEST_VERSION, "finefp8": __version__, "fingerprint": fp,
            "status": "in-progress", "outputs": sorted(outputs), "done": {}}


def _safe_relpath(p: object) -> bool:
    """True for a relative path inside OUT: no absolute path, ``..``, empty part or NUL."""
    if not isinstance(p, str) or not p or p.startswith("/") or "\0" in p or "\\" in p:
        return False
    return all(part not in ("", ".", "..") for part in p.split("/"))


def read_manifest(out: Path) -> dict | None:
    """The manifest of ``out`` in the version-2 shape, or ``None`` when there is none or it is
    not a well-formed finefp8 manifest (it is then an ordinary file that finefp8 did not
    write). A version-1 manifest (``done: {name: size}``) is read with unknown hashes, so its
    shards are redone."""
    try:
        with open(out / MANIFEST_NAME, encoding="utf-8") as f:
            m = json.load(f)
    except (OSError, ValueError, RecursionError):
        return None
    if (not isinstance(m, dict) or not isinstance(m.get("fingerprint"), str)
            or m.get("status") not in ("in-progress", "complete")
            or not isinstance(m.get("done"), dict)):
        return None
    done = {}
    for rel, rec in m["done"].items():
        if not _safe_relpath(rel):
            return None
        if type(rec) is int:  # version 1
            rec = {"size": rec, "sha256": None}
        if (not isinstance(rec, dict) or type(rec.get("size")) is not int
                or not isinstance(rec.get("sha256"), (str, type(None)))):
            return None
        done[rel] = {"size": rec["size"], "sha256": rec["sha256"]}
    outputs = m.get("outputs", [])
    if not isinstance(outputs, list) or not all(_safe_relpath(p) for p in outputs):
        return None
    return {"manifest_version": MANIFEST_VERSION, "finefp8": str(m.get("finefp8", "")),
            "fingerprint": m["fingerprint"], "status": m["status"], "outputs": outputs,
            "done": done}


def write_manifest(out: Path, manifest: dict) -> None:
    """Write ``manifest`` atomically (``.partial`` + fsync + rename)."""
    text = json.dumps(manifest, indent=1, sort_keys=True) + "\n"
    atomic_write_bytes(out / MANIFEST_NAME, text.encode())


def record_done(manifest: dict, rel: str, size: int, sha256: str) -> None:
    """Mark output ``rel`` finished, with its size and SHA-256."""
    manifest["done"][rel] = {"size": int(size), "sha256": sha256}


def out_entries(out: Path) -> list[str]:
    """Every entry of ``out`` as a relative path, without following symbolic links: files,
    symbolic links, and folders that hold nothing (the lock file is left out)."""
    entries = []
    for root, dirs, files in os.walk(out, followlinks=False):
        rel_root = os.path.relpath(root, out)
        prefix = "" if rel_root == "." else rel_root + "/"
        for d in list(dirs):
            if os.path.islink(os.path.join(root, d)):
                entries.append(prefix + d)
                dirs.remove(d)
        entries.extend(prefix + f for f in files)
        if prefix and not dirs and not files:
            entries.append(prefix)
    return sorted(e for e in entries if e != LOCK_NAME)


def owned_paths(manifest: dict | None) -> set[str]:
    """The paths a finefp8 conversion wrote according to ``manifest`` (see the module doc)."""
    own = {MANIFEST_NAME, MANIFEST_NAME + PARTIAL_SUFFIX, LOCK_NAME}
    if manifest:
        for rel in list(manifest.get("outputs", [])) + list(manifest.get("done", {})):
            own.update((rel, rel + PARTIAL_SUFFIX))
    return own


def _inside(out: Path, rel: str) -> Path | None:
    """``out / rel`` when no folder on the way is a symbolic link, else ``None``."""
    if not _safe_relpath(rel):
        return None
    p = out
    for part in rel.split("/")[:-1]:
        p = p / part
        if p.is_symlink() or not p.is_dir():
            return None
    return out / rel


def remove_owned(out: Path, manifest: dict | None) -> None:
    """Delete the files finefp8 wrote in ``out`` (``owned_paths``), never a folder's contents
    or a link's target, then the folders they leave empty; the lock file stays."""
    if manifest:
        remove_work_dir(out)
    folders = set()
    for rel in sorted(owned_paths(manifest) - {LOCK_NAME}):
        p = _inside(out, rel)
        if p is None or (p.is_dir() and not p.is_symlink()):
            continue
        try:
            p.unlink()
        except FileNotFoundError:
            pass
        parts = rel.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            folders.add("/".join(parts[:i]))
    for rel in sorted(folders, key=lambda r: -r.count("/")):
        try:
            (out / rel).rmdir()
        except OSError:
            pass


def _names(entries: list[str]) -> str:
    shown = ", ".join(entries[:_LIST_NAMES])
    return shown + (f" ... ({len(entries)} in all)" if len(entries) > _LIST_NAMES else "")


def _verify(out: Path, manifest: dict) -> list[str]:
    """Re-hash every ``done`` file; drop the missing or changed ones from ``done`` and return
    one note per dropped file."""
    notes = []
    for rel, rec in list(manifest["done"].items()):
        p = _inside(out, rel)
        why = None
        if p is None or not p.is_file() or p.is_symlink():
            why = "missing"
        elif p.stat().st_size != rec["size"]:
            why = f"size {p.stat().st_size}, expected {rec['size']}"
        elif rec["sha256"] is None:
            why = "no recorded SHA-256 (older manifest)"
        elif file_sha256(p) != rec["sha256"]:
            why = "SHA-256 differs from the one recorded when it was written"
        if why is not None:
            del manifest["done"][rel]
            notes.append(f"{rel}: {why}")
    return notes


def prepare_out(out: Path, fp: str, outputs: list[str], shards: list[str],
                overwrite: bool) -> tuple[dict, list[str]]:
    """Decide how a run continues in ``out`` (an existing, locked directory).

    Returns ``(manifest, notes)``: a fresh manifest for an empty OUT (or after ``overwrite``
    removed a previous conversion), or the verified manifest of the same conversion to resume
    (``status == "complete"`` when nothing is left to do); ``notes`` name the finished files
    found missing or changed, which are redone. Only ``shards`` are kept from a resumed
    ``done``: the other outputs are rewritten at the end of every run. Raises
    ``ConversionError`` for a foreign or different OUT (see the module doc).
    """
    entries = out_entries(out)
    fresh = new_manifest(fp, outputs)
    if not entries:
        return fresh, []
    manifest = read_manifest(out)
    foreign = [e for e in entries if e not in owned_paths(manifest)
               and not (manifest and e.startswith(WORK_DIR + "/"))]  # a calibration's scratch
    if manifest and manifest["fingerprint"] == fp and not overwrite:
        if foreign:
            raise ConversionError(f"OUT {out} holds a conversion of these inputs, and also "
                                  f"entries no finefp8 conversion wrote: {_names(foreign)}. "
                                  f"Move them out of OUT and rerun")
        for rel in entries:
            if rel.endswith(PARTIAL_SUFFIX):
                (out / rel).unlink()
        stale = set(manifest["outputs"]) - set(outputs)  # written for another plan
        for rel in stale:
            p = _inside(out, rel)
            if p is not None and p.is_file() and not p.is_symlink():
                p.unlink()
            manifest["done"].pop(rel, None)
        manifest["outputs"] = sorted(outputs)
        if manifest["status"] != "complete":  # only shards are resumed; the rest is rewritten
            manifest["done"] = {k: v for k, v in manifest["done"].items() if k in shards}
        notes = _verify(out, manifest)
        complete = (manifest["status"] == "complete" and not notes and not stale
                    and set(outputs) <= set(manifest["done"]))
        if not complete:
            if manifest["status"] == "complete":
                cfg = _inside(out, "config.json")
                if cfg is not None and cfg.is_file():
                    cfg.unlink()
            manifest["status"] = "in-progress"
            manifest["done"] = {k: v for k, v in manifest["done"].items() if k in shards}
        return manifest, notes
    if not overwrite:
        if manifest:
            raise ConversionError(f"OUT {out} holds a conversion of other inputs or with other "
                                  f"options; pass --overwrite to replace it")
        raise ConversionError(f"OUT {out} is not empty (it holds {_names(entries)}); choose an "
                              f"empty or new OUT. --overwrite replaces only a previous finefp8 "
                              f"conversion")
    if foreign:
        raise ConversionError(f"--overwrite removes only files a finefp8 conversion wrote (listed "
                              f"in its manifest), but OUT {out} also holds: {_names(foreign)}. "
                              f"Move or delete them yourself, or choose another OUT")
    remove_owned(out, manifest)
    return fresh, []
