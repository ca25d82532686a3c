"""The spec's `calibration` block and rules' `owl`: validation located at file:line:column, and what the
plan makes of them (per-block sparsities from allocations, the plan text, Plan.to_dict)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from torch import nn

import prunespec
from prunespec.errors import Issue
from prunespec.planner import make_plan

transformers = pytest.importorskip("transformers")

from tiny_transformers import tiny_llama  # noqa: E402

METHODS = prunespec.load_methods(builtins_only=True)
LAYERS = ["model.layers.0", "model.layers.1"]


def located(text: str, token: str) -> tuple[int, int]:
    at = text.index(token)
    return text.count("\n", 0, at) + 1, at - (text.rfind("\n", 0, at) + 1) + 1


def issues_of(text: str) -> list[Issue]:
    with pytest.raises(prunespec.SpecError) as info:
        prunespec.loads_spec(text, filename="s.yaml", methods=METHODS)
    return info.value.issues


def owl_rule(**changes: Any) -> dict[str, Any]:
    rule: dict[str, Any] = {
        "select": {"types": ["Linear"], "exclude": ["lm_head"]},
        "method": "wanda",
        "sparsity": 0.7,
        "owl": {"m": 5, "lambda": 0.08},
    }
    rule.update(changes)
    return {k: v for k, v in rule.items() if v is not None}


def spec_of(*rules: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {"version": 1, "rules": list(rules), **top}


@pytest.fixture(scope="module")
def llama() -> nn.Module:
    return tiny_llama()


# --- the spec -----------------------------------------------------------------------------------------


def test_a_spec_without_the_block_has_the_defaults() -> None:
    spec = prunespec.load_spec(spec_of(owl_rule()), methods=METHODS)
    c = spec.calibration
    assert (c.sequential, c.blocks, c.samples, c.errors) == (True, None, None, True)
    assert not spec.calibration_given
    given = prunespec.load_spec(spec_of(owl_rule(), calibration={}), methods=METHODS)
    assert given.calibration == c and given.calibration_given
    owl = spec.rules[0].owl
    assert owl is not None and (owl.m, owl.lam) == (5, 0.08)
    assert prunespec.spec.Owl(lam=0.2).lam == 0.2  # Python takes the field name too


YAML = """\
version: 1
calibration:
  sequential: {sequential}
  blocks: {blocks}
  samples: {samples}
  errors: {errors}
rules:
  - select: {{types: [Linear]}}
    method: wanda
    sparsity: 0.5
"""
GOOD = {"sequential": "false", "blocks": "'model.layers.*'", "samples": "8", "errors": "false"}


def test_a_full_block_loads() -> None:
    spec = prunespec.loads_spec(YAML.format(**GOOD), methods=METHODS)
    assert spec.calibration.model_dump() == {
        "sequential": False,
        "blocks": "model.layers.*",
        "samples": 8,
        "errors": False,
    }


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("sequential", "'yes'", "true or false"),
        ("errors", "1", "true or false"),
        ("samples", "0", "1"),
        ("samples", "2.5", "integer"),
        ("samples", "true", "integer"),
        ("blocks", "'re:(a+)+'", "exponential time"),
        ("blocks", "3", "string"),
    ],
)
def test_bad_calibration_values_are_located(key: str, value: str, words: str) -> None:
    text = YAML.format(**{**GOOD, key: value})
    issues = issues_of(text)
    assert len(issues) == 1, issues
    issue = issues[0]
    assert issue.path == f"calibration.{key}"
    line, column = located(text, f"{key}: {value}")
    assert (issue.file, issue.line, issue.column) == ("s.yaml", line, column + len(key) + 2)
    assert words in (issue.message + (issue.hint or "")), issue


def test_an_unknown_calibration_key_is_located_at_the_key() -> None:
    text = YAML.format(**GOOD).replace("  errors: false\n", "  error: false\n")
    (issue,) = issues_of(text)
    assert "error" in issue.message and (issue.line, issue.column) == located(text, "error:")
    assert "errors" in (issue.message + (issue.hint or ""))


OWL_YAML = """\
version: 1
rules:
  - select: {types: [Linear]}
    method: wanda
    sparsity: 0.5
    owl: {m: 5, lambda: 0.08}
