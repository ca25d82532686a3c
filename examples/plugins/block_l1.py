"""prunespec plugin: block sparsity, pruning whole rows x cols blocks with the smallest L1 norm."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from prunespec import Blocks, MaskContext, PruningMethod, Unit, hookimpl
from prunespec.hookspecs import Register

Size = Annotated[int, Field(strict=True, ge=1)]


class BlockOptions(BaseModel):
    """Options of `block_l1`: the block size."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rows: Size = Field(default=4, description="Rows of a block (along dim 0, the outputs of a Linear).")
    cols: Size = Field(default=4, description="Columns of a block (along dim 1, the inputs of a Linear).")


class BlockL1(PruningMethod):
    """Prune whole rows x cols blocks of a 2-D weight with the smallest L1 norm."""

    name = "block_l1"
    # prunespec computes the masks from score(); this only tells torch's PruningContainer to hand the
    # whole tensor to the method should torch ever compose it, since blocks need the 2-D layout
    PRUNING_TYPE = "global"
    Options = BlockOptions
    unit = "blocks"  # `amount: 3` is 3 blocks, `sparsity: 0.3` is 30% of the blocks

    rows: int
    cols: int

    @classmethod
    def units(cls, options: Mapping[str, Any]) -> Unit:
        # Blocks.check refuses, at plan time, tensors that are not 2-D or do not divide into blocks
        return Blocks(options["rows"], options["cols"])

    def score(self, ctx: MaskContext) -> torch.Tensor:
        # the values as the model sees them, so entries pruned earlier no longer count towards a norm
        w = ctx.masked.abs().to(torch.float32)
        grid_rows, grid_cols = w.shape[0] // self.rows, w.shape[1] // self.cols
        return w.reshape(grid_rows, self.rows, grid_cols, self.cols).sum(dim=(1, 3))


@hookimpl
def prunespec_register_methods(register: Register) -> None:
    register(BlockL1)
