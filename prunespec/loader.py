"""YAML text, a mapping or a Python-built :class:`~prunespec.spec.Spec` -> a validated Spec.

Validity has one definition, whatever the spec came from:

* model-free rules (types, ranges, required keys, patterns) are the pydantic models of
  :mod:`prunespec.spec`; for documents, the model-free JSON Schema generated from them words the
  problems (with did-you-mean hints);
* method-aware rules (the method exists, takes an amount or not, its options, `scope: global`,
  `max_sparsity`/`min_sparsity`, schedules) are :func:`check_spec`, run on every spec: documents and
  Specs built in Python alike.

Every problem of a document is reported at once, in one :class:`~prunespec.errors.SpecError`: those
of its YAML (see :mod:`prunespec.yaml_reader`), of its structure and of its methods, each located at
file:line:column where the spec came from a file.
"""

from __future__ import annotations

import difflib
import functools
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jsonschema
from pydantic import BaseModel, ValidationError

from .errors import Issue, SpecError
from .methods.base import MethodInfo
from .plugins import MethodRegistry, load_methods, provider_hint
from .schema_issues import schema_issues
from .spec import DocPath, Rule, Schedule, SourceMap, Spec, format_path
from .yaml_reader import MAX_DEPTH, MAX_NODES, REJECTED, Document, parse_yaml, read_spec_file

Methods = Mapping[str, MethodInfo]


def load_spec(
    source: str | os.PathLike[str] | Mapping[str, Any] | Spec, *, methods: MethodRegistry | None = None
) -> Spec:
    """Load and validate a spec from a YAML file path or a mapping, or check a :class:`Spec` built in
    Python against the methods (its options are then completed with their defaults).

    Raises :class:`~prunespec.errors.SpecError` listing every problem, each with file:line:column
    (for files) and document path.
    """
    methods = load_methods() if methods is None else methods
    if isinstance(source, Spec):
        issues = check_spec(source, source.source, methods)
        if issues:
            raise SpecError(_ordered(issues))
        return _with_defaults(source, methods)
    if isinstance(source, Mapping):
        return validate_document(source, SourceMap(), methods)
    return loads_spec(read_spec_file(source), filename=str(source), methods=methods)


def loads_spec(text: str, *, filename: str = "<string>", methods: MethodRegistry | None = None) -> Spec:
    """Load and validate a spec from YAML text (``filename`` is used in error locations)."""
    return _validate(parse_yaml(text, filename), methods)


def validate_document(document: Any, source: SourceMap, methods: MethodRegistry | None = None) -> Spec:
    """Check a plain document (a mapping, as from JSON) and build its Spec; one SpecError with every issue."""
    found = Document(document, source)
    _check_plain(document, found)
    return _validate(found, methods)


def _validate(document: Document, methods: MethodRegistry | None) -> Spec:
    methods = load_methods() if methods is None else methods
    data, source = document.data, document.source
    if data is None and not document.issues:
        raise SpecError(source.issue((), "the spec is empty", "start with `version: 1` and a list of `rules`"))
    structure: list[Issue] = []
    models: list[Issue] = []
    method_issues: list[Issue] = []
    spec = None
    if data is not None and data is not REJECTED:
        structure = [i for e in _spec_validator().iter_errors(data) for i in schema_issues(e, source)]
        try:
            spec = Spec.model_validate(data)
        except ValidationError as exc:
            models = pydantic_issues(exc, (), source, data)
        if spec is not None:
            method_issues = check_spec(spec, source, methods)
        elif isinstance(data, dict):
            rules = data.get("rules")
            facts = [_RuleFacts.from_raw(i, r) for i, r in enumerate(rules)] if isinstance(rules, list) else []
            method_issues = _method_issues([f for f in facts if f is not None], _raw_schedule(data), source, methods)
    issues = _combine(document, [structure, models, method_issues])
    if issues or spec is None:
        raise SpecError(issues)
    spec = _with_defaults(spec, methods)
    spec._source = source
    return spec


