"""What OUT holds is checked, never trusted (issue 10 items 3 and 7): reruns re-hash every
finished file; ``--overwrite`` deletes only what a finefp8 conversion wrote and never
follows a symbolic link."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from faultkit import SHARDS, assert_complete_as, manifest, tree_bytes  # noqa: E402

from finefp8.checkpoint.convert import ConversionError, quantize_checkpoint  # noqa: E402
from finefp8.checkpoint.manifest import MANIFEST_NAME  # noqa: E402
from finefp8.cli import main  # noqa: E402


@pytest.fixture
def done(ref, tmp_path) -> Path:
    """A private copy of the complete reference conversion."""
    out = tmp_path / "out"
    shutil.copytree(ref, out)
    return out


def _flip(path: Path, offset: int = -5) -> None:
    b = bytearray(path.read_bytes())
    b[offset] ^= 0x01
    path.write_bytes(bytes(b))


def _quantize_cli(src: Path, out: Path, *extra: str) -> int:
    return main(["quantize", str(src), str(out), "--quiet", "--no-serving-check", *extra])


def test_complete_with_deleted_shard_is_redone(src, ref, done):
    (done / SHARDS[1]).unlink()
    res = quantize_checkpoint(src, done, progress=False, tp=())
    assert res.redone == [f"{SHARDS[1]}: missing"] and not res.already_complete
    assert_complete_as(done, ref)


def test_cli_names_the_redone_file(src, done, capsys):
    (done / SHARDS[2]).unlink()
    assert _quantize_cli(src, done) == 0
    err = capsys.readouterr().err
    assert f"redone (failed its check against the manifest): {SHARDS[2]}: missing" in err
    assert manifest(done)["status"] == "complete"


@pytest.mark.parametrize("name", [SHARDS[0], "tokenizer.json", "model.safetensors.index.json"])
def test_complete_with_flipped_byte_is_redone(src, ref, done, name):
    _flip(done / name)
    res = quantize_checkpoint(src, done, progress=False, tp=())
    assert not res.already_complete
    assert res.redone == [f"{name}: SHA-256 differs from the one recorded when it was written"]
    assert_complete_as(done, ref)


def test_resume_with_flipped_byte_in_finished_shard_is_redone(src, ref, done):
    """An interrupted run (in-progress manifest, shards 1-2 done) whose shard 1 was damaged
    since: the resume redoes shards 1 and 3, keeps shard 2."""
    m = manifest(done)
    m["status"] = "in-progress"
    del m["done"][SHARDS[2]]
    (done / MANIFEST_NAME).write_text(json.dumps(m))
    (done / "config.json").unlink()
    (done / SHARDS[2]).unlink()
    _flip(done / SHARDS[0], 100)
    res = quantize_checkpoint(src, done, progress=False, tp=())
    assert res.shards_resumed == 1 and res.redone and SHARDS[0] in res.redone[0]
    assert_complete_as(done, ref)


def test_already_complete_is_verified_and_untouched(src, ref, done):
    res = quantize_checkpoint(src, done, progress=False, tp=())
    assert res.already_complete and not res.redone
    assert tree_bytes(done) == tree_bytes(ref)


def test_garbage_manifest_is_not_trusted(src, done, capsys):
    """A manifest that is not a finefp8 manifest is an ordinary file: OUT is then foreign and
    nothing is resumed or deleted."""
    (done / MANIFEST_NAME).write_text('{"fingerprint": 1, "done": []}')
    before = tree_bytes(done)
    assert _quantize_cli(src, done) == 1
    assert "is not empty" in capsys.readouterr().err
    assert _quantize_cli(src, done, "--overwrite") == 1
    assert "removes only files a finefp8 conversion wrote" in capsys.readouterr().err
    assert tree_bytes(done) == before


def test_hostile_manifest_paths_are_never_followed(src, done, tmp_path, capsys):
    """A manifest that lists ``../victim`` (path traversal) is rejected as a whole."""
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    m = manifest(done)
    m["outputs"].append("../victim.txt")
    (done / MANIFEST_NAME).write_text(json.dumps(m))
    assert _quantize_cli(src, done, "--overwrite", "--scale-fmt", "ue8m0") == 1
    assert "removes only files" in capsys.readouterr().err
    assert victim.read_text() == "keep"


def test_overwrite_refuses_foreign_entries_naming_them(src, done, capsys):
    (done / ".hidden").write_text("mine")
    (done / "notes").mkdir()
    (done / "notes" / "a.txt").write_text("mine too")
    before = tree_bytes(done)
    assert _quantize_cli(src, done, "--overwrite", "--scale-fmt", "ue8m0") == 1
    err = capsys.readouterr().err
    assert ".hidden" in err and "notes/a.txt" in err and "Move or delete them" in err
    assert tree_bytes(done) == before


def test_overwrite_replaces_only_a_previous_conversion(src, done, tmp_path):
    """Other options + --overwrite: the old conversion's files are replaced; the result is the
    same as a fresh run with the new options."""
    fresh = tmp_path / "fresh"
    quantize_checkpoint(src, fresh, scale_fmt="ue8m0", progress=False, tp=())
    with pytest.raises(ConversionError, match="other options"):
        quantize_checkpoint(src, done, scale_fmt="ue8m0", progress=False, tp=())
    quantize_checkpoint(src, done, scale_fmt="ue8m0", overwrite=True, progress=False, tp=())
    assert_complete_as(done, fresh)


def test_foreign_file_blocks_resume_too(src, done, capsys):
    (done / "stray.bin").write_bytes(b"x")
    assert _quantize_cli(src, done) == 1
    assert "stray.bin" in capsys.readouterr().err


@pytest.mark.parametrize("overwrite", [False, True])
def test_symlinked_out_is_refused(src, ref, tmp_path, capsys, overwrite):
    """OUT a symbolic link to another directory: refused, and the target's contents (a
    previous conversion plus a file of its own) stay as they are."""
    target = tmp_path / "target"
    shutil.copytree(ref, target)
    (target / "precious.txt").write_text("keep")
    link = tmp_path / "link"
    link.symlink_to(target)
    before = tree_bytes(target)
    extra = ["--overwrite"] if overwrite else []
    assert _quantize_cli(src, link, *extra) == 1
    err = capsys.readouterr().err
    assert "is a symbolic link" in err and str(target) in err
    assert tree_bytes(target) == before


def test_outputs_of_another_plan_are_removed_on_rerun(src, ref, tmp_path):
    """A conversion that also wrote an extra file (a model card, ``finish``) rerun without
    it: the extra file is removed, not left behind as a file nobody owns."""
    out = tmp_path / "out"

    def card(d: Path) -> None:
        (d / "NOTES.md").write_text("card")

    quantize_checkpoint(src, out, progress=False, finish=card, extra_outputs=("NOTES.md",), tp=())
    assert (out / "NOTES.md").is_file()
    res = quantize_checkpoint(src, out, progress=False, tp=())
    assert not res.already_complete
    assert_complete_as(out, ref)
    assert quantize_checkpoint(src, out, progress=False, tp=()).already_complete
