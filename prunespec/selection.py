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

On DTensors (parameters split across ranks) each rank works on its own part: the counts are summed
over ranks and the few candidates inside the bracket gathered (:mod:`prunespec.distributed`), so the
cut and the tie order (row-major in the whole tensor) are those of one process on the whole tensor.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from . import distributed
from .distributed import Sharding

Score = Callable[[torch.Tensor], torch.Tensor]  # elementwise: entries' scores from their values

SAMPLE = 1 << 18  # the largest sample; smaller groups take about total ** (2/3), at least MIN_SAMPLE
MIN_SAMPLE = 1 << 12
_GENERATOR_SEED = 0x5EED  # the sample is deterministic, so selection is too


@dataclass(frozen=True)
class Entry:
    """One tensor of a group: its values and its current mask (None: nothing pruned yet); for a
    DTensor, this rank's parts of them and where they lie (``sharding``)."""

    values: torch.Tensor
    mask: torch.Tensor | None = None
    sharding: Sharding | None = None

    @classmethod
    def of(cls, values: torch.Tensor, mask: torch.Tensor | None = None) -> Entry:
        """An entry of a tensor that may be a DTensor (its mask then a DTensor or a local part)."""
        sharding = distributed.sharding_of(values)
        if sharding is None:
            return cls(values, mask)
        return cls(distributed.local(values), None if mask is None else distributed.local(mask), sharding)

    @property
    def numel(self) -> int:
        """Entries in the whole tensor (on every rank together)."""
        return self.sharding.numel if self.sharding is not None else self.values.numel()


@dataclass(frozen=True)
class Cut:
    """What one tensor prunes: entries scoring below ``value``, plus its first ``take`` entries scoring
    exactly ``value``; ``pruned`` is how many entries that newly prunes."""

    value: torch.Tensor | None  # None: nothing new
    take: int = 0
    pruned: int = 0
    ties: int = 0  # entries of this tensor scoring exactly ``value``


NOTHING = Cut(None)


def group_dtype(entries: Sequence[Entry], score: Score) -> torch.dtype:
    """The dtype scores are compared in: the promoted dtype of the group, as ``torch.cat`` would give."""
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


def to_host(counts: Sequence[torch.Tensor]) -> list[int]:
    """Counts computed on the tensors' own devices, read in one transfer (not one per tensor)."""
    if not counts:
        return []
    device = counts[0].device
    values: list[int] = torch.stack([c.to(device) for c in counts]).tolist()
    return values


def read_counts(values: Sequence[torch.Tensor], entries: Sequence[Entry]) -> list[int]:
    """Per-entry counts (0-dim tensors) read in one transfer, summed over ranks for sharded entries."""
    return distributed.reduce(to_host(values), [e.sharding for e in entries])


