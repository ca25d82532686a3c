"""``apply`` is all or nothing: when any step fails, the model is left exactly as it was.

Misbehaving methods are registered into a registry of their own; in each spec an earlier rule prunes fine
and a later one fails, so a partial apply would show on the earlier rule's tensors.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from conftest import ModelState
from torch import nn
from torch.nn.utils import prune

import prunespec
from prunespec.methods.base import MethodInfo


class Raises(prunespec.PruningMethod):
    name = "raises"
    PRUNING_TYPE = "unstructured"

    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")


class WrongShape(prunespec.PruningMethod):
    name = "wrong_shape"
    PRUNING_TYPE = "unstructured"

    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        return torch.ones(3)


class WrongDtype(prunespec.PruningMethod):
    name = "wrong_dtype"
    PRUNING_TYPE = "unstructured"

    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(t, dtype=torch.int64)


class NonBinary(prunespec.PruningMethod):
    name = "non_binary"
    PRUNING_TYPE = "unstructured"

    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        return torch.full_like(default_mask, 0.5)


class NotATensor(prunespec.PruningMethod):
    name = "not_a_tensor"
    PRUNING_TYPE = "unstructured"

    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> Any:
        return default_mask.tolist()


class Unprunes(prunespec.PruningMethod):
    """Sees the whole tensor (``global``, as torch's containers treat it) and brings every entry back."""

    name = "unprunes"
    PRUNING_TYPE = "global"

    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(default_mask)


class CannotBeBuilt(prunespec.PruningMethod):
    name = "cannot_be_built"
    PRUNING_TYPE = "unstructured"

    def __init__(self, amount: float | int | None = None) -> None:
        raise ValueError("no such thing")

    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        raise AssertionError("never called")


class MutatesThenRaises(prunespec.PruningMethod):
    name = "mutates_then_raises"
    PRUNING_TYPE = "unstructured"

    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        t.mul_(0)
        raise RuntimeError("after zeroing the scores in place")


class KeepAllBool(prunespec.PruningMethod):
    """Fine: keeps what is left, as a torch.bool mask (accepted and converted)."""

    name = "keep_all_bool"
    PRUNING_TYPE = "unstructured"

    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        return default_mask != 0


BAD = (Raises, WrongShape, WrongDtype, NonBinary, NotATensor, Unprunes, CannotBeBuilt, MutatesThenRaises, KeepAllBool)


@pytest.fixture(scope="module")
def reg() -> prunespec.MethodRegistry:
    registry = prunespec.load_methods(builtins_only=True)
    for cls in BAD:
        registry.add(MethodInfo.from_class(cls, name=cls.name))
    return registry


def two_rules(method: str, target: str = "fc1", **extra: Any) -> dict[str, Any]:
    """Rule 0 prunes every Conv2d weight fine; rule 1 (`bad`) runs ``method`` on ``target``'s weight."""
    bad: dict[str, Any] = {"name": "bad", "select": {"names": [target]}, "method": method, "amount": 0.3, **extra}
    return {
        "version": 1,
        "rules": [
            {"name": "convs", "select": {"types": ["Conv2d"]}, "method": "l1_unstructured", "amount": 0.5},
            bad,
        ],
    }


def assert_nothing_pruned(model: nn.Module) -> None:
    assert not prune.is_pruned(model)
    for name, module in model.named_modules():
        assert not module._forward_pre_hooks, name
        assert not any(key.endswith(("_orig", "_mask")) for key in module.state_dict()), name
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            assert "weight" in module._parameters and "weight" not in module.__dict__, name


@pytest.mark.parametrize(
    ("method", "message"),
    [
        ("raises", "raises failed: RuntimeError: boom"),
        ("wrong_shape", "the mask has shape [3], expected [120, 400]"),
        ("wrong_dtype", "the mask has dtype torch.int64"),
        ("non_binary", "values other than 0 and 1"),
        ("not_a_tensor", "returned list, not a tensor"),
        ("cannot_be_built", "could not be created: ValueError: no such thing"),
    ],
)
def test_failing_method_leaves_model_unchanged(
    method: str, message: str, lenet: nn.Module, reg: prunespec.MethodRegistry
) -> None:
    x = torch.randn(2, 1, 28, 28)
    out = lenet(x)
    before = ModelState(lenet)
    with pytest.raises(prunespec.ApplyError) as info:
        prunespec.apply(lenet, two_rules(method), methods=reg)
    exc = info.value
    assert exc.rule == "rules[1] (bad)"
    assert exc.tensor == "fc1.weight"
    assert str(exc).startswith("rules[1] (bad), tensor fc1.weight: ")
    assert message in str(exc)
    assert "left unchanged" in str(exc)
    before.assert_unchanged(lenet)
    assert_nothing_pruned(lenet)
    assert torch.equal(lenet(x), out)


def test_failing_method_on_a_tensor_an_earlier_rule_pruned(lenet: nn.Module, reg: prunespec.MethodRegistry) -> None:
    """The second rule re-prunes conv2 (through torch's PruningContainer) and fails there."""
    before = ModelState(lenet)
    with pytest.raises(prunespec.ApplyError) as info:
        prunespec.apply(lenet, two_rules("raises", target="conv2"), methods=reg)
    assert (info.value.rule, info.value.tensor) == ("rules[1] (bad)", "conv2.weight")
    before.assert_unchanged(lenet)
    assert_nothing_pruned(lenet)


def test_a_bool_mask_is_accepted(lenet: nn.Module, reg: prunespec.MethodRegistry) -> None:
    """The checks are not over-eager: a well-behaved method returning a bool mask passes."""
    report = prunespec.apply(lenet, two_rules("keep_all_bool"), methods=reg)
    assert set(report.tensors) == {"conv1.weight", "conv2.weight", "fc1.weight"}
    assert lenet.fc1.weight_mask.dtype == torch.float32
    assert bool((lenet.fc1.weight_mask == 1).all())
    assert prune.is_pruned(lenet)


def test_failing_global_rule_leaves_model_unchanged(lenet: nn.Module, reg: prunespec.MethodRegistry) -> None:
    spec = two_rules("non_binary", scope="global")
    spec["rules"][1]["select"] = {"types": ["Linear"]}
    before = ModelState(lenet)
    with pytest.raises(prunespec.ApplyError) as info:
        prunespec.apply(lenet, spec, methods=reg)
    assert info.value.rule == "rules[1] (bad)"
    assert info.value.tensor == "fc1.weight"  # the first tensor whose piece of the global mask is bad
    assert "values other than 0 and 1" in str(info.value)
    before.assert_unchanged(lenet)
    assert_nothing_pruned(lenet)


def test_method_that_unprunes_earlier_zeros(lenet: nn.Module, reg: prunespec.MethodRegistry) -> None:
    before = ModelState(lenet)
    with pytest.raises(prunespec.ApplyError) as info:
        prunespec.apply(lenet, two_rules("unprunes", target="conv2"), methods=reg)
    assert (info.value.rule, info.value.tensor) == ("rules[1] (bad)", "conv2.weight")
    assert "un-prunes" in str(info.value)
    before.assert_unchanged(lenet)


def test_method_that_mutates_scores_then_raises(lenet: nn.Module, reg: prunespec.MethodRegistry) -> None:
    before = ModelState(lenet)
    with pytest.raises(prunespec.ApplyError):
        prunespec.apply(lenet, two_rules("mutates_then_raises"), methods=reg)
    before.assert_unchanged(lenet)


def test_failed_install_is_rolled_back(lenet: nn.Module, reg: prunespec.MethodRegistry) -> None:
    """Masks are computed fine, but installing fc1's fails (a plain attribute blocks its `weight_mask`
    buffer) after conv1 and conv2 were installed: all three are rolled back."""
    lenet.fc1.weight_mask = "in the way"
    before = ModelState(lenet)
    with pytest.raises(prunespec.ApplyError) as info:
        prunespec.apply(lenet, two_rules("l1_unstructured"), methods=reg)
    assert info.value.tensor == "fc1.weight"
    assert "weight_mask" in str(info.value)
    before.assert_unchanged(lenet)
    assert not prune.is_pruned(lenet)
    assert lenet.fc1.weight_mask == "in the way"


def test_failed_install_names_the_rule(lenet: nn.Module, reg: prunespec.MethodRegistry) -> None:
    lenet.fc1.weight_mask = "in the way"
    with pytest.raises(prunespec.ApplyError) as info:
        prunespec.apply(lenet, two_rules("l1_unstructured"), methods=reg)
    assert info.value.rule == "rules[1] (bad)"


def test_plan_errors_also_leave_model_unchanged(lenet: nn.Module, reg: prunespec.MethodRegistry) -> None:
    spec = two_rules("l1_unstructured")
    spec["rules"][1]["amount"] = 100_000
    before = ModelState(lenet)
    with pytest.raises(prunespec.PlanError):
        prunespec.apply(lenet, spec, methods=reg)
    before.assert_unchanged(lenet)


def test_model_state_catches_changes(lenet: nn.Module, reg: prunespec.MethodRegistry) -> None:
    """The helper the tests above rely on does fail when the model changed."""
    before = ModelState(lenet)
    prunespec.apply(lenet, two_rules("l1_unstructured"), methods=reg)
    with pytest.raises(AssertionError):
        before.assert_unchanged(lenet)


# --- re-pruning a pruned model ----------------------------------------------------------------------


def _rule(names: list[str], method: str, amount: float, **extra: Any) -> dict[str, Any]:
    return {"select": {"names": names}, "method": method, "amount": amount, **extra}


@pytest.mark.parametrize("failing_target", ["conv1", "fc1"])
def test_failed_reprune_keeps_the_first_pruning(
    failing_target: str, lenet: nn.Module, reg: prunespec.MethodRegistry
) -> None:
    """torch's own re-prune drops the old hook when the new method fails (its container is removed from
    ``_forward_pre_hooks`` before the mask is computed); prunespec must keep it."""
    prunespec.apply(lenet, {"version": 1, "rules": [_rule(["conv1", "fc1"], "l1_unstructured", 0.3)]}, methods=reg)
    assert prune.is_pruned(lenet)
    x = torch.randn(2, 1, 28, 28)
    out = lenet(x)
    pruned_weight = lenet.conv1.weight.detach().clone()
    hooks = {name: list(m._forward_pre_hooks.items()) for name, m in lenet.named_modules()}
    before = ModelState(lenet)

    second = {
        "version": 1,
        "rules": [
            _rule(["conv1"], "l1_unstructured", 0.5, name="more"),
            _rule([failing_target], "raises", 0.2, name="broken"),
        ],
    }
    with pytest.raises(prunespec.ApplyError) as info:
        prunespec.apply(lenet, second, methods=reg)
    assert (info.value.rule, info.value.tensor) == ("rules[1] (broken)", f"{failing_target}.weight")

    before.assert_unchanged(lenet)
    assert prune.is_pruned(lenet)
    assert {name: list(m._forward_pre_hooks.items()) for name, m in lenet.named_modules()} == hooks
    assert isinstance(next(iter(lenet.conv1._forward_pre_hooks.values())), prune.L1Unstructured)
    assert torch.equal(lenet(x), out)
    assert torch.equal(lenet.conv1.weight, lenet.conv1.weight_orig * lenet.conv1.weight_mask)
    assert int((lenet.conv1.weight_mask == 0).sum()) == round(0.3 * 54)
    # The hook still works: new weights are masked on the next forward ...
    with torch.no_grad():
        lenet.conv1.weight_orig.add_(1.0)
    lenet(x)
    assert torch.equal(lenet.conv1.weight, lenet.conv1.weight_orig * lenet.conv1.weight_mask)
    with torch.no_grad():
        lenet.conv1.weight_orig.sub_(1.0)
    # ... and prune.remove makes the first pruning permanent.
    prune.remove(lenet.conv1, "weight")
    prune.remove(lenet.fc1, "weight")
    assert not prune.is_pruned(lenet)
    assert torch.allclose(lenet.conv1.weight, pruned_weight)
    assert int((lenet.conv1.weight == 0).sum()) == round(0.3 * 54)


def test_reprune_of_torch_pruned_model_composes_like_torch(lenet: nn.Module, reg: prunespec.MethodRegistry) -> None:
    """A model pruned by torch directly, then by prunespec, equals the same torch calls in sequence."""
    direct = copy.deepcopy(lenet)
    x = torch.randn(2, 1, 28, 28)
    for model in (lenet, direct):
        torch.manual_seed(1)
        prune.random_unstructured(model.conv1, name="weight", amount=0.3)
        prune.l1_unstructured(model.fc1, name="weight", amount=0.2)
    hook_keys = list(lenet.conv1._forward_pre_hooks)

    spec = {
        "version": 1,
        "rules": [
            _rule(["conv1"], "l1_unstructured", 0.5),
            _rule(["conv1"], "ln_structured", 0.5, options={"n": 2, "dim": 0}),
            _rule(["fc1"], "l1_unstructured", 10),
        ],
    }
    prunespec.apply(lenet, spec, methods=reg)
    prune.l1_unstructured(direct.conv1, name="weight", amount=0.5)
    prune.ln_structured(direct.conv1, name="weight", amount=0.5, n=2, dim=0)
    prune.l1_unstructured(direct.fc1, name="weight", amount=10)

    ours, theirs = lenet.state_dict(), direct.state_dict()
    assert list(ours) == list(theirs)
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key
    for name in ("conv1", "fc1"):
        mine = list(getattr(lenet, name)._forward_pre_hooks.values())
        torchs = list(getattr(direct, name)._forward_pre_hooks.values())
        assert len(mine) == len(torchs) == 1
        assert isinstance(mine[0], prune.PruningContainer)
        assert [type(m) for m in mine[0]] == [type(m) for m in torchs[0]]
        assert [getattr(m, "amount", None) for m in mine[0]] == [getattr(m, "amount", None) for m in torchs[0]]
    assert [type(m) for m in lenet.conv1._forward_pre_hooks[hook_keys[0]]] == [
        prune.RandomUnstructured,
        prune.L1Unstructured,
        prune.LnStructured,
    ]
    assert list(lenet.conv1._forward_pre_hooks) == hook_keys  # re-pruned in place (pytorch#37138)
    assert torch.equal(lenet(x), direct(x))
    assert torch.equal(lenet.conv1.weight, direct.conv1.weight)
    # both finalize to the same weights
    for model in (lenet, direct):
        prune.remove(model.conv1, "weight")
        prune.remove(model.fc1, "weight")
    assert torch.equal(lenet.conv1.weight, direct.conv1.weight)
    assert torch.equal(lenet.fc1.weight, direct.fc1.weight)
