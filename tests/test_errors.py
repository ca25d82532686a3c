"""Bad input gets one clear error naming where and what would be right; the model and files stay as they were.

Every case writes a spec to a file, runs it through ``load_spec``/``apply`` and checks: the exception type,
the exact number of issues, file:line:column of the offending token (computed from the text written), the
document path, the message and hint, and that neither the model nor the files on disk changed.
"""

from __future__ import annotations

import multiprocessing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ModelState
from torch import nn

import prunespec
from prunespec.errors import Issue

BASE = """\
version: 1
rules:
  - name: convs
    select: {names: [conv1]}
    method: l1_unstructured
    amount: 0.3
"""


def _edit(old: str, new: str, text: str = BASE) -> str:
    assert old in text, f"{old!r} not in the base spec"
    return text.replace(old, new, 1)


LN = _edit("method: l1_unstructured", "method: ln_structured")


def position(text: str, line_has: str, token: str | None = None, nth: int = 1) -> tuple[int, int]:
    """1-based (line, column) of ``token`` on the ``nth`` line of ``text`` containing ``line_has``."""
    token = line_has if token is None else token
    lines = [(number, line) for number, line in enumerate(text.splitlines(), start=1) if line_has in line]
    assert len(lines) >= nth, f"{line_has!r} is not {nth} times in the text"
    number, line = lines[nth - 1]
    return number, line.index(token) + 1