def pruned_counts(entries: Sequence[Entry]) -> list[int]:
    """How many entries of each tensor its mask already prunes."""
    # masks are binary (the engine checks), so a mask's zeros are all that is not one
    zero = torch.zeros((), dtype=torch.int64)
    values = [zero if e.mask is None else e.mask.numel() - torch.count_nonzero(e.mask) for e in entries]
    return read_counts(values, entries)


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
    high = list(high) if high is not None else [e.numel for e in entries]
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
    """One shared cut over ``entries`` pruning exactly ``k`` more entries.

    Everything stays on the tensors' devices; counts are read once per pass, not once per tensor.
    """
    if k <= 0:
        return [NOTHING for _ in entries]
    dtype = group_dtype(entries, score)
    sizes = [e.numel for e in entries]
    local_sizes = [e.values.numel() for e in entries]
    total = sum(sizes)
    target = k + sum(already)  # position (1-based) of the cut among all entries, pruned ones scoring -inf
    lo, hi, share = _bracket(entries, sizes, total, target, score, dtype)
    # room for each tensor's candidates: twice its expected share of the bracket (more is retried)
    caps = [size if share >= 1 else min(size, math.ceil(2 * share * size) + 256) for size in local_sizes]
    while True:
        counts: list[torch.Tensor] = []
        gathered: list[torch.Tensor] = []
        for entry, cap in zip(entries, caps, strict=True):
            scores = _scores(entry, score, dtype)
            is_below = scores < lo
            in_bracket = ~is_below & (scores <= hi)  # NaNs are never inside
            counts += [torch.count_nonzero(is_below), torch.count_nonzero(in_bracket)]
            gathered.append(_gather(scores, in_bracket, cap))
        read = to_host(counts)
        here = read[1::2]
        if any(n > cap for n, cap in zip(here, caps, strict=True)):  # more candidates than room: again
            caps = [max(n, cap) for n, cap in zip(here, caps, strict=True)]
            continue
        read = distributed.reduce(read, [e.sharding for e in entries for _ in (0, 1)])
        below, found = read[0::2], read[1::2]
        if sum(below) < target <= sum(below) + sum(found):
            break
        if isinstance(lo, float) and isinstance(hi, float):  # the whole range: only NaNs are left out
            return None
        lo, hi, caps = -math.inf, math.inf, local_sizes  # the sample misled us (rare): take everything
    inside = [g[:n] for g, n in zip(gathered, here, strict=True)]  # the padding is at the end
    if any(e.sharding is not None for e in entries):
        value = _kth_across_ranks(inside, entries, target - sum(below)).to(dtype)
    else:
        candidates = torch.cat([c.to(entries[0].values.device) for c in inside])
        exact = candidates.float() if candidates.dtype in (torch.float16, torch.bfloat16) else candidates
        # a CPU 0-dim value compares with tensors on any device (a model split across GPUs)
        value = torch.kthvalue(exact, target - sum(below)).values.to(dtype).cpu()
    read = read_counts(
        [torch.count_nonzero(c < value) for c in inside] + [torch.count_nonzero(c == value) for c in inside],
        [*entries, *entries],
    )
    strictly = [b + n for b, n in zip(below, read[: len(inside)], strict=True)]
    need = target - sum(strictly)
    cuts = []
    for count, ties, done in zip(strictly, read[len(inside) :], already, strict=True):
        take = min(ties, need)
        need -= take
        cuts.append(Cut(value, take, count + take - done, ties))
    return cuts


_SIGN = -(1 << 63)  # int64's sign bit


def _kth_across_ranks(parts: Sequence[torch.Tensor], entries: Sequence[Entry], k: int) -> torch.Tensor:
    """The ``k``-th smallest (1-based) of every rank's candidates ``parts`` together, from counts alone:
    a radix select over the values' ordered bits, 8 bits a round, each round one all-reduce of 256
    counts (2 KiB), so no candidate leaves its rank. A 0-dim CPU tensor (float64, or int64 for
    integer scores), exactly the value ``kthvalue`` over the union would give."""
    mine = [p.reshape(-1).cpu() for p, e in zip(parts, entries, strict=True) if distributed.counted(e.sharding)]
    values = torch.cat(mine) if mine else torch.empty(0, dtype=parts[0].dtype)
    floating = values.is_floating_point()
    if floating:
        bits = values.to(torch.float64).view(torch.int64)
        keys = bits ^ ((bits >> 63) & ~_SIGN)  # ordered like the floats, as signed integers
    else:
        keys = values.to(torch.int64)
    keys = keys ^ _SIGN  # ordered as unsigned: the top byte first
    prefix, left = 0, k
    chosen = torch.ones_like(keys, dtype=torch.bool)
    for shift in range(56, -8, -8):
        digits = (keys >> shift) & 0xFF
        counts = distributed.histogram(digits[chosen], 256)
        below = counts.cumsum(0)
        digit = int(torch.searchsorted(below, torch.tensor(left)))
        left -= int(below[digit - 1]) if digit else 0
        prefix = (prefix << 8) | digit
        chosen &= digits == digit
    key = torch.tensor(prefix - (1 << 64) if prefix >= 1 << 63 else prefix, dtype=torch.int64) ^ _SIGN
    if not floating:
        return key
    return (key ^ ((key >> 63) & ~_SIGN)).view(torch.float64)


