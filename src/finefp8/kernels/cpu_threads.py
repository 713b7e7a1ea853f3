"""The thread pool that splits a C kernel call over cores, and its reset after ``os.fork()``.

A library built with OpenMP splits its calls itself, on PyTorch's own OpenMP threads
(``cpu_kernels.c``, the ``*_mt`` functions; ``threads_for`` gives their thread count). This
pool is for a library built without OpenMP: ``ctypes`` releases the GIL while a C function runs, so a kernel call split into row ranges
runs on several Python threads at once. The pool is created on first use. A forked child
(``multiprocessing`` with the fork start method, DataLoader workers) inherits the pool object
but not its threads: submitting to it would wait forever. ``os.register_at_fork`` therefore
drops the pool in the child, which creates a fresh one when it first needs it, and marks the
child so that the kernels use this pool there instead of OpenMP (``in_forked_child``).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

__all__ = ["MIN_WORK_PER_THREAD", "CHUNKS_PER_THREAD", "pool", "threads_for", "parallel",
           "in_forked_child"]

MIN_WORK_PER_THREAD = 1 << 16
"""Elements of work below which a part is not worth a thread; small calls run inline."""

_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_forked = False


def pool() -> ThreadPoolExecutor:
    """The process's kernel thread pool (one worker per CPU), created on first use."""
    global _pool
    with _lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1),
                                       thread_name_prefix="finefp8-cpu")
        return _pool


def _reset_after_fork() -> None:
    """In a forked child: forget the parent's pool (its threads do not exist here)."""
    global _pool, _lock, _forked
    _lock = threading.Lock()
    _pool = None
    _forked = True


def in_forked_child() -> bool:
    """True in a process forked from one that imported this module.

    GNU OpenMP is not fork-safe: a child forked after its parent ran a parallel region can hang
    in its next one. The kernels therefore use this module's pool, not OpenMP, in such a child.
    """
    return _forked


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


CHUNKS_PER_THREAD = 4
"""A call is cut into this many chunks per thread, handed out one at a time, so that a thread
the OS pauses (other processes on the machine) delays its current chunk, not a whole share."""


def threads_for(n_items: int, work_per_item: int) -> int:
    """Threads for a call: ``torch.get_num_threads()``, fewer when a thread would get less than
    ``MIN_WORK_PER_THREAD`` elements of work, at least 1."""
    return max(1, min(torch.get_num_threads(), n_items,
                      (n_items * work_per_item) // MIN_WORK_PER_THREAD))


def parallel(fn: Callable[[int, int], object], n_items: int, work_per_item: int) -> list:
    """Run ``fn(begin, end)`` over ``range(n_items)`` split in contiguous chunks, in threads.

    The number of threads is ``torch.get_num_threads()``, fewer when a thread would get less
    than ``MIN_WORK_PER_THREAD`` elements (``work_per_item`` each); the calling thread is one
    of them. With more than one thread the range is cut into ``CHUNKS_PER_THREAD`` chunks per
    thread, taken in order by whichever thread is free. Returns the chunks' results in order.
    """
    threads = threads_for(n_items, work_per_item)
    if threads <= 1:
        return [fn(0, n_items)]
    chunks = min(n_items, threads * CHUNKS_PER_THREAD)
    bounds = [n_items * i // chunks for i in range(chunks + 1)]
    results: list = [None] * chunks
    order = iter(range(chunks))
    take = threading.Lock()

    def worker() -> None:
        while True:
            with take:
                i = next(order, None)
            if i is None:
                return
            results[i] = fn(bounds[i], bounds[i + 1])

    executor = pool()
    futures = [executor.submit(worker) for _ in range(threads - 1)]
    worker()
    for f in futures:
        f.result()
    return results
