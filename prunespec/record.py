"""What a calibration used, for the record: a fingerprint of the data and a :class:`CalibrationRecord`.

The record travels with the report and into checkpoints (``prunespec.save(..., record=...)``) as plain
data; :meth:`CalibrationRecord.from_dict` checks a record read back from a file, which may be hostile,
before anything is built from it.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

MAX_DEPTH = 32
"""How deeply a batch's tuples, lists and mappings may nest."""

MAX_NAME = 4096
"""Longest block name a record may hold (characters)."""

MAX_BLOCKS = 1_000_000
"""Most blocks (and allocations per rule) a record may hold."""

MAX_RULES = 100_000
"""Most OWL rules a record may hold allocations for."""


class Fingerprint:
    """A SHA-256 over calibration batches, fed one at a time with :meth:`add`.

    A batch is a Tensor, a tuple or list, or a mapping (keyword arguments), nested as deep as
    :data:`MAX_DEPTH`. What is hashed: the structure (kinds and lengths), the keys (in sorted order, so
    ``dict`` order does not matter), every tensor's dtype, shape and bytes (a contiguous CPU copy, so the
    device does not matter), and plain values (None, bool, int, float, str) by type and value. Anything
    else is hashed by its class name only, and :attr:`partial` is then True.
    """

    def __init__(self) -> None:
        self._hash = hashlib.sha256(b"prunespec-calibration-data-1")
        self.batches = 0
        self.partial = False

    def add(self, batch: Any) -> None:
        """Hash one more batch (batches are hashed in the order added)."""
        self._hash.update(b"batch")
        stack: list[tuple[Any, int]] = [(batch, 0)]
        while stack:
            value, depth = stack.pop()
            if depth > MAX_DEPTH:
                raise ValueError(f"a calibration batch nests deeper than {MAX_DEPTH} levels")
            if isinstance(value, torch.Tensor):
                self._tensor(value)
            elif isinstance(value, Mapping):
                keys = sorted(value, key=lambda k: (type(k).__name__, repr(k)))
                self._tag("map", len(keys))
                for key in reversed(keys):  # the stack pops them in sorted order
                    stack.append((value[key], depth + 1))
                    stack.append((_Key(key), depth + 1))
            elif isinstance(value, (tuple, list)):
                self._tag("tuple" if isinstance(value, tuple) else "list", len(value))
                stack.extend((item, depth + 1) for item in reversed(value))
            elif isinstance(value, _Key):
                self._plain("key", value.key)
            elif value is None or isinstance(value, (bool, int, float, str)):
                self._plain("value", value)
            else:
                self.partial = True
                self._tag(f"object {type(value).__module__}.{type(value).__qualname__}", 0)
        self.batches += 1

    def hexdigest(self) -> str:
        """The fingerprint so far (64 hex digits); adding more batches changes it."""
        return self._hash.hexdigest()

    def _tag(self, kind: str, size: int) -> None:
        self._hash.update(f"|{kind}:{size}|".encode())

    def _plain(self, kind: str, value: Any) -> None:
        text = repr(value).encode()
        self._tag(f"{kind} {type(value).__name__}", len(text))
        self._hash.update(text)

    def _tensor(self, tensor: torch.Tensor) -> None:
        tensor = tensor.detach()
        if tensor.layout != torch.strided:
            tensor = tensor.to_dense()
        if tensor.is_quantized:
            tensor = tensor.dequantize()
        self._tag(f"tensor {tensor.dtype} {list(tensor.shape)}", tensor.numel())
        if tensor.is_meta:
            self.partial = True  # no values to hash
            return
        data = tensor.cpu().contiguous().reshape(-1)
        if data.numel():
            self._hash.update(data.view(torch.uint8).numpy().data)


@dataclass(frozen=True)
class _Key:
    key: Any


