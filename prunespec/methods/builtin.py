"""prunespec's built-in methods: torch's own pruning classes, registered like any plugin's.

Each is a :class:`~prunespec.PruningMethod` whose ``hook_class`` is ``torch.nn.utils.prune``'s own class:
the installed hooks are torch's objects, and the masks exactly what the equivalent ``prune.*`` calls give.
They are the first examples of the plugin API: capabilities on the class, registered through the hook.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch.nn.utils import prune

from ..hookspecs import Register, hookimpl
from .base import MaskContext, PruningMethod
from .block_influence import BlockInfluence
from .sparsegpt import SparseGPT
from .wanda import Wanda


class DimOptions(BaseModel):
    """Options of a structured method."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dim: int = Field(description="The dimension whose channels are pruned (0: output channels / rows).")


class LnOptions(DimOptions):
    """Options of ``ln_structured``."""

    n: int | float | Literal["fro"] = Field(
        description="The order of the norm that ranks channels: 1, 2, .inf, -.inf, 0, any float, or 'fro'."
    )

    @field_validator("n")
    @classmethod
    def _no_nan(cls, n: int | float | str) -> int | float | str:
        if isinstance(n, float) and math.isnan(n):
            raise ValueError("n must be a number or 'fro', not NaN")
        return n


class Identity(PruningMethod):
    """Prune nothing; installs an all-ones mask."""

    name = "identity"
    own_random = True
    shards = True
    hook_class = prune.Identity
    takes_amount = False


class RandomUnstructured(PruningMethod):
    """Prune entries chosen at random (uniformly)."""

    name = "random_unstructured"
    own_random = True
    shards = True
    hook_class = prune.RandomUnstructured

    def mask(self, ctx: MaskContext) -> torch.Tensor:
        if ctx.sharding is not None:
            return self._draw_part(ctx)
        if ctx.generators is None:
            return super().mask(ctx)
        # torch's draws (rand_like, then topk), from the spec's own generator; after earlier pruning, on
        # the entries left, as torch's container hands them to the method
        if ctx.mask is None:
            return self._draw(ctx.values, torch.ones_like(ctx.values), ctx)
        left = ctx.mask == 1
        new = ctx.mask.to(ctx.values.dtype, copy=True)
        new[left] = self._draw(ctx.masked[left], ctx.mask[left], ctx).to(new.dtype)
        return new

    def _draw(self, t: torch.Tensor, default: torch.Tensor, ctx: MaskContext) -> torch.Tensor:
        assert ctx.generators is not None
        k = self.n_to_prune(t.nelement())
        mask = default.clone(memory_format=torch.contiguous_format)
        if k:
            prob = torch.rand(t.shape, generator=ctx.generators(t.device), dtype=t.dtype, device=t.device)
            mask.view(-1)[torch.topk(prob.view(-1), k=k).indices] = 0
        return mask

    def _draw_part(self, ctx: MaskContext) -> torch.Tensor:
        """This rank's part of the mask the whole tensor would get: every rank draws the whole tensor's
        random numbers (one tensor of them at a time, the price of agreeing with one process) and keeps
        what falls in its part."""
        sharding = ctx.sharding
        assert sharding is not None
        if ctx.generators is None:
            raise ValueError("random_unstructured on a DTensor needs the spec's `seed` (every rank must draw alike)")
        left = (ctx.mask == 1) if ctx.mask is not None else torch.ones_like(ctx.values, dtype=torch.bool)
        mask = ctx.default_mask.clone(memory_format=torch.contiguous_format)
        if ctx.mask is None:
            k = self.n_to_prune(sharding.numel)
            if k:
                prob = torch.rand(sharding.shape, generator=ctx.generators(ctx.values.device), dtype=ctx.values.dtype)
                chosen = torch.topk(prob.view(-1), k=k).indices
                mask.view(-1)[sharding.local_index(chosen.to(ctx.values.device))[1]] = 0
            return mask
        mine = int(left.sum())
        start, total = sharding.before(mine)  # the left entries, ordered as in the whole tensor
        k = self.n_to_prune(total)
        if k:
            prob = torch.rand(total, generator=ctx.generators(ctx.values.device), dtype=ctx.values.dtype)
            chosen = torch.topk(prob, k=k).indices
            chosen = chosen[(chosen >= start) & (chosen < start + mine)] - start
            mask.view(-1)[left.reshape(-1).nonzero().reshape(-1)[chosen]] = 0
        return mask


