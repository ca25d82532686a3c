"""Reading a spec file into plain data and a :class:`~prunespec.spec.SourceMap`, safely.

A spec may come from anyone, so reading it never builds objects from tags, never blocks on a FIFO or a
device, and takes time and memory linear in the file's size:

* only regular files are read, at most :data:`MAX_FILE_BYTES` of them;
* the YAML is read as a stream of parser events (ruamel.yaml's safe parser, which skips comments: the
  round-trip scanner gathers a comment one character at a time, which is quadratic for a long comment
  line) and built here without recursion;
* nesting deeper than :data:`MAX_DEPTH` and documents that expand, through aliases, to more than
  :data:`MAX_NODES` values are refused;
* every tag except YAML's plain data types is refused, wherever it is (merged mappings included).

Problems with single values (a tag, a date, a NaN, a lone surrogate) are collected and the value is
replaced by :data:`REJECTED`, so that the later checks still see the rest of the document; structural
problems (bad syntax, limits) stop the reading.
"""

from __future__ import annotations

import math
import os
import re
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.error import MarkedYAMLError, YAMLError
from ruamel.yaml.events import (
    AliasEvent,
    CollectionEndEvent,
    DocumentStartEvent,
    Event,
    MappingStartEvent,
    ScalarEvent,
    SequenceStartEvent,
)
from ruamel.yaml.nodes import ScalarNode
from ruamel.yaml.reader import ReaderError
from ruamel.yaml.resolver import VersionedResolver

from .errors import Issue, SpecError
from .spec import DocPath, SourceMap, format_path

MAX_FILE_BYTES = 16 * 2**20
MAX_DEPTH = 64
MAX_NODES = 1_000_000  # values after alias expansion ("billion laughs" expands 9 lines to 10**9)

_CORE = "tag:yaml.org,2002:"
_SCALAR_TAGS = {_CORE + name for name in ("str", "int", "float", "bool", "null")}


class _Rejected:
    """Stands in for a value already reported as not allowed."""

    def __repr__(self) -> str:
        return "<rejected value>"


REJECTED: Any = _Rejected()


@dataclass
class Document:
    """A spec document as plain data, where it came from, and the problems found in its values."""

    data: Any
    source: SourceMap
    issues: list[Issue] = field(default_factory=list)
    rejected: set[DocPath] = field(default_factory=set)  # paths holding REJECTED (or an alias of one)


def read_spec_file(path: str | os.PathLike[str]) -> str:
    """The text of a spec file: a regular file of at most MAX_FILE_BYTES bytes of UTF-8."""
    name = str(path)
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise SpecError(_not_regular(name))
        if info.st_size > MAX_FILE_BYTES:
            raise SpecError(_too_big(name))
        # O_NONBLOCK: should the path be swapped for a FIFO after the check, opening it does not wait.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
        with os.fdopen(fd, "rb") as stream:
            if not stat.S_ISREG(os.fstat(stream.fileno()).st_mode):
                raise SpecError(_not_regular(name))
            data = stream.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise SpecError(Issue(f"cannot read the spec: {exc}", file=name)) from None
    if len(data) > MAX_FILE_BYTES:
        raise SpecError(_too_big(name))
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise SpecError(
            Issue(
                f"cannot read the spec: byte 0x{data[exc.start]:02x} is not UTF-8",
                file=name,
                line=line,
                column=column,
                hint="save the file as UTF-8",
            )
        ) from None


def _not_regular(name: str) -> Issue:
    return Issue("cannot read the spec: not a regular file", file=name, hint="give the path of a YAML file")


def _too_big(name: str) -> Issue:
    return Issue(
        f"the spec is larger than {MAX_FILE_BYTES // 2**20} MiB",
        file=name,
        hint="a spec this large is not a pruning spec; split it or generate fewer rules",
    )