@functools.cache
def _spec_validator() -> jsonschema.Draft202012Validator:
    """The model-free schema: what the models say, without the installed methods."""
    return jsonschema.Draft202012Validator(Spec.model_json_schema())


def _combine(document: Document, stages: Sequence[list[Issue]]) -> list[Issue]:
    """The YAML stage's issues, then each later stage's at places no earlier stage reported (and not
    inside a value the YAML stage rejected); each stage says a thing once per place."""
    rejected = [format_path(p) for p in document.rejected]

    def inside_rejected(path: str) -> bool:
        return any(not r or path == r or path.startswith((r + ".", r + "[")) for r in rejected)

    out = list(document.issues)
    earlier: set[str] = set()
    for number, stage in enumerate(stages):
        here: set[str] = set()
        said: set[tuple[str, str]] = set()
        for issue in stage:
            if issue.path in earlier or inside_rejected(issue.path) or (issue.path, issue.message) in said:
                continue
            if number == 1 and issue.path in here:  # pydantic repeats itself for each branch of a union
                continue
            here.add(issue.path)
            said.add((issue.path, issue.message))
            out.append(issue)
        earlier |= here
    return _ordered(out)


def _ordered(issues: Iterable[Issue]) -> list[Issue]:
    return sorted(issues, key=lambda i: (i.line or 0, i.column or 0, i.path, i.message))


def _check_plain(data: Any, document: Document) -> None:
    """Limits and text checks for a document given as Python data (YAML gets them while parsing)."""
    stack: list[tuple[Any, DocPath]] = [(data, ())]
    nodes = 0
    while stack:
        value, path = stack.pop()
        nodes += 1
        if nodes > MAX_NODES or (len(path) >= MAX_DEPTH and isinstance(value, (Mapping, list, tuple))):
            limit = f"more than {MAX_NODES:,} values" if nodes > MAX_NODES else f"deeper than {MAX_DEPTH} levels"
            raise SpecError(document.source.issue(path, f"the spec has {limit}", "a pruning spec is far smaller"))
        if isinstance(value, str) and not _is_text(value):
            document.issues.append(
                document.source.issue(path, "the text has a lone surrogate, which is not a character", "remove it")
            )
            document.rejected.add(path)
        elif isinstance(value, Mapping):
            for key, item in value.items():
                if isinstance(key, str) and not _is_text(key):
                    document.issues.append(document.source.issue(path, "a key has a lone surrogate", "remove it"))
                    document.rejected.add(path)
                    break
                stack.append((item, (*path, str(key))))
        elif isinstance(value, (list, tuple)):
            stack.extend((item, (*path, i)) for i, item in enumerate(value))


