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
    hook_class = prune.Identity
    takes_amount = False


class RandomUnstructured(PruningMethod):
    """Prune entries chosen at random (uniformly)."""

    name = "random_unstructured"
    hook_class = prune.RandomUnstructured


class L1Unstructured(PruningMethod):
    """Prune the entries with the smallest absolute value."""

    name = "l1_unstructured"
    hook_class = prune.L1Unstructured

    def importance(self, t: torch.Tensor) -> torch.Tensor:
        return torch.abs(t)  # elementwise: prunespec selects exactly, without topk or concatenation


class RandomStructured(PruningMethod):
    """Prune whole channels along `dim`, chosen at random."""

    name = "random_structured"
    PRUNING_TYPE = "structured"
    Options = DimOptions
    unit = "channels"
    hook_class = prune.RandomStructured


class LnStructured(PruningMethod):
    """Prune whole channels along `dim` with the smallest L`n` norm."""

    name = "ln_structured"
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
    for method in (Identity, RandomUnstructured, L1Unstructured, RandomStructured, LnStructured, Wanda):
        register(method)