def parse_yaml(text: str, filename: str) -> Document:
    """Parse YAML text into plain data; raises SpecError for what stops the reading."""
    if len(text) > MAX_FILE_BYTES:
        raise SpecError(_too_big(filename))
    builder = _Builder(filename)
    try:
        builder.run(YAML(typ="safe", pure=True).parse(text))
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = " ".join(str(p) for p in (exc.context, exc.problem) if p)
        problem = problem.split("\nTo suppress")[0].strip()
        line, column = (mark.line + 1, mark.column + 1) if mark else (None, None)
        builder.fail(Issue(f"invalid YAML: {problem}", file=filename, line=line, column=column))
    except ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        column = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
        char = exc.character if isinstance(exc.character, int) else 0
        builder.fail(
            Issue(
                f"invalid YAML: character U+{char:04X} is not allowed in YAML text",
                file=filename,
                line=line,
                column=column,
                hint="remove it, or write it as an escape in a double-quoted string",
            )
        )
    except YAMLError as exc:
        builder.fail(Issue(f"invalid YAML: {exc}", file=filename))
    return Document(builder.root, builder.source, builder.issues, builder.rejected)


class _Stop(Exception):
    """Reading cannot go on (a limit was hit); the issues say why."""


@dataclass
class _Frame:
    """A mapping or sequence being built."""

    value: Any  # dict or list
    path: DocPath
    anchor: str | None
    start: int  # node count when it started, for its expanded size
    position: tuple[int, int]
    rejected: bool = False  # a tag that is not allowed: it becomes REJECTED when done
    key: Any = None
    has_key: bool = False
    key_position: tuple[int, int] = (0, 0)
    merges: list[dict[str, Any]] = field(default_factory=list)
    height: int = 1  # levels below and including this one


@dataclass
class _Anchored:
    value: Any
    size: int
    height: int
    rejected: bool


_MERGE = object()  # the key `<<`
_BAD_KEY = object()  # a key already reported


