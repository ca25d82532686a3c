"""Each calibrated tensor's relative reconstruction error, ``||W X - W' X||^2 / ||W X||^2``, on a sample of
the tokens its module saw at its stop (at most :data:`ERROR_TOKENS`, spread over the batches in order,
padding left out: :class:`prunespec.calibration.Sampler`): W as the model had it before the apply, W' after.

One matmul per tensor, with no copy of the weights: ``W X`` at the stop, before anything is written
into the model; ``W' X`` is the module's own output, minus its bias, taken as the batches go through
it after the stop (:meth:`prunespec.sequential.Pass.tap`). Without sequential calibration the module
computes with W, so its output is ``W X`` and the stop computes ``(W - W') X`` instead. That holds for
a plain ``nn.Linear`` or transformers ``Conv1D``; any other module gets both products at the stop.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .calibration import Sample, out_in, transposed
from .pruned import Pruned

__all__ = ["ERROR_TOKENS", "Errors"]

ERROR_TOKENS = 256
"""At most this many calibration tokens per module measure its reconstruction error (all when fewer)."""


@dataclass
class _Open:
    """An error waiting for its module's outputs."""

    tensor: Pruned
    rows: dict[int, torch.Tensor]  # batch -> rows of its output, batches in sample order
    known: torch.Tensor  # on the sample, (n, out): W X when the outputs will be W' X, else (W - W') X
    pruned_output: bool  # the outputs are W' X (+ b), else W X (+ b)
    outputs: dict[int, torch.Tensor] = field(default_factory=dict)


class Errors:
    """The errors of the tensors calibrated at each stop of a pass. :meth:`at_stop` before the stop's
    tensors are written (it may give a tap for the module's outputs), :meth:`settle` once the batches
    have gone past the module (at the next stop, and after the pass)."""

    def __init__(self) -> None:
        self._open: list[_Open] = []

    def at_stop(
        self, taken: Sample, module: nn.Module, tensors: list[Pruned], *, pruned_output: bool, tap: bool = True
    ) -> Callable[[int, Any], None] | None:
        """Measure ``tensors`` (``module``'s, just calibrated at a stop whose sample of tokens is
        ``taken``); a tap to give the module's outputs to (batch index, output), or None when every
        error is known already.
        ``pruned_output``: the module computes with W' after the stop (sequential), else with W.
        ``tap``: its next outputs are of those tokens (False: both products are computed here)."""
        measured = [t for t in tensors if t.orig.dim() == 2 and t.mask is not None]
        if not measured:
            return None
        opened = []
        for tensor in measured:
            before = _before(tensor)
            if before.shape[1] != taken.tokens.shape[1]:
                continue
            tokens = taken.tokens.to(before.device)
            if tap and _plain(module) and tensor.owners[0][0] is module:
                known = tokens @ (before if pruned_output else _difference(tensor, before)).to(torch.float32).T
                opened.append(_Open(tensor, dict(taken.rows), known, pruned_output))
            else:  # no tap, or a module whose output is not x W^T + b: both products here
                tensor.error = _direct(tokens, tensor, before)
        if not opened:
            return None
        self._open.extend(opened)

        def receive(batch: int, output: Any) -> None:
            if not isinstance(output, torch.Tensor):
                return
            bias = getattr(module, "bias", None)
            flat = output.detach().reshape(-1, output.shape[-1])
            for entry in opened:
                rows = entry.rows.get(batch)
                if rows is not None and batch not in entry.outputs:
                    got = flat[rows.to(flat.device)].to(torch.float32)
                    entry.outputs[batch] = got - bias.detach().to(torch.float32) if bias is not None else got

        return receive

    def settle(self) -> None:
        """The errors whose module outputs are all in; the others wait (a tensor whose outputs never
        came, its module's output not being a tensor of the expected shape, has no error)."""
        waiting = []
        for entry in self._open:
            if len(entry.outputs) < len(entry.rows):
                waiting.append(entry)
                continue
            computed = torch.cat([entry.outputs[b] for b in entry.rows]).to(entry.known.device)
            if computed.shape != entry.known.shape:
                continue
            if entry.pruned_output:  # W X known, W' X computed
                entry.tensor.error = _ratio(entry.known - computed, entry.known)
            else:  # (W - W') X known, W X computed
                entry.tensor.error = _ratio(entry.known, computed)
        self._open = waiting

    def close(self) -> None:
        """After the pass: settle what can be; the rest stay unknown."""
        self.settle()
        self._open = []


def _before(tensor: Pruned) -> torch.Tensor:
    """W, as the model had it before this apply, ``(out, in)`` (a view when nothing pruned it before)."""
    before = tensor.orig.detach() if tensor.start is None else tensor.orig.detach() * tensor.start
    return out_in(tensor.owners[0][0], before)


def _difference(tensor: Pruned, before: torch.Tensor, rows: slice = slice(None)) -> torch.Tensor:
    """``W - W'``, ``(out, in)``, float32 (of ``rows`` only: ``before`` is then those rows)."""
    module = tensor.owners[0][0]
    assert tensor.mask is not None
    keep = out_in(module, tensor.mask if tensor.mask.dtype == torch.bool else tensor.mask != 0)[rows]
    if tensor.values is None and tensor.start is None:  # W where pruned (a product: masked_fill is ~3x slower)
        return (before * keep.logical_not()).to(torch.float32)
    return (out_in(module, tensor.current.detach())[rows] * keep).sub_(before).neg_().to(torch.float32)


_ROWS = 256  # rows of W at a time in _direct: its temporaries stay small beside W


def _direct(tokens: torch.Tensor, tensor: Pruned, before: torch.Tensor) -> float:
    """``||(W - W') X||^2 / ||W X||^2`` on ``tokens`` (X, float32), both products made here, a few rows
    of W at a time."""
    total = missing = 0.0
    for start in range(0, before.shape[0], _ROWS):
        rows = slice(start, start + _ROWS)
        total += float((tokens @ before[rows].to(torch.float32).T).square().sum())
        missing += float((tokens @ _difference(tensor, before[rows], rows).T).square().sum())
    return _quotient(missing, total)


def _plain(module: nn.Module) -> bool:
    """Whether ``module``'s output is ``x W^T + b`` (``x W + b``): a plain Linear or Conv1D."""
    return type(module) is nn.Linear or transposed(module)


def _ratio(lost: torch.Tensor, dense: torch.Tensor) -> float:
    return _quotient(float(lost.square().sum()), float(dense.square().sum()))


def _quotient(missing: float, total: float) -> float:
    return missing / total if total > 0 else (0.0 if missing == 0 else math.inf)
