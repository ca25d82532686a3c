"""Sparsity reports: how many zeros each tensor of a model has, and in total.

Every report counts against two stated denominators: the *pruned* tensors (``Report.entries``) and *all
parameters* of the model (``Report.entries`` plus ``Report.others``). Printing lives in
:mod:`prunespec.render`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import distributed, layout, render
from .record import CalibrationRecord
from .shrink import ShrinkReport


@dataclass(frozen=True)
class TensorStats:
    """How sparse one tensor is. ``zeros`` counts the mask's zeros when a prune mask is installed
    (``masked``), and the tensor's zero values otherwise."""

    name: str
    shape: tuple[int, ...]
    zeros: int
    masked: bool  # has a prune mask installed
    predicted: float | None = None  # what the plan predicted, when the report comes from apply
    estimated: bool = False  # the prediction was an estimate (a global split that depends on the values)
    error: float | None = None  # ||W X - W' X||^2 / ||W X||^2 on the calibration data (data-aware apply)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0


def _fraction(stats: Iterable[TensorStats]) -> float:
    stats = list(stats)
    total = sum(s.numel for s in stats)
    return sum(s.zeros for s in stats) / total if total else 0.0


@dataclass
class Report:
    """Per-tensor and overall sparsity. ``str(report)`` is a table.

    ``entries`` are the pruned tensors: for :func:`prunespec.apply`, the tensors the spec pruned; for
    :func:`sparsity`, every tensor with a prune mask — or, in a model with no mask at all (dense, or
    finalized), every tensor with a zero value, since finalizing leaves nothing but the zeros behind (a
    tensor that is zero by nature, like a zero-initialised bias, then counts too). ``others`` are the
    model's remaining parameters. A tied parameter is counted once, under its first name. Finalizing
    changes no number as long as no kept entry of a pruned tensor is exactly zero: a mask's zeros become
    the same count of zero values.
    """

    entries: dict[str, TensorStats] = field(default_factory=dict)
    others: dict[str, TensorStats] = field(default_factory=dict)
    calibration: CalibrationRecord | None = None  # what a data-aware apply's calibration used
    shrink: ShrinkReport | None = None  # what a spec's `shrink: true` removed after the masks were installed

    @property
    def tensors(self) -> dict[str, float]:
        """``"module.param"`` -> sparsity (fraction of zeros, in [0, 1]) of each pruned tensor."""
        return {name: stats.sparsity for name, stats in self.entries.items()}

    @property
    def parameters(self) -> dict[str, float]:
        """``"module.param"`` -> sparsity of every parameter of the model, pruned or not."""
        return {name: stats.sparsity for name, stats in {**self.entries, **self.others}.items()}

    @property
    def global_sparsity(self) -> float:
        """Fraction of zeros over the pruned tensors (``entries``): the denominator is their entries."""
        return _fraction(self.entries.values())

    @property
    def model_sparsity(self) -> float:
        """Fraction of zeros over every parameter of the model (``entries`` and ``others``)."""
        return _fraction([*self.entries.values(), *self.others.values()])

    def to_dict(self) -> dict[str, Any]:
        def one(s: TensorStats, pruned: bool) -> dict[str, Any]:
            return {
                "shape": list(s.shape),
                "numel": s.numel,
                "zeros": s.zeros,
                "sparsity": s.sparsity,
                "pruned": pruned,
                "mask": s.masked,
                "predicted": s.predicted,
                "predicted_exact": not s.estimated,
                "reconstruction_error": s.error,
            }

        def total(stats: list[TensorStats]) -> dict[str, Any]:
            numel, zeros = sum(s.numel for s in stats), sum(s.zeros for s in stats)
            return {"tensors": len(stats), "numel": numel, "zeros": zeros, "sparsity": _fraction(stats)}

        return {
            "calibration": None if self.calibration is None else self.calibration.to_dict(),
            "shrink": None if self.shrink is None else self.shrink.to_dict(),
            "global_sparsity": self.global_sparsity,
            "model_sparsity": self.model_sparsity,
            "tensors": {name: one(s, True) for name, s in self.entries.items()},
            "other_parameters": {name: one(s, False) for name, s in self.others.items()},
            "totals": {
                "pruned": total(list(self.entries.values())),
                "all_parameters": total([*self.entries.values(), *self.others.values()]),
            },
        }

    def __str__(self) -> str:
        return render.format_report(self)


