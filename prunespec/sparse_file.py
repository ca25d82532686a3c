"""Compact sparse checkpoints: a safetensors file with each pruned tensor's kept values and where they are.

``prunespec.save(model, path, format="sparse")`` (and ``prunespec export``) writes a safetensors file:
an 8-byte little-endian header length, a JSON header naming each stored tensor (dtype, shape, byte
range), then the raw little-endian row-major bytes, larger items first so that every tensor is aligned
to its item size (memory-mappable). Its ``__metadata__`` holds one key, ``prunespec``, a JSON string::

    {"format": "prunespec-sparse", "version": 1,
     "tensors": {                                             # every state_dict tensor, in order
       "fc1.weight": {"encoding": "bitmask", "pruned": true, "dtype": "float32", "shape": [120, 400],
                      "mask_dtype": "float32", "kept": 28800},
       "fc2.weight": {"encoding": "nm", "pruned": true, ..., "kept": 5040, "n": 2, "m": 4},
       "fc1.bias": {"encoding": "dense", "pruned": false, "dtype": "float32", "shape": [120]},
       "lm_head.weight": {"same_as": "transformer.wte.weight"}},   # a tied tensor, stored once
     "checkpoint": {"format": 1, "spec": ..., "hooks": ..., ...}}   # what a .pt checkpoint records

Encodings, the smallest chosen per tensor (on a tie the earlier in this list):

* ``dense``: the tensor under its own name, as any safetensors file stores it;
* ``bitmask``: ``<name>:bits``, one bit per entry (entry ``i`` is bit ``i % 8``, least significant first,
  of byte ``i // 8``; zero bits pad it to a multiple of 8 bytes), and ``<name>:values``, the kept entries
  in row-major order. It beats dense where ``(1 - sparsity) * itemsize + 1/8 < itemsize``;
* ``nm``: exactly ``n`` kept in each group of ``m`` consecutive entries along the last dim (``m`` up to
  16): ``<name>:codes``, each group's pattern as its number among the ``C(m, n)`` patterns (kept positions
  in lexicographic order) in ``ceil(log2 C(m, n))`` bits, packed as above (3 bits per group for 2:4),
  and ``<name>:values``.

A pruned tensor (``pruned: true``) stores its mask (kept: the mask's ones) and the kept entries of
``<name>_orig``; it loads as ``<name>_orig`` holding those values with zeros where the mask is 0, and
``<name>_mask`` exactly (in ``mask_dtype``). That is what sparse means: what the model computes,
``<name>_orig * <name>_mask``, and the finalized weights come back bit for bit, but the original values
under the mask are not stored (use the ``.pt`` checkpoint for those). A plain tensor (``pruned: false``;
a finalized weight) is encoded by its nonzero entries, and only floating-point ones are. A zero comes
back as +0.0: the sign of a zero (``-0.0``, what ``prune.remove`` leaves for a pruned negative weight)
is not stored; it compares equal and computes the same sums, except for the sign of an all-zero sum.

Reading (:func:`read`) checks the whole file before it returns a tensor: the safetensors header (by
``safe_open``, which memory-maps the file), the metadata, every entry against the tensors stored
(dtype, shape, counts, pattern numbers, padding bits), and the size it decodes to against a limit.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import json
import math
import os
import struct
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, BinaryIO

import torch
from safetensors import SafetensorError, safe_open

from .checkpoint_file import METADATA_LIMIT
from .checkpoint_hooks import a_type
from .errors import CheckpointError, OutputError
from .files import atomic_write
from .runtime import one_thread

FORMAT_NAME = "prunespec-sparse"
VERSION = 1
ENCODINGS = ("dense", "bitmask", "nm")
MAX_GROUP = 16
"""The largest ``m`` the ``nm`` encoding takes."""

_DTYPES: dict[str, tuple[torch.dtype, str]] = {  # prunespec's name: (torch's dtype, safetensors' code)
    "float64": (torch.float64, "F64"),
    "float32": (torch.float32, "F32"),
    "float16": (torch.float16, "F16"),
    "bfloat16": (torch.bfloat16, "BF16"),
    "int64": (torch.int64, "I64"),
    "int32": (torch.int32, "I32"),
    "int16": (torch.int16, "I16"),
    "int8": (torch.int8, "I8"),
    "uint8": (torch.uint8, "U8"),
    "bool": (torch.bool, "BOOL"),
    "float8_e4m3fn": (torch.float8_e4m3fn, "F8_E4M3"),
    "float8_e5m2": (torch.float8_e5m2, "F8_E5M2"),
}
Stored = dict[str, tuple[torch.dtype, tuple[int, ...]]]
"""Tensors of a file: name -> (dtype, shape)."""
_NAMES = {dtype: name for name, (dtype, _) in _DTYPES.items()}
_CODES = {code: dtype for dtype, code in _DTYPES.values()}


def is_safetensors(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` starts like a safetensors file (a little-endian header length, then ``{``)."""
    try:
        with open(path, "rb") as file:
            start = file.read(9)
    except OSError:
        return False
    return len(start) == 9 and 2 <= struct.unpack("<Q", start[:8])[0] < (1 << 40) and start[8:] == b"{"


