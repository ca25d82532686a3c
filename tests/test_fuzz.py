"""Property-based tests: random small models and random specs — valid, near-valid (one field broken) and
garbage — given as mappings and as YAML files.

The property, for every spec on every model: prunespec either applies it, reaching exactly the sparsity
the plan predicted for every tensor the plan marks exact, or raises a ``PrunespecError`` subclass —
never anything else — and then the model is exactly as it was (state_dict values, parameter and buffer
objects, hooks). Specs are applied one after another on the same model, so re-prunes (and failed
re-prunes) are covered too.

Bugs the fuzzing found are pinned by the regression tests at the end (rules that are not mappings,
seeds above 2**64 - 1, non-string keys, zero-sized dimensions, predictions after earlier pruning).

``PRUNESPEC_FUZZ_SCALE=10`` multiplies the number of examples, for a longer bug hunt.
"""

from __future__ import annotations

import copy
import io
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ModelState
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st
from ruamel.yaml import YAML
from torch import nn
from torch.nn.utils import prune

import prunespec
from prunespec.layout import DetachAfterForward

METHODS = prunespec.load_methods(builtins_only=True)
UNSTRUCTURED = ["l1_unstructured", "random_unstructured"]
STRUCTURED = ["ln_structured", "random_structured"]

FUZZ = settings(
    deadline=None,
    derandomize=True,  # the same examples on every run: CI stays stable
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
)
SCALE = float(os.environ.get("PRUNESPEC_FUZZ_SCALE", "1"))


def fuzz(max_examples: int) -> settings:
    return settings(FUZZ, max_examples=max(1, int(max_examples * SCALE)))


# --- models ------------------------------------------------------------------------------------------

KEYS = ["fc", "conv", "emb", "norm", "a", "b", "block", "head", "lm_head", "proj"]
Layer = tuple[Any, ...]  # ("linear", in, out, bias) | ("conv", in, out, k, bias) | ("embedding", n, d) | ("norm", d)

layers = st.one_of(
    st.tuples(st.just("linear"), st.integers(1, 6), st.integers(1, 6), st.booleans()),
    st.tuples(st.just("conv"), st.integers(1, 3), st.integers(1, 4), st.integers(1, 3), st.booleans()),
    st.tuples(st.just("embedding"), st.integers(1, 8), st.integers(1, 5)),
    st.tuples(st.just("norm"), st.integers(1, 6)),
)


@st.composite
def model_descriptions(draw: st.DrawFn) -> dict[str, Any]:
    """A plain description (so failures print readably) of a small model; :func:`build` makes it."""
    n = draw(st.integers(1, 5))
    return {
        "layers": draw(st.lists(layers, min_size=n, max_size=n)),
        "container": draw(st.sampled_from(["sequential", "dict", "nested"])),
        "keys": draw(st.permutations(KEYS)),
        "tie": draw(st.booleans()),  # tie a bias-free Linear head to the first Embedding, if any
        "values": draw(st.sampled_from(["normal", "ties"])),  # "ties": few distinct magnitudes
        "dtype": draw(st.sampled_from(["float32", "float32", "float64", "bfloat16"])),  # bfloat16: ties too
        "seed": draw(st.integers(0, 2**16)),
    }


def make_layer(layer: Layer) -> nn.Module:
    kind, *args = layer
    if kind == "linear":
        return nn.Linear(args[0], args[1], bias=args[2])
    if kind == "conv":
        return nn.Conv2d(args[0], args[1], args[2], bias=args[3])
    if kind == "embedding":
        return nn.Embedding(args[0], args[1])
    return nn.LayerNorm(args[0])


