"""Calibration statistics: what data-aware methods (``wanda``) know of the activations.

A method names the statistics it reads in its class's ``statistics``. The engine runs the calibration
batches through the model in one pass that stops at each module being pruned
(:class:`prunespec.sequential.Pass`); there an :class:`Accumulator` computes the module's statistics
from every batch's input to it, and the method finds them in ``MaskContext.statistics``, by name.
:func:`collect` does the same for a set of modules without pruning anything.

Statistics (:data:`STATISTICS`):

``input_sq_norms``
    A float32 vector of one value per input feature of the module: the sum, over every calibration
    token, of that feature squared. Its square root is ``||X_j||_2``, the L2 norm of input feature ``j``
    over all the tokens (Wanda's activation norm). Memory: one vector per pruned module's input.

``input_gram``
    A float32 matrix ``(in, in)``: the sum over every calibration token of ``x x^T`` (``X^T X``), which
    is SparseGPT's Hessian up to a factor, and what the reconstruction error
    ``||W X - W' X||^2 = tr((W - W') X^T X (W - W')^T)`` needs. Memory: ``in * in`` floats per module's
    input, only while that module is pruned.

Tokens: a module's input of shape ``(batch, seq, features)`` has ``batch * seq`` tokens; any other shape
``(..., features)`` is flattened to tokens the same way. When a batch is a mapping with an
``attention_mask`` of shape ``(batch, seq)``, only the tokens where the mask is nonzero (1) count:
the mask is matched to the first two dims of an input of shape ``(batch, seq, ...)``, or to the first
dim of an input of shape ``(batch * seq, features)``; an input that fits neither is an error naming the
module, rather than a guess.

Sharing: modules that see the same input tensor object in every batch (``q_proj``, ``k_proj``,
``v_proj``; ``gate_proj`` and ``up_proj``) get one statistic, computed once: the very same tensor object.

The model runs under ``torch.no_grad()`` in eval mode (dropout off, batch norms leave their running
statistics alone); each module's training flag is restored afterwards, and the hooks are removed
whatever happens.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import distributed
from .errors import CalibrationError
from .sequential import (
    Arrival,
    BatchFailed,
    BlockStop,
    Pass,
    Stop,
    attention_mask,
    first_tensor,
    run_batch,
    transposed,
    without_cache,
)

__all__ = [
    "STATISTICS",
    "Accumulator",
    "BadInput",
    "Sample",
    "Sampler",
    "Statistics",
    "batches",
    "collect",
    "input_gram",
    "input_sq_sums",
    "out_in",
    "transposed",
]

STATISTICS: Mapping[str, str] = {
    "input_sq_norms": "float32 vector, one per input feature: the sum over calibration tokens of the feature squared",
    "input_gram": "float32 matrix (in, in): the sum over calibration tokens of x x^T (X^T X; SparseGPT's Hessian, "
    "up to a factor)",
    "block_influence": "float64 scalar per block, given to each tensor of the block: 1 - cos(block input, block "
    "output), the mean over calibration tokens (measured before any pruning; `group: {unit: blocks}` rules only)",
}
BLOCK_LEVEL = frozenset({"block_influence"})
"""Statistics of whole blocks, measured in one dense pass before the rest (:mod:`prunespec.budgets`),
not at a module's stop."""
"""Every statistic prunespec collects, by name, with what it is."""

Statistics = dict[str, dict[str, torch.Tensor]]
"""Module name -> statistic name -> tensor."""