# --- one tensor's entry -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """How one state_dict tensor is stored: the metadata entry and the tensors it expects in the file."""

    name: str
    encoding: str  # dense | bitmask | nm
    pruned: bool  # True: loads as <name>_orig and <name>_mask
    dtype: torch.dtype
    shape: tuple[int, ...]
    kept: int = 0  # entries stored (bitmask, nm)
    mask_dtype: torch.dtype | None = None  # pruned tensors
    n: int = 0  # nm
    m: int = 0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def stored(self) -> Stored:
        """The tensors of the file that hold this one: name, dtype and shape."""
        if self.encoding == "dense":
            return {self.name: (self.dtype, self.shape)}
        values = (self.dtype, (self.kept,))
        if self.encoding == "bitmask":
            return {f"{self.name}:bits": (torch.uint8, (_packed_bytes(self.numel),)), f"{self.name}:values": values}
        codes = _packed_bytes(self.numel // self.m * _code_bits(self.n, self.m))
        return {f"{self.name}:codes": (torch.uint8, (codes,)), f"{self.name}:values": values}

    def loads_as(self) -> tuple[str, ...]:
        """The state_dict keys it loads as."""
        return (self.name + "_orig", self.name + "_mask") if self.pruned else (self.name,)

    def decoded_bytes(self) -> int:
        mask = self.numel * self.mask_dtype.itemsize if self.mask_dtype is not None else 0
        return self.numel * self.dtype.itemsize + mask

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "encoding": self.encoding,
            "pruned": self.pruned,
            "dtype": _NAMES[self.dtype],
            "shape": list(self.shape),
        }
        if self.mask_dtype is not None:
            out["mask_dtype"] = _NAMES[self.mask_dtype]
        if self.encoding != "dense":
            out["kept"] = self.kept
        if self.encoding == "nm":
            out.update(n=self.n, m=self.m)
        return out


