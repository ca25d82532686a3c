"""One forward pass of every calibration batch that stops at each module being pruned.

Data-aware pruning wants each module calibrated on the outputs of the modules before it, *already
pruned*, with the arguments the model really passes it (masks, position embeddings, per-layer
settings). Rather than cut the model into pieces (torch.fx) or replay one block's inputs through the
next, prunespec runs the model's own ``forward`` once per batch, every batch as a coroutine of its own
(a greenlet: a call stack that can be suspended anywhere, in this thread), and stops each of them at the
first watched module they reach:

* every batch waits at that module (:meth:`Pass.next_stop` returns a :class:`Stop` with each batch's
  input to it);
* the caller computes the module's statistics and masks, then :meth:`Pass.release` lets the batches go
  on, the module computing from then on with the weights the caller gives (its pruned values), so every
  later module sees the pruned outputs.

One batch runs at a time, in batch order, so a pass is deterministic. The batches share the caller's
thread, and with it torch's thread pool and the allocator's heap: one OS thread per batch would give
each its own malloc arena and OpenMP team, memory that is not handed back when a batch moves on (wanda
on a 1024-wide, 8-block Llama: 346 MiB peak beyond the model with them, 197 without). What torch keeps
per thread and a forward may change (grad mode, autocast) is kept per batch and put back at each
switch. Memory beyond the model: what each batch's forward holds where it waits (about one block's
activations for every batch), and the current stop's inputs (the same tensors).

With ``blocks``, each batch waits at the entry of each block instead, holding only its arguments, and
each stop inside the block runs the block again from those (a replay: a greenlet of its own), one batch
at a time: the stop's inputs are made as its arrivals are read and dropped after each, so memory holds
every batch's input to the block and one batch's work inside it, for a forward of the block's part
before each stop. Modules that get the very same input (q/k/v) share one replay: after its arrival a
replay goes on, finding the next modules given that input, until it reaches any other. While a replay
runs, the block's modules still to be released compute zeros (their outputs go nowhere). Modules a batch never
reaches (a mixture-of-experts expert with no tokens) are released when every other batch has gone past
or finished; a module run twice in one forward is calibrated on its first call (later calls compute
with the released weights).

With ``whole_blocks`` (``calibration.sequential: blocks``), each batch waits at a block's entry too,
and the block is one :class:`BlockStop`: a sweep runs it as it is from each batch's arguments, one batch
after the other, giving every watched module's input on the way; once the caller has released those
modules, the batches run the block for real, with the pruned weights, to the next block.

The caller only coordinates: an interrupt, wherever it lands, stops every batch (they unwind with an
exception no model code catches) before it propagates, and the hooks, modes and weights are restored
whatever happens.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import weakref
from collections.abc import Callable, Collection, Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import greenlet
import torch
from torch import nn

from . import runtime
from .masks import Packed, product
from .offload import Parked, Parking

__all__ = [
    "Arrival",
    "BatchFailed",
    "BlockStop",
    "Pass",
    "Stop",
    "Weight",
    "attention_mask",
    "run_batch",
    "transposed",
    "without_cache",
]


Weight = tuple[torch.Tensor, torch.Tensor | Packed]  # (values, mask): a module computes with values * mask


class BatchFailed(Exception):
    """A batch's forward raised ``error`` (an Exception) before the pass ended."""

    def __init__(self, index: int, error: BaseException) -> None:
        super().__init__(f"batch {index}: {type(error).__name__}: {error}")
        self.index = index
        self.error = error


class _Abort(BaseException):
    """Unwinds a waiting batch's forward when the pass is stopped (no ``except Exception`` catches it)."""


@dataclass(frozen=True)
class Arrival:
    """One batch at a stop: its index, its input to the module, and its ``attention_mask`` if any."""

    batch: int
    x: torch.Tensor
    attention_mask: torch.Tensor | None


@dataclass(frozen=True)
class Stop:
    """Every batch that reached ``module`` waits there: ``arrivals`` in batch order, to be read once
    (when blocks are replayed, each batch's arrival is made as they are read, and gone at the next).
    ``same_as``: the stop before, when each of these batches brought it the very same input."""

    module: str
    arrivals: Iterable[Arrival]
    same_as: str | None = None


