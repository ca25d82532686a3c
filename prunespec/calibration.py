"""Calibration statistics: what data-aware methods (``wanda``) know of the activations.

A method names the statistics it reads in its class's ``statistics``; before any mask is computed,
:func:`collect` runs the calibration batches through the model once and gathers them for the modules
being pruned only, with forward pre-hooks that are removed afterwards. The method then finds them in
``MaskContext.statistics``, by name.

Statistics (:data:`STATISTICS`):

``input_sq_norms``
    A float32 vector of one value per input feature of the module: the sum, over every calibration
    token, of that feature squared. Its square root is ``||X_j||_2``, the L2 norm of input feature ``j``
    over all the tokens (Wanda's activation norm). Memory: one vector per pruned module's input.

Tokens: a module's input of shape ``(batch, seq, features)`` has ``batch * seq`` tokens; any other shape
``(..., features)`` is flattened to tokens the same way. When a batch is a mapping with an
``attention_mask`` of shape ``(batch, seq)``, only the tokens where the mask is nonzero (1) count:
the mask is matched to the first two dims of an input of shape ``(batch, seq, ...)``, or to the first
dim of an input of shape ``(batch * seq, features)``; an input that fits neither is an error naming the
module, rather than a guess.

Sharing: modules that see the same input tensor object (``q_proj``, ``k_proj``, ``v_proj``; ``gate_proj``
and ``up_proj``) get one statistic, computed once per batch: the very same tensor object.

The model runs under ``torch.no_grad()`` in eval mode (dropout off, batch norms leave their running
statistics alone); each module's training flag is restored afterwards, and the hooks are removed
whatever happens.
"""

from __future__ import annotations

import weakref
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .errors import CalibrationError

__all__ = ["STATISTICS", "Statistics", "collect", "input_sq_sums", "out_in", "run_batch", "transposed"]

STATISTICS: Mapping[str, str] = {
    "input_sq_norms": "float32 vector, one per input feature: the sum over calibration tokens of the feature squared",
    "input_gram": "float32 matrix (in, in): the sum over calibration tokens of x x^T (X^T X; SparseGPT's Hessian, "
    "up to a factor)",
}
"""Every statistic prunespec collects, by name, with what it is."""

Statistics = dict[str, dict[str, torch.Tensor]]
"""Module name -> statistic name -> tensor."""


def transposed(module: nn.Module) -> bool:
    """Whether ``module`` keeps its weight as ``(in, out)``: transformers' ``Conv1D`` (GPT-2), which
    computes ``x @ weight``, unlike ``nn.Linear``'s ``x @ weight.T``."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and not isinstance(module, nn.Linear)


def out_in(module: nn.Module, t: torch.Tensor) -> torch.Tensor:
    """``module``'s weight ``t`` as an ``(out, in)`` matrix, a view: rows are outputs, columns the input
    features the statistics are about (``t`` itself for ``nn.Linear``, ``t.T`` for ``Conv1D``). The same
    call maps an ``(out, in)`` result back to the weight's layout."""
    return t.T if transposed(module) else t


