"""The plan: what it predicts, what it reports, and that it never changes the model."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import state_of
from torch import nn
from torch.nn.utils import prune

import prunespec


def rule(**kwargs: object) -> dict[str, object]:
    return {"version": 1, "rules": [kwargs]}


def test_plan_does_not_touch_the_model(lenet: nn.Module, methods: prunespec.MethodRegistry) -> None:
    before = state_of(lenet)
    hooks = [len(m._forward_pre_hooks) for m in lenet.modules()]
    spec = rule(select={"types": ["Conv2d", "Linear"]}, scope="global", method="l1_unstructured", amount=0.5)
    plan = prunespec.plan(lenet, spec, methods=methods)
    assert len(plan.steps) == 5
    assert state_of(lenet).keys() == before.keys()
    assert all(torch.equal(state_of(lenet)[k], v) for k, v in before.items())
    assert [len(m._forward_pre_hooks) for m in lenet.modules()] == hooks


def test_predictions_match_apply_for_local_rules(lenet: nn.Module, methods: prunespec.MethodRegistry) -> None:
    spec = {
        "version": 1,
        "rules": [
            {"select": {"types": ["Linear"]}, "method": "l1_unstructured", "amount": 0.3},
            {"select": {"types": ["Linear"]}, "method": "l1_unstructured", "amount": 0.5},
            {"select": {"names": ["fc1"]}, "method": "l1_unstructured", "sparsity": 0.9},
            {"select": {"types": ["Conv2d"]}, "method": "ln_structured", "amount": 2, "options": {"n": 1, "dim": 0}},
        ],
    }
    plan = prunespec.plan(lenet, spec, methods=methods)
    report = prunespec.apply(lenet, plan)
    for name, stats in report.entries.items():
        _, predicted, exact = plan.tensors[name]
        assert exact, name
        assert predicted == pytest.approx(stats.sparsity), name
    # 0.3 then 0.5 of what is left compounds; the sparsity target then lifts fc1 to exactly 90%
    assert report.tensors["fc2.weight"] == pytest.approx((3024 + round(0.5 * (10080 - 3024))) / 10080)
    assert report.tensors["fc1.weight"] == pytest.approx(0.9)
    assert report.tensors["conv1.weight"] == pytest.approx(2 / 6)


def test_global_prediction_is_exact_in_total(lenet: nn.Module, methods: prunespec.MethodRegistry) -> None:
    spec = rule(select={"types": ["Conv2d", "Linear"]}, scope="global", method="l1_unstructured", amount=0.2)
    plan = prunespec.plan(lenet, spec, methods=methods)
    report = prunespec.apply(lenet, plan)
    assert plan.global_sparsity == pytest.approx(report.global_sparsity)
    assert {step.scope for step in plan.steps} == {"global"}
    # the plan reads the weights, so it knows each tensor's share of the budget before apply
    for name, stats in report.entries.items():
        _, predicted, exact = plan.tensors[name]
        assert exact and predicted == pytest.approx(stats.sparsity), name
    assert len({round(s, 3) for s in report.tensors.values()}) > 1  # shares differ between layers


def test_global_budget_with_per_tensor_caps(lenet: nn.Module, methods: prunespec.MethodRegistry) -> None:
    spec = rule(
        select={"types": ["Conv2d", "Linear"]},
        scope="global",
        method="l1_unstructured",
        amount=0.5,
        max_sparsity=0.55,
        min_sparsity=0.3,
    )
    plan = prunespec.plan(lenet, spec, methods=methods)
    report = prunespec.apply(lenet, plan)
    total = sum(s.numel for s in report.entries.values())
    assert sum(s.zeros for s in report.entries.values()) == round(0.5 * total)  # the budget still holds
    for name, stats in report.entries.items():
        assert stats.zeros <= int(0.55 * stats.numel), name
        assert stats.zeros >= -(-3 * stats.numel // 10), name
        assert plan.tensors[name][1] == pytest.approx(stats.sparsity), name
    # without caps, fc1 (the largest layer, with the smallest weights) takes more than 55%
    free = prunespec.plan(
        lenet,
        rule(select={"types": ["Conv2d", "Linear"]}, scope="global", method="l1_unstructured", amount=0.5),
        methods=methods,
    )
    assert free.tensors["fc1.weight"][1] > 0.55


def test_infeasible_caps_are_a_plan_error(lenet: nn.Module, methods: prunespec.MethodRegistry) -> None:
    spec = rule(select={"types": ["Linear"]}, scope="global", method="l1_unstructured", amount=0.5, max_sparsity=0.4)
    with pytest.raises(prunespec.PlanError, match="max_sparsity allows at most"):
        prunespec.plan(lenet, spec, methods=methods)
    with pytest.raises(prunespec.SpecError, match="scope: global"):
        prunespec.load_spec(rule(select={"types": ["Linear"]}, method="l1_unstructured", amount=0.5, max_sparsity=0.4))


def test_sparsity_target_below_current_prunes_nothing(lenet: nn.Module, methods: prunespec.MethodRegistry) -> None:
    prune.l1_unstructured(lenet.fc3, "weight", amount=0.5)
    mask_before = lenet.fc3.weight_mask.clone()
    plan = prunespec.plan(
        lenet, rule(select={"names": ["fc3"]}, method="l1_unstructured", sparsity=0.2), methods=methods
    )
    assert plan.steps[0].before == pytest.approx(0.5)
    assert plan.steps[0].after == pytest.approx(0.5)
    prunespec.apply(lenet, plan)
    assert torch.equal(lenet.fc3.weight_mask, mask_before)


def test_plan_reads_masks_left_by_torch(lenet: nn.Module, methods: prunespec.MethodRegistry) -> None:
    prune.ln_structured(lenet.fc1, "weight", amount=30, n=2, dim=0)
    spec = rule(select={"names": ["fc1"]}, method="ln_structured", amount=0.5, options={"n": 2, "dim": 0})
    plan = prunespec.plan(lenet, spec, methods=methods)
    # 30 of 120 rows gone; half of the 90 left is 45 more: 75 rows
    assert plan.steps[0].after == pytest.approx(75 / 120)
    assert plan.steps[0].exact
    report = prunespec.apply(lenet, plan)
    assert report.tensors["fc1.weight"] == pytest.approx(75 / 120)


def test_plan_table_and_dict(lenet: nn.Module, methods: prunespec.MethodRegistry) -> None:
    spec = rule(name="linears", select={"types": ["Linear"], "exclude": ["fc9"]}, method="l1_unstructured", amount=1)
    plan = prunespec.plan(lenet, spec, methods=methods)
    text = str(plan)
    assert "rules[0] (linears)" in text and "fc2.weight" in text and "types: Linear" in text
    assert any("fc9" in w and "matches no module" in w for w in plan.warnings)
    assert any("amount: 1" in w for w in plan.warnings)
    data = json.loads(json.dumps(plan.to_dict()))
    assert [s["tensor"] for s in data["steps"]] == ["fc1.weight", "fc2.weight", "fc3.weight"]
    assert data["steps"][0]["selected_by"] == "types: Linear"


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(x))


def test_tied_parameter_is_pruned_once_with_one_mask(methods: prunespec.MethodRegistry) -> None:
    torch.manual_seed(0)
    model = Tied()
    spec = rule(select={"names": ["emb", "head"]}, method="l1_unstructured", amount=0.5)
    plan = prunespec.plan(model, spec, methods=methods)
    assert len(plan.steps) == 1
    assert plan.steps[0].tensor.aliases == (("head", "weight"),)
    assert "tied" in str(plan) and any("tied" in w for w in plan.warnings)
    report = prunespec.apply(model, plan)
    assert report.tensors == {"emb.weight": 0.5}
    assert model.head.weight_mask is model.emb.weight_mask
    assert model.head.weight_orig is model.emb.weight_orig
    model(torch.tensor([1, 2]))
    assert torch.equal(model.head.weight, model.emb.weight)
    assert int((model.head.weight == 0).sum()) == 20


def test_a_global_channel_budget_prunes_the_lowest_norm_channels_across_tensors() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 7))
    spec = {
        "version": 1,
        "rules": [
            {
                "select": {"types": ["Linear"]},
                "method": "ln_structured",
                "scope": "global",
                "sparsity": 0.5,
                "options": {"n": 2, "dim": 0},
            }
        ],
    }
    prunespec.apply(model, spec)
    norms = [
        (float(row.detach().norm()), i, r)
        for i, m in enumerate([model[0], model[2]])
        for r, row in enumerate(m.weight_orig)
    ]
    lowest = {(i, r) for _, i, r in sorted(norms)[: round(0.5 * len(norms))]}  # 17 rows in all: 8 go
    pruned = {
        (i, r) for i, m in enumerate([model[0], model[2]]) for r in range(m.out_features) if not m.weight_mask[r].any()
    }
    assert pruned == lowest and len(pruned) == 8
    for m in (model[0], model[2]):  # whole rows only
        assert all(bool(row.all()) or not bool(row.any()) for row in m.weight_mask)


def test_frobenius_channel_norms_of_a_conv_weight_are_a_plan_error_not_a_raw_one() -> None:
    spec = {
        "version": 1,
        "rules": [
            {
                "select": {"types": ["Conv2d"]},
                "method": "ln_structured",
                "amount": 0.5,
                "options": {"n": "fro", "dim": 0},
            }
        ],
    }
    with pytest.raises(prunespec.PlanError, match=r"n='fro' reduces over at most 2 dims.*use n: 2"):
        prunespec.plan(nn.Sequential(nn.Conv2d(2, 4, 3)), spec)
