"""Exact selection without topk or concatenation: same masks as torch where no score ties the
threshold, exact counts and the documented tie rule where scores tie."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import prunespec
from prunespec import selection
from prunespec.selection import MIN_SAMPLE, Entry, apply_cut, find_cuts, group_dtype


def select(tensors: list[torch.Tensor], k: int, masks: list[torch.Tensor | None] | None = None) -> list[torch.Tensor]:
    entries = [Entry(t, m) for t, m in zip(tensors, masks or [None] * len(tensors), strict=True)]
    cuts = find_cuts(entries, k, torch.abs)
    assert cuts is not None
    dtype = group_dtype(entries, torch.abs)
    masks = [apply_cut(e, cut, torch.abs, dtype) for e, cut in zip(entries, cuts, strict=True)]
    for mask, zeros in masks:
        assert int(zeros) == int((mask == 0).sum())
    return [mask for mask, _ in masks]


@pytest.mark.parametrize("numel", [7, 1000, 4 * MIN_SAMPLE + 17, 300_000])
@pytest.mark.parametrize("amount", [0.0, 0.13, 0.5, 0.97, 1.0])
def test_single_tensor_equals_torch_when_tie_free(numel: int, amount: float) -> None:
    torch.manual_seed(numel)
    t = torch.randn(numel, dtype=torch.float64)  # float64 normals: no ties in practice
    assert torch.unique(t.abs()).numel() == numel
    expected = prune.L1Unstructured(amount).compute_mask(t, torch.ones_like(t))
    (mask,) = select([t], round(amount * numel))
    assert torch.equal(mask, expected)


def test_group_equals_global_unstructured_with_earlier_masks() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(300, 200), nn.Linear(200, 400), nn.Linear(400, 10))
    prune.l1_unstructured(model[1], "weight", amount=0.3)
    reference = [model[i].weight.detach().clone() for i in range(3)]
    masks_before = [None, model[1].weight_mask.clone(), None]
    pairs = [(model[i], "weight") for i in range(3)]
    prune.global_unstructured(pairs, pruning_method=prune.L1Unstructured, amount=0.6)
    remaining = sum(t.numel() for t in reference) - int((masks_before[1] == 0).sum())
    origs = [model[0].weight_orig, model[1].weight_orig, model[2].weight_orig]
    ours = select([o.detach() for o in origs], round(0.6 * remaining), masks_before)
    for i in range(3):
        assert torch.equal(ours[i], model[i].weight_mask), i


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_ties_give_exact_counts_and_prune_the_first_tied_entries(dtype: torch.dtype) -> None:
    torch.manual_seed(2)
    a = torch.randint(-3, 4, (5000,)).to(dtype)  # 7 distinct values: ties everywhere
    b = torch.randint(-3, 4, (3000,)).to(dtype)
    k = 3333
    ma, mb = select([a, b], k)
    assert ma.dtype == dtype and mb.dtype == dtype
    assert int((ma == 0).sum() + (mb == 0).sum()) == k
    scores = torch.cat([a.abs().float(), b.abs().float()])
    pruned = torch.cat([ma == 0, mb == 0])
    cut = scores[pruned].max()
    assert bool((scores[~pruned] >= cut).all())  # nothing kept scores below anything pruned
    tied = (scores == cut).nonzero().reshape(-1)
    tied_pruned = pruned[tied]
    # the documented rule: the first tied entries (group order, then row-major) are the pruned ones
    assert bool(tied_pruned[: int(tied_pruned.sum())].all()) and not bool(tied_pruned[int(tied_pruned.sum()) :].any())


def test_mixed_dtypes_compare_in_the_promoted_dtype() -> None:
    torch.manual_seed(3)
    a = torch.randn(4000, dtype=torch.float32)
    b = torch.randn(4000, dtype=torch.float16)
    ma, mb = select([a, b], 4000)
    promoted = torch.cat([a, b.float()])
    expected = prune.L1Unstructured(4000).compute_mask(promoted, torch.ones_like(promoted))
    assert torch.equal(torch.cat([ma, mb.float()]), expected)
    assert mb.dtype == torch.float16


def test_nan_is_never_pruned_unless_only_nans_are_left() -> None:
    t = torch.tensor([0.5, float("nan"), -0.1, 2.0, float("nan")])
    (mask,) = select([t], 3)
    assert mask.tolist()[1] == 1 and mask.tolist()[4] == 1
    assert int((mask == 0).sum()) == 3
    assert find_cuts([Entry(t)], 4, torch.abs) is None  # reaching 4 needs a NaN: torch's ranking decides


def test_global_l1_through_apply_keeps_exact_count_on_fp16(methods: prunespec.MethodRegistry) -> None:
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 32)).half()
    spec = {
        "version": 1,
        "rules": [{"select": {"types": ["Linear"]}, "scope": "global", "method": "l1_unstructured", "amount": 0.5}],
    }
    report = prunespec.apply(model, spec, methods=methods)
    total = 64 * 64 + 64 * 32
    assert sum(s.zeros for s in report.entries.values()) == round(0.5 * total)
    assert model[0].weight_mask.dtype == torch.float16


@pytest.mark.parametrize("dim", [0, 1, -1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_structured_fast_path_equals_torch_after_earlier_pruning(
    dim: int, dtype: torch.dtype, methods: prunespec.MethodRegistry
) -> None:
    torch.manual_seed(5)
    ours = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Linear(12, 10)).to(dtype)
    with torch.no_grad():
        ours[1].weight[3] = ours[1].weight[4]  # two rows with equal norms: topk decides, as in torch
    theirs = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Linear(12, 10)).to(dtype)
    theirs.load_state_dict(ours.state_dict())
    for model in (ours, theirs):
        prune.l1_unstructured(model[0], "weight", amount=0.3)
        prune.ln_structured(model[1], "weight", amount=2, n=2, dim=0)
    spec = {
        "version": 1,
        "rules": [
            {"select": {"names": ["0", "1"]}, "method": "ln_structured", "amount": 0.5, "options": {"n": 1, "dim": dim}}
        ],
    }
    prunespec.apply(ours, spec, methods=methods)
    for module in theirs:
        prune.ln_structured(module, "weight", amount=0.5, n=1, dim=dim)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a.weight_mask, b.weight_mask)
        assert a.weight_mask.dtype == b.weight_mask.dtype == dtype


def test_accelerator_gather_path_gives_the_same_masks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The gather used on GPUs (padded, no wait for counts), run on the CPU, with room for too few
    candidates at first so that the retry is exercised too."""
    from prunespec import selection

    torch.manual_seed(6)
    tensors = [torch.randn(300, 200, dtype=torch.float64), torch.randn(50_000, dtype=torch.float64)]
    expected = select(tensors, 40_000)
    monkeypatch.setattr(selection, "_padded", lambda device: True)
    original = selection._bracket
    monkeypatch.setattr(selection, "_bracket", lambda *a: (*original(*a)[:2], 1e-4))  # caps far too small
    assert all(torch.equal(a, b) for a, b in zip(select(tensors, 40_000), expected, strict=True))


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("rows_per_topk", [None, 1])
def test_select_rows_without_sorting_picks_what_a_stable_sort_picks(
    seed: int, dtype: torch.dtype, signed: bool, rows_per_topk: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    if rows_per_topk is not None:  # the rows' thresholds found a few rows at a time, as for a wide tensor
        monkeypatch.setattr(selection, "_TOPK_ENTRIES", rows_per_topk)
    gen = torch.Generator().manual_seed(seed)
    rows, size = 1 + seed % 7, 1 + seed * 3
    scores = torch.randint(-3 if signed else 0, 4, (rows, size), generator=gen).to(dtype)  # many ties
    if signed:  # negatives, -0.0 tied with 0.0, the smallest subnormal and +inf
        flips = torch.rand(rows, size, generator=gen)
        scores[(scores == 0) & (flips < 0.5)] = -0.0
        scores[flips > 0.95] = torch.finfo(dtype).tiny / 2
        scores[flips < 0.05] = math.inf
    scores[torch.rand(rows, size, generator=gen) < 0.2] = -math.inf  # pruned before
    choices = torch.tensor([0, size, size // 2, 1])
    targets = choices[torch.randint(0, 4, (rows,), generator=gen)]
    pruned, ok = selection.select_rows(scores, targets)
    order = torch.sort(scores, dim=1, stable=True).indices
    chosen = torch.arange(size).expand_as(scores) < targets.reshape(-1, 1)
    expected = torch.empty_like(chosen).scatter_(1, order, chosen)
    assert torch.equal(pruned, expected) and bool(ok.all())
    assert torch.equal(pruned.sum(dim=1), targets)