@dataclass(frozen=True)
class BlockStop:
    """Every batch waits at the entry of ``block`` (a pass with ``whole_blocks``): ``sweep()`` runs the
    block as it is (its modules not pruned yet) from each batch's arguments, one batch after the other,
    and gives each watched module's input on the way, ``(module, same_as, arrival)`` in the order the
    module is first called in the batch's run, ``same_as`` naming the module before it in that run
    given the very same tensor (q/k/v), if any. A sweep can be run again (each run replays the block)."""

    block: str
    sweep: Callable[[], Iterator[tuple[str, str | None, Arrival]]]


class _Worker:
    """One batch's forward (or, with ``replay``, one run of a block from that batch's arguments)."""

    def __init__(self, index: int, batch: Any, *, replay: bool = False) -> None:
        self.index = index
        self.batch = batch
        self.mask = attention_mask(batch)
        self.replay = replay
        self.state = "ready"  # ready | running | waiting | done
        self.at: str | None = None  # the module it waits at
        self.block: str | None = None  # the block whose entry it waits at (its arguments in ``call``)
        self.call: tuple[tuple[Any, ...], dict[str, Any], _TorchState] | None = None
        self.versions: list[int] = []  # of the tensors in ``call``: a block that changes them cannot be replayed
        self.x: torch.Tensor | None = None
        self.order = 0
        self.error: BaseException | None = None
        self.glet: greenlet.greenlet | None = None
        self.swapped: list[tuple[nn.Module, list[tuple[str, Any]]]] = []  # what its calls put in modules
        self.killed = False
        self.peeking = False  # a replay past its arrival: finding the modules given the same input
        self.same: list[str] = []  # those modules, in order
        self.sweeping = False  # a replay of a whole block, its modules computing (see BlockStop)
        self.seen: list[tuple[str, weakref.ref[torch.Tensor]]] = []  # a sweep's arrivals so far
        self.same_as: str | None = None  # the module before it in a sweep given this arrival's input
        self.parked: Parked | None = None  # its hidden state, parked while it waits at a block's entry


