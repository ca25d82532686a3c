"""Mask arithmetic shared by the planner, the engine and the methods: what an amount counts, how many
units are pruned, and the bounds of a global budget.

A *unit* is what a method's ``amount`` and ``sparsity`` count: single entries, whole channels along a
``dim``, or blocks. Each :class:`Unit` maps a tensor's shape to a grid of units (the shape of per-unit
scores), reads which units a mask prunes whole, and expands a per-unit decision back to an entry mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral

import torch

from . import distributed


def n_to_prune(amount: float | int, size: int) -> int:
    """How many of ``size`` units ``amount`` prunes, rounded exactly as ``torch.nn.utils.prune`` does:
    an integer is a count, a float is ``round(amount * size)`` (round half to even)."""
    if isinstance(amount, Integral):
        return int(amount)
    return round(float(amount) * size)


def to_prune(amount: float | int | None, sparsity: float | None, left: int, total: int, done: float) -> int | None:
    """Units a step prunes now, of ``left`` unpruned (``total`` in all, ``done`` pruned): ``sparsity``
    brings the total to ``round(sparsity * total)`` (never un-pruning), ``amount`` is torch's count or
    fraction of what is left; None with neither. The caller checks the result against ``left``."""
    if sparsity is not None:
        return max(0, round(sparsity * total) - round(done))
    if amount is None:
        return None
    return n_to_prune(amount, left)


def row_targets(amount: float | int | None, sparsity: float | None, done: list[int], row_len: int) -> list[int]:
    """Entries each row has pruned after a step that compares within rows (each row on its own).

    ``done``: entries each row has pruned so far. ``sparsity`` brings every row to ``round(sparsity *
    row_len)`` (never un-pruning); a fraction ``amount`` prunes ``round(amount * left)`` more of each
    row's ``left``; an integer ``amount`` is a count per row. Raises ValueError when a count exceeds
    what a row has left.
    """
    if sparsity is not None:
        target = round(sparsity * row_len)
        return [max(d, target) for d in done]
    assert amount is not None
    out = []
    for d in done:
        k = n_to_prune(amount, row_len - d)
        if k > row_len - d:
            raise ValueError(f"amount={amount} is a count per row, more than the {row_len - d} entries a row has left")
        out.append(d + k)
    return out


@dataclass(frozen=True)
class Misfit:
    """Why a tensor cannot be cut into a method's units; ``option``: the option at fault, if one is."""

    message: str
    option: str | None = None


