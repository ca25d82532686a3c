"""``sparsegpt``: prune a layer and reconstruct the weights it keeps (Frantar & Alistarh, 2023,
"SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot").

A Linear layer's output on calibration inputs ``X`` (tokens as rows) is ``X W^T``. SparseGPT prunes
``W`` and moves the error of each pruned weight onto the weights of its row not yet visited, so that
``||X W^T - X W'^T||^2`` stays small (optimal brain surgeon, one column at a time). The Hessian of that
error is ``H = X^T X`` (the ``input_gram`` statistic, :mod:`prunespec.calibration`) plus
``dampening * mean(diag H)`` on its diagonal. With ``U`` the upper Cholesky factor of ``H^-1``, columns
are visited left to right in blocks of ``block_size``; inside a block, the pruned weights of column
``j`` (``w``, the column's current values) give the error ``e = w_pruned / U_jj``, and the row's
later columns of the block take ``-e * U[j, j:]``; at the end of a block its errors reach every later
column with one matmul (the paper's lazy batch updates). Which weights are pruned:

* an amount (unstructured): the rule's count (``self.n_to_prune`` of the entries left) is shared out
  between the blocks in proportion to the entries each has left (the shares add up to exactly the
  count); each block prunes, over all rows together, its share of the lowest ``w^2 / U_jj^2`` among its
  current values (the paper's adaptive mask selection; ties to the lower flat index);
* ``n``/``m`` (N:M): when the sweep reaches the first column of each group of ``m`` consecutive inputs,
  each row keeps the ``n`` highest ``w^2 / U_jj^2`` of its group's current values (``n`` is the number
  KEPT, as for ``wanda``: ``n: 2, m: 4`` is 2:4; earlier-pruned entries count as pruned first); the rule
  then gives no amount.

Options: ``n``, ``m``; ``block_size`` (128): columns per lazy batch; ``dampening`` (0.01): the fraction
of the mean of ``diag H`` added to the diagonal. The weight is computed in float32 on its own device,
starting from the masked values: entries pruned earlier are zeros and stay pruned.

An input that is never active (``H_jj = 0``) gets ``H_jj = 1``: it carries no error to the others and
keeps its value unless it is selected for pruning (the original script zeroes such weights; prunespec
does not, so a layer pruned on data that never exercised an input keeps it).

Afterwards ``weight_orig`` holds the reconstructed values at kept entries and the values from before
this step at pruned ones, ``weight_mask`` the pruned entries: ``finalize`` leaves the plain result.
Only 2-D weights, ``(out, in)``; transformers' ``Conv1D`` (weight ``(in, out)``) works through its
transpose. ``scope: global`` is refused (each layer's error is its own). Memory: one ``(in, in)``
float32 Hessian per distinct layer input (``q``/``k``/``v`` share one) and its factor ``U``, computed
once per Hessian and cached while the Hessian lives, plus a float32 copy of the weight.

On a DTensor (FSDP2: a Linear weight split along its rows, dim 0), each rank sweeps its own rows with
the factor of the Hessian summed over every rank's batches (the same on every rank): a row's updates
need nothing from other rows. The unstructured selection is what rows share: the per-block counts are
summed over ranks and each block's cut is found across ranks (:mod:`prunespec.selection`), ties in
row-major order of the whole block, as in one process. N:M is per row. The Hessian's sum over ranks
is rounded differently from one process's (:func:`prunespec.calibration.collect_across_ranks`), so
masks and values equal one process's up to that rounding.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from pydantic import Field, field_validator

from .. import distributed
from ..calibration import out_in, transposed
from ..distributed import Sharding
from ..selection import Entry, apply_cut, find_cuts, select_rows
from .base import Capabilities, MaskContext, PruningMethod
from .nm import NMOptions, PositiveInt, linear_problem


class SparseGPTOptions(NMOptions):
    """Options of ``sparsegpt``."""

    block_size: PositiveInt = Field(
        default=128, description="Columns per lazy batch update (the paper's B); masks are chosen per block."
    )
    dampening: float = Field(
        default=0.01,
        gt=0,
        allow_inf_nan=False,
        description="Fraction of the mean of the Hessian's diagonal added to its diagonal (the paper's percdamp).",
    )

    @field_validator("dampening", mode="before")
    @classmethod
    def _a_number(cls, value: Any) -> Any:
        # pydantic would read True as 1.0 and "0.1" as 0.1: a spec that says either meant something else
        if isinstance(value, (bool, str)):
            raise ValueError(f"dampening must be a number such as 0.01, got {value!r}")
        return value


class SparseGPT(PruningMethod):
    """Prune with the smallest w^2 / [H^-1]_jj and compensate in the kept weights (calibration Hessian)."""

    own_random = True  # deterministic

    name = "sparsegpt"
    Options = SparseGPTOptions
    statistics: ClassVar[tuple[str, ...]] = ("input_gram",)
    amount_replaced_by: ClassVar[tuple[str, ...]] = ("n", "m")
    updates_values: ClassVar[bool] = True
    # On a DTensor split along rows (FSDP2), each rank sweeps its own rows: a row's updates need only the
    # shared factor U (every rank has the same Hessian, summed over ranks). What rows share, the
    # unstructured per-block selection, is made across ranks (prunespec.selection); N:M is per row.
    shards: ClassVar[bool] = True

    n: int | None
    m: int | None
    block_size: int
    dampening: float

    @classmethod
    def capabilities(cls) -> Capabilities:
        # each layer's reconstruction error is on its own scale: one budget across layers is not SparseGPT
        return dataclasses.replace(super().capabilities(), supports_global=False)

    @classmethod
    def check_tensor(cls, shape: tuple[int, ...], options: Mapping[str, Any]) -> str | None:
        return linear_problem(cls.name, shape, options)

    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(
            "sparsegpt needs its module and calibration data: prunespec computes its masks and values with "
            "reconstruct(ctx) at apply (prunespec.apply(..., data=...))"
        )

    def mask(self, ctx: MaskContext) -> torch.Tensor:
        """The mask :meth:`reconstruct` gives (for direct calls; the values are discarded)."""
        return self.reconstruct(ctx)[0]

    def reconstruct(self, ctx: MaskContext) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mask, values)`` in the parameter's layout: the new mask and ``weight_orig``'s new values
        (reconstructed where kept, as before this step where pruned)."""
        original = out_in(ctx.module, ctx.values.detach())
        rows, cols = original.shape
        rows_of = _rows_of(ctx)
        gram = _gram(ctx, cols)
        if self.m is not None and cols % self.m:
            raise ValueError(f"{ctx.name}: the input dimension {cols} is not a multiple of m={self.m}")
        weight = original.to(torch.float32, copy=True)
        if not bool(torch.isfinite(weight).all()):
            raise ValueError(f"sparsegpt cannot reconstruct {ctx.name}: its weight has inf or NaN entries")
        if ctx.mask is None:
            pruned = torch.zeros(rows, cols, dtype=torch.bool, device=weight.device)
        else:
            pruned = out_in(ctx.module, ctx.mask) == 0
            weight.masked_fill_(pruned, 0.0)

        counts: list[int] | None = None
        select: Select = _select_block
        if self.n is None:
            counts, left = self._block_counts(pruned, rows_of)
            if not any(counts):  # nothing more to prune: nothing moves either (the same on every rank)
                return ctx.default_mask.clone(), ctx.values.detach().clone()
            if rows_of is not None:
                select = _AcrossRanks(rows_of, left)
        factor = _inverse_factor(gram, self.dampening, weight.device, ctx.name, consume=ctx.statistics_consumable)
        _sweep(weight, pruned, factor, self.block_size, counts, self.n, self.m, select)

        values = torch.empty_like(ctx.values)
        out_in(ctx.module, values).copy_(torch.where(pruned, original, weight.to(original.dtype)))
        mask = torch.empty_like(ctx.default_mask)
        out_in(ctx.module, mask).copy_(~pruned)
        return mask, values

    def _block_counts(self, pruned: torch.Tensor, rows_of: Sharding | None) -> tuple[list[int], list[int]]:
        """Entries each block of columns prunes: the rule's count shared in proportion to the entries
        each block has left, rounded cumulatively so the shares add up to the count; and the entries
        each block has left. Both over every row: on a DTensor, summed over ranks (collective)."""
        block = self.block_size
        left_per_column = (~pruned).sum(dim=0)
        padded = torch.nn.functional.pad(left_per_column, (0, -left_per_column.numel() % block))
        per_block = padded.reshape(-1, block).sum(dim=1)
        if rows_of is not None:
            per_block = torch.tensor(distributed.reduce(per_block.tolist(), [rows_of] * per_block.numel()))
        cumulative = per_block.cumsum(0)
        left = int(cumulative[-1])
        k = self.n_to_prune(left)
        if left == 0:
            return [0] * cumulative.numel(), per_block.tolist()
        shares = (2 * k * cumulative + left) // (2 * left)  # k * cumulative / left rounded half up, in integers
        return torch.diff(shares, prepend=shares.new_zeros(1)).tolist(), per_block.tolist()