def input_sq_sums(x: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """Sum over tokens of each feature squared, in float32; ``keep``: bool mask of the tokens that count,
    already matched to ``x``'s leading dims."""
    tokens = x.detach()
    if keep is not None:
        tokens = tokens[keep]
    tokens = tokens.reshape(-1, x.shape[-1]).to(torch.float32)
    return (tokens * tokens).sum(dim=0)


def _tokens_kept(x: torch.Tensor, mask: torch.Tensor | None, module: str) -> torch.Tensor | None:
    if mask is None:
        return None
    keep = mask.to(device=x.device) != 0
    if x.dim() >= 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        return keep
    if x.dim() == 2 and x.shape[0] == mask.numel():
        return keep.reshape(-1)
    raise ValueError(
        f"the input of {module} has shape {list(x.shape)}, which cannot be matched to the batch's "
        f"attention_mask of shape {list(mask.shape)} (prunespec matches inputs of shape (batch, seq, features) "
        "or (batch * seq, features))"
    )


def _attention_mask(batch: Any) -> torch.Tensor | None:
    if isinstance(batch, Mapping):
        mask = batch.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            return mask
    return None


def run_batch(model: nn.Module, batch: Any) -> Any:
    """One forward pass with ``batch`` as the model's input: a Tensor is the first positional argument,
    a tuple or list the positional arguments, a mapping the keyword arguments. TypeError otherwise."""
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    raise TypeError(f"a batch is a Tensor, a tuple or list, or a mapping; got {type(batch).__name__}")


class _Collector:
    """Sums per module over the batches; modules that saw the same inputs in every batch share one."""

    def __init__(self) -> None:
        self.owner: dict[str, int] = {}  # module -> index into sums/members
        self.sums: list[torch.Tensor] = []
        self.members: list[set[str]] = []
        self.mask: torch.Tensor | None = None
        self.inputs: list[tuple[weakref.ref[torch.Tensor], torch.Tensor]] = []  # this batch: input -> its sums
        self.seen: dict[str, list[int]] = {}  # this batch: module -> its inputs
        self.error: Exception | None = None

    def observe(self, name: str, x: torch.Tensor) -> None:
        # weak references: holding every input until the batch ends would keep all activations alive, and
        # a bare id() could be reused by another tensor once this one is freed
        index = next((i for i, (ref, _) in enumerate(self.inputs) if ref() is x), None)
        if index is None:
            self.inputs.append((weakref.ref(x), input_sq_sums(x, _tokens_kept(x, self.mask, name))))
            index = len(self.inputs) - 1
        self.seen.setdefault(name, []).append(index)

    def end_batch(self) -> None:
        by_inputs: dict[tuple[int, ...], list[str]] = {}
        for name, seen in self.seen.items():
            by_inputs.setdefault(tuple(seen), []).append(name)
        for indexes, names in by_inputs.items():
            vector = self.inputs[indexes[0]][1]
            for i in indexes[1:]:
                vector = vector + self.inputs[i][1]
            parts: dict[int | None, set[str]] = {}
            for name in names:
                parts.setdefault(self.owner.get(name), set()).add(name)
            for current, part in parts.items():
                if current is not None and self.members[current] == part:
                    self.sums[current] += vector
                    continue
                fresh = vector.clone() if current is None else self.sums[current] + vector
                if current is not None:
                    self.members[current] -= part
                self.sums.append(fresh)
                self.members.append(part)
                for name in part:
                    self.owner[name] = len(self.sums) - 1
        self.inputs, self.seen = [], {}


def collect(
    model: nn.Module, modules: Mapping[str, nn.Module], names: Collection[str], data: Iterable[Any], rules: str
) -> Statistics:
    """The statistics ``names`` of each of ``modules`` (by name), over every batch of ``data``.

    ``rules`` names the rules that need them, for errors. Raises :class:`CalibrationError` naming the
    batch at fault; the model's parameters, buffers, hooks and modes are as they were afterwards.
    """
    unknown = sorted(set(names) - set(STATISTICS))
    if unknown:
        known = ", ".join(STATISTICS)
        raise CalibrationError(rules, f"no such statistics: {', '.join(unknown)} (prunespec collects {known})")
    collector = _Collector()
    handles = []
    modes = [(m, m.training) for m in model.modules()]
    index = -1
    try:
        for name, module in modules.items():
            handles.append(module.register_forward_pre_hook(_hook(collector, name), with_kwargs=True))
        model.eval()
        with torch.no_grad():
            for index, batch in enumerate(_batches(data, rules)):
                collector.mask = _attention_mask(batch)
                try:
                    run_batch(model, batch)
                except Exception as exc:
                    cause = collector.error or exc
                    message = f"the forward pass failed: {type(cause).__name__}: {cause}"
                    raise CalibrationError(rules, message, index) from exc
                collector.end_batch()
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes:
            module.training = training
    if index < 0:
        raise CalibrationError(rules, "the data gave no batches; give at least one calibration batch")
    missing = [name for name in modules if name not in collector.owner]
    if missing:
        raise CalibrationError(
            rules, f"the model's forward never ran {', '.join(missing)} on the calibration data: no statistics"
        )
    return {name: {"input_sq_norms": collector.sums[collector.owner[name]]} for name in modules}


def _batches(data: Iterable[Any], rules: str) -> Iterable[Any]:
    if isinstance(data, (torch.Tensor, Mapping, str, bytes)) or not isinstance(data, Iterable):
        raise CalibrationError(
            rules,
            f"data is a {type(data).__name__}; give an iterable of batches (a list of Tensors, of tuples, or of "
            "mappings such as {'input_ids': ..., 'attention_mask': ...})",
        )
    return data


def _hook(collector: _Collector, name: str) -> Any:
    def observe(module: nn.Module, args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
        x = args[0] if args else kwargs.get("input")
        if not isinstance(x, torch.Tensor):
            return
        try:
            collector.observe(name, x)
        except Exception as exc:  # kept: the forward's own error would hide what went wrong here
            collector.error = exc
            raise

    return observe
