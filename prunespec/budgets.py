"""Per-block sparsity budgets from calibration data: OWL's allocation (Yin et al., ICML 2024).

For every rule with ``owl:``, one calibration pass over the model as it is (nothing pruned on the way,
as OWL measures the dense model) scores each of the rule's weights as Wanda does, ``|W_ij| * ||X_j||``;
a block's outlier ratio is the share of its scores above ``m`` times their mean
(:func:`prunespec.owl.outlier_ratio`), and :func:`prunespec.owl.allocate` turns the ratios into each
block's sparsity, whose mean is the rule's ``sparsity``. Memory: the scores of one block at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from . import calibration, layout, owl
from .blocks import block_of
from .errors import CalibrationError
from .planner import Plan, Step
from .sequential import Pass

__all__ = ["owl_allocations"]

Allocations = dict[int, dict[str, float]]


def owl_allocations(model: nn.Module, plan: Plan, batches: Sequence[Any]) -> Allocations:
    """Each unallocated OWL rule's sparsity per block (rule index -> block name -> sparsity), from
    ``batches``; {} when the plan has none. Raises CalibrationError for a batch the model cannot run."""
    rules = [o for o in plan.owl if o.allocated is None]
    if not rules:
        return {}
    wanted = {o.rule_index: o for o in rules}
    labels = ", ".join(o.rule for o in rules)
    modules = dict(model.named_modules())
    by_module: dict[str, list[Step]] = {}
    for step in plan.steps:
        if step.rule_index in wanted:
            by_module.setdefault(step.tensor.module, []).append(step)
    scores: dict[tuple[int, str], list[torch.Tensor]] = {}
    ratios: dict[int, dict[str, float]] = {index: {} for index in wanted}

    def close(block: str | None) -> None:
        """The outlier ratios of ``block`` (None: of every block still open): its scores are dropped."""
        for index, name in [key for key in scores if block is None or key[1] == block]:
            ratios[index][name] = owl.outlier_ratio(scores.pop((index, name)), wanted[index].m)

    current: str | None = None
    with Pass(model, list(batches), {name: modules[name] for name in by_module}) as calibration_pass:
        for stop, stats in calibration.stops(calibration_pass, lambda _: ("input_sq_norms",), labels):
            module = modules[stop.module]
            block = block_of(stop.module, plan.blocks)
            if block != current:
                close(current)
                current = block
            if block is not None:
                norms = stats["input_sq_norms"].sqrt()
                for step in by_module[stop.module]:
                    weight = calibration.out_in(module, _masked(module, step.tensor.owners[0][1]))
                    score = weight.abs().to(torch.float32) * norms.to(weight.device)
                    scores.setdefault((step.rule_index, block), []).append(score)
            calibration_pass.release(stop.module)
        missing = calibration_pass.unreached()
    close(None)
    if missing:
        raise CalibrationError(labels, f"the model's forward never ran {', '.join(missing)} on the calibration data")
    out: Allocations = {}
    for index, rule in wanted.items():
        found = [b for b in rule.blocks if b in ratios[index]]
        out[index] = dict(
            zip(found, owl.allocate([ratios[index][b] for b in found], rule.target, rule.lam), strict=True)
        )
    return out


def _masked(module: nn.Module, pname: str) -> torch.Tensor:
    """The weight as the model computes with it now (an earlier mask applied)."""
    orig, mask = layout.original(module, pname), layout.mask(module, pname)
    assert orig is not None
    return (orig if mask is None else orig * mask).detach()
