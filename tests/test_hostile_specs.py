"""Specs written to do harm: they never run or import code, never hang, stay within bounded time and
memory, and every problem they provoke is a located SpecError (see docs/security.md)."""

from __future__ import annotations

import multiprocessing
import os
import random
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, ModelState
from torch import nn

import prunespec
from prunespec.patterns import MAX_OVERLAPPING, compile_name_pattern, pattern_problem
from prunespec.selectors import select_modules
from prunespec.yaml_reader import MAX_DEPTH, MAX_FILE_BYTES, MAX_NODES

METHODS = prunespec.load_methods(builtins_only=True)
RULE = "  - name: convs\n    select: {names: [conv1]}\n    method: l1_unstructured\n    amount: 0.3\n"
BASE = "version: 1\nrules:\n" + RULE


def located(text: str, token: str, nth: int = 1) -> tuple[int, int]:
    """1-based (line, column) of the ``nth`` occurrence of ``token`` in ``text``."""
    at = -1
    for _ in range(nth):
        at = text.index(token, at + 1)
    line = text.count("\n", 0, at) + 1
    return line, at - (text.rfind("\n", 0, at) + 1) + 1


def issues_of(text: str) -> list[prunespec.Issue]:
    with pytest.raises(prunespec.SpecError) as info:
        prunespec.loads_spec(text, filename="prune.yaml", methods=METHODS)
    return list(info.value.issues)


def in_child(target: Callable[..., None], *args: Any, timeout: float) -> Any:
    """Run ``target(*args, queue)`` in a forked child; fail if it does not finish within ``timeout``."""
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=target, args=(*args, queue))
    child.start()
    child.join(timeout=timeout)
    if child.is_alive():
        child.kill()
        child.join()
        pytest.fail(f"did not finish within {timeout} s")
    return queue.get(timeout=5)


def _load(source: Any, queue: Any) -> None:
    started = time.perf_counter()
    try:
        if isinstance(source, str) and not os.path.exists(source):
            spec = prunespec.loads_spec(source, methods=METHODS)
        else:
            spec = prunespec.load_spec(source, methods=METHODS)
    except prunespec.SpecError as exc:
        queue.put(("SpecError", [(i.message, i.line, i.column, i.path, i.hint) for i in exc.issues]))
    except BaseException as exc:  # the property under test: nothing else may escape
        queue.put((type(exc).__name__, str(exc)[:500]))
    else:
        queue.put(("loaded", (len(spec.rules), time.perf_counter() - started)))


# --- no code runs, nothing is imported ---------------------------------------------------------


def test_dotted_types_import_nothing() -> None:
    """`torch._dynamo` is lazily imported by `torch.__getattr__`; looking it up imported 817 modules."""
    script = (
        "import sys, prunespec\n"
        "from torch import nn\n"
        "from prunespec.selectors import select_modules\n"
        "assert 'torch._dynamo' not in sys.modules\n"
        "before = set(sys.modules)\n"
        "modules = list(nn.Sequential(nn.Linear(2, 2)).named_modules())\n"
        "for entry in ['torch._dynamo.Foo', 'torch._dynamo.eval_frame.OptimizedModule', 'torch.nn.Linear']:\n"
        "    select_modules(modules, [entry], None, [])\n"
        "print(sorted(set(sys.modules) - before))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_a_modules_lazy_getattr_is_never_called(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    lazy = types.ModuleType("lazy_pkg")
    lazy.__getattr__ = lambda name: calls.append(name) or nn.Linear  # type: ignore[attr-defined]
    lazy.Present = nn.Linear  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "lazy_pkg", lazy)
    modules = list(nn.Sequential(nn.Linear(2, 2)).named_modules())
    assert select_modules(modules, ["lazy_pkg.Missing"], None, []).modules == []
    assert [name for name, _, _ in select_modules(modules, ["lazy_pkg.Present"], None, []).modules] == ["0"]
    assert calls == []


