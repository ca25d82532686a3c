"""How prunespec runs its tensor work: :func:`lean`, around planning, applying and reporting."""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

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
    """Python's cycle collector paused, and torch's CPU ops in this thread on one thread.

    The collector: the engine allocates a few small objects per tensor, which on a model of thousands of
    modules sets off full collections that walk the whole model again and again; nothing made here needs
    collecting before it returns. One thread: selection is many memory-bound elementwise passes, which a
    second thread barely speeds up on an idle machine, but each pass is a parallel region that waits for
    its slowest thread, so with another process busy on one core every pass waits for it (4.5x slower
    with two threads, against 1.6x for torch's few large ops). torch's thread count belongs to the
    calling thread (OpenMP's), so other threads of the program keep theirs.
    """
    threads = torch.get_num_threads()
    _COLLECTOR.pause()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        _COLLECTOR.resume()
