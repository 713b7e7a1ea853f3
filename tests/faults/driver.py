"""Fault-injection driver: ``python driver.py '{"src": ..., "dst": ..., ...}'`` runs
``quantize_checkpoint(**kwargs)`` (or ``dequantize_checkpoint`` with ``"op": "dequantize"``)
with the hooks chosen by environment variables. Spawned worker processes import this file
too (as ``__mp_main__``), so the hooks act in them as well.

* ``FAULT_KILL=<point>``: the process sends itself ``FAULT_SIGNAL`` (default SIGKILL) at
  ``shard2-mid`` (after the first tensor bytes of shard 2), ``after-shard1`` (right after the
  manifest records shard 1), ``copy-others`` (before the first non-tensor file is copied),
  ``before-config`` (index written, config.json not yet) or ``before-complete`` (everything
  written, manifest not yet complete).
* ``FAULT_SLOW=<seconds>``: sleep that long in every shard write (to catch a run mid-way).
* ``FAULT_FILL=<path>``: when shard 2 is opened, fill the file system of ``path`` with a file
  there until the kernel answers ENOSPC.

Exit status: 0 done, 1 with ``<ExceptionType>: <message>`` on stderr for an error.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import sys
import time

import finefp8.checkpoint.convert as conv
import finefp8.checkpoint.writer as wr

POINT = os.environ.get("FAULT_KILL", "")
SIG = getattr(signal, os.environ.get("FAULT_SIGNAL", "SIGKILL"))
SLOW = float(os.environ.get("FAULT_SLOW", "0") or 0)
FILL = os.environ.get("FAULT_FILL", "")


def _die() -> None:
    sys.stderr.flush()
    os.kill(os.getpid(), SIG)
    time.sleep(30)


_write = wr.ShardWriter.write


def _slow_write(self, key, data):
    if SLOW:
        time.sleep(SLOW)
    r = _write(self, key, data)
    if POINT == "shard2-mid" and self.path.name.startswith("model-00002"):
        _die()
    return r


wr.ShardWriter.write = _slow_write

_enter = wr.ShardWriter.__enter__


def _fill_enter(self):
    if FILL and self.path.name.startswith("model-00002"):
        with open(FILL, "wb") as f:
            try:
                while True:
                    f.write(b"\0" * (1 << 20))
                    f.flush()
            except OSError as e:
                assert e.errno == errno.ENOSPC, e
    return _enter(self)


wr.ShardWriter.__enter__ = _fill_enter

_write_manifest = conv.write_manifest


def _hook_manifest(out, m):
    if POINT == "before-complete" and m["status"] == "complete":
        _die()
    _write_manifest(out, m)
    if POINT == "after-shard1" and len(m["done"]) == 1:
        _die()


conv.write_manifest = _hook_manifest

_copy = conv._copy_file


def _hook_copy(src, dst):
    if POINT == "copy-others":
        _die()
    return _copy(src, dst)


conv._copy_file = _hook_copy

_write_json = conv._write_json


def _hook_json(path, obj):
    if POINT == "before-config" and path.name == "config.json":
        _die()
    return _write_json(path, obj)


conv._write_json = _hook_json


if __name__ == "__main__":
    kwargs = json.loads(sys.argv[1])
    op = kwargs.pop("op", "quantize")
    fn = conv.quantize_checkpoint if op == "quantize" else conv.dequantize_checkpoint
    if op == "quantize":
        kwargs.setdefault("tp", [])  # the suite's in-process runs pass tp=(): same plan
    try:
        fn(**kwargs)
    except Exception as e:  # noqa: BLE001 - reported like the CLI does
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(1)