class L1Unstructured(PruningMethod):
    """Prune the entries with the smallest absolute value."""

    name = "l1_unstructured"
    own_random = True
    hook_class = prune.L1Unstructured

    def importance(self, t: torch.Tensor) -> torch.Tensor:
        return torch.abs(t)  # elementwise: prunespec selects exactly, without topk or concatenation


class RandomStructured(PruningMethod):
    """Prune whole channels along `dim`, chosen at random."""

    name = "random_structured"
    own_random = True
    PRUNING_TYPE = "structured"
    Options = DimOptions
    unit = "channels"
    hook_class = prune.RandomStructured

    dim: int

    def mask(self, ctx: MaskContext) -> torch.Tensor:
        if ctx.generators is None:
            return super().mask(ctx)
        # torch's draws (one CPU rand per channel, kthvalue), from the spec's own generator; after earlier
        # pruning, on the channels left, as torch's container hands them to the method
        t = ctx.masked
        dim = self.dim % t.dim()
        if ctx.mask is None:
            return self._draw(t, torch.ones_like(t), dim, ctx)
        others = [d for d in range(t.dim()) if d != dim]
        left = ctx.mask.sum(dim=others) != 0
        where: list[Any] = [slice(None)] * t.dim()
        where[dim] = left
        new = ctx.mask.to(t.dtype, copy=True)
        new[tuple(where)] = self._draw(t[tuple(where)], ctx.mask[tuple(where)], dim, ctx).to(new.dtype)
        return new

    def _draw(self, t: torch.Tensor, default: torch.Tensor, dim: int, ctx: MaskContext) -> torch.Tensor:
        assert ctx.generators is not None
        channels = t.shape[dim]
        k = self.n_to_prune(channels)
        if k == 0:
            return default
        prob = torch.rand(channels, generator=ctx.generators("cpu"))
        keep = prob > torch.kthvalue(prob, k=k).values
        where: list[Any] = [slice(None)] * t.dim()
        where[dim] = keep
        mask = torch.zeros_like(t)
        mask[tuple(where)] = 1
        return mask * default.to(dtype=mask.dtype)


class LnStructured(PruningMethod):
    """Prune whole channels along `dim` with the smallest L`n` norm."""

    name = "ln_structured"
    own_random = True
    shards = True  # a channel's norm is its own entries': right on a part that holds whole channels
    PRUNING_TYPE = "structured"
    Options = LnOptions
    unit = "channels"
    hook_class = prune.LnStructured

    @classmethod
    def check_tensor(cls, shape: tuple[int, ...], options: Mapping[str, Any]) -> str | None:
        if options.get("n") == "fro" and len(shape) > 3:
            return (
                f"n='fro' reduces over at most 2 dims, but channels of shape {list(shape)} span {len(shape) - 1}; "
                "use n: 2 (the same norm, for any shape)"
            )
        return None

    def score(self, ctx: MaskContext) -> torch.Tensor:
        # torch's own helper on the masked values: the norms LnStructured ranks channels by
        norms: torch.Tensor = prune._compute_norm(ctx.masked, ctx.options["n"], int(ctx.options["dim"]))
        return norms


@hookimpl
def prunespec_register_methods(register: Register) -> None:
    methods = (Identity, RandomUnstructured, L1Unstructured, RandomStructured, LnStructured, Wanda, SparseGPT)
    for method in (*methods, BlockInfluence):
        register(method)
