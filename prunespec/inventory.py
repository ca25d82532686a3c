"""What a spec author needs to know about a model before writing a spec, without a forward pass.

:func:`inventory` lists the modules that own parameters, collapsed into name patterns: modules whose
qualified names differ only in integer segments (``model.layers.0.mlp.down_proj``,
``model.layers.1.mlp.down_proj``) and that have the same type, parameter shapes and ``preset:
prunable`` verdict are one row (``model.layers.*.mlp.down_proj`` x32). Each row comes with a ``select``
that picks exactly its modules, checked with :func:`prunespec.selectors.select_modules`. Tied
parameters are listed with every name they are reachable by, and the known structures of
:mod:`prunespec.structures` (MLPs, attention modules, block lists) with the ``group:`` unit a
structural rule uses. Printing lives in :mod:`prunespec.render`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import layout, render, structures
from .group_planner import already_pruned
from .groups import Group, Kind, Member
from .report import count_zeros
from .selectors import select_modules

_INTEGER = re.compile(r"[0-9]+")
_BLOCKS = structures.DecoderBlocks()


@dataclass(frozen=True)
class ParamInfo:
    """One parameter of a row's modules (by the name users know: ``weight``, not ``weight_orig``):
    its shape in each module, and over all of them its zeros and how many modules have a mask on it."""

    name: str
    shape: tuple[int, ...]
    zeros: int  # summed over the row's modules: the mask's zeros where masked, else zero values
    masked: int  # modules of the row with a prune mask on this parameter
    tied: bool  # one of the row's modules shares it with another module (see Inventory.tied)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class ModuleRow:
    """Modules of one type, with the same parameter shapes and ``preset: prunable`` verdict, whose names
    differ only in integer segments."""

    pattern: str  # the names with ``*`` in the integer segments that differ
    names: tuple[str, ...]
    type: str  # the class name, as a ``types`` entry takes it
    type_path: str  # module.qualname of the class
    params: tuple[ParamInfo, ...]  # per module
    prunable: bool  # ``preset: prunable`` selects these modules
    selector: dict[str, list[str]]  # a ``select`` that picks exactly ``names``

    @property
    def count(self) -> int:
        return len(self.names)

    @property
    def numel(self) -> int:
        """Parameter entries of every module of the row (a tied one counted in each row it is in)."""
        return self.count * sum(p.numel for p in self.params)

    @property
    def zeros(self) -> int:
        return sum(p.zeros for p in self.params)

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "pattern": self.pattern,
            "count": self.count,
            "names": list(self.names),
            "type": self.type,
            "type_path": self.type_path,
            "parameters": [
                {
                    "name": p.name,
                    "shape": list(p.shape),
                    "numel": p.numel,
                    "zeros": p.zeros,
                    "masked": p.masked,
                    "tied": p.tied,
                }
                for p in self.params
            ],
            "numel": self.numel,
            "zeros": self.zeros,
            "sparsity": self.sparsity,
            "prunable": self.prunable,
            "selector": self.selector,
        }


@dataclass(frozen=True)
class TiedParameter:
    """One Parameter reachable under several names (GPT-2's ``lm_head.weight`` and ``transformer.wte.weight``)."""

    names: tuple[str, ...]  # ``module.param``, in the order the model's modules come
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def to_dict(self) -> dict[str, Any]:
        return {"names": list(self.names), "shape": list(self.shape), "numel": self.numel}


@dataclass(frozen=True)
class MemberInfo:
    """One tensor a structure's unit spans, named relative to the structure (to each block for blocks)."""

    tensor: str
    shape: tuple[int, ...]
    dim: int
    width: int
    offset: int
    role: str


@dataclass(frozen=True)
class StructureRow:
    """Known structures (:mod:`prunespec.structures`) of the same shape whose names differ only in integer
    segments, with what a ``group:`` rule on them takes."""

    pattern: str
    names: tuple[str, ...]  # where each group is: the MLP, the attention module, the block list
    structure: str  # swiglu_mlp, mlp, attention, decoder_blocks
    unit: Kind  # the rule's ``group: {unit: ...}``
    units: int  # units per group (for attention: KV heads, each with its query heads)
    heads: int | None  # attention: query heads per group
    members: tuple[MemberInfo, ...]
    selector: dict[str, list[str]]  # a ``select`` that picks exactly the modules a rule names
    pruned: int  # units pruned whole already, over all the row's groups

    @property
    def count(self) -> int:
        return len(self.names)

    def to_dict(self) -> dict[str, Any]:
        return {
            "pattern": self.pattern,
            "count": self.count,
            "names": list(self.names),
            "structure": self.structure,
            "unit": self.unit,
            "units": self.units,
            "heads": self.heads,
            "kv_heads": self.units if self.unit == "heads" else None,
            "members": [
                {
                    "tensor": m.tensor,
                    "shape": list(m.shape),
                    "dim": m.dim,
                    "width": m.width,
                    "offset": m.offset,
                    "role": m.role,
                }
                for m in self.members
            ],
            "selector": self.selector,
            "group": {"unit": self.unit},
            "pruned_units": self.pruned,
        }


@dataclass(frozen=True)
class Inventory:
    """A model's modules with parameters (collapsed into rows), its tied parameters and its known
    structures, with totals over every parameter of the model (a tied one counted once)."""

    modules: tuple[ModuleRow, ...]
    tied: tuple[TiedParameter, ...]
    structures: tuple[StructureRow, ...]
    parameters: int  # entries of every distinct parameter
    zeros: int  # their zeros (masks' zeros where masked)
    prunable_weights: int  # entries of the distinct weights ``preset: prunable`` selects

    @property
    def sparsity(self) -> float:
        return self.zeros / self.parameters if self.parameters else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "modules": [row.to_dict() for row in self.modules],
            "tied": [t.to_dict() for t in self.tied],
            "structures": [row.to_dict() for row in self.structures],
            "totals": {
                "rows": len(self.modules),
                "modules": sum(row.count for row in self.modules),
                "parameters": self.parameters,
                "zeros": self.zeros,
                "sparsity": self.sparsity,
                "prunable_modules": sum(row.count for row in self.modules if row.prunable),
                "prunable_weights": self.prunable_weights,
            },
        }

    def __str__(self) -> str:
        return render.format_inventory(self)