@pytest.mark.parametrize(
    "tagged",
    [
        "<<: !!python/object/apply:os.system {args: ['touch {marker}']}",
        "<<: [!!python/object/apply:os.system {args: ['touch {marker}']}]",
        "name: !!python/object/apply:os.system ['touch {marker}']",
    ],
    ids=["merged-map", "merged-list", "value"],
)
def test_tags_are_refused_on_merged_mappings_too(tagged: str, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    text = BASE.replace("  - name: convs\n", "  - " + tagged.replace("{marker}", str(marker)) + "\n")
    (issue,) = issues_of(text)
    assert "YAML tag !!python/object/apply:os.system is not allowed" in issue.message
    assert (issue.line, issue.column) == located(text, "!!python")
    assert not marker.exists()


@pytest.mark.parametrize("tag", ["!!omap [a: 1]", "!!pairs [a: 1]", "!!set {a}", "!!binary aGk=", "!!timestamp x"])
@pytest.mark.parametrize("where", ["name", "key", "list"])
def test_non_plain_tags_are_refused_wherever_they_are(tag: str, where: str) -> None:
    if where == "name":
        text = BASE.replace("name: convs", f"name: {tag}")
    elif where == "key":
        text = BASE + f"    options: {{{tag.split(' ')[0]} x: 1}}\n"
    else:
        text = BASE.replace("[conv1]", f"[conv1, {tag}]")
    found = issues_of(text)
    assert any("is not allowed" in i.message and (i.line, i.column) == located(text, "!!") for i in found), found


# --- everything at once --------------------------------------------------------------------------


def test_yaml_schema_and_model_problems_are_reported_together() -> None:
    text = (
        "version: 1\n"
        "seed: 2024-01-01\n"  # YAML: a date
        "rules:\n"
        "  - select: {names: [conv1]}\n"
        "    method: l1_unstructured\n"
        "    amount: .nan\n"  # YAML: NaN
        "  - select: {names: [conv2]}\n"
        "    method: l1_unstructured\n"
        "    amount: 0.2\n"
        "    sparsity: 0.3\n"  # model validator: not both
        "  - select: {names: [fc1]}\n"
        "    method: l1_unstructured\n"
        "    sparsity: 0.5\n"
        "    scope: global\n"
        "    min_sparsity: 0.4\n"
        "    max_sparsity: 0.2\n"  # model validator: min > max
        "  - select: {names: [fc3]}\n"
        "    method: l1_unstructured\n"
        "    sparsity: 0.5\n"
        "    schedule: {start: 5, end: 2}\n"  # model validator: end < start
        "  - select: {names: [fc2]}\n"
        "    method: identity\n"
        "    name: !foo x\n"  # YAML: a tag
        "finalize: 3\n"  # schema
        "extra: 1\n"  # schema
    )
    found = {i.path: i for i in issues_of(text)}
    assert set(found) == {
        "seed",
        "rules[0].amount",
        "rules[1]",
        "rules[2]",
        "rules[3].schedule",
        "rules[4].name",
        "finalize",
        "extra",
    }, found
    assert "date" in found["seed"].message
    assert "NaN" in found["rules[0].amount"].message
    assert "not both" in found["rules[1]"].message
    assert "`min_sparsity` must not be larger" in found["rules[2]"].message
    assert "`end` (2) must come after `start` (5)" in found["rules[3].schedule"].message
    assert "!foo" in found["rules[4].name"].message


def test_a_rejected_value_is_reported_once() -> None:
    text = BASE.replace("amount: 0.3", "amount: !!python/object/apply:os.system ['true']")
    (issue,) = issues_of(text)
    assert issue.path == "rules[0].amount"


# --- text ----------------------------------------------------------------------------------------


def test_a_lone_surrogate_is_a_located_spec_error(tmp_path: Path, lenet: nn.Module) -> None:
    text = BASE.replace("name: convs", 'name: "conv\\ud800s"')
    (issue,) = issues_of(text)
    assert issue.path == "rules[0].name"
    assert (issue.line, issue.column) == located(text, '"conv')
    assert "lone surrogate" in issue.message
    mapping = {"version": 1, "rules": [{"name": "a\ud800", "select": {"names": ["conv1"]}, "method": "identity"}]}
    before = ModelState(lenet)
    with pytest.raises(prunespec.SpecError) as info:
        prunespec.apply(lenet, mapping, methods=METHODS)
    assert [i.path for i in info.value.issues] == ["rules[0].name"]
    before.assert_unchanged(lenet)


def test_a_nul_character_is_located() -> None:
    text = BASE.replace("convs", "co\x00nvs")
    (issue,) = issues_of(text)
    assert (issue.line, issue.column) == located(text, "\x00")
    assert "U+0000" in issue.message


# --- limits --------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [250, 5000, MAX_DEPTH + 1])
def test_deep_nesting_is_a_located_spec_error(depth: int) -> None:
    text = "version: 1\nrules: " + "[" * depth + "]" * depth + "\n"
    (issue,) = issues_of(text)
    assert f"deeper than {MAX_DEPTH} levels" in issue.message
    assert issue.line == 2 and issue.column == len("rules: ") + MAX_DEPTH


def test_deep_nesting_through_an_alias_is_refused() -> None:
    half = MAX_DEPTH // 2 + 2
    text = "version: 1\na: &deep " + "[" * half + "]" * half + "\nrules: " + "[" * half + "*deep" + "]" * half + "\n"
    (issue,) = issues_of(text)
    assert "deeper than" in issue.message
    assert (issue.line, issue.column) == located(text, "*deep")


def test_deep_mapping_documents_are_a_spec_error() -> None:
    nested: dict[str, Any] = {}
    inner = nested
    for _ in range(5000):
        inner["x"] = {}
        inner = inner["x"]
    with pytest.raises(prunespec.SpecError, match=f"deeper than {MAX_DEPTH}"):
        prunespec.load_spec({"version": 1, "rules": [nested]}, methods=METHODS)


def test_a_mapping_that_contains_itself_is_a_spec_error() -> None:
    rule: dict[str, Any] = {"select": {"names": ["conv1"]}, "method": "identity"}
    rule["options"] = rule
    with pytest.raises(prunespec.SpecError, match="deeper than"):
        prunespec.load_spec({"version": 1, "rules": [rule]}, methods=METHODS)


def test_alias_expansion_is_counted_and_bounded() -> None:
    lines = ["version: 1", "a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    text = "\n".join([*lines, "rules: []"]) + "\n"
    kind, found = in_child(_load, text, timeout=10)
    assert kind == "SpecError"
    assert any(f"more than {MAX_NODES:,} values" in message for message, *_ in found)


def test_a_realistic_spec_reusing_anchors_loads() -> None:
    rules = "".join(f"  - {{<<: *base, select: {{names: [layer{i}]}}}}\n" for i in range(200))
    text = "version: 1\nrules:\n  - &base {select: {names: [conv1]}, method: l1_unstructured, amount: 0.3}\n" + rules
    assert len(prunespec.loads_spec(text, methods=METHODS).rules) == 201


def test_a_generated_spec_of_13000_plain_rules_loads(tmp_path: Path) -> None:
    """Plain nodes are bounded by the file size; only aliases' expansion counts against MAX_NODES."""
    rules = "".join(
        f"  - {{name: r{i}, select: {{names: [layers.{i}.fc], params: [weight]}}, method: l1_unstructured, "
        "amount: 0.3}\n"
        for i in range(13_000)
    )
    spec_file = tmp_path / "generated.yaml"
    spec_file.write_text("version: 1\nrules:\n" + rules, encoding="utf-8")
    kind, found = in_child(_load, str(spec_file), timeout=240)
    assert kind == "loaded", found
    assert found[0] == 13_000


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX FIFOs")
def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "prune.yaml"
    os.mkfifo(fifo)
    kind, found = in_child(_load, str(fifo), timeout=10)
    assert kind == "SpecError"
    assert "not a regular file" in found[0][0]


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/urandom", "/dev/null"])
def test_devices_and_directories_are_refused(device: str, tmp_path: Path) -> None:
    for path in ([device] if os.path.exists(device) else []) + [str(tmp_path)]:
        kind, found = in_child(_load, path, timeout=10)
        assert kind == "SpecError"
        assert "not a regular file" in found[0][0]


def test_a_file_over_the_size_limit_is_refused_unread(tmp_path: Path) -> None:
    big = tmp_path / "prune.yaml"
    with big.open("wb") as stream:
        stream.write(BASE.encode())
        stream.truncate(MAX_FILE_BYTES + 1)  # sparse: nothing is written
    with pytest.raises(prunespec.SpecError, match="larger than 16 MiB"):
        prunespec.load_spec(big, methods=METHODS)
    with pytest.raises(prunespec.SpecError, match="larger than 16 MiB"):
        prunespec.loads_spec("#" * (MAX_FILE_BYTES + 1), methods=METHODS)


def test_a_4_mb_comment_line_parses_in_linear_time(tmp_path: Path) -> None:
    """ruamel's round-trip scanner builds a comment one character at a time (over 100 s for this line in
    a fresh interpreter); the safe parser prunespec reads with skips comments."""
    comment = "# " + "x" * 4_000_000
    texts = [comment + "\n" + BASE, BASE + comment, BASE.replace("0.3\n", "0.3 " + comment + "\n")]
    paths = []
    for i, text in enumerate(texts):
        paths.append(tmp_path / f"prune{i}.yaml")
        paths[-1].write_text(text, encoding="utf-8")
    script = (
        "import sys, prunespec\n"
        "methods = prunespec.load_methods(builtins_only=True)\n"
        "for path in sys.argv[1:]:\n"
        "    assert len(prunespec.load_spec(path, methods=methods).rules) == 1\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", script, *map(str, paths)], capture_output=True, text=True, timeout=90, env=env
    )
    assert done.returncode == 0, done.stderr


def test_a_file_that_is_not_utf8_is_located(tmp_path: Path) -> None:
    spec_file = tmp_path / "prune.yaml"
    spec_file.write_bytes(BASE.replace("convs", "conv\xe9").encode("latin-1"))
    with pytest.raises(prunespec.SpecError) as info:
        prunespec.load_spec(spec_file, methods=METHODS)
    (issue,) = info.value.issues
    assert (issue.line, issue.column) == (3, len("  - name: conv") + 1)
    assert "not UTF-8" in issue.message


# --- regexes cannot hang -------------------------------------------------------------------------

CATASTROPHIC = ["(.*.*)*X", "(a+)+", "(\\w+\\s?)*", "(a|a)*c", "(\\d+\\.?)+x", "(a*)*b", "(a?){30}a{30}", "(x+x+)+y"]


@pytest.mark.parametrize("regex", CATASTROPHIC)
def test_catastrophic_regexes_are_refused_at_validate(regex: str) -> None:
    entry = "re:" + regex
    text = BASE.replace("[conv1]", f"['{entry}']")
    (issue,) = issues_of(text)
    assert issue.path == "rules[0].select.names[0]"
    assert (issue.line, issue.column) == located(text, "'re:")
    assert "exponential time" in issue.message
    assert issue.hint is not None and "glob" in issue.hint


@pytest.mark.parametrize("regex", ["(.)\\1", "(?P<x>a)(?P=x)", "(a)?(?(1)b|c)"])
def test_backreferences_are_refused(regex: str) -> None:
    problem = pattern_problem("re:" + regex)
    assert problem is not None and "backreference" in problem.message


def test_overlapping_unbounded_repeats_are_bounded() -> None:
    assert pattern_problem("re:" + ".*a" * MAX_OVERLAPPING) is None
    problem = pattern_problem("re:" + ".*a" * (MAX_OVERLAPPING + 1))
    assert problem is not None and "power" in problem.message


@pytest.mark.parametrize(
    "pattern",
    [
        "re:fc[12]",
        "re:.*mlp.gate",
        "re:model\\.layers\\.(0|1|2)\\.mlp",
        "re:(encoder|decoder)\\.layer\\.\\d+\\.attention",
        "re:layers\\.[0-9]+\\.(attn|mlp)\\..*",
        "re:(?:[^.]+\\.)*fc",
        "re:layer(\\.\\d+)*",
        "re:(a|ab)*c",
        "**.c_fc",
        "a.**.b",
        "*.[!x]*",
    ],
)
def test_realistic_patterns_are_accepted(pattern: str) -> None:
    assert pattern_problem(pattern) is None


def _random_regex(rng: random.Random, depth: int = 0) -> str:
    atoms = ["a", "b", ".", "\\.", "[ab]", "[^.]", "\\w", "\\d", "x"]
    parts = []
    for _ in range(rng.randint(1, 3)):
        kind = rng.random()
        if kind < 0.25 and depth < 3:
            inner = _random_regex(rng, depth + 1)
            part = f"(?:{inner}|{_random_regex(rng, depth + 1)})" if rng.random() < 0.3 else f"(?:{inner})"
        else:
            part = rng.choice(atoms)
        parts.append(part + rng.choice(["", "", "*", "+", "?", "{2,5}", "{3}"]))
    return "".join(parts)


def _match_all(patterns: list[str], queue: Any) -> None:
    names = ["a" * 28 + "!", "ab" * 14 + "!", "a." * 14 + "!", "x" * 28 + "!", "1" * 28 + "!", "." * 28 + "!"]
    worst = (0.0, "")
    for pattern in patterns:
        regex = compile_name_pattern(pattern)
        for name in names:
            started = time.perf_counter()
            regex.fullmatch(name)
            worst = max(worst, (time.perf_counter() - started, f"{pattern} on {name}"))
    queue.put(worst)


def test_accepted_random_regexes_match_adversarial_names_quickly() -> None:
    """Whatever the analysis accepts, matching stays cheap (a missed exponential pattern takes minutes
    on these 29-character names)."""
    rng = random.Random(0)
    drawn = ["re:" + _random_regex(rng) for _ in range(3000)]
    accepted = [p for p in drawn if pattern_problem(p) is None]
    assert 300 < len(accepted) < len(drawn)  # the generator exercises both sides
    seconds, what = in_child(_match_all, accepted, timeout=120)
    assert seconds < 0.5, what
