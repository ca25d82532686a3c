"""Run a function on N spawned CPU ranks with a gloo process group on loopback, for the distributed tests.

``spawn(worker, n, *args)`` returns each rank's return value (rank order). A rank that raises makes
``spawn`` raise with that rank's traceback; a run past ``timeout`` kills every rank and fails, so a
hang (a collective one rank never joins) is a failed test, not a stuck CI. ``worker`` must be a
module-level function (it is pickled by reference into each new process).
"""

from __future__ import annotations

import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch.multiprocessing as mp

Worker = Callable[..., Any]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _run(rank: int, world: int, port: int, results: Any, worker: Worker, args: tuple[Any, ...]) -> None:
    import torch
    import torch.distributed as dist

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)  # N ranks on 2 cores: one thread each
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=60),
        )
        try:
            results.put((rank, True, worker(rank, world, *args)))
        finally:
            dist.destroy_process_group()
    except BaseException:
        results.put((rank, False, traceback.format_exc()))


def spawn(worker: Worker, world: int, *args: Any, timeout: float = 180.0) -> list[Any]:
    """``worker(rank, world, *args)`` on ``world`` ranks; the return values by rank."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_run, args=(r, world, port, results, worker, args), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    failures: list[str] = []
    deadline = time.monotonic() + timeout
    try:
        while len(out) + len(failures) < world:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{world} ranks ran past {timeout:.0f} s ({len(out)} finished)")
            try:
                rank, ok, value = results.get(timeout=min(left, 1.0))
            except queue.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead and results.empty():
                    raise RuntimeError(f"a rank died with exit code {dead[0].exitcode}") from None
                continue
            if ok:
                out[rank] = value
            else:
                failures.append(f"rank {rank}:\n{value}")
                break  # the others may wait on it forever
    finally:
        for p in procs:
            p.join(timeout=5 if not failures else 0.5)
            if p.is_alive():
                p.kill()
                p.join()
    if failures:
        raise AssertionError("\n".join(failures))
    return [out[r] for r in range(world)]


def gloo_available() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_gloo_available()
