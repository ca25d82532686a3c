"""Parameters split across processes: DTensors (FSDP2's ``fully_shard``, tensor parallel), in one place.

prunespec works on each rank's local part of a DTensor parameter and never gathers a whole tensor:
what has to be global (how many entries score below a value, the k-th score near a cut, the order of
tied entries, per-channel scores) is reduced or gathered over the default process group, which every
rank joins in the same order because every rank runs the same plan. A :class:`Sharding` says where a
rank's part lies in the whole; :func:`wrap` makes a local mask the DTensor of its parameter.

Replicated parts (``Replicate()`` placements, or a plain tensor in a sharded run) count once: only
the first replica adds its counts, so sums are the same as in one process.
"""

from __future__ import annotations

import math
import pickle
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeGuard

import torch
import torch.distributed as dist

from .errors import PrunespecError, RankError, ShardingError

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

__all__ = [
    "Channels",
    "Sharding",
    "active",
    "add_up",
    "collective",
    "everywhere",
    "gather",
    "is_dtensor",
    "local",
    "reduce",
    "sharded",
    "sharding_of",
    "wrap",
]


def active() -> bool:
    """Whether a ``torch.distributed`` process group is running in this process."""
    return dist.is_available() and dist.is_initialized()


def is_dtensor(t: object) -> TypeGuard[DTensor]:
    """Whether ``t`` is a DTensor (False, at no cost, in a program that never imported them: importing
    DTensor takes a second, and a model can only hold DTensors once the program has)."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


@dataclass(frozen=True)
class Sharding:
    """Where this rank's part of a DTensor lies: the whole's ``shape``, the part's ``local_shape`` and
    ``offset`` (a box: ``Shard(dim)`` and ``Replicate()`` placements), and whether this rank's part is
    ``counted`` in sums (the first replica of it)."""

    shape: tuple[int, ...]
    local_shape: tuple[int, ...]
    offset: tuple[int, ...]
    counted: bool
    mesh: Any  # torch.distributed.device_mesh.DeviceMesh
    placements: tuple[Any, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def sharded_dims(self) -> set[int]:
        """The tensor dims split across ranks."""
        return {d for d in range(len(self.shape)) if self.local_shape[d] != self.shape[d]} | {
            p.dim for p in self.placements if p.is_shard()
        }

    def before(self, count: int) -> tuple[int, int]:
        """For a tensor split along dim 0 only: ``count`` (this rank's, of something in its part) summed
        over the parts before this one in row-major order, and over all parts. Collective: every rank
        calls it, with its own count."""
        if self.sharded_dims - {0}:
            raise ValueError(f"the tensor is split along dims {sorted(self.sharded_dims)}, not only dim 0")
        starts = gather(torch.tensor([self.offset[0]]), self.counted)
        counts = gather(torch.tensor([count]), self.counted)
        pairs = [(int(s), int(c)) for s, c in zip(starts, counts, strict=True) if s.numel()]
        return sum(c for s, c in pairs if s < self.offset[0]), sum(c for _, c in pairs)

    def global_index(self, flat: torch.Tensor) -> torch.Tensor:
        """Row-major positions in the whole tensor of local row-major positions ``flat``."""
        out = torch.zeros_like(flat)
        rest = flat.clone()
        for d in reversed(range(len(self.shape))):
            size = self.local_shape[d]
            coord = rest % size if size else rest
            rest = rest // size if size else rest
            out += (coord + self.offset[d]) * math.prod(self.shape[d + 1 :])
        return out

    def local_index(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For whole-tensor row-major positions ``flat``: which lie in this rank's part, and their local
        row-major positions (of those that do)."""
        here = torch.ones_like(flat, dtype=torch.bool)
        local = torch.zeros_like(flat)
        rest = flat.clone()
        for d in reversed(range(len(self.shape))):
            coord = rest % self.shape[d] - self.offset[d]
            rest = rest // self.shape[d]
            here &= (coord >= 0) & (coord < self.local_shape[d])
            local += coord * math.prod(self.local_shape[d + 1 :])
        return here, local[here]


def sharding_of(t: torch.Tensor) -> Sharding | None:
    """The :class:`Sharding` of a DTensor; None for a plain tensor. Raises :class:`ShardingError` for a
    layout prunespec cannot work on (partial sums, strided shards, a mesh of some ranks only)."""
    if not is_dtensor(t):
        return None
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    placements = tuple(t.placements)
    for p in placements:
        if type(p) not in (Shard, Replicate):
            raise ShardingError(f"a DTensor placed {p}: prunespec prunes Shard(dim) and Replicate() parts")
    mesh = t.device_mesh
    if mesh.size() != dist.get_world_size():
        raise ShardingError(
            f"a DTensor on a mesh of {mesh.size()} of the {dist.get_world_size()} ranks: prunespec counts over "
            "every rank of the default process group, so the mesh must span them all"
        )
    shape = tuple(t.shape)
    local_shape, offset = compute_local_shape_and_global_offset(t.shape, mesh, placements)
    coordinate = list(mesh.get_coordinate() or [])
    counted = all(c == 0 for c, p in zip(coordinate, placements, strict=False) if isinstance(p, Replicate))
    return Sharding(shape, tuple(local_shape), tuple(offset), counted, mesh, placements)


def sharded(model: torch.nn.Module) -> bool:
    """Whether ``model`` has DTensor parameters in a running process group: prunespec's work on it is
    then collective (every rank plans and applies together)."""
    return active() and any(is_dtensor(p) for p in model.parameters())


def local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local part (a view of the same storage, without autograd), or ``t`` itself."""
    if not is_dtensor(t):
        return t
    with torch.no_grad():
        return t.to_local()


def wrap(part: torch.Tensor, sharding: Sharding | None) -> torch.Tensor:
    """This rank's ``part`` as the DTensor ``sharding`` describes (``part`` itself without one)."""
    if sharding is None:
        return part
    from torch.distributed.tensor import DTensor

    stride = tuple(math.prod(sharding.shape[d + 1 :]) for d in range(len(sharding.shape)))
    return DTensor.from_local(
        part, sharding.mesh, sharding.placements, run_check=False, shape=torch.Size(sharding.shape), stride=stride
    )


# Every collective here starts with a header all-gather of two numbers per rank: (failed?, size). A rank
# that fails sends one header saying so (see :func:`collective`); the others read it in whatever
# collective they are at, so every rank stops together instead of waiting for a rank that has left.
_OK, _FAILED = 0, 1


def _headers(size: int, status: int = _OK) -> list[int]:
    """The sizes every rank sends in this collective; raises the failing rank's error if one failed."""
    world = dist.get_world_size()
    mine = torch.tensor([status, size], dtype=torch.int64)
    everyone = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine)
    if status == _OK and any(int(h[0]) != _OK for h in everyone):
        raise _received(None)
    return [int(h[1]) for h in everyone]


