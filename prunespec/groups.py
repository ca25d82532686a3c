"""Coupled groups: tensors that must lose the same units together, so that the units can be removed.

A :class:`Group` is what a structural rule prunes and what :func:`prunespec.shrink` removes: a number
of units (channels, attention heads, whole blocks) and the tensors (:class:`Member`) each unit spans.
A producer's output rows, its bias, the norm after it and its consumers' input columns are members
of one channel group; a KV head with its query heads is one unit of a head group. Where the groups
come from is :mod:`prunespec.structures`; this module is only their arithmetic: which entries of a
member a unit covers, per-unit scores from per-entry ones, and a member's mask from the units kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

Kind = Literal["channels", "heads", "blocks"]
Role = Literal["scored", "masked", "sliced"]

KINDS: tuple[Kind, ...] = ("channels", "heads", "blocks")


@dataclass(frozen=True)
class Member:
    """One tensor of a group.

    Along ``dim``, unit ``u`` covers entries ``offset + u * width`` up to ``offset + (u + 1) * width``
    (``offset`` places the units inside a fused tensor, as GPT-2's ``c_attn`` holds q, k and v); entries
    outside ``[offset, offset + size * width)`` belong to no unit and are always kept. With ``block``
    set the whole tensor belongs to that one unit (a block's residual writers).

    ``role``: ``scored`` (a weight: scored and masked), ``masked`` (a bias or norm parameter: masked,
    not scored) or ``sliced`` (a buffer such as BatchNorm's running mean: only sliced by shrink).
    """

    module: str
    param: str
    dim: int = 0
    width: int = 1
    offset: int = 0
    role: Role = "scored"
    block: int | None = None

    @property
    def tensor(self) -> str:
        return f"{self.module}.{self.param}" if self.module else self.param


@dataclass(frozen=True)
class Group:
    """Units that are pruned, and removed, as one: ``size`` of them, spanning ``members``.

    ``name`` is where the group was found (the MLP, the attention module, the block list);
    ``structure`` is the known structure it was found as (:mod:`prunespec.structures`), which says
    what else changes when units are removed (module attributes, a transformers config).
    """

    kind: Kind
    name: str
    structure: str
    size: int
    members: tuple[Member, ...]
    unit_names: tuple[str, ...] = ()  # blocks: each unit's module name

    def unit_label(self, unit: int) -> str:
        return self.unit_names[unit] if self.unit_names else str(unit)

    @property
    def scored(self) -> tuple[Member, ...]:
        return tuple(m for m in self.members if m.role == "scored")


def _along(member: Member, size: int, tensor: torch.Tensor) -> torch.Tensor:
    """The member's units as rows: a (size, entries per unit) view-or-copy of ``tensor``."""
    moved = tensor.movedim(member.dim, 0)
    part = moved[member.offset : member.offset + size * member.width]
    return part.reshape(size, -1)


def unit_scores(group: Group, member: Member, scores: torch.Tensor) -> torch.Tensor:
    """Per-unit sums of a member's per-entry ``scores`` (float64, one per unit)."""
    if member.block is not None:
        out = torch.zeros(group.size, dtype=torch.float64, device=scores.device)
        out[member.block] = scores.to(torch.float64).sum()
        return out
    return _along(member, group.size, scores).to(torch.float64).sum(dim=1)


def unit_entries(group: Group, member: Member, tensor: torch.Tensor) -> torch.Tensor:
    """How many entries of the member each unit covers (for per-entry means), one per unit."""
    if member.block is not None:
        out = torch.zeros(group.size, dtype=torch.float64)
        out[member.block] = tensor.numel()
        return out
    per_unit = tensor.numel() // tensor.shape[member.dim] * member.width
    return torch.full((group.size,), float(per_unit), dtype=torch.float64)


def pruned_units(group: Group, member: Member, mask: torch.Tensor | None) -> torch.Tensor:
    """Which units the member's ``mask`` (None: not pruned) prunes whole, bool per unit; a block's
    member says True for the other blocks, so that the members' answers combine with ``&``."""
    if member.block is not None:
        out = torch.ones(group.size, dtype=torch.bool)
        out[member.block] = mask is not None and not bool(mask.any())
        return out
    if mask is None:
        return torch.zeros(group.size, dtype=torch.bool)
    return ~_along(member, group.size, mask).bool().any(dim=1).cpu()


def pruned_whole(group: Group, mask_of: Callable[[Member], torch.Tensor | None]) -> torch.Tensor:
    """Units every member's mask prunes whole, bool per unit: ``mask_of(member)`` is a member's mask
    (None: not pruned); sliced members (buffers) carry none and do not count."""
    whole = torch.ones(group.size, dtype=torch.bool)
    for member in group.members:
        if member.role != "sliced":
            whole &= pruned_units(group, member, mask_of(member))
    return whole


def member_mask(group: Group, member: Member, keep: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The entry mask of ``member`` (shaped and typed as ``like``) that prunes every unit not in ``keep``."""
    mask = torch.ones_like(like)
    dropped = (~keep).nonzero().reshape(-1).tolist()
    if member.block is not None:
        if member.block in dropped:
            mask.zero_()
        return mask
    moved = mask.movedim(member.dim, 0)  # a view: writing it writes ``mask``
    for unit in dropped:
        start = member.offset + unit * member.width
        moved[start : start + member.width] = 0
    return mask


def kept_indices(group: Group, members: Sequence[Member], keep: Sequence[bool], length: int) -> torch.Tensor:
    """The indices along ``dim`` of one tensor that remain when only the units in ``keep`` are kept;
    ``members`` are the group's members on that tensor and dim (GPT-2's c_attn has three)."""
    kept = torch.ones(length, dtype=torch.bool)
    for member in members:
        for unit, alive in enumerate(keep):
            if not alive:
                start = member.offset + unit * member.width
                kept[start : start + member.width] = False
    return kept.nonzero().reshape(-1)


def kept_count(size: int, pruned: int, round_to: int, least: int) -> int:
    """Units a group keeps when ``pruned`` of its ``size`` are asked for: a multiple of ``round_to``
    (the nearest; halves keep more), and at least ``least`` (itself rounded up to a multiple), never
    more than ``size``."""
    kept = size - pruned
    if round_to > 1:
        kept = int((kept + round_to / 2) // round_to) * round_to
        least = -(-least // round_to) * round_to
    return min(size, max(kept, least))


def choose(
    scores: Sequence[torch.Tensor],
    already: Sequence[torch.Tensor],
    counts: Sequence[int] | int,
    round_to: int,
    least: int,
) -> list[torch.Tensor]:
    """Which units each group keeps (bool per unit), the lowest scores pruned first.

    ``scores`` and ``already`` (units pruned before) are per group. ``counts``: per group, the units it
    ends with pruned (each group on its own), or one total of units to prune now across every group
    (ranked together, each group kept to ``least`` units and a multiple of ``round_to``, so the total
    is met as nearly as rounding allows). Ties go to the lower unit (and group) index; NaN ranks last.
    """
    orders = [_ranked(s, a) for s, a in zip(scores, already, strict=True)]
    if isinstance(counts, int):
        caps = [s.numel() - kept_count(s.numel(), s.numel(), round_to, least) for s in scores]
        taken = [int(a.sum()) for a in already]
        pool = [(float(scores[g][u]), g, u) for g, order in enumerate(orders) for u in order[taken[g] :].tolist()]
        pool.sort(key=lambda item: (math.inf if math.isnan(item[0]) else item[0], item[1], item[2]))
        left = counts
        for _, g, _ in pool:
            if left == 0:
                break
            if taken[g] < caps[g]:
                taken[g] += 1
                left -= 1
        counts = [s.numel() - kept_count(s.numel(), t, round_to, least) for s, t in zip(scores, taken, strict=True)]
    out = []
    for order, score, count, before in zip(orders, scores, counts, already, strict=True):
        count = max(count, int(before.sum()))  # rounding never brings back what was pruned before
        keep = torch.ones(score.numel(), dtype=torch.bool)
        keep[order[:count]] = False
        out.append(keep)
    return out


def _ranked(scores: torch.Tensor, already: torch.Tensor) -> torch.Tensor:
    """Unit indices, those pruned before first, then by ascending score (stable; NaN last)."""
    key = scores.to(torch.float64).cpu().clone()
    key[key.isnan()] = math.inf
    key[already] = -math.inf
    return torch.sort(key, stable=True).indices
