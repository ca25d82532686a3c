"""Models and plans that do not fit: refused with one PrunespecError, the model left as it was."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from conftest import ModelState
from torch import nn
from torch.nn.utils import prune

import prunespec
from prunespec.methods.base import MethodInfo

L1 = {"version": 1, "rules": [{"select": {"types": ["Linear"]}, "method": "l1_unstructured", "amount": 0.5}]}
GLOBAL = {
    "version": 1,
    "rules": [{"select": {"types": ["Linear"]}, "method": "l1_unstructured", "amount": 0.5, "scope": "global"}],
}


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


# --- a plan is for the model, and the weights, it was made from --------------------------------------


def test_a_plan_for_one_model_is_refused_on_another() -> None:
    a, b = mlp(), mlp()
    plan = prunespec.plan(a, L1)
    before = ModelState(b)
    with pytest.raises(prunespec.PlanError, match=r"0\.weight: not the tensor the plan was made for"):
        prunespec.apply(b, plan)
    before.assert_unchanged(b)
    prunespec.apply(a, plan)  # the model it was made for takes it
    assert prune.is_pruned(a)


@pytest.mark.parametrize("spec", [L1, GLOBAL], ids=["local", "global"])
def test_a_plan_is_refused_after_the_weights_changed(spec: dict[str, object]) -> None:
    model = mlp()
    plan = prunespec.plan(model, spec)
    with torch.no_grad():
        model[2].weight.mul_(-1)  # as an optimizer step would, in place
    before = ModelState(model)
    with pytest.raises(prunespec.PlanError, match=r"2\.weight: its values or mask changed since the plan was made"):
        prunespec.apply(model, plan)
    before.assert_unchanged(model)


def test_a_plan_is_refused_after_the_model_was_pruned_meanwhile() -> None:
    model = mlp()
    plan = prunespec.plan(model, L1)
    prune.l1_unstructured(model[0], "weight", amount=0.2)
    with pytest.raises(prunespec.PlanError, match=r"0\.weight"):
        prunespec.apply(model, plan)


# --- tensors pruning cannot take ---------------------------------------------------------------------


@pytest.mark.parametrize("taken", ["weight_orig", "weight_mask"])
def test_a_users_own_orig_or_mask_is_never_replaced(taken: str) -> None:
    model = mlp()
    if taken == "weight_orig":
        model[0].register_parameter("weight_orig", nn.Parameter(torch.zeros(3)))
    else:
        model[0].register_buffer("weight_mask", torch.zeros(3))
    before = ModelState(model)
    with pytest.raises(prunespec.PlanError, match=rf"0\.weight: the module already has '{taken}'"):
        prunespec.apply(model, L1)
    before.assert_unchanged(model)


def test_a_meta_device_model_is_refused_up_front() -> None:
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(6, 8))
    with pytest.raises(prunespec.PlanError, match="meta device"):
        prunespec.apply(model, L1)
    assert not prune.is_pruned(model)


def test_sparse_and_integer_parameters_are_refused_by_name() -> None:
    model = mlp()
    model[0].weight = nn.Parameter(model[0].weight.detach().to_sparse(), requires_grad=False)
    model[2].weight = nn.Parameter(torch.ones(3, 8, dtype=torch.int8), requires_grad=False)
    with pytest.raises(prunespec.PlanError) as info:
        prunespec.plan(model, L1)
    text = str(info.value)
    assert "0.weight is a torch.sparse_coo tensor" in text and "2.weight has dtype torch.int8" in text


def test_a_method_failing_inside_selection_is_an_apply_error() -> None:
    class Broken(prunespec.PruningMethod):
        name = "broken"

        def importance(self, t: torch.Tensor) -> torch.Tensor:
            raise RuntimeError("no scores today")

    methods = prunespec.load_methods(builtins_only=True)
    methods.add(MethodInfo.from_class(Broken))
    model = mlp()
    before = ModelState(model)
    spec = {"version": 1, "rules": [{"select": {"types": ["Linear"]}, "method": "broken", "amount": 0.5}]}
    with pytest.raises(prunespec.ApplyError, match="no scores today"):
        prunespec.apply(model, spec, methods=methods)
    before.assert_unchanged(model)


# --- seeded random methods -------------------------------------------------------------------------------


def test_seeded_random_pruning_is_the_same_in_threads_and_leaves_the_callers_rng_alone() -> None:
    spec = {
        "version": 1,
        "seed": 7,
        "rules": [{"select": {"types": ["Linear"]}, "method": "random_unstructured", "amount": 0.5}],
    }
    reference = mlp()
    prunespec.apply(reference, spec)
    expected = [reference[0].weight_mask, reference[2].weight_mask]
    models = [mlp() for _ in range(8)]
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    threads = [threading.Thread(target=prunespec.apply, args=(m, copy.deepcopy(spec))) for m in models]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert torch.equal(torch.random.get_rng_state(), state)
    for m in models:
        assert torch.equal(m[0].weight_mask, expected[0]) and torch.equal(m[2].weight_mask, expected[1])


def test_an_interrupted_finalize_leaves_every_module_pruned_as_before() -> None:
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(6)])
    prunespec.apply(model, L1)
    before = ModelState(model)
    calls = {"n": 0}
    original = prune.remove

    def interrupted(module: nn.Module, name: str) -> nn.Module:
        calls["n"] += 1
        if calls["n"] == 4:  # half-way through
            raise KeyboardInterrupt
        return original(module, name)

    prune.remove = interrupted  # type: ignore[assignment]
    try:
        with pytest.raises(KeyboardInterrupt):
            prunespec.finalize(model)
    finally:
        prune.remove = original
    before.assert_unchanged(model)
    assert all(isinstance(m.weight, torch.Tensor) and hasattr(m, "weight_mask") for m in model)
    assert len(prunespec.finalize(model)) == 6  # and it still finalizes afterwards


def test_seeded_builtins_draw_from_their_own_generator_not_torchs() -> None:
    """Another thread drawing from torch's RNG all the while neither changes the masks nor is changed."""
    spec = {
        "version": 1,
        "seed": 11,
        "rules": [
            {"select": {"types": ["Linear"]}, "method": "random_unstructured", "amount": 0.3},
            {"select": {"types": ["Linear"]}, "method": "random_structured", "amount": 2, "options": {"dim": 0}},
        ],
    }
    reference = mlp()
    torch.manual_seed(11)  # torch's own calls under torch's seed give the same masks
    for m in (reference[0], reference[2]):
        prune.random_unstructured(m, "weight", amount=0.3)
    for m in (reference[0], reference[2]):
        prune.random_structured(m, "weight", amount=2, dim=0)

    models = [mlp() for _ in range(3)]  # (mlp seeds torch: built before the other thread draws)
    stop = threading.Event()
    torch.manual_seed(5)
    expected_draws = [torch.rand(1).item() for _ in range(2000)]
    torch.manual_seed(5)
    draws: list[float] = []

    def draw() -> None:
        while not stop.is_set() and len(draws) < 2000:
            draws.append(torch.rand(1).item())

    drawer = threading.Thread(target=draw)
    drawer.start()
    for m in models:
        prunespec.apply(m, spec)
    stop.set()
    drawer.join(10)
    for m in models:
        assert torch.equal(m[0].weight_mask, reference[0].weight_mask)
        assert torch.equal(m[2].weight_mask, reference[2].weight_mask)
    assert draws == expected_draws[: len(draws)]  # the other thread's sequence went on undisturbed
