"""Removing pruned units physically: the model gets smaller and faster.

:func:`shrink` finds every coupled group of the model (:mod:`prunespec.structures`) whose units are
pruned whole in every member's mask, slices those units out of the members (weights, biases, norm
parameters, buffers), removes whole pruned blocks from their ModuleList, and updates what records the
widths (module attributes, the transformers config where the new widths are uniform). The outputs
are then checked against the masked model's on example inputs; on a mismatch, or any error, every
change is undone and the group at fault is named.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import groups, layout
from .errors import ShrinkError
from .group_planner import already_pruned
from .groups import Group, Member
from .sequential import run_batch
from .structures import BY_ID, STRUCTURES, block_group, find
from .transaction import ObjectState

RTOL = 1e-4


@dataclass(frozen=True)
class Shrunk:
    """One group shrink removed units from: ``before`` and ``after`` units."""

    kind: str
    name: str
    structure: str
    before: int
    after: int
    removed: tuple[str, ...] = ()  # blocks: the names of the blocks removed
    kept_units: tuple[int, ...] = ()  # the indices of the units kept
    unit_names: tuple[str, ...] = ()  # blocks: every block's name before the shrink
    members: tuple[Member, ...] = ()  # traced groups: the members (no structure finds them again)

    def record(self) -> dict[str, Any]:
        """What a checkpoint stores to shrink a fresh model the same way (plain data)."""
        extra: dict[str, Any] = {}
        if self.members:
            extra["members"] = [
                {
                    "module": m.module,
                    "param": m.param,
                    "dim": m.dim,
                    "width": m.width,
                    "offset": m.offset,
                    "role": m.role,
                }
                for m in self.members
            ]
        return extra | {
            "kind": self.kind,
            "name": self.name,
            "structure": self.structure,
            "size": self.before,
            "kept": list(self.kept_units),
            "units": list(self.unit_names),
        }


@dataclass
class ShrinkReport:
    """What :func:`shrink` removed, the parameters before and after, and the largest relative
    difference of the outputs from the masked model's (None when not checked)."""

    groups: list[Shrunk] = field(default_factory=list)
    parameters_before: int = 0
    parameters_after: int = 0
    error: float | None = None
    notes: list[str] = field(default_factory=list)  # what the model's config could not record

    def to_dict(self) -> dict[str, Any]:
        return {
            "groups": [
                {"kind": g.kind, "name": g.name, "structure": g.structure, "before": g.before, "after": g.after}
                | {"removed": list(g.removed)}
                for g in self.groups
            ],
            "parameters_before": self.parameters_before,
            "parameters_after": self.parameters_after,
            "error": self.error,
            "notes": list(self.notes),
        }

    def __str__(self) -> str:
        from . import render

        return render.format_shrink(self)


def removable(model: nn.Module, inputs: Any = None) -> list[tuple[Group, torch.Tensor]]:
    """Every known group of ``model`` with units pruned whole in all its members, and which units it
    keeps (bool per unit): blocks first, then channels and heads in module order (but none inside a
    block that is removed). Given ``inputs``, pruned tensors that no known structure covers are looked
    for in the groups traced from them (:mod:`prunespec.discovery`)."""
    modules = dict(model.named_modules())
    out: list[tuple[Group, torch.Tensor]] = []
    covered: set[str] = set()  # tensors some known group spans
    blocks: list[tuple[Group, torch.Tensor]] = []
    for name, module in modules.items():
        for kind in ("channels", "heads"):
            group = find(kind, name, module)
            if group is not None:
                covered.update(m.tensor for m in group.members)
                pruned = already_pruned(modules, group)
                if bool(pruned.any()):
                    out.append((group, ~pruned))
        if isinstance(module, nn.ModuleList) and len(module) > 1:
            prefix = f"{name}." if name else ""
            found = block_group(model, [prefix + key for key in module._modules])
            if isinstance(found, Group):
                covered.update(m.tensor for m in found.members)
                pruned = already_pruned(modules, found)
                if bool(pruned.any()):
                    blocks.append((found, ~pruned))
    left = [name for name, _, _, _ in layout.pruned_in(model) if name not in covered]
    if left and inputs is not None:
        out += _traced(model, modules, inputs)
    gone = [name for group, keep in blocks for name, k in zip(group.unit_names, keep.tolist(), strict=True) if not k]
    inside = [(g, k) for g, k in out if not any(g.name == b or g.name.startswith(b + ".") for b in gone)]
    return blocks + inside  # blocks first: groups inside a removed block go with it


