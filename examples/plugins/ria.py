"""prunespec plugin: RIA, relative importance and activations (Zhang et al., ICLR 2024, "Plug-and-Play: An
Efficient Post-training Pruning Method for Large Language Models")."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from prunespec import Capabilities, MaskContext, PruningMethod, hookimpl
from prunespec.calibration import out_in, transposed
from prunespec.hookspecs import Register


class RiaOptions(BaseModel):
    """Options of `ria`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    a: float = Field(
        default=0.5,
        ge=0,
        allow_inf_nan=False,
        description="Exponent of the input activation norm ||X_j|| (the paper's 0.5; 0: relative importance alone).",
    )
    compare: Literal["tensor", "row"] = Field(
        default="tensor",
        description="tensor: the lowest scores of the whole weight (the paper's choice); "
        "row: each output row prunes its own share of its lowest scores, as Wanda does.",
    )


class Ria(PruningMethod):
    """Prune the weights with the lowest relative importance times input activation norm."""

    name = "ria"
    Options = RiaOptions
    statistics = ("input_sq_norms",)  # prunespec collects them on calibration data: apply(..., data=...)

    a: float
    compare: str

    @classmethod
    def capabilities(cls) -> Capabilities:
        # each layer's scores are on its own scale (its size, its activations): one budget across
        # layers would strip some layers first, so `scope: global` is refused at load time
        return dataclasses.replace(super().capabilities(), supports_global=False)

    @classmethod
    def per_row(cls, options: Mapping[str, Any]) -> bool:
        return options.get("compare") == "row"

    @classmethod
    def check_tensor(cls, shape: tuple[int, ...], options: Mapping[str, Any]) -> str | None:
        if len(shape) != 2:
            return f"ria prunes Linear weights (out, in); this tensor has shape {list(shape)}"
        return None

    def score(self, ctx: MaskContext) -> torch.Tensor:
        if self.compare == "row" and transposed(ctx.module):
            # per_row ranks within dim 0, which is an input, not an output, of a weight stored (in, out)
            raise ValueError(
                f"{ctx.name} is stored as (in, out): ria compares rows of (out, in) weights only; use compare: tensor"
            )
        # (out, in) whatever the module's layout; float32: sums of float16 weights lose precision.
        # masked: weights pruned by earlier rules count as zero, as the model computes with them
        w = out_in(ctx.module, ctx.masked).abs().to(torch.float32)
        tiny = torch.finfo(torch.float32).tiny  # a column or row pruned whole sums to 0: its scores stay 0
        relative = w / w.sum(dim=0, keepdim=True).clamp_min(tiny) + w / w.sum(dim=1, keepdim=True).clamp_min(tiny)
        # input_sq_norms[j] is ||X_j||^2, the sum over calibration tokens of input j squared
        sq_norms = ctx.statistics["input_sq_norms"].to(device=w.device, dtype=torch.float32)
        scores = relative * sq_norms.pow(self.a / 2)  # ||X_j||^a
        return out_in(ctx.module, scores).contiguous()  # back to the weight's own layout


@hookimpl
def prunespec_register_methods(register: Register) -> None:
    register(Ria)