def collect(
    model: nn.Module,
    names: Iterable[str] | None = None,
    predicted: dict[str, float | None] | None = None,
    zeros: dict[str, int] | None = None,
    estimated: Iterable[str] = (),
    errors: dict[str, float] | None = None,
) -> Report:
    """A report whose pruned tensors are those called ``names`` (``"module.param"``), or, when ``names`` is
    None, those :class:`Report` describes; every other parameter of ``model`` goes to ``others``. ``zeros``
    are counts the caller already has (the engine counts the masks it makes); ``errors``: each tensor's
    relative reconstruction error on the calibration data, when known."""
    found: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}  # every name, tied ones included
    first: dict[int, str] = {}  # each tensor's first name
    for module_name, module in model.named_modules():
        for pname, tensor, mask in layout.named_tensors(module):
            name = f"{module_name}.{pname}" if module_name else pname
            found[name] = (tensor, mask)
            first.setdefault(id(tensor), name)
    counts = dict(zeros or {})
    missing = [n for n in first.values() if n not in counts]
    counted = [_counted(found[n]) for n in missing]
    counts.update(zip(missing, count_zeros(counted), strict=True))  # zeros of the mask, else of the values

    def count(name: str) -> int:
        if name not in counts:  # a tied tensor's other name
            tensor, mask = found[name]
            counts[name] = count_zeros([_counted((tensor, mask))])[0]
        return counts[name]

    if names is not None:
        wanted = [name for name in names if name in found]
    else:
        unique = list(first.values())
        wanted = [n for n in unique if found[n][1] is not None] or [n for n in unique if count(n)]
    guesses = set(estimated)
    entries = {
        name: _stats(
            name, found[name], count(name), (predicted or {}).get(name), name in guesses, (errors or {}).get(name)
        )
        for name in wanted
    }
    taken = {id(found[name][0]) for name in entries}
    rest = [name for name in first.values() if id(found[name][0]) not in taken]
    others = {name: _stats(name, found[name], count(name)) for name in rest}
    return Report(entries, others)


_SMALL = 1 << 14


def _counted(found: tuple[torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
    """What a tensor's zeros are counted on: its mask, else its values."""
    tensor, mask = found
    return mask if mask is not None else tensor.detach()


def count_zeros(tensors: list[torch.Tensor]) -> list[int]:
    """The zeros of each tensor. Small tensors are counted together (one pass for many: a model of
    thousands of tiny layers would otherwise pay a kernel call per bias); counts are read at once."""
    shardings = [distributed.sharding_of(t) for t in tensors]
    tensors = [distributed.local(t) for t in tensors]  # a DTensor's zeros: its parts' on every rank, summed
    out = [0] * len(tensors)
    groups: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    large: list[int] = []
    for i, t in enumerate(tensors):
        if t.numel() <= _SMALL and t.layout == torch.strided:
            groups.setdefault((t.dtype, t.device), []).append(i)
        else:
            large.append(i)
    for members in groups.values():
        flat = torch.cat([tensors[i].reshape(-1) for i in members])
        ends = torch.tensor([tensors[i].numel() for i in members], device=flat.device).cumsum(0)
        running = torch.cat([ends.new_zeros(1), (flat == 0).cumsum(0)])
        starts = torch.cat([ends.new_zeros(1), ends[:-1]])
        for i, n in zip(members, (running[ends] - running[starts]).tolist(), strict=True):
            out[i] = int(n)
    if large:
        device = tensors[large[0]].device
        counts = [(tensors[i].numel() - torch.count_nonzero(tensors[i])).to(device) for i in large]
        for i, n in zip(large, torch.stack(counts).tolist(), strict=True):
            out[i] = int(n)
    return distributed.reduce(out, shardings)


def _stats(
    name: str,
    found: tuple[torch.Tensor, torch.Tensor | None],
    zeros: int,
    predicted: float | None = None,
    estimated: bool = False,
    error: float | None = None,
) -> TensorStats:
    tensor, mask = found
    return TensorStats(name, tuple(tensor.shape), zeros, mask is not None, predicted, estimated, error)


def sparsity(model: nn.Module) -> Report:
    """How sparse ``model`` is, pruned (by prunespec or torch), finalized or dense: see :class:`Report`
    for which tensors count as pruned."""
    with torch.no_grad():
        return collect(model)
