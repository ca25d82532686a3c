"""OWL, outlier-weighted layerwise sparsity (Yin et al., ICML 2024): the math, without a model.

A block's *outlier ratio* is the share of its scores (Wanda's ``|W_ij| * ||X_j||``, over every tensor the
rule prunes in the block) greater than ``m`` times their mean. :func:`allocate` turns the blocks' ratios
into sparsities as luuyin/OWL computes them (``lib/prune_all.py``)::

    d_i = (r_i - min r) / (max r - min r) * 2 * lam     # min-max scaled into [0, 2 lam]
    d_i = d_i - mean(d) + (1 - target)                  # densities, with mean 1 - target
    s_i = 1 - d_i                                       # more outliers, lower sparsity

so the sparsities spread over exactly ``2 * lam`` and their mean (over blocks, not weighted by size, as
OWL's) is the target. Equal ratios (or one block) give every block the target.

Clipping, prunespec's rule: a sparsity outside [0, 1] (a target near 0 or 1) is clipped, and every
block is then shifted by one common amount ``c``, ``s_i = clip(o_i + c, 0, 1)`` with ``o_i`` OWL's
value, ``c`` chosen so that the mean is the target again. The order of the blocks is kept, and nothing
changes where no block needed clipping. (OWL itself only raises a sparsity <= 0 to 0.01.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def outlier_ratio(scores: Sequence[torch.Tensor], m: float) -> float:
    """The share of all of ``scores`` (one block's score tensors) greater than ``m`` times their mean,
    in [0, 1]; counted tensor by tensor (never concatenated), sums in float64. 0.0 for no entries."""
    if not (m > 0 and math.isfinite(m)):
        raise ValueError(f"m is {m!r}; OWL's M must be a finite number > 0 (luuyin/OWL uses 5)")
    total = sum(t.numel() for t in scores)
    if total == 0:
        return 0.0
    mean = sum(float(t.detach().sum(dtype=torch.float64)) for t in scores) / total
    if not math.isfinite(mean):
        raise ValueError("the scores hold NaN or infinite values; OWL counts outliers of finite scores")
    threshold = m * mean
    above = 0
    for t in scores:
        values = t.detach()
        if values.dtype not in (torch.float32, torch.float64):
            values = values.float()  # half-precision scores compared in float32, as OWL's are
        above += int((values > threshold).sum())
    return above / total


def allocate(ratios: Sequence[float], target: float, lam: float) -> list[float]:
    """Per-block sparsities from the blocks' outlier ratios (in block order): OWL's formula, mean
    ``target``, spread ``2 * lam``, the block with the most outliers the least sparse; clipped to [0, 1]
    as the module's docstring says."""
    if not 0.0 <= target <= 1.0:
        raise ValueError(f"target is {target!r}; a sparsity is in [0, 1]")
    if not 0.0 < lam < 1.0:
        raise ValueError(f"lam is {lam!r}; OWL's lambda is in (0, 1) (luuyin/OWL uses 0.08)")
    values = [float(r) for r in ratios]
    if not values:
        return []
    if not all(math.isfinite(r) for r in values):
        raise ValueError(f"the outlier ratios must be finite numbers; got {values}")
    low, high = min(values), max(values)
    if high == low:
        return [float(target)] * len(values)
    scale = 1 / (high - low) * lam * 2  # OWL's order of operations, for the same floats
    density = [(r - low) * scale for r in values]
    shift = math.fsum(density) / len(density)
    density = [d - shift + (1 - target) for d in density]
    return _clipped([1 - d for d in density], target)


def _clipped(sparsities: list[float], target: float) -> list[float]:
    """``clip(s + c, 0, 1)`` for the common ``c`` that makes the mean ``target`` (``sparsities`` itself
    when every value is already in [0, 1])."""
    if all(0.0 <= s <= 1.0 for s in sparsities):
        return sparsities
    n = len(sparsities)

    def mean_at(c: float) -> float:
        return math.fsum(min(max(s + c, 0.0), 1.0) for s in sparsities) / n

    # mean_at is piecewise linear and non-decreasing in c, with kinks where a value meets 0 or 1: find
    # the two kinks around the target and interpolate between them (exact on that linear piece).
    kinks = sorted({-s for s in sparsities} | {1.0 - s for s in sparsities})
    below, above = kinks[0], kinks[-1]  # mean_at(below) = 0 <= target <= 1 = mean_at(above)
    for kink in kinks:
        if mean_at(kink) <= target:
            below = kink
        if mean_at(kink) >= target:
            above = kink
            break
    low, high = mean_at(below), mean_at(above)
    c = below if high == low else below + (target - low) * (above - below) / (high - low)
    return [min(max(s + c, 0.0), 1.0) for s in sparsities]
