"""``wanda``: prune by weight magnitude times input activation norm (Sun et al., 2023, "A Simple and
Effective Pruning Approach for Large Language Models").

The score of weight ``W_ij`` of a Linear layer is ``|W_ij| * ||X_j||_2``, where ``||X_j||_2`` is the L2
norm of input feature ``j`` over every calibration token (the square root of the ``input_sq_norms``
statistic, :mod:`prunespec.calibration`). The lowest scores are pruned:

* ``compare: row`` (default): within each output row, as the paper does; each row prunes
  ``round(amount * entries left in the row)`` (``sparsity``: each row ends at ``round(sparsity * in)``;
  an integer amount is a count per row);
* ``compare: tensor``: across the whole weight, through prunespec's own exact selection;
* ``n``/``m`` (N:M): keep the ``n`` highest-scored of every ``m`` consecutive inputs of each row
  (``n`` is the number KEPT, as in prunespec-nm: ``n: 2, m: 4`` is 2:4); the rule then gives no amount.

``torch.nn.Linear`` weights, ``(out, in)``, and transformers' ``Conv1D`` (GPT-2), whose weight is
``(in, out)``: rows are always output rows. ``scope: global`` is refused: the scores of different
layers are not comparable without a per-layer budget (the paper prunes each layer to the same sparsity).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator

from ..calibration import out_in
from ..masks import n_to_prune, row_targets
from ..selection import prune_rows
from .base import Capabilities, MaskContext, PruningMethod
from .nm import NMOptions, linear_problem


class WandaOptions(NMOptions):
    """Options of ``wanda``."""

    compare: Literal["row", "tensor"] = Field(
        default="row",
        description="row: each output row prunes its own share of its lowest scores (the paper's choice); "
        "tensor: the lowest scores of the whole weight.",
    )

    @model_validator(mode="after")
    def _groups_in_rows(self) -> WandaOptions:
        if self.n is not None and self.compare != "row":
            raise ValueError("N:M groups lie within rows: leave `compare` out with n and m")
        return self


class Wanda(PruningMethod):
    """Prune the weights with the smallest |W_ij| * ||X_j|| (input activation norms from calibration data)."""

    own_random = True  # deterministic
    shards = True  # each score is its own entry's |W_ij| * ||X_j||: right on any rank's part

    name = "wanda"
    Options = WandaOptions
    statistics: ClassVar[tuple[str, ...]] = ("input_sq_norms",)
    amount_replaced_by: ClassVar[tuple[str, ...]] = ("n", "m")

    compare: str
    n: int | None
    m: int | None

    @classmethod
    def capabilities(cls) -> Capabilities:
        # layers' scores are on different scales (activations differ): one budget across them is not
        # Wanda, so scope: global is refused rather than silently favouring some layers
        return dataclasses.replace(super().capabilities(), supports_global=False)

    @classmethod
    def per_row(cls, options: Mapping[str, Any]) -> bool:
        return options.get("compare", "row") == "row" and options.get("n") is None

    @classmethod
    def check_tensor(cls, shape: tuple[int, ...], options: Mapping[str, Any]) -> str | None:
        return linear_problem(cls.name, shape, options)

    def score(self, ctx: MaskContext) -> torch.Tensor:
        weight = out_in(ctx.module, ctx.values)  # (out, in): Conv1D keeps (in, out)
        sums = ctx.statistics.get("input_sq_norms")
        if sums is None:
            raise ValueError("wanda needs the input_sq_norms statistic: pass calibration data (data=...)")
        if sums.shape != (weight.shape[1],):
            raise ValueError(
                f"input_sq_norms has shape {list(sums.shape)}, expected [{weight.shape[1]}] (one per input)"
            )
        norms = sums.to(device=ctx.values.device, dtype=torch.float32).sqrt()
        return out_in(ctx.module, weight.abs().to(torch.float32).mul_(norms.unsqueeze(0)))  # one temporary

    def mask(self, ctx: MaskContext) -> torch.Tensor:
        """N:M (``n``/``m``) masks; with an amount, the mask prunespec's selection gives (for direct calls)."""
        scores = out_in(ctx.module, self.score(ctx))  # (out, in) views throughout, mapped back at the end
        before = None if ctx.mask is None else out_in(ctx.module, ctx.mask)
        default = ctx.default_mask
        if self.n is not None and self.m is not None:
            keep = _nm_keep(scores, before, self.n, self.m)
        else:
            assert self.amount is not None
            done = [0] * scores.shape[0] if before is None else (before == 0).sum(dim=1).tolist()
            if self.compare == "row":
                targets = row_targets(self.amount, None, done, scores.shape[1])
                keep = ~prune_rows(scores, before, targets)
            else:
                flat = scores.reshape(1, -1)
                already = sum(done)
                left = flat.numel() - already
                k = n_to_prune(self.amount, left)
                if k > left:
                    raise ValueError(f"amount={self.amount} is more than the {left} entries left to prune")
                flat_mask = None if before is None else before.reshape(1, -1)
                keep = ~prune_rows(flat, flat_mask, [already + k]).reshape(scores.shape)
        keep = out_in(ctx.module, keep)
        return default * keep.to(default.dtype)


def _nm_keep(scores: torch.Tensor, mask: torch.Tensor | None, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` highest scores of every ``m`` consecutive entries of each row (earlier-pruned ones
    rank lowest, NaN scores highest; ties to the lower index)."""
    ranked = scores.nan_to_num(nan=math.inf)
    if mask is not None:
        ranked = ranked.masked_fill(mask == 0, -math.inf)
    groups = ranked.reshape(-1, m)
    order = torch.sort(groups, dim=1, descending=True, stable=True).indices
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, order[:, :n], True)
    return keep.reshape(scores.shape)