def build(desc: dict[str, Any]) -> nn.Module:
    modules = [make_layer(layer) for layer in desc["layers"]]
    if desc["tie"]:
        embedding = next((m for m in modules if isinstance(m, nn.Embedding)), None)
        if embedding is not None:
            head = nn.Linear(embedding.embedding_dim, embedding.num_embeddings, bias=False)
            head.weight = embedding.weight
            modules.append(head)
    keys = desc["keys"]
    model: nn.Module
    if desc["container"] == "sequential":
        model = nn.Sequential(*modules)
    elif desc["container"] == "dict":
        model = nn.ModuleDict(dict(zip(keys, modules, strict=False)))
    else:
        half = len(modules) // 2
        inner = nn.ModuleDict(dict(zip(keys[1:], modules[:half], strict=False)))
        model = nn.Sequential(nn.ModuleDict({keys[0]: inner}), *modules[half:])
    gen = torch.Generator().manual_seed(desc["seed"])
    with torch.no_grad():  # no zero anywhere, so zeros counted after finalize are exactly the pruned ones
        for param in model.parameters():
            if desc["values"] == "normal":
                values = torch.randn(param.shape, generator=gen)
                values[values == 0] = 1.0
            else:
                values = torch.tensor([-2.0, -1.0, 1.0, 2.0])[torch.randint(0, 4, param.shape, generator=gen)]
            param.copy_(values)
    return model.to(getattr(torch, desc["dtype"]))


@dataclass(frozen=True)
class Shape:
    """What specs are drawn against: the model's module names and the classes of its modules with parameters."""

    names: tuple[str, ...]
    types: tuple[str, ...]


def shape_of(desc: dict[str, Any]) -> Shape:
    modules = list(build(desc).named_modules())
    leaves = {type(m).__name__ for _, m in modules if m._parameters}
    return Shape(tuple(n for n, _ in modules), tuple(sorted(leaves)))


# --- specs --------------------------------------------------------------------------------------------

ABSENT_TYPES = ["Conv1d", "BatchNorm2d", "torch.nn.Conv2d", "Sequential", "Module", "no.such.Type"]


@st.composite
def type_entries(draw: st.DrawFn, shape: Shape) -> str:
    kind = draw(st.integers(0, 9))  # mostly classes the model has; sometimes one it lacks
    if kind == 0 or not shape.types:
        return draw(st.sampled_from(ABSENT_TYPES))
    present = draw(st.sampled_from(shape.types))
    return f"torch.nn.{present}" if kind < 4 else present


PATTERNS = ["*", "**", "*.*", "**.*", "re:.*", "re:[0-9]+", "[ab]*", "?", "*.[!x]*", "nothing.here"]


@st.composite
def name_patterns(draw: st.DrawFn, shape: Shape) -> str:
    real = [n for n in shape.names if n] or ["0"]
    name = draw(st.sampled_from(real))
    kind = draw(st.integers(0, 9))  # mostly a module's own name, in one form or another
    if kind == 0:
        return draw(st.sampled_from(PATTERNS))
    if kind == 1:
        return "re:" + re.escape(name)
    if kind == 2:
        return name + ".**"
    if kind == 3:
        return "**." + name.rpartition(".")[2]
    return name


@st.composite
def rules(draw: st.DrawFn, shape: Shape) -> dict[str, Any]:
    select: dict[str, Any] = {}
    keys = draw(st.sampled_from([["types"], ["names"], ["preset"], ["types", "names"], ["types", "preset"]]))
    if "types" in keys:
        select["types"] = draw(st.lists(type_entries(shape), min_size=1, max_size=2, unique=True))
    if "names" in keys:
        select["names"] = draw(st.lists(name_patterns(shape), min_size=1, max_size=2))
    if "preset" in keys:
        select["preset"] = "prunable"
    if draw(st.integers(0, 3)) == 0:
        select["exclude"] = draw(st.lists(name_patterns(shape), min_size=1, max_size=2))
    if draw(st.integers(0, 2)) == 0:
        select["params"] = draw(st.sampled_from([["weight"], ["bias"], ["weight", "bias"], ["bias", "weight"]]))
    method = draw(st.sampled_from([*UNSTRUCTURED, *UNSTRUCTURED, *STRUCTURED, "identity"]))
    rule: dict[str, Any] = {"select": select, "method": method}
    if method in STRUCTURED:
        rule["options"] = {"dim": draw(st.sampled_from([0, 1, -1, 0, 1, -1, 2, 3, -3]))}
        if method == "ln_structured":
            rule["options"]["n"] = draw(st.sampled_from([1, 2, 0, -1, 0.5, 3.5, "fro", math.inf, -math.inf]))
    if method != "identity":
        how = draw(st.sampled_from(["fraction", "fraction", "count", "sparsity"]))
        if how == "fraction":
            rule["amount"] = draw(st.one_of(st.sampled_from([0.0, 0.25, 0.5, 1.0]), st.floats(0, 1)))
        elif how == "count":
            rule["amount"] = draw(st.integers(0, 6))
        else:
            rule["sparsity"] = draw(st.one_of(st.sampled_from([0, 0.0, 0.5, 1.0]), st.floats(0, 1)))
        if method in UNSTRUCTURED and draw(st.integers(0, 2)) == 0:
            rule["scope"] = "global"
            if method == "l1_unstructured" and draw(st.booleans()):
                low, high = sorted(draw(st.lists(st.floats(0, 1), min_size=2, max_size=2)))
                bound = draw(st.sampled_from(["max", "min", "both"]))
                if bound in ("max", "both"):
                    rule["max_sparsity"] = high
                if bound in ("min", "both"):
                    rule["min_sparsity"] = low
        elif draw(st.integers(0, 5)) == 0:
            rule["scope"] = "local"
    if draw(st.integers(0, 3)) == 0:
        rule["name"] = draw(st.text(max_size=8))
    if draw(st.booleans()):
        rule["optional"] = draw(st.sampled_from([True, True, True, False]))
    return rule


