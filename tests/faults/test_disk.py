"""Full disk and read-only OUT on real small file systems (a tmpfs mounted in a private mount
namespace with ``unshare``; skipped where the platform does not allow it). The simulated
ENOSPC of tests/checkpoint/test_convert.py covers the same path everywhere."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from faultkit import DRIVER, SHARDS, assert_complete_as, tree_bytes  # noqa: E402


def _can_mount(tmp: Path) -> bool:
    if not shutil.which("unshare"):
        return False
    mnt = tmp / "probe"
    mnt.mkdir()
    r = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {mnt}"],
                       capture_output=True, timeout=30)
    return r.returncode == 0


@pytest.fixture(scope="module")
def mountable(tmp_path_factory) -> None:
    if not _can_mount(tmp_path_factory.mktemp("probe")):
        pytest.skip("cannot mount a private tmpfs here (unshare -rm not permitted)")


def _in_namespace(tmp: Path, script: str) -> subprocess.CompletedProcess:
    """Run ``script`` (sh) in a private mount namespace; ``$PY`` and ``$DRIVER`` are set."""
    full = f'PY="{sys.executable}"; DRIVER="{DRIVER}"; set -u\n{script}'
    return subprocess.run(["unshare", "-rm", "sh", "-c", full], capture_output=True, text=True,
                          timeout=300, cwd=tmp)


def _kw(src: Path, dst: str) -> str:
    return "'" + json.dumps({"src": str(src), "dst": dst, "progress": False}) + "'"


def test_full_disk_mid_shard_then_resume(mountable, src, ref, tmp_path):
    """The disk fills up while shard 2 is written (a file eats the free space): a clear error,
    the partial file removed, shard 1 kept, not complete; after freeing space the same command
    resumes to the byte-identical result."""
    mnt, keep = tmp_path / "mnt", tmp_path / "keep"
    mnt.mkdir()
    keep.mkdir()
    r = _in_namespace(tmp_path, f"""
mount -t tmpfs -o size=24m tmpfs {mnt}
FAULT_FILL={mnt}/filler "$PY" "$DRIVER" {_kw(src, f"{mnt}/out")} 2> {keep}/err1
echo $? > {keep}/rc1
ls -a {mnt}/out > {keep}/ls1
cp {mnt}/out/.finefp8-manifest.json {keep}/manifest1
rm {mnt}/filler
"$PY" "$DRIVER" {_kw(src, f"{mnt}/out")} 2> {keep}/err2
echo $? > {keep}/rc2
cp -r {mnt}/out {keep}/out
""")
    assert r.returncode == 0, r.stderr
    assert (keep / "rc1").read_text().strip() == "1"
    err = (keep / "err1").read_text()
    assert "WriteError" in err and "no space left on device while writing model-00002" in err
    listing = (keep / "ls1").read_text().split()
    assert "config.json" not in listing and not any(n.endswith(".partial") for n in listing)
    m = json.loads((keep / "manifest1").read_text())
    assert m["status"] == "in-progress" and sorted(m["done"]) == SHARDS[:1]
    assert (keep / "rc2").read_text().strip() == "0", (keep / "err2").read_text()
    assert_complete_as(keep / "out", ref)


def test_small_disk_refused_before_writing(mountable, src, tmp_path):
    """A file system too small for the planned output: refused before any byte, with the sizes
    named; OUT (created by the run) is removed again."""
    mnt, keep = tmp_path / "mnt", tmp_path / "keep"
    mnt.mkdir()
    keep.mkdir()
    r = _in_namespace(tmp_path, f"""
mount -t tmpfs -o size=4m tmpfs {mnt}
"$PY" "$DRIVER" {_kw(src, f"{mnt}/out")} 2> {keep}/err
echo $? > {keep}/rc
ls -a {mnt} > {keep}/ls
""")
    assert r.returncode == 0, r.stderr
    assert (keep / "rc").read_text().strip() == "1"
    err = (keep / "err").read_text()
    assert "not enough free disk" in err and "GB is free" in err
    assert "out" not in (keep / "ls").read_text().split()


def test_read_only_out_refused(mountable, src, tmp_path):
    """OUT on a read-only file system: a clear error naming OUT, nothing marked complete."""
    mnt, keep = tmp_path / "mnt", tmp_path / "keep"
    mnt.mkdir()
    keep.mkdir()
    r = _in_namespace(tmp_path, f"""
mount -t tmpfs -o size=24m tmpfs {mnt}
mkdir {mnt}/out
mount -o remount,ro {mnt}
"$PY" "$DRIVER" {_kw(src, f"{mnt}/out")} 2> {keep}/err
echo $? > {keep}/rc
ls -a {mnt}/out > {keep}/ls
""")
    assert r.returncode == 0, r.stderr
    assert (keep / "rc").read_text().strip() == "1"
    err = (keep / "err").read_text()
    assert "ConversionError" in err and "Read-only file system" in err and "lock file" in err
    assert set((keep / "ls").read_text().split()) == {".", ".."}
    assert tree_bytes(src)  # IN untouched
