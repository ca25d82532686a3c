"""Planning a ``group`` rule: the selected modules' coupled groups, and what the rule prunes of each.

The planner hands over the modules a rule selects; this finds each one's group through
:mod:`prunespec.structures`, counts the units each group has pruned already (a unit every member's
mask prunes whole), and predicts what the rule leaves: exact for ``scope: local`` (each group on its
own), a total for ``scope: global`` (groups ranked together; the split is known once scored).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import groups, structures
from .groups import Group
from .layout import mask as mask_of
from .layout import original
from .masks import to_prune
from .spec import Rule

Problem = tuple[tuple[str | int, ...], str, str | None]  # (document path, message, hint)

_FOUND_AS = {
    "channels": "an MLP (gate_proj/up_proj/down_proj; fc1/fc2; c_fc/c_proj; intermediate.dense/output.dense)",
    "heads": "an attention module (q_proj/k_proj/v_proj/o_proj with head_dim; BERT's self.query/key/value with "
    "output.dense; GPT-2's c_attn/c_proj)",
}


@dataclass(frozen=True)
class GroupPlan:
    """One group a rule prunes: its units, how many were pruned before, and how many after (None for a
    global rule until the groups are scored); entries counts the members' entries (weights, biases)."""

    rule_index: int
    rule: str
    group: Group
    already: int
    pruned: int | None
    entries: int
    entries_after: int | None
    selected_by: str
    macs: int = 0  # multiply-accumulates of the members' weights, per token (known structures) or per example
    macs_after: int | None = None
    macs_per: str = "token"

    @property
    def kept(self) -> int | None:
        return None if self.pruned is None else self.group.size - self.pruned

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule_index": self.rule_index,
            "rule": self.rule,
            "kind": self.group.kind,
            "name": self.group.name,
            "structure": self.group.structure,
            "units": self.group.size,
            "pruned_before": self.already,
            "pruned_after": self.pruned,
            "members": [
                {
                    "tensor": m.tensor,
                    "dim": m.dim,
                    "width": m.width,
                    "offset": m.offset,
                    "role": m.role,
                    "block": m.block,
                }
                for m in self.group.members
            ],
            "entries": self.entries,
            "entries_after": self.entries_after,
            "macs": self.macs,
            "macs_after": self.macs_after,
            "macs_per": self.macs_per,
            "selected_by": self.selected_by,
        }


def already_pruned(modules: dict[str, nn.Module], group: Group) -> torch.Tensor:
    """Units every member's mask in the model prunes whole (bool per unit)."""
    return groups.pruned_whole(group, lambda member: mask_of(modules[member.module], member.param))


def entries_after(
    modules: dict[str, nn.Module], group: Group, pruned: int, weights: Mapping[str, int] | None = None
) -> int | None:
    """The members' entries left once ``pruned`` units are removed (None: it depends on which, as
    for blocks of different sizes). With ``weights`` (module -> positions it computes at), the
    multiply-accumulates of the weight members instead: entries times positions."""
    total = 0
    per_unit = torch.zeros(group.size, dtype=torch.float64)
    for member in group.members:
        if member.role == "sliced" or (weights is not None and member.role != "scored"):
            continue
        tensor = original(modules[member.module], member.param)
        assert tensor is not None
        factor = 1 if weights is None else weights.get(member.module, 1)
        total += tensor.numel() * factor
        per_unit += groups.unit_entries(group, member, tensor) * factor
    if pruned == 0:
        return total
    if not bool((per_unit == per_unit[0]).all()):
        return None
    return total - int(per_unit[0]) * pruned


