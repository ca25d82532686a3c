"""prunespec plugin: prune the weights closest to a value."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from prunespec import PruningMethod, hookimpl
from prunespec.hookspecs import Register


class NearValueOptions(BaseModel):
    """Options of `near_value`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    center: float = Field(
        default=0.0,
        allow_inf_nan=False,
        description="Entries closest to this value are pruned first (0.0: plain magnitude pruning).",
    )


class NearValue(PruningMethod):
    """Prune the entries whose value is closest to `center`."""

    name = "near_value"
    Options = NearValueOptions

    center: float  # set from the options by PruningMethod.__init__

    def importance(self, t: torch.Tensor) -> torch.Tensor:
        return (t - self.center).abs()


@hookimpl
def prunespec_register_methods(register: Register) -> None:
    register(NearValue)
