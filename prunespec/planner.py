"""Resolve a :class:`~prunespec.spec.Spec` against a model into a :class:`Plan`, without changing it.

The plan lists, in order, every (tensor, method) step the engine will run, with the sparsity each tensor
is predicted to reach. Everything that can be checked before touching the model is checked here:
selectors that match nothing, parameters that cannot be pruned, options that do not fit a tensor,
counts larger than what is left. All such problems are raised together as one
:class:`~prunespec.errors.PlanError`.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import calibration, distributed, group_planner, groups, selection
from .blocks import block_of, find_blocks
from .errors import Issue, PlanError, ShardingError
from .group_planner import GroupPlan
from .groups import Member
from .layout import base_name, is_pruned, original
from .layout import mask as mask_of
from .loader import owl_issues
from .masks import Channels, Entries, Unit, bounds_problem, budget_bounds, row_targets, to_prune, zeros
from .methods.base import MethodInfo
from .plugins import MethodRegistry, provider_hint
from .runtime import one_thread
from .selectors import nearest_names, nearest_types, params_hint, select_modules, why_nothing
from .spec import Rule, Spec

Allocations = Mapping[int, Mapping[str, float]]  # rule index -> {block name: sparsity}

Owner = tuple[str, str]  # (module name, parameter name)
Fingerprint = tuple[int, int, tuple[int, ...], int | None, int | None]  # ids and versions, shape


def fingerprint_of(module: nn.Module, pname: str) -> Fingerprint | None:
    """A tensor as it is now: its Parameter's identity and version (in-place writes such as optimizer
    steps bump it), shape, and its mask's identity and version."""
    param = original(module, pname)
    if param is None:
        return None
    mask = mask_of(module, pname)
    return (
        id(param),
        param._version,
        tuple(param.shape),
        None if mask is None else id(mask),
        None if mask is None else mask._version,
    )


def tensor_name(module: str, param: str) -> str:
    """``"features.0" + "weight"`` -> ``"features.0.weight"`` (the root module's params have no prefix)."""
    return f"{module}.{param}" if module else param


@dataclass(frozen=True)
class TensorRef:
    """One prunable tensor: the owner a rule selected it through, and any other owners (tied weights)."""

    module: str
    param: str
    shape: tuple[int, ...]
    aliases: tuple[Owner, ...] = ()

    @property
    def name(self) -> str:
        return tensor_name(self.module, self.param)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def owners(self) -> tuple[Owner, ...]:
        return ((self.module, self.param), *self.aliases)


@dataclass(frozen=True)
class Step:
    """Prune one tensor with one method, as one rule says."""

    rule_index: int
    rule: str
    tensor: TensorRef
    method: str
    options: Mapping[str, Any]
    amount: float | int | None
    sparsity: float | None
    scope: str
    selected_by: str
    max_sparsity: float | None
    min_sparsity: float | None
    before: float | None  # predicted sparsity of the tensor before this step
    after: float | None  # predicted after; None when the method's effect cannot be predicted
    exact: bool  # False when ``after`` is an estimate (global split, structured after unstructured)
    block: str | None = None  # the block the tensor's module lies in (found when the plan needs data)
    group: int | None = None  # for a `group` rule: the index of the tensor's group in ``Plan.groups``

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule_index": self.rule_index,
            "rule": self.rule,
            "tensor": self.tensor.name,
            "shape": list(self.tensor.shape),
            "tied_with": [tensor_name(*owner) for owner in self.tensor.aliases],
            "method": self.method,
            "options": dict(self.options),
            "amount": self.amount,
            "sparsity": self.sparsity,
            "scope": self.scope,
            "max_sparsity": self.max_sparsity,
            "min_sparsity": self.min_sparsity,
            "global_group": self.rule_index if self.scope == "global" else None,
            "selected_by": self.selected_by,
            "predicted_before": self.before,
            "predicted_after": self.after,
            "exact": self.exact,
            "block": self.block,
            "group": self.group,
        }


@dataclass(frozen=True)
class OwlRule:
    """How an OWL rule's `sparsity` is split over the blocks: ``target`` is their mean; ``allocated``
    each block's sparsity (None until allocations from the calibration data are given to make_plan)."""

    rule_index: int
    rule: str
    target: float
    m: float
    lam: float
    blocks: tuple[str, ...]  # the blocks holding the rule's tensors, in module order
    outside: tuple[str, ...]  # the rule's tensors in no block: they keep the target
    allocated: Mapping[str, float] | None = None

    @property
    def bounds(self) -> tuple[float, float]:
        """The lowest and highest block sparsity: allocated, or the most OWL can give. Its sparsities
        spread over 2 * lam with mean ``target``, so n blocks lie within target +- 2 * lam * (n - 1) / n."""
        if self.allocated:
            return min(self.allocated.values()), max(self.allocated.values())
        n = len(self.blocks)
        reach = 2 * self.lam * (n - 1) / n if n else 0.0
        return max(0.0, self.target - reach), min(1.0, self.target + reach)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rule_index": self.rule_index,
            "rule": self.rule,
            "target": self.target,
            "m": self.m,
            "lambda": self.lam,
            "blocks": list(self.blocks),
            "outside": list(self.outside),
            "allocated": None if self.allocated is None else dict(self.allocated),
            "bounds": list(self.bounds),
        }


