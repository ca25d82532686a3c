"""Sparsity reports, and the tables that show plans and reports to people."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from .planner import Plan


@dataclass(frozen=True)
class TensorStats:
    """How sparse one tensor is. ``zeros`` counts mask zeros for pruned tensors, zero values otherwise."""

    name: str
    shape: tuple[int, ...]
    zeros: int
    pruned: bool  # has a prune mask installed
    predicted: float | None = None  # what the plan predicted, when the report comes from apply

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0


@dataclass
class Report:
    """Per-tensor and overall sparsity. ``str(report)`` is a table."""

    entries: dict[str, TensorStats] = field(default_factory=dict)

    @property
    def tensors(self) -> dict[str, float]:
        """``"module.param"`` -> that tensor's sparsity (fraction of zeros, in [0, 1])."""
        return {name: stats.sparsity for name, stats in self.entries.items()}

    @property
    def global_sparsity(self) -> float:
        """Fraction of zeros over every tensor in the report."""
        total = sum(s.numel for s in self.entries.values())
        return sum(s.zeros for s in self.entries.values()) / total if total else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "global_sparsity": self.global_sparsity,
            "tensors": {
                name: {
                    "shape": list(s.shape),
                    "numel": s.numel,
                    "zeros": s.zeros,
                    "sparsity": s.sparsity,
                    "pruned": s.pruned,
                    "predicted": s.predicted,
                }
                for name, s in self.entries.items()
            },
        }

    def __str__(self) -> str:
        show_predicted = any(s.predicted is not None for s in self.entries.values())
        headers = ["tensor", "shape", "numel", "zeros", "sparsity"] + (["predicted"] if show_predicted else [])
        rows = []
        for s in self.entries.values():
            row = [
                s.name + ("" if s.pruned else " (dense)"),
                _shape(s.shape),
                f"{s.numel:,}",
                f"{s.zeros:,}",
                _pct(s.sparsity),
            ]
            if show_predicted:
                row.append(_pct(s.predicted))
            rows.append(row)
        total = sum(s.numel for s in self.entries.values())
        zeros = sum(s.zeros for s in self.entries.values())
        rows.append(
            ["total", "", f"{total:,}", f"{zeros:,}", _pct(self.global_sparsity)] + ([""] if show_predicted else [])
        )
        return table(headers, rows, right={2, 3, 4, 5})


def collect(
    model: nn.Module,
    names: Iterable[str] | None = None,
    predicted: dict[str, float | None] | None = None,
    zeros: dict[str, int] | None = None,
) -> Report:
    """A report on the tensors called ``names`` (``"module.param"``), or, when ``names`` is None, on
    every pruned tensor of ``model`` — or every parameter if none is pruned. ``zeros`` are counts the
    caller already has (the engine counts the masks it makes)."""
    found: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}  # every name, tied ones included
    if names is not None:  # look the named tensors up, without walking the whole model
        for name in names:
            module_name, _, pname = name.rpartition(".")
            try:
                module = model.get_submodule(module_name)
            except AttributeError:
                continue
            for param, tensor, mask in _tensors(module):
                if param == pname:
                    found[name] = (tensor, mask)
        wanted = list(found)
    else:
        first: dict[int, str] = {}  # each tensor's first name
        for module_name, module in model.named_modules():
            for pname, tensor, mask in _tensors(module):
                name = f"{module_name}.{pname}" if module_name else pname
                found[name] = (tensor, mask)
                first.setdefault(id(tensor), name)
        wanted = [n for n in first.values() if found[n][1] is not None] or list(first.values())
    entries = {}
    for name in wanted:  # count only what is reported
        tensor, mask = found[name]
        count = (zeros or {}).get(name)
        if count is None:
            counted = mask if mask is not None else tensor.detach()  # zeros of the mask, else of the values
            count = counted.numel() - int(torch.count_nonzero(counted))
        entries[name] = TensorStats(name, tuple(tensor.shape), count, mask is not None, (predicted or {}).get(name))
    return Report(entries)


def _tensors(module: nn.Module) -> Iterable[tuple[str, torch.Tensor, torch.Tensor | None]]:
    for pname, param in module._parameters.items():
        if param is None:
            continue
        base = pname.removesuffix("_orig")
        mask = module._buffers.get(base + "_mask") if pname.endswith("_orig") else None
        yield (base if mask is not None else pname), param, mask


def sparsity(model: nn.Module) -> Report:
    """How sparse ``model`` is: every pruned tensor (by prunespec or torch), or, for a model with no
    masks (dense, or finalized), every parameter counted by its zero values."""
    with torch.no_grad():
        return collect(model)


# --- tables ----------------------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: set[int] | None = None) -> str:
    """A plain-text table with aligned columns (``right``: indexes of right-aligned columns)."""
    right = right or set()
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            str(c).rjust(w) if i in right else str(c).ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=False))
        ).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def _pct(value: float | None) -> str:
    return "?" if value is None else f"{100 * value:.2f}%"


def _shape(shape: Sequence[int]) -> str:
    return "x".join(str(d) for d in shape) or "scalar"


def format_plan(plan: Plan) -> str:
    """The plan as people read it: one line per step, then the predicted totals and the warnings."""
    headers = ["#", "rule", "tensor", "shape", "method", "how much", "scope", "sparsity", "selected by"]
    rows = []
    for i, step in enumerate(plan.steps):
        how = (
            f"amount {step.amount}"
            if step.amount is not None
            else (f"sparsity {step.sparsity}" if step.sparsity is not None else "-")
        )
        options = ", ".join(f"{k}={v}" for k, v in step.options.items())
        approx = "" if step.exact else "~"
        tied = (
            f" (tied: {', '.join(f'{m}.{p}' if m else p for m, p in step.tensor.aliases)})"
            if step.tensor.aliases
            else ""
        )
        rows.append(
            [
                str(i),
                step.rule,
                step.tensor.name + tied,
                _shape(step.tensor.shape),
                step.method + (f"({options})" if options else ""),
                how,
                step.scope,
                f"{_pct(step.before)} -> {approx}{_pct(step.after)}",
                step.selected_by,
            ]
        )
    out = [f"Plan: {len(plan.spec.rules)} rules, {len(plan.steps)} steps on {len(plan.tensors)} tensors", ""]
    out.append(table(headers, rows, right={0}))
    total = sum(numel for numel, _, _ in plan.tensors.values())
    predicted = plan.global_sparsity
    exact = all(exact for _, _, exact in plan.tensors.values())
    if predicted is None:
        out.append(f"\nPredicted: not known in advance (a method without an amount decides), {total:,} entries.")
    else:
        mark = "" if exact else "~"
        out.append(
            f"\nPredicted: {mark}{_pct(predicted)} of {total:,} entries in the selected tensors"
            + ("" if exact else " (~: estimate; the split depends on the values)")
        )
    if plan.spec.seed is not None:
        out.append(f"Seed: {plan.spec.seed}")
    if plan.spec.finalize:
        out.append("Finalize: pruning is made permanent after apply")
    if plan.warnings:
        out.append("Warnings:")
        out += [f"  - {w}" for w in plan.warnings]
    return "\n".join(out)