def files_in(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def only_spec_issue(text: str, tmp_path: Path, methods: prunespec.MethodRegistry) -> Issue:
    """Load ``text`` from a file; it must fail with exactly one issue, which is returned."""
    spec_file = tmp_path / "prune.yaml"
    spec_file.write_text(text, encoding="utf-8")
    with pytest.raises(prunespec.SpecError) as info:
        prunespec.load_spec(spec_file, methods=methods)
    (issue,) = info.value.issues
    return issue


@dataclass
class Case:
    text: str
    error: type[prunespec.PrunespecError]
    count: int  # exact number of issues
    path: str  # the path of the issue under test (exactly one issue has it)
    at: tuple[Any, ...]  # position() arguments locating the offending token: (text on its line, token, nth)
    message: list[str]
    hint: list[str] = field(default_factory=list)


CASES: dict[str, Case] = {
    # --- YAML syntax ---------------------------------------------------------------------------
    "unclosed-bracket": Case(
        _edit("{names: [conv1]}", "{names: [conv1}"),
        prunespec.SpecError,
        1,
        "",
        ("select: {names: [conv1}", "}"),
        ["invalid YAML", "expected ',' or ']'"],
    ),
    "bad-indentation": Case(
        _edit("    amount: 0.3", "   amount: 0.3"),
        prunespec.SpecError,
        1,
        "",
        ("amount: 0.3", "amount"),
        ["invalid YAML"],
    ),
    "duplicate-key": Case(
        BASE + "    amount: 0.4\n",
        prunespec.SpecError,
        1,
        "",
        ("amount: 0.4", "amount"),
        ["duplicate key", "amount"],
    ),
    "duplicate-top-level-key": Case(
        BASE + "version: 1\n",
        prunespec.SpecError,
        1,
        "",
        ("version: 1", "version", 2),
        ["duplicate key", "version"],
    ),
    # --- keys --------------------------------------------------------------------------------
    "unknown-top-level-key": Case(
        BASE + "finalise: true\n",
        prunespec.SpecError,
        1,
        "finalise",
        ("finalise: true", "finalise"),
        ["unknown key 'finalise'"],
        ["did you mean 'finalize'?"],
    ),
    "unknown-rule-key": Case(
        _edit("  - name: convs", "  - nmae: convs"),
        prunespec.SpecError,
        1,
        "rules[0].nmae",
        ("nmae: convs", "nmae"),
        ["unknown key 'nmae'"],
        ["did you mean 'name'?"],
    ),
    # `amout` is unknown, and so the rule has no amount: one issue, the typo with its fix.
    "amout-typo": Case(
        _edit("amount: 0.3", "amout: 0.3"),
        prunespec.SpecError,
        1,
        "rules[0].amout",
        ("amout: 0.3", "amout"),
        ["unknown key 'amout'"],
        ["did you mean 'amount'?"],
    ),
    "unknown-select-key": Case(
        _edit("{names: [conv1]}", "{names: [conv1], exclud: [fc1]}"),
        prunespec.SpecError,
        1,
        "rules[0].select.exclud",
        ("exclud:", "exclud"),
        ["unknown key 'exclud'"],
        ["did you mean 'exclude'?"],
    ),
    # --- types -------------------------------------------------------------------------------
    "amount-string": Case(
        _edit("amount: 0.3", 'amount: "half"'),
        prunespec.SpecError,
        1,
        "rules[0].amount",
        ('"half"',),
        ["got string 'half'", "a number in [0, 1]", "an integer >= 0"],
        ["fraction", "count"],
    ),
    "params-string": Case(
        _edit("{names: [conv1]}", "{names: [conv1], params: weight}"),
        prunespec.SpecError,
        1,
        "rules[0].select.params",
        ("params: weight", "weight"),
        ["expected a list of strings", "got string 'weight'"],
    ),
    "seed-negative": Case(
        _edit("version: 1\n", "version: 1\nseed: -1\n"),
        prunespec.SpecError,
        1,
        "seed",
        ("seed: -1", "-1"),
        ["an integer in [0, ", "got -1"],
    ),
    "finalize-string": Case(
        BASE + 'finalize: "yes"\n',
        prunespec.SpecError,
        1,
        "finalize",
        ("finalize:", '"yes"'),
        ["true or false", "got string 'yes'"],
    ),
    "optional-string": Case(
        BASE + "    optional: 'yes'\n",
        prunespec.SpecError,
        1,
        "rules[0].optional",
        ("optional:", "'yes'"),
        ["true or false", "got string 'yes'"],
    ),
    # --- amounts -----------------------------------------------------------------------------
    "amount-above-one": Case(
        _edit("amount: 0.3", "amount: 1.5"),
        prunespec.SpecError,
        1,
        "rules[0].amount",
        ("amount: 1.5", "1.5"),
        ["got 1.5", "a number in [0, 1]"],
        ["a float in [0, 1] is a fraction"],
    ),
    "amount-negative": Case(
        _edit("amount: 0.3", "amount: -1"),
        prunespec.SpecError,
        1,
        "rules[0].amount",
        ("amount: -1", "-1"),
        ["got -1", "an integer >= 0"],
        ["an integer is a count"],
    ),
    "amount-bool": Case(
        _edit("amount: 0.3", "amount: true"),
        prunespec.SpecError,
        1,
        "rules[0].amount",
        ("amount: true", "true"),
        ["got boolean True"],
        ["an integer is a count"],
    ),
    "amount-inf": Case(
        _edit("amount: 0.3", "amount: .inf"),
        prunespec.SpecError,
        1,
        "rules[0].amount",
        ("amount: .inf", ".inf"),
        ["got inf"],
    ),
    "amount-and-sparsity": Case(
        BASE + "    sparsity: 0.5\n",
        prunespec.SpecError,
        1,
        "rules[0]",
        ("- name: convs", "name"),
        ["`amount` or `sparsity`, not both"],
    ),
    "neither-amount-nor-sparsity": Case(
        _edit("    amount: 0.3\n", ""),
        prunespec.SpecError,
        1,
        "rules[0]",
        ("- name: convs", "name"),
        ["'l1_unstructured' needs `amount` or `sparsity`"],
        ["amount: 0.3", "sparsity: 0.3"],
    ),
    "identity-with-amount": Case(
        _edit("method: l1_unstructured", "method: identity"),
        prunespec.SpecError,
        1,
        "rules[0].amount",
        ("amount: 0.3", "0.3"),
        ["'identity' takes no `amount`"],
        ["remove it"],
    ),
    "count-larger-than-tensor": Case(
        _edit("amount: 0.3", "amount: 7", _edit("{names: [conv1]}", "{names: [conv1], params: [bias]}")),
        prunespec.PlanError,
        1,
        "rules[0].amount",
        ("amount: 7", "7"),
        ["tensor conv1.bias", "amount=7", "6 entries"],
        ["<= 6"],
    ),
    "channel-count-larger-than-dim": Case(
        _edit("amount: 0.3", "amount: 7", LN) + "    options: {n: 1, dim: 0}\n",
        prunespec.PlanError,
        1,
        "rules[0].amount",
        ("amount: 7", "7"),
        ["tensor conv1.weight", "amount=7", "6 channels"],
        ["<= 6"],
    ),
    "sparsity-bool": Case(
        _edit("amount: 0.3", "sparsity: true"),
        prunespec.SpecError,
        1,
        "rules[0].sparsity",
        ("sparsity: true", "true"),
        ["got boolean True"],
        ["final fraction"],
    ),
    # --- methods and options -----------------------------------------------------------------
    "unknown-method": Case(
        _edit("method: l1_unstructured", "method: l1_unstrucured"),
        prunespec.SpecError,
        1,
        "rules[0].method",
        ("l1_unstrucured",),
        ["unknown method 'l1_unstrucured'"],
        ["did you mean 'l1_unstructured'?"],
    ),
    "unknown-option": Case(
        LN + "    options: {n: 2, dim: 0, p: 3}\n",
        prunespec.SpecError,
        1,
        "rules[0].options.p",
        ("options:", "p: 3"),
        ["unknown key 'p'"],
        ["allowed keys: dim, n"],
    ),
    "missing-dim": Case(
        LN + "    options: {n: 2}\n",
        prunespec.SpecError,
        1,
        "rules[0].options",
        ("options:", "{n: 2}"),
        ["missing required key 'dim'"],
    ),
    "option-wrong-type": Case(
        LN + "    options: {n: two, dim: 0}\n",
        prunespec.SpecError,
        1,
        "rules[0].options.n",
        ("options:", "two"),
        ["got string 'two'", "'fro'"],
    ),
    # --- documents ---------------------------------------------------------------------------
    "version-2": Case(
        _edit("version: 1", "version: 2"),
        prunespec.SpecError,
        1,
        "version",
        ("version: 2", "2"),
        ["must be 1", "got 2"],
    ),
    "missing-version": Case(
        _edit("version: 1\n", ""),
        prunespec.SpecError,
        1,
        "",
        ("rules:", "rules"),
        ["missing required key 'version'"],
    ),
    "empty-rules": Case(
        "version: 1\nrules: []\n",
        prunespec.SpecError,
        1,
        "rules",
        ("rules: []", "[]"),
        ["must not be empty"],
    ),
    "select-without-types-or-names": Case(
        _edit("{names: [conv1]}", "{params: [weight]}"),
        prunespec.SpecError,
        1,
        "rules[0].select",
        ("select:", "{params"),
        ["give `types`, `names` or `preset`"],
    ),
    "top-level-list": Case(
        "- version: 1\n- rules: []\n",
        prunespec.SpecError,
        1,
        "",
        ("- version: 1", "-"),
        ["expected a mapping", "got a list"],
    ),
    # --- selectors (checked against the model) -----------------------------------------------
    "names-entry-matches-nothing": Case(
        _edit("{names: [conv1]}", "{names: [conv1, conv9]}"),
        prunespec.PlanError,
        1,
        "rules[0].select.names[1]",
        ("select:", "conv9"),
        ["names entry 'conv9' matches no module"],
        ["nearest:", "conv1", "conv2"],
    ),
    "types-entry-matches-nothing": Case(
        _edit("{names: [conv1]}", "{types: [Conv3d]}"),
        prunespec.PlanError,
        1,
        "rules[0].select.types[0]",
        ("select:", "Conv3d"),
        ["types entry 'Conv3d' matches no module"],
        ["nearest: Conv2d"],
    ),
    "module-prefix": Case(
        _edit("{names: [conv1]}", "{names: [module.conv1]}"),
        prunespec.PlanError,
        1,
        "rules[0].select.names[0]",
        ("select:", "module.conv1"),
        ["names entry 'module.conv1' matches no module"],
        ["drop the `module.` prefix"],
    ),
    "param-missing": Case(
        _edit("{names: [conv1]}", "{names: [conv1], params: [nonexistent]}"),
        prunespec.PlanError,
        1,
        "rules[0].select",
        ("select:", "{names"),
        ["rules[0] (convs) selects no tensor", "'nonexistent'"],
        ["optional: true"],
    ),
    "structured-on-1d-bias": Case(
        _edit("{names: [conv1]}", "{names: [conv1], params: [bias]}", LN) + "    options: {n: 2, dim: 0}\n",
        prunespec.PlanError,
        1,
        "rules[0]",
        ("- name: convs", "name"),
        ["tensor conv1.bias", "2 or more dims", "[6]"],
    ),
    "global-structured": Case(
        _edit("method: l1_unstructured", "method: random_structured") + "    scope: global\n    options: {dim: 0}\n",
        prunespec.SpecError,
        1,
        "rules[0].scope",
        ("scope: global", "global"),
        ["scope: global needs a method", "'random_structured' is structured"],
        ["l1_unstructured", "scope: local"],
    ),
    # --- method capabilities: decided without a model (prunespec validate rejects them) ----------
    "global-bounds-without-scores": Case(
        _edit("method: l1_unstructured", "method: random_unstructured") + "    scope: global\n    max_sparsity: 0.5\n",
        prunespec.SpecError,
        1,
        "rules[0].max_sparsity",
        ("max_sparsity: 0.5", "0.5"),
        ["max_sparsity needs a method that scores entries", "'random_unstructured' does not"],
        ["l1_unstructured"],
    ),
    "regex-does-not-compile": Case(
        _edit("{names: [conv1]}", '{names: [conv1, "re:fc("]}'),
        prunespec.SpecError,
        1,
        "rules[0].select.names[1]",
        ("select:", '"re:fc("'),
        ["invalid regular expression 'fc('"],
        ["brackets"],
    ),
    "regex-backtracks": Case(
        _edit("{names: [conv1]}", '{names: ["re:(.*.*)*X"]}'),
        prunespec.SpecError,
        1,
        "rules[0].select.names[0]",
        ("select:", '"re:'),
        ["'(.*.*)*X'", "exponential time"],
        ["glob", "regex without nested repeats"],
    ),
    "exclude-backreference": Case(
        _edit("{names: [conv1]}", '{names: [conv1], exclude: ["re:(c)\\\\1"]}'),
        prunespec.SpecError,
        1,
        "rules[0].select.exclude[0]",
        ("select:", '"re:'),
        ["backreference"],
        ["glob"],
    ),
    "types-entry-malformed": Case(
        _edit("{names: [conv1]}", "{types: [torch..nn]}"),
        prunespec.SpecError,
        1,
        "rules[0].select.types[0]",
        ("select:", "torch..nn"),
        ["a types entry is a class name"],
        ["identifiers joined by dots"],
    ),
    # --- keys at the wrong level ---------------------------------------------------------------
    "params-directly-under-rule": Case(
        BASE + "    params: [bias]\n",
        prunespec.SpecError,
        1,
        "rules[0].params",
        ("params: [bias]", "params"),
        ["unknown key 'params'"],
        ["did you mean select.params?"],
    ),
    # the rule then has no amount: the misplaced key says it all
    "amount-under-select": Case(
        _edit("    amount: 0.3\n", "", _edit("{names: [conv1]}", "{names: [conv1], amount: 0.3}")),
        prunespec.SpecError,
        1,
        "rules[0].select.amount",
        ("select:", "amount"),
        ["unknown key 'amount'"],
        ["belongs to the rule, next to `select`"],
    ),
    "method-at-top-level": Case(
        BASE + "method: identity\n",
        prunespec.SpecError,
        1,
        "method",
        ("method: identity", "method"),
        ["unknown key 'method'"],
        ["belongs in a rule", "rules:"],
    ),
    "seed-in-a-rule": Case(
        BASE + "    seed: 3\n",
        prunespec.SpecError,
        1,
        "rules[0].seed",
        ("seed: 3", "seed"),
        ["unknown key 'seed'"],
        ["top-level key of the spec"],
    ),
    # --- selections that are empty for a reason other than params -------------------------------
    "exclude-removes-everything": Case(
        _edit("{names: [conv1]}", "{types: [Conv2d], exclude: [conv1, conv2]}"),
        prunespec.PlanError,
        1,
        "rules[0].select",
        ("select:", "{types"),
        ["rules[0] (convs) selects no module", "`exclude` removed every module the rule selected (conv1, conv2)"],
        ["check `exclude`", "optional: true"],
    ),
    "types-and-names-disjoint": Case(
        _edit("{names: [conv1]}", "{types: [Conv2d], names: [fc1]}"),
        prunespec.PlanError,
        1,
        "rules[0].select",
        ("select:", "{types"),
        ["no module matches `types` and `names` at once", "types match conv1, conv2", "names match fc1"],
        ["split the rule"],
    ),
    "params-typo-when-nothing-matches": Case(
        _edit("{names: [conv1]}", "{names: [conv1], params: [wieght]}"),
        prunespec.PlanError,
        1,
        "rules[0].select",
        ("select:", "{names"),
        ["selects no tensor", "'wieght'"],
        ["did you mean 'weight'?"],
    ),
    # --- tags: YAML never builds objects --------------------------------------------------------
    "custom-tag": Case(
        _edit("amount: 0.3", "amount: !foo 0.3"),
        prunespec.SpecError,
        1,
        "rules[0].amount",
        ("amount:", "!foo"),
        ["YAML tag !foo is not allowed"],
        ["plain data"],
    ),
}


def the_issue(exc: prunespec.SpecError | prunespec.PlanError, path: str) -> Issue:
    found = [issue for issue in exc.issues if issue.path == path]
    assert len(found) == 1, f"expected one issue at {path!r}, got {exc.issues}"
    return found[0]


def check_error(exc: Any, case: Case, spec_file: Path) -> None:
    __tracebackhide__ = True
    assert type(exc) is case.error, f"{type(exc).__name__}: {exc}"
    assert len(exc.issues) == case.count, "\n".join(map(str, exc.issues))
    issue = the_issue(exc, case.path)
    assert issue.file == str(spec_file)
    line_col = position(case.text, *case.at)
    assert (issue.line, issue.column) == line_col, f"{issue} should be at {line_col}"
    assert f"{spec_file}:{line_col[0]}:{line_col[1]}" in str(exc)
    for part in case.message:
        assert part in issue.message, f"{part!r} not in {issue.message!r}"
    for part in case.hint:
        assert issue.hint is not None and part in issue.hint, f"{part!r} not in hint {issue.hint!r}"
    if case.path:
        assert f"{case.path}:" in str(exc)
    issues = [(i.line or 0, i.column or 0) for i in exc.issues]
    assert issues == sorted(issues), "issues are not sorted by position"


@pytest.mark.parametrize("name", list(CASES))
def test_apply_bad_spec(name: str, lenet: nn.Module, methods: prunespec.MethodRegistry, tmp_path: Path) -> None:
    case = CASES[name]
    spec_file = tmp_path / "prune.yaml"
    spec_file.write_text(case.text, encoding="utf-8")
    files = files_in(tmp_path)
    before = ModelState(lenet)
    with pytest.raises(case.error) as info:
        prunespec.apply(lenet, spec_file, methods=methods)
    check_error(info.value, case, spec_file)
    before.assert_unchanged(lenet)
    assert files_in(tmp_path) == files


@pytest.mark.parametrize("name", [name for name, case in CASES.items() if case.error is prunespec.SpecError])
def test_load_spec_reports_the_same(name: str, methods: prunespec.MethodRegistry, tmp_path: Path) -> None:
    case = CASES[name]
    spec_file = tmp_path / "prune.yaml"
    spec_file.write_text(case.text, encoding="utf-8")
    with pytest.raises(prunespec.SpecError) as info:
        prunespec.load_spec(spec_file, methods=methods)
    check_error(info.value, case, spec_file)


def test_the_base_spec_is_valid(lenet: nn.Module, methods: prunespec.MethodRegistry, tmp_path: Path) -> None:
    """The cases above are one edit away from a spec that works."""
    spec_file = tmp_path / "prune.yaml"
    spec_file.write_text(BASE, encoding="utf-8")
    report = prunespec.apply(lenet, spec_file, methods=methods)
    assert list(report.tensors) == ["conv1.weight"]
    ln = tmp_path / "ln.yaml"
    ln.write_text(LN + "    options: {n: 2, dim: 0}\n", encoding="utf-8")
    assert prunespec.load_spec(ln, methods=methods).rules[0].options == {"n": 2, "dim": 0}


# --- files that are not a spec -----------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "# only a comment\n"])
def test_empty_file(text: str, lenet: nn.Module, methods: prunespec.MethodRegistry, tmp_path: Path) -> None:
    spec_file = tmp_path / "prune.yaml"
    spec_file.write_text(text, encoding="utf-8")
    before = ModelState(lenet)
    with pytest.raises(prunespec.SpecError) as info:
        prunespec.apply(lenet, spec_file, methods=methods)
    (issue,) = info.value.issues
    assert issue.file == str(spec_file)
    assert "empty" in issue.message
    assert issue.hint is not None and "version: 1" in issue.hint
    assert str(info.value).startswith(f"{spec_file}")
    before.assert_unchanged(lenet)


def test_missing_file(methods: prunespec.MethodRegistry, tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(prunespec.SpecError) as info:
        prunespec.load_spec(missing, methods=methods)
    (issue,) = info.value.issues
    assert issue.file == str(missing)
    assert "cannot read" in issue.message
    assert not missing.exists()


# --- YAML never executes code -------------------------------------------------------------------


@pytest.mark.parametrize(
    "tagged",
    [
        "!!python/object/apply:os.system ['touch {marker}']",
        "!!python/object/apply:subprocess.call [['touch', '{marker}']]",
        "!!python/object/new:os.system ['touch {marker}']",
    ],
)
@pytest.mark.parametrize("where", ["rules", "amount"])
def test_python_tags_are_rejected_and_never_run(
    tagged: str, where: str, lenet: nn.Module, methods: prunespec.MethodRegistry, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    value = tagged.format(marker=marker)
    if where == "rules":
        text, path = f"version: 1\nrules: {value}\n", "rules"
    else:
        text, path = _edit("amount: 0.3", f"amount: {value}"), "rules[0].amount"
    spec_file = tmp_path / "prune.yaml"
    spec_file.write_text(text, encoding="utf-8")
    before = ModelState(lenet)
    for run in (
        lambda: prunespec.load_spec(spec_file, methods=methods),
        lambda: prunespec.apply(lenet, spec_file, methods=methods),
    ):
        with pytest.raises(prunespec.SpecError) as info:
            run()
        (issue,) = info.value.issues
        assert issue.path == path
        assert (issue.line, issue.column) == position(text, "!!python", "!!python")
        assert "!!python/object" in issue.message and "not allowed" in issue.message
        assert issue.hint is not None and "plain data" in issue.hint
    assert not marker.exists(), "the YAML ran code"
    before.assert_unchanged(lenet)


@pytest.mark.parametrize("value", ["!!binary Y29udnM=", "!!set {a}", "2024-01-01"])
def test_non_plain_values_are_rejected_where_they_are(
    value: str, methods: prunespec.MethodRegistry, tmp_path: Path
) -> None:
    text = _edit("name: convs", f"name: {value}")
    issue = only_spec_issue(text, tmp_path, methods)
    assert issue.path == "rules[0].name"
    assert (issue.line, issue.column) == position(text, "name:", value)


def test_unquoted_date_message_says_to_quote(methods: prunespec.MethodRegistry, tmp_path: Path) -> None:
    spec_file = tmp_path / "prune.yaml"
    spec_file.write_text(_edit("name: convs", "name: 2024-01-01"), encoding="utf-8")
    with pytest.raises(prunespec.SpecError) as info:
        prunespec.load_spec(spec_file, methods=methods)
    (issue,) = info.value.issues
    assert "datetime" not in issue.message
    assert "quote" in f"{issue.message} {issue.hint}"


def _load_in_child(text: str, queue: Any) -> None:
    try:
        prunespec.loads_spec(text, methods=prunespec.load_methods(builtins_only=True))
    except prunespec.SpecError as exc:
        queue.put(f"SpecError: {exc}")
    except Exception as exc:
        queue.put(f"{type(exc).__name__}: {exc}")
    else:
        queue.put("loaded")


def test_alias_bomb_is_rejected_promptly() -> None:
    lines = ["version: 1", "a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    lines.append("rules: []")
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_load_in_child, args=("\n".join(lines) + "\n", queue))
    child.start()
    child.join(timeout=2)
    if child.is_alive():
        child.kill()
        child.join()
        pytest.fail("loading a 10-line spec with nested aliases did not finish in 2 s")
    assert queue.get(timeout=1).startswith("SpecError")


# --- several problems, one error ----------------------------------------------------------------


def test_all_problems_of_a_document_in_one_error_sorted_by_line(
    lenet: nn.Module, methods: prunespec.MethodRegistry, tmp_path: Path
) -> None:
    text = """\
version: 1
seed: -1
rules:
  - select: {names: [conv1]}
    method: l1_unstrucured
    amount: 0.3
  - select: {names: [conv2]}
    method: l1_unstructured
    amount: 1.5
  - select: {names: [fc1], params: weight}
    method: ln_structured
    amount: 0.5
    options: {n: 2, dim: 0, p: 1}
finalize: "no"
"""
    spec_file = tmp_path / "prune.yaml"
    spec_file.write_text(text, encoding="utf-8")
    before = ModelState(lenet)
    with pytest.raises(prunespec.SpecError) as info:
        prunespec.apply(lenet, spec_file, methods=methods)
    exc = info.value
    expected = [
        ("seed", position(text, "seed: -1", "-1")),
        ("rules[0].method", position(text, "l1_unstrucured")),
        ("rules[1].amount", position(text, "amount: 1.5", "1.5")),
        ("rules[2].select.params", position(text, "params: weight", "weight")),
        ("rules[2].options.p", position(text, "options:", "p: 1")),
        ("finalize", position(text, "finalize:", '"no"')),
    ]
    assert [(i.path, (i.line, i.column)) for i in exc.issues] == expected
    assert str(exc).startswith("6 problems:\n")
    for path, (line, col) in expected:
        assert f"{spec_file}:{line}:{col}: {path}: " in str(exc)
    before.assert_unchanged(lenet)


def test_all_plan_problems_in_one_error(lenet: nn.Module, methods: prunespec.MethodRegistry, tmp_path: Path) -> None:
    text = """\
version: 1
rules:
  - name: a
    select: {names: [conv9]}
    method: l1_unstructured
    amount: 0.3
  - name: b
    select: {names: [conv1], params: [bias]}
    method: l1_unstructured
    amount: 7
  - name: c
    select: {types: [Conv3d]}
    method: l1_unstructured
    amount: 0.3
"""
    spec_file = tmp_path / "prune.yaml"
    spec_file.write_text(text, encoding="utf-8")
    before = ModelState(lenet)
    with pytest.raises(prunespec.PlanError) as info:
        prunespec.apply(lenet, spec_file, methods=methods)
    exc = info.value
    assert [(i.path, (i.line, i.column)) for i in exc.issues] == [
        ("rules[0].select.names[0]", position(text, "conv9")),
        ("rules[1].amount", position(text, "amount: 7", "7")),
        ("rules[2].select.types[0]", position(text, "Conv3d")),
    ]
    assert str(exc).startswith("3 problems:\n")
    before.assert_unchanged(lenet)


# --- selectors: optional rules and warnings -----------------------------------------------------


@pytest.mark.parametrize(
    "select",
    [
        "{names: [conv1, conv9]}",
        "{types: [Conv3d]}",
        "{names: [conv1], params: [nonexistent]}",
    ],
)
def test_optional_rules_may_match_nothing(
    select: str, lenet: nn.Module, methods: prunespec.MethodRegistry, tmp_path: Path
) -> None:
    strict = _edit("{names: [conv1]}", select)
    spec_file = tmp_path / "prune.yaml"
    spec_file.write_text(strict, encoding="utf-8")
    with pytest.raises(prunespec.PlanError):
        prunespec.plan(lenet, spec_file, methods=methods)
    spec_file.write_text(strict + "    optional: true\n", encoding="utf-8")
    plan = prunespec.plan(lenet, spec_file, methods=methods)
    expected = [] if "Conv3d" in select or "[nonexistent]" in select else ["conv1.weight"]
    assert [step.tensor.name for step in plan.steps] == expected
    prunespec.apply(lenet, spec_file, methods=methods)
    assert torch.nn.utils.prune.is_pruned(lenet) == bool(expected)


def test_params_entry_matching_nothing_is_reported(
    lenet: nn.Module, methods: prunespec.MethodRegistry, tmp_path: Path
) -> None:
    text = _edit("{names: [conv1]}", "{names: [conv1], params: [weight, bais]}")
    spec_file = tmp_path / "prune.yaml"
    spec_file.write_text(text, encoding="utf-8")
    with pytest.raises(prunespec.PlanError) as info:
        prunespec.plan(lenet, spec_file, methods=methods)
    (issue,) = info.value.issues
    assert issue.path == "rules[0].select.params[1]"
    assert (issue.line, issue.column) == position(text, "params:", "bais")
    assert issue.hint is not None and "bias" in issue.hint


def test_exclude_matching_nothing_is_a_warning(
    lenet: nn.Module, methods: prunespec.MethodRegistry, tmp_path: Path
) -> None:
    spec_file = tmp_path / "prune.yaml"
    spec_file.write_text(_edit("{names: [conv1]}", "{types: [Conv2d], exclude: [conv7]}"), encoding="utf-8")
    plan = prunespec.plan(lenet, spec_file, methods=methods)
    assert [step.tensor.name for step in plan.steps] == ["conv1.weight", "conv2.weight"]
    assert len(plan.warnings) == 1
    assert "exclude entry 'conv7' matches no module" in plan.warnings[0]
    assert "rules[0] (convs)" in plan.warnings[0]


# --- structured `dim` ---------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [4, -5])
def test_structured_dim_out_of_range(
    dim: int, lenet: nn.Module, methods: prunespec.MethodRegistry, tmp_path: Path
) -> None:
    text = LN + f"    options: {{n: 2, dim: {dim}}}\n"
    spec_file = tmp_path / "prune.yaml"
    spec_file.write_text(text, encoding="utf-8")
    before = ModelState(lenet)
    with pytest.raises(prunespec.PlanError) as info:
        prunespec.apply(lenet, spec_file, methods=methods)
    (issue,) = info.value.issues
    assert issue.path.startswith("rules[0]")
    assert issue.file == str(spec_file)
    assert f"dim={dim} is out of range" in issue.message
    assert "conv1.weight" in issue.message and "[6, 1, 3, 3]" in issue.message
    assert "[-4, 3]" in issue.message
    before.assert_unchanged(lenet)
    # dim: 3 (the last one) is fine
    spec_file.write_text(LN + "    options: {n: 2, dim: 3}\n", encoding="utf-8")
    assert len(prunespec.plan(lenet, spec_file, methods=methods).steps) == 1


def test_structured_dim_out_of_range_points_at_dim(
    lenet: nn.Module, methods: prunespec.MethodRegistry, tmp_path: Path
) -> None:
    text = LN + "    options: {n: 2, dim: 4}\n"
    spec_file = tmp_path / "prune.yaml"
    spec_file.write_text(text, encoding="utf-8")
    with pytest.raises(prunespec.PlanError) as info:
        prunespec.plan(lenet, spec_file, methods=methods)
    (issue,) = info.value.issues
    assert issue.path == "rules[0].options.dim"
    assert (issue.line, issue.column) == position(text, "dim: 4", "4")


# --- specs given as mappings ----------------------------------------------------------------------


def test_mapping_specs_still_get_paths(lenet: nn.Module, methods: prunespec.MethodRegistry) -> None:
    spec = {
        "version": 1,
        "rules": [
            {"select": {"names": ["conv1"]}, "method": "l1_unstructured", "amount": 0.3},
            {"select": {"names": ["conv2"]}, "method": "l1_unstrucured", "amount": 1.5, "amout": 1},
        ],
    }
    before = ModelState(lenet)
    for run in (
        lambda: prunespec.load_spec(spec, methods=methods),
        lambda: prunespec.apply(lenet, spec, methods=methods),
    ):
        with pytest.raises(prunespec.SpecError) as info:
            run()
        issues = {issue.path: issue for issue in info.value.issues}
        assert set(issues) == {"rules[1].amount", "rules[1].method", "rules[1].amout"}
        assert all(i.file is None and i.line is None and i.column is None for i in issues.values())
        assert issues["rules[1].method"].hint == "did you mean 'l1_unstructured'?"
        assert issues["rules[1].amout"].hint == "did you mean 'amount'?"
        assert "rules[1].method: unknown method 'l1_unstrucured'" in str(info.value)
    before.assert_unchanged(lenet)


def test_mapping_plan_errors_get_paths(lenet: nn.Module, methods: prunespec.MethodRegistry) -> None:
    spec = {"version": 1, "rules": [{"select": {"names": ["conv1"], "params": ["bias"]}, "method": "l1_unstructured"}]}
    spec["rules"][0]["amount"] = 7
    before = ModelState(lenet)
    with pytest.raises(prunespec.PlanError) as info:
        prunespec.apply(lenet, spec, methods=methods)
    (issue,) = info.value.issues
    assert issue.path == "rules[0].amount"
    assert issue.file is None
    assert str(info.value).startswith("rules[0].amount: tensor conv1.bias: amount=7")
    before.assert_unchanged(lenet)


# --- known wrong or unclear messages ------------------------------------------------------------


def test_nan_amount_is_one_clear_issue(lenet: nn.Module, methods: prunespec.MethodRegistry, tmp_path: Path) -> None:
    text = _edit("amount: 0.3", "amount: .nan")
    spec_file = tmp_path / "prune.yaml"
    spec_file.write_text(text, encoding="utf-8")
    before = ModelState(lenet)
    with pytest.raises(prunespec.SpecError) as info:
        prunespec.apply(lenet, spec_file, methods=methods)
    before.assert_unchanged(lenet)
    (issue,) = info.value.issues
    assert issue.path == "rules[0].amount"
    assert (issue.line, issue.column) == position(text, "amount: .nan", ".nan")
    assert "nan" in issue.message.lower()
    assert issue.hint is not None and "fraction" in issue.hint


def test_nan_sparsity(lenet: nn.Module, methods: prunespec.MethodRegistry, tmp_path: Path) -> None:
    text = _edit("amount: 0.3", "sparsity: .nan")
    spec_file = tmp_path / "prune.yaml"
    spec_file.write_text(text, encoding="utf-8")
    with pytest.raises(prunespec.SpecError) as info:
        prunespec.apply(lenet, spec_file, methods=methods)
    (issue,) = info.value.issues
    assert issue.path == "rules[0].sparsity"
    assert (issue.line, issue.column) == position(text, "sparsity: .nan", ".nan")
    assert "finite" in issue.message


def test_option_model_errors_are_located(methods: prunespec.MethodRegistry, tmp_path: Path) -> None:
    text = LN + "    options: {n: .nan, dim: 0}\n"
    issue = only_spec_issue(text, tmp_path, methods)
    assert issue.path == "rules[0].options.n"
    assert "NaN" in issue.message
    assert issue.file == str(tmp_path / "prune.yaml")
    assert (issue.line, issue.column) == position(text, "options:", ".nan")


def test_merge_keys_of_plain_mappings_are_supported(methods: prunespec.MethodRegistry, tmp_path: Path) -> None:
    """`<<: *alias` merges a plain mapping (the keys given next to it win); tags on merged mappings are
    refused (see test_hostile_specs)."""
    text = """\
version: 1
rules:
  - &first
    select: {names: [conv1]}
    method: l1_unstructured
    amount: 0.3
  - <<: *first
    amount: 0.2
"""
    spec_file = tmp_path / "prune.yaml"
    spec_file.write_text(text, encoding="utf-8")
    spec = prunespec.load_spec(spec_file, methods=methods)
    assert [rule.amount for rule in spec.rules] == [0.3, 0.2]
    assert spec.rules[1].select == spec.rules[0].select
    assert spec.rules[1].method == "l1_unstructured"


def test_merge_key_of_a_non_mapping_is_located(methods: prunespec.MethodRegistry, tmp_path: Path) -> None:
    text = BASE + "    <<: 3\n"
    issue = only_spec_issue(text, tmp_path, methods)
    assert "`<<` merges a mapping" in issue.message
    assert (issue.line, issue.column) == position(text, "<<: 3", "3")


def test_omap_tag_gives_a_spec_error(methods: prunespec.MethodRegistry, tmp_path: Path) -> None:
    text = _edit("name: convs", "name: !!omap [a: 1]")
    issue = only_spec_issue(text, tmp_path, methods)
    assert issue.path == "rules[0].name"
    assert (issue.line, issue.column) == position(text, "name:", "!!omap")


def test_non_string_method_is_one_issue(methods: prunespec.MethodRegistry, tmp_path: Path) -> None:
    text = _edit("method: l1_unstructured", "method: 3")
    issue = only_spec_issue(text, tmp_path, methods)
    assert issue.path == "rules[0].method"
    assert (issue.line, issue.column) == position(text, "method: 3", "3")


def test_non_string_key_is_located_at_the_key(methods: prunespec.MethodRegistry, tmp_path: Path) -> None:
    text = BASE + "1: x\n"
    issue = only_spec_issue(text, tmp_path, methods)
    assert "keys must be strings" in issue.message
    assert (issue.line, issue.column) == position(text, "1: x", "1")


def test_global_count_too_large_message(lenet: nn.Module, methods: prunespec.MethodRegistry, tmp_path: Path) -> None:
    text = _edit("amount: 0.3", "amount: 1000", _edit("{names: [conv1]}", "{types: [Conv2d]}")) + "    scope: global\n"
    spec_file = tmp_path / "prune.yaml"
    spec_file.write_text(text, encoding="utf-8")
    with pytest.raises(prunespec.PlanError) as info:
        prunespec.plan(lenet, spec_file, methods=methods)
    (issue,) = info.value.issues
    assert issue.path == "rules[0].amount"
    assert (issue.line, issue.column) == position(text, "amount: 1000", "1000")
    assert "918 entries" in issue.message
    assert "(conv1.weight, conv2.weight): amount=1000" in issue.message
    assert ").:" not in issue.message


# --- one definition of valid: Specs built in Python are checked like documents --------------------


def _python_rule(**fields: Any) -> prunespec.Spec:
    from prunespec.spec import Rule, Select

    return prunespec.Spec(version=1, rules=[Rule(select=Select(names=["conv1"]), **fields)])


@pytest.mark.parametrize(
    ("fields", "path", "message"),
    [
        ({"method": "l1_unstructured"}, "rules[0]", "'l1_unstructured' needs `amount` or `sparsity`"),
        ({"method": "identity", "amount": 0.5}, "rules[0].amount", "'identity' takes no `amount`"),
        (
            {"method": "ln_structured", "amount": 0.5, "options": {"n": 2}},
            "rules[0].options",
            "missing required key 'dim'",
        ),
        (
            {"method": "ln_structured", "amount": 0.5, "options": {"n": 2, "dim": "0"}},
            "rules[0].options.dim",
            "got string",
        ),
        ({"method": "l1_unstrucured", "amount": 0.5}, "rules[0].method", "unknown method 'l1_unstrucured'"),
        (
            {"method": "random_structured", "amount": 0.5, "scope": "global", "options": {"dim": 0}},
            "rules[0].scope",
            "scope: global",
        ),
    ],
    ids=["no-amount", "identity-amount", "missing-option", "option-type", "unknown-method", "global-structured"],
)
def test_python_built_specs_are_checked_like_documents(
    fields: dict[str, Any], path: str, message: str, lenet: nn.Module, methods: prunespec.MethodRegistry
) -> None:
    spec = _python_rule(**fields)
    before = ModelState(lenet)
    for run in (
        lambda: prunespec.load_spec(spec, methods=methods),
        lambda: prunespec.plan(lenet, spec, methods=methods),
        lambda: prunespec.apply(lenet, spec, methods=methods),
    ):
        with pytest.raises(prunespec.SpecError) as info:
            run()
        (issue,) = info.value.issues
        assert issue.path == path
        assert message in issue.message
    before.assert_unchanged(lenet)
    # the same rule as a mapping says the same
    with pytest.raises(prunespec.SpecError) as info:
        prunespec.load_spec(spec.model_dump(exclude_none=True), methods=methods)
    assert [(i.path, i.message) for i in info.value.issues] == [(path, issue.message)]


class WithDefault(torch.nn.utils.prune.BasePruningMethod):
    """Prunes nothing; has an option with a default."""

    PRUNING_TYPE = "unstructured"

    def __init__(self, amount: float, k: int = 3) -> None:
        self.amount, self.k = amount, k

    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        return default_mask


def test_python_built_spec_gets_option_defaults_like_documents() -> None:
    from prunespec.methods.base import MethodInfo

    methods = prunespec.load_methods(builtins_only=True)
    methods.add(MethodInfo.from_class(WithDefault, name="with_default"))
    spec = prunespec.load_spec(_python_rule(method="with_default", amount=0.5), methods=methods)
    assert spec.rules[0].options == {"k": 3}
    assert prunespec.load_spec(spec.model_dump(exclude_none=True), methods=methods) == spec


LN_OK = LN + "    options: {n: 2, dim: 0}\n"


@pytest.mark.parametrize(
    ("text", "token", "path", "message"),
    [
        (
            _edit("method: l1_unstructured", "method: random_structured")
            + "    options: {dim: 0}\n    scope: global\n",
            "global",
            "rules[0].scope",
            "'random_structured' is structured",
        ),
        (
            _edit("method: l1_unstructured", "method: random_unstructured")
            + "    scope: global\n    min_sparsity: 0.1\n",
            "0.1",
            "rules[0].min_sparsity",
            "min_sparsity needs a method that scores entries",
        ),
        (_edit("[conv1]", "['re:[']", LN_OK), "'re:['", "rules[0].select.names[0]", "invalid regular expression"),
    ],
    ids=["global-structured", "bounds-without-scores", "regex"],
)
def test_validate_rejects_what_is_decidable_without_a_model(
    text: str, token: str, path: str, message: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from prunespec.cli import main

    spec_file = tmp_path / "prune.yaml"
    spec_file.write_text(text, encoding="utf-8")
    assert main(["validate", "--builtins-only", str(spec_file)]) != 0
    err = capsys.readouterr().err
    line, column = position(text, token)
    assert f"{spec_file}:{line}:{column}: {path}: " in err
    assert message in err


class SelfDirected(torch.nn.utils.prune.BasePruningMethod):
    """Decides alone what to prune (torch's PRUNING_TYPE = "global")."""

    PRUNING_TYPE = "global"

    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        return default_mask


def test_messages_use_prunespecs_granularity_not_torchs_pruning_type(tmp_path: Path) -> None:
    from prunespec.methods.base import MethodInfo

    methods = prunespec.load_methods(builtins_only=True)
    methods.add(MethodInfo.from_class(SelfDirected, name="self_directed"))
    text = (
        _edit("method: l1_unstructured", "method: self_directed", _edit("    amount: 0.3\n", ""))
        + "    scope: global\n"
    )
    issue = only_spec_issue(text, tmp_path, methods)
    assert issue.path == "rules[0].scope"
    assert "'self_directed' is self-directed and takes no amount" in issue.message
    assert "is global" not in issue.message