def counted(owner: Sharding | None) -> bool:
    """Whether this rank's part of a tensor adds to sums over ranks: the first replica of a DTensor's
    part, and rank 0's copy of a plain tensor (which every rank holds whole)."""
    return owner.counted if owner is not None else dist.get_rank() == 0


def reduce(values: Sequence[int], owners: Sequence[Sharding | None]) -> list[int]:
    """Sums over ranks of per-tensor counts: each rank's ``values[i]`` where ``owners[i]`` says its part
    is counted (rank 0's for a plain tensor, which every rank holds whole). Without a sharded owner
    nothing is communicated (every rank already has the whole count)."""
    if not any(o is not None for o in owners):
        return list(values)
    _headers(len(values))
    t = torch.tensor([v if counted(o) else 0 for v, o in zip(values, owners, strict=True)], dtype=torch.int64)
    dist.all_reduce(t)
    out: list[int] = t.tolist()
    return out


def whole_count(t: torch.Tensor, count: Callable[[torch.Tensor], int]) -> int:
    """``count(t)``; of a DTensor, ``count`` of each rank's part summed over ranks (collective)."""
    sharding = sharding_of(t)
    if sharding is None:
        return count(t)
    return reduce([count(local(t))], [sharding])[0]


def gather(part: torch.Tensor, counted: bool = True) -> list[torch.Tensor]:
    """Every rank's 1-D ``part`` (an empty one where not ``counted``), in rank order, on ``part``'s
    device. Parts may differ in length (sent padded to the longest)."""
    part = part.reshape(-1) if counted else part.reshape(-1)[:0]
    lengths = _headers(part.numel())
    longest = max(lengths)
    if longest == 0:
        return [part[:0] for _ in lengths]
    padded = torch.zeros(longest, dtype=part.dtype, device=part.device)
    padded[: part.numel()] = part
    parts = [torch.empty_like(padded) for _ in lengths]
    dist.all_gather(parts, padded)
    return [p[:n] for p, n in zip(parts, lengths, strict=True)]