@dataclass
class Plan:
    """What applying a spec to a model will do. ``str(plan)`` is a table; ``to_dict()`` is JSON-able."""

    spec: Spec
    steps: list[Step]
    methods: Mapping[str, MethodInfo]
    warnings: list[str] = field(default_factory=list)
    # predicted final sparsity per tensor, and its size
    tensors: dict[str, tuple[int, float | None, bool]] = field(default_factory=dict)
    # global rules' per-tensor cuts, found while planning: the engine reuses them if they still hold
    cuts: dict[int, list[selection.Cut]] = field(default_factory=dict)
    # what the plan was made from: each tensor's Parameter and mask (identity, version, shape)
    fingerprint: dict[Owner, Fingerprint] = field(default_factory=dict)
    # the model's repeated blocks (found when a rule needs data; else empty) and the OWL rules' splits
    blocks: list[str] = field(default_factory=list)
    owl: list[OwlRule] = field(default_factory=list)
    # the coupled groups of `group` rules, in rule order (a grouped step's ``group`` indexes this)
    groups: list[GroupPlan] = field(default_factory=list)

    def stale(self, model: nn.Module) -> list[str]:
        """Why this plan no longer fits ``model`` (another model, or weights or masks changed since it
        was made), one line per tensor; empty when it still fits."""
        modules = dict(model.named_modules())
        problems = []
        for (module_name, pname), made in self.fingerprint.items():
            name = tensor_name(module_name, pname)
            module = modules.get(module_name)
            now = None if module is None else fingerprint_of(module, pname)
            if now is None or now[0] != made[0]:
                problems.append(f"{name}: not the tensor the plan was made for (another model?)")
            elif now != made:
                problems.append(f"{name}: its values or mask changed since the plan was made")
        return problems

    def units(self) -> list[list[Step]]:
        """Steps grouped as the engine runs them: a local step alone, a global rule's steps together, and
        a `group` rule's steps together."""
        units: list[list[Step]] = []
        for step in self.steps:
            if step.group is not None:
                if units and units[-1][0].group is not None and units[-1][0].rule_index == step.rule_index:
                    units[-1].append(step)
                else:
                    units.append([step])
            elif (
                step.scope == "global"
                and units
                and units[-1][0].scope == "global"
                and units[-1][0].group is None
                and (units[-1][0].rule_index == step.rule_index)
            ):
                units[-1].append(step)
            else:
                units.append([step])
        return units

    @property
    def needs_data(self) -> list[str]:
        """The rules that need calibration data (``prunespec.apply(..., data=...)``): those whose method
        reads calibration statistics, and OWL rules not yet allocated (their blocks' sparsities come from
        the data)."""
        owl = {o.rule_index for o in self.owl if o.allocated is None}
        labels: list[str] = []
        for step in self.steps:
            wanted = self.methods[step.method].capabilities.statistics or step.rule_index in owl
            if wanted and step.rule not in labels:
                labels.append(step.rule)
        return labels

    @property
    def uses_data(self) -> bool:
        """Whether calibration data is part of this plan: needed still, or OWL allocations came from it."""
        return bool(self.needs_data or self.owl)

    @property
    def global_sparsity(self) -> float | None:
        """Predicted fraction of zeros over every tensor the plan touches (None if not predictable)."""
        total = sum(numel for numel, _, _ in self.tensors.values())
        if not total or any(after is None for _, after, _ in self.tensors.values()):
            return None
        return sum(numel * (after or 0.0) for numel, after, _ in self.tensors.values()) / total

    def to_dict(self) -> dict[str, Any]:
        return {
            "steps": [step.to_dict() for step in self.steps],
            "tensors": {
                name: {"numel": numel, "predicted_sparsity": after, "exact": exact}
                for name, (numel, after, exact) in self.tensors.items()
            },
            "predicted_global_sparsity": self.global_sparsity,
            "warnings": list(self.warnings),
            "needs_data": self.needs_data,
            "seed": self.spec.seed,
            "finalize": self.spec.finalize,
            "calibration": {
                **self.spec.calibration.model_dump(mode="json"),
                "given": self.spec.calibration_given,
                "used": self.uses_data,
            },
            "blocks": list(self.blocks),
            "owl": [o.to_dict() for o in self.owl],
            "groups": [g.to_dict() for g in self.groups],
            "shrink": self.spec.shrink,
        }

    def __str__(self) -> str:
        from . import render

        return render.format_plan(self)


@dataclass
class _Virtual:
    """What the planner knows of one tensor as the steps go by."""

    numel: int
    shape: tuple[int, ...]
    pruned: float  # entries
    exact: bool
    units: dict[Unit, int] | None  # whole units pruned, per kind of unit (None: unknown after unstructured pruning)
    known: bool = True  # False once a method whose effect cannot be predicted ran
    mask: torch.Tensor | None = None  # the model's mask when planning started
    touched: bool = False  # a step of this plan changed it (so ``mask`` is no longer current)

    @property
    def sparsity(self) -> float:
        return self.pruned / self.numel if self.numel else 0.0


def _unprunable(param: torch.Tensor) -> str | None:
    """Why a Parameter cannot carry a prune mask, or None."""
    if param.is_meta:
        return "is on the meta device (it has no values): load the weights first (e.g. to_empty + load_state_dict)"
    if param.layout != torch.strided:
        return f"is a {param.layout} tensor; pruning works on dense tensors: convert it with .to_dense()"
    if param.is_quantized or not param.is_floating_point():
        return f"has dtype {param.dtype}; pruning works on floating-point weights: prune before quantizing"
    return None


