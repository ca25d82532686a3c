"""prunespec plugin: N:M semi-structured sparsity.

``nm`` keeps the ``n`` largest-magnitude weights of every ``m`` consecutive weights along the input
dimension and prunes the other ``m - n``. **n is the number KEPT**: ``n: 2, m: 4`` ("2:4") keeps 2 of every
4 (50% sparsity), ``n: 1, m: 4`` keeps 1 of every 4 (75% sparsity). Tools disagree on which number is
which; here n is always what survives.

Groups run along dim 1, the input dimension, as NVIDIA's 2:4 sparse tensor cores and their ASP tool
(apex.contrib.sparsity) lay them out:

* ``Linear`` weight ``(out, in)``: each row is cut into groups of ``m`` consecutive inputs;
* ``Conv1d``/``Conv2d``/``Conv3d`` weight ``(out, in, *kernel)``: for each output channel and each kernel
  position, the ``in`` input channels are cut into groups of ``m`` consecutive channels (not the
  flattened ``in * kh * kw``), which is the reduction order of a channels-last implicit GEMM.

``in`` must be a multiple of ``m``; prunespec reports any other tensor (and 1-D tensors such as biases)
as a plan error before anything is changed.

It composes with earlier pruning: entries that are already pruned stay pruned and rank below every
unpruned entry, so a group with ``u >= n`` unpruned entries keeps exactly ``n`` of them, and a group with
fewer keeps just those. Ties are broken towards the lower input index, so masks are deterministic.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, ClassVar

import torch
from prunespec import MaskContext, PruningMethod, hookimpl
from prunespec.hookspecs import Register
from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["NMOptions", "NMPruning", "nm_mask", "prunespec_register_methods"]
__version__ = "0.1.0"

INPUT_DIM = 1
PositiveInt = Annotated[int, Field(strict=True, ge=1)]


class NMOptions(BaseModel):
    """Options of ``nm``: keep ``n`` of every ``m`` consecutive weights along the input dimension."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n: PositiveInt = Field(
        description="How many weights are KEPT in each group of m (n < m): n=2, m=4 is 2:4, which keeps 2 of "
        "every 4 (50% sparsity); n=1, m=4 keeps 1 of every 4 (75% sparsity)."
    )
    m: PositiveInt = Field(
        description="Group size: m consecutive weights along the input dimension (dim 1; input channels of "
        "a convolution), of which n are kept. The input dimension must be a multiple of m."
    )

    @model_validator(mode="after")
    def _n_below_m(self) -> NMOptions:
        if self.n >= self.m:
            raise ValueError(
                f"n={self.n} must be smaller than m={self.m}: n is how many of every m weights are KEPT "
                "(n: 2, m: 4 keeps 2 of every 4)"
            )
        return self


def nm_mask(t: torch.Tensor, default_mask: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` largest ``|t|`` of every ``m`` consecutive entries along dim 1, within ``default_mask``.

    Returns a new mask of ``default_mask``'s dtype and ``t``'s shape: ``default_mask`` times the N:M
    pattern, so entries pruned earlier stay pruned; they also rank lowest when the n are chosen.
    """
    problem = _shape_problem(tuple(t.shape), m)
    if problem:
        raise ValueError(problem)
    score = t.detach().abs().to(torch.float32)
    score = score.masked_fill(default_mask == 0, -1.0)  # |t| >= 0, so earlier-pruned entries rank last
    moved = score.movedim(INPUT_DIM, -1)  # (out, *kernel, in): groups are consecutive along the last dim
    groups = moved.reshape(-1, m)
    order = torch.sort(groups, dim=1, descending=True, stable=True).indices  # ties: lower index first
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, order[:, :n], True)
    keep = keep.reshape(moved.shape).movedim(-1, INPUT_DIM)
    mask = default_mask.clone(memory_format=torch.contiguous_format)
    mask.mul_(keep.to(mask.dtype))
    return mask


def _shape_problem(shape: tuple[int, ...], m: int) -> str | None:
    if len(shape) < 2:
        return (
            f"N:M sparsity needs a weight of 2 or more dims (out, in, ...); this tensor has shape {list(shape)} "
            "(leave biases out with `params: [weight]`)"
        )
    if shape[INPUT_DIM] % m:
        return (
            f"the input dimension (dim 1) of shape {list(shape)} has size {shape[INPUT_DIM]}, which is not a "
            f"multiple of m={m}; N:M groups m consecutive weights along it"
        )
    return None


class NMPruning(PruningMethod):
    """Keep the n largest-magnitude of every m consecutive weights along the input dimension (n:m, e.g. 2:4)."""

    name: ClassVar[str] = "nm"
    # "global" makes torch's PruningContainer hand compute_mask the whole tensor and the whole earlier
    # mask ("unstructured" would hand it a flat vector of the surviving entries and lose the groups).
    PRUNING_TYPE = "global"
    Options: ClassVar[type[BaseModel]] = NMOptions
    takes_amount: ClassVar[bool] = False  # n and m alone decide how much is pruned
    # each group of m lies in one row: a rank's part of a DTensor split along dim 0 is masked on its own
    shards: ClassVar[bool] = True

    n: int
    m: int

    @classmethod
    def check_tensor(cls, shape: tuple[int, ...], options: Mapping[str, Any]) -> str | None:
        m = options.get("m")
        if not isinstance(m, int) or isinstance(m, bool) or m < 1:
            return f"option m must be a positive integer, got {m!r}"
        return _shape_problem(shape, m)

    def mask(self, ctx: MaskContext) -> torch.Tensor:
        sharding = ctx.sharding
        if sharding is not None and INPUT_DIM in sharding.sharded_dims:
            start, length = sharding.offset[INPUT_DIM], sharding.local_shape[INPUT_DIM]
            if start % self.m or length % self.m:
                raise ValueError(
                    f"this rank holds inputs {start}..{start + length - 1} of dim 1, which cut groups of m={self.m}: "
                    "split the tensor along dim 0, or at multiples of m"
                )
        return nm_mask(ctx.values, ctx.default_mask, self.n, self.m)

    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        return nm_mask(t, default_mask, self.n, self.m)


@hookimpl
def prunespec_register_methods(register: Register) -> None:
    register(NMPruning)
