"""Exact "prune the k lowest-scored entries" over one tensor or many, without concatenating them.

``torch.nn.utils.prune`` ranks with ``topk`` over the (concatenated) scores, which for a global budget
copies every selected weight into one vector and keeps index tensors as large as ``k``. Here the k-th
smallest score is found from a sample (to bracket it), one counting pass that gathers the few scores
inside the bracket, and a ``kthvalue`` over those; a last pass writes each tensor's mask. Extra memory
is bounded by the largest single tensor.

The result is the same *set* as torch's wherever no score ties the threshold: then the masks are
identical. Where scores tie it (common in fp16/bf16), the count is still exact and the tied entries
pruned are the first ones, in group order and then in row-major order within a tensor (torch's choice
among ties is ``topk``'s, which is not documented). NaN scores rank last, as with ``topk``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

Score = Callable[[torch.Tensor], torch.Tensor]  # elementwise: entries' scores from their values

SAMPLE = 1 << 16
_GENERATOR_SEED = 0x5EED  # the sample is deterministic, so selection is too


@dataclass(frozen=True)
class Entry:
    """One tensor of a group: its values and its current mask (None: nothing pruned yet)."""

    values: torch.Tensor
    mask: torch.Tensor | None = None


@dataclass(frozen=True)
class Threshold:
    """Entries scoring below ``value`` are pruned, and the first ``take[i]`` entries of tensor ``i``
    scoring exactly ``value``; ``pruned[i]`` is tensor i's total of newly pruned entries."""

    value: torch.Tensor | None  # None: prune nothing new
    take: tuple[int, ...]
    pruned: tuple[int, ...]


def _dtype(entries: Sequence[Entry], score: Score) -> torch.dtype:
    dtype = score(entries[0].values.reshape(-1)[:1]).dtype
    for entry in entries[1:]:
        dtype = torch.promote_types(dtype, score(entry.values.reshape(-1)[:1]).dtype)
    return dtype


def _scores(entry: Entry, score: Score, dtype: torch.dtype, index: torch.Tensor | None = None) -> torch.Tensor:
    """Flat scores in ``dtype``; already-pruned entries score -inf so they always count as pruned."""
    values = entry.values.detach().reshape(-1)
    mask = entry.mask.reshape(-1) if entry.mask is not None else None
    if index is not None:
        values = values[index]
        mask = mask[index] if mask is not None else None
    scores = score(values).to(dtype)
    if mask is not None:
        scores = scores.masked_fill(mask != 1, -math.inf)
    return scores


def pruned_counts(entries: Sequence[Entry]) -> list[int]:
    """How many entries of each tensor its mask already prunes."""
    return [0 if e.mask is None else int((e.mask != 1).sum()) for e in entries]


def find_threshold(
    entries: Sequence[Entry], k: int, score: Score, already: Sequence[int] | None = None
) -> Threshold | None:
    """Where to cut so that exactly ``k`` more entries (of those not yet pruned) are pruned.

    ``already`` is :func:`pruned_counts` of ``entries``, if known. Returns None when the scores have
    NaNs that would have to be pruned to reach ``k`` (the caller then falls back to torch's ranking).
    """
    already = list(already) if already is not None else pruned_counts(entries)
    if k <= 0:
        return Threshold(None, tuple(0 for _ in entries), tuple(0 for _ in entries))
    dtype = _dtype(entries, score)
    sizes = [e.values.numel() for e in entries]
    total = sum(sizes)
    target = k + sum(already)  # position (1-based) of the cut among all entries, pruned ones scoring -inf
    lo, hi = _bracket(entries, sizes, total, target, score, dtype)
    while True:
        below: list[int] = []
        inside: list[torch.Tensor] = []
        for entry in entries:
            scores = _scores(entry, score, dtype)
            is_below = scores < lo
            below.append(int(is_below.sum()))
            inside.append(scores[~is_below & (scores <= hi)])  # NaNs are never inside
        if sum(below) < target <= sum(below) + sum(c.numel() for c in inside):
            break
        if isinstance(lo, float) and isinstance(hi, float):  # the whole range: only NaNs are left out
            return None
        lo, hi = -math.inf, math.inf  # the sample misled us (rare): take everything
    candidates = torch.cat([c.to(entries[0].values.device) for c in inside])
    exact = candidates.float() if candidates.dtype in (torch.float16, torch.bfloat16) else candidates
    value = torch.kthvalue(exact, target - sum(below)).values.to(dtype)
    strictly = [b + int((c < value).sum()) for b, c in zip(below, inside, strict=True)]
    ties = [int((c == value).sum()) for c in inside]
    need = target - sum(strictly)
    take = []
    for tied in ties:
        take.append(min(tied, need))
        need -= take[-1]
    pruned = tuple(s + t - a for s, t, a in zip(strictly, take, already, strict=True))
    return Threshold(value, tuple(take), pruned)


def _bracket(
    entries: Sequence[Entry], sizes: list[int], total: int, target: int, score: Score, dtype: torch.dtype
) -> tuple[float | torch.Tensor, float | torch.Tensor]:
    # floats mean "unbounded" (-inf / inf); tensors are sampled scores
    """Score bounds that very likely hold the ``target``-th smallest score, from a uniform sample."""
    if total <= SAMPLE:
        return -math.inf, math.inf
    generator = torch.Generator().manual_seed(_GENERATOR_SEED)
    positions = torch.randint(total, (SAMPLE,), generator=generator).sort().values
    offsets = torch.tensor([0, *sizes]).cumsum(0)
    owner = torch.searchsorted(offsets, positions, right=True) - 1
    parts = []
    for i, entry in enumerate(entries):
        index = positions[owner == i] - offsets[i]
        if index.numel():
            parts.append(_scores(entry, score, dtype, index.to(entry.values.device)).cpu())
    sample = torch.cat(parts).sort().values  # NaNs sort last
    middle = target / total * SAMPLE
    spread = 6 * math.sqrt(SAMPLE) + 2  # far beyond the sampling error of a quantile
    low_i, high_i = math.floor(middle - spread), math.ceil(middle + spread)
    lo = sample[low_i] if low_i >= 0 else -math.inf
    hi = sample[high_i] if high_i < SAMPLE and not sample[high_i].isnan() else math.inf
    return lo, hi


def apply_threshold(entry: Entry, threshold: Threshold, index: int, score: Score, dtype: torch.dtype) -> torch.Tensor:
    """Tensor ``index``'s new mask (in its own dtype): its old zeros, plus what the threshold prunes."""
    values = entry.values
    if threshold.value is None:
        return entry.mask.clone() if entry.mask is not None else torch.ones_like(values)
    scores = _scores(entry, score, dtype)
    keep = ~(scores < threshold.value)
    take = threshold.take[index]
    if take:
        tied = (scores == threshold.value).nonzero().reshape(-1)[:take]
        keep[tied] = False
    return keep.reshape(values.shape).to(values.dtype)


def group_dtype(entries: Sequence[Entry], score: Score) -> torch.dtype:
    """The dtype scores are compared in: the promoted dtype of the group, as ``torch.cat`` would give."""
    return _dtype(entries, score)