class Pass:
    """A calibration pass over ``batches`` that stops at each of ``watched`` (module name -> module).

    ``weights``: module name -> {parameter name: (values, mask)}: the modules compute with ``values *
    mask`` from the start (masks computed before the pass); :meth:`release` adds more. The product is
    made when the first batch calls the module and dropped at the next stop, so a pass holds the
    pruned weights of only the modules the batches just went through, never a copy of all of them.

    ``blocks`` (name -> module, the model's repeated blocks): replay them. Each batch then waits at a
    block's entry, holding only its arguments, and each stop inside the block runs the block again
    from those, one batch at a time, up to the stop: memory for one batch's activations inside a block
    rather than every batch's, for a forward of the block's part before each stop. The masks are the
    same either way. A block is run again only while its forward is a function of its arguments (a
    batch that passes it a key/value cache is an error).

    ``whole_blocks`` (with ``blocks``): every module of a block is calibrated at once, on the block as it
    is: :meth:`next_stop` gives a :class:`BlockStop` at each block's entry; once the caller has released
    the modules it found, the batches run the block for real, with their weights, to the next. Two runs
    of each block in all (``calibration.sequential: blocks``).

    Use as a context manager; iterate with :meth:`next_stop` until it returns None.
    """

    def __init__(
        self,
        model: nn.Module,
        batches: Sequence[Any],
        watched: Mapping[str, nn.Module],
        weights: Mapping[str, Mapping[str, Weight]] | None = None,
        blocks: Mapping[str, nn.Module] | None = None,
        *,
        whole_blocks: bool = False,
        parking: Parking | None = None,
    ) -> None:
        self.model = model
        self.whole_blocks = whole_blocks
        self._parking = parking if blocks else None
        self.watched = dict(watched)
        self.weights: dict[str, dict[str, Weight]] = {k: dict(v) for k, v in (weights or {}).items()}
        self.released: set[str] = set()
        self.workers = [_Worker(i, b) for i, b in enumerate(batches)]
        inside = {b: [n for n in self.watched if n == b or n.startswith(b + ".")] for b in blocks or {}}
        self.blocks = {b: m for b, m in (blocks or {}).items() if inside[b]}
        self._inside = {b: inside[b] for b in self.blocks}
        self._finished: set[str] = set()  # blocks every batch has gone into for good
        self._swept: set[str] = set()  # with whole_blocks: blocks given as a BlockStop
        self._coordinator: greenlet.greenlet | None = None
        self._current: _Worker | None = None  # the batch running now (None: the coordinator)
        self._aborting = False
        self._arrivals = itertools.count()
        self._handles: list[Any] = []
        self._modes: list[tuple[nn.Module, bool]] = []
        self._exits = contextlib.ExitStack()  # what the pass turned off in the model meanwhile
        self._made: dict[tuple[str, str], torch.Tensor] = {}  # values * mask, while the batches pass a module
        self._taps: dict[str, tuple[Callable[[int, Any], None], set[int]]] = {}  # module -> (fn, batches due)
        self._previous: tuple[str, dict[int, weakref.ref[torch.Tensor]]] | None = None  # the last stop's inputs
        self._sweep: Generator[Arrival, None, None] | None = None  # the replayed stop being read
        self._live: _Worker | None = None  # the one replay under way
        self._shared: tuple[str, str, list[str]] | None = None  # block, last stop, the next ones given its input
        self._replayed_stop = False  # the last stop's arrivals came from replays
        self.reached: set[str] = set()

    # --- lifecycle ----------------------------------------------------------------------------------

    def __enter__(self) -> Pass:
        self._modes = [(m, m.training) for m in self.model.modules()]
        by_module = dict(self.model.named_modules())
        try:
            for name, block in self.blocks.items():
                self._handles.append(block.register_forward_pre_hook(self._entering(name), with_kwargs=True))
            for name in sorted(set(self.watched) | set(self.weights)):
                module = self.watched.get(name) or by_module[name]
                self._handles.append(module.register_forward_pre_hook(self._before(name), with_kwargs=True))
                self._handles.append(module.register_forward_hook(self._after(name), always_call=True))
            self.model.eval()
            self._exits.enter_context(without_cache(self.model))
            if self._parking is not None:
                self._parking.watch(self.model)
            self._coordinator = greenlet.getcurrent()
            for worker in self.workers:
                worker.glet = greenlet.greenlet(self._work, parent=self._coordinator)
        except BaseException:
            self._close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self._close()

    def _close(self) -> None:
        self._aborting = True
        self._end_sweep()
        if self._parking is not None:  # before the batches unwind through frames that hold them
            self._parking.close()
        for worker in self.workers:  # a batch waiting at a stop unwinds from there; one not started, never starts
            if worker.glet is not None and worker.glet:
                self._run(worker)
            worker.glet = None
            _put_back(worker)
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for module, training in self._modes:
            module.training = training
        self._exits.close()

    # --- the coordinator's side --------------------------------------------------------------------

    def next_stop(self) -> Stop | BlockStop | None:
        """Run every batch that can go on until each waits at a watched module or is done; the module
        where the earliest of them waits, with every batch waiting there (None: all done); with
        ``whole_blocks``, the block whose entry they wait at.

        Raises :class:`BatchFailed` for a batch whose forward raised an Exception, and re-raises
        anything else (an interrupt inside the model) as it is."""
        self._end_sweep()
        while True:
            for worker in self.workers:
                if worker.state == "ready":
                    self._run(worker)
                _raise(worker)
            self._made.clear()  # every batch went past the modules used since the last stop
            waiting = [w for w in self.workers if w.state == "waiting"]
            if not waiting:
                return None
            first = min(waiting, key=lambda w: w.order)
            if first.block is None:
                assert first.at is not None
                arrivals = [Arrival(w.index, w.x, w.mask) for w in waiting if w.at == first.at and w.x is not None]
                same = self._same_inputs(arrivals)
                self._previous = (first.at, {a.batch: weakref.ref(a.x) for a in arrivals})
                self._replayed_stop = False
                return Stop(first.at, arrivals, same)
            self._previous = None
            entered = [w for w in waiting if w.block == first.block]
            if self.whole_blocks and first.block not in self._swept:
                self._swept.add(first.block)
                return BlockStop(first.block, functools.partial(self._sweeping_block, entered))
            stop = None if self.whole_blocks else self._replayed(first.block, entered)
            if stop is not None:
                self._replayed_stop = True
                return stop
            self._finished.add(first.block)  # nothing left to calibrate in it: the batches run it through
            runtime.free_heap()
            for worker in waiting:
                if worker.block == first.block:
                    worker.state = "ready"

    def release(self, module: str, weights: Mapping[str, Mapping[str, Weight]] | None = None) -> None:
        """Let the batches waiting at ``module`` go on; ``weights`` (module name -> {param: (values,
        mask)}) are what those modules compute with from now on."""
        self._end_sweep()
        self.released.add(module)
        self.update(weights)
        for worker in self.workers:
            if worker.state == "waiting" and worker.at == module and worker.block is None:
                worker.state, worker.at, worker.x = "ready", None, None

    def update(self, weights: Mapping[str, Mapping[str, Weight]] | None) -> None:
        """``weights`` (as for :meth:`release`) are what those modules compute with from now on (the
        same values and masks held another way, say)."""
        for name, tensors in (weights or {}).items():
            self.weights.setdefault(name, {}).update(tensors)
            for pname in tensors:
                self._made.pop((name, pname), None)

    def tap(self, module: str, fn: Callable[[int, Any], None], batches: Collection[int]) -> None:
        """Give ``fn`` (batch index, output) the output of the next call of ``module`` by each of
        ``batches`` (once released, or as a replay of its block passes it; never a block's sweep)."""
        if batches:
            self._taps[module] = (fn, set(batches))

    def shared_later(self, module: str) -> bool:
        """Whether a later stop may be given the very input of ``module``'s, the current stop (and so
        share its statistics). Known once its arrivals are read when its block is replayed (the
        modules given that input were found on the way); otherwise True: only that stop can tell."""
        if not self._replayed_stop:
            return True
        shared = self._shared
        return shared is None or shared[1] != module or bool(shared[2])

    def _same_inputs(self, arrivals: list[Arrival]) -> str | None:
        previous = self._previous
        if previous is None or not arrivals or set(previous[1]) != {a.batch for a in arrivals}:
            return None
        return previous[0] if all(previous[1][a.batch]() is a.x for a in arrivals) else None

    def _run(self, worker: _Worker) -> None:
        """Run ``worker`` until it waits at a stop or is done."""
        assert worker.glet is not None
        worker.state = "running"
        mine = _TorchState.now()
        self._current = worker
        stand_ins = self._stand_ins(worker.block) if worker.replay and not worker.sweeping and worker.block else []
        try:
            worker.glet.switch(worker)
        finally:
            for module, saved in stand_ins:
                _restore(module, saved)
            self._current = None
            mine.restore()

    def _stand_ins(self, block: str) -> list[tuple[nn.Module, list[tuple[str, Any]]]]:
        """While a replay of ``block`` runs, its modules not yet released give zeros without computing:
        a replay waits at such a module (its stop) or passes it only to find the next stop, so their
        outputs go nowhere. (Set before the calls: a pre-hook is too late, torch has the forward then.)"""
        swapped = []
        for name in self._inside[block]:
            if name not in self.released:
                module = self.watched[name]
                out = module.out_features if type(module) is nn.Linear else module.nf if transposed(module) else None
                if isinstance(out, int):
                    swapped.append((module, [("forward", module.__dict__.get("forward", _MISSING))]))
                    module.__dict__["forward"] = functools.partial(_zeros, features=out)
        return swapped

    # --- replayed blocks ---------------------------------------------------------------------------

    def _replayed(self, block: str, entered: list[_Worker]) -> Stop | None:
        """The next stop inside ``block``, whose batches (``entered``) wait at its entry; None when no
        replay reaches a module not yet released."""
        shared = self._shared
        self._shared = None
        if shared is not None and shared[0] == block and shared[2] and shared[2][0] not in self.released:
            module = shared[2][0]  # given the very input of the stop before, by every batch
            self._shared = (block, module, shared[2][1:])
            self._sweep = self._sweeping(block, entered, module)
            return Stop(module, self._sweep, shared[1])
        if self._done(block):
            return None
        for i, worker in enumerate(entered):
            replay = self._replay(worker)
            if replay.state == "waiting":
                assert replay.at is not None  # the batches before went through without a stop: not again
                self._sweep = self._sweeping(block, entered[i:], replay.at)
                return Stop(replay.at, self._sweep)
            self._kill(replay)
        return None

    def _done(self, block: str) -> bool:
        """Nothing left to calibrate in ``block``: the batches run it through."""
        return block in self._finished or all(name in self.released for name in self._inside[block])

    def _sweeping(self, block: str, entered: list[_Worker], module: str) -> Generator[Arrival, None, None]:
        """Each batch's arrival at ``module``, its block replayed up to there (the first replay may be
        under way already); after each, that replay goes on to find the next modules given the same
        input (their forwards not computed: their outputs go nowhere), then it is dropped."""
        same: list[list[str]] | None = []
        for worker in entered:
            replay = self._live if self._live is not None and self._live.index == worker.index else self._replay(worker)
            if replay.state != "waiting" or replay.at != module:
                same = None  # this batch goes elsewhere first: the stops after this one are each found anew
                self._kill(replay)
                continue
            assert replay.x is not None
            yield Arrival(worker.index, replay.x, worker.mask)
            replay.peeking = True
            self._run(replay)
            _raise(replay)  # an interrupt: a failure past the arrival is not the batch's (see _work)
            if same is not None:
                same.append(replay.same)
            self._kill(replay)
        if same:
            first, agreed = same[0], 0
            while agreed < len(first) and all(agreed < len(f) and f[agreed] == first[agreed] for f in same):
                agreed += 1
            self._shared = (block, module, first[:agreed])  # the modules every batch then gave that same input

    def _sweeping_block(self, entered: list[_Worker]) -> Iterator[tuple[str, str | None, Arrival]]:
        """A :class:`BlockStop`'s sweep: each batch's run of its block from its arguments, every module
        computing, stopping at each watched module's first call to give its input."""
        self._end_sweep()
        for worker in entered:
            replay = self._replay(worker, sweeping=True)
            while replay.state == "waiting":
                assert replay.at is not None and replay.x is not None
                yield replay.at, replay.same_as, Arrival(worker.index, replay.x, worker.mask)
                self._run(replay)
                _raise(replay)
            self._kill(replay)
            self._unchanged(worker)  # the real run is next

    def _unchanged(self, worker: _Worker) -> None:
        """BatchFailed if a run of ``worker``'s block changed the block's arguments in place."""
        assert worker.call is not None
        if _versions(*worker.call[:2]) != worker.versions:
            changed = ValueError(
                f"{worker.block} changed its own input in place, so it cannot be run again from it: {self._instead()}"
            )
            raise BatchFailed(worker.index, changed)

    def _instead(self) -> str:
        """What to do for a block that cannot be run again from its arguments."""
        return "use calibration.sequential: true" if self.whole_blocks else "leave replay_blocks off"

    def _replay(self, worker: _Worker, *, sweeping: bool = False) -> _Worker:
        """A run of ``worker``'s block from its arguments, until it waits at a module or is done."""
        if self._live is not None:
            self._kill(self._live)
        self._unchanged(worker)
        assert worker.call is not None
        if worker.parked is not None:
            worker.parked.restore()  # parked again when the replay is dropped
        replay = _Worker(worker.index, None, replay=True)
        replay.mask, replay.block, replay.call, replay.sweeping = worker.mask, worker.block, worker.call, sweeping
        replay.parked = worker.parked
        replay.glet = greenlet.greenlet(self._work, parent=self._coordinator)
        self._live = replay
        self._run(replay)
        _raise(replay)
        return replay

    def _kill(self, replay: _Worker) -> None:
        if replay.glet is not None and replay.glet:
            replay.killed = True
            self._run(replay)
        replay.glet = None
        _put_back(replay)
        if replay.parked is not None and not self._aborting:
            replay.parked.park()
        replay.parked = None
        if self._live is replay:
            self._live = None

    def _end_sweep(self) -> None:
        if self._sweep is not None:
            self._sweep.close()
            self._sweep = None
        if self._live is not None:
            self._kill(self._live)

    # --- the batches' side -------------------------------------------------------------------------

    def _work(self, worker: _Worker) -> None:
        try:
            if self._aborting or worker.killed:
                pass
            elif worker.replay:
                assert worker.call is not None and worker.block is not None
                args, kwargs, state = worker.call
                state.restore()
                with torch.no_grad():
                    self.blocks[worker.block](*args, **kwargs)
            else:
                with torch.no_grad():
                    run_batch(self.model, worker.batch)
        except _Abort:
            pass
        except BaseException as exc:  # handed to the coordinator, which raises it where it can clean up
            if not worker.peeking or not isinstance(exc, Exception):  # past its arrival a replay computes on
                worker.error = exc  # zeros: an Exception there is not the batch's fault, and only ends the replay
        finally:
            worker.state, worker.x, worker.batch = "done", None, None
            _put_back(worker)

    def _wait(self, worker: _Worker) -> None:
        worker.state, worker.order = "waiting", next(self._arrivals)
        assert self._coordinator is not None
        mine = _TorchState.now()
        self._coordinator.switch()
        mine.restore()
        if self._aborting or worker.killed:
            raise _Abort

    def _entering(self, block: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            worker = self._current
            if worker is None or worker.replay or self._done(block):
                return
            cache = next((k for k in _CACHES if kwargs.get(k) is not None), None)
            if cache is not None:
                raise ValueError(
                    f"the model passes a key/value cache ({cache}) to {block}, which cannot be run again from "
                    f"its arguments: {self._instead()}, or calibrate without a cache (use_cache=False)"
                )
            worker.block, worker.call = block, (args, kwargs, _TorchState.now())
            worker.versions = _versions(args, kwargs)
            if self._parking is not None:
                worker.parked = self._parking.park(first_tensor(args, kwargs))
            self._wait(worker)
            if self._parking is not None:
                self._parking.forget(worker.parked)
            worker.block, worker.call, worker.versions, worker.parked = None, None, [], None

        return hook

    def _before(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            worker = self._current
            if worker is None:
                return
            if worker.peeking:
                self._peek(worker, name, module, first_tensor(args, kwargs))
                return
            if worker.sweeping:
                self._arrive(worker, name, first_tensor(args, kwargs))
            elif name in self.watched and name not in self.released:
                x = first_tensor(args, kwargs)
                if x is not None:
                    self.reached.add(name)
                    worker.at, worker.x = name, x
                    self._wait(worker)
            if worker.replay and not worker.sweeping and name in self.watched and name not in self.released:
                return  # its output goes nowhere (see _stand_ins): not worth its pruned weights

            swapped = []
            for pname, (values, mask) in self.weights.get(name, {}).items():
                swapped.append((pname, module.__dict__.get(pname, _MISSING)))
                made = self._made.get((name, pname))
                if made is None:  # once for all the batches that pass the module one after the other
                    keep = mask.unpack() if isinstance(mask, Packed) else mask
                    made = self._made[name, pname] = product(values, keep)
                # found before the Parameter: nn.Module.__getattr__ is only the fallback
                module.__dict__[pname] = made
            worker.swapped.append((module, swapped))

        return hook

    def _arrive(self, worker: _Worker, name: str, x: torch.Tensor | None) -> None:
        """A sweep at a module: a watched one not released, called for the first time in this run, gets
        its input read (the run waits while it is)."""
        if x is None or name not in self.watched or name in self.released or any(n == name for n, _ in worker.seen):
            return
        self.reached.add(name)
        worker.same_as = next((n for n, seen in worker.seen if seen() is x), None)
        worker.seen.append((name, weakref.ref(x)))
        worker.at, worker.x = name, x
        self._wait(worker)
        worker.at, worker.x = None, None

    def _peek(self, worker: _Worker, name: str, module: nn.Module, x: torch.Tensor | None) -> None:
        """A replay past its arrival at a module: the next watched module not released, given the same
        input, is found (and skipped); anything else ends the replay."""
        if name in self.watched and name not in self.released and x is worker.x and name not in worker.same:
            self.reached.add(name)
            worker.same.append(name)
            return
        worker.at = name
        self._wait(worker)  # never resumed: the coordinator drops it

    def _after(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            worker = self._current
            if worker is None:
                return
            tap = self._taps.get(name)
            if tap is not None and not (worker.peeking or worker.sweeping) and worker.index in tap[1]:
                tap[1].discard(worker.index)  # before the weights go back: it may read the bias
                if not tap[1]:
                    del self._taps[name]
                tap[0](worker.index, output)
            if worker.swapped and worker.swapped[-1][0] is module:
                _restore(*worker.swapped.pop())

        return hook

    def unreached(self) -> list[str]:
        """Watched modules no batch ever ran."""
        return [name for name in self.watched if name not in self.reached]


_CACHES = ("past_key_values", "past_key_value", "layer_past")


def _raise(worker: _Worker) -> None:
    if worker.error is not None:
        if isinstance(worker.error, Exception):
            raise BatchFailed(worker.index, worker.error) from worker.error
        raise worker.error


def _versions(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> list[int]:
    return [v._version for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)]


def _zeros(x: torch.Tensor, *_: Any, features: int, **__: Any) -> torch.Tensor:
    return x.new_zeros(*x.shape[:-1], features)


def _put_back(worker: _Worker) -> None:
    """What ``worker``'s unfinished calls put into modules, put back (an unwinding forward skips the
    forward hooks that would have)."""
    while worker.swapped:
        _restore(*worker.swapped.pop())


def transposed(module: nn.Module) -> bool:
    """Whether ``module`` keeps its weight as ``(in, out)``: transformers' ``Conv1D`` (GPT-2), which
    computes ``x @ weight``, unlike ``nn.Linear``'s ``x @ weight.T``."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and not isinstance(module, nn.Linear)


_MISSING = object()

_AUTOCAST_DEVICES = ("cpu", "cuda")


@dataclass(frozen=True)
class _TorchState:
    """What torch keeps per thread that a forward may set and leave set while suspended (a ``with
    torch.autocast(...)`` around a watched module): since the batches share one thread, each gets its
    own back when it resumes."""

    grad: bool
    autocast: tuple[tuple[bool, torch.dtype], ...]

    @classmethod
    def now(cls) -> _TorchState:
        return cls(
            torch.is_grad_enabled(),
            tuple((torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in _AUTOCAST_DEVICES),
        )

    def restore(self) -> None:
        torch.set_grad_enabled(self.grad)
        for device, (enabled, dtype) in zip(_AUTOCAST_DEVICES, self.autocast, strict=True):
            torch.set_autocast_enabled(device, enabled)
            torch.set_autocast_dtype(device, dtype)


def _restore(module: nn.Module, swapped: list[tuple[str, Any]]) -> None:
    for pname, saved in reversed(swapped):
        if saved is _MISSING:
            module.__dict__.pop(pname, None)
        else:
            module.__dict__[pname] = saved


@contextlib.contextmanager
def without_cache(model: nn.Module) -> Iterator[None]:
    """transformers models with ``config.use_cache`` off meanwhile (a batch may still ask for it).

    A calibration forward throws its outputs away, but a decoder that caches keys and values keeps
    every layer's for every batch until the forward ends: a sequential pass, whose batches all wait
    at once, would hold them all (2 x layers x tokens x hidden floats per batch)."""
    configs = {id(c): c for m in model.modules() if (c := getattr(m, "config", None)) is not None}
    saved = [(c, c.use_cache) for c in configs.values() if getattr(c, "use_cache", None) is True]
    for config, _ in saved:
        config.use_cache = False
    try:
        yield
    finally:
        for config, value in saved:
            config.use_cache = value


def first_tensor(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> torch.Tensor | None:
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    for key in ("input", "hidden_states", "x"):
        value = kwargs.get(key)
        if isinstance(value, torch.Tensor):
            return value
    return None


def run_batch(model: nn.Module, batch: Any) -> Any:
    """One forward pass with ``batch`` as the model's input: a Tensor is the first positional argument,
    a tuple or list the positional arguments, a mapping the keyword arguments. TypeError otherwise."""
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    raise TypeError(f"a batch is a Tensor, a tuple or list, or a mapping; got {type(batch).__name__}")


def attention_mask(batch: Any) -> torch.Tensor | None:
    """The batch's ``attention_mask`` (a mapping's 2-D tensor under that key), or None."""
    if isinstance(batch, Mapping):
        mask = batch.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            return mask
    return None