def _rows_of(ctx: MaskContext) -> Sharding | None:
    """Where this rank's rows lie in the whole weight, for a DTensor (None for a plain tensor). Each rank
    sweeps its own rows, so rows must lie whole on one rank: a Linear's weight split along dim 0 only."""
    sharding = ctx.sharding
    if sharding is None:
        return None
    split = sharding.sharded_dims
    if transposed(ctx.module) or len(sharding.shape) != 2 or split - {0}:
        raise ValueError(
            f"sparsegpt on a DTensor needs whole rows on each rank (a Linear weight split along dim 0 only); "
            f"{ctx.name} is split along dims {sorted(split)}"
        )
    return sharding


def _gram(ctx: MaskContext, cols: int) -> torch.Tensor:
    gram = ctx.statistics.get("input_gram")
    if gram is None:
        raise ValueError(f"sparsegpt needs the input_gram statistic for {ctx.name}: pass calibration data (data=...)")
    if gram.shape != (cols, cols):
        raise ValueError(
            f"input_gram for {ctx.name} has shape {list(gram.shape)}, expected [{cols}, {cols}] "
            "(one row and column per input feature of the weight)"
        )
    return gram


Select = Callable[[torch.Tensor, torch.Tensor, int, int], torch.Tensor]
"""(scores, pruned, count, block) -> the ``count`` entries of a block of columns to prune, a bool matrix:
the lowest scores of those not pruned yet, over all rows together, ties to the lower flat index."""