class _Builder:
    def __init__(self, filename: str) -> None:
        self.filename = filename
        self.source = SourceMap(file=filename)
        self.issues: list[Issue] = []
        self.rejected: set[DocPath] = set()
        self.root: Any = None
        self.stack: list[_Frame] = []
        self.anchors: dict[str, _Anchored] = {}
        self.nodes = 0
        self.documents = 0
        self.resolver = VersionedResolver(version=(1, 2))

    def fail(self, issue: Issue) -> None:
        self.issues.append(issue)
        raise SpecError(self.issues)

    def at(self, event: Event) -> tuple[int, int]:
        mark = event.start_mark
        return (mark.line + 1, mark.column + 1) if mark is not None else (0, 0)

    def issue(self, position: tuple[int, int], message: str, hint: str | None = None, path: DocPath = ()) -> None:
        line, column = position
        self.issues.append(Issue(message, format_path(path), self.filename, line or None, column or None, hint))

    def run(self, events: Iterator[Event]) -> None:
        for event in events:
            if isinstance(event, DocumentStartEvent):
                self.documents += 1
                if self.documents > 1:
                    self.issue(self.at(event), "a spec file holds one YAML document; this is a second one")
                    raise SpecError(self.issues)
            elif isinstance(event, (MappingStartEvent, SequenceStartEvent)):
                self.start(event)
            elif isinstance(event, CollectionEndEvent):
                self.end()
            elif isinstance(event, ScalarEvent):
                self.scalar(event)
            elif isinstance(event, AliasEvent):
                self.alias(event)

    # --- where a value goes ------------------------------------------------------------------

    def child_path(self) -> DocPath:
        if not self.stack:
            return ()
        parent = self.stack[-1]
        if isinstance(parent.value, list):
            return (*parent.path, len(parent.value))
        if not parent.has_key:  # a collection as a key: reported when it is done
            return (*parent.path, "<key>")
        if parent.key is _MERGE:
            return (*parent.path, "<<")
        return (*parent.path, parent.key) if isinstance(parent.key, str) else (*parent.path, "<key>")

    def count(self, event: Event, size: int = 1, height: int = 0) -> None:
        """Count ``size`` more values, ``height`` levels of collections deep, against the limits."""
        self.nodes += size
        if self.nodes > MAX_NODES:
            self.issue(
                self.at(event),
                f"the spec expands to more than {MAX_NODES:,} values (through aliases?)",
                "a pruning spec is far smaller; an alias that repeats an alias multiplies the document",
                self.child_path(),
            )
            raise SpecError(self.issues)
        if height and len(self.stack) + height > MAX_DEPTH:
            self.issue(
                self.at(event),
                f"the spec nests deeper than {MAX_DEPTH} levels",
                "a pruning spec nests a few levels: rules, a rule, select, a list",
                self.child_path(),
            )
            raise SpecError(self.issues)

    def deliver(self, value: Any, position: tuple[int, int], rejected: bool, height: int) -> None:
        """Put a finished value into its parent (or make it the document)."""
        if not self.stack:
            self.root = value
            self.source.values[()] = position
            if rejected:
                self.rejected.add(())
            return
        parent = self.stack[-1]
        parent.height = max(parent.height, height + 1)
        if isinstance(parent.value, list):
            path = (*parent.path, len(parent.value))
            parent.value.append(value)
            self.source.values[path] = position
            if rejected:
                self.rejected.add(path)
            return
        if not parent.has_key:
            parent.key, parent.has_key, parent.key_position = self.key(value, position, parent), True, position
            return
        key, parent.key, parent.has_key = parent.key, None, False
        if key is _BAD_KEY:
            return
        if key is _MERGE:
            self.merge(value, position, parent)
            return
        path = (*parent.path, key)
        if key in parent.value:
            first = self.source.keys.get(path)
            self.issue(
                parent.key_position,
                f"invalid YAML: duplicate key {key!r}" + (f" (first at line {first[0]})" if first else ""),
                "give each key once",
            )
            return
        parent.value[key] = value
        self.source.keys[path] = parent.key_position
        self.source.values[path] = position
        if rejected:
            self.rejected.add(path)

    def key(self, value: Any, position: tuple[int, int], parent: _Frame) -> Any:
        if value is _MERGE or (isinstance(value, str) and value is not REJECTED):
            return value
        if value is not REJECTED:
            shown = (
                value if not isinstance(value, (dict, list)) else "a mapping" if isinstance(value, dict) else "a list"
            )
            self.issue(position, f"mapping keys must be strings, got {shown!r}", path=(*parent.path, str(shown)))
        return _BAD_KEY

    def merge(self, value: Any, position: tuple[int, int], parent: _Frame) -> None:
        """``<<: *defaults`` (or a list of aliases): the keys the mapping does not give itself."""
        merged = value if isinstance(value, list) else [value]
        if value is REJECTED or any(m is REJECTED for m in merged):
            return  # its tag is reported
        if not all(isinstance(m, dict) for m in merged):
            self.issue(
                position,
                "`<<` merges a mapping into this one: give an alias of a mapping (`<<: *defaults`) or a list of them",
                path=parent.path,
            )
            return
        parent.merges.extend(merged)
        self.source.keys.setdefault((*parent.path, "<<"), parent.key_position)

    # --- events --------------------------------------------------------------------------------

    def start(self, event: MappingStartEvent | SequenceStartEvent) -> None:
        self.count(event, height=1)
        is_map = isinstance(event, MappingStartEvent)
        tag = event.tag
        rejected = False
        if tag is not None and tag != "!" and tag != _CORE + ("map" if is_map else "seq"):
            self.reject_tag(event, tag)
            rejected = True
        self.stack.append(
            _Frame({} if is_map else [], self.child_path(), event.anchor, self.nodes - 1, self.at(event), rejected)
        )

    def end(self) -> None:
        frame = self.stack.pop()
        if isinstance(frame.value, dict):
            for merged in frame.merges:  # keys of the mapping win; then earlier merges win
                for key, value in merged.items():
                    if key not in frame.value:
                        frame.value[key] = value
                        self.source.values.setdefault((*frame.path, key), frame.key_position)
        value = REJECTED if frame.rejected else frame.value
        if frame.anchor is not None:
            inner = frame.rejected or any(self._under(p, frame.path) for p in self.rejected)
            self.anchors[frame.anchor] = _Anchored(value, self.nodes - frame.start, frame.height, inner)
        self.deliver(value, frame.position, frame.rejected, frame.height)

    @staticmethod
    def _under(path: DocPath, prefix: DocPath) -> bool:
        return path[: len(prefix)] == prefix

    def alias(self, event: AliasEvent) -> None:
        anchored = self.anchors.get(event.anchor)
        if anchored is None:
            self.issue(self.at(event), f"invalid YAML: alias *{event.anchor} names no anchor defined before it")
            raise SpecError(self.issues)
        self.count(event, anchored.size, anchored.height)
        self.deliver(anchored.value, self.at(event), anchored.rejected, anchored.height)

    def scalar(self, event: ScalarEvent) -> None:
        self.count(event)
        value, problem = self.convert(event)
        position = self.at(event)
        if problem is not None:
            message, hint = problem
            self.issue(position, message, hint, self.child_path())
            value = REJECTED
        if event.anchor is not None:
            self.anchors[event.anchor] = _Anchored(value, 1, 0, value is REJECTED)
        self.deliver(value, position, value is REJECTED, 0)

    def reject_tag(self, event: Event, tag: str) -> None:
        shown = "!!" + tag.removeprefix(_CORE) if tag.startswith(_CORE) else tag
        self.issue(
            self.at(event),
            f"YAML tag {shown} is not allowed",
            "a spec holds plain data only: mappings, lists, strings, numbers, booleans",
            self.child_path(),
        )

    def convert(self, event: ScalarEvent) -> tuple[Any, tuple[str, str | None] | None]:
        """The plain value of a scalar, or why it is not allowed."""
        text: str = event.value
        tag = event.tag
        if tag is None:
            tag = str(self.resolver.resolve(ScalarNode, text, event.implicit))
        elif tag == "!":
            tag = _CORE + "str"
        elif tag not in _SCALAR_TAGS:
            self.reject_tag(event, tag)
            return REJECTED, None
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            char = text[exc.start]
            return None, (
                f"the text has a lone surrogate (\\u{ord(char):04x}), which is not a character",
                "remove it, or write the character it was meant to be",
            )
        kind = tag.removeprefix(_CORE)
        top = self.stack[-1] if self.stack else None
        if (
            kind == "merge"
            and event.tag is None
            and top is not None
            and isinstance(top.value, dict)
            and not top.has_key
        ):
            return _MERGE, None
        if kind in ("str", "merge", "value"):
            return text, None
        if kind == "null":
            return None, None
        if kind == "bool":
            return text.lower() == "true", None
        if kind == "timestamp":
            what = "a date" if re.fullmatch(r"\d{4}-\d\d?-\d\d?", text) else "a timestamp"
            return None, (f"{what} is not allowed here", "quote it if you mean text")
        try:
            number = _int(text) if kind == "int" else _float(text)
        except ValueError:
            return None, (f"{text!r} is not a valid {kind}", None)
        if isinstance(number, float) and math.isnan(number):
            last = self.child_path()[-1:] or ("",)
            return None, ("expected a finite number, got NaN", _NAN_HINTS.get(str(last[0]), "write a number"))
        return number, None


_NAN_HINTS = {
    "amount": "a float in [0, 1] is a fraction of what is left; an integer is a count",
    "sparsity": "the final fraction pruned, a number in [0, 1]",
}


def _int(text: str) -> int:
    digits = text.replace("_", "")
    sign = -1 if digits.startswith("-") else 1
    digits = digits.lstrip("+-")
    for prefix, base in (("0b", 2), ("0x", 16), ("0o", 8)):
        if digits.startswith(prefix):
            return sign * int(digits[2:], base)
    return sign * int(digits)


def _float(text: str) -> float:
    lowered = text.replace("_", "").lower()
    sign = -1.0 if lowered.startswith("-") else 1.0
    body = lowered.lstrip("+-")
    if body == ".inf":
        return sign * math.inf
    if body == ".nan":
        return math.nan
    return sign * float(body)