class Traces:
    """The traced channel groups of one model, found once per plan from the example inputs."""

    def __init__(self, model: nn.Module, example: Any) -> None:
        self.model, self.example = model, example
        self._found: Any = None
        self._positions: dict[str, int] | None = None

    def analysis(self) -> Any:
        from .discovery import analyze  # fx is only loaded for models that need it

        if self._found is None:
            example = tuple(self.example) if isinstance(self.example, list) else self.example
            self._found = analyze(self.model, example)
        return self._found

    def positions(self) -> dict[str, int]:
        """Per Conv or Linear module: the output positions it computes per example (H*W for a Conv2d,
        tokens for a Linear on sequences), from the output shapes the trace ran the example to."""
        if self._positions is None:
            self._positions = _positions(self.model, self.analysis().outputs)
        return self._positions


def _positions(model: nn.Module, outputs: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    """Per Conv or Linear module: output positions per example, from its traced output shape."""
    found: dict[str, int] = {}
    for name, module in model.named_modules():
        shape = outputs.get(name)
        if shape is None or len(shape) < 2:
            continue
        if isinstance(module, nn.modules.conv._ConvNd):
            channels = shape[1]
        elif isinstance(module, nn.Linear):
            channels = shape[-1]
        else:
            continue
        found[name] = math.prod(shape) // max(shape[0] * channels, 1)
    return found


def _output_dim(module: nn.Module) -> int:
    transposed = isinstance(module, (nn.modules.conv._ConvTransposeNd, nn.Embedding))
    return 1 if transposed else 0


def _traced(
    rule: Rule, index: int, selected: Sequence[tuple[str, nn.Module, str]], traces: Traces | None
) -> tuple[list[tuple[Group, str]], list[Problem], list[str]]:
    """The traced groups whose producers (the layers whose outputs are the channels) the rule selects."""
    from .discovery import DiscoveryError

    label = rule.label(index)
    path = ("rules", index, "select")
    if traces is None or traces.example is None:
        message = (
            f"{label}: the selected modules are no known structure ({_FOUND_AS['channels']}), so their channel "
            "groups are traced from example inputs, and none were given"
        )
        return [], [(path, message, "Python: prunespec.plan/apply(..., data=[batch]); CLI: --data file.py:factory")], []
    try:
        analysis = traces.analysis()
    except DiscoveryError as exc:
        hint = "select known structures (transformer MLPs, attention modules, blocks) for models fx cannot trace"
        return [], [(path, f"{label}: the model's channel groups cannot be traced: {exc}", hint)], []
    names = {name: by for name, _, by in selected}
    modules = dict(traces.model.named_modules())
    out: list[tuple[Group, str]] = []
    for group in analysis.groups:
        producers = {
            m.module
            for m in group.members
            if m.role == "scored" and m.param == "weight" and m.dim == _output_dim(modules[m.module])
        }
        if producers and producers <= set(names):
            out.append((group, names[sorted(producers)[0]]))
    grouped = {m.module for g, _ in out for m in g.members}
    warnings = [
        f"{label}: {name}: not pruned: {analysis.unsupported.get(name, 'its channels are in no group it produces')}"
        for name in names
        if name not in grouped
    ]
    if not out:
        shown = "; ".join(warnings[:3]) or "no group has all its producers selected"
        return (
            [],
            [(path, f"{label}: selects no channel group: {shown}", "select every layer writing into a group")],
            [],
        )
    return out, [], warnings


def find_groups(
    model: nn.Module,
    rule: Rule,
    index: int,
    selected: Sequence[tuple[str, nn.Module, str]],
    traces: Traces | None = None,
) -> tuple[list[tuple[Group, str]], list[Problem], list[str]]:
    """The selected modules' groups (with what selected each), the problems finding them, and
    warnings (selected modules a traced rule leaves alone, and why)."""
    assert rule.group is not None
    kind = rule.group.unit
    label = rule.label(index)
    if kind == "channels" and all(structures.find(kind, name, module) is None for name, module, _ in selected):
        return _traced(rule, index, selected, traces)
    if kind == "blocks":
        found = structures.block_group(model, [name for name, _, _ in selected])
        if isinstance(found, str):
            return (
                [],
                [
                    (
                        ("rules", index, "select"),
                        f"{label}: {found}",
                        "select the decoder layers, e.g. names: ['model.layers.*']",
                    )
                ],
                [],
            )
        return [(found, selected[0][2])], [], []
    out: list[tuple[Group, str]] = []
    missing: list[str] = []
    for name, module, by in selected:
        group = structures.find(kind, name, module)
        if group is None:
            missing.append(f"{name or 'the model'} ({type(module).__name__})")
        else:
            out.append((group, by))
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        message = f"{label}: {shown}: not {_FOUND_AS[kind]}, so it has no {kind} prunespec can prune as groups"
        hint = "select the MLP or attention modules themselves, e.g. names: ['model.layers.*.mlp']"
        return [], [(("rules", index, "select"), message, hint)], []
    return out, [], []


def plan_rule(
    model: nn.Module,
    rule: Rule,
    index: int,
    selected: Sequence[tuple[str, nn.Module, str]],
    traces: Traces | None = None,
) -> tuple[list[GroupPlan], list[Problem], list[str]]:
    """What ``rule`` (a ``group`` rule) does to each group of the modules it selects (with the
    problems and warnings of :func:`find_groups`)."""
    assert rule.group is not None
    found, problems, warnings = find_groups(model, rule, index, selected, traces)
    if problems:
        return [], problems, warnings
    modules = dict(model.named_modules())
    options = rule.group
    least = 0 if options.unit == "blocks" and options.min == 0 else options.min
    label = rule.label(index)
    done = [int(already_pruned(modules, g).sum()) for g, _ in found]
    plans: list[GroupPlan] = []
    if rule.scope == "global" and options.unit != "blocks":
        size = sum(g.size for g, _ in found)
        left = size - sum(done)
        k = to_prune(rule.amount, rule.sparsity, left, size, sum(done))
        most = sum(g.size - groups.kept_count(g.size, g.size, options.round_to, least) for g, _ in found)
        if k is None or k > left or sum(done) + k > most:
            what = f"{k} more" if k is not None else str(rule.amount)
            message = f"{label}: {what} of {size} {options.unit} is more than the groups can lose (at most {most})"
            return (
                [],
                [(("rules", index, "amount"), message, f"group.min={least} keeps units in every group")],
                warnings,
            )
        for (group, by), d in zip(found, done, strict=True):
            entries = entries_after(modules, group, 0)
            assert entries is not None
            macs, per = _macs(modules, group, 0, traces)
            plans.append(GroupPlan(index, label, group, d, None, entries, None, by, macs or 0, None, per))
        return plans, [], warnings
    for (group, by), d in zip(found, done, strict=True):
        k = to_prune(rule.amount, rule.sparsity, group.size - d, group.size, d)
        if k is None or k > group.size - d:
            message = (
                f"{label}: {group.name}: amount={rule.amount} is more than the {group.size - d} {options.unit} left"
            )
            return (
                [],
                [(("rules", index, "amount"), message, f"use a count <= {group.size - d}, or a fraction")],
                warnings,
            )
        kept = groups.kept_count(group.size, d + k, options.round_to, least)
        pruned = max(d, group.size - kept)
        entries = entries_after(modules, group, 0)
        assert entries is not None
        after = entries_after(modules, group, pruned)
        macs, per = _macs(modules, group, 0, traces)
        macs_after, _ = _macs(modules, group, pruned, traces)
        plans.append(GroupPlan(index, label, group, d, pruned, entries, after, by, macs or 0, macs_after, per))
    return plans, [], warnings


def _macs(modules: dict[str, nn.Module], group: Group, pruned: int, traces: Traces | None) -> tuple[int | None, str]:
    """The group's weight multiply-accumulates left after ``pruned`` units: per example for a traced
    group (each layer's output positions, from the example inputs), per token otherwise."""
    if group.structure == "traced" and traces is not None and traces.example is not None:
        return entries_after(modules, group, pruned, traces.positions()), "example"
    return entries_after(modules, group, pruned, {}), "token"