def _everywhere(parts: Sequence[torch.Tensor], entries: Sequence[Entry]) -> list[torch.Tensor]:
    """Each entry's ``parts``, with every rank's parts of a sharded entry (plain entries are whole on
    every rank already)."""
    out: list[torch.Tensor] = []
    for part, entry in zip(parts, entries, strict=True):
        if entry.sharding is None:
            out.append(part)
        else:
            out.extend(distributed.gather(part, entry.sharding.counted))
    return out


def _gather(scores: torch.Tensor, keep: torch.Tensor, cap: int) -> torch.Tensor:
    """``scores[keep]``, padded to ``cap`` entries at the end. On an accelerator this is done without
    waiting for the count (``nonzero_static``); on the CPU, where waiting costs nothing, plain boolean
    indexing is faster."""
    if not _padded(scores.device):
        return scores[keep]
    return scores[torch.nonzero_static(keep, size=cap).reshape(-1).clamp(min=0)]


def _padded(device: torch.device) -> bool:
    """Whether to gather without waiting for counts (everywhere but on the CPU)."""
    return device.type != "cpu"


def _bracket(
    entries: Sequence[Entry], sizes: list[int], total: int, target: int, score: Score, dtype: torch.dtype
) -> tuple[float | torch.Tensor, float | torch.Tensor, float]:
    """Score bounds that very likely hold the ``target``-th smallest score, from a uniform sample, and the
    share of all entries expected between them. Floats mean "unbounded" (-inf / inf)."""
    # A bigger sample narrows the bracket (fewer candidates to select from) but costs more to draw and
    # select in: about total ** (2/3) balances the two.
    size = min(SAMPLE, max(MIN_SAMPLE, round(total ** (2 / 3))))
    if total <= 4 * size:
        return -math.inf, math.inf, 1.0
    generator = torch.Generator().manual_seed(_GENERATOR_SEED)
    positions = torch.randint(total, (size,), generator=generator)
    offsets = torch.tensor([0, *sizes]).cumsum(0)
    owner = torch.searchsorted(offsets, positions, right=True) - 1
    device = entries[0].values.device
    parts = []
    for i, entry in enumerate(entries):
        index = positions[owner == i] - offsets[i]
        if entry.sharding is not None:
            index = entry.sharding.local_index(index)[1]
        parts.append(_scores(entry, score, dtype, index.to(entry.values.device)).to(device))
    sample = (
        torch.cat(_everywhere(parts, entries)).cpu().float().nan_to_num(nan=math.inf)
    )  # NaNs rank last; float32 holds fp16/bf16
    middle = target / total * size
    # 8 standard deviations of a sample quantile's position: the bracket misses about never
    spread = 8 * math.sqrt(middle * (1 - target / total)) + 2
    low_i, high_i = math.floor(middle - spread), math.ceil(middle + spread)
    # two selections on the sample (cheaper than sorting it)
    lo = sample.kthvalue(low_i + 1).values.to(dtype) if low_i >= 0 else -math.inf
    hi = sample.kthvalue(high_i + 1).values.to(dtype) if high_i < size else math.inf
    if isinstance(hi, torch.Tensor) and hi.isinf():
        hi = math.inf
    return lo, hi, (min(high_i, size - 1) - max(low_i, 0) + 1) / size


