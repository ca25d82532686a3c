"""The committed JSON Schema is the generated one, and every example spec validates against it."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from conftest import ROOT, SPECS
from ruamel.yaml import YAML

import prunespec
from prunespec.schema import schema_json

SCHEMA_FILE = ROOT / "schemas" / "prunespec.schema.json"
EXAMPLES = sorted(SPECS.glob("*.yaml"))
SCHEMA_COMMENT = "# yaml-language-server: $schema="


@pytest.fixture(scope="module")
def committed() -> dict[str, Any]:
    schema: dict[str, Any] = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    return schema


@pytest.fixture(scope="module")
def validator(committed: dict[str, Any]) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(committed)


def load_yaml(path: Path) -> Any:
    return YAML(typ="safe", pure=True).load(path.read_text(encoding="utf-8"))


def test_committed_schema_is_up_to_date() -> None:
    generated = schema_json(prunespec.load_methods(builtins_only=True))
    committed = SCHEMA_FILE.read_text(encoding="utf-8")
    assert generated == committed, (
        f"{SCHEMA_FILE.relative_to(ROOT)} is out of date with the spec models and built-in methods; "
        "regenerate it with `make schema` (prunespec schema --builtins-only > schemas/prunespec.schema.json) "
        "and commit the result"
    )


def test_committed_schema_is_a_valid_draft_2020_12_schema(committed: dict[str, Any]) -> None:
    assert committed["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(committed)
    assert committed["$defs"]["Rule"]["properties"]["method"]["enum"] == sorted(
        prunespec.load_methods(builtins_only=True)
    )


def test_there_are_examples() -> None:
    assert len(EXAMPLES) >= 6, EXAMPLES


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_validates_against_committed_schema(path: Path, validator: jsonschema.Draft202012Validator) -> None:
    document = load_yaml(path)
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(document)]
    assert not errors, errors


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_points_editors_at_the_schema(path: Path) -> None:
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith(SCHEMA_COMMENT), f"{path.name}: first line should be `{SCHEMA_COMMENT}...`"
    target = (path.parent / first.removeprefix(SCHEMA_COMMENT).strip()).resolve()
    assert target == SCHEMA_FILE.resolve(), f"{path.name} points at {target}"


def _ln_rule(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "version": 1,
        "rules": [
            {"select": {"types": ["Conv2d"]}, "method": "ln_structured", "amount": 0.5, "options": {"n": 2, "dim": 0}}
        ],
    }
    doc["rules"][0].update(changes)
    return doc


def _error_paths(validator: jsonschema.Draft202012Validator, document: Any) -> list[list[Any]]:
    """Paths of every (leaf) error the schema finds."""
    found = []
    for error in validator.iter_errors(document):
        leaves = list(error.context) or [error]
        found += [list(leaf.absolute_path) for leaf in leaves]
    return found


def test_schema_accepts_a_valid_ln_structured_rule(validator: jsonschema.Draft202012Validator) -> None:
    assert _error_paths(validator, _ln_rule()) == []
    assert _error_paths(validator, _ln_rule(options={"n": "fro", "dim": -1})) == []


@pytest.mark.parametrize(
    ("changes", "path"),
    [
        ({"options": {"n": "two", "dim": 0}}, ["rules", 0, "options", "n"]),
        ({"options": {"n": 2, "dim": "0"}}, ["rules", 0, "options", "dim"]),
        ({"options": {"n": 2}}, ["rules", 0, "options"]),
        ({"options": {"n": 2, "dim": 0, "p": 1}}, ["rules", 0, "options"]),
        ({"method": "l1_unstrucured"}, ["rules", 0, "method"]),
        ({"method": "magic"}, ["rules", 0, "method"]),
        ({"sparsity": 0.5}, ["rules", 0]),
        ({"amount": 1.5}, ["rules", 0, "amount"]),
        ({"amount": -1}, ["rules", 0, "amount"]),
        ({"scope": "everywhere"}, ["rules", 0, "scope"]),
    ],
)
def test_schema_rejects(changes: dict[str, Any], path: list[Any], validator: jsonschema.Draft202012Validator) -> None:
    paths = _error_paths(validator, _ln_rule(**changes))
    assert path in paths, paths


def test_schema_rejects_amount_for_identity(validator: jsonschema.Draft202012Validator) -> None:
    doc = _ln_rule(method="identity", options={})
    assert _error_paths(validator, doc) == [["rules", 0]]
    del doc["rules"][0]["amount"]
    assert _error_paths(validator, doc) == []


def test_schema_and_loader_agree_on_examples(methods: prunespec.MethodRegistry) -> None:
    """What the committed schema accepts, prunespec loads (and a tweak it rejects, prunespec rejects)."""
    for path in EXAMPLES:
        spec = prunespec.load_spec(path, methods=methods)
        assert spec.version == 1 and spec.rules
        broken = copy.deepcopy(load_yaml(path))
        broken["rules"][0]["method"] = "nope"
        with pytest.raises(prunespec.SpecError):
            prunespec.load_spec(broken, methods=methods)
