"""prunespec plugin: magnitude pruning weighted by how much each input carries."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from prunespec import MaskContext, PruningMethod, hookimpl
from prunespec.hookspecs import Register


class ColumnWeighted(PruningMethod):
    """Prune the entries with the smallest |w_ij| times the L2 norm of their input column w_:j."""

    name = "column_weighted"

    @classmethod
    def check_tensor(cls, shape: tuple[int, ...], options: Mapping[str, Any]) -> str | None:
        if len(shape) < 2:
            return f"column_weighted needs a weight of 2 or more dims (out, in, ...); this one has shape {list(shape)}"
        return None

    def score(self, ctx: MaskContext) -> torch.Tensor:
        # float32: squares of float16 weights underflow; masked: pruned weights no longer feed a column
        w = ctx.masked.abs().to(torch.float32)
        # one norm per input (per input and kernel position of a convolution), over all outputs
        columns: torch.Tensor = torch.linalg.vector_norm(w, dim=0, keepdim=True)
        return w * columns


@hookimpl
def prunespec_register_methods(register: Register) -> None:
    register(ColumnWeighted)
