"""prunespec.runtime.lean: the thread count and the cycle collector are put back after every call."""

from __future__ import annotations

import gc
import threading

import torch
from torch import nn

import prunespec
from prunespec.runtime import lean

SPEC = {"version": 1, "rules": [{"select": {"types": ["Linear"]}, "method": "l1_unstructured", "amount": 0.5}]}


def test_apply_runs_on_one_thread_with_the_collector_off_and_puts_both_back() -> None:
    seen: list[tuple[int, bool]] = []

    def progress(done: int, total: int, what: str) -> None:
        seen.append((torch.get_num_threads(), gc.isenabled()))

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        prunespec.apply(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)), SPEC, progress=progress)
        assert seen and all(state == (1, False) for state in seen)
        assert torch.get_num_threads() == 2 and gc.isenabled()
    finally:
        torch.set_num_threads(before)


def test_concurrent_calls_turn_the_collector_back_on_once_the_last_one_leaves() -> None:
    inside, release = threading.Event(), threading.Event()
    threads_seen: list[int] = []

    def other() -> None:
        with lean():
            threads_seen.append(torch.get_num_threads())
            inside.set()
            release.wait(10)

    worker = threading.Thread(target=other)
    worker.start()
    assert inside.wait(10)
    with lean():
        assert not gc.isenabled()
    assert not gc.isenabled()  # the other call is still running
    release.set()
    worker.join(10)
    assert gc.isenabled()
    assert threads_seen == [1]


def test_a_collector_that_was_off_stays_off() -> None:
    gc.disable()
    try:
        with lean():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