def _traced(model: nn.Module, modules: Mapping[str, nn.Module], inputs: Any) -> list[tuple[Group, torch.Tensor]]:
    """The traced channel groups with units pruned whole in all their members."""
    from .discovery import DiscoveryError, discover  # fx is only loaded for models that need it

    try:
        found = discover(model, inputs)
    except DiscoveryError:
        return []  # a model fx cannot trace (a transformers model): its known structures are all there is
    out = []
    for group in found:
        pruned = already_pruned(dict(modules), group)
        if bool(pruned.any()):
            out.append((group, ~pruned))
    return out


def shrink(model: nn.Module, inputs: Any = None, *, rtol: float = RTOL) -> ShrinkReport:
    """Remove every unit the masks prune whole from ``model``'s coupled groups, in place.

    ``inputs``: example inputs to check the result with (a batch as ``prunespec.apply``'s ``data``
    takes one: a Tensor, a tuple of positional arguments or a mapping of keyword arguments). For a
    transformers model they may be left out: a few random token ids are used. The shrunk model's
    outputs must equal the masked model's within ``rtol`` (relative to the largest output); otherwise,
    and on any error, the model is put back as it was and a ShrinkError names the group at fault.
    """
    found = removable(model, inputs)
    report = ShrinkReport(parameters_before=_count(model))
    if not found:
        report.parameters_after = report.parameters_before
        return report
    batch = _example(model) if inputs is None else inputs
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            expected = _outputs(model, batch, "the masked model")
            undo, notes = _apply(model, found)
            try:
                error = _difference(expected, _outputs(model, batch, "the shrunk model"))
                if not error <= rtol:
                    undo()
                    raise ShrinkError(_culprit(model, found, batch, expected, rtol), error)
            except BaseException:
                undo()
                raise
    finally:
        model.train(was_training)
    report.error = error
    report.notes = notes
    report.parameters_after = _count(model)
    for group, keep in found:
        kept = tuple(keep.nonzero().reshape(-1).tolist())
        removed = tuple(n for n, k in zip(group.unit_names, keep.tolist(), strict=False) if not k)
        traced = group.members if group.structure == "traced" else ()
        shrunk = Shrunk(
            group.kind, group.name, group.structure, group.size, len(kept), removed, kept, group.unit_names, traced
        )
        report.groups.append(shrunk)
    # what prunespec.save stores, so that prunespec.load can shrink a freshly built model the same way
    model.__dict__[HISTORY] = [*history(model), [g.record() for g in report.groups]]
    return report


HISTORY = "_prunespec_shrunk"


def history(model: nn.Module) -> list[list[dict[str, Any]]]:
    """The shrinks ``model`` went through, oldest first: each the records of its groups."""
    value = model.__dict__.get(HISTORY)
    return list(value) if isinstance(value, list) else []


def replay(model: nn.Module, shrinks: Sequence[Sequence[Mapping[str, Any]]]) -> Callable[[], None]:
    """Shrink a freshly built model as the recorded ``shrinks`` did (no masks needed, nothing checked
    against outputs: the weights come after); returns what undoes it. Raises ShrinkError naming the
    record that does not fit the model, with the model left as it was."""
    undos: list[Callable[[], None]] = []

    def undo() -> None:
        for step in reversed(undos):
            step()

    try:
        for index, records in enumerate(shrinks):
            modules = dict(model.named_modules())
            found = [_recorded_group(model, modules, index, record) for record in records]
            step, _ = _apply(model, found)
            undos.append(step)
    except BaseException:
        undo()
        raise
    model.__dict__[HISTORY] = [list(r) for r in shrinks]
    undos.append(lambda: model.__dict__.pop(HISTORY, None))
    return undo