def inventory(model: nn.Module) -> Inventory:
    """The inventory of ``model``; reads it, never changes it (no forward pass)."""
    with torch.no_grad():
        return _inventory(model)


def _inventory(model: nn.Module) -> Inventory:
    modules = list(model.named_modules())  # the modules a spec's selectors see
    owning = [(name, m) for name, m in modules if any(p is not None for p in m._parameters.values())]
    owners = {name for name, _ in owning}
    prunable = {name for name, _, _ in select_modules(modules, None, None, [], "prunable").modules}
    tied = _tied(model)
    shared = set(tied)

    distinct: dict[int, torch.Tensor] = {}  # each parameter once, with what its zeros are counted on
    for _, module in owning:
        for _, param, mask in layout.named_tensors(module):
            distinct.setdefault(id(param), mask if mask is not None else param.detach())
    zeros = dict(zip(distinct, count_zeros(list(distinct.values())), strict=True))

    rows: dict[tuple[Any, ...], list[tuple[str, nn.Module]]] = {}
    for name, module in owning:
        shapes = tuple(sorted((pname, tuple(p.shape)) for pname, p, _ in layout.named_tensors(module)))
        key = (_starred(name), type(module), shapes, name in prunable)
        rows.setdefault(key, []).append((name, module))
    module_rows = []
    for members in rows.values():
        names = [name for name, _ in members]
        first = members[0][1]
        each = [{n: (p, m) for n, p, m in layout.named_tensors(module)} for _, module in members]
        params = []
        # biases after weights: pruning moves a parameter to the end of ``_parameters`` (as ``_orig``)
        for pname, param, _ in sorted(layout.named_tensors(first), key=lambda t: "bias" in t[0]):
            owned = [tensors[pname] for tensors in each]
            params.append(
                ParamInfo(
                    pname,
                    tuple(param.shape),
                    sum(zeros[id(p)] for p, _ in owned),
                    sum(m is not None for _, m in owned),
                    any(id(p) in shared for p, _ in owned),
                )
            )
        cls = type(first)
        module_rows.append(
            ModuleRow(
                _pattern(names),
                tuple(names),
                cls.__name__,
                f"{cls.__module__}.{cls.__qualname__}",
                tuple(params),
                names[0] in prunable,
                _selector(modules, names, among=owners),
            )
        )
    prunable_weights = {
        id(w): w.numel() for name, m in owning if name in prunable and (w := layout.original(m, "weight")) is not None
    }
    return Inventory(
        tuple(module_rows),
        tuple(tied.values()),
        tuple(_structures(model, modules)),
        sum(t.numel() for t in distinct.values()),
        sum(zeros.values()),
        sum(prunable_weights.values()),
    )


