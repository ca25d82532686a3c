"""Name patterns (globs and ``re:`` regexes) compiled to regexes that match in bounded time.

Python's ``re`` backtracks, so some regexes take exponential time on a short name (``(.*.*)*X`` on a
30-character name runs for hours). A pattern is refused, before any model is seen, when it could:

* a backreference or a conditional group (``\\1``, ``(?(1)a|b)``);
* a repeated part that can match one text in more than one way: something variable inside it (a
  repeat, an alternation) overlaps with what may follow it in the same or the next repetition, as in
  ``(a+)+``, ``(\\w+\\s?)*`` or ``(a|ab)*``; ``(?:[^.]+\\.)*`` is fine, since ``[^.]`` and ``\\.`` cannot
  overlap;
* more than :data:`MAX_OVERLAPPING` unbounded repeats in a row that overlap with what follows them
  (``.*a.*a.*a.*a``: time grows as the name's length to that power);
* more than :data:`MAX_PATTERN` characters.

The analysis looks at which characters each part can match, over a sample alphabet; it errs towards
refusing. Refused patterns can always be written as a glob or a simpler regex.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

try:  # the parser ``re`` itself uses; public as sre_parse before Python 3.11
    from re import _constants as sre_constants  # type: ignore[attr-defined]
    from re import _parser as sre_parse  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - Python 3.10
    import sre_constants
    import sre_parse

MAX_PATTERN = 10_000
MAX_OVERLAPPING = 3

_PROBE = frozenset(
    [chr(c) for c in range(32, 127)] + ["\t", "\n", "\u00e9", "\u00df", "\u03a9", "\u0663", "\u00a0", "\u4e2d"]
)
_UNBOUNDED = sre_constants.MAXREPEAT
_REPEATS = {sre_constants.MAX_REPEAT, sre_constants.MIN_REPEAT}
_POSSESSIVE = getattr(sre_constants, "POSSESSIVE_REPEAT", None)


@dataclass(frozen=True)
class PatternProblem:
    """Why a ``names``/``exclude`` entry is refused, and what to write instead."""

    message: str
    hint: str


def pattern_problem(pattern: str) -> PatternProblem | None:
    """Why ``pattern`` (a glob or ``re:<regex>``) cannot be used, or None if it can."""
    try:
        compile_name_pattern(pattern)
    except PatternError as exc:
        return exc.problem
    return None


class PatternError(ValueError):
    """A malformed or unsafe name pattern (a ValueError, as ``re.error`` is)."""

    def __init__(self, problem: PatternProblem) -> None:
        self.problem = problem
        super().__init__(problem.message)


_GLOB_HINT = "globs: `*` within a segment, `**` for any number of segments, `?`, `[ab]`"
_SIMPLER = (
    "write a glob (`layers.*.mlp`, `**.q_proj`) or a regex without nested repeats, like `re:layers\\.[0-9]+\\.mlp`"
)


def compile_name_pattern(pattern: str) -> re.Pattern[str]:
    """A compiled full-match regex for a ``names``/``exclude`` entry; PatternError (a ValueError) if it
    is malformed or could take exponential time."""
    if len(pattern) > MAX_PATTERN:
        raise PatternError(PatternProblem(f"the pattern is longer than {MAX_PATTERN:,} characters", _SIMPLER))
    if pattern.startswith("re:"):
        source = pattern[3:]
        try:
            compiled = re.compile(source)
            tree = sre_parse.parse(source)
        except re.error as exc:
            raise PatternError(
                PatternProblem(f"invalid regular expression {source!r}: {exc}", "check brackets and escapes")
            ) from None
        except RecursionError:
            raise PatternError(PatternProblem("the regular expression nests too deeply", _SIMPLER)) from None
        problem = _Analysis(compiled.flags).problem(tree)
        if problem:
            raise PatternError(PatternProblem(f"regular expression {source!r} {problem}", _SIMPLER))
        return compiled
    compiled = re.compile(_glob_regex(pattern))
    problem = _Analysis(0).problem(sre_parse.parse(compiled.pattern))
    if problem:
        raise PatternError(PatternProblem(f"glob {pattern!r} {problem}", "use fewer `*` in one segment"))
    return compiled


def _glob_regex(pattern: str) -> str:
    segments = pattern.split(".")
    if segments == ["**"]:
        return ".*"
    out = ""
    for i, segment in enumerate(segments):
        if segment == "**":
            out += r"(?:[^.]+\.)*" if i == 0 else r"(?:\.[^.]+)*"
            continue
        if i > 0 and not (i == 1 and segments[0] == "**"):
            out += r"\."
        out += _segment_regex(segment, pattern)
    return out


def _segment_regex(segment: str, pattern: str) -> str:
    out, i = "", 0
    while i < len(segment):
        char = segment[i]
        if char == "*":
            if segment[i : i + 2] == "**":
                raise PatternError(
                    PatternProblem(f"in {pattern!r}, `**` must be a whole segment (like `a.**.b`)", _GLOB_HINT)
                )
            out += r"[^.]*"
        elif char == "?":
            out += r"[^.]"
        elif char == "[":
            end = segment.find("]", i + 2)
            if end < 0:
                raise PatternError(PatternProblem(f"unclosed `[` in {pattern!r}", _GLOB_HINT))
            body = segment[i + 1 : end]
            out += "[" + ("^" + re.escape(body[1:]) if body.startswith("!") else re.escape(body)) + "]"
            i = end
        else:
            out += re.escape(char)
        i += 1
    return out


# --- backtracking analysis -----------------------------------------------------------------------

Item = tuple[Any, Any]  # (opcode, argument), as sre_parse gives them


class _Analysis:
    def __init__(self, flags: int) -> None:
        self.dotall = bool(flags & re.DOTALL)
        self.ignorecase = bool(flags & re.IGNORECASE)
        self.overlapping = 0

    def problem(self, tree: Any) -> str | None:
        found = self.walk(list(tree))
        if found:
            return found
        if self.overlapping > MAX_OVERLAPPING:
            return (
                f"has {self.overlapping} unbounded repeats (like `.*`) that overlap with what follows them, "
                f"which can take time growing as the name's length to that power (at most {MAX_OVERLAPPING})"
            )
        return None

    def walk(self, items: list[Item]) -> str | None:
        """Check every repeat in a sequence (and below it)."""
        for i, (op, av) in enumerate(items):
            if op in (sre_constants.GROUPREF, sre_constants.GROUPREF_EXISTS):
                return "uses a backreference or a conditional group, which can take exponential time"
            if op in _REPEATS:
                _, high, body = av
                body = list(body)
                if high > 1:
                    found = self.ambiguous(body)
                    if found:
                        return found
                if high == _UNBOUNDED and self.chars((op, av)) & self.first_of(items[i + 1 :]):
                    self.overlapping += 1
            for child in self.children(op, av):
                found = self.walk(child)
                if found:
                    return found
        return None

    def ambiguous(self, body: list[Item]) -> str | None:
        """Why a repeated ``body`` could match one text in several ways, or None."""
        body = _flatten(body)
        for i, item in enumerate(body):
            if not self.variable(item):
                continue
            follow = self.first_of(body[i + 1 :])
            if self.nullable_seq(body[i + 1 :]):
                follow |= self.first_of(body)  # the next repetition
            if self.chars(item) & follow:
                return (
                    "repeats a part that can match the same text in more than one way (like `(a+)+` or "
                    "`(.*.*)*`), which can take exponential time"
                )
            if item[0] == sre_constants.BRANCH:
                seen: frozenset[str] = frozenset()
                empty = 0
                for branch in item[1][1]:
                    first = self.first_of(list(branch))
                    empty += self.nullable_seq(list(branch))
                    if first & seen or empty > 1:
                        return "repeats alternatives that overlap (like `(a|a)*`), which can take exponential time"
                    seen |= first
        return None

    # --- what a part matches -------------------------------------------------------------------

    def children(self, op: Any, av: Any) -> list[list[Item]]:
        if op == sre_constants.SUBPATTERN:
            return [list(av[-1])]
        if op == sre_constants.BRANCH:
            return [list(branch) for branch in av[1]]
        if op in _REPEATS or op == _POSSESSIVE:
            return [list(av[2])]
        if op in (sre_constants.ASSERT, sre_constants.ASSERT_NOT):
            return [list(av[1])]
        if op == getattr(sre_constants, "ATOMIC_GROUP", None):
            return [list(av)]
        return []

    def variable(self, item: Item) -> bool:
        """Whether the part can match texts of different lengths or in different ways."""
        op, av = item
        if op in _REPEATS:
            return bool(av[0] != av[1]) or any(self.variable(i) for i in av[2])
        if op == sre_constants.BRANCH:
            return True
        return any(self.variable(i) for child in self.children(op, av) for i in child) and op != _POSSESSIVE

    def nullable_seq(self, items: list[Item]) -> bool:
        return all(self.nullable(item) for item in items)

    def nullable(self, item: Item) -> bool:
        op, av = item
        if op in _REPEATS or op == _POSSESSIVE:
            return bool(av[0] == 0) or self.nullable_seq(list(av[2]))
        if op == sre_constants.BRANCH:
            return any(self.nullable_seq(list(b)) for b in av[1])
        if op in (sre_constants.SUBPATTERN, getattr(sre_constants, "ATOMIC_GROUP", None)):
            return self.nullable_seq(self.children(op, av)[0])
        return op in (sre_constants.AT, sre_constants.ASSERT, sre_constants.ASSERT_NOT)

    def first_of(self, items: list[Item]) -> frozenset[str]:
        out: frozenset[str] = frozenset()
        for item in items:
            out |= self.first(item)
            if not self.nullable(item):
                break
        return out

    def first(self, item: Item) -> frozenset[str]:
        op, av = item
        if op == sre_constants.BRANCH:
            return frozenset().union(*(self.first_of(list(b)) for b in av[1]))
        if op in (sre_constants.AT, sre_constants.ASSERT, sre_constants.ASSERT_NOT):
            return frozenset()
        children = self.children(op, av)
        if children:
            return self.first_of(children[0])
        return self.single(op, av)

    def chars(self, item: Item) -> frozenset[str]:
        """Every character the part can match, anywhere in it."""
        op, av = item
        if op in (sre_constants.AT, sre_constants.ASSERT, sre_constants.ASSERT_NOT):
            return frozenset()
        children = self.children(op, av)
        if children:
            return frozenset().union(*(self.chars(i) for child in children for i in child))
        return self.single(op, av)

    def single(self, op: Any, av: Any) -> frozenset[str]:
        """The characters one single-character item matches, over the sample alphabet."""
        if op == sre_constants.LITERAL:
            out = frozenset([chr(av)])
        elif op == sre_constants.NOT_LITERAL:
            out = _PROBE - {chr(av)}
        elif op == sre_constants.ANY:
            out = _PROBE if self.dotall else _PROBE - {"\n"}
        elif op == sre_constants.IN:
            out = self.char_class(av)
        else:  # anything else: assume it may match anything
            out = _PROBE
        if self.ignorecase:
            out = out | {c.swapcase() for c in out if len(c.swapcase()) == 1}
        return out

    def char_class(self, items: list[Item]) -> frozenset[str]:
        negate = False
        out: set[str] = set()
        for op, av in items:
            if op == sre_constants.NEGATE:
                negate = True
            elif op == sre_constants.LITERAL:
                out.add(chr(av))
            elif op == sre_constants.RANGE:
                out |= {c for c in _PROBE if av[0] <= ord(c) <= av[1]}
            elif op == sre_constants.CATEGORY:
                out |= {c for c in _PROBE if _in_category(c, av)}
            else:
                out |= _PROBE
        return _PROBE - out if negate else frozenset(out)


def _flatten(items: list[Item]) -> list[Item]:
    """A sequence with its groups opened: a group matches what its contents match."""
    out: list[Item] = []
    for op, av in items:
        out += _flatten(list(av[-1])) if op == sre_constants.SUBPATTERN else [(op, av)]
    return out


def _in_category(char: str, category: Any) -> bool:
    name = str(category).upper()
    if "DIGIT" in name:
        result = char.isdecimal()
    elif "SPACE" in name:
        result = char.isspace()
    elif "WORD" in name:
        result = char.isalnum() or char == "_"
    else:
        return True
    return not result if "NOT" in name else result