"""


@pytest.mark.parametrize(
    ("old", "new", "path", "token", "words"),
    [
        ("sparsity: 0.5", "amount: 0.5", "rules[0].amount", "0.5", "owl needs `sparsity`"),
        ("    sparsity: 0.5\n", "", "rules[0].owl", "{m: 5", "owl needs `sparsity`"),
        (
            "method: wanda",
            "method: ln_structured\n    options: {n: 1, dim: 0}",
            "rules[0].method",
            "ln_structured",
            "prunes channels",
        ),
        ("method: wanda", "method: identity", "rules[0].method", "identity", "takes no amount"),
        ("    sparsity: 0.5\n", "    options: {n: 2, m: 4}\n", "rules[0].options.n", "2, m", "fixed pattern"),
        (
            "select: {types: [Linear]}\n    method: wanda",
            "select: {types: [Linear]}\n    method: l1_unstructured\n    scope: global",
            "rules[0].scope",
            "global",
            "scope: global",
        ),
        ("lambda: 0.08", "lambda: 1", "rules[0].owl.lambda", "1}", "a number in (0, 1), got 1"),
        ("lambda: 0.08", "lambda: 0", "rules[0].owl.lambda", "0}", "a number in (0, 1), got 0"),
        ("m: 5", "m: -1", "rules[0].owl.m", "-1", "a number > 0"),
        ("m: 5", "m: '5'", "rules[0].owl.m", "'5'", "number"),
        ("lambda: 0.08", "lam: 0.08", "rules[0].owl.lam", "lam:", "unknown key 'lam'"),
    ],
)
def test_owl_problems_are_located_with_a_fix(old: str, new: str, path: str, token: str, words: str) -> None:
    text = OWL_YAML.replace(old, new)
    issues = [i for i in issues_of(text) if i.path == path]
    assert issues, issues_of(text)
    issue = issues[0]
    assert (issue.line, issue.column) == located(text, token), issue
    assert words in issue.message, issue
    if "owl" in issue.message:
        assert issue.hint, issue


def test_owl_checks_hold_for_specs_built_in_python(llama: nn.Module) -> None:
    rule = prunespec.spec.Rule.model_validate(owl_rule(method="identity", sparsity=None))
    spec = prunespec.Spec(version=1, rules=[rule])
    with pytest.raises(prunespec.SpecError, match="takes no amount"):
        prunespec.load_spec(spec, methods=METHODS)
    with pytest.raises(prunespec.PlanError, match="takes no amount"):  # unchecked, straight to the planner
        make_plan(llama, spec, METHODS)


def test_owl_with_random_unstructured_and_l1_is_fine() -> None:
    for method in ("l1_unstructured", "random_unstructured"):
        prunespec.load_spec(spec_of(owl_rule(method=method)), methods=METHODS)


# --- the plan ------------------------------------------------------------------------------------------


def test_without_allocations_owl_plans_at_the_target_and_says_so(llama: nn.Module) -> None:
    plan = prunespec.plan(llama, spec_of(owl_rule()), methods=METHODS)
    assert plan.blocks == LAYERS
    assert {s.sparsity for s in plan.steps} == {0.7}
    assert [s.block for s in plan.steps] == [LAYERS[0]] * 7 + [LAYERS[1]] * 7
    (owl,) = plan.owl
    assert (owl.rule_index, owl.target, owl.m, owl.lam, owl.blocks, owl.allocated) == (
        0,
        0.7,
        5,
        0.08,
        tuple(LAYERS),
        None,
    )
    assert owl.bounds == pytest.approx((0.62, 0.78))  # 2 blocks: target +- lambda
    assert plan.needs_data == ["rules[0]"]
    text = str(plan)
    assert "will be allocated by OWL from the calibration data (M=5, lambda=0.08), between 62.00% and 78.00%" in text
    assert "blocks: model.layers.0, model.layers.1" in text
    assert "Calibration: sequential" in text and "samples: every batch" in text
    assert "blocks: 2 blocks (detected: model.layers.0, model.layers.1)" in text


def test_allocations_set_each_tensors_sparsity_and_the_predictions(llama: nn.Module) -> None:
    spec = prunespec.load_spec(
        spec_of(owl_rule(select={"types": ["Linear"]}, method="l1_unstructured")), methods=METHODS
    )
    plan = make_plan(llama, spec, METHODS, allocations={0: {LAYERS[0]: 0.6, LAYERS[1]: 0.8}})
    by_tensor = {s.tensor.name: s for s in plan.steps}
    assert by_tensor["model.layers.0.mlp.up_proj.weight"].sparsity == 0.6
    assert by_tensor["model.layers.1.self_attn.q_proj.weight"].sparsity == 0.8
    assert by_tensor["lm_head.weight"].sparsity == 0.7  # in no block: the target
    assert by_tensor["lm_head.weight"].block is None
    for name, step in by_tensor.items():
        numel, after, exact = plan.tensors[name]
        assert exact and after == round(step.sparsity * numel) / numel  # type: ignore[operator]
    assert plan.owl[0].outside == ("lm_head.weight",)
    assert plan.needs_data == []  # l1_unstructured reads no statistics, and the allocations are given
    text = str(plan)
    assert "OWL rules[0]: sparsity allocated per block by OWL (M=5, lambda=0.08, mean 0.7):" in text
    assert "  model.layers.0   60.00%\n  model.layers.1   80.00%" in text
    assert "in no block, at 0.7: lm_head.weight" in text
    # and the engine prunes to them
    model = tiny_llama()
    report = prunespec.apply(model, make_plan(model, spec, METHODS, allocations={0: {LAYERS[0]: 0.6, LAYERS[1]: 0.8}}))
    assert report.tensors["model.layers.0.mlp.up_proj.weight"] == round(0.6 * 8192) / 8192
    assert report.tensors["model.layers.1.mlp.up_proj.weight"] == round(0.8 * 8192) / 8192


def test_plan_to_dict_carries_calibration_and_owl(llama: nn.Module) -> None:
    spec = prunespec.load_spec(spec_of(owl_rule(), calibration={"samples": 4, "errors": False}), methods=METHODS)
    plan = make_plan(llama, spec, METHODS, allocations={0: {LAYERS[0]: 0.65, LAYERS[1]: 0.75}})
    data = json.loads(json.dumps(plan.to_dict()))
    assert data["calibration"] == {
        "sequential": True,
        "blocks": None,
        "samples": 4,
        "errors": False,
        "given": True,
        "used": True,
    }
    assert data["blocks"] == LAYERS
    assert data["owl"] == [
        {
            "rule_index": 0,
            "rule": "rules[0]",
            "target": 0.7,
            "m": 5,
            "lambda": 0.08,
            "blocks": LAYERS,
            "outside": [],
            "allocated": {LAYERS[0]: 0.65, LAYERS[1]: 0.75},
            "bounds": [0.65, 0.75],
        }
    ]
    assert data["steps"][0]["block"] == LAYERS[0] and data["steps"][0]["sparsity"] == 0.65
    assert "samples: the first 4 batches; reconstruction errors: not reported" in str(plan)
    assert plan.stale(llama) == []


@pytest.mark.parametrize(
    ("allocations", "words"),
    [
        ({0: {LAYERS[0]: 0.6}}, "no sparsity for model.layers.1"),
        ({0: {LAYERS[0]: 0.6, LAYERS[1]: 0.8, "model.norm": 0.5}}, "model.norm is not among its blocks"),
        ({0: {LAYERS[0]: 0.6, LAYERS[1]: 1.5}}, "1.5 is not a sparsity in [0, 1]"),
        ({0: {LAYERS[0]: 0.6, LAYERS[1]: float("nan")}}, "is not a sparsity"),
        ({1: {LAYERS[0]: 0.6}}, "rules[1], which has no `owl`"),
        ({7: {LAYERS[0]: 0.6}}, "rule index 7, not in the spec"),
    ],
)
def test_allocations_that_do_not_fit_are_a_plan_error(
    llama: nn.Module, allocations: dict[int, dict[str, float]], words: str
) -> None:
    plain = {"select": {"names": ["lm_head"]}, "method": "l1_unstructured", "amount": 0.1}
    spec = prunespec.load_spec(spec_of(owl_rule(), plain), methods=METHODS)
    with pytest.raises(prunespec.PlanError) as info:
        make_plan(llama, spec, METHODS, allocations=allocations)
    assert words in str(info.value), str(info.value)


def test_blocks_pattern_and_its_problems(llama: nn.Module) -> None:
    spec = spec_of(owl_rule(), calibration={"blocks": "model.layers.*.mlp"})
    plan = prunespec.plan(llama, spec, methods=METHODS)
    assert plan.blocks == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert plan.owl[0].outside == tuple(s.tensor.name for s in plan.steps if "self_attn" in s.tensor.name)
    text = (
        "version: 1\ncalibration:\n  blocks: 'model.layer.*'\nrules:\n  - select: {types: [Linear]}\n"
        "    method: wanda\n    sparsity: 0.5\n"
    )
    with pytest.raises(prunespec.PlanError) as info:
        prunespec.plan(llama, prunespec.loads_spec(text, filename="s.yaml", methods=METHODS), methods=METHODS)
    (issue,) = info.value.issues
    assert issue.path == "calibration.blocks" and (issue.line, issue.column) == located(text, "'model.layer.*'")
    assert "matches no module" in issue.message and "model.layers" in (issue.hint or "")


def test_owl_on_a_model_without_blocks_says_how_to_name_them() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    with pytest.raises(prunespec.PlanError) as info:
        prunespec.plan(model, spec_of(owl_rule(select={"types": ["Linear"]})), methods=METHODS)
    (issue,) = info.value.issues
    assert issue.path == "rules[0].owl" and "no repeated blocks" in issue.message
    assert "calibration: {blocks:" in (issue.hint or "")
    plan = prunespec.plan(
        model, spec_of(owl_rule(select={"types": ["Linear"]}), calibration={"blocks": "*"}), methods=METHODS
    )
    assert [o.blocks for o in plan.owl] == [("0", "2")]


def test_a_calibration_block_no_rule_uses_is_said_unused(llama: nn.Module) -> None:
    plain = {"select": {"types": ["Linear"]}, "method": "l1_unstructured", "amount": 0.1}
    plan = prunespec.plan(llama, spec_of(plain, calibration={"samples": 2}), methods=METHODS)
    assert "the spec's `calibration` block is unused: no rule needs data" in str(plan)
    assert plan.blocks == [] and plan.steps[0].block is None
    assert plan.to_dict()["calibration"]["used"] is False
    assert "Calibration" not in str(prunespec.plan(llama, spec_of(plain), methods=METHODS))


def test_a_data_aware_plan_without_owl_shows_the_settings(llama: nn.Module) -> None:
    rule = owl_rule(owl=None)
    plan = prunespec.plan(llama, spec_of(rule, calibration={"sequential": False}), methods=METHODS)
    assert "Calibration: one pass over the unpruned model" in str(plan)
    assert plan.owl == [] and plan.steps[-1].block == LAYERS[1]


def test_tied_and_saved_specs_keep_owl_through_a_checkpoint(llama: nn.Module, tmp_path: Any) -> None:
    spec = spec_of(owl_rule(method="l1_unstructured"), calibration={"blocks": "model.layers.*"})
    model = tiny_llama()
    checked = prunespec.load_spec(spec, methods=METHODS)
    prunespec.apply(model, make_plan(model, checked, METHODS, allocations={0: {LAYERS[0]: 0.6, LAYERS[1]: 0.8}}))
    path = tmp_path / "owl.pt"
    prunespec.save(model, path, spec, methods=METHODS)
    saved = torch.load(path, weights_only=True)["prunespec"]["spec"]
    assert saved["rules"][0]["owl"] == {"m": 5, "lambda": 0.08}
    assert saved["calibration"] == {"sequential": True, "blocks": "model.layers.*", "errors": True}
    loaded = prunespec.load(tiny_llama(), path, methods=METHODS)
    assert loaded is not None and loaded.rules[0].owl == prunespec.load_spec(spec, methods=METHODS).rules[0].owl
    assert loaded.calibration_given and loaded.calibration.blocks == "model.layers.*"