def _tied(model: nn.Module) -> dict[int, TiedParameter]:
    """Parameters reachable under more than one name (through two modules, or one module reached
    twice), by ``id`` of the Parameter."""
    owners: dict[int, tuple[torch.Tensor, list[str]]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for pname, param, _ in layout.named_tensors(module):
            name = f"{module_name}.{pname}" if module_name else pname
            owners.setdefault(id(param), (param, []))[1].append(name)
    return {
        key: TiedParameter(tuple(names), tuple(param.shape)) for key, (param, names) in owners.items() if len(names) > 1
    }


# --- patterns and selectors ----------------------------------------------------------------------


def _starred(name: str) -> tuple[str, ...]:
    """The segments of a name, every integer one as ``*``: names alike but for integers are alike here."""
    return tuple("*" if _INTEGER.fullmatch(s) else s for s in name.split("."))


def _pattern(names: Sequence[str]) -> str:
    """The names with ``*`` in each integer segment that differs among them (all share one starred form)."""
    split = [name.split(".") for name in names]
    return ".".join("*" if len({parts[i] for parts in split}) > 1 else segment for i, segment in enumerate(split[0]))


def escape_glob(name: str) -> str:
    """A ``names`` glob matching exactly ``name``: glob characters put in brackets (``[*]``), and a
    leading ``re:`` broken so that the entry is not read as a regex."""
    out = "".join(f"[{c}]" if c in "*?[" else c for c in name)
    return "[r]" + out[1:] if out.startswith("re:") else out


def _selector(
    modules: Sequence[tuple[str, nn.Module]], names: Sequence[str], among: set[str] | None = None
) -> dict[str, list[str]]:
    """A ``select`` whose ``names`` pick exactly ``names`` among ``modules``: the row's glob (``*`` in
    the integer segments that differ), else ``?*`` there (``*`` also matches the root's empty name),
    else a ``re:`` pattern with ``[0-9]+`` there (a sibling that is not a number matched), else one
    with each segment's values, else the names one by one. With ``among``, only those modules count:
    a module rule skips modules without the parameters it prunes, so picking them too changes nothing."""
    wanted = list(names)
    if len(wanted) == 1:  # an escaped literal matches only that name: nothing to check
        return {"names": [escape_glob(wanted[0])]}
    split = [name.split(".") for name in wanted]
    varied = [len({parts[i] for parts in split}) > 1 for i in range(len(split[0]))]
    globs = [
        ".".join(star if v else escape_glob(s) for v, s in zip(varied, split[0], strict=True)) for star in ("*", "?*")
    ]
    values = [list(dict.fromkeys(parts[i] for parts in split)) for i in range(len(split[0]))]
    fixed = [re.escape(vs[0]) for vs in values]
    numbers = "re:" + r"\.".join("[0-9]+" if v else f for v, f in zip(varied, fixed, strict=True))
    listed = [f"(?:{'|'.join(vs)})" if v else f for v, vs, f in zip(varied, values, fixed, strict=True)]
    these = "re:" + r"\.".join(listed)
    for entry in (*globs, numbers, these):
        if _selects(modules, [entry], wanted, among):
            return {"names": [entry]}
    return {"names": [escape_glob(name) for name in wanted]}


def _selects(
    modules: Sequence[tuple[str, nn.Module]], entries: list[str], wanted: Iterable[str], among: set[str] | None
) -> bool:
    try:
        picked = {name for name, _, _ in select_modules(modules, None, entries, []).modules}
    except ValueError:  # a pattern the safety check refuses: try the next form
        return False
    return (picked if among is None else picked & among) == set(wanted)


# --- known structures ----------------------------------------------------------------------------


def _structures(model: nn.Module, modules: Sequence[tuple[str, nn.Module]]) -> list[StructureRow]:
    by_name = dict(modules)
    found: list[tuple[Group, str]] = []  # (group, the module a rule selects: the structure, or each block)
    for name, module in modules:
        for kind in ("channels", "heads"):
            group = structures.find(kind, name, module)
            if group is not None:
                found.append((group, name))
        if isinstance(module, nn.ModuleList) and len(module):
            children = [f"{name}.{child}" if name else child for child in module._modules]
            if all(_BLOCKS.writers(c, by_name[c]) is not None for c in children if c in by_name):
                block_group = structures.block_group(model, children)
                if isinstance(block_group, Group):
                    found.append((block_group, name))
    rows: dict[tuple[Any, ...], list[Group]] = {}
    for group, name in found:
        members = tuple(dict.fromkeys(_member(by_name, group, m) for m in group.members))  # blocks: once each
        # block lists are never collapsed: a blocks rule takes the blocks of one ModuleList
        where = (name,) if group.kind == "blocks" else _starred(name)
        key = (where, group.structure, group.kind, group.size, _heads(group), members)
        rows.setdefault(key, []).append(group)
    out = []
    for (_, structure, kind, size, heads, members), groups in rows.items():
        names = [g.name for g in groups]
        selected = list(groups[0].unit_names) if kind == "blocks" else names
        out.append(
            StructureRow(
                _pattern(names),
                tuple(names),
                structure,
                kind,
                size,
                heads,
                members,
                _selector(modules, selected),
                sum(int(already_pruned(by_name, g).sum()) for g in groups),
            )
        )
    return out


def _member(by_name: dict[str, nn.Module], group: Group, member: Member) -> MemberInfo:
    base = group.unit_names[member.block] if member.block is not None else group.name
    relative = member.module[len(base) + 1 :] if base and member.module.startswith(base + ".") else member.module
    tensor = layout.original(by_name[member.module], member.param)
    shape = tuple(tensor.shape) if tensor is not None else ()
    name = f"{relative}.{member.param}" if relative else member.param
    return MemberInfo(name, shape, member.dim, member.width, member.offset, member.role)


def _heads(group: Group) -> int | None:
    """An attention group's query heads: a unit spans one KV head's query heads (the first scored
    member, q) and that KV head (the second, k), so the ratio of their widths is the query heads per unit."""
    if group.kind != "heads":
        return None
    q, k = group.scored[0], group.scored[1]
    return group.size * q.width // k.width
