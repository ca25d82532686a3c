"""The Python API: ``load_spec`` -> ``plan`` -> ``apply`` -> ``Report``, and ``finalize``."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

from torch import nn

from . import budgets, distributed, engine, layout, transaction
from .engine import Progress
from .loader import load_spec
from .planner import Plan, make_plan
from .plugins import MethodRegistry, load_methods
from .record import CalibrationRecord, Fingerprint
from .report import Report, collect
from .runtime import lean
from .shrink import shrink as shrink_model
from .spec import Spec

SpecLike = Spec | str | os.PathLike[str] | Mapping[str, Any]


def plan(
    model: nn.Module, spec: SpecLike, *, methods: MethodRegistry | None = None, data: Iterable[Any] | None = None
) -> Plan:
    """Resolve ``spec`` (a Spec, a YAML path or a mapping) against ``model`` without changing it.

    ``data``: calibration batches: rules with ``owl`` then have their blocks' sparsities allocated (one
    pass over the data) and shown, and `group` rules on models without known structures (CNNs) trace
    their channel groups from the first batch. Raises SpecError for an invalid spec and PlanError
    when it does not fit the model.
    """
    with distributed.collective(distributed.sharded(model)):  # a bad spec on one rank stops every rank
        return _plan(model, spec, methods, data)


def _plan(model: nn.Module, spec: SpecLike, methods: MethodRegistry | None, data: Iterable[Any] | None) -> Plan:
    methods = load_methods() if methods is None else methods
    the_spec = load_spec(spec, methods=methods)
    listed = None if data is None else list(data)
    example = listed[0] if listed else None
    with lean():
        the_plan = make_plan(model, the_spec, methods, example=example)
    if listed is not None and any(o.allocated is None for o in the_plan.owl):
        the_plan = _allocated(model, the_plan, engine.calibration_batches(the_plan, listed))
    return the_plan


def _allocated(model: nn.Module, the_plan: Plan, batches: list[Any]) -> Plan:
    """The plan again, its OWL rules' blocks given their sparsities from ``batches``."""
    allocations = budgets.owl_allocations(model, the_plan, batches)
    with lean():
        return make_plan(model, the_plan.spec, the_plan.methods, allocations=allocations, example=batches[0])


def apply(
    model: nn.Module,
    spec: SpecLike | Plan,
    *,
    methods: MethodRegistry | None = None,
    finalize: bool | None = None,
    shrink: bool | None = None,
    progress: Progress | None = None,
    data: Iterable[Any] | None = None,
    snapshot: str = "memory",
    replay_blocks: bool = False,
    offload_activations: bool = False,
) -> Report:
    """Prune ``model`` in place as ``spec`` says and report the result, all or nothing.

    ``finalize`` and ``shrink`` override the spec's. With ``shrink``, the units that ``group`` rules
    pruned are then removed (:func:`prunespec.shrink`, checked on the first calibration batch, or on
    random token ids for a transformers model); its report is ``Report.shrink``.

    ``snapshot`` (with ``finalize``): how the all-or-nothing promise is kept for tensors finalized in
    place: ``"memory"`` (default) holds every mask until the end, 1 bit an entry; ``"disk"`` writes
    each tensor as soon as its mask is ready, its old values first saved to a temporary file (restored
    on an error): beyond the model, one tensor's working set; ``"none"``: no undo at all.

    ``replay_blocks``: while calibrating, each batch waits at the entry of the model's blocks holding
    only its input, and the block is run again from there, one batch at a time, for each stop inside
    it: activation memory for the blocks' inputs and one batch's work, for about 1.3 more forwards
    (Llama-like blocks); the masks are the same. Off by default: every batch then waits inside the
    block, holding what its forward holds there. See docs/data-aware-pruning.md.

    ``offload_activations`` (with ``replay_blocks`` or ``calibration.sequential: blocks``, for a model
    on an accelerator): each batch's input to the block it waits at is kept on the CPU meanwhile, and
    copied back when the block runs from it; the results are the same.

    ``progress(done, total, what)`` is called as steps finish (off by default; the ``prunespec`` logger
    also logs each step at DEBUG level). On any error the model is left exactly as it was.

    ``data``: calibration batches for data-aware methods (``wanda``): any iterable, each batch a Tensor
    (the model's first positional argument), a tuple or list (positional arguments) or a mapping (keyword
    arguments, e.g. ``{"input_ids": ..., "attention_mask": ...}``; padded positions, 0 in
    ``attention_mask``, are left out). A rule that needs data and gets none is a PlanError; a batch the
    model cannot run is an ApplyError naming its index. See docs/data-aware-pruning.md.
    """
    data = None if data is None else list(data)  # listed: planning may trace the first batch
    the_plan = spec if isinstance(spec, Plan) else plan(model, spec, methods=methods, data=data)
    chosen = the_plan.spec.finalize if finalize is None else finalize
    if not (the_plan.spec.shrink if shrink is None else shrink):
        return run(
            model,
            the_plan,
            finalize=chosen,
            progress=progress,
            data=data,
            snapshot=snapshot,
            replay_blocks=replay_blocks,
            offload_activations=offload_activations,
        )
    undo = transaction.BindingsSnapshot(model)  # shrink runs after install: a failure undoes both
    try:
        report = run(
            model,
            the_plan,
            finalize=False,
            progress=progress,
            data=data,
            replay_blocks=replay_blocks,
            offload_activations=offload_activations,
        )
        example = data[0] if data else None
        report.shrink = shrink_model(model, example)
        if chosen:
            _make_permanent(model)
    except BaseException:
        undo.restore()
        raise
    return report


