"""How prunespec runs its tensor work: :func:`lean`, around planning, applying and reporting."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import signal
import threading
from collections.abc import Iterator
from typing import Any

import torch


class _Collector:
    """The cycle collector is process-wide: the first prunespec call to enter turns it off, the last one
    to leave turns it back on (if it was on); calls may run in several threads at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.depth = 0
        self.was_on = True

    def pause(self) -> None:
        with self.lock:
            if self.depth == 0:
                self.was_on = gc.isenabled()
                gc.disable()
            self.depth += 1

    def resume(self) -> None:
        with self.lock:
            self.depth -= 1
            if self.depth == 0 and self.was_on:
                gc.enable()


_COLLECTOR = _Collector()


@contextlib.contextmanager
def lean() -> Iterator[None]:
    """Python's cycle collector paused while prunespec plans, applies and reports: the engine allocates a
    few small objects per tensor, which on a model of thousands of modules sets off full collections that
    walk the whole model again and again; nothing made here needs collecting before it returns."""
    _COLLECTOR.pause()
    try:
        yield
    finally:
        _COLLECTOR.resume()


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch's CPU ops in this thread on one thread, for exact selection's many passes.

    Selection is many memory-bound elementwise passes over each tensor; each pass is a parallel region
    that waits for its slowest thread, so with another process busy on one core every pass waits for it
    (measured: global L1 4.5x slower with two threads, against 1.6x for torch's few large ops). On one
    thread it does not wait. Methods' own large ops (norms, topk, sorts) keep torch's thread count.
    torch's thread count belongs to the calling thread (OpenMP's), so other threads keep theirs.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold back Ctrl-C (SIGINT) for the block and raise it afterwards: for work that cannot be undone
    halfway (weights written in place). Outside the main thread, signals do not arrive anyway."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[Any] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


@functools.cache
def _malloc_trim() -> Any:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to call
        return None


def free_heap() -> None:
    """Hand the C heap's free pages back to the OS (glibc's ``malloc_trim``; nothing elsewhere).

    For a pass that replays blocks, as each block is done: the batches' inputs to the next block live
    on among the freed work of the replays, and glibc keeps such fragmented free memory (wanda on the
    benchmark's 1024-wide Llama with 64 sequences: 281 MiB peak beyond the model without it, 188 with
    it, in the same time)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
