"""N:M sparsity options, shared by the methods that offer it (``wanda``, ``sparsegpt``): ``n`` of every
``m`` consecutive inputs of a row are KEPT (the convention of prunespec-nm: ``n: 2, m: 4`` is 2:4)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

PositiveInt = Annotated[int, Field(strict=True, ge=1)]


class NMOptions(BaseModel):
    """``n``/``m``: give both for N:M sparsity (the rule then gives no amount), or neither."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n: PositiveInt | None = Field(
        default=None,
        description="N:M sparsity: how many of every m consecutive inputs of a row are KEPT (n: 2, m: 4 is 2:4); "
        "with n and m the rule gives no amount or sparsity.",
    )
    m: PositiveInt | None = Field(
        default=None, description="N:M sparsity: the group size, m consecutive inputs of a row (in must be a multiple)."
    )

    @model_validator(mode="after")
    def _n_and_m(self) -> NMOptions:
        if (self.n is None) != (self.m is None):
            raise ValueError("give both n and m for N:M sparsity (n: 2, m: 4 keeps 2 of every 4), or neither")
        if self.n is not None and self.m is not None and self.n >= self.m:
            raise ValueError(f"n={self.n} must be smaller than m={self.m}: n is how many of every m are KEPT")
        return self


def linear_problem(method: str, shape: tuple[int, ...], options: Mapping[str, Any]) -> str | None:
    """Why ``method`` cannot prune a weight of ``shape`` (seen as ``(out, in)``) with these options: it
    is not 2-D, or its inputs are not a multiple of ``m``; None when it can."""
    if len(shape) != 2:
        return f"{method} prunes Linear weights (out, in); this tensor has shape {list(shape)}"
    m = options.get("m")
    if isinstance(m, int) and shape[1] % m:
        return f"the input dimension {shape[1]} of shape {list(shape)} is not a multiple of m={m}"
    return None