def run(
    model: nn.Module,
    the_plan: Plan,
    *,
    finalize: bool,
    progress: Progress | None = None,
    merge: bool = False,
    data: Iterable[Any] | None = None,
    snapshot: str = "memory",
    replay_blocks: bool = False,
    offload_activations: bool = False,
) -> Report:
    """Execute a plan and report on what it pruned (``merge``, ``data``: see :func:`prunespec.engine.execute`)."""
    with distributed.collective(distributed.sharded(model)):
        return _run(model, the_plan, finalize, progress, merge, data, snapshot, replay_blocks, offload_activations)


def _run(
    model: nn.Module,
    the_plan: Plan,
    finalize: bool,
    progress: Progress | None,
    merge: bool,
    data: Iterable[Any] | None,
    snapshot: str,
    replay_blocks: bool,
    offload_activations: bool,
) -> Report:
    batches = None
    if the_plan.needs_data or (the_plan.uses_data and data is not None):  # OWL may be allocated already
        batches = engine.calibration_batches(the_plan, data)
        if any(o.allocated is None for o in the_plan.owl):
            the_plan = _allocated(model, the_plan, batches)
    outcome = engine.execute(
        model,
        the_plan,
        progress,
        merge=merge,
        data=batches,
        finalize=finalize,
        snapshot=snapshot,
        replay_blocks=replay_blocks,
        offload_activations=offload_activations,
    )
    pruned = outcome.pruned
    predicted = {name: after for name, (_, after, _) in the_plan.tensors.items()}
    counted = {p.name: p.zeros for p in pruned if p.zeros is not None}
    errors = {p.name: p.error for p in pruned if p.error is not None}
    with lean():
        estimated = [name for name, (_, _, exact) in the_plan.tensors.items() if not exact]
        report = collect(model, [p.name for p in pruned], predicted, counted, estimated, errors)  # before finalize
    if batches is not None:
        report.calibration = _record(the_plan, batches, outcome)
    return report


def _record(the_plan: Plan, batches: list[Any], outcome: engine.Outcome) -> CalibrationRecord:
    """What the calibration used, for the report and the checkpoint."""
    fingerprint = Fingerprint()
    for batch in batches:
        fingerprint.add(batch)
    allocations = {o.rule_index: dict(o.allocated) for o in the_plan.owl if o.allocated is not None}
    return CalibrationRecord(
        samples=len(batches),
        tokens=outcome.tokens or 0,
        sequential=the_plan.spec.calibration.sequential,
        blocks=tuple(the_plan.blocks),
        fingerprint=fingerprint.hexdigest(),
        allocations=allocations,
    )


def finalize(model: nn.Module) -> list[str]:
    """Make all pruning on ``model`` permanent (torch's ``prune.remove`` on every pruned tensor, whoever
    pruned it), all or nothing; returns the names of the tensors finalized."""
    return _make_permanent(model)


def _make_permanent(model: nn.Module) -> list[str]:
    with distributed.collective(distributed.sharded(model)):
        return _removed(model)


def _removed(model: nn.Module) -> list[str]:
    found = list(layout.pruned_in(model))
    layout.remove_all([(module, pname) for _, module, pname, _ in found])
    return [name for name, _, _, _ in found]
