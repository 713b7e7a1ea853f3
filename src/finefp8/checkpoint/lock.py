"""An exclusive lock on a conversion's output directory, held for the whole run.

``OutLock(out)`` takes ``fcntl.flock(LOCK_EX | LOCK_NB)`` on ``out/.finefp8.lock`` and writes
the holder's PID into it. A second conversion into the same OUT is refused at once with a
``ConversionError`` naming that PID: two writers can never mix their shards. The kernel
drops a ``flock`` when its process dies, whatever the signal, so a killed run never leaves
OUT locked; a clean release also removes the file. After locking, the holder checks that the
path still names the file it locked (a concurrent release may have unlinked it), and retries.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time
from pathlib import Path

from .errors import ConversionError

__all__ = ["LOCK_NAME", "OutLock", "lock_holder"]

LOCK_NAME = ".finefp8.lock"


def lock_holder(out: str | os.PathLike) -> int | None:
    """The PID written in ``out``'s lock file, or ``None`` (no file, or no PID in it yet)."""
    try:
        text = (Path(out) / LOCK_NAME).read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


class OutLock:
    """``with OutLock(out):`` hold the exclusive conversion lock of directory ``out`` (which
    must exist). Raises ``ConversionError`` naming the holder's PID when another process
    holds it, or the reason when the lock file cannot be created (a read-only OUT...)."""

    def __init__(self, out: str | os.PathLike):
        self.out = Path(out)
        self.path = self.out / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise ``ConversionError`` at once (never waits for the holder)."""
        for _ in range(100):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                             0o644)
            except OSError as e:
                raise ConversionError(f"cannot create the lock file {self.path}: "
                                      f"{e.strerror or e}. OUT must be a writable directory"
                                      ) from e
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise ConversionError(f"cannot lock {self.path}: {e.strerror or e}") from e
                raise ConversionError(self._busy_message()) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path, follow_symlinks=False).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # released and unlinked between our open and our flock: retry
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            self._fd = fd
            return
        raise ConversionError(f"cannot lock {self.path}: it keeps being replaced")

    def _busy_message(self) -> str:
        pid = None
        for _ in range(20):  # the holder writes its PID right after locking
            pid = lock_holder(self.out)
            if pid is not None:
                break
            time.sleep(0.01)
        who = f"PID {pid}" if pid is not None else "a process whose PID is not yet written"
        return (f"OUT {self.out} is being written by another finefp8 conversion ({who}); two "
                f"conversions into one directory would mix their files. Wait for it to finish "
                f"(or stop it), or choose another OUT")

    def release(self) -> None:
        """Remove the lock file and drop the lock (idempotent)."""
        if self._fd is None:
            return
        try:
            os.unlink(self.path)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> OutLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
