"""What the engine knows of each Parameter it prunes while it works: :class:`Pruned`.

The engine computes masks (and, for a reconstructing method, new values) on these records, on the
side; :mod:`prunespec.install` then writes them into the model, all or nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune

from .distributed import Sharding
from .masks import Packed
from .methods.base import Generators, MaskContext
from .selection import Entry

__all__ = ["Pruned"]


@dataclass
class Pruned:
    """One Parameter the engine prunes: its owners (tied weights share one), its mask so far, the hook
    records to add, and the rules that pruned it."""

    name: str
    module_name: str
    owners: list[tuple[nn.Module, str]]
    orig: torch.Tensor
    mask: torch.Tensor | None
    zeros: int | None = None  # the mask's zeros, when known without counting them again
    new_hooks: list[prune.BasePruningMethod] = field(default_factory=list)
    rules: list[str] = field(default_factory=list)  # labels of the rules that pruned it, in order
    statistics: Mapping[str, torch.Tensor] = field(default_factory=dict)  # its module's calibration statistics
    generators: Generators | None = None  # the spec's seeded generators
    owner_names: list[tuple[str, str]] = field(default_factory=list)  # (module name, parameter) per owner
    values: torch.Tensor | None = None  # new original values, from a method that reconstructs (sparsegpt)
    start: torch.Tensor | None = None  # the mask before this apply
    error: float | None = None  # relative reconstruction error on the calibration data
    blockwise: Mapping[str, torch.Tensor] = field(default_factory=dict)  # statistics of its whole block
    streamed: bool = False  # finalized in place as soon as its mask was ready (snapshot "disk" or "none")
    bits: Packed | None = None  # its final mask at 1 bit an entry, held for the install (then ``mask`` is None)
    # a DTensor's: ``orig``, ``mask`` and ``values`` are then this rank's parts (masks are wrapped at install)
    sharding: Sharding | None = None
    consumable: bool = False  # its method may overwrite ``statistics`` (see MaskContext.statistics_consumable)

    @property
    def shape(self) -> tuple[int, ...]:
        """The whole tensor's shape (on every rank together, for a DTensor)."""
        return self.sharding.shape if self.sharding is not None else tuple(self.orig.shape)

    def entry(self, values: torch.Tensor | None = None) -> Entry:
        """This tensor for :mod:`prunespec.selection` (``values``: scores instead of its values)."""
        return Entry(self.current.detach() if values is None else values, self.mask, self.sharding)

    def final_mask(self) -> torch.Tensor | None:
        """The mask to install: ``mask``, or the packed one unpacked (bool)."""
        return self.bits.unpack() if self.mask is None and self.bits is not None else self.mask

    @property
    def current(self) -> torch.Tensor:
        """The original values as they stand: a reconstructing method's, else the parameter's."""
        return self.orig if self.values is None else self.values

    def context(self, options: Any, *, copy: bool = False) -> MaskContext:
        """What a method sees of this tensor; ``copy``: its own copies to write into."""
        module, pname = self.owners[0]
        values, mask = self.current.detach(), self.mask
        if copy:
            values, mask = values.clone(), None if mask is None else mask.clone()
        statistics = {**self.statistics, **self.blockwise} if self.blockwise else self.statistics
        return MaskContext(
            self.name,
            self.module_name,
            pname,
            module,
            values,
            mask,
            options,
            statistics,
            self.generators,
            self.sharding,
            self.consumable,
        )