def _packed_bytes(bits: int) -> int:
    """Bytes that ``bits`` packed bits take: whole 8-byte words, so the next tensor stays aligned."""
    return -(-bits // 64) * 8


def _code_bits(n: int, m: int) -> int:
    return (math.comb(m, n) - 1).bit_length()


# --- writing ----------------------------------------------------------------------------------------------


def write(path: str | os.PathLike[str], state_dict: Mapping[str, Any], checkpoint: Mapping[str, Any]) -> dict[str, str]:
    """Write ``state_dict`` (``<name>_orig``/``<name>_mask`` pairs as pruned tensors) and the checkpoint
    record ``checkpoint`` (JSON-able) as a sparse file, atomically; returns each tensor's encoding (or
    ``same_as <name>`` for a tied one)."""
    if sys.byteorder != "little":
        raise OutputError(f"{path}: the sparse format is little-endian; save on a little-endian machine")
    sources, aliases = _sources(path, state_dict)
    with one_thread():  # many small elementwise passes: a second thread only waits on a busy core
        entries = {name: _choose(name, orig, mask) for name, (orig, mask) in sources.items()}
    makers: list[tuple[str, torch.dtype, tuple[int, ...], Callable[[], torch.Tensor]]] = []
    for name, entry in entries.items():
        made = _encoder(entry, *sources[name])
        for key, (dtype, shape) in entry.stored().items():
            makers.append((key, dtype, shape, functools.partial(made, key)))
    names = [key for key, _, _, _ in makers]
    if len(set(names)) < len(names):  # a tensor named "a:bits" beside a bitmask-encoded "a"
        clash = next(key for key in names if names.count(key) > 1)
        raise OutputError(f"{path}: two tensors would be stored as {clash!r}; rename one, or save with format='pt'")
    makers.sort(key=lambda item: -item[1].itemsize)  # stable: larger items first keeps every tensor aligned
    tensors: dict[str, Any] = {}
    offset = 0
    for key, dtype, shape, _ in makers:
        size = math.prod(shape) * dtype.itemsize
        code = _DTYPES[_NAMES[dtype]][1]
        tensors[key] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    described: dict[str, Any] = {}
    for key, _ in _logical(state_dict):
        if key in entries:
            described[key] = entries[key].to_json()
        elif key in aliases:
            described[key] = {"same_as": aliases[key]}
    doc = {"format": FORMAT_NAME, "version": VERSION, "tensors": described, "checkpoint": dict(checkpoint)}
    tensors["__metadata__"] = {"prunespec": json.dumps(doc, separators=(",", ":"))}
    header = json.dumps(tensors, separators=(",", ":")).encode("utf-8")
    header += b" " * (-len(header) % 8)

    def write_file(file: BinaryIO) -> None:
        file.write(struct.pack("<Q", len(header)))
        file.write(header)
        with one_thread():
            for key, dtype, shape, make in makers:
                tensor = make().contiguous()
                assert tensor.dtype == dtype and tuple(tensor.shape) == shape, key
                _write_tensor(file, tensor)

    atomic_write(path, write_file)
    return {name: entries[name].encoding if name in entries else f"same_as {aliases[name]}" for name in described}


def _logical(state_dict: Mapping[str, Any]) -> list[tuple[str, bool]]:
    """Each tensor's name and whether it is pruned, in state_dict order: a ``<name>_orig`` and
    ``<name>_mask`` pair is one pruned tensor ``<name>``, at its ``_orig``."""
    out: list[tuple[str, bool]] = []
    for key in state_dict:
        orig = key.endswith("_orig") and key.removesuffix("_orig") + "_mask" in state_dict
        mask = key.endswith("_mask") and key.removesuffix("_mask") + "_orig" in state_dict
        if orig:
            out.append((key.removesuffix("_orig"), True))
        elif not mask:
            out.append((key, False))
    return out


def _sources(
    path: str | os.PathLike[str], state_dict: Mapping[str, Any]
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor | None]], dict[str, str]]:
    """(the tensors to store: name -> (values, mask or None), the tied ones: name -> name stored)."""
    sources: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[Any, ...], str] = {}
    for name, pruned in _logical(state_dict):
        if name in sources or name in aliases:
            raise OutputError(f"{path}: {name} is in the state_dict both pruned and not ({name}_orig, {name}_mask)")
        keys = [name + "_orig", name + "_mask"] if pruned else [name]
        for key in keys:
            tensor = state_dict[key]
            if not isinstance(tensor, torch.Tensor):
                raise OutputError(f"{path}: {key} is {a_type(tensor)}; the sparse format stores only tensors")
            if tensor.is_meta or tensor.layout != torch.strided or tensor.dtype not in _NAMES:
                what = "on the meta device" if tensor.is_meta else f"a {tensor.layout} {tensor.dtype} tensor"
                raise OutputError(f"{path}: {key} is {what}; the sparse format stores dense tensors of plain dtypes")
        orig = state_dict[keys[0]].detach()
        mask = state_dict[keys[1]].detach() if pruned else None
        if mask is not None and mask.shape != orig.shape:
            raise OutputError(f"{path}: {name}_mask has shape {list(mask.shape)}, {name}_orig {list(orig.shape)}")
        identity = tuple(_identity(t) for t in (orig, mask) if t is not None)
        if orig.numel() > 0 and identity in seen:
            aliases[name] = seen[identity]
            continue
        seen[identity] = name
        sources[name] = (orig, mask)
    return sources, aliases


