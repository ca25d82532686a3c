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

SAMPLE = 1 << 18  # the largest sample; smaller groups take about total ** (2/3), at least MIN_SAMPLE
MIN_SAMPLE = 1 << 12
_GENERATOR_SEED = 0x5EED  # the sample is deterministic, so selection is too


@dataclass(frozen=True)
class Entry:
    """One tensor of a group: its values and its current mask (None: nothing pruned yet)."""

    values: torch.Tensor
    mask: torch.Tensor | None = None


@dataclass(frozen=True)
class Cut:
    """What one tensor prunes: entries scoring below ``value``, plus its first ``take`` entries scoring
    exactly ``value``; ``pruned`` is how many entries that newly prunes."""

    value: torch.Tensor | None  # None: nothing new
    take: int = 0
    pruned: int = 0
    ties: int = 0  # entries of this tensor scoring exactly ``value``


NOTHING = Cut(None)


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
    # masks are binary (the engine checks), so a mask's zeros are all that is not one
    return [0 if e.mask is None else e.mask.numel() - int(torch.count_nonzero(e.mask)) for e in entries]


def find_cuts(
    entries: Sequence[Entry],
    k: int,
    score: Score,
    already: Sequence[int] | None = None,
    low: Sequence[int] | None = None,
    high: Sequence[int] | None = None,
) -> list[Cut] | None:
    """Per-tensor cuts that prune exactly ``k`` more entries across ``entries``, lowest scores first.

    ``already`` is :func:`pruned_counts` of ``entries`` if known. ``low`` and ``high`` bound each
    tensor's final pruned count (old and new together); the budget then flows to the other tensors,
    still lowest scores first (the caller checks that the bounds can hold ``k``). Returns None when
    NaN scores would have to be pruned (the caller then falls back to torch's ranking).
    """
    already = list(already) if already is not None else pruned_counts(entries)
    n = len(entries)
    low = list(low) if low is not None else list(already)
    high = list(high) if high is not None else [e.values.numel() for e in entries]
    cuts: list[Cut | None] = [None] * n
    budget = k
    while True:
        free = [i for i in range(n) if cuts[i] is None]
        shared = _threshold([entries[i] for i in free], budget, score, [already[i] for i in free])
        if shared is None:
            return None
        totals = {i: already[i] + cut.pruned for i, cut in zip(free, shared, strict=True)}
        over = [i for i in free if totals[i] > high[i]]
        under = [i for i in free if totals[i] < low[i]]
        clamped = sum(min(max(totals[i], low[i]), high[i]) - already[i] for i in free)
        if not over and not under:
            for i, cut in zip(free, shared, strict=True):
                cuts[i] = cut
            return [c if c is not None else NOTHING for c in cuts]
        # Clamping moves the shared threshold one way; tensors out of bounds on that side stay there.
        fix = over if clamped < budget else under
        if clamped == budget:
            fix = over + under
        for i in fix:
            bound = high[i] if i in over else low[i]
            own = _threshold([entries[i]], bound - already[i], score, [already[i]])
            if own is None:
                return None
            cuts[i] = own[0]
            budget -= own[0].pruned
        if all(c is not None for c in cuts):
            return [c if c is not None else NOTHING for c in cuts]


