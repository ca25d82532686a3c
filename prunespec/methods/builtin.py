"""prunespec's built-in methods: torch's own pruning classes, registered like any plugin's.

Because the registered classes *are* ``torch.nn.utils.prune``'s, the masks and the installed hooks are
exactly what the equivalent ``prune.*`` calls give.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch.nn.utils import prune

from ..hookspecs import Register, hookimpl


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


@hookimpl
def prunespec_register_methods(register: Register) -> None:
    register(prune.Identity, name="identity", summary="Prune nothing; installs an all-ones mask.")
    register(
        prune.RandomUnstructured,
        name="random_unstructured",
        summary="Prune entries chosen at random (uniformly).",
    )
    register(
        prune.L1Unstructured,
        name="l1_unstructured",
        summary="Prune the entries with the smallest absolute value.",
        importance=torch.abs,  # lets prunespec select exactly, without topk or concatenation
    )
    register(
        prune.RandomStructured,
        name="random_structured",
        options=DimOptions,
        summary="Prune whole channels along `dim`, chosen at random.",
    )
    register(
        prune.LnStructured,
        name="ln_structured",
        options=LnOptions,
        summary="Prune whole channels along `dim` with the smallest L`n` norm.",
        channel_importance=_channel_norms,  # lets prunespec build the mask in one pass
    )


def _channel_norms(t: torch.Tensor, dim: int, options: Mapping[str, Any]) -> torch.Tensor:
    """The norms ``LnStructured`` ranks channels by, computed by torch's own helper."""
    norms: torch.Tensor = prune._compute_norm(t, options["n"], dim)
    return norms
