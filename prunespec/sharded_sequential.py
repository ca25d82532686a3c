"""Sequential calibration of a model split across ranks (FSDP2), data-parallel.

In one process, :class:`prunespec.sequential.Pass` interleaves every batch's forward, stopping them all
at each module being pruned. That cannot work on an FSDP2 model: a forward there is collective (every
rank all-gathers each block's weights around its forward, and FSDP keeps per-forward state), so every
rank must run the same modules the same number of times, in the same order, one forward at a time.

So calibration here runs whole forwards, one batch after the other on every rank, in **passes**:

* a pass runs each of this rank's batches through the model once; in each batch's forward, the first
  module not yet calibrated that it reaches, and every later one whose input is the very same tensor
  object (``q_proj``/``k_proj``/``v_proj``, ``gate_proj``/``up_proj``), form the pass's *group*;
  their statistics are computed from that input, batch by batch;
* the statistics are summed over every rank's batches, batch by batch in rank order (the sums one
  process makes of all the ranks' batches, rank 0's first, to the bit), and the caller computes the
  group's masks from them;
* this rank's part of each pruned weight is multiplied by its mask in place
  (``distributed.local(param).mul_(mask)``), so the next pass computes with it pruned, as a process
  that released the group would.

A calibration costs ``groups x batches`` forwards per rank (groups: the distinct inputs of the modules
being pruned; 4 per Llama decoder layer), against ``batches`` in one process: sequential on FSDP2
trades compute for never holding more than FSDP's own activations. No weight is ever gathered whole.
Memory beyond the model: a copy of this rank's part of each tensor pruned so far (to restore it) and
the current group's statistics per batch. The parts are restored from those copies when calibration
ends or fails, so the model is left as it was (the engine installs masks only at the end).

Every batch on every rank must reach the modules in the same order (dense models do; a mixture of
experts routing batches differently is a :class:`~prunespec.errors.CalibrationError` saying so).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any

import torch
from torch import nn

from . import calibration, distributed
from .calibration import Accumulator, Statistics, features
from .errors import CalibrationError
from .pruned import Pruned
from .sequential import Arrival, Stop, attention_mask, first_tensor

__all__ = ["calibrate"]

Group = Callable[[list[str], Statistics], Iterable[Pruned]]
"""The caller's work at a group: its modules (forward order) and their statistics -> the tensors it
gave new masks (to compute with from the next pass on)."""


def calibrate(
    model: nn.Module,
    watched: Mapping[str, nn.Module],
    names: Callable[[str], Collection[str]],
    batches: list[Any],
    rules: str,
    early: Iterable[Pruned],
    at_group: Group,
) -> int:
    """Calibrate ``watched`` (module name -> module) sequentially on every rank's ``batches``: passes
    until every module's group has been given to ``at_group``. ``early``: tensors with masks from
    before the calibration, which every pass computes with. Returns the tokens counted at the first
    module (summed over every rank's batches). Collective: every rank calls this, with as many
    batches as the others. Raises :class:`CalibrationError`; the model is left as it was whatever
    happens (parameters, training flags; FSDP's unsharded copies freed)."""
    counts = [int(c) for c in distributed.gather(torch.tensor([len(batches)]))]
    if len(set(counts)) > 1:
        given = ", ".join(f"rank {r}: {c}" for r, c in enumerate(counts))
        raise CalibrationError(rules, f"every rank must give as many calibration batches ({given})")
    parts = _Parts()
    modes = [(m, m.training) for m in model.modules()]
    tokens: int | None = None
    done: set[str] = set()
    try:
        model.eval()
        parts.press(early)
        while len(done) < len(watched):
            pending = {name: m for name, m in watched.items() if name not in done}
            group, stats, counted = _one_pass(model, pending, names, batches, rules)
            tokens = counted if tokens is None else tokens
            _reshard(model)  # FSDP's root keeps its weights unsharded after a forward: not after this one
            parts.lift()  # the caller scores the weights as they are in the model, not as pruned here
            pruned = list(at_group(group, stats))
            done.update(group)
            if len(done) < len(watched):
                parts.press(pruned)
    finally:
        parts.lift()
        _reshard(model)
        for module, training in modes:
            module.training = training
    return tokens or 0


class _Parts:
    """This rank's parts of the weights the passes compute pruned, with copies to restore them."""

    def __init__(self) -> None:
        self.saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(part) -> (part, its copy)
        self.masks: dict[int, torch.Tensor] = {}  # id(part) -> its latest mask

    def press(self, tensors: Iterable[Pruned]) -> None:
        """Every tensor so far (and ``tensors``, with their new masks) multiplied by its mask, in place."""
        for tensor in tensors:
            mask = tensor.final_mask()  # (a plain tensor's packed, after an earlier rule with finalize)
            if mask is None:
                continue
            part = tensor.orig  # the parameter's own storage (a DTensor's local part, a view)
            if id(part) not in self.saved:
                self.saved[id(part)] = (part, part.detach().clone())
            self.masks[id(part)] = mask
        with torch.no_grad():
            for key, (part, original) in self.saved.items():
                part.copy_(original).mul_(self.masks[key].to(part.dtype))

    def lift(self) -> None:
        """Every part back to its values before calibration."""
        with torch.no_grad():
            for part, original in self.saved.values():
                part.copy_(original)


def _reshard(model: nn.Module) -> None:
    """Free FSDP2's unsharded copies (the root keeps its own after a forward), so the next forward
    gathers the parts as they are now."""
    fsdp = sys.modules.get("torch.distributed.fsdp")  # not imported: no FSDP module in this program
    if fsdp is None:
        return
    for module in model.modules():
        if isinstance(module, fsdp.FSDPModule):
            module.reshard()


class _Batch:
    """One batch's forward in a pass: the group it reached, and their statistics."""

    def __init__(self, index: int, batch: Any) -> None:
        self.index = index
        self.mask = attention_mask(batch)
        self.x: torch.Tensor | None = None  # the group's input
        self.members: list[str] = []
        self.accumulator = Accumulator()
        self.stats: dict[str, torch.Tensor] = {}


def _one_pass(
    model: nn.Module,
    pending: Mapping[str, nn.Module],
    names: Callable[[str], Collection[str]],
    batches: list[Any],
    rules: str,
) -> tuple[list[str], Statistics, int]:
    """One forward of each batch: the group every batch reached (the same on every rank), its
    statistics summed over every rank's batches, and the tokens counted at it."""
    current: _Batch | None = None
    seen: list[_Batch] = []

    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if current is None or name in current.members:
                return  # a module run twice in one forward is calibrated on its first call
            x = first_tensor(args, kwargs)
            if x is None or (current.x is not None and x is not current.x):
                return  # not this pass's group: a later pass calibrates it
            current.x = x
            same = current.members[-1] if current.members else None  # the group's members share one input
            current.members.append(name)
            stop = Stop(name, [Arrival(current.index, x.detach(), current.mask)], same)
            current.stats = current.accumulator.at(stop, names(name), features(module))

        return record

    def start(index: int, batch: Any) -> None:
        nonlocal current
        current = _Batch(index, batch)

    def end(index: int) -> None:
        nonlocal current
        assert current is not None
        current.x = None  # the input is not kept past its forward
        seen.append(current)
        current = None

    calibration.forward_each(model, batches, {name: hook(name) for name in pending}, pending, rules, start, end)
    group = _agreed(seen, list(pending), rules)
    stats: Statistics = {}
    shared: dict[str, torch.Tensor] = {}
    for stat in sorted(seen[0].stats):  # the same names on every rank: the same group's
        shared[stat] = calibration.over_ranks(stat, [b.stats[stat] for b in seen])
    for name in group:  # one statistic shared by the group (its members see one input), as in one process
        stats[name] = shared
    mine = [b.accumulator.tokens or 0 for b in seen]
    tokens = sum(int(t.sum()) for t in distributed.gather(torch.tensor(mine)))
    return group, stats, tokens


def _agreed(seen: list[_Batch], pending: list[str], rules: str) -> list[str]:
    """The group every batch of every rank reached; a CalibrationError on every rank otherwise."""
    groups = {tuple(b.members) for b in seen}
    mine = [pending.index(n) for n in seen[0].members] if len(groups) == 1 else [-1]
    everyone = [p.tolist() for p in distributed.gather(torch.tensor(mine or [-2]))]
    if all(p == everyone[0] for p in everyone) and everyone[0][0] >= 0:
        return [pending[i] for i in everyone[0]]
    if everyone[0] == [-2] and all(p == [-2] for p in everyone):
        raise CalibrationError(
            rules, f"the model's forward never ran {', '.join(pending)} on the calibration data: no statistics"
        )
    raise CalibrationError(
        rules,
        "the calibration batches reach the modules being pruned in different orders (on this rank: "
        + "; ".join(" ".join(g) or "none" for g in sorted(groups))
        + "); sequential calibration across ranks needs one order: set calibration: {sequential: false}",
    )