@st.composite
def valid_specs(draw: st.DrawFn, shape: Shape) -> dict[str, Any]:
    """Specs that pass validation (they may still not fit the model: then the plan says so)."""
    spec: dict[str, Any] = {"version": 1, "rules": draw(st.lists(rules(shape), min_size=1, max_size=2))}
    if draw(st.booleans()):
        spec["seed"] = draw(st.integers(0, 2**63))
    if draw(st.integers(0, 3)) == 0:
        spec["finalize"] = draw(st.booleans())
    return spec


WRONG_TYPES = ["0.5", [0.5], {"x": 1}, None, True, "Linear", 3, 2.5, []]
MUTATIONS: dict[str, list[tuple[tuple[Any, ...], Any]]] = {
    # (path into the spec, new value); "*" is any rule; a path ending in "-" deletes the key
    "wrong type": [
        (path, value)
        for path in [
            ("version",),
            ("seed",),
            ("finalize",),
            ("rules",),
            ("*", "select"),
            ("*", "method"),
            ("*", "amount"),
            ("*", "scope"),
            ("*", "optional"),
            ("*", "name"),
            ("*", "options"),
            ("*", "select", "types"),
            ("*", "select", "names"),
            ("*", "select", "exclude"),
            ("*", "select", "params"),
            ("*", "select", "preset"),
            ("*", "sparsity"),
            ("*", "max_sparsity"),
        ]
        for value in WRONG_TYPES
    ],
    "out of range": [(("*", "amount"), v) for v in (1.5, -1, -0.1, 1.0000001, -(2**70), math.inf, math.nan)]
    + [(("*", "sparsity"), v) for v in (1.01, -0.5, 2, math.inf)]
    + [
        (("*", "max_sparsity"), 2.0),
        (("*", "min_sparsity"), -1.0),
        (("seed",), -1),
        (("version",), 2),
        (("version",), 0),
        (("rules",), []),
        (("*", "select", "types"), []),
        (("*", "select", "names"), []),
        (("*", "select", "params"), []),
    ],
    "unknown key": [
        (("amout",), 0.5),
        (("rule",), []),
        (("*", "amout"), 0.5),
        (("*", "methd"), "identity"),
        (("*", "select", "typs"), ["Linear"]),
        (("*", "select", "name"), ["fc"]),
        (("*", "options", "nn"), 2),
        (("*", "extra"), None),
        (("",), 1),
    ],
    "bad pattern": [
        (("*", "select", "names"), [p])
        for p in ("re:(", "re:[", "re:*", "a**b", "[ab", "**b.c", "re:(?P<x>", "", "re:(a+)+", "re:(.)\\1", "*a*a*a*a*")
    ]
    + [(("*", "select", "exclude"), ["re:)"]), (("*", "select", "types"), ["torch..nn"])],
    "unknown method": [
        (("*", "method"), m) for m in ("l1_unstrucured", "L1Unstructured", "", "prune.l1_unstructured", "nm_2_4")
    ],
    "bad dim": [(("*", "options"), {"dim": d, "n": 1}) for d in (5, -5, 2**40, "0", 0.5, None, True, [0])]
    + [
        (("*", "options"), {"n": 1}),
        (("*", "options"), {"dim": 0, "n": 1, "extra": 1}),
        (("*", "options"), {"dim": 0, "n": "nuc"}),
        (("*", "options"), {"dim": 0, "n": math.nan}),
    ],
    "missing": [
        (("version", "-"), None),
        (("rules", "-"), None),
        (("*", "select", "-"), None),
        (("*", "method", "-"), None),
        (("*", "amount", "-"), None),
    ],
}


