"""What one dense pass over the calibration data measures per block: OWL's sparsity budgets (Yin et
al., ICML 2024) and ShortGPT's block influence (Men et al., 2024).

For every rule with ``owl:``, one calibration pass over the model as it is (nothing pruned on the way,
as OWL measures the dense model) scores each of the rule's weights as Wanda does, ``|W_ij| * ||X_j||``;
a block's outlier ratio is the share of its scores above ``m`` times their mean
(:func:`prunespec.owl.outlier_ratio`), and :func:`prunespec.owl.allocate` turns the ratios into each
block's sparsity, whose mean is the rule's ``sparsity``. Memory: the scores of one block at a time.

Block influence, for depth pruning (``group: {unit: blocks}`` with ``method: block_influence``), is
``1 - cos(x, f(x))`` averaged over the calibration tokens (padding left out): how little a block
changes its input. The blocks that change it least go first.
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
from .sequential import Pass, attention_mask, run_batch, without_cache

__all__ = ["block_influences", "owl_allocations"]

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
        for stop, stats, _ in calibration.stops(calibration_pass, lambda _: ("input_sq_norms",), labels):
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


def block_influences(model: nn.Module, blocks: Sequence[str], batches: Sequence[Any], rules: str) -> dict[str, float]:
    """Each block's influence ``1 - cos(input, output)``, the mean over the calibration tokens (0: the
    block leaves its input as it is). The model runs as it is, in eval mode, without gradients; hooks
    and mode are restored. Raises CalibrationError naming a batch the model cannot run."""
    modules = dict(model.named_modules())
    totals = {name: 0.0 for name in blocks}
    counts = {name: 0 for name in blocks}
    inputs: dict[str, torch.Tensor] = {}
    keep: list[torch.Tensor | None] = [None]  # the current batch's real (unpadded) tokens, flattened

    def hidden(value: Any) -> torch.Tensor | None:
        if isinstance(value, (tuple, list)) and value:
            value = value[0]
        return value if isinstance(value, torch.Tensor) and value.is_floating_point() else None

    def before(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = hidden(args[0] if args else kwargs.get("hidden_states"))
            if x is not None:
                inputs[name] = x

        return hook

    def after(name: str) -> Any:
        def hook(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
            x, y = inputs.pop(name, None), hidden(output)
            if x is None or y is None or x.shape != y.shape:
                raise CalibrationError(rules, f"block {name}: its input and output are not hidden states of one shape")
            cos = torch.nn.functional.cosine_similarity(
                x.reshape(-1, x.shape[-1]).double(), y.reshape(-1, y.shape[-1]).double(), dim=-1
            )
            mask = keep[0]
            if mask is not None and mask.numel() == cos.numel():
                cos = cos[mask]
            totals[name] += float((1 - cos).sum())
            counts[name] += cos.numel()

        return hook

    handles = []
    was_training = model.training
    try:
        for name in blocks:
            handles.append(modules[name].register_forward_pre_hook(before(name), with_kwargs=True))
            handles.append(modules[name].register_forward_hook(after(name), with_kwargs=True))
        model.eval()
        with torch.no_grad(), without_cache(model):
            for index, batch in enumerate(batches):
                mask = attention_mask(batch)
                keep[0] = None if mask is None else mask.reshape(-1).bool()
                try:
                    run_batch(model, batch)
                except CalibrationError:
                    raise
                except Exception as exc:
                    raise CalibrationError(rules, f"{type(exc).__name__}: {exc}", index) from exc
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    never = [name for name in blocks if counts[name] == 0]
    if never:
        raise CalibrationError(rules, f"the model's forward never ran {', '.join(never)} on the calibration data")
    return {name: totals[name] / counts[name] for name in blocks}
