"""``block_influence``: whole blocks scored by how much they change their input (ShortGPT, Men et al.,
2024), for depth pruning with ``group: {unit: blocks}``.

A block's influence is ``1 - cos(x, f(x))`` over the calibration tokens (:func:`prunespec.budgets.
block_influences`); the blocks with the least are removed first. It only scores: the engine
prunes the blocks' residual writers, and shrink removes the blocks.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from .base import MaskContext, PruningMethod


class BlockInfluence(PruningMethod):
    """Every entry of a block's tensors scores the block's influence on the calibration data."""

    name = "block_influence"
    PRUNING_TYPE = "unstructured"
    statistics: ClassVar[tuple[str, ...]] = ("block_influence",)
    own_random = True

    def score(self, ctx: MaskContext) -> torch.Tensor:
        influence = ctx.statistics.get("block_influence")
        if influence is None:
            raise ValueError("block_influence scores whole blocks: use it in a rule with group: {unit: blocks}")
        return torch.full(ctx.values.shape, float(influence), dtype=torch.float32, device=ctx.values.device)