def mutate(spec: dict[str, Any], path: tuple[Any, ...], value: Any, rule_index: int) -> dict[str, Any]:
    """A copy of ``spec`` with ``path`` set to ``value`` (or deleted)."""
    out = copy.deepcopy(spec)
    node: Any = out
    delete = path[-1] == "-"
    keys = [rule_index if k == "*" else k for k in (path[:-1] if delete else path)]
    if keys and keys[0] != "rules" and isinstance(keys[0], int):
        keys.insert(0, "rules")
    for key in keys[:-1]:
        if isinstance(node, dict):
            node = node.setdefault(key, {})
        elif isinstance(node, list) and isinstance(key, int) and key < len(node):
            node = node[key]
        else:
            return out
    if not isinstance(node, dict):
        return out
    if delete:
        node.pop(keys[-1], None)
    else:
        node[keys[-1]] = value
    return out


@st.composite
def near_valid_specs(draw: st.DrawFn, shape: Shape) -> dict[str, Any]:
    """A valid spec with one thing broken."""
    spec = draw(valid_specs(shape))
    kind = draw(st.sampled_from(sorted(MUTATIONS)))
    path, value = draw(st.sampled_from(MUTATIONS[kind]))
    note(f"mutation: {kind}: {path} = {value!r}")
    return mutate(spec, path, value, draw(st.integers(0, len(spec["rules"]) - 1)))


def _containers(children: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)


json_like = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=10)
    | st.sampled_from(["l1_unstructured", "Linear", "weight", "global", "prunable", "**", 1, 0.5]),
    _containers,
    max_leaves=16,
)
RULE_KEYS = ["select", "method", "amount", "sparsity", "scope", "options", "name", "optional", "max_sparsity"]
SPEC_KEYS = ["version", "rules", "seed", "finalize", "select", "method", "amount", "sparsity", "types", "names"]


@st.composite
def garbage_specs(draw: st.DrawFn) -> dict[str, Any]:
    """Random JSON-like mappings: fully random, or random values under the right keys."""
    shape = draw(st.sampled_from(["random", "top", "rules", "rule", "select"]))
    junk = draw(json_like)
    if shape == "random":
        keys = st.one_of(st.text(max_size=8), st.sampled_from(SPEC_KEYS))
        out: dict[str, Any] = draw(st.dictionaries(keys, json_like, max_size=5))
        return out
    if shape == "top":
        return {"version": 1, "rules": [], **{draw(st.sampled_from(SPEC_KEYS)): junk}}
    if shape == "rules":
        return {"version": 1, "rules": draw(st.one_of(json_like, st.lists(st.dictionaries(st.text(), json_like))))}
    if shape == "rule":
        return {"version": 1, "rules": [draw(st.dictionaries(st.sampled_from(RULE_KEYS), json_like, max_size=4))]}
    return {"version": 1, "rules": [{"select": junk, "method": "l1_unstructured", "amount": 0.5}]}


