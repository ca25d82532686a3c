"""Sparsity reports mean one thing: every parameter is listed, the pruned tensors and all parameters are
two labelled totals, and finalizing changes no number. Also: plans and reports are printed by
``prunespec.render`` alone."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import torch
from conftest import ROOT
from torch import nn
from torch.nn.utils import prune

import prunespec
from prunespec.methods.base import MethodInfo
from prunespec.render import shorten

PACKAGE = ROOT / "prunespec"


def rule(names: list[str], amount: float, params: list[str] | None = None) -> dict[str, Any]:
    select: dict[str, Any] = {"names": names}
    if params:
        select["params"] = params
    return {"select": select, "method": "l1_unstructured", "amount": amount}


def numbers(report: prunespec.Report) -> tuple[dict[str, float], float, float, dict[str, float]]:
    return report.tensors, report.global_sparsity, report.model_sparsity, report.parameters


def test_all_weights_pruned_reads_the_same_before_and_after_finalize(
    lenet: nn.Module, methods: prunespec.MethodRegistry
) -> None:
    weights = ["conv1", "conv2", "fc1", "fc2", "fc3"]
    prunespec.apply(lenet, {"version": 1, "rules": [rule(weights, 1.0)]}, methods=methods)
    before = prunespec.sparsity(lenet)
    assert set(before.tensors) == {f"{n}.weight" for n in weights}
    assert before.global_sparsity == 1.0
    n_weights = sum(m.weight.numel() for m in lenet.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    n_params = sum(p.numel() for p in lenet.parameters())
    assert before.model_sparsity == n_weights / n_params  # biases are in the denominator, never pruned
    prunespec.finalize(lenet)
    after = prunespec.sparsity(lenet)
    assert numbers(after) == numbers(before)
    assert [s.masked for s in after.entries.values()] == [False] * 5
    text = str(after)
    assert "(dense)" not in text
    assert re.search(r"^conv1\.weight\s.*\s100\.00%\s+zeros$", text, re.MULTILINE), text


def test_one_pruned_layer_shows_both_denominators(lenet: nn.Module, methods: prunespec.MethodRegistry) -> None:
    report = prunespec.apply(lenet, {"version": 1, "rules": [rule(["fc1"], 0.5)]}, methods=methods)
    n_params = sum(p.numel() for p in lenet.parameters())
    fc1 = lenet.fc1.weight.numel()
    for r in (report, prunespec.sparsity(lenet)):
        assert r.tensors == {"fc1.weight": 0.5}
        assert r.global_sparsity == 0.5
        assert r.model_sparsity == (fc1 // 2) / n_params
        assert set(r.parameters) == {name for name, _ in lenet.named_parameters()} - {"fc1.weight_orig"} | {
            "fc1.weight"
        }
        totals = r.to_dict()["totals"]
        assert totals["pruned"] == {"tensors": 1, "numel": fc1, "zeros": fc1 // 2, "sparsity": 0.5}
        assert totals["all_parameters"]["numel"] == n_params and totals["all_parameters"]["tensors"] == 10
    text = str(report)
    for name in ("conv1.weight", "conv1.bias", "fc3.bias"):  # every parameter is listed
        assert re.search(rf"^{re.escape(name)}\s", text, re.MULTILINE), name
    assert re.search(r"^total: pruned \(1 tensor\)\s.*\s50\.00%", text, re.MULTILINE), text
    share = f"{100 * (fc1 // 2) / n_params:.2f}%"
    assert re.search(rf"^total: all parameters \(10 tensors\)\s.*\s{re.escape(share)}", text, re.MULTILINE), text
    assert text.splitlines()[0].split()[-1] == "predicted"  # apply's report keeps the plan's prediction
    assert re.search(r"^fc1\.weight\s.*\s50\.00%\s+mask\s+50\.00%$", text, re.MULTILINE), text


def test_a_tied_parameter_is_one_row(methods: prunespec.MethodRegistry) -> None:
    first, second = nn.Linear(4, 4), nn.Linear(4, 4)
    second.weight = first.weight
    model = nn.Sequential(first, second)
    report = prunespec.apply(model, {"version": 1, "rules": [rule(["1"], 0.5)]}, methods=methods)
    assert set(report.tensors) == {"1.weight"}
    assert set(report.others) == {"0.bias", "1.bias"}  # 0.weight is the same tensor as 1.weight
    assert set(prunespec.sparsity(model).parameters) == {"0.weight", "0.bias", "1.bias"}


def test_a_dense_model_has_no_pruned_tensor_and_lists_every_parameter() -> None:
    model = nn.Linear(3, 2)
    report = prunespec.sparsity(model)
    assert report.entries == {} and set(report.others) == {"weight", "bias"}
    assert report.global_sparsity == report.model_sparsity == 0.0
    assert "total: pruned (0 tensors)" in str(report)


def test_a_torch_pruned_model_reads_like_a_prunespec_one(lenet: nn.Module) -> None:
    prune.l1_unstructured(lenet.fc2, "weight", amount=0.25)
    report = prunespec.sparsity(lenet)
    assert report.tensors == {"fc2.weight": round(0.25 * 10080) / 10080}
    assert "fc2.weight_orig" not in report.parameters and len(report.parameters) == 10


# --- rendering ------------------------------------------------------------------------------------


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(module, imported only under TYPE_CHECKING) for each `from . import` in a file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    guarded = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and ast.unparse(block.test) == "TYPE_CHECKING"
        for child in block.body
        for node in ast.walk(child)
    }
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names = [node.module] if node.module else [alias.name for alias in node.names]
            found += [(name, id(node) in guarded) for name in names if name]
    return found


def test_rendering_has_one_home_and_no_import_cycle() -> None:
    assert ("report", False) not in _imports(PACKAGE / "planner.py")
    assert ("planner", False) not in _imports(PACKAGE / "report.py")
    assert all(guarded for name, guarded in _imports(PACKAGE / "render.py") if name in ("planner", "report"))
    assert not hasattr(prunespec.report, "table") and not hasattr(prunespec.report, "format_plan")


def test_plan_header_uses_singular_for_one(lenet: nn.Module, methods: prunespec.MethodRegistry) -> None:
    one = prunespec.plan(lenet, {"version": 1, "rules": [rule(["fc1"], 0.5)]}, methods=methods)
    assert str(one).splitlines()[0] == "Plan: 1 rule, 1 step on 1 tensor"
    two = prunespec.plan(lenet, {"version": 1, "rules": [rule(["fc1", "fc2"], 0.5)] * 2}, methods=methods)
    assert str(two).splitlines()[0] == "Plan: 2 rules, 4 steps on 2 tensors"


class Tagged(prune.BasePruningMethod):
    """Keeps everything; takes a free-text tag."""

    PRUNING_TYPE = "unstructured"

    def __init__(self, tag: str = "") -> None:
        self.tag = tag

    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        return default_mask.clone()


def test_long_option_values_are_shortened_in_the_plan(lenet: nn.Module) -> None:
    registry = prunespec.load_methods(builtins_only=True)
    registry.add(MethodInfo.from_class(Tagged, name="tagged"))
    tag = "a-rather-long-tag-" * 5
    spec = {"version": 1, "rules": [{"select": {"names": ["fc1"]}, "method": "tagged", "options": {"tag": tag}}]}
    text = str(prunespec.plan(lenet, spec, methods=registry))
    assert tag not in text
    assert f"tagged(tag={tag[:39]}…)" in text
    assert shorten("x" * 40) == "x" * 40 and shorten("x" * 41) == "x" * 39 + "…"