@dataclass(frozen=True)
class CalibrationRecord:
    """What one calibration used: ``samples`` batches, ``tokens`` counted (positions kept, padding left
    out), ``sequential`` (true, false or ``"blocks"``, as in the spec), the ``blocks`` (names, in
    order), the data's ``fingerprint`` (:class:`Fingerprint`'s hex digest), and per OWL rule (by index
    in the spec) each block's sparsity."""

    samples: int
    tokens: int
    sequential: bool | Literal["blocks"]
    blocks: tuple[str, ...] = ()
    fingerprint: str = ""
    allocations: Mapping[int, Mapping[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain data (what ``torch.load(weights_only=True)`` reads back)."""
        return {
            "samples": self.samples,
            "tokens": self.tokens,
            "sequential": self.sequential,
            "blocks": list(self.blocks),
            "fingerprint": self.fingerprint,
            "allocations": [
                {"rule_index": index, "sparsities": {block: float(s) for block, s in sparsities.items()}}
                for index, sparsities in sorted(self.allocations.items())
            ],
        }

    @classmethod
    def from_dict(cls, data: Any) -> CalibrationRecord:
        """The record in ``data`` (as :meth:`to_dict` writes it), every value checked; ValueError saying
        where (``blocks[2]``) and what is wrong otherwise."""
        if not isinstance(data, Mapping):
            raise ValueError(f"is {_a(data)}; expected a mapping")
        known = {"samples", "tokens", "sequential", "blocks", "fingerprint", "allocations"}
        unknown = [k for k in data if k not in known]
        if unknown:
            raise ValueError(f"unknown key {_a(unknown[0])}")
        missing = [k for k in ("samples", "tokens", "sequential") if k not in data]
        if missing:
            raise ValueError(f"missing key {missing[0]!r}")
        samples, tokens = _count(data["samples"], "samples"), _count(data["tokens"], "tokens")
        sequential = data["sequential"]
        if type(sequential) is str and sequential == "blocks":
            sequential = "blocks"
        elif type(sequential) is not bool:
            raise ValueError(f"sequential: is {_a(sequential)}; expected true, false or 'blocks'")
        blocks = data.get("blocks", [])
        if not isinstance(blocks, list):
            raise ValueError(f"blocks: is {_a(blocks)}; expected a list of module names")
        _at_most(blocks, MAX_BLOCKS, "blocks")
        for i, name in enumerate(blocks):
            _name(name, f"blocks[{i}]")
        fingerprint = data.get("fingerprint", "")
        if not isinstance(fingerprint, str) or not (
            fingerprint == "" or (len(fingerprint) == 64 and all(c in "0123456789abcdef" for c in fingerprint))
        ):
            raise ValueError(f"fingerprint: is {_a(fingerprint)}; expected 64 hex digits (a SHA-256)")
        return cls(samples, tokens, sequential, tuple(blocks), fingerprint, _allocations(data))


def _allocations(data: Mapping[str, Any]) -> dict[int, dict[str, float]]:
    raw = data.get("allocations", [])
    if not isinstance(raw, list):
        raise ValueError(f"allocations: is {_a(raw)}; expected a list of {{rule_index, sparsities}}")
    _at_most(raw, MAX_RULES, "allocations")
    out: dict[int, dict[str, float]] = {}
    for i, entry in enumerate(raw):
        where = f"allocations[{i}]"
        if not isinstance(entry, Mapping) or set(entry) != {"rule_index", "sparsities"}:
            raise ValueError(f"{where}: is {_a(entry)}; expected {{rule_index: int, sparsities: {{block: float}}}}")
        index = _count(entry["rule_index"], f"{where}.rule_index")
        if index in out:
            raise ValueError(f"{where}.rule_index: rules[{index}] is allocated twice")
        sparsities = entry["sparsities"]
        if not isinstance(sparsities, Mapping):
            raise ValueError(
                f"{where}.sparsities: is {_a(sparsities)}; expected a mapping of block names to sparsities"
            )
        _at_most(sparsities, MAX_BLOCKS, f"{where}.sparsities")
        blocks: dict[str, float] = {}
        for block, value in sparsities.items():
            _name(block, f"{where}.sparsities key")
            if type(value) not in (int, float) or not (math.isfinite(value) and 0 <= value <= 1):
                raise ValueError(f"{where}.sparsities[{block!r}]: is {_a(value)}; expected a sparsity in [0, 1]")
            blocks[block] = float(value)
        out[index] = blocks
    return out


def _at_most(items: Any, limit: int, where: str) -> None:
    if len(items) > limit:
        raise ValueError(f"{where}: {len(items):,} items, more than the {limit:,} a record may hold")


def _count(value: Any, where: str) -> int:
    if type(value) is not int or not 0 <= value < 2**63:
        raise ValueError(f"{where}: is {_a(value)}; expected an integer >= 0")
    return value


def _name(value: Any, where: str) -> None:
    if not isinstance(value, str) or not value or len(value) > MAX_NAME:
        raise ValueError(f"{where}: is {_a(value)}; expected a module name (a str of 1 to {MAX_NAME} characters)")


def _a(value: Any) -> str:
    """How a value reads in an error: short, whatever its size."""
    if value is None or type(value) in (bool, int, float):
        return repr(value)
    if isinstance(value, str):
        return f"a str of {len(value)} characters" if len(value) > 60 else repr(value)
    if isinstance(value, (list, tuple, Mapping)):
        return f"a {type(value).__name__} of {len(value)} items"
    return f"a {type(value).__name__}"