YAML_TOKENS = [
    "version: 1\n", "rules:\n", "  - ", "select: {types: [Linear]}\n", "    method: l1_unstructured\n",
    "    amount: 0.5\n", "{", "}", "[", "]", ": ", "- ", "\t", "'", '"', "\n", "&a ", "*a", "<<: *a\n", "---\n",
    "...\n", "%YAML 1.2\n", "!!python/object/apply:os.system ['true']\n", "!!binary aGVsbG8=\n", "2001-12-14\n",
    "? [a, b]\n", "1: 2\n", "null: 3\n", "amount: .nan\n", "amount: 1e999\n", "seed: 99999999999999999999999\n",
    "version: 1\nversion: 1\n", "#", "~", "|\n", ">\n", "\\u0000", "\x00", "\ufeff",
    "[" * 70, "]" * 70, "<<: !!python/object/apply:os.system {args: [true]}\n", "!!omap [a: 1]\n", '"\\ud800"',
    "<<: 3\n", "<<: [*a]\n", "&a [*a]\n", "names: ['re:(.*.*)*X']\n", "types: [torch._dynamo.X]\n",
]  # fmt: skip


@st.composite
def garbage_yaml_texts(draw: st.DrawFn) -> str:
    parts = draw(st.lists(st.one_of(st.sampled_from(YAML_TOKENS), st.text(max_size=6)), max_size=12))
    return "".join(parts)


def yaml_text(spec: Any) -> str:
    stream = io.StringIO()
    yaml = YAML(typ="safe", pure=True)
    yaml.default_flow_style = False
    yaml.dump(spec, stream)
    return stream.getvalue()


# --- the property ----------------------------------------------------------------------------------------


SpecSource = Any  # a mapping, or a path to a YAML file


def check_one(model: nn.Module, source: SpecSource) -> str:
    """Plan and apply ``source``; assert the property. Returns how it ended, for ``note``."""
    __tracebackhide__ = True
    before = ModelState(model)
    try:
        plan = prunespec.plan(model, source, methods=METHODS)
    except prunespec.PrunespecError as exc:
        before.assert_unchanged(model)
        with pytest.raises(type(exc)):
            prunespec.apply(model, source, methods=METHODS)
        before.assert_unchanged(model)
        return f"refused: {type(exc).__name__}"
    before.assert_unchanged(model)  # planning never touches the model
    try:
        report = prunespec.apply(model, source, methods=METHODS)
    except prunespec.PrunespecError as exc:
        assert isinstance(exc, prunespec.ApplyError), f"the plan passed, so only a method can fail: {exc!r}"
        before.assert_unchanged(model)
        return f"refused at apply: {type(exc).__name__}"
    check_applied(model, before, plan, report, set())
    exact = sum(1 for _, p, e in plan.tensors.values() if p is not None and e)
    return f"applied: {'no' if not plan.tensors else 'all' if exact == len(plan.tensors) else 'some'} tensors exact"


def check_applied(
    model: nn.Module, before: ModelState, plan: prunespec.Plan, report: prunespec.Report, skip_exact: set[str]
) -> None:
    __tracebackhide__ = True
    assert set(report.tensors) == set(plan.tensors)
    for name, (numel, predicted, exact) in plan.tensors.items():
        stats = report.entries[name]
        assert stats.numel == numel and 0 <= stats.zeros <= numel, name
        if predicted is not None and exact and name not in skip_exact:
            assert stats.zeros == round(predicted * numel), f"{name}: {stats.zeros} zeros, plan said {predicted}"
            assert report.tensors[name] == predicted, name
    if plan.tensors and not skip_exact and all(p is not None and exact for _, p, exact in plan.tensors.values()):
        assert plan.global_sparsity is not None
        assert math.isclose(report.global_sparsity, plan.global_sparsity, rel_tol=1e-12, abs_tol=1e-12)

    finalize = plan.spec.finalize
    modules = dict(model.named_modules())
    for step in plan.steps:
        values = {}
        for owner, pname in step.tensor.owners:
            module = modules[owner]
            hooks = [h for h in module._forward_pre_hooks.values() if isinstance(h, prune.BasePruningMethod)]
            if finalize:  # this tensor's pruning is permanent (other tensors of the module may stay pruned)
                assert pname in module._parameters and pname + "_mask" not in module._buffers, owner
                assert pname not in [h._tensor_name for h in hooks], owner
                assert bool(hooks) == any(isinstance(h, DetachAfterForward) for h in module._forward_hooks.values())
                values[owner] = module._parameters[pname]
            else:
                mask = module._buffers[pname + "_mask"]
                orig = module._parameters[pname + "_orig"]
                assert bool(((mask == 0) | (mask == 1)).all()), owner
                assert [h._tensor_name for h in hooks].count(pname) == 1, f"{owner}: one hook per pruned tensor"
                assert torch.equal(getattr(module, pname), orig * mask), owner
                values[owner] = (orig, mask)
        if len(values) > 1:  # tied: one Parameter and one mask for every owner
            first = next(iter(values.values()))
            for value in values.values():
                if finalize:
                    assert value is first
                else:
                    assert value[0] is first[0] and value[1] is first[1]
    if not finalize and plan.steps:
        assert prune.is_pruned(model)
        # pruning moves the weights, never changes them
        by_id = {i: v for (_, i), v in zip(before.params, before.param_values, strict=True)}
        for name, param in model.named_parameters(remove_duplicate=False):
            if id(param) in by_id:
                assert torch.equal(param, by_id[id(param)]), name