def sharded_problem(
    info: MethodInfo, rule: Rule, sharding: distributed.Sharding, spec: Spec, module: nn.Module
) -> str | None:
    """Why ``rule`` cannot prune a DTensor laid out as ``sharding`` (each rank holding a part), or None."""
    caps = info.capabilities
    if rule.group is not None:
        return "group rules (structural pruning) do not work on DTensors yet"
    if caps.statistics and spec.calibration.sequential == "blocks":
        return "calibration.sequential: blocks does not work on DTensors yet (use true or false)"
    rows = info.per_row(rule.options) or any(rule.options.get(k) is not None for k in info.method.amount_replaced_by)
    if caps.statistics and rows and (not isinstance(module, nn.Linear) or sharding.sharded_dims - {0}):
        return (
            f"{info.name} compares entries within rows, which must lie whole on one rank (split a Linear along dim 0)"
        )
    if caps.updates_values:
        if not caps.shards:
            return f"{info.name} changes the kept weights and does not declare `shards = True` (work on a rank's part)"
        # such a method (sparsegpt) updates each row from the row alone: rows must not span ranks
        if not isinstance(module, nn.Linear) or sharding.sharded_dims - {0}:
            return (
                f"{info.name} changes the kept weights row by row, so rows must lie whole on one rank "
                "(split a Linear along dim 0)"
            )
    if not caps.shards:
        return (
            f"{info.name} computes masks from whole tensors; on a DTensor prunespec needs a method that scores "
            "entries elementwise or declares `shards = True`"
        )
    unit = info.units(rule.options)
    if not isinstance(unit, Entries):
        if rule.scope == "global":
            return f"{info.name} with scope: global ranks {unit.name} across tensors, not done on DTensors yet"
        dim = unit.dim % len(sharding.shape) if isinstance(unit, Channels) else None
        if dim is None or sharding.sharded_dims - {dim}:
            dims = ", ".join(map(str, sorted(sharding.sharded_dims)))
            return f"its {unit.name} span ranks (dim {dims} is split): prune along the split dim"
    elif rule.scope == "global" and not caps.scores:
        return f"{info.name} with scope: global ranks the group's tensors put together, not done on DTensors"
    return None


def make_plan(
    model: nn.Module,
    spec: Spec,
    methods: Mapping[str, MethodInfo],
    *,
    rules: Mapping[int, Rule] | None = None,
    allocations: Allocations | None = None,
    example: Any = None,
) -> Plan:
    """Resolve ``spec`` against ``model``. Raises PlanError listing every problem found.

    ``rules`` plans only those rules (by index in the spec, so errors keep their locations), each as
    given there: the Scheduler's update runs the rules that are due, at their current targets.

    ``allocations`` maps an OWL rule's index to each of its blocks' sparsity (see :mod:`prunespec.owl`):
    each tensor's step then aims at its block's sparsity (a tensor in no block keeps the rule's), and so
    do the predictions. Without them, an OWL rule's steps are planned at the rule's `sparsity`.

    ``example``: one batch of inputs, from which `group` rules on models without known structures
    (CNNs) trace their channel groups (:mod:`prunespec.discovery`).
    """
    with distributed.collective(distributed.sharded(model)):
        return _make_plan(model, spec, methods, rules, allocations, example)


def _make_plan(
    model: nn.Module,
    spec: Spec,
    methods: Mapping[str, MethodInfo],
    rules: Mapping[int, Rule] | None,
    allocations: Allocations | None,
    example: Any,
) -> Plan:
    chosen = list(enumerate(spec.rules)) if rules is None else sorted(rules.items())
    planner = _Planner(model, spec, methods, chosen, allocations or {}, example)
    for index, rule in chosen:
        planner.add_rule(index, rule)
    planner.check_allocations()
    if planner.issues:
        raise PlanError(sorted(planner.issues, key=lambda i: (i.line or 0, i.column or 0)))
    tensors = {
        planner.names[key]: (state.numel, state.sparsity if state.known else None, state.exact)
        for key, state in planner.state.items()
    }
    fingerprint: dict[Owner, Fingerprint] = {}
    for step in planner.steps:
        owner = (step.tensor.module, step.tensor.param)
        if owner not in fingerprint:
            made = fingerprint_of(planner.by_name[step.tensor.module], step.tensor.param)
            assert made is not None
            fingerprint[owner] = made
    return Plan(
        spec,
        planner.steps,
        methods,
        planner.warnings,
        tensors,
        planner.cuts,
        fingerprint,
        planner.blocks or [],
        planner.owl,
        planner.groups,
    )


