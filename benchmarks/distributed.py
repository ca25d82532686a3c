"""A global L1 cut on an FSDP2 model, on 1, 2 and 4 CPU ranks: time, memory per rank, bytes exchanged.

Run it from the repository root with the main venv, alone on the machine::

    python benchmarks/distributed.py                      # 8 Linear 2048x2048, 1/2/4 ranks (~1-2 min)
    python benchmarks/distributed.py --width 4096 --ranks 1 2 4 8
    python benchmarks/distributed.py --quick              # a smoke test

Each world size is one spawned group of ranks (gloo on 127.0.0.1). Every rank builds the same model
(``--layers`` Linear ``width x width``, seed 0), shards each layer and the root with ``fully_shard``,
and then calls ``prunespec.apply`` with one rule: ``scope: global``, ``l1_unstructured``, ``amount:
0.5`` over every weight (one cut over the whole model). Each rank measures:

* ``apply s``: the wall time of ``apply``, with a barrier before it;
* ``extra MiB``: the peak resident memory during ``apply`` above the resident memory just before it,
  read from ``/proc/self/statm`` every millisecond, after a warm-up ``apply`` on a tiny sharded model
  (so imports and plugin loading, the same at every world size, are not counted). That is the masks
  and torch's masked ``weight`` attributes (kept: 4 bytes an entry of the rank's part each) plus the
  working set. ``1/N`` is the one-rank extra divided by N, the target; the ratio column is extra / (1/N);
* ``sent``: bytes this rank passed to ``torch.distributed`` collectives during ``apply`` (all_reduce,
  all_gather, all_gather_object; counted by wrapping them), for the one global cut and the collective
  error checks.

The masks of every world size are checked to be identical (the SHA-256 of each whole mask, gathered
after the measurement). Timings on a shared 2-core machine vary several-fold: with 4 ranks on 2 cores
the ranks also share cores, so ``apply s`` is not a speed-up figure there.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PAGE = os.sysconf("SC_PAGE_SIZE")


def resident() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class Peak:
    """The highest resident memory seen while it runs (sampled every millisecond)."""

    def __init__(self) -> None:
        self.peak = resident()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def _watch(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, resident())

    def __enter__(self) -> Peak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, resident())


class Traffic:
    """Bytes handed to torch.distributed's collectives while counting."""

    def __init__(self) -> None:
        self.sent = 0
        self.calls = 0
        self._saved: dict[str, Any] = {}

    def __enter__(self) -> Traffic:
        def wrap(name: str, size: Any) -> None:
            original = getattr(dist, name)
            self._saved[name] = original

            def counted(*args: Any, **kwargs: Any) -> Any:
                self.sent += size(*args)
                self.calls += 1
                return original(*args, **kwargs)

            setattr(dist, name, counted)

        wrap("all_reduce", lambda t, *_: t.numel() * t.element_size())
        wrap("all_gather", lambda out, t, *_: t.numel() * t.element_size())
        wrap("all_gather_object", lambda out, obj, *_: len(repr(obj)))  # about its pickle
        return self

    def __exit__(self, *exc: object) -> None:
        for name, original in self._saved.items():
            setattr(dist, name, original)


def worker(rank: int, world: int, port: int, args: argparse.Namespace, results: Any) -> None:
    from torch import nn
    from torch.distributed.fsdp import fully_shard

    import prunespec

    torch.set_num_threads(max(1, args.threads // world))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(args.width, args.width) for _ in range(args.layers)])
    for layer in model:
        fully_shard(layer)
    fully_shard(model)
    spec = {
        "version": 1,
        "rules": [
            {
                "select": {"types": ["Linear"], "params": ["weight"]},
                "scope": "global",
                "method": "l1_unstructured",
                "amount": 0.5,
            }
        ],
    }
    # warm-up on a tiny sharded model: imports, plugin loading and first-call caches are not what a
    # cut costs (they are the same at every world size and would blur the 1/N comparison)
    tiny = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    for layer in tiny:
        fully_shard(layer)
    fully_shard(tiny)
    prunespec.apply(tiny, spec)
    del tiny
    dist.barrier()
    before = resident()
    with Peak() as peak, Traffic() as traffic:
        start = time.perf_counter()
        report = prunespec.apply(model, spec)
        seconds = time.perf_counter() - start
    digest = hashlib.sha256()
    for name, buffer in model.named_buffers():
        if name.endswith("_mask"):
            digest.update(buffer.full_tensor().to(torch.uint8).numpy().tobytes())
    results.put(
        {
            "world": world,
            "rank": rank,
            "seconds": seconds,
            "extra": peak.peak - before,
            "sent": traffic.sent,
            "calls": traffic.calls,
            "sparsity": report.global_sparsity,
            "masks": digest.hexdigest(),
        }
    )
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def run(world: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    # a fixed mmap threshold: glibc then returns every large freed block to the OS at once, so resident
    # memory follows what is alive (its default raises the threshold as blocks are freed, and freed
    # memory stays resident and is reused, hiding or inflating what apply allocates)
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(1 << 16))
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, world, port, args, results)) for r in range(world)]
    for p in procs:
        p.start()
    out = [results.get(timeout=args.timeout) for _ in range(world)]
    for p in procs:
        p.join()
    return sorted(out, key=lambda r: r["rank"])


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads in all, split among ranks")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--quick", action="store_true", help="4 layers of 512: a smoke test")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.layers, args.width = 4, 512
    entries = args.layers * args.width * args.width
    print(
        f"model: {args.layers} x Linear({args.width}, {args.width}), {entries:,} weights ({mib(4 * entries)} MiB fp32)"
    )
    print("one global L1 cut, amount 0.5, over every weight; FSDP2 fully_shard; gloo on 127.0.0.1\n")
    rows = {world: run(world, args) for world in args.ranks}
    base = max(r["extra"] for r in rows[args.ranks[0]]) * args.ranks[0]
    print(
        f"{'ranks':>5}  {'rank':>4}  {'apply s':>8}  {'extra MiB':>10}  {'1/N MiB':>8}  {'ratio':>6}  "
        f"{'sent':>12}  {'calls':>5}"
    )
    for world, results in rows.items():
        for r in results:
            target = base / world
            print(
                f"{world:>5}  {r['rank']:>4}  {r['seconds']:>8.2f}  {mib(r['extra']):>10}  {mib(target):>8}  "
                f"{r['extra'] / target:>6.2f}  {r['sent']:>10,} B  {r['calls']:>5}"
            )
    digests = {r["masks"] for results in rows.values() for r in results}
    print(f"\nmasks identical across world sizes: {len(digests) == 1}")
    print(f"sparsity: {rows[args.ranks[0]][0]['sparsity']:.4f}")
    if args.json:
        print(json.dumps({str(k): v for k, v in rows.items()}))


if __name__ == "__main__":
    main()