def _identity(tensor: torch.Tensor) -> tuple[Any, ...]:
    return (tensor.device, tensor.data_ptr(), tensor.dtype, tuple(tensor.shape), tensor.stride())


def _kept(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Where the entries to store are: the mask's ones, or a plain tensor's nonzero entries."""
    return (mask if mask is not None else values) != 0


def _choose(name: str, values: torch.Tensor, mask: torch.Tensor | None) -> Entry:
    """The smallest encoding of one tensor (dense on a tie; only floating-point plain tensors are encoded)."""
    shape, dtype = tuple(values.shape), values.dtype
    if mask is None and (not dtype.is_floating_point or values.dim() == 0 or values.numel() == 0):
        return Entry(name, "dense", False, dtype, shape)
    if mask is not None:
        wrong = (mask != 0) & (mask != 1)
        if bool(wrong.any()):
            raise OutputError(
                f"{name}_mask holds {mask[wrong].reshape(-1)[0].item()!r}; the sparse format stores a mask as bits "
                "(0 and 1): save this model with format='pt'"
            )
    kept = _kept(values, mask)
    count = int(torch.count_nonzero(kept))  # a bool's sum() widens every entry to int64 first
    mask_dtype = mask.dtype if mask is not None else None
    options = [Entry(name, "bitmask", mask is not None, dtype, shape, count, mask_dtype)]
    if mask is None:
        options.insert(0, Entry(name, "dense", False, dtype, shape))
    nm = _nm_of(kept, count)
    if nm is not None:
        options.append(Entry(name, "nm", mask is not None, dtype, shape, count, mask_dtype, *nm))
    return min(options, key=lambda e: sum(math.prod(s) * d.itemsize for d, s in e.stored().values()))


def _nm_of(kept: torch.Tensor, count: int) -> tuple[int, int] | None:
    """``(n, m)`` with the smallest codes for which ``kept`` has exactly ``n`` in every ``m`` along the
    last dim, or None."""
    if kept.dim() == 0 or kept.numel() == 0:
        return None
    numel, last = kept.numel(), kept.shape[-1]
    best: tuple[int, int, int] | None = None
    for m in range(2, MAX_GROUP + 1):
        if last % m or (count * m) % numel or not 0 < count * m // numel < m:
            continue
        n = count * m // numel
        groups = kept.reshape(-1, m)
        if not bool((groups[:256].sum(1) == n).all()) or not bool((groups.sum(1) == n).all()):
            continue
        bits = numel // m * _code_bits(n, m)
        if best is None or bits < best[0]:
            best = (bits, n, m)
    return None if best is None else (best[1], best[2])


def _encoder(entry: Entry, values: torch.Tensor, mask: torch.Tensor | None) -> Callable[[str], torch.Tensor]:
    """A function that makes each of ``entry``'s stored tensors, by name, when it is written (one tensor's
    pattern at a time in memory)."""

    def make(key: str) -> torch.Tensor:
        if entry.encoding == "dense":
            return values.cpu()
        kept = _kept(values, mask).cpu()
        if key.endswith(":values"):
            return values.cpu()[kept]
        if entry.encoding == "bitmask":
            return _pack(kept.reshape(-1))
        return _pack_codes(kept, entry.n, entry.m)

    return make


def _write_tensor(file: BinaryIO, tensor: torch.Tensor) -> None:
    size = tensor.numel() * tensor.element_size()
    if size:  # the tensor's own bytes, without a copy (and without numpy)
        file.write((ctypes.c_char * size).from_address(tensor.data_ptr()))


# --- bits ---------------------------------------------------------------------------------------------------


def _pack(bits: torch.Tensor) -> torch.Tensor:
    """1-D booleans -> uint8, 8 a byte (least significant first), zero-padded to whole 8-byte words."""
    padded = torch.zeros(_packed_bytes(bits.numel()) * 8, dtype=torch.uint8)
    padded[: bits.numel()] = bits
    grouped = padded.view(-1, 8)
    out = torch.zeros(grouped.shape[0], dtype=torch.uint8)
    for j in range(8):
        out |= grouped[:, j] << j
    return out


def _unpack(packed: torch.Tensor, count: int) -> tuple[torch.Tensor, bool]:
    """The first ``count`` bits of ``packed`` as booleans, and whether every bit after them is zero."""
    bits = torch.empty(packed.numel(), 8, dtype=torch.bool)
    for j in range(8):
        bits[:, j] = (packed >> j) & 1
    flat = bits.view(-1)
    return flat[:count], not bool(flat[count:].any())


@functools.lru_cache(maxsize=32)
def _patterns(n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(every pattern of ``n`` kept in ``m``, as rows of booleans in lexicographic order; each ``m``-bit
    word's pattern number, -1 for a word that is no such pattern)."""
    combos = list(itertools.combinations(range(m), n))
    table = torch.zeros(len(combos), m, dtype=torch.bool)
    for i, combo in enumerate(combos):
        table[i, list(combo)] = True
    words = (table.to(torch.int64) << torch.arange(m)).sum(1)
    number = torch.full((1 << m,), -1, dtype=torch.int64)
    number[words] = torch.arange(len(combos))
    return table, number