def _traced_record(modules: Mapping[str, nn.Module], record: Mapping[str, Any]) -> Group | str:
    """A traced group from its recorded members, each checked against the model."""
    members = []
    for raw in record.get("members", []):
        module = modules.get(raw["module"])
        tensor = None if module is None else layout.original(module, raw["param"])
        if tensor is None and module is not None:
            tensor = module._buffers.get(raw["param"])
        if tensor is None:
            return f"the model has no tensor {raw['module']}.{raw['param']}"
        dim, width, offset = raw["dim"], raw["width"], raw["offset"]
        if not (0 <= dim < tensor.dim() and width >= 1 and offset >= 0) or offset + record["size"] * width > int(
            tensor.shape[dim]
        ):
            return f"{raw['module']}.{raw['param']} (shape {list(tensor.shape)}) does not hold the recorded units"
        members.append(Member(raw["module"], raw["param"], dim, width, offset, raw["role"]))
    if not members:
        return "a traced group's record lists no members"
    return Group("channels", record["name"], "traced", record["size"], tuple(members))


def _recorded_group(
    model: nn.Module, modules: Mapping[str, nn.Module], index: int, record: Mapping[str, Any]
) -> tuple[Group, torch.Tensor]:
    kind, name, size, kept = record["kind"], record["name"], record["size"], record["kept"]
    where = f"shrink {index}, {kind} group {name}"
    if record["structure"] == "traced":
        found: Group | str | None = _traced_record(modules, record)
    elif kind == "blocks":
        found = block_group(model, list(record["units"]))
    else:
        module = modules.get(name)
        found = None if module is None else find(kind, name, module)
    if not isinstance(found, Group):
        why = found if isinstance(found, str) else f"the model has no {kind} group at {name or 'its root'}"
        raise ShrinkError(f"{where}: {why}")
    if found.size != size or found.structure != record["structure"]:
        raise ShrinkError(
            f"{where}: recorded as {size} units ({record['structure']}), the model has {found.size} ({found.structure})"
        )
    keep = torch.zeros(size, dtype=torch.bool)
    keep[list(kept)] = True
    return found, keep


def _apply(model: nn.Module, found: Sequence[tuple[Group, torch.Tensor]]) -> tuple[Callable[[], None], list[str]]:
    """Shrink every group; returns what undoes it all (also run here on any failure), and what the
    config could not record."""
    modules = dict(model.named_modules())
    saved = [ObjectState(m) for m in modules.values()]
    config = getattr(model, "config", None)
    if config is not None:
        saved.append(ObjectState(config))

    def undo() -> None:
        for state in saved:
            state.restore()

    try:
        for group, keep in found:
            _slice(modules, group, keep)
        notes: list[str] = []
        for group, keep in found:  # widths are read from the model as it now is: after every slice
            note = BY_ID[group.structure].update(model, modules[group.name], group, keep.tolist())
            if note is not None and note not in notes:
                notes.append(note)
    except BaseException:
        undo()
        raise
    return undo, notes


def _slice(modules: Mapping[str, nn.Module], group: Group, keep: torch.Tensor) -> None:
    """Cut the units not in ``keep`` out of ``group``'s members (or remove its pruned blocks)."""
    if group.kind == "blocks":
        blocks = modules[group.name]
        assert isinstance(blocks, nn.ModuleList)
        for index in sorted((~keep).nonzero().reshape(-1).tolist(), reverse=True):
            del blocks[index]
        for member in group.members:  # a kept block's writers lost nothing: no mask left to keep
            module = modules[member.module]
            mask = layout.mask(module, member.param)
            if keep[member.block] and mask is not None and bool(mask.all()):
                layout.remove(module, member.param)
        return
    on: dict[tuple[str, str, int], list[Member]] = {}
    for member in group.members:
        on.setdefault((member.module, member.param, member.dim), []).append(member)
    for (name, pname, dim), members in on.items():
        module = modules[name]
        tensor = layout.original(module, pname)
        if tensor is None:
            tensor = module._buffers.get(pname)
        assert tensor is not None
        index = groups.kept_indices(group, members, keep.tolist(), int(tensor.shape[dim]))
        layout.keep_only(module, pname, dim, index)
    for name in dict.fromkeys(m.module for m in group.members):
        _fix_attributes(modules[name], depthwise=_is_depthwise(modules[name]))


