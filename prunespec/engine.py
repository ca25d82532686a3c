"""The mask engine: run a :class:`~prunespec.planner.Plan` on a model, all or nothing.

Every mask is computed first, on the side. Three ways, one result:

* methods that score entries (``l1_unstructured``) or channels (``ln_structured``): prunespec selects
  the lowest scores itself (:mod:`prunespec.selection`; local and global, no ``topk`` over whole
  tensors, no concatenation);
* any other method: its own ``compute_mask``, composed with earlier masks by torch's own
  ``PruningContainer`` (so composition is torch's, exactly), then checked (shape, device, dtype, binary,
  earlier zeros kept) unless it is one of torch's own classes;
* a global budget without scores: the group concatenated, as ``prune.global_unstructured`` does.

Only when every mask is ready is anything installed, and the install is rolled back if it fails, so a
failed apply leaves parameters, buffers and hooks exactly as they were. What gets installed is what
``torch.nn.utils.prune`` installs: ``<name>_orig`` (the same Parameter object), a ``<name>_mask``
buffer, the ``<name>`` attribute and a forward pre-hook that is the method object (or a
``PruningContainer`` of them). Deliberate differences: a re-prune keeps the hook at its place
(pytorch/pytorch#37138); a :class:`DetachAfterForward` hook keeps ``copy.deepcopy`` working
(pytorch/pytorch#37322); global steps leave a :class:`GlobalMask` record that holds no mask
(pytorch/pytorch#49332); tied owners share one ``_orig`` and one mask.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune

from . import selection
from .errors import ApplyError
from .methods.base import MethodInfo, n_to_prune
from .planner import Plan, Step, bounds_problem, budget_bounds, is_pruned_param, pruned_channels

log = logging.getLogger("prunespec")


class GlobalMask(prune.BasePruningMethod):
    """The hook left by a ``scope: global`` step: a record of what ran.

    The mask it produced is the module's ``<name>_mask`` buffer; unlike torch's ``CustomFromMask`` it
    keeps no reference to the group's flat mask (pytorch/pytorch#49332).
    """

    PRUNING_TYPE = "global"

    def __init__(self, method: str, amount: float | int, group_size: int) -> None:
        self.method = method
        self.amount = amount
        self.group_size = group_size

    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        return default_mask


class DetachAfterForward:
    """Forward hook prunespec adds to each pruned module: after the forward, the masked ``<name>``
    attribute is replaced by a detached view of itself.

    The forward has used (and autograd has recorded) the attached one, so gradients still reach
    ``<name>_orig``; what stays behind is a leaf, so ``copy.deepcopy`` of a model works after a forward
    with grad (torch's own pruning fails there: pytorch/pytorch#37322).
    """

    def __call__(self, module: nn.Module, inputs: Any, output: Any) -> None:
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, prune.BasePruningMethod):
                value = module.__dict__.get(hook._tensor_name)
                if isinstance(value, torch.Tensor) and value.grad_fn is not None:
                    module.__dict__[hook._tensor_name] = value.detach()


def ensure_detach_hook(module: nn.Module) -> None:
    """Add :class:`DetachAfterForward` to ``module`` unless it has it."""
    if not any(isinstance(h, DetachAfterForward) for h in module._forward_hooks.values()):
        module.register_forward_hook(DetachAfterForward())


def drop_detach_hook(module: nn.Module) -> None:
    """Remove :class:`DetachAfterForward` from a module that has no pruned tensor left."""
    if any(isinstance(h, prune.BasePruningMethod) for h in module._forward_pre_hooks.values()):
        return
    for key in [k for k, h in module._forward_hooks.items() if isinstance(h, DetachAfterForward)]:
        del module._forward_hooks[key]


@dataclass
class _Tensor:
    """One Parameter being pruned: its owners, its mask so far and the hooks to add."""

    name: str
    owners: list[tuple[nn.Module, str]]
    orig: torch.Tensor
    mask: torch.Tensor | None
    zeros: int | None = None  # the mask's zeros, when known without counting them again
    new_hooks: list[prune.BasePruningMethod] = field(default_factory=list)
    rules: list[str] = field(default_factory=list)  # labels of the rules that pruned it, in order

    def importance(self) -> torch.Tensor:
        """What torch ranks: the masked weight (fresh from ``<name>_orig``, never a stale attribute)."""
        orig = self.orig.detach()
        return orig if self.mask is None else self.mask.to(dtype=orig.dtype) * orig


Progress = Callable[[int, int, str], None]  # (steps done, steps in all, what was just done)


@dataclass(frozen=True)
class Pruned:
    """A tensor :func:`execute` pruned: its name and every (module, parameter name) that owns it."""

    name: str
    owners: tuple[tuple[nn.Module, str], ...]
    zeros: int | None  # zeros of its mask, if the engine counted them


def execute(model: nn.Module, plan: Plan, progress: Progress | None = None) -> list[Pruned]:
    """Apply ``plan`` to ``model`` (never finalizing: see :func:`make_permanent`). Raises ApplyError.

    ``progress`` is called after each local step and each global group (masks are computed then; the
    install that follows is quick).
    """
    tensors: dict[int, _Tensor] = {}
    done = 0
    with torch.no_grad(), _seeded(plan.spec.seed, model):
        for unit in plan.units():
            staged = [_stage(model, tensors, step) for step in unit]
            if unit[0].scope == "global":
                _run_global(unit, staged, plan.methods[unit[0].method], plan.cuts.get(unit[0].rule_index))
            else:
                _run_local(unit[0], staged[0], plan.methods[unit[0].method])
            done += len(unit)
            what = f"{unit[0].rule}: {unit[0].tensor.name}" + (f" and {len(unit) - 1} more" if len(unit) > 1 else "")
            log.debug("masks computed for %s (%d/%d steps)", what, done, len(plan.steps))
            if progress is not None:
                progress(done, len(plan.steps), what)
    _install(list(tensors.values()))
    return [Pruned(t.name, tuple(t.owners), t.zeros) for t in tensors.values()]


def make_permanent(pruned: list[Pruned]) -> None:
    """torch's ``prune.remove`` on every owner of each tensor :func:`execute` pruned."""
    for tensor in pruned:
        for module, pname in tensor.owners:
            prune.remove(module, pname)
            drop_detach_hook(module)


@contextlib.contextmanager
def _seeded(seed: int | None, model: nn.Module) -> Iterator[None]:
    """Seed torch's generators for the apply, restoring the caller's RNG state afterwards."""
    if seed is None:
        yield
        return
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _stage(model: nn.Module, tensors: dict[int, _Tensor], step: Step) -> _Tensor:
    owners = [(model.get_submodule(module), pname) for module, pname in step.tensor.owners]
    module, pname = owners[0]
    pruned = is_pruned_param(module, pname)
    orig = module._parameters[pname + "_orig" if pruned else pname]
    assert orig is not None
    key = id(orig)
    if key not in tensors:
        mask = module._buffers[pname + "_mask"] if pruned else None
        tensors[key] = _Tensor(step.tensor.name, owners, orig, mask)
    tensors[key].rules.append(step.rule)
    return tensors[key]


def _fail(step: Step, tensor: str, message: str) -> ApplyError:
    return ApplyError(step.rule, tensor, message)


def _amount(step: Step, info: MethodInfo, masks: list[torch.Tensor | None], sizes: list[int]) -> Any:
    """The amount to hand the method: the rule's, or a count reaching the rule's ``sparsity``."""
    if step.sparsity is None:
        return step.amount
    if info.pruning_type == "structured":
        dim = int(step.options["dim"])
        done = 0 if masks[0] is None else pruned_channels(masks[0], dim)
        return max(0, round(step.sparsity * step.tensor.shape[dim]) - done)
    done = sum(0 if m is None else m.numel() - int(torch.count_nonzero(m)) for m in masks)
    return max(0, round(step.sparsity * sum(sizes)) - done)


def _build(step: Step, info: MethodInfo, amount: Any, tensor: str, pname: str) -> prune.BasePruningMethod:
    try:
        hook = info.build(amount, step.options)
    except Exception as exc:
        raise _fail(step, tensor, f"{info.name} could not be created: {type(exc).__name__}: {exc}") from exc
    hook._tensor_name = pname
    return hook


def _select(
    step: Step,
    tensors: list[_Tensor],
    amount: Any,
    score: selection.Score,
    name: str,
    planned: list[selection.Cut] | None = None,
) -> list[tuple[torch.Tensor, int]] | None:
    """New masks pruning the ``amount`` lowest-scored remaining entries across ``tensors``, within the
    rule's per-tensor bounds, with their numbers of zeros (None: the scores have NaNs to prune, which
    only torch's ranking does).

    ``planned`` are cuts the planner found; they are used if they still prune exactly what they should
    (the weights may have changed since planning), which saves finding them again.
    """
    entries = [selection.Entry(t.orig.detach(), t.mask) for t in tensors]
    already = selection.pruned_counts(entries)
    remaining = sum(t.orig.numel() for t in tensors) - sum(already)
    k = n_to_prune(amount, remaining)
    if k > remaining:
        raise _fail(step, name, f"amount={amount} is more than the {remaining} entries left to prune")
    low, high = budget_bounds(step.min_sparsity, step.max_sparsity, [t.orig.numel() for t in tensors], already)
    if not sum(low) <= sum(already) + k <= sum(high):
        raise _fail(step, name, bounds_problem(sum(low), sum(already) + k, sum(high)))
    dtype = selection.group_dtype(entries, score)
    # (only a shared cut: with per-tensor bounds in play, counts alone do not prove the split still fits)
    shared = len({id(c.value) for c in planned or [] if c.value is not None}) <= 1
    if planned is not None and shared and len(planned) == len(entries) and sum(c.pruned for c in planned) == k:
        masks = _masks(entries, planned, score, dtype)
        if [zeros for _, zeros in masks] == [done + cut.pruned for done, cut in zip(already, planned, strict=True)]:
            return masks
    cuts = selection.find_cuts(entries, k, score, already, low, high)
    if cuts is None:
        return None
    return _masks(entries, cuts, score, dtype)


def _masks(
    entries: list[selection.Entry], cuts: list[selection.Cut], score: selection.Score, dtype: torch.dtype
) -> list[tuple[torch.Tensor, int]]:
    made = [selection.apply_cut(e, cut, score, dtype) for e, cut in zip(entries, cuts, strict=True)]
    zeros = selection.to_host([z for _, z in made])
    return [(mask, n) for (mask, _), n in zip(made, zeros, strict=True)]


def _select_channels(
    step: Step, tensor: _Tensor, amount: Any, score: Callable[[torch.Tensor, int, Any], torch.Tensor]
) -> tuple[torch.Tensor, int]:
    """A structured method's new mask, built in one pass: the same channels torch's ``compute_mask``
    (through a ``PruningContainer`` on a re-prune) keeps, ranked by the same scores and ``topk``."""
    values = tensor.importance()
    dim = int(step.options["dim"]) % values.dim()
    others = [d for d in range(values.dim()) if d != dim]
    channels = None if tensor.mask is None else (tensor.mask.sum(dim=others) != 0).nonzero().reshape(-1)
    ranked = values if channels is None else values.index_select(dim, channels)  # the channels left
    size = ranked.shape[dim]
    k = n_to_prune(amount, size)
    if k > size:
        raise _fail(step, tensor.name, f"amount={amount} is more than the {size} channels left to prune")
    if k == 0:
        mask = tensor.mask.clone() if tensor.mask is not None else torch.ones_like(values)
        return mask, mask.numel() - int(torch.count_nonzero(mask))
    kept = torch.topk(score(ranked, dim, step.options), k=size - k, largest=True).indices
    keep = torch.zeros(values.shape[dim], dtype=torch.bool, device=values.device)
    keep[kept if channels is None else channels[kept]] = True
    shape = [1] * values.dim()
    shape[dim] = -1
    mask = keep.reshape(shape).expand(values.shape).to(values.dtype)
    if tensor.mask is None:  # whole channels only: no need to count
        return mask, k * (values.numel() // values.shape[dim])
    mask *= tensor.mask.to(mask.dtype)
    return mask, mask.numel() - int(torch.count_nonzero(mask))


def _run_local(step: Step, tensor: _Tensor, info: MethodInfo) -> None:
    pname = tensor.owners[0][1]
    amount = _amount(step, info, [tensor.mask], [tensor.orig.numel()])
    hook = _build(step, info, amount, tensor.name, pname)
    if info.pruning_type == "structured" and info.channel_importance is not None:
        tensor.mask, tensor.zeros = _select_channels(step, tensor, amount, info.channel_importance)
        tensor.new_hooks.append(hook)
        return
    score = info.scorer(hook)
    masks = _select(step, [tensor], amount, score, tensor.name) if score is not None else None
    if masks is not None:
        tensor.mask, tensor.zeros = masks[0]
        tensor.new_hooks.append(hook)
        return
    tensor.zeros = None
    # The first prune calls the method itself; later ones go through torch's own composition rules.
    method = hook if tensor.mask is None else prune.PruningContainer(hook)
    if tensor.mask is None:
        default = torch.ones_like(tensor.orig)
    else:
        default = tensor.mask.detach().clone(memory_format=torch.contiguous_format)
    # torch's own classes are known to leave their scores alone and return proper masks; any other
    # method gets a copy to write into (the model must not change before install) and its mask checked
    trusted = info.cls.__module__ == prune.__name__
    try:
        scores = tensor.importance() if trusted else tensor.importance().clone()
        mask = method.compute_mask(scores, default_mask=default)
    except Exception as exc:
        raise _fail(step, tensor.name, f"{info.name} failed: {type(exc).__name__}: {exc}") from exc
    if trusted:
        tensor.mask = mask.detach()
    else:  # torch's container writes the new mask into `default`: compare with the mask as it was
        tensor.mask = _checked(step, tensor, mask, tensor.mask if tensor.mask is not None else default)
    tensor.new_hooks.append(hook)


def _run_global(
    unit: list[Step], tensors: list[_Tensor], info: MethodInfo, planned: list[selection.Cut] | None
) -> None:
    """One budget across the group, selected exactly as ``prune.global_unstructured`` selects it."""
    step = unit[0]
    group = f"global group of {len(tensors)} tensors"
    amount = _amount(step, info, [t.mask for t in tensors], [t.orig.numel() for t in tensors])
    method = _build(step, info, amount, group, "temp")
    score = info.scorer(method)
    masks = _select(step, tensors, amount, score, group, planned) if score is not None else None
    if masks is None and (step.max_sparsity is not None or step.min_sparsity is not None):
        raise _fail(step, group, "max_sparsity/min_sparsity need a method that scores entries (like l1_unstructured)")
    if masks is not None:
        for tensor, (mask, zeros) in zip(tensors, masks, strict=True):
            tensor.mask, tensor.zeros = mask, zeros
            tensor.new_hooks.append(GlobalMask(info.name, amount, len(tensors)))
        return
    container = prune.PruningContainer(method)
    scores = torch.cat([t.importance().reshape(-1) for t in tensors])
    default = torch.cat([(t.mask if t.mask is not None else torch.ones_like(t.orig)).reshape(-1) for t in tensors])
    try:
        flat = container.compute_mask(scores, default_mask=default)
    except Exception as exc:
        raise _fail(step, group, f"{info.name} failed: {type(exc).__name__}: {exc}") from exc
    if not isinstance(flat, torch.Tensor) or flat.numel() != default.numel():
        raise _fail(
            step, group, f"{info.name} returned a mask that does not cover the group's {default.numel()} entries"
        )
    del scores
    offset = 0
    for tensor in tensors:
        numel = tensor.orig.numel()
        own_default = tensor.mask if tensor.mask is not None else torch.ones_like(tensor.orig)
        piece = flat[offset : offset + numel].reshape(tensor.orig.shape).to(tensor.orig.dtype, copy=True)
        offset += numel
        tensor.zeros = None
        tensor.mask = _checked(step, tensor, piece, own_default)
        tensor.new_hooks.append(GlobalMask(info.name, amount, len(tensors)))


def _checked(step: Step, tensor: _Tensor, mask: Any, default: torch.Tensor) -> torch.Tensor:
    """The method's mask, if it is one: right shape, device and dtype, binary, keeping earlier zeros."""
    orig = tensor.orig
    if not isinstance(mask, torch.Tensor):
        raise _fail(step, tensor.name, f"the method returned {type(mask).__name__}, not a tensor")
    if mask.shape != orig.shape:
        raise _fail(step, tensor.name, f"the mask has shape {list(mask.shape)}, expected {list(orig.shape)}")
    if mask.device != orig.device:
        raise _fail(step, tensor.name, f"the mask is on {mask.device}, expected {orig.device}")
    if mask.dtype == torch.bool:
        mask = mask.to(default.dtype)
    elif not (mask.is_floating_point() or mask.dtype == default.dtype):
        raise _fail(step, tensor.name, f"the mask has dtype {mask.dtype}, expected {orig.dtype} or torch.bool")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise _fail(step, tensor.name, "the mask has values other than 0 and 1")
    if not bool((mask[default == 0] == 0).all()):
        raise _fail(step, tensor.name, "the mask un-prunes entries that earlier pruning removed")
    checked: torch.Tensor = mask.detach()
    return checked


# --- install, all or nothing -------------------------------------------------------------------


def _install(tensors: list[_Tensor]) -> None:
    snapshots = [_snapshot(module, pname) for t in tensors for module, pname in t.owners]
    current: _Tensor | None = None
    try:
        for current in tensors:
            for module, pname in current.owners:
                _install_one(module, pname, current)
    except Exception as exc:
        for restore in snapshots:
            restore()
        assert current is not None
        message = f"could not install the mask: {type(exc).__name__}: {exc}"
        raise ApplyError(current.rules[-1], current.name, message) from exc


def _snapshot(module: nn.Module, pname: str) -> Any:
    params, buffers = dict(module._parameters), dict(module._buffers)
    hooks, post_hooks = OrderedDict(module._forward_pre_hooks), OrderedDict(module._forward_hooks)
    attr = module.__dict__.get(pname, _MISSING)

    def restore() -> None:
        module._parameters.clear()
        module._parameters.update(params)
        module._buffers.clear()
        module._buffers.update(buffers)
        module._forward_pre_hooks.clear()
        module._forward_pre_hooks.update(hooks)
        module._forward_hooks.clear()
        module._forward_hooks.update(post_hooks)
        module.__dict__.pop(pname, None)
        if attr is not _MISSING:
            module.__dict__[pname] = attr

    return restore


_MISSING = object()


def _install_one(module: nn.Module, pname: str, tensor: _Tensor) -> None:
    hooks = [copy.copy(h) for h in tensor.new_hooks]
    for new in hooks:
        new._tensor_name = pname
    old_key = next(
        (
            key
            for key, old in module._forward_pre_hooks.items()
            if isinstance(old, prune.BasePruningMethod) and getattr(old, "_tensor_name", None) == pname
        ),
        None,
    )
    if not is_pruned_param(module, pname):
        orig = module._parameters[pname]
        module.register_parameter(pname + "_orig", orig)
        del module._parameters[pname]
    module.register_buffer(pname + "_mask", tensor.mask)
    if old_key is not None:
        old = module._forward_pre_hooks[old_key]
        hook: prune.BasePruningMethod = _container(
            [*(old if isinstance(old, prune.PruningContainer) else [old]), *hooks]
        )
        module._forward_pre_hooks[old_key] = hook  # same key: the hook keeps its place (pytorch#37138)
    else:
        hook = hooks[0] if len(hooks) == 1 else _container(hooks)
        module.register_forward_pre_hook(hook)
    ensure_detach_hook(module)
    with torch.no_grad():
        setattr(module, pname, hook.apply_mask(module))


def _container(methods: list[prune.BasePruningMethod]) -> prune.PruningContainer:
    container = prune.PruningContainer(methods[0])
    for method in methods[1:]:
        container.add_pruning_method(method)
    return container