def run_property(desc: dict[str, Any], sources: list[SpecSource]) -> None:
    model = build(desc)
    for source in sources:
        note(f"spec: {source!r}")
        outcome = check_one(model, source)
        note(outcome)
        event(outcome)  # `pytest --hypothesis-show-statistics` shows how often each ending was reached


# --- the tests -----------------------------------------------------------------------------------------


def same_spec(mapping: dict[str, Any], path: Path) -> dict[str, Any] | None:
    """The spec a mapping and its YAML dump load to: the same one, or both refused (then None)."""
    __tracebackhide__ = True
    loaded = []
    for source in (mapping, path):
        try:
            loaded.append(prunespec.load_spec(source, methods=METHODS).model_dump())
        except prunespec.SpecError:
            loaded.append(None)
    assert loaded[0] == loaded[1], f"the mapping and its YAML load differently: {loaded}"
    return loaded[0]


@pytest.fixture(scope="module")
def spec_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz-specs")


_counter = iter(range(10**9))


def as_file(directory: Path, text: str) -> Path:
    path = directory / f"spec-{next(_counter)}.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def specs_for(kind: Callable[[Shape], st.SearchStrategy[dict[str, Any]]]) -> st.SearchStrategy[Any]:
    @st.composite
    def draw_all(draw: st.DrawFn) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        desc = draw(model_descriptions())
        return desc, draw(st.lists(kind(shape_of(desc)), min_size=1, max_size=2))

    return draw_all()


@fuzz(250)
@given(case=specs_for(valid_specs))
def test_valid_specs_as_mappings(case: tuple[dict[str, Any], list[dict[str, Any]]]) -> None:
    desc, specs = case
    run_property(desc, specs)


@fuzz(80)
@given(case=specs_for(valid_specs))
def test_valid_specs_as_yaml_files(case: tuple[dict[str, Any], list[dict[str, Any]]], spec_dir: Path) -> None:
    desc, specs = case
    paths = [as_file(spec_dir, yaml_text(spec)) for spec in specs]
    for spec, path in zip(specs, paths, strict=True):
        assert same_spec(spec, path) is not None, "a valid spec must validate"
    run_property(desc, paths)


@fuzz(250)
@given(case=specs_for(near_valid_specs))
def test_near_valid_specs_as_mappings(case: tuple[dict[str, Any], list[dict[str, Any]]]) -> None:
    desc, specs = case
    run_property(desc, specs)


@fuzz(80)
@given(case=specs_for(near_valid_specs))
def test_near_valid_specs_as_yaml_files(case: tuple[dict[str, Any], list[dict[str, Any]]], spec_dir: Path) -> None:
    desc, specs = case
    paths = [as_file(spec_dir, yaml_text(spec)) for spec in specs]
    for spec, path in zip(specs, paths, strict=True):
        same_spec(spec, path)
    run_property(desc, paths)


@fuzz(150)
@given(desc=model_descriptions(), spec=garbage_specs())
def test_garbage_mappings(desc: dict[str, Any], spec: dict[str, Any]) -> None:
    run_property(desc, [spec])


@fuzz(150)
@given(desc=model_descriptions(), text=st.one_of(garbage_yaml_texts(), json_like.map(yaml_text)))
def test_garbage_yaml_files(desc: dict[str, Any], text: str, spec_dir: Path) -> None:
    run_property(desc, [as_file(spec_dir, text)])