def _is_depthwise(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1 and module.groups == module.in_channels


def _fix_attributes(module: nn.Module, *, depthwise: bool) -> None:
    """A layer's width attributes, after its tensors were sliced (``depthwise``: it was a depthwise
    conv, one group per channel, and stays one)."""
    weight = layout.original(module, "weight")
    layer: Any = module
    if isinstance(module, nn.modules.batchnorm._NormBase):  # BatchNorm, InstanceNorm
        stats = module._buffers.get("running_mean")
        sized = weight if weight is not None else stats
        if sized is not None:
            layer.num_features = int(sized.shape[0])
        return
    if weight is None:
        return
    kind = type(module).__name__
    if isinstance(module, nn.Linear):
        layer.out_features, layer.in_features = int(weight.shape[0]), int(weight.shape[1])
    elif kind == "Conv1D" and hasattr(module, "nf"):
        layer.nx, layer.nf = int(weight.shape[0]), int(weight.shape[1])
    elif isinstance(module, nn.modules.conv._ConvTransposeNd):  # weight (in, out / groups, ...)
        layer.in_channels, layer.out_channels = int(weight.shape[0]), int(weight.shape[1]) * module.groups
    elif isinstance(module, nn.modules.conv._ConvNd):  # weight (out, in / groups, ...)
        if depthwise:
            layer.groups = layer.in_channels = layer.out_channels = int(weight.shape[0])
        else:
            layer.out_channels, layer.in_channels = int(weight.shape[0]), int(weight.shape[1]) * module.groups
    elif isinstance(module, nn.GroupNorm):
        layer.num_channels = layer.num_groups = int(weight.shape[0])
    elif isinstance(module, nn.Embedding):
        layer.embedding_dim = int(weight.shape[1])
    elif isinstance(module, nn.PReLU):
        layer.num_parameters = int(weight.shape[0])


def _count(model: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None and id(param) not in seen and not name.endswith("_mask"):
                seen.add(id(param))
                total += param.numel()
    return total


def _example(model: nn.Module) -> Any:
    """A few random token ids for a transformers model; else a ShrinkError asking for inputs."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if not isinstance(vocab, int) or vocab <= 0:
        raise ShrinkError("shrink checks the shrunk model against the masked one: pass example inputs (inputs=...)")
    generator = torch.Generator().manual_seed(0)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return {"input_ids": torch.randint(0, vocab, (2, 16), generator=generator).to(device)}


def _tensors(output: Any) -> Iterator[torch.Tensor]:
    """The floating-point tensors of a model's output (a tensor, tuple, mapping or ModelOutput)."""
    if isinstance(output, torch.Tensor):
        if output.is_floating_point():
            yield output
    elif isinstance(output, Mapping):
        for value in output.values():
            yield from _tensors(value)
    elif isinstance(output, (tuple, list)):
        for value in output:
            yield from _tensors(value)


def _outputs(model: nn.Module, batch: Any, what: str) -> list[torch.Tensor]:
    try:
        output = run_batch(model, batch)
    except Exception as exc:
        raise ShrinkError(f"{what} cannot run the example inputs: {type(exc).__name__}: {exc}") from exc
    found = [t.detach().clone() for t in _tensors(output) if t.dim() > 0]
    if not found:
        raise ShrinkError(f"{what} returned no floating-point tensor to check")
    return found


def _difference(expected: list[torch.Tensor], got: list[torch.Tensor]) -> float:
    """The largest absolute difference relative to the largest expected value, over the outputs."""
    if len(expected) != len(got) or any(a.shape != b.shape for a, b in zip(expected, got, strict=False)):
        return math.inf
    worst = 0.0
    for a, b in zip(expected, got, strict=True):
        scale = float(a.abs().max()) if a.numel() else 0.0
        diff = float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
        worst = max(worst, diff / scale if scale > 0 else diff)
    return worst


def _culprit(
    model: nn.Module,
    found: Sequence[tuple[Group, torch.Tensor]],
    batch: Any,
    expected: list[torch.Tensor],
    rtol: float,
) -> str:
    """The first group whose shrink alone changes the outputs (the model is put back each time)."""
    for group, keep in found:
        undo, _ = _apply(model, [(group, keep)])
        try:
            error = _difference(expected, _outputs(model, batch, "the shrunk model"))
        finally:
            undo()
        if not error <= rtol:
            return f"{group.kind} group {group.name} ({group.structure})"
    return "the groups together (no single group changes the outputs alone)"


__all__ = ["STRUCTURES", "ShrinkReport", "Shrunk", "removable", "shrink"]