def _pack_codes(kept: torch.Tensor, n: int, m: int) -> torch.Tensor:
    groups = kept.reshape(-1, m)
    words = torch.zeros(groups.shape[0], dtype=torch.int32)
    for j in range(m):
        words |= groups[:, j].to(torch.int32) << j
    codes = _patterns(n, m)[1][words]
    width = _code_bits(n, m)
    bits = torch.empty(groups.shape[0], width, dtype=torch.bool)
    for j in range(width):
        bits[:, j] = (codes >> j) & 1
    return _pack(bits.view(-1))


# --- reading ------------------------------------------------------------------------------------------------


def read(
    path: str | os.PathLike[str], *, limit: int | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """The state_dict a safetensors file holds and the checkpoint record of a sparse file (None for a
    plain safetensors state_dict, whose tensors are returned as they are).

    Everything is checked before a tensor is decoded: CheckpointError names the tensor and what is
    wrong. ``limit`` bounds the bytes the decoded tensors may take.
    """
    with _open(path) as file:
        metadata, stored = _header(path, file)
        raw = metadata.get("prunespec")
        if not isinstance(raw, str):  # a plain safetensors state_dict (no prunespec metadata)
            total = sum(math.prod(shape) * dtype.itemsize for dtype, shape in stored.values())
            _check_limit(path, total, limit)
            return {key: _get(path, file, key) for key in stored}, None
        doc, entries, aliases = _document(path, raw, stored)
        _check_limit(path, sum(entry.decoded_bytes() for entry in entries.values()), limit)
        with one_thread():  # as when writing
            decoded = {name: _decode(path, file, entry) for name, entry in entries.items()}
    state_dict: dict[str, torch.Tensor] = {}
    for name in doc["tensors"]:
        entry = entries[aliases.get(name, name)]
        for suffix, tensor in zip(("_orig", "_mask") if entry.pruned else ("",), decoded[entry.name], strict=True):
            state_dict[name + suffix] = tensor
    checkpoint = doc.get("checkpoint")
    return state_dict, dict(checkpoint) if checkpoint is not None else None


def contents(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """Each tensor's metadata entry in a sparse file, checked as :func:`read` checks it (nothing is
    decoded), with ``bytes``: what its stored tensors take in the file (0 for a tied one)."""
    with _open(path) as file:
        metadata, stored = _header(path, file)
        raw = metadata.get("prunespec")
        if not isinstance(raw, str):
            raise CheckpointError(f"{path}: a safetensors file without prunespec's metadata (not a sparse file)")
        doc, found, _ = _document(path, raw, stored)
    out: dict[str, dict[str, Any]] = {}
    for name, entry in doc["tensors"].items():
        size = 0
        if name in found:
            size = sum(math.prod(shape) * dtype.itemsize for dtype, shape in found[name].stored().values())
        out[name] = {**entry, "bytes": size}
    return out


def _open(path: str | os.PathLike[str]) -> Any:
    try:
        return safe_open(os.fspath(path), framework="pt")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file: {_short(exc)}") from None


def _header(path: str | os.PathLike[str], file: Any) -> tuple[dict[str, Any], Stored]:
    """The file's metadata and its tensors' dtypes and shapes, from the header that ``safe_open`` (the
    open ``file``) has already checked; dtypes prunespec does not know are refused."""
    try:
        with open(path, "rb") as raw:
            table = json.loads(raw.read(struct.unpack("<Q", raw.read(8))[0]))
        metadata = table.pop("__metadata__", None) or {}
        declared = {key: (info["dtype"], tuple(info["shape"])) for key, info in table.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError, struct.error) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file: {_short(exc)}") from None
    if sorted(declared) != sorted(file.keys()):
        raise CheckpointError(f"{path}: the file changed while it was read (another process wrote it?); load it again")
    stored = {}
    for key, (code, shape) in declared.items():
        if code not in _CODES:
            raise CheckpointError(f"{path}: tensor {key!r} is of safetensors dtype {code}, which prunespec cannot read")
        stored[key] = (_CODES[code], shape)
    return metadata, stored


def _get(path: str | os.PathLike[str], file: Any, key: str) -> torch.Tensor:
    try:
        tensor: torch.Tensor = file.get_tensor(key)
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: tensor {key!r} cannot be read: {_short(exc)}") from None
    return tensor


def _check_limit(path: str | os.PathLike[str], total: int, limit: int | None) -> None:
    if limit is not None and total > limit:
        raise CheckpointError(
            f"{path}: its tensors decode to {total} bytes, more than a checkpoint of this model can need ({limit}); "
            "is it the right file?"
        )


def _document(
    path: str | os.PathLike[str], raw: str, stored: Stored
) -> tuple[dict[str, Any], dict[str, Entry], dict[str, str]]:
    """The metadata document, its entries (tied ones apart: name -> name stored), all checked against
    the tensors the file holds."""
    if len(raw) > METADATA_LIMIT:
        raise CheckpointError(f"{path}: prunespec's metadata is {len(raw)} characters, more than {METADATA_LIMIT}")
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise CheckpointError(f"{path}: prunespec's metadata is not valid JSON: {_short(exc)}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        got = doc.get("format") if isinstance(doc, dict) else a_type(doc)
        raise CheckpointError(f"{path}: prunespec's metadata names format {got!r}; expected {FORMAT_NAME!r}")
    unknown = sorted(set(doc) - {"format", "version", "tensors", "checkpoint"})
    if unknown:
        raise CheckpointError(f"{path}: prunespec's metadata has an unknown key {unknown[0]!r} (a newer prunespec?)")
    if doc.get("version") != VERSION or isinstance(doc.get("version"), bool):
        raise CheckpointError(
            f"{path}: sparse format version {doc.get('version')!r}; this prunespec reads version {VERSION} "
            "(a newer prunespec wrote it?)"
        )
    tensors, checkpoint = doc.get("tensors"), doc.get("checkpoint")
    if not isinstance(tensors, dict):
        raise CheckpointError(f"{path}: prunespec's `tensors` is {a_type(tensors)}; expected a mapping of names")
    if checkpoint is not None and not isinstance(checkpoint, dict):
        raise CheckpointError(f"{path}: prunespec's `checkpoint` is {a_type(checkpoint)}; expected a mapping")
    found: dict[str, Entry] = {}
    aliases: dict[str, str] = {}
    for name, raw_entry in tensors.items():
        if isinstance(raw_entry, dict) and "same_as" in raw_entry:
            aliases[name] = _alias(path, name, raw_entry, tensors)
        else:
            found[name] = _entry(path, name, raw_entry)
    keys: dict[str, str] = {}
    for name in tensors:
        target = aliases.get(name, str(name))
        for key in found[target].loads_as():
            loaded = name + key.removeprefix(target)
            if loaded in keys:
                raise CheckpointError(f"{path}: tensors {keys[loaded]!r} and {name!r} both load as {loaded!r}")
            keys[loaded] = name
    expected = {key: (entry.name, spec) for entry in found.values() for key, spec in entry.stored().items()}
    extra = sorted(set(stored) - set(expected))
    if extra:
        raise CheckpointError(f"{path}: the file holds tensor {extra[0]!r}, which no metadata entry describes")
    for key, (name, (dtype, shape)) in expected.items():
        if key not in stored:
            raise CheckpointError(f"{path}: tensor {name!r}: {key!r} is not in the file")
        if stored[key] != (dtype, shape):
            raise CheckpointError(
                f"{path}: tensor {name!r}: {key!r} is {_NAMES[stored[key][0]]} {list(stored[key][1])} in the file, "
                f"but its entry needs {_NAMES[dtype]} {list(shape)}"
            )
    return doc, found, aliases


_KEYS = {
    "dense": {"encoding", "pruned", "dtype", "shape"},
    "bitmask": {"encoding", "pruned", "dtype", "shape", "kept"},
    "nm": {"encoding", "pruned", "dtype", "shape", "kept", "n", "m"},
}


def _entry(path: str | os.PathLike[str], name: str, raw: Any) -> Entry:
    where = f"{path}: tensor {name!r}"
    if not isinstance(raw, dict):
        raise CheckpointError(f"{where}: its entry is {a_type(raw)}; expected a mapping")
    encoding = raw.get("encoding")
    if encoding not in _KEYS:
        raise CheckpointError(
            f"{where}: unknown encoding {encoding!r}; this prunespec reads {', '.join(ENCODINGS)} (a newer prunespec?)"
        )
    pruned = raw.get("pruned")
    if not isinstance(pruned, bool):
        raise CheckpointError(f"{where}: `pruned` is {pruned!r}; expected true or false")
    if pruned and encoding == "dense":
        raise CheckpointError(f"{where}: a pruned tensor is stored as bitmask or nm, not dense")
    allowed = _KEYS[encoding] | ({"mask_dtype"} if pruned else set())
    wrong = sorted(set(raw) ^ allowed)
    if wrong:
        problem = "unknown key" if wrong[0] in raw else "no key"
        raise CheckpointError(f"{where}: {problem} {wrong[0]!r}; a {encoding} entry has {', '.join(sorted(allowed))}")
    dtype = _dtype(where, "dtype", raw["dtype"])
    shape = raw["shape"]
    if not isinstance(shape, list) or len(shape) > 64 or not all(_is_int(s) and s >= 0 for s in shape):
        raise CheckpointError(f"{where}: `shape` is {shape!r}; expected a list of sizes >= 0")
    numel = math.prod(shape)
    mask_dtype = _dtype(where, "mask_dtype", raw["mask_dtype"]) if pruned else None
    if encoding == "dense":
        return Entry(name, encoding, False, dtype, tuple(shape))
    kept = raw["kept"]
    if not _is_int(kept) or not 0 <= kept <= numel:
        raise CheckpointError(f"{where}: `kept` is {kept!r}; expected a count in 0..{numel}")
    if encoding == "bitmask":
        return Entry(name, encoding, pruned, dtype, tuple(shape), kept, mask_dtype)
    n, m = raw["n"], raw["m"]
    if not (_is_int(n) and _is_int(m) and 2 <= m <= MAX_GROUP and 0 < n < m):
        raise CheckpointError(f"{where}: n={n!r}, m={m!r}; expected 0 < n < m <= {MAX_GROUP}")
    if not shape or shape[-1] % m:
        raise CheckpointError(f"{where}: shape {shape} has no last dim that groups of m={m} divide")
    if kept != numel // m * n:
        raise CheckpointError(f"{where}: `kept` is {kept}; {n} of every {m} of {numel} entries is {numel // m * n}")
    return Entry(name, encoding, pruned, dtype, tuple(shape), kept, mask_dtype, n, m)


def _alias(path: str | os.PathLike[str], name: str, raw: dict[str, Any], tensors: Mapping[str, Any]) -> str:
    target = raw["same_as"]
    if set(raw) != {"same_as"}:
        raise CheckpointError(f"{path}: tensor {name!r}: a tied entry has only `same_as`")
    stored = tensors.get(target) if isinstance(target, str) else None
    if not isinstance(stored, dict) or "same_as" in stored:
        raise CheckpointError(f"{path}: tensor {name!r}: `same_as` is {target!r}; expected a tensor the file stores")
    return str(target)


def _dtype(where: str, key: str, value: Any) -> torch.dtype:
    if not isinstance(value, str) or value not in _DTYPES:
        raise CheckpointError(f"{where}: `{key}` is {value!r}; expected one of {', '.join(_DTYPES)}")
    return _DTYPES[value][0]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _decode(path: str | os.PathLike[str], file: Any, entry: Entry) -> tuple[torch.Tensor, ...]:
    """The tensor(s) of one entry: the plain tensor, or ``(orig, mask)`` for a pruned one."""
    where = f"{path}: tensor {entry.name!r}"
    if entry.encoding == "dense":
        return (_get(path, file, entry.name),)
    values = _get(path, file, entry.name + ":values")
    if entry.encoding == "bitmask":
        kept, padding_clear = _unpack(_get(path, file, entry.name + ":bits"), entry.numel)
        if not padding_clear:
            raise CheckpointError(f"{where}: the padding after its {entry.numel} mask bits is not zero")
        count = int(torch.count_nonzero(kept))
        if count != entry.kept:
            raise CheckpointError(f"{where}: its bits mark {count} kept entries, but it stores {entry.kept} values")
    else:
        groups, width = entry.numel // entry.m, _code_bits(entry.n, entry.m)
        bits, padding_clear = _unpack(_get(path, file, entry.name + ":codes"), groups * width)
        if not padding_clear:
            raise CheckpointError(f"{where}: the padding after its {groups * width} code bits is not zero")
        codes = torch.zeros(groups, dtype=torch.int64)
        grouped = bits.view(groups, width)
        for j in range(width):
            codes |= grouped[:, j].to(torch.int64) << j
        table = _patterns(entry.n, entry.m)[0]
        if groups and int(codes.max()) >= table.shape[0]:
            raise CheckpointError(
                f"{where}: a group's code {int(codes.max())} is no pattern of {entry.n} in {entry.m} "
                f"(there are {table.shape[0]})"
            )
        kept = table[codes].view(-1)
    out = torch.zeros(entry.numel, dtype=entry.dtype)
    out[kept] = values
    if not entry.pruned:
        return (out.view(entry.shape),)
    assert entry.mask_dtype is not None
    return out.view(entry.shape), kept.to(entry.mask_dtype).view(entry.shape)


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}"