def apply_cut(entry: Entry, cut: Cut, score: Score, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The tensor's new mask, in its own dtype (its old zeros, plus what ``cut`` prunes), and how many
    zeros it has (a 0-dim tensor on its device: read many at once with :func:`to_host`)."""
    values = entry.values
    if cut.value is None:
        mask = entry.mask.clone() if entry.mask is not None else torch.ones_like(values)
        return mask, mask.numel() - torch.count_nonzero(mask)
    scores = _scores(entry, score, dtype)
    if cut.take == cut.ties:  # every entry at the cut goes (the usual case: one entry, no tie)
        keep = ~(scores <= cut.value)  # NaN compares False: kept
    else:
        keep = ~(scores < cut.value)
        if cut.take:
            tied = (scores == cut.value).nonzero().reshape(-1)
            keep[_first_tied(tied, cut.take, entry.sharding)] = False
    zeros = keep.numel() - torch.count_nonzero(keep)  # counted on the bool mask: 4x fewer bytes than fp32
    return keep.reshape(values.shape).to(values.dtype), zeros


def _first_tied(tied: torch.Tensor, take: int, sharding: Sharding | None) -> torch.Tensor:
    """Of the local positions ``tied``, those among the tensor's first ``take`` tied entries in
    row-major order of the whole tensor (only ties are gathered across ranks: usually few)."""
    if sharding is None:
        return tied[:take]
    where = sharding.global_index(tied)
    everywhere = torch.cat(distributed.gather(where, sharding.counted))
    last = torch.sort(everywhere).values[take - 1]
    return tied[where <= last]


SMALL = 1 << 14  # tensors up to this many entries are selected in batches (one sort for many tensors)


def select_rows(
    scores: torch.Tensor, targets: torch.Tensor, *, nan_free: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """For a batch of small tensors (one per row of ``scores``, already-pruned entries at -inf): which
    entries to prune so that each row has exactly ``targets[i]`` pruned, lowest scores first, ties to the
    lower index (the rule :func:`find_cuts` follows). Returns the bool "pruned" matrix and a bool per row
    that is False where NaN scores would have to be pruned (those rows need torch's ranking).
    ``nan_free``: the caller knows ``scores`` has no NaN.
    """
    distinct = torch.unique(targets)
    size = scores.shape[1]
    few = scores.dim() == 2 and size > 0 and distinct.numel() <= _FEW_TARGETS
    if few and (nan_free or not has_nan(scores)):
        return _select_by_threshold(scores, targets, distinct), torch.ones_like(targets, dtype=torch.bool)
    ranked, order = torch.sort(scores, dim=1, stable=True)  # NaN sorts last
    positions = torch.arange(size, device=scores.device).expand_as(scores)
    chosen = positions < targets.reshape(-1, 1)
    pruned = torch.empty_like(chosen).scatter_(1, order, chosen)
    last = ranked.gather(1, (targets.reshape(-1, 1) - 1).clamp(min=0)).reshape(-1)
    ok = ~last.isnan() | (targets == 0)
    return pruned, ok


_TOPK_ENTRIES = 1 << 18  # per topk call: its values and indices take 3 MiB (float32), not 1.5x the scores
_FEW_TARGETS = 8  # rows share a handful of targets (one when nothing was pruned before): one topk each


def _select_by_threshold(scores: torch.Tensor, targets: torch.Tensor, distinct: torch.Tensor) -> torch.Tensor:
    """select_rows without sorting (no NaN): each row's ``t``-th lowest score (by ``topk``), everything
    below it pruned, and of the entries equal to it the lowest-indexed that are still
    needed: the same entries a stable sort would give."""
    scores = _order_keys(scores)  # integers compare faster than floats (no NaN branch in topk)
    threshold = torch.empty(scores.shape[0], 1, dtype=scores.dtype, device=scores.device)
    for t in distinct.tolist():
        rows = (targets == t).nonzero().reshape(-1)
        if t == 0:
            threshold[rows] = -math.inf if scores.is_floating_point() else torch.iinfo(scores.dtype).min
            continue
        part = scores if rows.numel() == scores.shape[0] else scores[rows]
        # the t lowest, unordered (topk beats kthvalue and sort on CPU): the highest of them is the t-th;
        # a few rows at a time, so that topk's values and int64 indices stay small beside the scores
        chunks = torch.split(part, max(1, _TOPK_ENTRIES // int(t)))
        lowest = [torch.topk(c, int(t), dim=1, largest=False, sorted=False).values.amax(dim=1) for c in chunks]
        threshold[rows] = torch.cat(lowest).reshape(-1, 1)
    pruned = scores <= threshold  # the t lowest, and any more entries equal to the t-th
    if 0 in distinct:
        pruned &= targets.reshape(-1, 1) > 0
    # a row with more than t is one whose t-th lowest score repeats (rare): only those rows are redone
    tied = (row_counts(pruned) != targets).nonzero().reshape(-1)
    if tied.numel():
        part, cut, need = scores[tied], threshold[tied], targets[tied].reshape(-1, 1)
        below, ties = part < cut, part == cut
        ties &= ties.cumsum(dim=1) <= need - row_counts(below).reshape(-1, 1)  # the lowest-indexed of the ties
        pruned[tied] = below | ties
    return pruned


_BITS = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}


def _order_keys(scores: torch.Tensor) -> torch.Tensor:
    """Integers in the order of the NaN-free float ``scores``, equal where they are equal: their bits
    (as they are when no sign bit is set; a negative's other bits flipped, so that more negative is
    lower; -0.0 made +0.0). ``scores`` itself for other dtypes."""
    kind = _BITS.get(scores.dtype)
    if kind is None:
        return scores
    bits = scores.view(kind)
    if bool(bits.min() >= 0):
        return bits
    keys = bits ^ ((bits >> (8 * bits.element_size() - 1)) & torch.iinfo(kind).max)
    return keys.masked_fill_(keys == -1, 0)


_BYTE_COLUMNS = 255  # of 0/1 bytes, summed in a byte without overflow


def row_counts(flags: torch.Tensor) -> torch.Tensor:
    """The True entries in each row of a 2-D bool tensor, int32. Summed as bytes, 255 columns at a
    time: a sum to a wider dtype first widens every entry (an int32 copy of the whole tensor, 4x its
    size), and is about ten times slower."""
    rows, cols = flags.shape
    as_bytes = flags.view(torch.uint8)
    whole = cols - cols % _BYTE_COLUMNS
    parts = as_bytes[:, :whole].reshape(rows, -1, _BYTE_COLUMNS).sum(dim=2, dtype=torch.uint8)
    counts = parts.sum(dim=1, dtype=torch.int32)  # widened: 1/255 of the entries
    return counts + as_bytes[:, whole:].sum(dim=1, dtype=torch.uint8)


def has_nan(t: torch.Tensor) -> bool:
    """Whether a float tensor has a NaN: its sum first (one cheap reduction), the full check only when
    that is NaN (a NaN, or +inf and -inf both present)."""
    return bool(t.sum().isnan()) and bool(t.isnan().any())


def all_finite(t: torch.Tensor) -> bool:
    """Whether a float tensor is all finite: its sum first, the full check only when that is not."""
    return bool(t.sum().isfinite()) or bool(t.isfinite().all())


def prune_rows(scores: torch.Tensor, mask: torch.Tensor | None, targets: list[int]) -> torch.Tensor:
    """A 2-D tensor compared within each row: the bool "pruned" matrix with row ``i`` at exactly
    ``targets[i]`` pruned entries, its earlier-pruned ones (0 in ``mask``) kept pruned and the rest the
    lowest ``scores`` of the row, ties to the lower index (NaN scores never pruned)."""
    ranked = scores.to(torch.float32)
    if not all_finite(ranked):  # else nan_to_num would only copy it
        ranked = ranked.nan_to_num(nan=math.inf, posinf=math.inf)
    if mask is not None:
        ranked = ranked.masked_fill(mask == 0, -math.inf)
    pruned, _ = select_rows(ranked, torch.tensor(targets, device=scores.device), nan_free=True)
    return pruned