def histogram(values: torch.Tensor, bins: int) -> torch.Tensor:
    """Counts of the integers ``values`` in ``[0, bins)``, summed over ranks (int64, on the CPU)."""
    _headers(bins)
    counts = torch.bincount(values.reshape(-1).cpu(), minlength=bins).to(torch.int64)
    dist.all_reduce(counts)
    return counts


def add_up(part: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of every rank's ``part`` (the same shape on each), the same tensor on every
    rank, in ``part``'s dtype: added in float64, then rounded once. A float sum depends on its order, so
    this equals one process's sum of the same terms only up to rounding (for exact sums of counts, see
    :func:`reduce`). Every rank calls it together."""
    sizes = _headers(part.numel())
    if len(set(sizes)) > 1:  # every rank sees the same sizes, so every rank raises this together
        raise ValueError(f"ranks hold {sorted(set(sizes))} entries each: add_up needs the same shape on every rank")
    total = part.detach().to(torch.float64, copy=True)
    dist.all_reduce(total)
    return total.to(part.dtype)


class Channels:
    """The channels along ``dim`` of a DTensor whose parts hold whole channels (only ``dim`` is split):
    one number per channel put together from every rank, and this rank's share of such numbers."""

    def __init__(self, sharding: Sharding, dim: int) -> None:
        self.sharding, self.dim = sharding, dim
        self.start, self.length = sharding.offset[dim], sharding.local_shape[dim]

    def assemble(self, part: torch.Tensor) -> torch.Tensor:
        """Every rank's per-channel ``part`` in channel order (the same tensor on every rank)."""
        counted = self.sharding.counted
        starts = gather(torch.tensor([self.start]), counted)
        parts = gather(part, counted)
        whole = part.new_zeros(self.sharding.shape[self.dim])
        for start, piece in zip(starts, parts, strict=True):
            if piece.numel():
                whole[int(start) : int(start) + piece.numel()] = piece
        return whole

    def part(self, whole: torch.Tensor) -> torch.Tensor:
        """This rank's channels of a per-channel tensor."""
        return whole[self.start : self.start + self.length]


@contextmanager
def collective(enabled: bool) -> Iterator[None]:
    """Errors raised on every rank: an exception on one rank is raised on every rank, as the same
    error (a :class:`PrunespecError` travels as it is; anything else as a :class:`RankError` naming it),
    instead of leaving the others waiting in a collective. Every rank enters this together; the
    engine computes every mask before it installs any, so no rank is left half-pruned."""
    if not enabled:
        yield
        return
    try:
        yield
    except BaseException as exc:
        if everywhere(exc):
            raise  # every rank knows already
        _headers(0, _FAILED)
        error = _received(exc)
        if error is exc:
            raise
        raise error from exc
    agree_or_raise()


def everywhere(error: BaseException) -> bool:
    """Whether ``error`` was raised on every rank already (received in a collective): pass it on as it
    is; wrapping it in a new error would make :func:`collective` report it again, to ranks that have
    moved on."""
    return bool(getattr(error, "_prunespec_everywhere", False))


def agree_or_raise() -> None:
    """Every rank got here without an error, or this rank raises the first failing rank's error (every
    rank calls this, or fails inside :func:`collective`)."""
    _headers(0)


def _received(failure: BaseException | None) -> BaseException:
    """The error of the lowest failing rank, the same on every rank (``failure``: this rank's own)."""
    sent: BaseException | None = None
    if failure is not None:
        sent = failure if _sendable(failure) else RankError(dist.get_rank(), f"{type(failure).__name__}: {failure}")
    failures: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(failures, sent)
    rank, error = next((r, e) for r, e in enumerate(failures) if e is not None)
    if failure is not None and rank == dist.get_rank():
        error = failure
    error._prunespec_everywhere = True
    return error  # type: ignore[no-any-return]


def _sendable(error: BaseException) -> bool:
    if not isinstance(error, PrunespecError):
        return False
    try:
        pickle.loads(pickle.dumps(error))
    except Exception:
        return False
    return True
