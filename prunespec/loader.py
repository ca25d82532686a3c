"""YAML text -> validated :class:`~prunespec.spec.Spec`, with every problem located at file:line:column.

Parsing uses ruamel.yaml's round-trip loader, which records positions and builds no Python objects from
tags; any tag other than YAML's plain data types is rejected. The plain document is then checked
against the JSON Schema (which covers each installed method's options) and built into pydantic models.
All problems of a document are reported together in one :class:`~prunespec.errors.SpecError`.
"""

from __future__ import annotations

import datetime
import difflib
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jsonschema
from pydantic import ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq, TaggedScalar
from ruamel.yaml.error import MarkedYAMLError, YAMLError

from .errors import Issue, SpecError
from .plugins import MethodRegistry, load_methods, provider_hint
from .schema import build_schema
from .spec import DocPath, SourceMap, Spec, format_path

_PLAIN_TAGS = {f"tag:yaml.org,2002:{name}" for name in ("str", "int", "float", "bool", "null", "seq", "map")}


def load_spec(
    source: str | os.PathLike[str] | Mapping[str, Any] | Spec, *, methods: MethodRegistry | None = None
) -> Spec:
    """Load and validate a spec from a YAML file path or a mapping; a :class:`Spec` passes through.

    Raises :class:`~prunespec.errors.SpecError` listing every problem, each with file:line:column
    (for files) and document path.
    """
    if isinstance(source, Spec):
        return source
    if isinstance(source, Mapping):
        return validate_document(source, SourceMap(), methods)
    path = Path(source)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(Issue(f"cannot read the spec: {exc}", file=str(source))) from None
    return loads_spec(text, filename=str(source), methods=methods)


def loads_spec(text: str, *, filename: str = "<string>", methods: MethodRegistry | None = None) -> Spec:
    """Load and validate a spec from YAML text (``filename`` is used in error locations)."""
    document, source = parse_yaml(text, filename)
    return validate_document(document, source, methods)


def parse_yaml(text: str, filename: str) -> tuple[Any, SourceMap]:
    """Parse YAML into plain Python data and a map of where each node is."""
    yaml = YAML(typ="rt", pure=True)
    try:
        node = yaml.load(text)
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = " ".join(str(p) for p in (exc.context, exc.problem) if p)
        problem = problem.split("\nTo suppress")[0].strip()
        raise SpecError(
            Issue(
                f"invalid YAML: {problem}",
                file=filename,
                line=mark.line + 1 if mark else None,
                column=mark.column + 1 if mark else None,
            )
        ) from None
    except YAMLError as exc:
        raise SpecError(Issue(f"invalid YAML: {exc}", file=filename)) from None
    source = SourceMap(file=filename)
    issues: list[Issue] = []
    if node is not None and hasattr(node, "lc"):
        source.values[()] = (node.lc.line + 1, node.lc.col + 1)
    document = _plain(node, (), source, issues)
    if issues:
        raise SpecError(issues)
    return document, source


MAX_NODES = 100_000  # aliases can make a small file expand to billions of nodes ("billion laughs")


def _position(lookup: Any, *args: Any) -> tuple[int, int] | None:
    """ruamel's 0-based position of a key, value or item, as 1-based; None where it has none (merge keys)."""
    try:
        pos = lookup(*args)
    except (KeyError, IndexError, TypeError):
        return None
    return (pos[0] + 1, pos[1] + 1) if pos else None


def _plain(node: Any, path: DocPath, source: SourceMap, issues: list[Issue], budget: list[int] | None = None) -> Any:
    """Convert ruamel's round-trip nodes to plain data, recording positions and rejecting tags."""
    budget = budget if budget is not None else [MAX_NODES]
    budget[0] -= 1
    if budget[0] < 0:
        if budget[0] == -1:
            issues.append(source.issue(path, f"the spec expands to more than {MAX_NODES:,} values (through aliases?)"))
        return None
    tag = getattr(node, "tag", None)
    tag_value = getattr(tag, "value", None)
    if isinstance(node, TaggedScalar) or (tag_value is not None and tag_value not in _PLAIN_TAGS):
        issues.append(
            source.issue(
                path,
                f"YAML tag {str(tag_value or '?').replace('tag:yaml.org,2002:', '!!')} is not allowed",
                "a spec holds plain data only: mappings, lists, strings, numbers, booleans",
            )
        )
        return None
    if isinstance(node, CommentedMap):
        out: dict[str, Any] = {}
        for key in node:
            key_pos = _position(node.lc.key, key)
            if key_pos:
                source.keys[(*path, str(key))] = key_pos
            if not isinstance(key, str):
                issues.append(source.issue((*path, str(key)), f"mapping keys must be strings, got {key!r}", key=True))
                continue
            value_pos = _position(node.lc.value, key)
            if value_pos:
                source.values[(*path, key)] = value_pos
            out[key] = _plain(node[key], (*path, key), source, issues, budget)
        return out
    if isinstance(node, CommentedSeq):
        items = []
        for index, item in enumerate(node):
            item_pos = _position(node.lc.item, index)
            if item_pos:
                source.values[(*path, index)] = item_pos
            items.append(_plain(item, (*path, index), source, issues, budget))
        return items
    if isinstance(node, bool) or node is None:
        return node
    if isinstance(node, int):
        return bool(node) if type(node).__name__ == "ScalarBoolean" else int(node)
    if isinstance(node, float):
        if math.isnan(node):
            last = str(path[-1]) if path else ""
            issues.append(source.issue(path, "expected a finite number, got NaN", _HINTS.get(last, "write a number")))
            return None
        return float(node)
    if isinstance(node, str):
        return str(node)
    kind = {datetime.date: "a date", datetime.datetime: "a timestamp", bytes: "binary data", set: "a set"}
    what = next((name for cls, name in kind.items() if isinstance(node, cls)), f"the value {node!r}")
    issues.append(source.issue(path, f"{what} is not allowed here", "quote it if you mean text"))
    return None