# --- known gaps: minimal repros of what the generators above steer around --------------------------------


def assert_refused_or_applied(model: nn.Module, source: SpecSource) -> None:
    """The property, on one model and one spec, with the exception shown if it is the wrong kind."""
    __tracebackhide__ = True
    before = ModelState(model)
    try:
        prunespec.apply(model, source, methods=METHODS)
    except prunespec.PrunespecError:
        before.assert_unchanged(model)


@pytest.mark.parametrize("as_yaml", [False, True], ids=["mapping", "yaml"])
def test_rule_that_is_not_a_mapping_is_a_spec_error(as_yaml: bool, spec_dir: Path) -> None:
    spec: dict[str, Any] = {"version": 1, "rules": [None]}
    source = as_file(spec_dir, "version: 1\nrules:\n  - \n") if as_yaml else spec
    with pytest.raises(prunespec.SpecError, match=r"rules\[0\]"):
        prunespec.load_spec(source, methods=METHODS)


def test_seed_beyond_64_bits_is_a_spec_error() -> None:
    spec = {"version": 1, "seed": 2**64, "rules": [{"select": {"types": ["Linear"]}, "method": "identity"}]}
    with pytest.raises(prunespec.SpecError, match="seed"):
        prunespec.apply(nn.Sequential(nn.Linear(2, 2)), spec, methods=METHODS)


@pytest.mark.parametrize("where", ["top", "select"])
def test_non_string_key_in_a_mapping_is_a_spec_error(where: str) -> None:
    rule: dict[Any, Any] = {"select": {"types": ["Linear"]}, "method": "identity"}
    spec: dict[Any, Any] = {"version": 1, "rules": [rule]}
    (spec if where == "top" else rule["select"])[1] = 2
    with pytest.raises(prunespec.SpecError, match="1"):
        prunespec.load_spec(spec, methods=METHODS)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_structured_pruning_of_a_zero_sized_dimension() -> None:
    model = nn.Sequential(nn.Linear(0, 3))
    spec = {
        "version": 1,
        "rules": [
            {"select": {"types": ["Linear"]}, "method": "ln_structured", "amount": 0.5, "options": {"n": 1, "dim": 1}}
        ],
    }
    assert_refused_or_applied(model, spec)


@pytest.mark.parametrize("amount", [0.0, 0.2])
def test_structured_plan_counts_earlier_unstructured_zeros(amount: float) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(84, 10))
    first = {"version": 1, "rules": [{"select": {"types": ["Linear"]}, "method": "l1_unstructured", "amount": 0.5}]}
    prunespec.apply(model, first, methods=METHODS)
    rows = {"select": {"types": ["Linear"]}, "method": "ln_structured", "options": {"n": 1, "dim": 0}, "amount": amount}
    spec = {"version": 1, "rules": [rows]}
    plan = prunespec.plan(model, spec, methods=METHODS)
    report = prunespec.apply(model, spec, methods=METHODS)
    _, predicted, exact = plan.tensors["0.weight"]
    # today: predicted 0.0 (amount 0) or 0.2 (amount 0.2), exact, while half the entries were already pruned
    assert not exact or predicted == report.tensors["0.weight"]


@pytest.mark.parametrize("amount", [0.0, 0.25])
def test_finalized_re_prune_reports_what_the_plan_predicted(amount: float) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 1, bias=False))

    def spec(amount: float) -> dict[str, Any]:
        rule = {"select": {"types": ["Linear"]}, "method": "l1_unstructured", "amount": amount}
        return {"version": 1, "finalize": True, "rules": [rule]}

    prunespec.apply(model, spec(0.5), methods=METHODS)  # two of the four weights are now 0.0 for good
    plan = prunespec.plan(model, spec(amount), methods=METHODS)
    report = prunespec.apply(model, spec(amount), methods=METHODS)
    _, predicted, exact = plan.tensors["0.weight"]
    # today: predicted 0.0 / 0.25 (exact), reported 0.5
    assert not exact or predicted == report.tensors["0.weight"]
