"""prunespec.runtime: the cycle collector and torch's thread count are put back after every call."""

from __future__ import annotations

import gc
import threading
from typing import Any

import pytest
import torch
from torch import nn

import prunespec
import prunespec.selection
from prunespec.runtime import lean, one_thread

SPEC = {"version": 1, "rules": [{"select": {"types": ["Linear"]}, "method": "l1_unstructured", "amount": 0.5}]}


def test_apply_runs_with_the_collector_off_and_selects_on_one_thread_then_puts_both_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[tuple[int, bool]] = []
    find_cuts = prunespec.selection.find_cuts

    def watched(*args: Any, **kwargs: Any) -> Any:
        seen.append((torch.get_num_threads(), gc.isenabled()))
        return find_cuts(*args, **kwargs)

    monkeypatch.setattr(prunespec.selection, "find_cuts", watched)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        prunespec.apply(nn.Sequential(nn.Linear(400, 400), nn.Linear(400, 400)), SPEC)  # too big to batch
        assert seen and all(state == (1, False) for state in seen)
        assert torch.get_num_threads() == 2 and gc.isenabled()
    finally:
        torch.set_num_threads(before)


def test_one_thread_is_this_threads_alone() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    inside, release = threading.Event(), threading.Event()
    seen: list[int] = []

    def other() -> None:
        with one_thread():
            inside.set()
            release.wait(10)

    try:
        worker = threading.Thread(target=other)
        worker.start()
        assert inside.wait(10)
        seen.append(torch.get_num_threads())  # the other thread's setting is its own
        release.set()
        worker.join(10)
        assert seen == [2]
    finally:
        torch.set_num_threads(before)


def test_concurrent_calls_turn_the_collector_back_on_once_the_last_one_leaves() -> None:
    inside, release = threading.Event(), threading.Event()
    threads_seen: list[int] = []

    def other() -> None:
        with lean(), one_thread():
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
