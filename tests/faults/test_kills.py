"""Kills, SIGTERM, orphaned workers and concurrent runs (issue 10 items 1 and 2, and the kill
cases that already worked): OUT is always either complete and byte-identical to an
uninterrupted run, or clearly not complete, and the same command resumes."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from faultkit import (  # noqa: E402
    SHARDS,
    alive,
    assert_complete_as,
    assert_not_complete,
    children,
    manifest,
    run_driver,
    wait_for,
)

from finefp8.checkpoint.convert import quantize_checkpoint  # noqa: E402
from finefp8.checkpoint.lock import LOCK_NAME, lock_holder  # noqa: E402
from finefp8.cli import main  # noqa: E402

KILLS = {  # kill point -> shards finished when it strikes
    "shard2-mid": 1, "after-shard1": 1, "copy-others": 3, "before-config": 3,
    "before-complete": 3}


@pytest.fixture(scope="module")
def killed(src, tmp_path_factory) -> dict[str, tuple[int, str, Path]]:
    """Every kill point (and a SIGTERM mid-shard) run at once, in separate OUTs:
    ``{case: (returncode, stderr, out)}``. Started together to share the start-up time."""
    cases = {p: {"FAULT_KILL": p} for p in KILLS}
    cases["sigterm"] = {"FAULT_KILL": "shard2-mid", "FAULT_SIGNAL": "SIGTERM"}
    procs = {}
    for case, env in cases.items():
        out = tmp_path_factory.mktemp("kill") / "out"
        procs[case] = (run_driver({"src": str(src), "dst": str(out), "progress": False}, env,
                                  wait=False), out)
    results = {}
    for case, (proc, out) in procs.items():
        _, err = proc.communicate(timeout=300)
        results[case] = (proc.returncode, err, out)
    return results


@pytest.mark.parametrize("point", list(KILLS))
def test_sigkill_then_resume_is_byte_identical(src, ref, killed, point):
    rc, err, out = killed[point]
    assert rc == -signal.SIGKILL, err
    m = manifest(out)
    assert m["status"] == "in-progress"
    assert sorted(m["done"]) == SHARDS[:KILLS[point]] or point == "before-complete"
    if point != "before-complete":
        assert_not_complete(out, partial_ok=True)
    res = quantize_checkpoint(src, out, progress=False, tp=())
    assert res.shards_resumed == KILLS[point] and not res.already_complete
    assert_complete_as(out, ref)
    assert quantize_checkpoint(src, out, progress=False, tp=()).already_complete


def test_sigterm_cleans_partial_and_resumes(src, ref, killed):
    rc, err, out = killed["sigterm"]
    assert rc == -signal.SIGTERM, err
    assert_not_complete(out)  # the partial shard was removed on the way out
    assert not (out / LOCK_NAME).exists()  # and the lock released
    assert sorted(manifest(out)["done"]) == SHARDS[:1]
    quantize_checkpoint(src, out, progress=False, tp=())
    assert_complete_as(out, ref)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_workers_die_with_their_parent(src, ref, tmp_path, sig):
    out = tmp_path / "out"
    proc = run_driver({"src": str(src), "dst": str(out), "progress": False, "workers": 2},
                      {"FAULT_SLOW": "0.05"}, wait=False)
    try:
        wait_for(lambda: len(children(proc.pid)) >= 2 and list(out.glob("*.partial")),
                 what="two workers writing shards")
        workers = children(proc.pid)
        proc.send_signal(sig)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -sig
    wait_for(lambda: not any(alive(p) for p in workers), timeout=15, what="workers to exit")
    time.sleep(0.3)  # nothing may write into OUT any more
    before = sorted(p.name for p in out.iterdir())
    time.sleep(0.3)
    assert sorted(p.name for p in out.iterdir()) == before
    assert manifest(out)["status"] == "in-progress" and not (out / "config.json").exists()
    quantize_checkpoint(src, out, progress=False, tp=())
    assert_complete_as(out, ref)


def test_second_writer_is_refused_naming_the_holder(src, ref, tmp_path, capsys):
    """Issue 10 item 1: a second run into the same OUT (here with the other layout) is
    refused at once; the first one finishes a consistent, complete checkpoint."""
    out = tmp_path / "out"
    first = run_driver({"src": str(src), "dst": str(out), "progress": False},
                       {"FAULT_SLOW": "0.05"}, wait=False)
    try:
        wait_for(lambda: lock_holder(out) == first.pid, what="the first run's lock")
        t0 = time.time()
        rc = main(["quantize", str(src), str(out), "--layout", "compressed-tensors", "--quiet"])
        assert time.time() - t0 < 10  # refused at once, not after waiting
        err = capsys.readouterr().err
        assert rc == 1
        assert f"PID {first.pid}" in err and "another finefp8 conversion" in err
        assert first.wait(timeout=120) == 0, first.stderr.read()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert_complete_as(out, ref)  # only weight_scale_inv, as the first run wrote
