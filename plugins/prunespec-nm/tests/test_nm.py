"""prunespec-nm: the N:M mask, its options, its plan-time checks, and prunespec's method contract."""

from __future__ import annotations

import copy
import io
import itertools

import prunespec
import pytest
import torch
from prunespec.testing import check_method, registered_methods
from pydantic import ValidationError
from torch import nn
from torch.nn.utils import prune

import prunespec_nm
from prunespec_nm import NMOptions, NMPruning, nm_mask


def reference_mask(weight: torch.Tensor, default: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """The N:M mask by brute force: for every (out, *kernel) position, groups of m consecutive input channels."""
    mask = torch.zeros_like(weight)
    out, inp, *kernel = weight.shape
    for o, pos in itertools.product(range(out), itertools.product(*(range(k) for k in kernel))):
        for start in range(0, inp, m):
            idx = [(o, i, *pos) for i in range(start, start + m)]
            alive = [ix for ix in idx if default[ix] != 0]
            # largest |w| first; ties towards the lower input index
            ranked = sorted(alive, key=lambda ix: (-abs(float(weight[ix])), ix[1]))
            for ix in ranked[:n]:
                mask[ix] = 1
    return mask


def test_contract() -> None:
    check_method(NMPruning, options={"n": 2, "m": 4})
    check_method(NMPruning, options={"n": 1, "m": 4}, shapes=[(6, 8), (4, 8, 3, 3), (5, 4, 2)])
    check_method(NMPruning, options={"n": 3, "m": 8}, shapes=[(2, 16)])


def test_the_hook_registers_nm() -> None:
    info = registered_methods(prunespec_nm)["nm"]
    assert info.cls is NMPruning
    assert (info.pruning_type, info.takes_amount, info.options_model) == ("global", False, NMOptions)


def test_2_4_on_a_linear_keeps_the_2_largest_of_every_4_inputs() -> None:
    torch.manual_seed(0)
    weight = torch.randn(6, 16)
    mask = nm_mask(weight, torch.ones_like(weight), n=2, m=4)
    assert mask.shape == weight.shape and mask.dtype == weight.dtype
    assert torch.equal(mask.reshape(6, 4, 4).sum(dim=-1), torch.full((6, 4), 2.0))
    assert torch.equal(mask, reference_mask(weight, torch.ones_like(weight), 2, 4))
    # the survivors are the largest-magnitude two of each group
    groups, kept = weight.abs().reshape(6, 4, 4), mask.reshape(6, 4, 4).bool()
    assert bool((groups[kept].reshape(6, 4, 2).min(-1).values >= groups[~kept].reshape(6, 4, 2).max(-1).values).all())


@pytest.mark.parametrize("n", [1, 2, 3])
def test_conv_groups_run_along_input_channels_for_each_kernel_position(n: int) -> None:
    torch.manual_seed(1)
    weight = torch.randn(3, 8, 3, 2)
    mask = nm_mask(weight, torch.ones_like(weight), n=n, m=4)
    assert torch.equal(mask, reference_mask(weight, torch.ones_like(weight), n, 4))
    assert torch.equal(mask.reshape(3, 2, 4, 3, 2).sum(dim=2), torch.full((3, 2, 3, 2), float(n)))


def test_earlier_zeros_stay_pruned_and_rank_last() -> None:
    torch.manual_seed(2)
    weight = torch.randn(4, 12)
    default = (torch.rand(4, 12) > 0.4).float()
    weight[default == 0] *= 100  # large but pruned: must not be chosen over any unpruned entry
    mask = nm_mask(weight, default, n=2, m=4)
    assert not bool(mask[default == 0].any())
    assert torch.equal(mask, reference_mask(weight, default, 2, 4))
    alive = default.reshape(4, 3, 4).sum(-1)
    assert torch.equal(mask.reshape(4, 3, 4).sum(-1), alive.clamp(max=2))


def test_ties_break_towards_the_lower_index() -> None:
    mask = nm_mask(torch.ones(2, 8), torch.ones(2, 8), n=2, m=4)
    assert mask.tolist() == [[1, 1, 0, 0, 1, 1, 0, 0]] * 2


def test_composes_like_torch_on_top_of_l1_unstructured() -> None:
    torch.manual_seed(3)
    layer = nn.Linear(16, 5)
    prune.l1_unstructured(layer, "weight", amount=0.3)
    earlier = layer.weight_mask.clone()
    NMPruning.apply(layer, "weight", n=2, m=4)  # torch's own composition: a PruningContainer
    assert isinstance(layer._forward_pre_hooks[next(iter(layer._forward_pre_hooks))], prune.PruningContainer)
    assert torch.equal(layer.weight_mask, reference_mask(layer.weight_orig.detach(), earlier, 2, 4))
    assert not bool(layer.weight_mask[earlier == 0].any())


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"n": 4, "m": 4}, "must be smaller than m=4"),
        ({"n": 3, "m": 2}, "KEPT"),
        ({"n": 0, "m": 4}, "greater than or equal to 1"),
        ({"n": "two", "m": 4}, "valid integer"),
        ({"n": True, "m": 4}, "valid integer"),
        ({"n": 2.0, "m": 4}, "valid integer"),
        ({"n": 2}, "Field required"),
        ({"n": 2, "m": 4, "k": 1}, "Extra inputs"),
    ],
)
def test_bad_options_are_refused(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        NMOptions(**options)


def test_option_descriptions_say_n_is_kept() -> None:
    schema = NMOptions.model_json_schema()
    assert schema["required"] == ["n", "m"]
    assert "KEPT" in schema["properties"]["n"]["description"]
    assert "keeps 2 of every 4" in schema["properties"]["n"]["description"]


@pytest.mark.parametrize(
    ("shape", "problem"),
    [
        ((8, 16), None),
        ((4, 8, 3, 3), None),
        ((10,), "2 or more dims"),
        ((5, 6), "size 6, which is not a multiple of m=4"),
        ((4, 6, 3, 3), "size 6, which is not a multiple of m=4"),
    ],
)
def test_check_tensor(shape: tuple[int, ...], problem: str | None) -> None:
    found = NMPruning.check_tensor(shape, {"n": 2, "m": 4})
    assert found is None if problem is None else problem in str(found)


def test_compute_mask_refuses_a_tensor_that_does_not_fit() -> None:
    with pytest.raises(ValueError, match="not a multiple of m=4"):
        NMPruning(n=2, m=4).compute_mask(torch.ones(3, 6), torch.ones(3, 6))


def test_a_spec_prunes_2_4_and_a_misfit_is_a_plan_error_naming_the_tensor() -> None:
    methods = prunespec.load_methods(allow=["nm"])
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 6), nn.Linear(6, 5))
    spec = {"version": 1, "rules": [{"select": {"types": ["Linear"]}, "method": "nm", "options": {"n": 2, "m": 4}}]}
    with pytest.raises(prunespec.PlanError, match=r"tensor 3\.weight: nm: .*size 6, which is not a multiple of m=4"):
        prunespec.plan(model, spec, methods=methods)
    spec["rules"][0]["select"]["exclude"] = ["3"]
    prunespec.apply(model, spec, methods=methods)
    for layer in (model[0], model[2]):
        assert torch.equal(
            layer.weight_mask.reshape(layer.out_features, -1, 4).sum(-1),
            torch.full((layer.out_features, layer.in_features // 4), 2.0),
        )
        assert isinstance(next(iter(layer._forward_pre_hooks.values())), NMPruning)


def test_a_pruned_model_pickles_with_its_hooks() -> None:
    methods = prunespec.load_methods(allow=["nm"])
    model = nn.Sequential(nn.Linear(8, 4))
    spec = {"version": 1, "rules": [{"select": {"names": ["0"]}, "method": "nm", "options": {"n": 1, "m": 4}}]}
    prunespec.apply(model, spec, methods=methods)
    assert copy.deepcopy(model)[0].weight_mask.sum() == 8  # 1 of every 4 of 4x8
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    x = torch.randn(3, 8)
    assert torch.equal(loaded(x), model(x))
    assert torch.equal(loaded[0].weight_mask, model[0].weight_mask)