class _Planner:
    def __init__(
        self,
        model: nn.Module,
        spec: Spec,
        methods: Mapping[str, MethodInfo],
        rules: Sequence[tuple[int, Rule]],
        allocations: Allocations,
        example: Any = None,
    ):
        self.spec = spec
        self.model = model
        self.traces = group_planner.Traces(model, example)
        self.groups: list[GroupPlan] = []
        self.methods = methods
        self.allocations = allocations
        self.owl: list[OwlRule] = []
        self.modules = list(model.named_modules())
        self.by_name = dict(self.modules)
        self.owners: dict[int, list[Owner]] = {}
        for name, module in self.modules:
            for pname, param in module._parameters.items():
                if param is None:
                    continue
                pname = base_name(module, pname)
                owners = self.owners.get(id(param))
                if owners is None:
                    self.owners[id(param)] = [(name, pname)]
                else:
                    owners.append((name, pname))
        self.state: dict[int, _Virtual] = {}
        self.names: dict[int, str] = {}
        self.steps: list[Step] = []
        self.cuts: dict[int, list[selection.Cut]] = {}
        self.issues: list[Issue] = []
        self.warnings: list[str] = []
        uses_data = any(
            rule.owl is not None or (rule.method in methods and methods[rule.method].capabilities.statistics)
            for _, rule in rules
        )
        self.blocks = self._find_blocks(model) if uses_data else None

    def _find_blocks(self, model: nn.Module) -> list[str]:
        """The model's blocks as `calibration.blocks` names them (or detected); a pattern that matches
        nothing is an issue."""
        pattern = self.spec.calibration.blocks
        try:
            blocks = find_blocks(model, pattern)
        except ValueError as exc:  # a Spec built without validation
            self.issue(("calibration", "blocks"), str(exc))
            return []
        if pattern is not None and not blocks:
            near = nearest_names(pattern, self.modules)
            hint = (
                f"nearest: {', '.join(near)}" if near else "run `prunespec plan` with `names: ['**']` to list modules"
            )
            self.issue(("calibration", "blocks"), f"calibration.blocks {pattern!r} matches no module", hint)
        elif not blocks and self.spec.calibration.sequential == "blocks":
            self.issue(
                ("calibration", "sequential"),
                "`blocks` calibrates the model's repeated blocks, and none were found",
                "name them with calibration.blocks (e.g. `model.layers.*`), or use sequential: true",
            )
        return blocks

    def issue(self, path: tuple[str | int, ...], message: str, hint: str | None = None) -> None:
        self.issues.append(self.spec.source.issue(path, message, hint))

    def add_rule(self, index: int, rule: Rule) -> None:
        label = rule.label(index)
        info = self.methods.get(rule.method)
        if info is None:  # a Spec built against another registry
            registry = self.methods if isinstance(self.methods, MethodRegistry) else None
            self.issue(
                ("rules", index, "method"), f"unknown method {rule.method!r}", provider_hint(rule.method, registry)
            )
            return
        if rule.owl is not None:
            problems = owl_issues(index, rule, info, self.spec.source)
            if problems:  # a Spec that did not go through load_spec
                self.issues += problems
                return
        if rule.group is not None:
            self._grouped(index, rule, info)
            return
        if calibration.BLOCK_LEVEL & set(info.capabilities.statistics):
            self.issue(
                ("rules", index, "method"),
                f"{label}: {info.name!r} scores whole blocks",
                "use it with group: {unit: blocks}, selecting the blocks (e.g. names: ['model.layers.*'])",
            )
            return
        targets = self._targets(index, rule)
        if targets is None:
            return
        targets = [t for t in targets if self._shardable(index, rule, info, t[0], t[1])]
        if not targets:
            if not rule.optional:
                self.issue(
                    ("rules", index, "select"),
                    f"{label} selects no tensor: no selected module has a parameter named "
                    + " or ".join(repr(p) for p in rule.select.params),
                    params_hint(rule.select.params, self.modules),
                )
            return
        if rule.amount == 1 and isinstance(rule.amount, int):
            self.warnings.append(f"{label}: `amount: 1` is a count (one entry or channel); write 1.0 to prune all")
        schedule = rule.schedule or self.spec.schedule
        if schedule is not None:
            self.warnings.append(
                f"{label}: has a schedule ({schedule.curve}, {schedule.unit} {schedule.start:g} to {schedule.end:g}); "
                "applied at once, it prunes to its final `sparsity` (prunespec.Scheduler prunes gradually in training)"
            )
        if rule.owl is not None:
            self._owl(index, rule, info, targets)
        elif rule.scope == "global":
            self._global(index, rule, info, targets)
        else:
            for ref, param, by in targets:
                self._local(index, rule, info, ref, param, by)

    # --- group rules ---------------------------------------------------------------------------

    def _grouped(self, index: int, rule: Rule, info: MethodInfo) -> None:
        """A `group` rule: its groups (group_planner), then one step per member tensor."""
        caps = info.capabilities
        if not (caps.scores and info.unit == "entries" and caps.takes_amount) or caps.updates_values:
            self.issue(
                ("rules", index, "method"),
                f"{rule.label(index)}: a `group` rule ranks units by the sum of the method's per-entry scores; "
                f"{info.name!r} gives no per-entry scores",
                "use l1_unstructured (magnitude)",
            )
            return
        if rule.scope == "global" and not info.supports_global:
            self.issue(
                ("rules", index, "scope"),
                f"{rule.label(index)}: {info.name!r} does not rank across tensors (scope: global); its scores of "
                "different layers are not comparable",
                "use scope: local (each group on its own)",
            )
            return
        assert rule.group is not None
        if calibration.BLOCK_LEVEL & set(caps.statistics) and rule.group.unit != "blocks":
            self.issue(
                ("rules", index, "method"),
                f"{rule.label(index)}: {info.name!r} scores whole blocks, not {rule.group.unit}",
                "use group: {unit: blocks}",
            )
            return
        if rule.amount is None and rule.sparsity is None:
            self.issue(("rules", index), f"{rule.label(index)}: give `amount` or `sparsity` (of the units)")
            return
        selected = self._selected(index, rule)
        if selected is None:
            return
        plans, problems, warnings = group_planner.plan_rule(self.model, rule, index, selected, self.traces)
        for path, message, hint in problems:
            self.issue(path, message, hint)
        self.warnings += warnings
        for plan in plans:
            self.groups.append(plan)
            for member in plan.group.members:
                if member.role == "sliced":
                    continue
                module = self.by_name[member.module]
                param = self._parameter(index, member.module, module, member.param)
                if param is None:
                    continue
                aliases = tuple(o for o in self.owners.get(id(param), []) if o != (member.module, member.param))
                ref = TensorRef(member.module, member.param, tuple(param.shape), aliases)
                self.names.setdefault(id(param), ref.name)
                state = self._virtual(ref, param)
                before = state.sparsity if state.known else None
                covered = self._covered(plan, member, param)
                if covered is not None and not state.touched and state.mask is None:
                    state.pruned = float(covered)
                else:  # on top of earlier masks, or before the groups are scored: not predicted
                    state.known = state.exact = False
                state.units = None
                self._step(index, rule, ref, plan.selected_by, before, state, len(self.groups) - 1)

    def _covered(self, plan: GroupPlan, member: Member, param: torch.Tensor) -> int | None:
        """Entries of ``member`` the plan's pruned units cover (None: not known before scoring)."""
        if plan.pruned is None:
            return None
        if member.block is not None:
            return None if 0 < plan.pruned < plan.group.size else (param.numel() if plan.pruned else 0)
        return int(groups.unit_entries(plan.group, member, param)[0]) * plan.pruned

    # --- OWL -----------------------------------------------------------------------------------

    def _owl(
        self, index: int, rule: Rule, info: MethodInfo, targets: list[tuple[TensorRef, torch.Tensor, str]]
    ) -> None:
        """An OWL rule: each tensor at its block's allocated sparsity (the rule's, until allocated)."""
        assert rule.owl is not None and rule.sparsity is not None  # owl_issues checked both
        blocks = self.blocks or []
        where = {ref.name: block_of(ref.module, blocks) for ref, _, _ in targets}
        held = tuple(b for b in blocks if b in set(where.values()))
        outside = tuple(name for name, block in where.items() if block is None)
        label = rule.label(index)
        if not held:
            pattern = self.spec.calibration.blocks
            if not blocks and pattern is None:
                self.issue(
                    ("rules", index, "owl"),
                    f"{label}: owl allocates sparsity per block, and this model has no repeated blocks prunespec "
                    "can find (an nn.ModuleList of 2 or more modules of one class)",
                    "name them: calibration: {blocks: 'model.layers.*'}",
                )
            elif blocks:
                self.issue(
                    ("rules", index, "owl"),
                    f"{label}: owl allocates sparsity per block, and none of the rule's tensors lies in a block "
                    f"({', '.join(blocks[:3])}{', ...' if len(blocks) > 3 else ''})",
                    "select tensors inside the blocks, or name other blocks in calibration.blocks",
                )
            return
        if len(held) == 1:
            self.warnings.append(
                f"{label}: owl finds one block ({held[0]}): every tensor keeps sparsity {rule.sparsity:g}"
            )
        allocated = self.allocations.get(index)
        if allocated is not None:
            allocated = self._allocated(index, label, held, allocated)
            if allocated is None:
                return
        self.owl.append(OwlRule(index, label, rule.sparsity, rule.owl.m, rule.owl.lam, held, outside, allocated))
        for ref, param, by in targets:
            block = where[ref.name]
            sparsity = rule.sparsity if allocated is None or block is None else allocated[block]
            aimed = rule if sparsity == rule.sparsity else rule.model_copy(update={"sparsity": sparsity})
            self._local(index, aimed, info, ref, param, by)

    def _allocated(
        self, index: int, label: str, held: tuple[str, ...], given: Mapping[str, float]
    ) -> dict[str, float] | None:
        """The allocations given for rule ``index``, checked against its blocks (None after an issue)."""
        missing = [b for b in held if b not in given]
        extra = [b for b in given if b not in held]
        wrong = [
            b
            for b, s in given.items()
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not (0 <= s <= 1 and math.isfinite(s))
        ]
        problems = []
        if missing:
            problems.append(f"no sparsity for {', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}")
        if extra:
            problems.append(
                f"{', '.join(map(str, extra[:3]))} {'is' if len(extra) == 1 else 'are'} not among its blocks"
            )
        if wrong:
            problems.append(f"{wrong[0]}: {given[wrong[0]]!r} is not a sparsity in [0, 1]")
        if problems:
            self.issue(
                ("rules", index, "owl"),
                f"{label}: the allocations given to make_plan do not fit the rule's blocks: " + "; ".join(problems),
                f"give one sparsity for each of its {len(held)} blocks ({held[0]} ...), as prunespec.owl.allocate does",
            )
            return None
        return {b: float(given[b]) for b in held}

    def check_allocations(self) -> None:
        """Allocations given for a rule that is not an OWL rule of this plan are an issue."""
        planned = {o.rule_index for o in self.owl}
        for index in self.allocations:
            if index in planned:
                continue
            known = isinstance(index, int) and 0 <= index < len(self.spec.rules)
            rule = self.spec.rules[index] if known else None
            if rule is not None and rule.owl is not None:
                continue  # an OWL rule that failed for another reason, or was not planned: reported, or harmless
            what = (
                f"{rule.label(index)}, which has no `owl`"
                if rule is not None
                else f"rule index {index!r}, not in the spec"
            )
            self.issues.append(
                self.spec.source.issue(
                    ("rules", index) if rule is not None else (),
                    f"allocations were given to make_plan for {what}",
                    "give allocations only for rules with `owl`",
                )
            )

    # --- selection -----------------------------------------------------------------------------

    def _selected(self, index: int, rule: Rule) -> list[tuple[str, nn.Module, str]] | None:
        """The modules a rule selects, with what selected each; None after reporting why there are none."""
        select = rule.select
        try:
            selection = select_modules(self.modules, select.types, select.names, select.exclude, select.preset)
        except ValueError as exc:
            self.issue(("rules", index, "select"), str(exc))
            return None
        failed = False
        for key, entry_index, entry in selection.unmatched:
            path = ("rules", index, "select", key, entry_index)
            if key == "preset":
                if not rule.optional:
                    failed = True
                    self.issue(path[:-1], f"preset {entry!r} matches no module of this model")
            elif key == "exclude":
                self.warnings.append(f"{rule.label(index)}: exclude entry {entry!r} matches no module")
            elif not rule.optional:
                failed = True
                self.issue(path, f"{key} entry {entry!r} matches no module", self._nearest(key, entry))
        if failed:
            return None
        if not selection.modules:
            if not rule.optional:
                why, fix = why_nothing(selection)
                self.issue(("rules", index, "select"), f"{rule.label(index)} selects no module: {why}", fix)
            return None
        return list(selection.modules)

    def _targets(self, index: int, rule: Rule) -> list[tuple[TensorRef, torch.Tensor, str]] | None:
        select = rule.select
        selected = self._selected(index, rule)
        if selected is None:
            return None
        targets: list[tuple[TensorRef, torch.Tensor, str]] = []
        seen: set[int] = set()
        found: set[str] = set()
        for name, module, by in selected:
            for pname in select.params:
                param = self._parameter(index, name, module, pname)
                if param is None:
                    continue
                found.add(pname)
                if id(param) in seen:
                    self.warnings.append(
                        f"{rule.label(index)}: {tensor_name(name, pname)} is tied to a tensor this rule "
                        "already prunes; it is pruned once"
                    )
                    continue
                seen.add(id(param))
                aliases = tuple(o for o in self.owners.get(id(param), []) if o != (name, pname))
                ref = TensorRef(name, pname, tuple(param.shape), aliases)
                self.names.setdefault(id(param), ref.name)
                targets.append((ref, param, by))
        if targets and not rule.optional:
            for i, pname in enumerate(select.params):
                if pname not in found:
                    have = sorted({p.removesuffix("_orig") for _, m, _ in selected for p in m._parameters})
                    near = difflib.get_close_matches(pname, have, n=3, cutoff=0.5)
                    hint = f"nearest: {', '.join(near)}" if near else f"they have: {', '.join(have) or 'none'}"
                    self.issue(
                        ("rules", index, "select", "params", i),
                        f"params entry {pname!r} is a parameter of none of the selected modules",
                        hint,
                    )
        return targets

    def _nearest(self, key: str, entry: str) -> str:
        if key == "names" and entry.startswith("module."):
            return "names are relative to the model given; drop the `module.` prefix"
        near = nearest_types(entry, self.modules) if key == "types" else nearest_names(entry, self.modules)
        return f"nearest: {', '.join(near)}" if near else "run `prunespec plan` with `names: ['**']` to list modules"

    def _parameter(self, index: int, name: str, module: nn.Module, pname: str) -> torch.Tensor | None:
        param = module._parameters.get(pname)
        if param is None and is_pruned(module, pname):
            param = module._parameters[pname + "_orig"]
        elif param is not None:
            taken = [n for n in (pname + "_orig", pname + "_mask") if n in module._parameters or n in module._buffers]
            if taken:
                self.issue(
                    ("rules", index, "select", "params"),
                    f"{tensor_name(name, pname)}: the module already has {' and '.join(map(repr, taken))}, which "
                    "pruning would replace (torch's layout names them so)",
                    "rename that attribute of the model, or leave this tensor out",
                )
                return None
        if param is not None:
            problem = _unprunable(param)
            if problem:
                self.issue(("rules", index, "select", "params"), f"{tensor_name(name, pname)} {problem}")
                return None
            return param
        if pname in module._buffers or pname in getattr(module, "parametrizations", {}):
            kind = "a buffer" if pname in module._buffers else "a parametrized tensor"
            self.issue(
                ("rules", index, "select", "params"),
                f"{tensor_name(name, pname)} is {kind}, not a Parameter; only Parameters can be pruned",
            )
        return None

    # --- prediction ----------------------------------------------------------------------------

    def _virtual(self, ref: TensorRef, param: torch.Tensor) -> _Virtual:
        key = id(param)
        if key not in self.state:
            mask = mask_of(self.by_name[ref.module], ref.param)
            pruned = 0 if mask is None else zeros(mask)
            self.state[key] = _Virtual(ref.numel, ref.shape, pruned, True, {}, mask=mask)
        return self.state[key]

    def _pruned_units(self, state: _Virtual, unit: Unit) -> int | None:
        """Whole units the tensor has pruned when this step runs (None: not known)."""
        if isinstance(unit, Entries):
            return round(state.pruned)
        if state.units is None:
            return None
        if unit not in state.units:
            state.units[unit] = 0 if state.mask is None else unit.pruned(state.mask)
        return state.units[unit]

    def _step(
        self,
        index: int,
        rule: Rule,
        ref: TensorRef,
        by: str,
        before: float | None,
        state: _Virtual,
        group: int | None = None,
    ) -> None:
        state.touched = True
        after = state.sparsity if state.known else None
        self.steps.append(
            Step(
                index,
                rule.label(index),
                ref,
                rule.method,
                dict(rule.options),
                rule.amount,
                rule.sparsity,
                rule.scope,
                by,
                rule.max_sparsity,
                rule.min_sparsity,
                before,
                after,
                state.exact,
                None if self.blocks is None else block_of(ref.module, self.blocks),
                group,
            )
        )

    def _count(
        self, index: int, rule: Rule, what: str, remaining: int, total: int, pruned: float, unit: str
    ) -> int | None:
        """Units this rule prunes now, or None after reporting why it cannot."""
        k = to_prune(rule.amount, rule.sparsity, remaining, total, pruned)
        if k is None or rule.sparsity is not None:
            return k
        if k > remaining:
            self.issue(
                ("rules", index, "amount"),
                f"{what}: amount={rule.amount} is more than the {remaining} {unit} left to prune",
                f"use a count <= {remaining}, or a fraction such as 0.5",
            )
            return None
        return k

    def _local(self, index: int, rule: Rule, info: MethodInfo, ref: TensorRef, param: torch.Tensor, by: str) -> None:
        if not self._fits(index, rule, info, ref):
            return
        state = self._virtual(ref, param)
        before = state.sparsity if state.known else None
        if not info.needs_amount(rule.options):
            # A method without an amount decides alone how much it prunes: nothing to predict.
            state.known = state.exact = False
            state.units = None
            self._step(index, rule, ref, by, before, state)
            return
        unit = info.units(rule.options)
        if isinstance(unit, Entries) and info.per_row(rule.options) and len(ref.shape) == 2:
            self._per_row(index, rule, ref, by, before, state)
            return
        if isinstance(unit, Entries):
            remaining = state.numel - round(state.pruned)
            k = self._count(index, rule, f"tensor {ref.name}", remaining, state.numel, state.pruned, "entries")
            if k is None:
                return
            state.pruned += k
            if k:
                state.units = None
            self._step(index, rule, ref, by, before, state)
            return
        total = unit.count(ref.shape)
        done = self._pruned_units(state, unit)
        known = done is not None
        done = done or 0
        k = self._count(index, rule, f"tensor {ref.name}", total - done, total, done, unit.name)
        if k is None:
            return
        per_unit = state.numel // total if total else 0
        # exact while every pruned entry lies in a whole pruned unit of this kind
        if k == 0:
            pass
        elif state.exact and known and round(state.pruned) == done * per_unit:
            state.pruned = (done + k) * per_unit
        else:
            alive = state.numel - state.pruned
            state.pruned += k * alive / max(total - done, 1)
            state.exact = False
        if state.units is not None:
            state.units = {unit: done + k}  # other kinds of unit are not known once this one changed
        self._step(index, rule, ref, by, before, state)

    def _per_row(self, index: int, rule: Rule, ref: TensorRef, by: str, before: float | None, state: _Virtual) -> None:
        """A step whose amount applies to each row on its own: exact from the rows' masks while no earlier
        step of this plan changed them, else an estimate."""
        transposed = calibration.transposed(self.by_name[ref.module])
        rows, row_len = ref.shape[::-1] if transposed else ref.shape
        if state.touched or not state.exact:
            k = self._count(
                index,
                rule,
                f"tensor {ref.name}",
                state.numel - round(state.pruned),
                state.numel,
                state.pruned,
                "entries",
            )
            if k is None:
                return
            state.pruned = min(float(state.numel), state.pruned + k)
            state.exact = False
        else:
            mask = state.mask
            sharding = None if mask is None else distributed.sharding_of(mask)
            part = None if mask is None else distributed.local(mask)  # a DTensor's rows on this rank
            done = (
                [0] * rows
                if part is None
                else selection.row_counts(calibration.out_in(self.by_name[ref.module], part) == 0).tolist()
            )
            problem: ValueError | None = None
            try:
                targets = row_targets(rule.amount, rule.sparsity, done, row_len)
            except ValueError as exc:
                problem, targets = exc, []
            # every rank joins the sum, a rank with a problem too: the ranks' collectives stay in step
            total = distributed.reduce([sum(targets)], [sharding])[0]
            if problem is not None:
                hint = f"use a count <= {row_len - max(done)}"
                self.issue(("rules", index, "amount"), f"tensor {ref.name}: {problem}", hint)
                return
            state.pruned = float(total)
        state.units = None
        self._step(index, rule, ref, by, before, state)

    def _shardable(self, index: int, rule: Rule, info: MethodInfo, ref: TensorRef, param: torch.Tensor) -> bool:
        """Whether the rule can prune ``param`` where it is a DTensor (split across ranks); else an issue."""
        try:
            sharding = distributed.sharding_of(param)
        except ShardingError as exc:
            self.issue(("rules", index), f"tensor {ref.name}: {exc}")
            return False
        if sharding is None:
            return True
        problem = sharded_problem(info, rule, sharding, self.spec, self.by_name[ref.module])
        if problem:
            split = ", ".join(str(p) for p in sharding.placements)
            self.issue(
                ("rules", index, "method"),
                f"tensor {ref.name} is split across ranks ({split}): {problem}",
                "prune it before sharding it, or use a method that scores entries (l1_unstructured)",
            )
            return False
        return True

    def _fits(self, index: int, rule: Rule, info: MethodInfo, ref: TensorRef) -> bool:
        """Whether the method can prune this tensor; else an issue at the option or the rule."""
        shape = ref.shape
        if info.capabilities.statistics:
            module = self.by_name[ref.module]
            if calibration.transposed(module):
                shape = (ref.shape[1], ref.shape[0]) if len(ref.shape) == 2 else ref.shape
            elif not isinstance(module, nn.Linear):
                kind = type(module).__name__
                self.issue(
                    ("rules", index, "select"),
                    f"tensor {ref.name}: {info.name} reads calibration statistics of the module's input, but "
                    f"{ref.module or 'the model'} is a {kind}: calibration statistics are collected for "
                    "torch.nn.Linear layers (and transformers' Conv1D) only",
                    "select Linear layers only (types: [Linear])",
                )
                return False
        try:
            unit = info.units(rule.options)
        except Exception as exc:  # a plugin's units() failing on these options
            self.issue(("rules", index, "options"), f"tensor {ref.name}: {info.name}: {type(exc).__name__}: {exc}")
            return False
        misfit = unit.check(ref.shape)
        if misfit:
            path = ("rules", index, "options", misfit.option) if misfit.option else ("rules", index)
            self.issue(path, f"tensor {ref.name}: {info.name}: {misfit.message}")
            return False
        try:
            problem = info.method.check_tensor(shape, rule.options)  # (out, in) for a data-aware method
        except Exception as exc:
            problem = f"check_tensor failed: {type(exc).__name__}: {exc}"
        if problem:
            self.issue(("rules", index), f"tensor {ref.name}: {info.name}: {problem}")
            return False
        return True

    def _global(
        self, index: int, rule: Rule, info: MethodInfo, targets: list[tuple[TensorRef, torch.Tensor, str]]
    ) -> None:
        if not info.supports_global:
            self.issue(
                ("rules", index, "scope"),
                f"scope: global needs a method with an amount that scores what it prunes (or prunes entries); "
                f"{info.name!r} is {info.granularity}" + ("" if info.takes_amount else " and takes no amount"),
                "use l1_unstructured or random_unstructured, or scope: local",
            )
            return
        if not all(self._fits(index, rule, info, ref) for ref, _, _ in targets):
            return
        bounded = rule.max_sparsity is not None or rule.min_sparsity is not None
        if bounded and not info.gives_scores:
            self.issue(
                ("rules", index, "method"),
                f"max_sparsity/min_sparsity need a method that scores what it prunes; {info.name!r} does not",
                "use l1_unstructured",
            )
            return
        unit = info.units(rule.options)
        states = [self._virtual(ref, param) for ref, param, _ in targets]
        names = ", ".join(ref.name for ref, _, _ in targets[:3]) + (", ..." if len(targets) > 3 else "")
        group = f"global group of {len(targets)} tensors ({names})"
        if isinstance(unit, Entries):
            sizes = [s.numel for s in states]
            already = [round(s.pruned) for s in states]
        else:
            sizes = [unit.count(ref.shape) for ref, _, _ in targets]
            done = [self._pruned_units(s, unit) for s in states]
            already = [d or 0 for d in done]
            if any(d is None for d in done):
                for s in states:
                    s.exact = False
        total, pruned = sum(sizes), sum(already)
        k = self._count(index, rule, group, total - pruned, total, pruned, unit.name)
        if k is None:
            return
        low, high = budget_bounds(rule.min_sparsity, rule.max_sparsity, sizes, already)
        if not sum(low) <= pruned + k <= sum(high):
            self.issue(("rules", index), f"{group}: " + bounds_problem(sum(low), pruned + k, sum(high), unit.name))
            return
        if isinstance(unit, Entries):
            scorer = info.instance(k, rule.options).elementwise()
            new = self._global_split(index, targets, states, k, scorer, low, high)
        else:
            new = self._proportional(states, sizes, already, k, low, high)
        for (ref, _, by), state, size, count in zip(targets, states, sizes, new, strict=True):
            before = state.sparsity if state.known else None
            if isinstance(unit, Entries):
                state.pruned += count
                if count:
                    state.units = None
            else:
                state.pruned += count * (state.numel / size if size else 0)
                if state.units is not None:
                    state.units = {unit: round(state.units.get(unit, 0) + count)}
            self._step(index, rule, ref, by, before, state)

    @staticmethod
    def _proportional(
        states: list[_Virtual], sizes: list[int], already: Sequence[float], k: int, low: list[int], high: list[int]
    ) -> list[float]:
        """An estimate of each tensor's share of ``k`` units: in proportion to what it has left."""
        for state in states:
            state.exact = False
        left = [n - a for n, a in zip(sizes, already, strict=True)]
        remaining = sum(left)
        shares = [k * n / remaining if remaining else 0.0 for n in left]
        return [min(max(share, lo - a), hi - a) for share, a, lo, hi in zip(shares, already, low, high, strict=True)]

    def _global_split(
        self,
        index: int,
        targets: list[tuple[TensorRef, torch.Tensor, str]],
        states: list[_Virtual],
        k: int,
        scorer: selection.Score | None,
        low: list[int],
        high: list[int],
    ) -> list[float]:
        """How many entries each tensor of a global group loses: exact when its values can be read as
        they will be at apply (no earlier step of this plan changed them), else a proportional estimate."""
        if scorer is not None and all(s.exact and not s.touched for s in states):
            entries = [
                selection.Entry.of(param.detach(), s.mask) for (_, param, _), s in zip(targets, states, strict=True)
            ]
            already = [round(s.pruned) for s in states]
            with torch.no_grad(), one_thread():
                cuts = selection.find_cuts(entries, k, scorer, already, low, high)
            if cuts is not None:
                self.cuts[index] = cuts
                return [float(cut.pruned) for cut in cuts]
        return self._proportional(states, [s.numel for s in states], [s.pruned for s in states], k, low, high)
