"""JSON Schema validation errors, in words: what is wrong, where, and what would be right."""

from __future__ import annotations

import difflib
from typing import Any

import jsonschema
from pydantic import BaseModel

from .errors import Issue
from .spec import DocPath, Rule, Schedule, Select, SourceMap, Spec

HINTS = {  # keyed by the last part of the document path
    "amount": "a float in [0, 1] is a fraction of what is left; an integer is a count",
    "sparsity": "the final fraction pruned, a number in [0, 1]",
    "version": "this prunespec reads spec version 1",
}

# Where each key of the spec language lives, for a key given at the wrong level.
_LEVELS: dict[str, type[BaseModel]] = {"Spec": Spec, "Rule": Rule, "Select": Select, "Schedule": Schedule}
_HOMES: dict[str, list[str]] = {}
for _level, _model in _LEVELS.items():
    for _key in _model.model_fields:
        _HOMES.setdefault(_key, []).append(_level)


def _misplaced_hint(key: str, level: str) -> str | None:
    """Where ``key``, unknown at ``level`` (a model's title, or an options model's), belongs."""
    homes = [home for home in _HOMES.get(key, []) if home != level]
    if not homes:
        return None
    if "Select" in homes and level == "Rule":
        return f"did you mean select.{key}? `{key}` goes under the rule's `select`"
    if "Rule" in homes and level == "Select":
        return f"`{key}` belongs to the rule, next to `select`, not under it"
    if "Rule" in homes and level not in _LEVELS:
        return f"`{key}` belongs to the rule, next to `options`, not under it"
    if level == "Spec" and ("Rule" in homes or "Select" in homes):
        where = "a rule" if "Rule" in homes else "a rule's `select`"
        return f"`{key}` belongs in {where}: under `rules:`, as `- {key}: ...`"
    if "Spec" in homes:
        return f"`{key}` is a top-level key of the spec, not of a rule"
    if "Schedule" in homes:
        return f"`{key}` belongs under `schedule`"
    return None


def _key_hint(key: str, allowed: list[str], level: str) -> str:
    """A typo of an allowed key, or a key of another level (a clear typo wins: `name` under select is
    `names`, while `seed` in a rule is the spec's, not a misspelt `select`)."""
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    misplaced = _misplaced_hint(key, level)
    if close and (misplaced is None or difflib.SequenceMatcher(None, key, close[0]).ratio() >= 0.8):
        return f"did you mean {close[0]!r}?"
    return misplaced or f"allowed keys: {', '.join(allowed) or 'none'}"


def schema_issues(error: jsonschema.ValidationError, source: SourceMap, base: DocPath = ()) -> list[Issue]:
    """One JSON Schema error (of a document validated at ``base``) as located issues."""
    path: DocPath = (*base, *error.absolute_path)
    kind = error.validator
    value = error.instance
    schema = error.schema
    if kind == "additionalProperties" and isinstance(value, dict):
        allowed = sorted(schema.get("properties", {}))
        level = str(schema.get("title", ""))
        issues = []
        for key in value:
            if not isinstance(key, str):
                issues.append(source.issue((*path, str(key)), f"mapping keys must be strings, got {key!r}", key=True))
            elif key not in allowed:
                hint = _key_hint(key, allowed, level)
                issues.append(source.issue((*path, key), f"unknown key {key!r}", hint, key=True))
        return issues
    if kind == "required":
        missing = [key for key in error.validator_value if key not in value]
        return [source.issue(path, f"missing required key {key!r}") for key in missing]
    if kind == "anyOf" and {"required": ["types"]} in error.validator_value:
        return [source.issue(path, "give `types`, `names` or `preset` to say which modules the rule selects")]
    if kind == "enum" and isinstance(value, str):
        options = [str(v) for v in error.validator_value]
        close = difflib.get_close_matches(value, options, n=1, cutoff=0.6)
        enum_hint = f"did you mean {close[0]!r}?" if close else None
        return [source.issue(path, f"expected one of {', '.join(map(repr, options))}, got {value!r}", enum_hint)]
    if kind == "const":
        return [source.issue(path, f"must be {error.validator_value!r}, got {value!r}")]
    if kind in ("minItems", "minProperties"):
        return [source.issue(path, "must not be empty")]
    if kind in ("anyOf", "oneOf") and isinstance(value, dict) and error.context:
        # A mapping that fits no branch (e.g. a Schedule or null): explain it against the mapping branch.
        branches: dict[Any, list[jsonschema.ValidationError]] = {}
        for sub_error in error.context:
            branches.setdefault(sub_error.schema_path[0], []).append(sub_error)
        deepest = max(branches.values(), key=lambda errs: max(len(e.absolute_path) for e in errs))
        if any(len(e.absolute_path) > len(error.absolute_path) or e.validator != "type" for e in deepest):
            return [issue for e in deepest for issue in schema_issues(e, source, base)]
    expected = describe(schema)
    last = str(path[-1]) if path else ""
    return [source.issue(path, f"expected {expected}, got {describe_value(value)}", HINTS.get(last))]


def describe(schema: Any) -> str:
    """A short English description of what a (sub)schema accepts."""
    if not isinstance(schema, dict):
        return "a valid value"
    for key in ("anyOf", "oneOf"):
        if key in schema:
            parts = [describe(sub) for sub in schema[key] if sub.get("type") != "null"]
            return " or ".join(dict.fromkeys(parts))
    if "const" in schema:
        return repr(schema["const"])
    if "enum" in schema:
        return "one of " + ", ".join(repr(v) for v in schema["enum"])
    names = {
        "integer": "an integer",
        "number": "a number",
        "string": "a string",
        "boolean": "true or false",
        "array": "a list",
        "object": "a mapping",
        "null": "null",
    }
    text = names.get(schema.get("type", ""), "a valid value")
    if "items" in schema and isinstance(schema["items"], dict) and schema["items"].get("type") == "string":
        text = "a list of strings"
    low, open_low = schema.get("minimum"), False
    if low is None and schema.get("exclusiveMinimum") is not None:
        low, open_low = schema["exclusiveMinimum"], True
    high, open_high = schema.get("maximum"), False
    if high is None and schema.get("exclusiveMaximum") is not None:
        high, open_high = schema["exclusiveMaximum"], True
    if low is not None and high is not None:
        text += f" in {'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
    elif low is not None:
        text += f" {'>' if open_low else '>='} {low}"
    elif high is not None:
        text += f" {'<' if open_high else '<='} {high}"
    return text


def describe_value(value: Any) -> str:
    """A value as messages show it: ``string 'half'``, ``a mapping``, ``boolean True``."""
    if isinstance(value, bool):
        return f"boolean {value!r}"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return f"string {value!r}"
    if value is None:
        return "null"
    return repr(value)
