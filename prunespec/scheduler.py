"""Gradual pruning during training: one scheduler for any training loop.

A rule with a ``schedule`` (its own, or the spec's) aims at its ``sparsity`` gradually: at each update
point of the schedule the :class:`Scheduler` raises every tensor the rule selects to the sparsity the
curve gives for that point, through the same planner and engine as :func:`prunespec.apply`, so masks
only grow and the composition rules still hold::

    scheduler = Scheduler(model, "gradual.yaml")   # checks the spec against the model now
    for step in range(steps):
        loss = loss_fn(model(x[step]), y[step])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step(step)                        # prunes only at update points

Update points are ``start``, ``start + every``, ... (those before ``end``) and ``end``. ``step(t)`` prunes
when ``t`` reaches a point not reached before, to the curve's value at the latest point ``<= t``::

    cubic:    s = s_f + (s_i - s_f) * (1 - (p - start) / (end - start)) ** 3   (Zhu & Gupta, 2017)
    linear:   s = s_f + (s_i - s_f) * (1 - (p - start) / (end - start))
    constant: s = s_f from start on (one-shot)

with ``s_i`` the schedule's ``initial``, ``s_f`` the rule's ``sparsity`` and ``p`` the update point. A
tensor (or a global group, or a tensor's channels for structured methods) of ``N`` units then has
``round(s * N)`` units pruned (Python's round, half to even), or more if it was already sparser: counts
never decrease. Rules without a schedule run once, at the first ``step()``. Between update points
``step()`` compares ``t`` with the next point and returns: no planning, no tensor work.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from . import api
from .engine import Progress
from .errors import SchedulerError, SpecError
from .loader import load_spec, schedule_issues
from .planner import make_plan
from .plugins import MethodRegistry, load_methods
from .report import Report
from .runtime import lean
from .spec import Rule, Schedule, Spec

log = logging.getLogger("prunespec")

STATE_FORMAT = 1
_EPS = 1e-9  # float slack when counting update points: (0.3 - 0) / 0.1 is 2.9999999999999996

History = tuple[float, int, float | None, float | None]  # (t, rule index, target, achieved)


class Timeline:
    """The update points of one scheduled rule, and the sparsity the curve gives at each.

    Points are numbered 0 (``start``), 1 (``start + every``), ... up to :attr:`last` (``end``).
    """

    def __init__(self, schedule: Schedule, final: float) -> None:
        self.schedule = schedule
        self.final = final
        span = schedule.end - schedule.start
        if span <= 0:
            self.last = 0
        else:
            n = span / schedule.every
            self.last = round(n) if abs(n - round(n)) < _EPS else math.ceil(n)

    def point(self, t: float) -> int:
        """The latest update point at or before ``t`` (-1 before ``start``)."""
        s = self.schedule
        if t < s.start:
            return -1
        if t >= s.end:
            return self.last
        return min(math.floor((t - s.start) / s.every + _EPS), self.last - 1)

    def time(self, k: int) -> float:
        """When point ``k`` is: ``start + k * every``, and ``end`` for the last one."""
        s = self.schedule
        return s.end if k >= self.last else s.start + k * s.every

    def target(self, k: int) -> float:
        """The sparsity the curve gives at point ``k``."""
        s = self.schedule
        if s.curve == "constant" or s.end <= s.start:
            return self.final
        left = 1 - (self.time(k) - s.start) / (s.end - s.start)
        if s.curve == "cubic":
            left = left**3
        return self.final + (s.initial - self.final) * left


class Scheduler:
    """Prunes ``model`` gradually, as the schedules in ``spec`` say, when the training loop calls
    :meth:`step`.

    The spec is checked against the model at once (a plan at the final sparsities), so a bad spec fails
    before training starts (``SpecError``, ``PlanError``). ``progress(done, total, what)`` is called as
    the engine works during an update, like :func:`prunespec.apply`'s; each update is also logged at INFO
    level on the ``prunespec`` logger. With ``finalize: true`` in the spec (or ``finalize=True``, which
    overrides it), :func:`prunespec.finalize` runs once every schedule has ended (it makes *all* pruning on
    the model permanent, and nothing keeps pruned weights at zero after it: finalize when training ends).
    """

    def __init__(
        self,
        model: nn.Module,
        spec: api.SpecLike,
        *,
        methods: MethodRegistry | None = None,
        finalize: bool | None = None,
        progress: Progress | None = None,
    ) -> None:
        self.model = model
        self.methods = load_methods() if methods is None else methods
        self.spec: Spec = load_spec(spec, methods=self.methods)
        self.finalize = self.spec.finalize if finalize is None else finalize
        self.progress = progress
        issues = schedule_issues(self.spec, self.methods, self.spec.source)  # a Spec built in Python skips the loader
        if issues:
            raise SpecError(issues)
        self.timelines: list[Timeline | None] = []
        for rule in self.spec.rules:
            schedule = rule.schedule or self.spec.schedule
            self.timelines.append(
                None if schedule is None or rule.sparsity is None else Timeline(schedule, rule.sparsity)
            )
        plan = make_plan(
            model, self.spec, self.methods, rules=self._due_rules(dict.fromkeys(range(len(self.spec.rules))))
        )
        for warning in plan.warnings:
            log.warning("%s", warning)
        self._tensors: list[list[tuple[str, str]]] = [[] for _ in self.spec.rules]
        for step in plan.steps:
            self._tensors[step.rule_index].append((step.tensor.module, step.tensor.param))

        self.last_step: float | None = None
        self.updates = 0
        self.history: list[History] = []
        self.finalized = False
        self._points = [-1] * len(self.spec.rules)  # last point reached per rule (0 once an unscheduled rule ran)
        self._targets: list[float | None] = [None] * len(self.spec.rules)  # sparsity last applied per rule
        self._next = -math.inf  # nothing can be due before this t
        self._finalized_at: float | None = None  # when step() finalized the model (None: not, or warned)

    # --- the training loop's side --------------------------------------------------------------

    def step(self, t: float) -> Report | None:
        """Training has reached ``t`` (a step or an epoch, the schedules' unit): prune what is due.

        Returns the report of the update, or None when nothing was due (the common case, which costs a
        comparison).
        """
        if isinstance(t, bool) or not _is_finite(t):
            raise SchedulerError(f"step(t) needs a finite number (the step or epoch reached), got {t!r}")
        self.last_step = t
        if t < self._next:
            return None
        if self.finalized:  # only reached once, at the first t after the one that finalized
            self._next = math.inf
            if self._finalized_at is not None:
                log.warning(
                    "%s %s: the model was finalized at %s; pruned weights are no longer masked, so training "
                    "can make them nonzero again (set `finalize: false` and call prunespec.finalize after training)",
                    self._unit(),
                    t,
                    self._finalized_at,
                )
                self._finalized_at = None  # warn once
            return None
        due: dict[int, float | None] = {}
        points = list(self._points)
        for i, timeline in enumerate(self.timelines):
            if timeline is None:
                if points[i] < 0:
                    due[i] = self.spec.rules[i].sparsity
                    points[i] = 0
                continue
            k = timeline.point(t)
            if k <= points[i]:
                continue
            points[i] = k
            target = timeline.target(k)
            if target != self._targets[i]:  # a constant curve's later points change nothing
                due[i] = target
        report = self._update(t, due) if due else None  # on an error, the scheduler stays where it was too
        self._points = points
        self._next = self._next_point()
        if self.finalize and self.done and not self.finalized:
            finalized = api.finalize(self.model)
            self.finalized = True
            self._finalized_at = t
            self._next = math.nextafter(t, math.inf)  # to warn if training goes on after this
            log.info("%s %s: every schedule has ended; finalized %d tensors", self._unit(), t, len(finalized))
        return report

    @property
    def done(self) -> bool:
        """Every rule has reached its final sparsity (unscheduled rules: has run)."""
        return all(
            self._points[i] >= (0 if timeline is None else timeline.last) for i, timeline in enumerate(self.timelines)
        )

    def sparsity_at(self, t: float) -> list[float | None]:
        """Per rule, the sparsity it prunes its tensors to by ``t``: the curve's value at the latest update
        point ``<= t`` (None before ``start``); unscheduled rules give their ``sparsity`` (None for
        ``amount``)."""
        out: list[float | None] = []
        for rule, timeline in zip(self.spec.rules, self.timelines, strict=True):
            if timeline is None:
                out.append(rule.sparsity)
            else:
                k = timeline.point(t)
                out.append(None if k < 0 else timeline.target(k))
        return out

    # --- state ---------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Where the scheduler is and what it did, as plain data (``torch.save`` it; it loads with
        ``torch.load(..., weights_only=True)``). The model's masks are not in it: save the model too."""
        return {
            "format": STATE_FORMAT,
            "rules": self._fingerprint(),
            "last_step": self.last_step,
            "points": list(self._points),
            "targets": list(self._targets),
            "updates": self.updates,
            "finalized": self.finalized,
            "history": [list(entry) for entry in self.history],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state`` (from :meth:`state_dict`), on a model restored from the same moment.

        The whole state is checked before any of it is adopted. Raises :class:`SchedulerError` (a
        ValueError) when it is not a scheduler state or was saved for another spec (other rules, targets
        or schedules): resuming would not continue the same curves.
        """
        if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
            raise SchedulerError(f"not a prunespec scheduler state (format {STATE_FORMAT})")
        saved, ours = state.get("rules"), self._fingerprint()
        if not isinstance(saved, list) or len(saved) != len(ours):
            count = len(saved) if isinstance(saved, list) else "?"
            raise SchedulerError(f"the scheduler state was saved for another spec ({count} rules, not {len(ours)})")
        differ = [self.spec.rules[i].label(i) for i, (a, b) in enumerate(zip(saved, ours, strict=True)) if a != b]
        if differ:
            raise SchedulerError(
                f"the scheduler state was saved for another spec: the `sparsity` or `schedule` of "
                f"{', '.join(differ)} differ"
            )
        points, targets, history = state.get("points"), state.get("targets"), state.get("history")
        n = len(self.spec.rules)
        problems = []
        if not (isinstance(points, list) and len(points) == n and all(_is_int(p) for p in points)):
            problems.append(f"`points` must be a list of {n} integers")
        else:
            for i, (p, timeline) in enumerate(zip(points, self.timelines, strict=True)):
                last = 0 if timeline is None else timeline.last
                if not -1 <= p <= last:
                    problems.append(f"`points[{i}]` is {p}, outside -1..{last} for {self.spec.rules[i].label(i)}")
        if not (isinstance(targets, list) and len(targets) == n and all(t is None or _is_fraction(t) for t in targets)):
            problems.append(f"`targets` must be a list of {n} sparsities in [0, 1] or null")
        last_step = state.get("last_step")
        if not (last_step is None or _is_finite(last_step)):
            problems.append("`last_step` must be a finite number or null")
        if not (_is_int(state.get("updates")) and state["updates"] >= 0):
            problems.append("`updates` must be an integer >= 0")
        if not isinstance(state.get("finalized"), bool):
            problems.append("`finalized` must be true or false")
        if not (isinstance(history, list) and all(_is_history(e, n) for e in history)):
            problems.append("`history` must be a list of [t, rule index, target, achieved]")
        if problems:
            raise SchedulerError("the scheduler state is damaged: " + "; ".join(problems))
        assert isinstance(points, list) and isinstance(targets, list) and isinstance(history, list)
        self._points = [int(p) for p in points]
        self._targets = [None if v is None else float(v) for v in targets]
        self.last_step = last_step
        self.updates = int(state["updates"])
        self.finalized = bool(state["finalized"])
        self.history = [(e[0], int(e[1]), e[2], e[3]) for e in history]
        self._next = self._next_point()

    # --- internals -----------------------------------------------------------------------------

    def _fingerprint(self) -> list[dict[str, Any]]:
        return [
            {
                "sparsity": rule.sparsity,
                "schedule": None if timeline is None else timeline.schedule.model_dump(mode="json"),
            }
            for rule, timeline in zip(self.spec.rules, self.timelines, strict=True)
        ]

    def _next_point(self) -> float:
        """The earliest t at which a rule has a point it has not reached (inf when none is left)."""
        times = [
            (-math.inf if timeline is None else timeline.time(self._points[i] + 1))
            for i, timeline in enumerate(self.timelines)
            if self._points[i] < (0 if timeline is None else timeline.last)
        ]
        return min(times, default=math.inf)

    def _due_rules(self, due: Mapping[int, float | None]) -> dict[int, Rule]:
        """The rules an update runs, by index: each due rule at its target (None: its final sparsity)."""
        rules: dict[int, Rule] = {}
        for i, target in due.items():
            rule = self.spec.rules[i]
            update: dict[str, Any] = {"schedule": None}
            if target is not None and rule.sparsity is not None:
                update["sparsity"] = target
                if rule.min_sparsity is not None and target < rule.sparsity:
                    # a global floor grows with the group's target, reaching min_sparsity at the end
                    update["min_sparsity"] = rule.min_sparsity * target / rule.sparsity
            rules[i] = rule.model_copy(update=update)
        return rules

    def _update(self, t: float, due: Mapping[int, float | None]) -> Report:
        progress = self.progress

        def relay(done: int, total: int, what: str) -> None:
            if progress is not None:
                progress(done, total, f"{self._unit()} {t}: {what}")

        hook = relay if progress is not None else None
        with lean():
            plan = make_plan(self.model, self.spec, self.methods, rules=self._due_rules(due))
        report = api.run(self.model, plan, finalize=False, progress=hook, merge=True)
        self.updates += 1
        for i, target in due.items():
            self._targets[i] = target
            achieved = self._achieved(i)
            self.history.append((t, i, target, achieved))
            rule = self.spec.rules[i]
            how = f"target {_pct(target)}" if target is not None else f"amount {rule.amount}"
            log.info("%s %s: %s now %s pruned (%s)", self._unit(), t, rule.label(i), _pct(achieved), how)
        return report

    def _achieved(self, index: int) -> float | None:
        """Fraction of entries masked over every tensor rule ``index`` selects."""
        zeros = total = 0
        with torch.no_grad():
            for module_name, pname in self._tensors[index]:
                module = self.model.get_submodule(module_name)
                mask = module._buffers.get(pname + "_mask")
                value = mask if mask is not None else getattr(module, pname)
                zeros += int((value == 0).sum())
                total += value.numel()
        return zeros / total if total else None

    def _unit(self) -> str:
        units = {timeline.schedule.unit for timeline in self.timelines if timeline is not None}
        return units.pop() if len(units) == 1 else "t"


def ordered_parameters(model: nn.Module) -> list[nn.Parameter]:
    """``model``'s parameters in an order that pruning does not change: sorted by name, ``<name>_orig``
    sorting as ``<name>``.

    Pruning moves ``weight`` to ``weight_orig`` after ``bias``, so ``model.parameters()`` lists a pruned
    module in another order than a dense one, and an optimizer state saved from one does not load into an
    optimizer built on the other. Build the optimizer from this list when training will resume from a
    checkpoint taken mid-schedule.
    """
    named = model.named_parameters()
    return [param for _, param in sorted(named, key=lambda item: item[0].removesuffix("_orig"))]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_fraction(value: Any) -> bool:
    return _is_finite(value) and 0 <= value <= 1


def _is_history(entry: Any, rules: int) -> bool:
    return (
        isinstance(entry, (list, tuple))
        and len(entry) == 4
        and _is_finite(entry[0])
        and _is_int(entry[1])
        and 0 <= entry[1] < rules
        and all(v is None or _is_fraction(v) for v in entry[2:])
    )


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"