def validate_document(document: Any, source: SourceMap, methods: MethodRegistry | None = None) -> Spec:
    """Check a plain document against the schema and the models; raise one SpecError with every issue."""
    methods = load_methods() if methods is None else methods
    if document is None:
        raise SpecError(source.issue((), "the spec is empty", "start with `version: 1` and a list of `rules`"))
    validator = jsonschema.Draft202012Validator(build_schema(methods))
    issues = []
    for error in validator.iter_errors(document):
        issues.extend(_schema_issues(error, source, methods))
    if not issues:
        try:
            spec = Spec.model_validate(document)
        except ValidationError as exc:
            issues.extend(pydantic_issues(exc, (), source, document))
        else:
            spec, option_issues = _validate_options(spec, methods, source)
            issues.extend(option_issues)
            issues.extend(schedule_issues(spec, methods, source))
    if issues:
        raise SpecError(_tidy(issues))
    spec._source = source
    return spec


def _validate_options(spec: Spec, methods: MethodRegistry, source: SourceMap) -> tuple[Spec, list[Issue]]:
    """Check each rule's options against its method's model and fill in defaults."""
    issues: list[Issue] = []
    rules = []
    for index, rule in enumerate(spec.rules):
        info = methods[rule.method]
        try:
            options = info.validate_options(rule.options)
        except ValidationError as exc:
            issues.extend(pydantic_issues(exc, ("rules", index, "options"), source, rule.options))
            options = rule.options
        rules.append(rule.model_copy(update={"options": options}))
    return spec.model_copy(update={"rules": rules}), issues


def schedule_issues(spec: Spec, methods: MethodRegistry, source: SourceMap) -> list[Issue]:
    """A scheduled rule aims at a final `sparsity`, at least the schedule's `initial`; all schedules
    count in one unit (the training loop passes one t)."""
    issues = []
    units = {s.unit for s in [spec.schedule, *(r.schedule for r in spec.rules)] if s is not None}
    if len(units) > 1:
        issues.append(
            source.issue(("schedule",) if spec.schedule else (), "schedules mix units: " + " and ".join(sorted(units)))
        )
    for index, rule in enumerate(spec.rules):
        schedule = rule.schedule or spec.schedule
        if schedule is None or (rule.schedule is None and not methods[rule.method].takes_amount):
            continue  # a spec-wide schedule leaves methods without an amount alone
        where = ("rules", index, "schedule") if rule.schedule else ("schedule",)
        if rule.sparsity is None:
            issues.append(
                source.issue(
                    ("rules", index, "amount") if rule.amount is not None else ("rules", index),
                    "a scheduled rule needs `sparsity` (the final sparsity), not `amount`",
                    f"write `sparsity:` instead; the schedule at {format_path(where)} raises it step by step",
                )
            )
        elif schedule.initial > rule.sparsity:
            issues.append(
                source.issue(
                    (*where, "initial"),
                    f"initial sparsity {schedule.initial:g} is above the final `sparsity` {rule.sparsity:g} "
                    f"of rules[{index}]",
                    "masks only grow: make `initial` <= `sparsity`",
                )
            )
    return issues


def _tidy(issues: list[Issue]) -> list[Issue]:
    """One issue per place, the most specific kept, in document order."""
    best: dict[str, Issue] = {}
    for issue in issues:
        if issue.path not in best or _RANK.get(issue.message.split(" ")[0], 9) < _RANK.get(
            best[issue.path].message.split(" ")[0], 9
        ):
            best[issue.path] = issue
    # A misspelt `amount`/`sparsity` also makes the rule lack one; the did-you-mean says it all.
    typos = {i.path.rsplit(".", 1)[0] for i in best.values() if i.hint in _AMOUNT_TYPO_HINTS}
    kept = [i for i in best.values() if not (i.path in typos and "needs `amount` or `sparsity`" in i.message)]
    return sorted(kept, key=lambda i: (i.line or 0, i.column or 0, i.path, i.message))