def _threshold(entries: Sequence[Entry], k: int, score: Score, already: Sequence[int]) -> list[Cut] | None:
    """One shared cut over ``entries`` pruning exactly ``k`` more entries."""
    if k <= 0:
        return [NOTHING for _ in entries]
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
            below.append(int(torch.count_nonzero(is_below)))
            inside.append(scores[~is_below & (scores <= hi)])  # NaNs are never inside
        if sum(below) < target <= sum(below) + sum(c.numel() for c in inside):
            break
        if isinstance(lo, float) and isinstance(hi, float):  # the whole range: only NaNs are left out
            return None
        lo, hi = -math.inf, math.inf  # the sample misled us (rare): take everything
    candidates = torch.cat([c.to(entries[0].values.device) for c in inside])
    exact = candidates.float() if candidates.dtype in (torch.float16, torch.bfloat16) else candidates
    # a CPU 0-dim value compares with tensors on any device (a model split across GPUs)
    value = torch.kthvalue(exact, target - sum(below)).values.to(dtype).cpu()
    strictly = [b + int(torch.count_nonzero(c < value)) for b, c in zip(below, inside, strict=True)]
    need = target - sum(strictly)
    cuts = []
    for count, c, done in zip(strictly, inside, already, strict=True):
        ties = int(torch.count_nonzero(c == value))
        take = min(ties, need)
        need -= take
        cuts.append(Cut(value, take, count + take - done, ties))
    return cuts


def _bracket(
    entries: Sequence[Entry], sizes: list[int], total: int, target: int, score: Score, dtype: torch.dtype
) -> tuple[float | torch.Tensor, float | torch.Tensor]:
    # floats mean "unbounded" (-inf / inf); tensors are sampled scores
    """Score bounds that very likely hold the ``target``-th smallest score, from a uniform sample."""
    # A bigger sample narrows the bracket (fewer candidates to select from) but costs more to draw and
    # select in: about total ** (2/3) balances the two.
    size = min(SAMPLE, max(MIN_SAMPLE, round(total ** (2 / 3))))
    if total <= 4 * size:
        return -math.inf, math.inf
    generator = torch.Generator().manual_seed(_GENERATOR_SEED)
    positions = torch.randint(total, (size,), generator=generator)
    offsets = torch.tensor([0, *sizes]).cumsum(0)
    owner = torch.searchsorted(offsets, positions, right=True) - 1
    parts = []
    for i, entry in enumerate(entries):
        index = positions[owner == i] - offsets[i]
        if index.numel():
            parts.append(_scores(entry, score, dtype, index.to(entry.values.device)).cpu())
    sample = torch.cat(parts).float().nan_to_num(nan=math.inf)  # NaNs rank last; float32 holds any fp16/bf16
    middle = target / total * size
    # 8 standard deviations of a sample quantile's position: the bracket misses about never
    spread = 8 * math.sqrt(middle * (1 - target / total)) + 2
    low_i, high_i = math.floor(middle - spread), math.ceil(middle + spread)
    # two selections on the sample (cheaper than sorting it)
    lo = sample.kthvalue(low_i + 1).values.to(dtype) if low_i >= 0 else -math.inf
    hi = sample.kthvalue(high_i + 1).values.to(dtype) if high_i < size else math.inf
    if isinstance(hi, torch.Tensor) and hi.isinf():
        hi = math.inf
    return lo, hi


def apply_cut(entry: Entry, cut: Cut, score: Score, dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    """The tensor's new mask, in its own dtype (its old zeros, plus what ``cut`` prunes), and how many
    zeros it has."""
    values = entry.values
    if cut.value is None:
        mask = entry.mask.clone() if entry.mask is not None else torch.ones_like(values)
        return mask, mask.numel() - int(torch.count_nonzero(mask))
    scores = _scores(entry, score, dtype)
    if cut.take == cut.ties:  # every entry at the cut goes (the usual case: one entry, no tie)
        keep = ~(scores <= cut.value)  # NaN compares False: kept
    else:
        keep = ~(scores < cut.value)
        if cut.take:
            tied = (scores == cut.value).nonzero().reshape(-1)[: cut.take]
            keep[tied] = False
    zeros = keep.numel() - int(torch.count_nonzero(keep))  # counted on the bool mask: 4x fewer bytes than fp32
    return keep.reshape(values.shape).to(values.dtype), zeros


def group_dtype(entries: Sequence[Entry], score: Score) -> torch.dtype:
    """The dtype scores are compared in: the promoted dtype of the group, as ``torch.cat`` would give."""
    return _dtype(entries, score)