class Unit:
    """What an amount counts in a tensor. Subclasses say how units tile the tensor."""

    name = "units"

    def grid(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of one score (or one keep flag) per unit."""
        raise NotImplementedError

    def check(self, shape: tuple[int, ...]) -> Misfit | None:
        """Why a tensor of ``shape`` cannot be cut into these units, or None."""
        return None

    def count(self, shape: tuple[int, ...]) -> int:
        """How many units a tensor of ``shape`` has."""
        return math.prod(self.grid(shape))

    def reduce(self, mask: torch.Tensor) -> torch.Tensor:
        """Per unit (a bool tensor of :meth:`grid` shape): True where the mask prunes the unit whole."""
        raise NotImplementedError

    def expand(self, keep: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """An entry mask (bool, ``shape``) from a per-unit keep flag."""
        raise NotImplementedError

    def pruned(self, mask: torch.Tensor) -> int:
        """How many units ``mask`` prunes whole (of a DTensor mask whose units lie whole on one rank
        each, over every rank)."""
        return distributed.whole_count(mask, lambda part: int(torch.count_nonzero(self.reduce(part))))


@dataclass(frozen=True)
class Entries(Unit):
    """Every entry is a unit (unstructured pruning)."""

    name = "entries"

    def grid(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return shape

    def reduce(self, mask: torch.Tensor) -> torch.Tensor:
        return mask == 0

    def expand(self, keep: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        return keep.reshape(shape)

    def pruned(self, mask: torch.Tensor) -> int:
        return zeros(mask)


@dataclass(frozen=True)
class Channels(Unit):
    """Whole slices along ``dim`` (structured pruning: ``dim=0`` is output channels, rows of a Linear)."""

    dim: int
    name = "channels"

    def check(self, shape: tuple[int, ...]) -> Misfit | None:
        if len(shape) < 2:
            return Misfit(f"structured pruning needs a tensor of 2 or more dims; this one has shape {list(shape)}")
        if not -len(shape) <= self.dim < len(shape):
            bounds = f"[{-len(shape)}, {len(shape) - 1}]"
            return Misfit(f"dim={self.dim} is out of range for shape {list(shape)}; use a dim in {bounds}", "dim")
        return None

    def grid(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (shape[self.dim % len(shape)],)

    def reduce(self, mask: torch.Tensor) -> torch.Tensor:
        dim = self.dim % mask.dim()
        return (mask == 0).all(dim=[d for d in range(mask.dim()) if d != dim])

    def expand(self, keep: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        view = [1] * len(shape)
        view[self.dim % len(shape)] = -1
        return keep.reshape(view).expand(shape)


@dataclass(frozen=True)
class Blocks(Unit):
    """Rectangular blocks of ``rows`` x ``cols`` entries of a 2-D tensor (block sparsity)."""

    rows: int
    cols: int
    name = "blocks"

    def check(self, shape: tuple[int, ...]) -> Misfit | None:
        if len(shape) != 2:
            return Misfit(f"block pruning needs a 2-D tensor; this one has shape {list(shape)}")
        if shape[0] % self.rows or shape[1] % self.cols:
            return Misfit(f"shape {list(shape)} does not divide into {self.rows}x{self.cols} blocks")
        return None

    def grid(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return (shape[0] // self.rows, shape[1] // self.cols)

    def reduce(self, mask: torch.Tensor) -> torch.Tensor:
        r, c = self.grid(tuple(mask.shape))
        return (mask == 0).reshape(r, self.rows, c, self.cols).all(dim=3).all(dim=1)

    def expand(self, keep: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        return keep.repeat_interleave(self.rows, 0).repeat_interleave(self.cols, 1).reshape(shape)


def pruned_channels(mask: torch.Tensor, dim: int) -> int:
    """How many channels along ``dim`` a mask prunes whole (every entry zero)."""
    return Channels(dim).pruned(mask)


def zeros(mask: torch.Tensor) -> int:
    """The entries a (binary) mask prunes; of a DTensor mask, in the whole tensor (summed over ranks)."""
    return distributed.whole_count(mask, lambda part: part.numel() - int(torch.count_nonzero(part)))


def budget_bounds(
    min_sparsity: float | None, max_sparsity: float | None, sizes: list[int], already: list[int]
) -> tuple[list[int], list[int]]:
    """Each tensor's least and most pruned units under a global rule's min/max_sparsity (never below
    what is already pruned: masks only grow). Bounds round inwards: ceil for the least, floor for the most."""
    low = [max(done, math.ceil((min_sparsity or 0.0) * n)) for n, done in zip(sizes, already, strict=True)]
    cap = 1.0 if max_sparsity is None else max_sparsity
    high = [max(done, math.floor(cap * n)) for n, done in zip(sizes, already, strict=True)]
    return low, high


def bounds_problem(low: int, target: int, high: int, unit: str = "entries") -> str:
    """Why a global budget cannot meet its per-tensor bounds."""
    if target < low:
        return f"min_sparsity needs at least {low} {unit} pruned, but the budget prunes {target}; lower min_sparsity"
    return f"max_sparsity allows at most {high} {unit} pruned, but the budget needs {target}; raise max_sparsity"


_BIT_VALUES = 1 << torch.arange(8, dtype=torch.uint8)


@dataclass(frozen=True)
class Packed:
    """A final mask kept until the install at 1 bit an entry (a bool mask takes 8): what
    ``finalize`` with ``snapshot="memory"`` holds for every pruned tensor while the others are computed."""

    bits: torch.Tensor  # uint8, entry i of the flat mask in bit i % 8 of byte i // 8
    shape: tuple[int, ...]

    def unpack(self, dtype: torch.dtype = torch.bool) -> torch.Tensor:
        """The mask again, bit for bit (``dtype``: bool, or the values' dtype for a product)."""
        weights = _BIT_VALUES.to(self.bits.device)
        flat = (self.bits.unsqueeze(1) & weights).ne_(0).reshape(-1)[: math.prod(self.shape)]
        if dtype == torch.bool:  # bytes of 0 and 1 are bools as they are: no copy
            return flat.view(torch.bool).reshape(self.shape)
        return flat.reshape(self.shape).to(dtype)


_CHUNK = 1 << 18  # entries of a bool mask turned into the values' dtype at a time (1 MiB of float32)


def product(values: torch.Tensor, keep: torch.Tensor, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """``values * keep`` (into ``out``, which may be ``values``: in place). A bool ``keep`` on the CPU is
    turned into the values' dtype a chunk at a time: torch's mixed-dtype product converts the whole mask
    into a temporary first, and its bool conversion is several times slower than a byte's."""
    chunked = (
        keep.dtype == torch.bool
        and values.device.type == "cpu"
        and keep.device == values.device
        and values.is_floating_point()
        and values.shape == keep.shape
        and values.is_contiguous()
        and keep.is_contiguous()
        and (out is None or (out.shape == values.shape and out.is_contiguous() and out.dtype == values.dtype))
    )
    if not chunked:
        return torch.mul(values, keep) if out is None else torch.mul(values, keep, out=out)
    result = torch.empty_like(values) if out is None else out
    flat, flags, into = values.reshape(-1), keep.reshape(-1).view(torch.uint8), result.reshape(-1)
    size = flat.numel()
    buffer = torch.empty(min(_CHUNK, size), dtype=values.dtype)
    for start in range(0, size, _CHUNK):
        stop = min(start + _CHUNK, size)
        factor = buffer[: stop - start]
        factor.copy_(flags[start:stop])
        torch.mul(flat[start:stop], factor, out=into[start:stop])
    return result


class Slab:
    """Where the packed masks of one apply are cut from: a few large buffers. Small allocations (one
    per tensor) that live to the end, scattered among the calibration pass's large temporary ones,
    would keep the allocator from handing the memory freed between them back (wanda on a 1024-wide,
    8-block Llama: about 40 MiB more at the peak)."""

    def __init__(self, chunk: int = 16 << 20) -> None:
        self._chunk = chunk
        self._buffer: torch.Tensor | None = None
        self._used = 0

    def take(self, size: int, device: torch.device) -> torch.Tensor:
        """``size`` bytes (uint8) on ``device``, for as long as the caller holds them."""
        buffer = self._buffer
        if buffer is None or buffer.device != device or self._used + size > buffer.numel():
            buffer = self._buffer = torch.empty(max(self._chunk, size), dtype=torch.uint8, device=device)
            self._used = 0
        out = buffer[self._used : self._used + size]
        self._used += size
        return out


def pack(mask: torch.Tensor, slab: Slab | None = None) -> Packed:
    """``mask`` (any dtype: nonzero keeps) at 1 bit an entry, cut from ``slab`` when given."""
    flat = (mask if mask.dtype == torch.bool else mask != 0).reshape(-1)
    pad = -flat.numel() % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    groups = flat.view(torch.uint8).view(-1, 8)
    size = groups.shape[0]
    bits = (
        slab.take(size, flat.device) if slab is not None else torch.empty(size, dtype=torch.uint8, device=flat.device)
    )
    bits.copy_(groups[:, 0])
    for i in range(1, 8):  # eight strided passes over an eighth of the bytes: cheaper than a product and a sum
        bits |= groups[:, i] << i
    return Packed(bits, tuple(mask.shape))