def _select_block(score: torch.Tensor, done: torch.Tensor, count: int, block: int) -> torch.Tensor:
    """:data:`Select` for a whole weight, in one process."""
    score = score.masked_fill(done, math.inf)
    # the block's lowest scores, ties to the lower flat index, without sorting the whole block
    target = torch.tensor([count], device=score.device)
    chosen, _ = select_rows(score.reshape(1, -1), target)
    return chosen.view(score.shape)


@dataclass(frozen=True)
class _AcrossRanks:
    """:data:`Select` for this rank's rows of a DTensor: the same entries as one process over all rows
    (collective). The block's counts are summed and its few candidates near the cut gathered
    (:func:`prunespec.selection.find_cuts`); ties go in row-major order of the whole block."""

    rows: Sharding  # the weight's: this rank's rows, whole
    left: list[int]  # each block's entries not pruned yet, over every rank

    def __call__(self, score: torch.Tensor, done: torch.Tensor, count: int, block: int) -> torch.Tensor:
        local_rows, width = score.shape
        whole = self.rows
        part = Sharding(
            (whole.shape[0], width),
            (local_rows, width),
            (whole.offset[0], 0),
            whole.counted,
            whole.mesh,
            whole.placements,
        )
        entry = Entry(score, (~done).to(score.dtype), part)  # pruned entries (mask 0) count as pruned first
        already = whole.shape[0] * width - self.left[block]
        cuts = find_cuts([entry], count, _identity, already=[already])
        if cuts is None:
            raise ValueError("the reconstruction gave NaN weights; raise dampening (e.g. 0.1)")
        keep, _ = apply_cut(entry, cuts[0], _identity, score.dtype)
        return keep == 0


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _sweep(
    weight: torch.Tensor,
    pruned: torch.Tensor,
    factor: torch.Tensor,
    block_size: int,
    counts: list[int] | None,
    n: int | None,
    m: int | None,
    select: Select = _select_block,
) -> None:
    """The column sweep, in place: ``weight`` ends reconstructed (zeros where pruned), ``pruned`` with
    every entry pruned. ``counts``: entries each block prunes (unstructured, chosen by ``select``), or
    None for N:M."""
    cols = weight.shape[1]
    diag = factor.diagonal()
    for block, start in enumerate(range(0, cols, block_size)):
        end = min(start + block_size, cols)
        # the block's columns as contiguous rows: the sweep works one column at a time
        wt = weight[:, start:end].T.contiguous()
        u = factor[start:end, start:end]
        done = pruned[:, start:end]  # a view: selections below land in `pruned`
        errors_t = torch.zeros_like(wt)
        w, errors = wt.T, errors_t.T  # (rows, columns) views of the same memory
        if counts is not None and counts[block]:  # the same on every rank: counts are over all rows
            done |= select((w / diag[start:end]).square(), done, counts[block], block)
        width = end - start
        step = _sub_block(width, block_size, m)
        for low in range(0, width, step):
            high = min(low + step, width)
            # a pruned entry's error is its value over U_jj, spread over the later columns of its row
            scale = done[:, low:high].T / u.diagonal()[low:high].unsqueeze(1)
            for i in range(low, high):
                if m is not None and n is not None and (start + i) % m == 0:
                    _select_group(w, errors, weight, pruned, factor, start, end, i, n, m)
                    group = slice(i - low, min(i - low + m, high - low))
                    scale[group] = done[:, i : i + m].T / u.diagonal()[i : i + m].unsqueeze(1)
                torch.mul(wt[i], scale[i - low], out=errors_t[i])
                if i + 1 < high:
                    wt[i + 1 : high].addr_(u[i, i + 1 : high], errors_t[i], alpha=-1.0)
            wt[low:high].masked_fill_(done[:, low:high].T, 0.0)  # exactly zero where pruned, no rounding residue
            if high < width:  # the sub-block's errors reach the rest of the block in one matmul
                wt[high:].addmm_(u[low:high, high:].T, errors_t[low:high], alpha=-1.0)
        weight[:, start:end] = w
        weight[:, end:].addmm_(errors, factor[start:end, end:], alpha=-1.0)


