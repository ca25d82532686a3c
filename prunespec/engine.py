"""The mask engine: run a :class:`~prunespec.planner.Plan` on a model, all or nothing.

Every mask is computed first, on the side. Three ways, one result:

* methods that score units (``l1_unstructured`` entries, ``ln_structured`` channels, any plugin's
  :meth:`~prunespec.PruningMethod.score`): prunespec selects the lowest scores itself
  (:mod:`prunespec.selection`; local and global, no ``topk`` over whole tensors, no concatenation);
* any other method: its :meth:`~prunespec.PruningMethod.mask` (by default torch's ``compute_mask``,
  composed with earlier masks by torch's own ``PruningContainer``), then checked (shape, device, dtype,
  binary, earlier zeros kept) unless it is one of torch's own classes;
* a global budget without scores: the group concatenated, as ``prune.global_unstructured`` does.

Only when every mask is ready is anything installed (:mod:`prunespec.install`, in torch's layout), and
the install is rolled back on any exception or interrupt, so a failed apply leaves parameters, buffers
and hooks exactly as they were (with ``finalize`` and ``snapshot="disk"``, tensors are written as their
masks are ready and restored from a file on an error; with ``"none"``, not restored).
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune

from . import budgets, calibration, distributed, groups, layout, reconstruction, selection, sharded_sequential
from .errors import ApplyError, CalibrationError, Issue, PlanError, PrunespecError
from .install import SNAPSHOTS, Streamed, finished, install, make_permanent, undone_on_error
from .install import finalize as finalize_all
from .layout import GlobalMask
from .masks import (
    Channels,
    Entries,
    Slab,
    Unit,
    bounds_problem,
    budget_bounds,
    n_to_prune,
    row_targets,
    to_prune,
    zeros,
)
from .methods.base import Generators, MaskContext, MethodInfo, PruningMethod
from .offload import Parking
from .planner import Plan, Step
from .pruned import Pruned
from .runtime import lean, one_thread
from .sequential import Pass as sequential_pass
from .sequential import Weight

log = logging.getLogger("prunespec")

__all__ = ["GlobalMask", "Outcome", "Progress", "Pruned", "execute", "make_permanent"]


Progress = Callable[[int, int, str], None]  # (steps done, steps in all, what was just done)


@dataclass
class Outcome:
    """What :func:`execute` did: the tensors it pruned, and for a calibrated apply the tokens counted
    (after padding is left out) at the first module calibrated."""

    pruned: list[Pruned]
    tokens: int | None = None


def execute(
    model: nn.Module,
    plan: Plan,
    progress: Progress | None = None,
    *,
    merge: bool = False,
    data: Iterable[Any] | None = None,
    finalize: bool = False,
    snapshot: str = "memory",
    replay_blocks: bool = False,
    offload_activations: bool = False,
) -> Outcome:
    """Apply ``plan`` to ``model`` (never finalizing: see :func:`make_permanent`). Raises ApplyError.

    ``progress`` is called after each local step and each global group (masks are computed then; the
    install that follows is quick). ``merge`` folds each new hook record into the tensor's last one where
    they say the same (:func:`prunespec.layout.merged`; the Scheduler's repeated updates). ``data``: the
    calibration batches, run through the model once before any mask when a rule's method reads
    statistics (:mod:`prunespec.calibration`); without it such a plan is a PlanError. ``finalize``:
    make the pruning permanent too (:func:`make_permanent`); a tensor no earlier pruning touched then
    gets its pruned values in place, never torch's layout (no mask, no second copy of the weights).

    ``snapshot`` (with ``finalize``) is what keeps the all-or-nothing promise for such tensors:
    ``"memory"`` holds every mask until all are computed (1 bit an entry), then writes them in;
    ``"disk"`` writes each tensor in place as soon as its mask is ready, its old values saved to a
    temporary file first (restored on any error, then deleted): beyond the model, memory is one
    tensor's working set; ``"none"`` does the same without the file: an error leaves the tensors
    finalized before it pruned (the error says so).

    ``replay_blocks``: the calibration pass runs the plan's blocks again from their inputs for each
    stop inside them (:class:`prunespec.sequential.Pass`), rather than keeping every batch waiting
    inside them. A model split across ranks is calibrated group by group already, holding no batch.

    ``offload_activations`` (with ``replay_blocks`` or ``calibration.sequential: blocks``): each waiting
    batch's input to the block is kept on the CPU until its block runs from it
    (:mod:`prunespec.offload`); the results are the same.
    """
    if snapshot not in SNAPSHOTS:
        raise ValueError(f"snapshot must be one of {', '.join(SNAPSHOTS)}, not {snapshot!r}")
    if offload_activations and not replay_blocks and plan.spec.calibration.sequential != "blocks":
        raise PlanError(
            Issue(
                "offload_activations keeps the batches' inputs to the blocks on the CPU while they wait at a "
                "block's entry, which they do only with replay_blocks or sequential: blocks",
                path="calibration.sequential",
                hint="pass replay_blocks=True (--replay-blocks) or set calibration.sequential: blocks, "
                "or leave offload_activations off",
            )
        )
    stale = plan.stale(model)
    if stale:
        raise PlanError([Issue(f"the plan does not fit this model: {p}", hint="make the plan again") for p in stale])
    tensors: dict[int, Pruned] = {}
    modules = dict(model.named_modules())
    units = plan.units()
    later = _later(plan, units)
    whole_blocks = [
        u for u in units if calibration.BLOCK_LEVEL & set(plan.methods[u[0].method].capabilities.statistics)
    ]
    batches = calibration_batches(plan, data) if later or whole_blocks else None
    generators = None if plan.spec.seed is None else Generators(plan.spec.seed)
    counter = _Counter(len(plan.steps), progress, plan.blocks)
    torch_random = any(not plan.methods[step.method].capabilities.own_random for step in plan.steps)
    final = {step.tensor.name: id(step) for step in plan.steps}  # each tensor's last step
    undo = Streamed(snapshot) if finalize and snapshot != "memory" else None
    slab = Slab() if finalize and undo is None else None
    with torch.no_grad(), _seeded(plan.spec.seed if torch_random else None, model), lean(), undone_on_error(undo):
        influences = _influences(model, plan, whole_blocks, batches) if whole_blocks and batches else {}
        for unit in _batched(plan, [u for i, u in enumerate(units) if i not in later]):
            staged = [_stage(modules, tensors, step, generators, influences) for step in unit]
            _compute(model, plan, unit, staged)
            if finalize:
                for step, tensor in zip(unit, staged, strict=True):
                    if final[step.tensor.name] == id(step):
                        finished(tensor, undo, slab)
            counter.done(unit)
        tokens = None
        if batches is not None:
            later_units = [units[i] for i in sorted(later)]
            ends = final if finalize else None
            whole = plan.spec.calibration.sequential == "blocks"  # waits at each block's entry too
            replayed = {name: modules[name] for name in plan.blocks} if replay_blocks or whole else {}
            work = _Work(
                model,
                plan,
                modules,
                tensors,
                generators,
                counter,
                influences,
                ends,
                undo,
                slab,
                replayed,
                offload_activations,
            )
            tokens = _calibrated(work, later_units, batches)
        _whole_zeros(list(tensors.values()))
        if finalize:
            finalize_all(list(tensors.values()), merge)
        else:
            install(list(tensors.values()), merge)
    return Outcome(list(tensors.values()), tokens)


def _whole_zeros(tensors: list[Pruned]) -> None:
    """The zeros of each DTensor's mask in the whole tensor (the engine counted this rank's part)."""
    sharded = [t for t in tensors if t.sharding is not None and t.mask is not None]
    counts = distributed.reduce([zeros(t.mask) for t in sharded if t.mask is not None], [t.sharding for t in sharded])
    for tensor, count in zip(sharded, counts, strict=True):
        tensor.zeros = count


@dataclass
class _Work:
    """What the calibrated paths share: the model and plan, the staged tensors and how to stage more."""

    model: nn.Module
    plan: Plan
    modules: dict[str, nn.Module]
    tensors: dict[int, Pruned]
    generators: Generators | None
    counter: _Counter
    influences: Mapping[tuple[str, str], torch.Tensor]
    final: dict[str, int] | None = None  # with finalize: each tensor's last step (by id)
    undo: Streamed | None = None  # with finalize and snapshot disk or none: tensors are written as they are done
    slab: Slab | None = None  # with finalize and snapshot memory: where the final masks are packed
    replayed: Mapping[str, nn.Module] = field(default_factory=dict)  # blocks the calibration pass runs again
    offload: bool = False  # the batches' inputs to the replayed blocks parked on the CPU while they wait

    def parts(
        self,
    ) -> tuple[
        nn.Module,
        Plan,
        dict[str, nn.Module],
        dict[int, Pruned],
        Generators | None,
        _Counter,
        Mapping[tuple[str, str], torch.Tensor],
    ]:
        return self.model, self.plan, self.modules, self.tensors, self.generators, self.counter, self.influences


class _Counter:
    """Steps done, for the progress callback and the DEBUG log."""

    def __init__(self, total: int, progress: Progress | None, blocks: list[str]) -> None:
        self.total, self.count, self.progress = total, 0, progress
        self.blocks = {name: i for i, name in enumerate(blocks)}

    def done(self, unit: list[Step], what: str | None = None) -> None:
        self.count += len(unit)
        if self.progress is not None or log.isEnabledFor(logging.DEBUG):
            if what is None:
                more = f" and {len(unit) - 1} more" if len(unit) > 1 else ""
                block = unit[0].block
                where = f" (block {self.blocks[block] + 1}/{len(self.blocks)})" if block in self.blocks else ""
                what = f"{unit[0].rule}: {unit[0].tensor.name}{more}{where}"
            log.debug("masks computed for %s (%d/%d steps)", what, self.count, self.total)
            if self.progress is not None:
                self.progress(self.count, self.total, what)


def _compute(model: nn.Module, plan: Plan, unit: list[Step], staged: list[Pruned]) -> None:
    """The new masks of one unit (a local step, a global group, a batch of small local steps)."""
    info = plan.methods[unit[0].method]
    try:
        if unit[0].group is not None:
            _run_groups(plan, unit, staged, info)
        elif unit[0].scope == "global":
            _run_global(model, unit, staged, info, plan.cuts.get(unit[0].rule_index))
        elif len(unit) > 1:
            _run_batch(unit, staged, info)
        else:
            _run_local(unit[0], staged[0], info)
    except PrunespecError:
        raise
    except Exception as exc:  # torch or a method failing where no check caught it: still one error
        what = staged[0].name if len(unit) == 1 else f"{staged[0].name} and {len(unit) - 1} more"
        hint = " (out of memory: free some, or prune on another device)" if _out_of_memory(exc) else ""
        raise _fail(unit[0], what, f"masks could not be computed: {type(exc).__name__}: {exc}{hint}") from exc


def _influences(
    model: nn.Module, plan: Plan, units: list[list[Step]], batches: list[Any]
) -> dict[tuple[str, str], torch.Tensor]:
    """The block influence of each tensor's block (module, parameter -> 0-d tensor), for the rules
    that score blocks by it: one dense pass before anything is pruned."""
    members: dict[tuple[str, str], str] = {}
    for unit in units:
        for step in unit:
            if step.group is None:
                raise PlanError(Issue(f"{step.rule}: block_influence scores whole blocks: add group: {{unit: blocks}}"))
            group = plan.groups[step.group].group
            for member in group.members:
                if member.block is not None:
                    members[member.module, member.param] = group.unit_names[member.block]
    rules = ", ".join(dict.fromkeys(u[0].rule for u in units))
    scores = budgets.block_influences(model, list(dict.fromkeys(members.values())), batches, rules)
    return {key: torch.tensor(scores[block], dtype=torch.float64) for key, block in members.items()}


def _later(plan: Plan, units: list[list[Step]]) -> set[int]:
    """The units computed during the calibration pass (or after it): those of a method that reads
    statistics, and every later unit on a tensor one of those prunes (a tensor's rules keep their order)."""
    started: set[str] = set()
    later: set[int] = set()
    for i, unit in enumerate(units):
        data = bool(set(plan.methods[unit[0].method].capabilities.statistics) - calibration.BLOCK_LEVEL)
        if data or any(step.tensor.name in started for step in unit):
            later.add(i)
            started.update(step.tensor.name for step in unit)
    return later


def calibration_batches(plan: Plan, data: Iterable[Any] | None) -> list[Any]:
    """The calibration batches the plan needs, as a list (the first ``calibration.samples`` of them);
    PlanError without any."""
    rules = ", ".join(plan.needs_data)
    if data is None:
        methods = sorted({s.method for s in plan.steps if plan.methods[s.method].capabilities.statistics})
        raise PlanError(
            Issue(
                f"{rules}: {', '.join(methods)} needs calibration data, and none was given",
                hint="Python: prunespec.apply(model, spec, data=batches); CLI: prunespec apply SPEC --model REF "
                "--data file.py:factory (an iterable of batches: Tensors, tuples or mappings)",
            )
        )
    return calibration.batches(data, rules, plan.spec.calibration.samples)


def _calibrated(work: _Work, units: list[list[Step]], batches: list[Any]) -> int | None:
    """The units that need the calibration pass: each local one at its module's stop (in forward order),
    on the outputs of the modules before it as pruned (``calibration.sequential``); a global one after
    the pass, from the statistics its tensors' stops gathered. Returns the tokens counted."""
    model, plan, modules, tensors, generators, counter, influences = work.parts()
    if distributed.sharded(model):
        return _calibrated_across_ranks(work, units, batches)
    settings = plan.spec.calibration
    sequential, whole, errors = settings.sequential is not False, settings.sequential == "blocks", settings.errors
    rules = ", ".join(plan.needs_data)
    at_stop: dict[str, list[tuple[list[Step], list[Pruned]]]] = {}
    deferred: list[tuple[list[Step], list[Pruned]]] = []
    waiting: set[str] = set()  # tensors with a deferred unit: their later units wait too
    needs: dict[str, set[str]] = {}
    early = _weights(tensors.values()) if sequential else {}
    finishing: set[int] = set()  # tensors whose last step runs at their stop
    for unit in units:
        staged = [_stage(modules, tensors, step, generators, influences) for step in unit]
        if work.final is not None:
            finishing.update(id(t) for st, t in zip(unit, staged, strict=True) if work.final[st.tensor.name] == id(st))
        wanted = set(plan.methods[unit[0].method].capabilities.statistics) - calibration.BLOCK_LEVEL
        for step in unit:
            needs.setdefault(step.tensor.module, set()).update(wanted)
        # a global rule or a group rule ranks across modules: after the pass, from every member's statistics
        joint = unit[0].scope == "global" or unit[0].group is not None
        if joint or any(step.tensor.name in waiting for step in unit):
            deferred.append((unit, staged))
            waiting.update(step.tensor.name for step in unit)
        else:
            at_stop.setdefault(unit[0].tensor.module, []).append((unit, staged))
    kept: dict[str, dict[int, Pruned]] = {}  # by module: tensors whose statistics are needed after the pass
    for _, staged in deferred:
        for tensor in staged:
            kept.setdefault(tensor.module_name, {})[id(tensor)] = tensor
    keep = {key for by_id in kept.values() for key in by_id}
    finishing -= keep
    later: list[Pruned] = []  # finished after the pass: without sequential, every module computes as it was
    watched = {name: modules[name] for name in needs}
    accumulator = calibration.Accumulator(reconstruction.ERROR_TOKENS if errors else None)
    measured = reconstruction.Errors()
    packing: list[Pruned] = []  # packed at the next stop: the batches first compute with their bool masks
    parking = Parking() if work.offload else None
    with sequential_pass(
        model, batches, watched, early, work.replayed, whole_blocks=whole, parking=parking
    ) as calibration_pass:
        for stop, stats, shared_later in calibration.stops(calibration_pass, needs.__getitem__, rules, accumulator):
            measured.settle()
            for tensor in packing:
                finished(tensor, None, work.slab)
            calibration_pass.update(_weights(packing))
            packing = []
            done: list[Pruned] = []
            here = at_stop.pop(stop.module, [])
            if (
                len(here) == 1 and len(here[0][1]) == 1 and stop.module not in kept and not shared_later
            ):  # its one tensor is the statistics' last reader: its method may overwrite them
                accumulator.forget()
                here[0][1][0].consumable = True
            for unit, staged in here:
                for tensor in staged:
                    tensor.statistics = stats
                _compute(model, plan, unit, staged)
                done.extend(t for t in staged if all(t is not d for d in done))
                counter.done(unit)
            for tensor in kept.get(stop.module, {}).values():
                tensor.statistics = stats
            if accumulator.sample is not None and done:
                module, taken = modules[stop.module], accumulator.sample
                # a block's modules are next called with the pruned block's outputs, not these tokens
                tap = measured.at_stop(taken, module, done, pruned_output=sequential, tap=not whole)
                if tap is not None:
                    calibration_pass.tap(stop.module, tap, [batch for batch, _ in taken.rows])
            for tensor in done:
                if id(tensor) not in keep:
                    tensor.statistics = {}
                    tensor.mask = tensor.mask.bool() if tensor.mask is not None else None  # final: 1 byte an entry
                if id(tensor) in finishing:
                    if sequential and work.undo is not None:  # written in place now: the module computes with it
                        finished(tensor, work.undo)
                    elif sequential:
                        packing.append(tensor)
                    else:
                        later.append(tensor)
            calibration_pass.release(stop.module, _weights(done) if sequential else None)
        missing = calibration_pass.unreached()
    measured.close()
    if missing:
        raise CalibrationError(
            rules, f"the model's forward never ran {', '.join(missing)} on the calibration data: no statistics"
        )
    for tensor in packing + later:
        finished(tensor, work.undo, work.slab)
    for unit, staged in deferred:
        _compute(model, plan, unit, staged)
        counter.done(unit)
    for tensor in tensors.values():
        tensor.statistics = {}
    return accumulator.tokens


def _calibrated_across_ranks(work: _Work, units: list[list[Step]], batches: list[Any]) -> int | None:
    """The units that need data, on a model split across ranks: every rank's batches calibrate it
    together (:func:`prunespec.calibration.collect_across_ranks`, the model as it is), then each unit's
    masks come from the statistics summed over all of them. With ``calibration.sequential``, each module
    on the outputs of the modules before it as pruned (:mod:`prunespec.sharded_sequential`)."""
    model, plan, modules, tensors, generators, counter, influences = work.parts()
    if plan.spec.calibration.sequential:
        return _sequential_across_ranks(work, units, batches)
    needs: dict[str, set[str]] = {}
    staged_units = []
    for unit in units:
        staged = [_stage(modules, tensors, step, generators, influences) for step in unit]
        wanted = set(plan.methods[unit[0].method].capabilities.statistics) - calibration.BLOCK_LEVEL
        for step in unit:
            needs.setdefault(step.tensor.module, set()).update(wanted)
        staged_units.append((unit, staged))
    rules = ", ".join(plan.needs_data)
    watched = {name: modules[name] for name in needs}
    stats, tokens = calibration.collect_across_ranks(model, watched, needs.__getitem__, batches, rules)
    for unit, staged in staged_units:
        for tensor in staged:
            tensor.statistics = stats.get(tensor.module_name, {})
        _compute(model, plan, unit, staged)
        counter.done(unit)
    for tensor in tensors.values():
        tensor.statistics = {}
    return tokens


def _sequential_across_ranks(work: _Work, units: list[list[Step]], batches: list[Any]) -> int | None:
    """:func:`_calibrated`'s sequential calibration on a model split across ranks: the same units at the
    same modules, each group of modules given its statistics by :func:`sharded_sequential.calibrate`."""
    model, plan, modules, tensors, generators, counter, influences = work.parts()
    rules = ", ".join(plan.needs_data)
    early = [t for t in tensors.values() if t.mask is not None or t.bits is not None]  # the passes use them
    at_stop: dict[str, list[tuple[list[Step], list[Pruned]]]] = {}
    deferred: list[tuple[list[Step], list[Pruned]]] = []
    waiting: set[str] = set()
    needs: dict[str, set[str]] = {}
    for unit in units:
        staged = [_stage(modules, tensors, step, generators, influences) for step in unit]
        wanted = set(plan.methods[unit[0].method].capabilities.statistics) - calibration.BLOCK_LEVEL
        for step in unit:
            needs.setdefault(step.tensor.module, set()).update(wanted)
        # as in one process: a rule ranking across modules is decided after the passes, its tensors unpruned
        if unit[0].scope == "global" or unit[0].group is not None or any(s.tensor.name in waiting for s in unit):
            deferred.append((unit, staged))
            waiting.update(step.tensor.name for step in unit)
        else:
            at_stop.setdefault(unit[0].tensor.module, []).append((unit, staged))
    kept: dict[str, list[Pruned]] = {}
    for _, staged in deferred:
        for tensor in staged:
            kept.setdefault(tensor.module_name, []).append(tensor)

    def at_group(group: list[str], stats: calibration.Statistics) -> list[Pruned]:
        done: list[Pruned] = []
        for name in group:
            for unit, staged in at_stop.pop(name, []):
                for tensor in staged:
                    tensor.statistics = stats[name]
                _compute(model, plan, unit, staged)
                done.extend(t for t in staged if all(t is not d for d in done))
                counter.done(unit)
            for tensor in kept.get(name, []):
                tensor.statistics = stats[name]
        for tensor in done:
            if all(tensor is not k for ks in kept.values() for k in ks):
                tensor.statistics = {}
                tensor.mask = tensor.mask.bool() if tensor.mask is not None else None  # final: 1 byte an entry
        return done

    watched = {name: modules[name] for name in needs}
    tokens = sharded_sequential.calibrate(model, watched, needs.__getitem__, batches, rules, early, at_group)
    for unit, staged in deferred:
        _compute(model, plan, unit, staged)
        counter.done(unit)
    for tensor in tensors.values():
        tensor.statistics = {}
    return tokens


def _weights(tensors: Iterable[Pruned]) -> dict[str, dict[str, Weight]]:
    """What each owner of these tensors computes with: (values, mask), new values and masks so far."""
    out: dict[str, dict[str, Weight]] = {}
    for tensor in tensors:
        mask = tensor.mask if tensor.mask is not None else tensor.bits
        if mask is None:
            continue
        for module, pname in tensor.owner_names:
            out.setdefault(module, {})[pname] = (tensor.current.detach(), mask)
    return out


_SEEDED = threading.Lock()  # torch's generators are process-wide: one seeded apply at a time


@contextlib.contextmanager
def _seeded(seed: int | None, model: nn.Module) -> Iterator[None]:
    """Seed torch's generators for the apply, restoring the caller's RNG state afterwards: for methods
    that draw from torch's RNG rather than ``ctx.generators``."""
    if seed is None:
        yield
        return
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with _SEEDED, torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _out_of_memory(exc: BaseException) -> bool:
    return isinstance(exc, (MemoryError, torch.OutOfMemoryError))


def _batched(plan: Plan, units: list[list[Step]]) -> Iterator[list[Step]]:
    """The plan's units, with runs of small local steps of one rule that an elementwise score ranks (and
    of one shape and dtype) put together: they are selected in one batch, not one by one."""
    batch: list[Step] = []
    key: tuple[Any, ...] | None = None
    for unit in units:
        step = unit[0]
        info = plan.methods[step.method]
        caps = info.capabilities
        small = len(unit) == 1 and step.scope == "local" and 0 < step.tensor.numel <= selection.SMALL
        if small and caps.elementwise and caps.takes_amount and info.unit == "entries":
            this = (step.rule_index, step.tensor.shape)
            if this != key and batch:
                yield batch
                batch = []
            key = this
            batch.append(step)
            continue
        if batch:
            yield batch
            batch, key = [], None
        yield unit
    if batch:
        yield batch


def _stage(
    modules: dict[str, nn.Module],
    tensors: dict[int, Pruned],
    step: Step,
    generators: Generators | None,
    influences: Mapping[tuple[str, str], torch.Tensor] | None = None,
) -> Pruned:
    owners = [(modules[module], pname) for module, pname in step.tensor.owners]
    module, pname = owners[0]
    param = layout.original(module, pname)
    assert param is not None
    key = id(param)
    if key not in tensors:
        sharding = distributed.sharding_of(param)
        orig = distributed.local(param)  # a DTensor's part on this rank: the engine works on parts
        start = layout.mask(module, pname)
        start = None if start is None else distributed.local(start)
        tensors[key] = Pruned(step.tensor.name, step.tensor.module, owners, orig, start, start=start)
        tensors[key].sharding = sharding
        tensors[key].owner_names = list(step.tensor.owners)
        tensors[key].generators = generators
    tensors[key].rules.append(step.rule)
    owner = (step.tensor.module, step.tensor.param)
    if influences and owner in influences:
        tensors[key].blockwise = {"block_influence": influences[owner]}
    return tensors[key]


def _fail(step: Step, tensor: str, message: str) -> ApplyError:
    return ApplyError(step.rule, tensor, message)


def _amount(step: Step, unit: Unit, tensors: list[Pruned]) -> Any:
    """The amount to hand the method: the rule's, or a count of units reaching the rule's ``sparsity``
    (counted over every rank for DTensors)."""
    if step.sparsity is None:
        return step.amount
    done = distributed.reduce(
        [0 if t.mask is None else unit.pruned(t.mask) for t in tensors], [t.sharding for t in tensors]
    )
    return max(0, round(step.sparsity * sum(unit.count(t.shape) for t in tensors)) - sum(done))


def _instance(step: Step, info: MethodInfo, amount: Any, tensor: str) -> PruningMethod:
    try:
        return info.instance(amount, step.options)
    except Exception as exc:
        raise _fail(step, tensor, f"{info.name} could not be created: {type(exc).__name__}: {exc}") from exc


def _hook(step: Step, method: PruningMethod, tensor: str, pname: str) -> prune.BasePruningMethod:
    try:
        hook = method.hook()
    except Exception as exc:
        raise _fail(step, tensor, f"{step.method} could not be created: {type(exc).__name__}: {exc}") from exc
    hook._tensor_name = pname
    return hook


def _scores(step: Step, method: PruningMethod, ctx: MaskContext, grid: tuple[int, ...]) -> torch.Tensor:
    """A method's per-unit scores for one tensor, checked."""
    try:
        scores = method.score(ctx)
    except Exception as exc:
        raise _fail(step, ctx.name, f"{step.method} failed to score: {type(exc).__name__}: {exc}") from exc
    if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != grid:
        got = list(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise _fail(step, ctx.name, f"{step.method} gave scores of shape {got}, expected {list(grid)} (one per unit)")
    return scores.detach()


def _nan_last(scores: torch.Tensor) -> torch.Tensor:
    """A method's own scores with NaN ranked last (as +inf): what is selected from them needs no torch
    ranking to fall back on (a method that only scores has no ``compute_mask``)."""
    if not scores.is_floating_point() or not selection.has_nan(scores):
        return scores
    return scores.masked_fill(scores.isnan(), math.inf)


def _nan_last_of(score: selection.Score) -> selection.Score:
    def ranked(t: torch.Tensor) -> torch.Tensor:
        return _nan_last(score(t))

    return ranked


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _select(
    step: Step,
    entries: list[selection.Entry],
    amount: Any,
    score: selection.Score,
    name: str,
    planned: list[selection.Cut] | None = None,
) -> list[tuple[torch.Tensor, int]] | None:
    """New masks pruning the ``amount`` lowest-scored remaining entries across ``entries``, within the
    rule's per-tensor bounds, with their numbers of zeros (None: the scores have NaNs to prune, which
    only torch's ranking does).

    ``planned`` are cuts the planner found; they are used if they still prune exactly what they should
    (the weights may have changed since planning), which saves finding them again.
    """
    already = selection.pruned_counts(entries)
    sizes = [e.numel for e in entries]
    remaining = sum(sizes) - sum(already)
    k = n_to_prune(amount, remaining)
    if k > remaining:
        raise _fail(step, name, f"amount={amount} is more than the {remaining} units left to prune")
    low, high = budget_bounds(step.min_sparsity, step.max_sparsity, sizes, already)
    if not sum(low) <= sum(already) + k <= sum(high):
        raise _fail(step, name, bounds_problem(sum(low), sum(already) + k, sum(high)))
    dtype = selection.group_dtype(entries, score)
    # (only a shared cut: with per-tensor bounds in play, counts alone do not prove the split still fits)
    shared = len({id(c.value) for c in planned or [] if c.value is not None}) <= 1
    if planned is not None and shared and len(planned) == len(entries) and sum(c.pruned for c in planned) == k:
        with one_thread():
            masks = _masks(entries, planned, score, dtype)
        if [n for _, n in masks] == [done + cut.pruned for done, cut in zip(already, planned, strict=True)]:
            return masks
    with one_thread():
        cuts = selection.find_cuts(entries, k, score, already, low, high)
        return None if cuts is None else _masks(entries, cuts, score, dtype)


def _masks(
    entries: list[selection.Entry], cuts: list[selection.Cut], score: selection.Score, dtype: torch.dtype
) -> list[tuple[torch.Tensor, int]]:
    made = [selection.apply_cut(e, cut, score, dtype) for e, cut in zip(entries, cuts, strict=True)]
    counts = selection.read_counts([z for _, z in made], entries)
    return [(mask, n) for (mask, _), n in zip(made, counts, strict=True)]


def _unit_entry(tensor: Pruned, unit: Unit, scores: torch.Tensor) -> selection.Entry:
    """A tensor seen unit by unit: per-unit scores, and a unit mask (0 where the unit is pruned whole)."""
    if tensor.mask is None:
        return selection.Entry(scores)
    return selection.Entry(scores, (~unit.reduce(tensor.mask)).to(scores.dtype))


def _from_units(tensor: Pruned, unit: Unit, keep: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The entry mask of a per-unit decision, within the tensor's mask so far, and its zeros."""
    shape = tuple(tensor.orig.shape)
    mask = unit.expand(keep.to(torch.bool), shape).to(tensor.orig.dtype)
    if tensor.mask is None:
        pruned_units = keep.numel() - int(torch.count_nonzero(keep))
        return mask.contiguous(), pruned_units * (tensor.orig.numel() // max(keep.numel(), 1))
    mask = mask * tensor.mask.to(mask.dtype)
    return mask, zeros(mask)


def _select_units(
    step: Step, tensor: Pruned, amount: Any, unit: Unit, scores: torch.Tensor
) -> tuple[torch.Tensor, int]:
    """A local step's new mask for units beyond entries, in one pass: the units left ranked by the
    method's scores with ``topk``, as torch ranks channels (so ``ln_structured`` gives torch's masks).

    On one rank's part of a DTensor whose channels each lie on one rank, the per-channel scores and
    pruned flags of every rank are put together (one number per channel, never the tensor), ranked on
    every rank alike, and this rank's channels kept."""
    channels = None
    if tensor.sharding is not None:
        assert isinstance(unit, Channels)  # the planner refuses other units on DTensors
        channels = distributed.Channels(tensor.sharding, unit.dim % len(tensor.shape))
    flat = scores.reshape(-1) if channels is None else channels.assemble(scores.reshape(-1))
    done = None if tensor.mask is None else unit.reduce(tensor.mask).reshape(-1)
    if done is not None and channels is not None:
        done = channels.assemble(done.to(torch.uint8)) != 0
    left = None if done is None else (~done).nonzero().reshape(-1)
    ranked = flat if left is None else flat[left]
    size = ranked.numel()
    k = n_to_prune(amount, size)
    if k > size:
        raise _fail(step, tensor.name, f"amount={amount} is more than the {size} {unit.name} left to prune")
    if k == 0:
        mask = tensor.mask.clone() if tensor.mask is not None else torch.ones_like(tensor.orig)
        return mask, zeros(mask)
    kept = torch.topk(ranked, k=size - k, largest=True).indices
    keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    keep[kept if left is None else left[kept]] = True
    return _from_units(tensor, unit, keep.reshape(scores.shape) if channels is None else channels.part(keep))


def _run_batch(steps: list[Step], tensors: list[Pruned], info: MethodInfo) -> None:
    """Local steps of one rule on small tensors of one shape: one sort for all of them
    (:func:`prunespec.selection.select_rows`), the same masks as one by one."""
    groups: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, tensor in enumerate(tensors):
        groups.setdefault((tensor.orig.dtype, tensor.orig.device), []).append(i)
    sharded = any(t.sharding is not None for t in tensors)
    if len(groups) > 1 or len({id(t) for t in tensors}) < len(tensors) or sharded:
        for step, tensor in zip(steps, tensors, strict=True):
            _run_local(step, tensor, info)
        return
    values = torch.stack([t.orig.detach().reshape(-1) for t in tensors])
    size = values.shape[1]
    amounts = [_amount(step, Entries(), [t]) for step, t in zip(steps, tensors, strict=True)]
    # one method object and one hook record per distinct amount (install gives each tensor its own copy)
    methods: dict[tuple[type, Any], PruningMethod] = {}
    hooks: dict[tuple[type, Any], prune.BasePruningMethod] = {}
    for step, amount, tensor in zip(steps, amounts, tensors, strict=True):
        key = (type(amount), amount)
        if key not in methods:
            methods[key] = _instance(step, info, amount, tensor.name)
            hooks[key] = _hook(step, methods[key], tensor.name, tensor.owners[0][1])
    score = methods[type(amounts[0]), amounts[0]].elementwise() or _identity
    try:
        scores = score(values)
    except Exception as exc:
        raise _fail(steps[0], tensors[0].name, f"{info.name} failed to score: {type(exc).__name__}: {exc}") from exc
    masked = [t.mask is not None for t in tensors]
    already = [0] * len(tensors)
    if any(masked):
        previous = torch.stack([t.mask.reshape(-1) if t.mask is not None else torch.ones(size) for t in tensors])
        scores = scores.masked_fill(previous != 1, -math.inf)
        already = selection.row_counts(previous == 0).tolist()
    targets = []
    for step, amount, done, tensor in zip(steps, amounts, already, tensors, strict=True):
        k = n_to_prune(amount, size - done)
        if k > size - done:
            raise _fail(step, tensor.name, f"amount={amount} is more than the {size - done} entries left to prune")
        targets.append(done + k)
    pruned, ok = selection.select_rows(scores, torch.tensor(targets, device=values.device))
    new = (~pruned).to(values.dtype)
    counts = selection.row_counts(pruned).tolist()
    for i, (step, tensor, fine) in enumerate(zip(steps, tensors, ok.tolist(), strict=True)):
        if not fine:  # NaNs to prune: torch's own ranking, as one by one
            _run_local(step, tensor, info)
            continue
        tensor.mask = new[i].reshape(tensor.orig.shape).clone()
        tensor.zeros = counts[i]
        tensor.new_hooks.append(hooks[type(amounts[i]), amounts[i]])


def _run_local(step: Step, tensor: Pruned, info: MethodInfo) -> None:
    pname = tensor.owners[0][1]
    unit = info.units(step.options)
    per_row = info.per_row(step.options) and tensor.orig.dim() == 2
    # per row: the rule's own fraction or count applies to each row, not to the tensor
    amount = (step.amount if step.amount is not None else step.sparsity) if per_row else _amount(step, unit, [tensor])
    method = _instance(step, info, amount, tensor.name)
    hook = _hook(step, method, tensor.name, pname)
    caps = method.capabilities()
    if caps.updates_values:
        _reconstruct(step, tensor, method, info)
        tensor.new_hooks.append(hook)
        return
    if caps.scores and per_row:
        module = tensor.owners[0][0]
        scores = calibration.out_in(module, _scores(step, method, tensor.context(step.options), tensor.orig.shape))
        before = None if tensor.mask is None else calibration.out_in(module, tensor.mask)
        rows, row_len = scores.shape
        done = [0] * rows if before is None else selection.row_counts(before == 0).tolist()
        try:
            targets = row_targets(step.amount, step.sparsity, done, row_len)
        except ValueError as exc:
            raise _fail(step, tensor.name, str(exc)) from exc
        keep = selection.prune_rows(scores, before, targets).logical_not_()
        # bool: what the stop keeps anyway (a float mask would be made only to be turned back)
        tensor.mask = calibration.out_in(module, keep).contiguous()
        tensor.zeros = sum(targets)
        tensor.new_hooks.append(hook)
        return
    if caps.scores and info.needs_amount(step.options):
        if not isinstance(unit, Entries):
            scores = _scores(step, method, tensor.context(step.options), unit.grid(tuple(tensor.orig.shape)))
            tensor.mask, tensor.zeros = _select_units(step, tensor, amount, unit, scores)
            tensor.new_hooks.append(hook)
            return
        if caps.elementwise:
            entry, score = tensor.entry(), method.elementwise() or _identity
        else:
            scores = _nan_last(_scores(step, method, tensor.context(step.options), tuple(tensor.orig.shape)))
            entry, score = tensor.entry(scores), _identity
        masks = _select(step, [entry], amount, score, tensor.name)
        if masks is not None:
            mask, tensor.zeros = masks[0]
            tensor.mask = mask.to(tensor.orig.dtype)
            tensor.new_hooks.append(hook)
            return
    tensor.zeros = None
    # torch's own classes are known to leave their inputs alone and return proper masks; any other
    # method gets a copy to write into (the model must not change before install) and its mask checked
    trusted = info.cls.__module__ == prune.__name__
    before = tensor.mask
    try:
        ctx = tensor.context(step.options, copy=not trusted)
        mask = method.mask(ctx)
    except Exception as exc:
        if distributed.everywhere(exc):  # another rank's error, from a collective inside the method
            raise
        raise _fail(step, tensor.name, f"{info.name} failed: {type(exc).__name__}: {exc}") from exc
    if trusted:
        tensor.mask = mask.detach()
    else:
        tensor.mask = _checked(step, tensor, mask, before if before is not None else torch.ones_like(tensor.orig))
    tensor.new_hooks.append(hook)


def _reconstruct(step: Step, tensor: Pruned, method: PruningMethod, info: MethodInfo) -> None:
    """A method that changes the kept values too: its mask (checked) and its new values (checked)."""
    before = tensor.mask
    ctx = tensor.context(step.options)
    try:
        mask, values = method.reconstruct(ctx)
    except Exception as exc:
        if distributed.everywhere(exc):  # another rank's error, from a collective inside the method
            raise
        raise _fail(step, tensor.name, f"{info.name} failed: {type(exc).__name__}: {exc}") from exc
    tensor.mask = _checked(step, tensor, mask, before if before is not None else torch.ones_like(tensor.orig))
    orig = tensor.orig
    if not isinstance(values, torch.Tensor) or values.shape != orig.shape or values.dtype != orig.dtype:
        got = f"{list(values.shape)} {values.dtype}" if isinstance(values, torch.Tensor) else type(values).__name__
        raise _fail(step, tensor.name, f"{info.name} gave values {got}, expected {list(orig.shape)} {orig.dtype}")
    if values.device != orig.device:
        raise _fail(step, tensor.name, f"{info.name} gave values on {values.device}, expected {orig.device}")
    tensor.values = values.detach()
    tensor.zeros = None


def _run_global(
    model: nn.Module, unit: list[Step], tensors: list[Pruned], info: MethodInfo, planned: list[selection.Cut] | None
) -> None:
    """A global step: one budget over the group, selected exactly as ``prune.global_unstructured`` selects it."""
    step = unit[0]
    group = f"global group of {len(tensors)} tensors"
    units = [info.units(s.options) for s in unit]
    amount = _amount(step, units[0], tensors)
    method = _instance(step, info, amount, group)
    caps = method.capabilities()
    masks: list[tuple[torch.Tensor, int]] | None = None
    if caps.scores:
        if caps.elementwise and isinstance(units[0], Entries):
            entries = [t.entry() for t in tensors]
            masks = _select(step, entries, amount, method.elementwise() or _identity, group, planned)
        elif isinstance(units[0], Entries):
            entries = [
                t.entry(_nan_last(_scores(step, method, t.context(step.options), tuple(t.orig.shape)))) for t in tensors
            ]
            masks = _select(step, entries, amount, _identity, group, planned)
            masks = (
                None if masks is None else [(m.to(t.orig.dtype), n) for (m, n), t in zip(masks, tensors, strict=True)]
            )
        else:
            grids = [u.grid(tuple(t.orig.shape)) for u, t in zip(units, tensors, strict=True)]
            entries = [
                _unit_entry(t, u, _nan_last(_scores(step, method, t.context(step.options), g)))
                for t, u, g in zip(tensors, units, grids, strict=True)
            ]
            keeps = _select(step, entries, amount, _identity, group, planned)
            if keeps is not None:
                masks = [_from_units(t, u, k != 0) for t, u, (k, _) in zip(tensors, units, keeps, strict=True)]
    bounded = step.max_sparsity is not None or step.min_sparsity is not None
    if masks is None and bounded and caps.elementwise and isinstance(units[0], Entries):
        # NaNs to prune: torch's concatenated ranking knows no bounds, so NaN ranks last (as +inf) here
        entries = [t.entry() for t in tensors]
        masks = _select(step, entries, amount, _nan_last_of(method.elementwise() or _identity), group)
    if masks is None and bounded:
        raise _fail(step, group, "max_sparsity/min_sparsity need a method that scores entries (like l1_unstructured)")
    if masks is not None:
        for tensor, (mask, count) in zip(tensors, masks, strict=True):
            tensor.mask, tensor.zeros = mask, count
            tensor.new_hooks.append(GlobalMask(info.name, amount, len(tensors)))
        return
    scores = torch.cat([t.context(step.options).masked.reshape(-1) for t in tensors])
    default = torch.cat([(t.mask if t.mask is not None else torch.ones_like(t.orig)).reshape(-1) for t in tensors])
    ctx = MaskContext(group, "", "temp", model, scores, default, step.options, {}, tensors[0].generators)
    try:
        flat = method.mask(ctx)
    except Exception as exc:
        raise _fail(step, group, f"{info.name} failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(flat, torch.Tensor) or flat.numel() != default.numel():
        raise _fail(
            step, group, f"{info.name} returned a mask that does not cover the group's {default.numel()} entries"
        )
    del scores
    offset = 0
    for tensor in tensors:
        numel = tensor.orig.numel()
        own_default = tensor.mask if tensor.mask is not None else torch.ones_like(tensor.orig)
        piece = flat[offset : offset + numel].reshape(tensor.orig.shape).to(tensor.orig.dtype, copy=True)
        offset += numel
        tensor.zeros = None
        tensor.mask = _checked(step, tensor, piece, own_default)
        tensor.new_hooks.append(GlobalMask(info.name, amount, len(tensors)))


def _run_groups(plan: Plan, unit: list[Step], tensors: list[Pruned], info: MethodInfo) -> None:
    """A `group` rule: each unit scored by the sum of its members' per-entry scores (a block's by their
    mean), the lowest pruned per group or across the groups (``scope: global``), every member masked."""
    step = unit[0]
    rule = plan.spec.rules[step.rule_index]
    assert rule.group is not None
    options = rule.group
    amount = step.amount if step.amount is not None else step.sparsity
    method = _instance(step, info, amount, f"{len(tensors)} tensors of its groups")
    by_tensor = {(s.tensor.module, s.tensor.param): t for s, t in zip(unit, tensors, strict=True)}
    found = [plan.groups[i] for i in dict.fromkeys(s.group for s in unit if s.group is not None)]
    scores, already = [], []
    for planned in found:
        group = planned.group
        total = torch.zeros(group.size, dtype=torch.float64)
        entries = torch.zeros(group.size, dtype=torch.float64)
        for member in group.scored:
            tensor = by_tensor[member.module, member.param]
            if method.capabilities().elementwise:
                score = (method.elementwise() or _identity)(tensor.current.detach())
            else:
                score = _scores(step, method, tensor.context(step.options), tuple(tensor.orig.shape))
            if tensor.mask is not None:
                score = score * tensor.mask.to(score.dtype)
            total += groups.unit_scores(group, member, score).cpu()
            entries += groups.unit_entries(group, member, tensor.orig)
        scores.append(total / entries.clamp(min=1) if group.kind == "blocks" else total)
        already.append(groups.pruned_whole(group, lambda member: by_tensor[member.module, member.param].mask))
    least = options.min
    if step.scope == "global" and options.unit != "blocks":
        size = sum(p.group.size for p in found)
        done = sum(int(a.sum()) for a in already)
        k = to_prune(rule.amount, rule.sparsity, size - done, size, done)
        counts: list[int] | int = k or 0
    else:
        counts = []
        for planned, before in zip(found, already, strict=True):
            size, done = planned.group.size, int(before.sum())
            k = to_prune(rule.amount, rule.sparsity, size - done, size, done) or 0
            if k > size - done:
                raise _fail(step, planned.group.name, f"amount={amount} is more than the {size - done} units left")
            counts.append(size - groups.kept_count(size, done + k, options.round_to, least))
    keeps = groups.choose(scores, already, counts, options.round_to, least)
    for planned, keep in zip(found, keeps, strict=True):
        group = planned.group
        for member in group.members:
            if member.role == "sliced":
                continue  # a buffer: only shrink cuts it
            tensor = by_tensor[member.module, member.param]
            mask = groups.member_mask(group, member, keep.to(tensor.orig.device), tensor.orig)
            if tensor.mask is not None:
                mask = mask * tensor.mask.to(mask.dtype)
            tensor.mask, tensor.zeros = mask, zeros(mask)
            tensor.new_hooks.append(GlobalMask(info.name, amount if amount is not None else 0, len(group.members)))


def _checked(step: Step, tensor: Pruned, mask: Any, default: torch.Tensor) -> torch.Tensor:
    """The method's mask, if it is one: right shape, device and dtype, binary, keeping earlier zeros."""
    orig = tensor.orig
    if not isinstance(mask, torch.Tensor):
        raise _fail(step, tensor.name, f"the method returned {type(mask).__name__}, not a tensor")
    if mask.shape != orig.shape:
        raise _fail(step, tensor.name, f"the mask has shape {list(mask.shape)}, expected {list(orig.shape)}")
    if mask.device != orig.device:
        raise _fail(step, tensor.name, f"the mask is on {mask.device}, expected {orig.device}")
    if mask.dtype == torch.bool:
        mask = mask.to(default.dtype)
    elif not (mask.is_floating_point() or mask.dtype == default.dtype):
        raise _fail(step, tensor.name, f"the mask has dtype {mask.dtype}, expected {orig.dtype} or torch.bool")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise _fail(step, tensor.name, "the mask has values other than 0 and 1")
    if not bool((mask[default == 0] == 0).all()):
        raise _fail(step, tensor.name, "the mask un-prunes entries that earlier pruning removed")
    checked: torch.Tensor = mask.detach()
    return checked