def out_in(module: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """``module``'s weight ``t`` as an ``(out, in)`` matrix, a view: rows are outputs, columns the input
    features the statistics are about (``t`` itself for ``nn.Linear``, ``t.T`` for ``Conv1D``). The same
    call maps an ``(out, in)`` result back to the weight's layout."""
    return t.T if transposed(module) else t


def features(module: nn.Module) -> int | None:
    """How many input features ``module`` takes, when its weight says (a Linear's or a Conv1D's)."""
    weight = getattr(module, "weight", None)
    if weight is None:
        weight = getattr(module, "weight_orig", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return int(out_in(module, weight).shape[1])
    return None


def input_sq_sums(x: torch.Tensor, keep: torch.Tensor | None, into: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over tokens of each feature squared, in float32; ``keep``: bool mask of the tokens that count,
    already matched to ``x``'s leading dims; ``into``: a sum so far, added to in place."""
    tokens = _kept(x.detach(), keep).reshape(-1, x.shape[-1]).to(torch.float32)
    sums = (tokens * tokens).sum(dim=0)
    return sums if into is None else into.add_(sums)


def input_gram(x: torch.Tensor, keep: torch.Tensor | None, into: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over tokens of ``x x^T`` (``X^T X``, features by features), in float32; ``into``: a sum so
    far, added to in place (by the matmul itself: no second features-by-features matrix)."""
    tokens = _kept(x.detach(), keep).reshape(-1, x.shape[-1]).to(torch.float32)
    return tokens.T @ tokens if into is None else into.addmm_(tokens.T, tokens)


def _kept(tokens: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    # indexing copies every token: not when all of them count (an unpadded batch)
    return tokens if keep is None or bool(keep.all()) else tokens[keep]


_COMPUTE = {"input_sq_norms": input_sq_sums, "input_gram": input_gram}
PER_RANK = frozenset({"input_gram"})
"""Statistics that :func:`collect_across_ranks` sums on each rank first, then over ranks (an ``(in, in)``
matrix per batch is too much to gather); the others are gathered per batch, for sums exact to the bit."""


def tokens_kept(x: torch.Tensor, mask: torch.Tensor | None, module: str) -> torch.Tensor | None:
    """The tokens of input ``x`` that count (a bool mask of its leading dims), from the batch's
    ``attention_mask``; None: all of them. ValueError when the mask cannot be matched to ``x``."""
    if mask is None:
        return None
    keep = mask.to(device=x.device) != 0
    if x.dim() >= 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        return keep
    if x.dim() == 2 and x.shape[0] == mask.numel():
        return keep.reshape(-1)
    raise ValueError(
        f"the input of {module} has shape {list(x.shape)}, which cannot be matched to the batch's "
        f"attention_mask of shape {list(mask.shape)} (prunespec matches inputs of shape (batch, seq, features) "
        "or (batch * seq, features))"
    )


class BadInput(ValueError):
    """A batch's input to a module cannot give its statistics (``batch``: its index)."""

    def __init__(self, batch: int, message: str) -> None:
        super().__init__(message)
        self.batch = batch


class Accumulator:
    """Statistics at the stops of a :class:`~prunespec.sequential.Pass`, summed over the batches in
    batch order, each stop's arrivals read once (a replayed stop makes them as it is read). A stop
    whose batches bring the very inputs of the stop before it (``k_proj`` after ``q_proj``: its
    ``same_as``) gets that stop's statistics, the same tensor objects, not computed again.

    ``sample``: with a limit, :attr:`sample` is each stop's :class:`Sample` of at most that many of its
    tokens (for reconstruction errors), taken in the same read."""

    def __init__(self, sample: int | None = None) -> None:
        self._limit = sample
        self._last: tuple[str, dict[str, torch.Tensor], Sample | None] | None = None
        self.tokens: int | None = None  # tokens counted at the first stop
        self.sample: Sample | None = None  # the last stop's

    def at(self, stop: Stop, names: Collection[str], features: int | None = None) -> dict[str, torch.Tensor]:
        """The statistics ``names`` of the stop's module, whose inputs have ``features`` features when
        known. Raises :class:`BadInput` naming the batch whose input does not fit."""
        _known(names)
        shared = self._last if self._last is not None and stop.same_as == self._last[0] else None
        stats: dict[str, torch.Tensor] = shared[1] if shared is not None else {}
        self.sample = shared[2] if shared is not None else None
        missing = [name for name in names if name not in stats]
        if missing or (self._limit is not None and self.sample is None):
            sum_up = _Sum(stop.module, missing, features, stats, self._limit if self.sample is None else None)
            for a in stop.arrivals:  # once: each batch's input may be gone after its turn
                sum_up.add(a)
            if self.tokens is None:
                self.tokens = sum_up.counted
            if sum_up.sampler is not None:
                self.sample = sum_up.sampler.result()
        self._last = (stop.module, stats, self.sample)
        return stats

    def at_block(
        self, stop: BlockStop, names: Callable[[str], Collection[str]], features: Callable[[str], int | None]
    ) -> list[Swept]:
        """Every module a sweep of ``stop``'s block reached, in the order first reached, with its
        statistics ``names(module)``, from that one sweep. A module given the very input of one before
        it, in every batch that runs either, shares that one's statistics; when the batches disagree on
        that, the block is swept again, each module summing its own. Raises :class:`BadInput`."""
        self._last = None
        found = self._swept(stop, names, features, share=True)
        if found is None:
            found = self._swept(stop, names, features, share=False)
        assert found is not None  # sharing nothing, the batches cannot disagree
        return found

    def _swept(
        self,
        stop: BlockStop,
        names: Callable[[str], Collection[str]],
        features: Callable[[str], int | None],
        *,
        share: bool,
    ) -> list[Swept] | None:
        """:meth:`at_block`'s one sweep; None when ``share`` and the batches disagree on what is shared."""
        leader: dict[str, str] = {}  # module -> the module whose statistics it shares (itself: its own)
        sums: dict[str, _Sum] = {}  # by leader
        runs: dict[str, int] = {}  # module -> batches that reached it
        batch: int | None = None
        for module, same_as, a in stop.sweep():
            if a.batch != batch:
                if any(runs[m] != runs[p] for m, p in leader.items()):
                    return None  # a module sharing statistics missed a batch its leader ran, or the reverse
                batch = a.batch
            runs[module] = runs.get(module, 0) + 1
            if module not in leader:
                follows = share and same_as is not None and leader.get(same_as) == same_as and runs[same_as] == 1
                leader[module] = same_as if follows and same_as is not None else module
                if leader[module] == module:
                    wanted = names(module)
                    _known(wanted)
                    sums[module] = _Sum(module, wanted, features(module), {}, self._limit)
            if leader[module] != module:
                if same_as != leader[module]:
                    return None
                continue
            sums[module].add(a)
        if any(runs[m] != runs[p] for m, p in leader.items()):
            return None
        if sums and self.tokens is None:
            self.tokens = next(iter(sums.values())).counted
        last = {p: m for m, p in leader.items()}  # each leader's last sharer
        samples = {p: s.sampler.result() if s.sampler is not None else None for p, s in sums.items()}
        return [Swept(m, None if p == m else p, sums[p].stats, samples[p], last[p] != m) for m, p in leader.items()]

    def forget(self) -> None:
        """Keep nothing of the last stop for the next (its statistics are about to be overwritten)."""
        self._last = None


@dataclass(frozen=True)
class Swept:
    """A module a block's sweep reached (see :meth:`Accumulator.at_block`): its statistics and sample of
    tokens, ``same_as`` the module whose statistics (the same objects) it shares, and whether a module
    after it shares them too."""

    module: str
    same_as: str | None
    stats: dict[str, torch.Tensor]
    sample: Sample | None
    shared_later: bool


class _Sum:
    """One module's statistics ``names`` summed over the arrivals :meth:`add` gives it, in order (into
    ``stats``, which may hold some already), the tokens counted, and a :class:`Sampler` with ``limit``."""

    def __init__(
        self,
        module: str,
        names: Collection[str],
        features: int | None,
        stats: dict[str, torch.Tensor],
        limit: int | None,
    ) -> None:
        self.module, self.names, self.features, self.stats = module, list(names), features, stats
        self.sampler = Sampler(limit) if limit is not None else None
        self.counted = 0

    def add(self, a: Arrival) -> None:
        """Raises :class:`BadInput` when the batch's input does not fit the module."""
        if self.features is not None and (a.x.dim() == 0 or a.x.shape[-1] != self.features):
            raise BadInput(
                a.batch,
                f"its input to {self.module} has shape {list(a.x.shape)}, but {self.module} takes "
                f"{self.features} features (the last dim)",
            )
        try:
            keep = tokens_kept(a.x, a.attention_mask, self.module)
        except ValueError as exc:
            raise BadInput(a.batch, str(exc)) from exc
        self.counted += a.x.reshape(-1, a.x.shape[-1]).shape[0] if keep is None else int(keep.sum())
        for name in self.names:
            self.stats[name] = _COMPUTE[name](a.x, keep, self.stats.get(name))
        if self.sampler is not None:
            self.sampler.add(a.batch, a.x, keep)


def _known(names: Collection[str]) -> None:
    unknown = sorted(set(names) - set(STATISTICS))
    if unknown:
        raise ValueError(f"no such statistics: {', '.join(unknown)} (prunespec collects {', '.join(STATISTICS)})")


@dataclass(frozen=True)
class Sample:
    """Tokens of a stop, float32 ``(n, features)``, and where each came from: per batch, its rows in
    that batch's input flattened to ``(tokens, features)``, in the order of ``tokens``."""

    tokens: torch.Tensor
    rows: list[tuple[int, torch.Tensor]]


class Sampler:
    """At most ``limit`` of a stop's kept tokens, spread over all of them in order, chosen as the
    batches come (their number unknown): every ``stride``-th token is a candidate, the stride doubling
    whenever there would be more than ``2 * limit`` candidates; the sample is ``limit`` of them evenly
    spaced (all of them when fewer). With at most ``2 * limit`` tokens in all that is exactly
    ``limit`` evenly spaced tokens. Only candidates are copied."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.stride = 1
        self.seen = 0
        self.parts: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []  # batch, positions, rows, tokens

    def add(self, batch: int, x: torch.Tensor, keep: torch.Tensor | None) -> None:
        flat = x.detach().reshape(-1, x.shape[-1])
        rows = None if keep is None else keep.reshape(-1).nonzero().reshape(-1).to(flat.device)
        count = flat.shape[0] if rows is None else rows.numel()
        while self._held() + _multiples(self.seen, count, self.stride) > 2 * self.limit:
            self.stride *= 2
            thinned = []
            for b, pos, r, t in self.parts:
                on = pos % self.stride == 0
                thinned.append((b, pos[on], r[on], t[on]))
            self.parts = thinned
        first = -self.seen % self.stride
        at = torch.arange(first, max(first, count), self.stride, device=flat.device)
        picked = at if rows is None else rows[at]
        self.parts.append((batch, at.cpu() + self.seen, picked, flat[picked].to(torch.float32)))
        self.seen += count

    def _held(self) -> int:
        return sum(pos.numel() for _, pos, _, _ in self.parts)

    def result(self) -> Sample:
        held = self._held()
        n = min(self.limit, held)
        chosen = torch.arange(n, dtype=torch.float64).mul_(held / n if n else 0).long()  # evenly, in order
        tokens, rows, offset = [], [], 0
        for batch, pos, picked, part in self.parts:
            inside = chosen[(chosen >= offset) & (chosen < offset + pos.numel())] - offset
            offset += pos.numel()
            if inside.numel():
                tokens.append(part[inside.to(part.device)])
                rows.append((batch, picked[inside.to(picked.device)]))
        if not tokens:
            return Sample(torch.zeros(0, 0), [])
        return Sample(torch.cat(tokens), rows)


def _multiples(start: int, count: int, stride: int) -> int:
    """How many of ``start, ..., start + count - 1`` are multiples of ``stride``."""
    return (start + count + stride - 1) // stride - (start + stride - 1) // stride


def batches(data: Iterable[Any], rules: str, samples: int | None = None) -> list[Any]:
    """The calibration batches as a list (the first ``samples`` when given): a pass runs them all at once.

    Raises :class:`CalibrationError` for data that is not an iterable of batches, or too few of them."""
    if isinstance(data, (torch.Tensor, Mapping, str, bytes)) or not isinstance(data, Iterable):
        raise CalibrationError(
            rules,
            f"data is a {type(data).__name__}; give an iterable of batches (a list of Tensors, of tuples, or of "
            "mappings such as {'input_ids': ..., 'attention_mask': ...})",
        )
    found: list[Any] = []
    for batch in data:
        if samples is not None and len(found) >= samples:
            break
        found.append(batch)
    if not found:
        raise CalibrationError(rules, "the data gave no batches; give at least one calibration batch")
    if samples is not None and len(found) < samples:
        raise CalibrationError(
            rules, f"calibration.samples is {samples}, but the data gave {len(found)} batches; give more or lower it"
        )
    return found


def stops(
    calibration_pass: Pass,
    names: Callable[[str], Collection[str]],
    rules: str,
    accumulator: Accumulator | None = None,
) -> Iterator[tuple[Stop, dict[str, torch.Tensor], bool]]:
    """Each stop of ``calibration_pass`` with the statistics ``names(module)`` of its module (summed by
    ``accumulator``, a new one by default), and whether a later stop may share them; the caller
    releases each stop before the next. A :class:`BlockStop` comes as a stop for each module its sweep
    reached (the statistics of all of them made at once, ``accumulator.sample`` set for each). A batch
    whose forward fails, or whose input to a module does not fit it, is a :class:`CalibrationError`
    naming the batch (``rules``: who needed the data)."""
    accumulator = Accumulator() if accumulator is None else accumulator
    watched = calibration_pass.watched
    while True:
        swept: list[Swept] = []
        try:
            stop = calibration_pass.next_stop()
            if stop is None:
                return
            if isinstance(stop, BlockStop):
                swept = accumulator.at_block(stop, names, lambda module: features(watched[module]))
            else:
                stats = accumulator.at(stop, names(stop.module), features(watched[stop.module]))
        except BatchFailed as failed:  # a replayed block fails as its stop's inputs are read
            message = f"the forward pass failed: {type(failed.error).__name__}: {failed.error}"
            raise CalibrationError(rules, message, failed.index) from failed.error
        except BadInput as exc:
            raise CalibrationError(rules, str(exc), exc.batch) from exc
        # not held here once yielded: the caller may drop (or overwrite) them before the next stop
        if isinstance(stop, Stop):
            yield stop, stats, calibration_pass.shared_later(stop.module)
            del stats
        swept.reverse()
        while swept:
            entry = swept.pop()
            accumulator.sample = entry.sample
            yield Stop(entry.module, (), entry.same_as), entry.stats, entry.shared_later
            del entry


def collect(
    model: nn.Module, modules: Mapping[str, nn.Module], names: Collection[str], data: Iterable[Any], rules: str
) -> Statistics:
    """The statistics ``names`` of each of ``modules`` (by name), over every batch of ``data``, from
    the model as it is (nothing is pruned on the way: ``calibration.sequential: false``).

    ``rules`` names the rules that need them, for errors. Raises :class:`CalibrationError` naming the
    batch at fault; the model's parameters, buffers, hooks and modes are as they were afterwards.
    """
    unknown = sorted(set(names) - set(STATISTICS))
    if unknown:
        known = ", ".join(STATISTICS)
        raise CalibrationError(rules, f"no such statistics: {', '.join(unknown)} (prunespec collects {known})")
    out: Statistics = {}
    with Pass(model, batches(data, rules), modules) as calibration_pass:
        for stop, stats, _ in stops(calibration_pass, lambda _: names, rules):
            out[stop.module] = stats
            calibration_pass.release(stop.module)
        missing = calibration_pass.unreached()
    if missing:
        raise CalibrationError(
            rules, f"the model's forward never ran {', '.join(missing)} on the calibration data: no statistics"
        )
    return {name: out[name] for name in modules}


def collect_across_ranks(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    names: Callable[[str], Collection[str]],
    data: list[Any],
    rules: str,
) -> tuple[Statistics, int]:
    """Data-parallel calibration of a model split across ranks (DTensor parameters): each rank runs its
    own batches, one plain forward each (the model as it is: ``calibration.sequential: false``), and
    the statistics ``names(module)`` of each of ``modules`` are summed over every rank's batches.

    Vectors (``input_sq_norms``) are gathered batch by batch and summed in rank order: the sums one
    process makes of all the ranks' batches, in that order, to the bit. Matrices (``input_gram``,
    :data:`PER_RANK`) are too big to send once per batch: each rank sums its own batches in batch order,
    and those per-rank sums are added over ranks in float64, then
    rounded to float32 once. That order differs from one process's, so they equal one process's sums
    of the same batches up to float rounding, not to the bit.

    Returns the statistics and the tokens counted at the first module. Every rank must call this
    together, with as many batches as the others (a forward of a sharded model is collective)."""
    counts = [int(c) for c in distributed.gather(torch.tensor([len(data)]))]
    if len(set(counts)) > 1:
        given = ", ".join(f"rank {r}: {c}" for r, c in enumerate(counts))
        raise CalibrationError(rules, f"every rank must give as many calibration batches ({given})")
    parts: dict[str, dict[str, list[torch.Tensor]]] = {name: {} for name in modules}
    sums: dict[str, dict[str, torch.Tensor]] = {name: {} for name in modules}  # PER_RANK: this rank's batches
    tokens: dict[str, list[int]] = {name: [] for name in modules}
    batch_index = 0
    keep_mask: torch.Tensor | None = None

    def hook(name: str) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if len(tokens[name]) > batch_index:
                return  # a module run twice in one forward is calibrated on its first call
            x = first_tensor(args, kwargs)
            if x is None:
                raise BadInput(batch_index, f"{name} was called without a tensor input")
            stop = Stop(name, [Arrival(batch_index, x.detach(), keep_mask)])
            stats = Accumulator().at(stop, names(name), features(module))
            for stat, value in stats.items():
                if stat in PER_RANK:
                    total = sums[name].get(stat)
                    sums[name][stat] = value if total is None else total.add_(value)  # in batch order
                else:
                    parts[name].setdefault(stat, []).append(value)
            keep = tokens_kept(x, keep_mask, name)
            tokens[name].append(x.reshape(-1, x.shape[-1]).shape[0] if keep is None else int(keep.sum()))

        return record

    def start(index: int, batch: Any) -> None:
        nonlocal batch_index, keep_mask
        batch_index, keep_mask = index, attention_mask(batch)

    forward_each(model, data, {name: hook(name) for name in modules}, modules, rules, start)
    missing = [name for name in modules if len(tokens[name]) < len(data)]
    reached = [int(n) for n in distributed.gather(torch.tensor([len(missing)]))]
    if any(reached):
        raise CalibrationError(
            rules, "on some rank the model's forward never ran " + (", ".join(missing) or "a watched module")
        )
    out: Statistics = {}
    for name in modules:  # the same order on every rank
        out[name] = {}
        for stat, values in sorted(parts[name].items()):
            out[name][stat] = over_ranks(stat, values)
        for stat, mine in sorted(sums[name].items()):
            out[name][stat] = over_ranks(stat, [mine])
    first = next(iter(modules), None)
    count = 0 if first is None else sum(int(t.sum()) for t in distributed.gather(torch.tensor(tokens[first])))
    return out, count


def over_ranks(stat: str, parts: list[torch.Tensor]) -> torch.Tensor:
    """Statistic ``stat`` summed over every rank's batches, from this rank's ``parts`` (one per batch, in
    batch order; or, for :data:`PER_RANK` statistics, already summed). Vectors are gathered batch by
    batch and summed in rank order, to the bit what one process sums; :data:`PER_RANK` matrices are
    summed here, then over ranks in float64 (another order: equal up to float rounding). Every rank
    calls this together, for the same statistics in the same order."""
    if stat in PER_RANK:
        total = parts[0].clone()
        for part in parts[1:]:
            total.add_(part)
        return distributed.add_up(total)
    local = torch.stack(parts)
    summed: torch.Tensor | None = None
    for piece in distributed.gather(local.reshape(-1)):
        for part in piece.reshape(-1, *local.shape[1:]):
            summed = part.clone() if summed is None else summed.add_(part)
    assert summed is not None
    return summed


def forward_each(
    model: nn.Module,
    data: list[Any],
    hooks: Mapping[str, Callable[..., None]],
    modules: Mapping[str, nn.Module],
    rules: str,
    start: Callable[[int, Any], None],
    end: Callable[[int], None] | None = None,
) -> None:
    """One plain forward of each batch, in order, without grad, with ``hooks[name]`` as a forward
    pre-hook (with kwargs) of ``modules[name]`` meanwhile; ``start(index, batch)`` before each batch and
    ``end(index)`` after it. A batch whose forward fails (or whose input a hook finds wrong, as
    :class:`BadInput`) is a :class:`CalibrationError` naming it."""
    handles = [modules[name].register_forward_pre_hook(hook, with_kwargs=True) for name, hook in hooks.items()]
    try:
        with torch.no_grad(), without_cache(model):
            for index, batch in enumerate(data):
                start(index, batch)
                try:
                    run_batch(model, batch)
                except BadInput as exc:
                    raise CalibrationError(rules, str(exc), exc.batch) from exc
                except Exception as exc:
                    message = f"the forward pass failed: {type(exc).__name__}: {exc}"
                    raise CalibrationError(rules, message, index) from exc
                if end is not None:
                    end(index)
    finally:
        for handle in handles:
            handle.remove()
