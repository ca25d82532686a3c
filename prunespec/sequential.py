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
activations for every batch), and the current stop's inputs (the same tensors). Modules a batch never
reaches (a mixture-of-experts expert with no tokens) are released when every other batch has gone past
or finished; a module run twice in one forward is calibrated on its first call (later calls compute
with the released weights).

The caller only coordinates: an interrupt, wherever it lands, stops every batch (they unwind with an
exception no model code catches) before it propagates, and the hooks, modes and weights are restored
whatever happens.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import greenlet
import torch
from torch import nn

from .masks import Packed

__all__ = ["Arrival", "BatchFailed", "Pass", "Stop", "Weight", "attention_mask", "run_batch", "without_cache"]


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
    """Every batch that reached ``module`` waits there: ``arrivals`` in batch order."""

    module: str
    arrivals: list[Arrival]


class _Worker:
    def __init__(self, index: int, batch: Any) -> None:
        self.index = index
        self.batch = batch
        self.mask = attention_mask(batch)
        self.state = "ready"  # ready | running | waiting | done
        self.at: str | None = None
        self.x: torch.Tensor | None = None
        self.order = 0
        self.error: BaseException | None = None
        self.glet: greenlet.greenlet | None = None


class Pass:
    """A calibration pass over ``batches`` that stops at each of ``watched`` (module name -> module).

    ``weights``: module name -> {parameter name: (values, mask)}: the modules compute with ``values *
    mask`` from the start (masks computed before the pass); :meth:`release` adds more. The product is
    made when the first batch calls the module and dropped at the next stop, so a pass holds the
    pruned weights of only the modules the batches just went through, never a copy of all of them.
    Use as a context manager; iterate with :meth:`next_stop` until it returns None.
    """

    def __init__(
        self,
        model: nn.Module,
        batches: Sequence[Any],
        watched: Mapping[str, nn.Module],
        weights: Mapping[str, Mapping[str, Weight]] | None = None,
    ) -> None:
        self.model = model
        self.watched = dict(watched)
        self.weights: dict[str, dict[str, Weight]] = {k: dict(v) for k, v in (weights or {}).items()}
        self.released: set[str] = set()
        self.workers = [_Worker(i, b) for i, b in enumerate(batches)]
        self._coordinator: greenlet.greenlet | None = None
        self._current: _Worker | None = None  # the batch running now (None: the coordinator)
        self._aborting = False
        self._arrivals = itertools.count()
        self._handles: list[Any] = []
        self._saved: dict[int, list[tuple[nn.Module, str, Any]]] = {}
        self._modes: list[tuple[nn.Module, bool]] = []
        self._exits = contextlib.ExitStack()  # what the pass turned off in the model meanwhile
        self._made: dict[tuple[str, str], torch.Tensor] = {}  # values * mask, while the batches pass a module
        self._taps: dict[str, Callable[[int, Any], None]] = {}  # module -> given its outputs, until the next stop
        self.reached: set[str] = set()

    # --- lifecycle ----------------------------------------------------------------------------------

    def __enter__(self) -> Pass:
        self._modes = [(m, m.training) for m in self.model.modules()]
        by_module = dict(self.model.named_modules())
        try:
            for name in sorted(set(self.watched) | set(self.weights)):
                module = self.watched.get(name) or by_module[name]
                self._handles.append(module.register_forward_pre_hook(self._before(name), with_kwargs=True))
                self._handles.append(module.register_forward_hook(self._after(name), always_call=True))
            self.model.eval()
            self._exits.enter_context(without_cache(self.model))
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
        for worker in self.workers:  # a batch waiting at a stop unwinds from there; one not started, never starts
            if worker.glet is not None and worker.glet:
                self._run(worker)
            worker.glet = None
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for stack in self._saved.values():  # a forward hook that never ran (it always does; to be sure)
            while stack:
                module, pname, saved = stack.pop()
                _restore(module, pname, saved)
        for module, training in self._modes:
            module.training = training
        self._exits.close()

    # --- the coordinator's side --------------------------------------------------------------------

    def next_stop(self) -> Stop | None:
        """Run every batch that can go on until each waits at a watched module or is done; the module
        where the earliest of them waits, with every batch waiting there (None: all done).

        Raises :class:`BatchFailed` for a batch whose forward raised an Exception, and re-raises
        anything else (an interrupt inside the model) as it is."""
        for worker in self.workers:
            if worker.state == "ready":
                self._run(worker)
            if worker.error is not None:
                if isinstance(worker.error, Exception):
                    raise BatchFailed(worker.index, worker.error) from worker.error
                raise worker.error
        self._made.clear()  # every batch went past the modules used since the last stop
        self._taps.clear()
        waiting = [w for w in self.workers if w.state == "waiting"]
        if not waiting:
            return None
        module = min(waiting, key=lambda w: w.order).at
        assert module is not None
        arrivals = [Arrival(w.index, w.x, w.mask) for w in waiting if w.at == module and w.x is not None]
        return Stop(module, arrivals)

    def release(self, module: str, weights: Mapping[str, Mapping[str, Weight]] | None = None) -> None:
        """Let the batches waiting at ``module`` go on; ``weights`` (module name -> {param: (values,
        mask)}) are what those modules compute with from now on."""
        self.released.add(module)
        self.update(weights)
        for worker in self.workers:
            if worker.state == "waiting" and worker.at == module:
                worker.state, worker.at, worker.x = "ready", None, None

    def update(self, weights: Mapping[str, Mapping[str, Weight]] | None) -> None:
        """``weights`` (as for :meth:`release`) are what those modules compute with from now on (the
        same values and masks held another way, say)."""
        for name, tensors in (weights or {}).items():
            self.weights.setdefault(name, {}).update(tensors)
            for pname in tensors:
                self._made.pop((name, pname), None)

    def tap(self, module: str, fn: Callable[[int, Any], None]) -> None:
        """Give ``fn`` (batch index, output) the output of each batch's next call of ``module`` (the
        one each batch waiting there makes once released), until the next stop."""
        self._taps[module] = fn

    def _run(self, worker: _Worker) -> None:
        """Run ``worker`` until it waits at a stop or is done."""
        assert worker.glet is not None
        worker.state = "running"
        mine = _TorchState.now()
        self._current = worker
        try:
            worker.glet.switch(worker)
        finally:
            self._current = None
            mine.restore()

    # --- the batches' side -------------------------------------------------------------------------

    def _work(self, worker: _Worker) -> None:
        try:
            if not self._aborting:
                with torch.no_grad():
                    run_batch(self.model, worker.batch)
        except _Abort:
            pass
        except BaseException as exc:  # handed to the coordinator, which raises it where it can clean up
            worker.error = exc
        finally:
            worker.state, worker.x, worker.batch = "done", None, None

    def _wait(self, worker: _Worker, module: str, x: torch.Tensor) -> None:
        worker.state, worker.at, worker.x, worker.order = "waiting", module, x, next(self._arrivals)
        assert self._coordinator is not None
        mine = _TorchState.now()
        self._coordinator.switch()
        mine.restore()
        if self._aborting:
            raise _Abort

    def _before(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            worker = self._current
            if worker is None:
                return
            if name in self.watched and name not in self.released:
                x = first_tensor(args, kwargs)
                if x is not None:
                    self.reached.add(name)
                    self._wait(worker, name, x)
            stack = self._saved.setdefault(id(module), [])
            for pname, (values, mask) in self.weights.get(name, {}).items():
                stack.append((module, pname, module.__dict__.get(pname, _MISSING)))
                made = self._made.get((name, pname))
                if made is None:  # once for all the batches that pass the module one after the other
                    keep = mask.unpack() if isinstance(mask, Packed) else mask
                    made = self._made[name, pname] = values * keep
                # found before the Parameter: nn.Module.__getattr__ is only the fallback
                module.__dict__[pname] = made

        return hook

    def _after(self, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            tap = self._taps.get(name)
            worker = self._current
            if tap is not None and worker is not None:  # before the weights go back: it may read the bias
                tap(worker.index, output)
            stack = self._saved.get(id(module), [])
            for _ in self.weights.get(name, {}):
                if stack:
                    owner, pname, saved = stack.pop()
                    _restore(owner, pname, saved)

        return hook

    def unreached(self) -> list[str]:
        """Watched modules no batch ever ran."""
        return [name for name in self.watched if name not in self.reached]


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


def _restore(module: nn.Module, pname: str, saved: Any) -> None:
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
