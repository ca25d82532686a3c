"""OWL's math (prunespec.owl) against an independent computation and luuyin/OWL's formula."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from prunespec.owl import allocate, outlier_ratio


def owl_reference(ratios: list[float], target: float, lam: float) -> list[float]:
    """luuyin/OWL's allocation (lib/prune_all.py, prune_wanda_outlier), in numpy as it is written there."""
    all_layer_ratio = np.array(ratios)
    all_layer_ratio = (all_layer_ratio - all_layer_ratio.min()) * (
        1 / (all_layer_ratio.max() - all_layer_ratio.min()) * lam * 2
    )
    all_layer_ratio = all_layer_ratio - np.mean(all_layer_ratio) + (1 - target)
    return [float(1 - d) for d in all_layer_ratio]


def scores(seed: int, *shapes: tuple[int, ...]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).abs() ** 3 for shape in shapes]  # heavy-tailed: some outliers


# --- outlier_ratio -------------------------------------------------------------------------------------


@pytest.mark.parametrize("m", [1.0, 2.0, 5.0])
def test_outlier_ratio_is_owls_count_over_the_concatenated_block(m: float) -> None:
    block = scores(0, (32, 16), (8, 16), (64,))
    flat = torch.cat([t.flatten().double() for t in block])
    expected = float((flat > flat.mean() * m).sum()) / flat.numel()  # OWL's check_outlier_mean, / 100
    assert outlier_ratio(block, m) == pytest.approx(expected, abs=0)
    assert 0 < outlier_ratio(block, m) < 1


def test_outlier_ratio_counts_half_precision_scores_in_float32() -> None:
    block = [t.half() for t in scores(1, (16, 16), (16, 8))]
    flat = torch.cat([t.flatten().float() for t in block])
    assert outlier_ratio(block, 5) == float((flat > flat.double().mean().item() * 5).sum()) / flat.numel()


def test_outlier_ratio_of_no_entries_or_equal_scores_is_zero() -> None:
    assert outlier_ratio([], 5) == 0.0
    assert outlier_ratio([torch.ones(0)], 5) == 0.0
    assert outlier_ratio([torch.ones(4, 4)], 1) == 0.0  # nothing is *greater* than the mean


def test_outlier_ratio_refuses_bad_m_and_nan_scores() -> None:
    with pytest.raises(ValueError, match="M must be a finite number > 0"):
        outlier_ratio([torch.ones(2)], 0)
    with pytest.raises(ValueError, match="NaN or infinite"):
        outlier_ratio([torch.tensor([1.0, math.nan])], 5)


# --- allocate ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ratios", "target", "lam"),
    [
        ([0.01, 0.03, 0.02, 0.05], 0.7, 0.08),
        ([3.1, 1.2, 9.0], 0.5, 0.2),
        ([0.2, 0.4], 0.6, 0.08),
        (list(np.linspace(0.001, 0.08, 32)), 0.7, 0.08),
    ],
)
def test_allocate_is_owls_formula(ratios: list[float], target: float, lam: float) -> None:
    got = allocate(ratios, target, lam)
    assert got == pytest.approx(owl_reference(ratios, target, lam), abs=1e-12)
    # independently: mean is the target, the spread is 2 * lambda, more outliers -> lower sparsity
    assert sum(got) / len(got) == pytest.approx(target, abs=1e-12)
    assert max(got) - min(got) == pytest.approx(2 * lam, abs=1e-12)
    order = sorted(range(len(ratios)), key=lambda i: ratios[i])
    assert [got[i] for i in order] == sorted(got, reverse=True)
    n = len(ratios)
    assert all(abs(s - target) <= 2 * lam * (n - 1) / n + 1e-12 for s in got)


def test_allocate_with_equal_ratios_or_one_block_gives_the_target() -> None:
    assert allocate([0.03, 0.03, 0.03], 0.7, 0.08) == [0.7, 0.7, 0.7]
    assert allocate([0.5], 0.4, 0.08) == [0.4]
    assert allocate([], 0.4, 0.08) == []


def test_allocate_scale_of_the_ratios_does_not_matter() -> None:
    ratios = [0.01, 0.04, 0.02]  # OWL keeps them in percent; min-max scaling removes the unit
    assert allocate(ratios, 0.7, 0.08) == pytest.approx(allocate([100 * r for r in ratios], 0.7, 0.08), abs=1e-12)


@pytest.mark.parametrize(
    ("ratios", "target", "lam"),
    [
        ([0.0, 0.0, 0.0, 1.0], 0.05, 0.3),  # OWL's values go below 0
        ([1.0, 0.0, 0.0, 0.0], 0.97, 0.3),  # ... above 1
        ([0.0, 0.5, 1.0], 0.5, 0.9),  # both
        ([0.0, 1.0, 2.0, 10.0], 0.0, 0.5),
        ([0.0, 1.0, 2.0, 10.0], 1.0, 0.5),
    ],
)
def test_clipping_keeps_the_mean_and_the_order(ratios: list[float], target: float, lam: float) -> None:
    owl = owl_reference(ratios, target, lam)
    assert not all(0 <= s <= 1 for s in owl)
    got = allocate(ratios, target, lam)
    assert all(0 <= s <= 1 for s in got)
    assert sum(got) / len(got) == pytest.approx(target, abs=1e-12)
    # the documented rule: one common shift c, then clip: s_i = clip(owl_i + c, 0, 1)
    inside = [i for i, s in enumerate(got) if 0 < s < 1]
    shifts = {round(got[i] - owl[i], 12) for i in inside}
    assert len(shifts) <= 1
    c = shifts.pop() if shifts else None
    if c is not None:
        assert got == pytest.approx([min(max(o + c, 0.0), 1.0) for o in owl], abs=1e-12)
    order = sorted(range(len(ratios)), key=lambda i: ratios[i])
    assert [got[i] for i in order] == sorted(got, reverse=True)


def test_allocate_refuses_what_is_not_a_target_or_lambda() -> None:
    with pytest.raises(ValueError, match="a sparsity is in"):
        allocate([0.1, 0.2], 1.5, 0.08)
    with pytest.raises(ValueError, match="lambda is in"):
        allocate([0.1, 0.2], 0.5, 0.0)
    with pytest.raises(ValueError, match="finite"):
        allocate([0.1, math.inf], 0.5, 0.08)