_SUB_BLOCK = 16  # columns updated one by one before their errors reach the rest of the block at once


def _sub_block(width: int, block_size: int, m: int | None) -> int:
    """Columns per inner step: the same result as one column at a time over the whole block (lazy
    updates, as between blocks), with less memory traffic. N:M groups must not straddle a step, so
    with ``m`` the steps are multiples of it and blocks must start on group boundaries."""
    if m is None:
        return min(_SUB_BLOCK, width)
    if block_size % m:
        return width
    return max(m, _SUB_BLOCK // m * m)


def _select_group(
    w: torch.Tensor,
    errors: torch.Tensor,
    weight: torch.Tensor,
    pruned: torch.Tensor,
    factor: torch.Tensor,
    start: int,
    end: int,
    i: int,
    n: int,
    m: int,
) -> None:
    """Mark, in each row, the ``m - n`` lowest ``w^2 / U_jj^2`` of the group of ``m`` columns starting
    at block column ``i``, on the group's current values."""
    first = start + i
    inside = min(m, end - first)
    values = w[:, i : i + inside]
    if inside < m:
        # the group runs past the block: those columns have not had this block's errors yet
        later = weight[:, end : first + m] - errors[:, :i] @ factor[start:first, end : first + m]
        values = torch.cat([values, later], dim=1)
    group = pruned[:, first : first + m]
    score = (values / factor.diagonal()[first : first + m]).square().masked_fill(group, -math.inf)
    lowest = torch.sort(score, dim=1, stable=True).indices[:, : m - n]
    group.scatter_(1, lowest, True)


# --- the inverse Hessian's factor, once per Hessian ----------------------------------------------------


@dataclass
class _Entry:
    factor: torch.Tensor
    finalizer: weakref.finalize[Any, Any]


_CACHE_SIZE = 4  # a few: modules sharing an input (q/k/v, gate/up) are pruned one after the other
_cache: OrderedDict[tuple[int, int, float, torch.device], _Entry] = OrderedDict()
# reentrant: a Hessian freed while the lock is held runs its finalizer, which takes the lock too
_lock = threading.RLock()


def _forget(key: tuple[int, int, float, torch.device]) -> None:
    with _lock:
        _cache.pop(key, None)


def _inverse_factor(
    gram: torch.Tensor, dampening: float, device: torch.device, where: str, *, consume: bool = False
) -> torch.Tensor:
    """``U``, the upper Cholesky factor of the dampened ``gram``'s inverse, on ``device``; computed once
    per gram object (and version: an in-place change misses the cache) while that object lives.
    ``consume``: no one reads ``gram`` after this, so when it has no factor yet and is a contiguous
    float32 matrix on ``device``, it is factored in place and nothing is cached."""
    # id() alone could be reused by a new tensor once this one is freed: the finalizer drops the entry first
    key = (id(gram), gram._version, float(dampening), device)
    with _lock:  # held while factoring: a second caller with the same Hessian waits rather than factors it too
        entry = _cache.get(key)
        if entry is not None:
            _cache.move_to_end(key)
            return entry.factor
        if consume and gram.device == device and gram.dtype == torch.float32 and gram.is_contiguous():
            return _factor(gram, dampening, device, where, in_place=True)
        factor = _factor(gram, dampening, device, where)
        _cache[key] = _Entry(factor, weakref.finalize(gram, _forget, key))
        while len(_cache) > _CACHE_SIZE:
            _, oldest = _cache.popitem(last=False)
            oldest.finalizer.detach()
        return factor


def _factor(
    gram: torch.Tensor, dampening: float, device: torch.device, where: str, *, in_place: bool = False
) -> torch.Tensor:
    # One Cholesky instead of the paper's two (of H, then of H^-1): with P the order reversal and
    # P H P = L L^T, U = P L^-1 P is upper triangular and U^T U = H^-1. One matrix of the Hessian's size
    # beside it: everything after the flip's copy happens in place (``in_place``: in ``gram`` itself, a
    # contiguous float32 matrix on ``device``; none beside it).
    h = _reverse(gram.detach()) if in_place else gram.detach().to(device=device, dtype=torch.float32).flip(0, 1)
    diagonal = h.diagonal()
    diagonal[diagonal == 0] = 1.0  # a never-active input: its row and column are zero, any positive value will do
    diagonal += dampening * diagonal.mean()
    # h is symmetric, so its column-major view is the same matrix, in the layout LAPACK factors in place
    lower = h.mT
    info = torch.empty((), dtype=torch.int32, device=device)
    torch.linalg.cholesky_ex(lower, out=(lower, info))
    if int(info) != 0 or not bool(torch.isfinite(lower.diagonal()).all()):
        raise ValueError(
            f"sparsegpt: the Hessian of {where} (input_gram plus dampening={dampening} times its mean diagonal) "
            "is not positive definite; raise dampening (e.g. 0.1), or check the calibration data for inf/NaN"
        )
    _invert_lower(lower)
    # lower holds L^-1, so h (its row-major transpose) holds L^-T; U = P L^-1 P is h reversed, transposed
    return _reverse(h).mT


def _invert_lower(t: torch.Tensor, leaf: int = 256) -> None:
    """Invert the lower-triangular ``t`` in place (its upper part zeros, and left so): blockwise, with
    ``[[A, 0], [B, C]]^-1 = [[A^-1, 0], [-C^-1 B A^-1, C^-1]]``, so that beside ``t`` only a quarter of
    its size is held (an identity and a triangular solve would hold a whole second matrix)."""
    n = t.shape[0]
    if n <= leaf:
        t.copy_(torch.linalg.solve_triangular(t, torch.eye(n, dtype=t.dtype, device=t.device), upper=False))
        return
    half = n // 2
    a, b, c = t[:half, :half], t[half:, :half], t[half:, half:]
    _invert_lower(a, leaf)
    _invert_lower(c, leaf)
    right = b @ a  # B A^-1
    for rows in range(0, n - half, leaf):  # C^-1 (B A^-1), a few rows at a time: no second quarter
        b[rows : rows + leaf] = c[rows : rows + leaf] @ right
    b.neg_()


def _reverse(t: torch.Tensor, chunk: int = 1 << 20) -> torch.Tensor:
    """``t.flip(0, 1)`` in place (a contiguous matrix: its elements in reverse order), with ``chunk``
    elements of extra memory rather than a second matrix."""
    flat = t.view(-1)
    size = flat.numel()
    for low in range(0, size // 2, chunk):
        high = min(low + chunk, size // 2)
        front, back = flat[low:high], flat[size - high : size - low]
        saved = front.clone()
        front.copy_(back.flip(0))
        back.copy_(saved.flip(0))
    return t