def _is_text(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# --- method-aware checks -------------------------------------------------------------------------


@dataclass(frozen=True)
class _RuleFacts:
    """What the method-aware checks need to know of one rule, from a Rule or from raw data."""

    index: int
    method: str | None  # None: not a string (reported as such)
    has_amount: bool
    has_sparsity: bool
    sparsity: float | None
    amount_elsewhere: bool  # a misspelt or misplaced amount/sparsity key (reported as an unknown key)
    options: Mapping[str, Any] | None  # None: not a mapping (reported as such)
    scope_global: bool
    bounds: tuple[str, ...]  # which of max_sparsity, min_sparsity the rule gives
    schedule: Schedule | None
    schedule_given: bool
    owl: bool = False  # the rule gives `owl`

    @classmethod
    def from_rule(cls, index: int, rule: Rule) -> _RuleFacts:
        bounds = tuple(k for k in ("max_sparsity", "min_sparsity") if getattr(rule, k) is not None)
        return cls(
            index,
            rule.method,
            rule.amount is not None,
            rule.sparsity is not None,
            rule.sparsity,
            False,
            rule.options,
            rule.scope == "global",
            bounds,
            rule.schedule,
            rule.schedule is not None,
            rule.owl is not None,
        )

    @classmethod
    def from_raw(cls, index: int, raw: Any) -> _RuleFacts | None:
        if not isinstance(raw, dict):
            return None
        unknown = [key for key in raw if isinstance(key, str) and key not in Rule.model_fields]
        select = raw.get("select")
        elsewhere = any(difflib.get_close_matches(k, ["amount", "sparsity"], n=1, cutoff=0.6) for k in unknown) or (
            isinstance(select, dict) and ("amount" in select or "sparsity" in select)
        )
        sparsity = raw.get("sparsity")
        options = raw.get("options", {})
        schedule = raw.get("schedule")
        return cls(
            index,
            raw.get("method") if isinstance(raw.get("method"), str) else None,
            raw.get("amount") is not None,
            sparsity is not None,
            float(sparsity) if isinstance(sparsity, (int, float)) and not isinstance(sparsity, bool) else None,
            elsewhere,
            options if isinstance(options, dict) else None,
            raw.get("scope") == "global",
            tuple(k for k in ("max_sparsity", "min_sparsity") if raw.get(k) is not None),
            _valid(Schedule, schedule),
            schedule is not None,
            raw.get("owl") is not None,
        )


def _valid(model: type[Schedule], data: Any) -> Schedule | None:
    if not isinstance(data, dict):
        return None
    try:
        return model.model_validate(data)
    except ValidationError:
        return None


def _raw_schedule(data: dict[str, Any]) -> Schedule | None:
    return _valid(Schedule, data.get("schedule"))


def check_spec(spec: Spec, source: SourceMap, methods: Methods) -> list[Issue]:
    """Every method-aware problem of ``spec``: unknown methods, `amount`/`sparsity` given to a method
    that takes none (or missing for one that needs it), options the method does not accept, `scope:
    global` or `max_sparsity`/`min_sparsity` with a method that cannot do them, and schedules."""
    facts = [_RuleFacts.from_rule(i, rule) for i, rule in enumerate(spec.rules)]
    issues = _method_issues(facts, spec.schedule, source, methods)
    for index, rule in enumerate(spec.rules):
        if rule.name is not None and not _is_text(rule.name):
            issues.append(source.issue(("rules", index, "name"), "the text has a lone surrogate", "remove it"))
    return issues


def schedule_issues(spec: Spec, methods: Methods, source: SourceMap) -> list[Issue]:
    """The schedule problems of ``spec`` (part of :func:`check_spec`)."""
    facts = [_RuleFacts.from_rule(i, rule) for i, rule in enumerate(spec.rules)]
    return _schedule_issues(facts, spec.schedule, source, methods)


def _method_issues(
    facts: list[_RuleFacts], schedule: Schedule | None, source: SourceMap, methods: Methods
) -> list[Issue]:
    issues: list[Issue] = []
    for rule in facts:
        if rule.method is not None:
            issues += _rule_issues(rule, rule.method, source, methods)
    return issues + _schedule_issues(facts, schedule, source, methods)


def _rule_issues(rule: _RuleFacts, name: str, source: SourceMap, methods: Methods) -> list[Issue]:
    where: DocPath = ("rules", rule.index)
    info = methods.get(name)
    if info is None:
        close = difflib.get_close_matches(name, list(methods), n=3, cutoff=0.5)
        hint = provider_hint(name, methods if isinstance(methods, MethodRegistry) else None) or (
            f"did you mean {close[0]!r}?" if close else f"installed methods: {', '.join(sorted(methods))}"
        )
        return [source.issue((*where, "method"), f"unknown method {name!r}", hint)]
    issues = []
    options = rule.options or {}
    replaced = [key for key in info.method.amount_replaced_by if options.get(key) is not None]
    if info.takes_amount and not replaced:
        if not (rule.has_amount or rule.has_sparsity or rule.amount_elsewhere or rule.owl):
            issues.append(
                source.issue(
                    where,
                    f"method {name!r} needs `amount` or `sparsity`",
                    "amount: 0.3 prunes 30% of what is left; sparsity: 0.3 aims at 30% in total",
                )
            )
    elif replaced:
        for key, given in (("amount", rule.has_amount), ("sparsity", rule.has_sparsity)):
            if given:
                issues.append(
                    source.issue(
                        (*where, key),
                        f"method {name!r} with {' and '.join(replaced)} takes no `{key}`",
                        f"{' and '.join(replaced)} decide how much is pruned: remove `{key}`, or remove them",
                    )
                )
    else:
        for key, given in (("amount", rule.has_amount), ("sparsity", rule.has_sparsity)):
            if given:
                issues.append(
                    source.issue((*where, key), f"method {name!r} takes no `{key}`", "remove it: it decides alone")
                )
    if rule.options is not None:
        issues += _option_issues(info, rule.options, (*where, "options"), source)
    if rule.owl:
        return issues + _owl_issues(rule, info, replaced, source)
    if rule.scope_global and not info.supports_global:
        why = f"is {info.granularity}" if info.granularity != "unstructured" else ""
        why += (" and " if why else "") + ("takes no amount" if not info.takes_amount else "")
        issues.append(
            source.issue(
                (*where, "scope"),
                f"scope: global needs a method with an amount that scores what it prunes (or prunes entries); "
                f"{name!r} {why.removesuffix(' and ')}",
                "use l1_unstructured or random_unstructured, or scope: local",
            )
        )
    elif rule.bounds and rule.scope_global and not info.gives_scores:
        issues.append(
            source.issue(
                (*where, rule.bounds[0]),
                f"{' and '.join(rule.bounds)} need{'' if len(rule.bounds) > 1 else 's'} a method that scores "
                f"{info.unit}; {name!r} does not",
                "use l1_unstructured, or remove the bound",
            )
        )
    return issues


def owl_issues(index: int, rule: Rule, info: MethodInfo, source: SourceMap) -> list[Issue]:
    """What keeps ``rule`` (which gives `owl`) from allocating sparsity per block (part of
    :func:`check_spec`; the planner asks again for Specs it gets unchecked)."""
    facts = _RuleFacts.from_rule(index, rule)
    replaced = [key for key in info.method.amount_replaced_by if rule.options.get(key) is not None]
    return _owl_issues(facts, info, replaced, source) if facts.owl else []


def _owl_issues(rule: _RuleFacts, info: MethodInfo, replaced: Sequence[str], source: SourceMap) -> list[Issue]:
    """OWL turns the rule's `sparsity` into per-block sparsities of entries, each tensor on its own: it
    needs `sparsity`, scope: local, and a method that prunes entries by an amount."""
    where: DocPath = ("rules", rule.index)
    issues = []
    fix = "use wanda, sparsegpt or l1_unstructured (any method that prunes entries by an amount), or remove `owl`"
    if not info.takes_amount or info.unit != "entries":
        why = (
            "takes no amount (it decides alone how much it prunes)" if not info.takes_amount else f"prunes {info.unit}"
        )
        issues.append(
            source.issue((*where, "method"), f"owl allocates sparsities of entries per block; {info.name!r} {why}", fix)
        )
    elif replaced:
        issues.append(
            source.issue(
                (*where, "options", replaced[0]),
                f"owl allocates a sparsity per block; {info.name!r} with {' and '.join(replaced)} prunes a fixed "
                "pattern instead",
                f"remove {' and '.join(replaced)} (and give `sparsity`), or remove `owl`",
            )
        )
    elif rule.has_amount:
        issues.append(
            source.issue(
                (*where, "amount"),
                "owl needs `sparsity`, the target mean over blocks, not `amount`",
                "write `sparsity:` instead of `amount:`",
            )
        )
    elif not (rule.has_sparsity or rule.amount_elsewhere):
        issues.append(
            source.issue(
                (*where, "owl"),
                "owl needs `sparsity`: the target, the mean of the blocks' sparsities",
                f"add `sparsity: 0.5` (for example) to rules[{rule.index}]",
            )
        )
    if rule.scope_global:
        issues.append(
            source.issue(
                (*where, "scope"),
                "owl gives each block its own sparsity, each tensor pruned on its own; scope: global shares one "
                "budget across tensors",
                "use scope: local (the default) with owl, or remove `owl`",
            )
        )
    return issues


def _option_issues(info: MethodInfo, options: Mapping[str, Any], base: DocPath, source: SourceMap) -> list[Issue]:
    """The options of ``info``'s method: the JSON Schema of its options model words the problems; the
    model itself then checks what a schema cannot say."""
    found = [
        i
        for e in _options_validator(info.options_model).iter_errors(dict(options))
        for i in schema_issues(e, source, base)
    ]
    if found:
        return found
    try:
        info.validate_options(options)
    except ValidationError as exc:
        return pydantic_issues(exc, base, source, dict(options))
    return []


@functools.cache
def _options_validator(model: type[BaseModel]) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(model.model_json_schema())


def _schedule_issues(
    facts: list[_RuleFacts], spec_schedule: Schedule | None, source: SourceMap, methods: Methods
) -> list[Issue]:
    """A scheduled rule aims at a final `sparsity`, at least the schedule's `initial`; all schedules
    count in one unit (the training loop passes one t)."""
    issues = []
    units = {s.unit for s in [spec_schedule, *(f.schedule for f in facts)] if s is not None}
    if len(units) > 1:
        mixed: DocPath = ("schedule",) if spec_schedule else ()
        issues.append(source.issue(mixed, "schedules mix units: " + " and ".join(sorted(units))))
    for rule in facts:
        info = methods.get(rule.method) if rule.method is not None else None
        if rule.schedule_given and rule.schedule is None:
            continue  # the rule's own schedule is invalid: reported as such
        schedule = rule.schedule or spec_schedule
        if schedule is None or (rule.schedule is None and (info is None or not info.takes_amount)):
            continue  # a spec-wide schedule leaves methods without an amount alone
        where: DocPath = ("rules", rule.index, "schedule") if rule.schedule else ("schedule",)
        if not rule.has_sparsity:
            issues.append(
                source.issue(
                    ("rules", rule.index, "amount") if rule.has_amount else ("rules", rule.index),
                    "a scheduled rule needs `sparsity` (the final sparsity), not `amount`",
                    f"write `sparsity:` instead; the schedule at {format_path(where)} raises it step by step",
                )
            )
        elif rule.sparsity is not None and schedule.initial > rule.sparsity:
            issues.append(
                source.issue(
                    (*where, "initial"),
                    f"initial sparsity {schedule.initial:g} is above the final `sparsity` {rule.sparsity:g} "
                    f"of rules[{rule.index}]",
                    "masks only grow: make `initial` <= `sparsity`",
                )
            )
    return issues


def _with_defaults(spec: Spec, methods: Methods) -> Spec:
    """``spec`` with each rule's options completed with the method's defaults."""
    rules = [
        rule.model_copy(update={"options": methods[rule.method].validate_options(rule.options)}) for rule in spec.rules
    ]
    out = spec.model_copy(update={"rules": rules})
    out._source = spec.source
    return out


_PATTERN_ERRORS = {"name_pattern", "type_entry"}  # ours: the hint is in the error's context


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
        elif err["type"] in _PATTERN_ERRORS:
            issues.append(source.issue(path, err["msg"], str(err.get("ctx", {}).get("hint") or "") or None))
        else:
            message = err["msg"].removeprefix("Value error, ")
            scalar = not isinstance(err["input"], (dict, list))
            issues.append(source.issue(path, f"{message} (got {err['input']!r})" if scalar else message))
    return issues