_RANK = {"unknown": 0, "missing": 1}  # by the message's first word
_AMOUNT_TYPO_HINTS = {"did you mean 'amount'?", "did you mean 'sparsity'?"}


def pydantic_issues(exc: ValidationError, base: DocPath, source: SourceMap, document: Any = None) -> list[Issue]:
    """pydantic's errors as located issues (``document``: the data validated, to tell real keys from
    pydantic's own labels in error locations, like ``constrained-float`` for a branch of a union)."""
    issues = []
    for err in exc.errors():
        loc: list[str | int] = []
        node = document
        for part in err["loc"]:
            if document is not None and not (
                (isinstance(node, dict) and part in node) or (isinstance(node, list) and isinstance(part, int))
            ):
                if err["type"] in ("missing", "extra_forbidden"):
                    loc.append(part)
                break
            loc.append(part)
            node = node[part] if document is not None else None
        path = (*base, *loc)
        if err["type"] == "extra_forbidden":
            issues.append(source.issue(path, f"unknown key {loc[-1]!r}", key=True))
        elif err["type"] == "missing":
            issues.append(source.issue(path[:-1], f"missing required key {loc[-1]!r}"))
        else:
            message = err["msg"].removeprefix("Value error, ")
            scalar = not isinstance(err["input"], (dict, list))
            issues.append(source.issue(path, f"{message} (got {err['input']!r})" if scalar else message))
    return issues


# --- JSON Schema errors, in words ----------------------------------------------------------------


def _schema_issues(error: jsonschema.ValidationError, source: SourceMap, methods: MethodRegistry) -> list[Issue]:
    path: DocPath = tuple(error.absolute_path)
    kind = error.validator
    value = error.instance
    schema = error.schema
    if kind == "additionalProperties" and isinstance(value, dict):
        allowed = sorted(schema.get("properties", {}))
        issues = []
        for key in value:
            if not isinstance(key, str):
                issues.append(source.issue((*path, str(key)), f"mapping keys must be strings, got {key!r}", key=True))
            elif key not in allowed:
                close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
                hint = f"did you mean {close[0]!r}?" if close else f"allowed keys: {', '.join(allowed) or 'none'}"
                issues.append(source.issue((*path, key), f"unknown key {key!r}", hint, key=True))
        return issues
    if kind == "required":
        missing = [key for key in error.validator_value if key not in value]
        return [source.issue(path, f"missing required key {key!r}") for key in missing]
    if kind == "enum" and path[-1:] == ("method",):
        close = methods.suggest(str(value))
        hint = provider_hint(str(value), methods) or (
            f"did you mean {close[0]!r}?" if close else f"installed methods: {', '.join(sorted(methods))}"
        )
        return [source.issue(path, f"unknown method {value!r}", hint)]
    if kind == "oneOf" and _is_amount_choice(error.validator_value) and isinstance(value, dict):
        method = value.get("method")
        if "amount" in value and "sparsity" in value:
            return [source.issue(path, "give `amount` or `sparsity`, not both")]
        return [
            source.issue(
                path,
                f"method {method!r} needs `amount` or `sparsity`",
                "amount: 0.3 prunes 30% of what is left; sparsity: 0.3 aims at 30% in total",
            )
        ]
    if kind == "not" and isinstance(value, dict) and "method" in value:
        key = "amount" if "amount" in value else "sparsity"
        return [source.issue((*path, key), f"method {value['method']!r} takes no `{key}`", "remove it")]
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
            return [issue for e in deepest for issue in _schema_issues(e, source, methods)]
    expected = _describe(schema)
    last = str(path[-1]) if path else ""
    return [source.issue(path, f"expected {expected}, got {_describe_value(value)}", _HINTS.get(last))]


def _is_amount_choice(options: Any) -> bool:
    return bool(options == [{"required": ["amount"]}, {"required": ["sparsity"]}])


_HINTS = {  # keyed by the last part of the document path
    "amount": "a float in [0, 1] is a fraction of what is left; an integer is a count",
    "sparsity": "the final fraction pruned, a number in [0, 1]",
    "version": "this prunespec reads spec version 1",
}


def _describe(schema: Any) -> str:
    """A short English description of what a (sub)schema accepts."""
    if not isinstance(schema, dict):
        return "a valid value"
    for key in ("anyOf", "oneOf"):
        if key in schema:
            parts = [_describe(sub) for sub in schema[key] if sub.get("type") != "null"]
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
    low, high = schema.get("minimum"), schema.get("maximum")
    if low is not None and high is not None:
        text += f" in [{low}, {high}]"
    elif low is not None:
        text += f" >= {low}"
    elif schema.get("exclusiveMinimum") is not None:
        text += f" > {schema['exclusiveMinimum']}"
    elif high is not None:
        text += f" <= {high}"
    return text


def _describe_value(value: Any) -> str:
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
