"""torch's pruning layout, in one place.

A pruned parameter ``<name>`` of a module, as ``torch.nn.utils.prune`` leaves it:

* ``<name>_orig``: the original Parameter (the same object);
* ``<name>_mask``: a buffer of 0s and 1s, of the parameter's shape;
* ``<name>``: a plain attribute, ``<name>_orig * <name>_mask``, recomputed before every forward by
* a forward pre-hook that is the method object (a ``BasePruningMethod`` whose ``_tensor_name`` is
  ``<name>``), or a ``PruningContainer`` of them after several prunes.

Everything that reads or writes this layout goes through here. Deliberate differences from torch: a
re-prune keeps the hook at its key (pytorch/pytorch#37138); :class:`DetachAfterForward` keeps
``copy.deepcopy`` working after a forward (pytorch/pytorch#37322); :class:`GlobalMask` records a global
step without holding the group's mask (pytorch/pytorch#49332); tied owners share one ``_orig`` and mask.

Under FSDP2 (``fully_shard``) the same layout holds with DTensors: ``<name>_orig`` is the sharded
Parameter FSDP manages (told of each rename, :mod:`prunespec.fsdp`), ``<name>_mask`` a DTensor sharded
like it, and values change in place in the local shard, never by rebinding ``.data``.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune
from torch.utils.hooks import RemovableHandle

from . import distributed, fsdp
from .masks import product

ORIG = "_orig"
MASK = "_mask"


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
    with grad (torch's own pruning fails there: pytorch/pytorch#37322). Under FSDP2 what stays behind is
    this rank's shard of it (:func:`fsdp.resharded`), not a full copy of the weight on every rank.
    """

    def __call__(self, module: nn.Module, inputs: Any, output: Any) -> None:
        for _, hook in pruning_hooks(module):
            name = hook._tensor_name
            value = module.__dict__.get(name)
            mask = module._buffers.get(name + MASK)
            if isinstance(value, torch.Tensor) and mask is not None and fsdp.gathers(value, mask):
                module.__dict__[name] = fsdp.resharded(value, mask)
            elif isinstance(value, torch.Tensor) and value.grad_fn is not None:
                module.__dict__[name] = value.detach()


_DETACH = DetachAfterForward()  # stateless: one object serves every module


class MaskedWeight:
    """The ``apply_mask`` of one installed pruning hook (set on the hook object, so the hook keeps its
    class): ``<name>_orig * <name>_mask`` as torch computes it, but made once and reused while both
    are the same tensors with the same data and versions and no gradient can need a fresh product.

    Torch recomputes the product before every forward, a full pass over the weight (1.46x the dense
    forward time at batch 1 on a GPT-2). An optimizer step, ``load_state_dict``, a new mask or new
    ``.data`` changes the key; with grad enabled and ``<name>_orig`` requiring grad it is always made
    afresh, so gradients reach ``<name>_orig`` exactly as with torch. The product kept is the one the
    module holds as ``<name>`` anyway: no extra memory. Inside FSDP2's forward (``<name>_orig`` the full
    parameter, the mask sharded) nothing is kept: the product is full size, and FSDP rewrites the
    parameter at each forward.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._key: tuple[Any, ...] | None = None
        self._value: torch.Tensor | None = None

    def _key_of(self, orig: torch.Tensor, mask: torch.Tensor) -> tuple[Any, ...]:
        local_orig, local_mask = (
            distributed.local(orig),
            distributed.local(mask),
        )  # a DTensor: its shard's version and data
        return (
            weakref.ref(orig),
            local_orig._version,
            local_orig.data_ptr(),
            weakref.ref(mask),
            local_mask._version,
            local_mask.data_ptr(),
            torch.is_inference_mode_enabled(),
        )

    def __call__(self, module: nn.Module) -> torch.Tensor:
        orig = module._parameters[self.name + ORIG]
        mask = module._buffers[self.name + MASK]
        assert orig is not None and mask is not None
        if (torch.is_grad_enabled() and orig.requires_grad) or fsdp.gathers(orig, mask):
            self._key = self._value = None
            return fsdp.masked(orig, mask)
        key = self._key_of(orig, mask)
        if self._value is not None and self._key is not None and _same(self._key, key):
            return self._value
        self._value = fsdp.masked(orig, mask)
        self._key = key
        return self._value

    def __getstate__(self) -> dict[str, Any]:
        return {"name": self.name}  # a pickled or copied model computes its product again

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["name"])  # type: ignore[misc]


def _same(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    """Keys equal, their tensors compared by identity (a weakref to a dead tensor matches nothing)."""
    return all(
        (x() is not None and x() is y()) if isinstance(x, weakref.ref) else x == y for x, y in zip(a, b, strict=True)
    )


def cache_masked_weight(hook: prune.BasePruningMethod) -> None:
    """Give an installed hook a :class:`MaskedWeight` (a fresh one: nothing cached from before)."""
    hook.apply_mask = MaskedWeight(hook._tensor_name)  # type: ignore[method-assign]


def _copy(hook: prune.BasePruningMethod) -> prune.BasePruningMethod:
    """A shallow copy of a method record (``copy.copy`` without its reduce protocol, which is slow),
    without an installed hook's :class:`MaskedWeight`."""
    new = object.__new__(type(hook))
    new.__dict__.update(hook.__dict__)
    new.__dict__.pop("apply_mask", None)
    return new


def is_pruned(module: nn.Module, pname: str) -> bool:
    """Whether ``module``'s parameter ``pname`` is pruned (has ``<pname>_orig`` and ``<pname>_mask``)."""
    return pname + ORIG in module._parameters and pname + MASK in module._buffers


def base_name(module: nn.Module, pname: str) -> str:
    """A parameter's name as users know it: ``weight`` for ``weight_orig`` when that is pruned."""
    if pname.endswith(ORIG) and pname[: -len(ORIG)] + MASK in module._buffers:
        return pname[: -len(ORIG)]
    return pname


def original(module: nn.Module, pname: str) -> torch.Tensor | None:
    """The Parameter behind ``pname``: ``<pname>_orig`` when pruned, else ``pname`` itself."""
    return module._parameters.get(pname + ORIG if is_pruned(module, pname) else pname)


def mask(module: nn.Module, pname: str) -> torch.Tensor | None:
    """The mask of a pruned parameter, None for a dense one."""
    return module._buffers.get(pname + MASK) if is_pruned(module, pname) else None


def named_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor, torch.Tensor | None]]:
    """``(name, Parameter, mask or None)`` for each parameter of ``module`` (pruned ones by base name)."""
    for pname, param in module._parameters.items():
        if param is None:
            continue
        name = base_name(module, pname)
        yield name, param, (module._buffers[name + MASK] if name != pname else None)


def pruning_hooks(module: nn.Module) -> Iterator[tuple[int, prune.BasePruningMethod]]:
    """The module's pruning pre-hooks with their keys."""
    for key, hook in list(module._forward_pre_hooks.items()):
        if isinstance(hook, prune.BasePruningMethod):
            yield key, hook


def hook_key(module: nn.Module, pname: str) -> int | None:
    """The key of the pruning hook that recomputes ``pname``, if any."""
    return next((key for key, hook in pruning_hooks(module) if getattr(hook, "_tensor_name", None) == pname), None)


def methods_of(hook: prune.BasePruningMethod) -> list[prune.BasePruningMethod]:
    """The method records in a hook: a container's parts, or the hook itself."""
    return list(hook) if isinstance(hook, prune.PruningContainer) else [hook]


def container(methods: Sequence[prune.BasePruningMethod]) -> prune.BasePruningMethod:
    """One hook for ``methods``: the method alone, or a ``PruningContainer`` of them in order."""
    if len(methods) == 1:
        return methods[0]
    out = prune.PruningContainer(methods[0])
    for method in methods[1:]:
        out.add_pruning_method(method)
    return out


def _add_hook(hooks: dict[int, Any], hook: Any) -> None:
    """What ``register_forward_(pre_)hook`` does for a plain hook (no kwargs, not always-called): the
    next id of torch's hook counter as the key. Without the handle object, which costs more than the
    rest of an install on a model of thousands of tiny layers."""
    key = RemovableHandle.next_id
    RemovableHandle.next_id += 1
    hooks[key] = hook


def ensure_detach_hook(module: nn.Module) -> None:
    """Add :class:`DetachAfterForward` to ``module`` unless it has it."""
    if not any(isinstance(h, DetachAfterForward) for h in module._forward_hooks.values()):
        _add_hook(module._forward_hooks, _DETACH)


def drop_detach_hook(module: nn.Module) -> None:
    """Remove :class:`DetachAfterForward` from a module that has no pruned tensor left."""
    if next(pruning_hooks(module), None) is not None:
        return
    for key in [k for k, h in module._forward_hooks.items() if isinstance(h, DetachAfterForward)]:
        del module._forward_hooks[key]


def install(
    module: nn.Module,
    pname: str,
    new_mask: torch.Tensor,
    new_hooks: Sequence[prune.BasePruningMethod],
    *,
    merge: bool = False,
    values: torch.Tensor | None = None,
) -> None:
    """Make ``pname`` pruned by ``new_mask``, its hook chain extended by ``new_hooks``, exactly in torch's
    layout. ``merge`` folds each new record into the chain's last one where they can be (see
    :func:`merged`): a schedule re-prunes with one method at every update, and torch's chain would grow by
    one record each time. ``values``: new original values (a method that reconstructs, ``sparsegpt``),
    bound as ``<pname>_orig``'s data (take a :func:`snapshot` with ``values=True`` to undo it). A DTensor
    parameter (FSDP2) takes a DTensor mask and values sharded like it; its values are copied in place."""
    hooks = [_copy(h) for h in new_hooks]
    for new in hooks:
        new._tensor_name = pname
    param = original(module, pname)
    for what, given in (("mask", new_mask), ("values", values)):
        problem = None if param is None or given is None else fsdp.same_sharding(param, given)
        if problem is not None:
            raise ValueError(f"the {what} for {pname}: {problem}")
    old_key = hook_key(module, pname)
    if not is_pruned(module, pname):
        with fsdp.renamed(module, pname, pname + ORIG):  # FSDP manages the same Parameter at its new name
            orig = module._parameters[pname]
            module.register_parameter(pname + ORIG, orig)
            del module._parameters[pname]
    if values is not None:
        orig = module._parameters[pname + ORIG]
        assert orig is not None
        if distributed.is_dtensor(orig):
            with torch.no_grad():
                fsdp.values(orig).copy_(fsdp.values(values))
        else:
            orig.data = values
    module.register_buffer(pname + MASK, new_mask)
    old = None if old_key is None else module._forward_pre_hooks[old_key]
    chain = methods_of(old) if isinstance(old, prune.BasePruningMethod) else []
    for new in hooks:
        folded = merged(chain[-1], new) if merge and chain else None
        if folded is not None:
            chain[-1] = folded
        else:
            chain.append(new)
    hook = container(chain)
    cache_masked_weight(hook)
    if old_key is not None:
        module._forward_pre_hooks[old_key] = hook  # same key: the hook keeps its place (pytorch#37138)
    else:
        _add_hook(module._forward_pre_hooks, hook)
    ensure_detach_hook(module)
    with torch.no_grad():
        # torch's Module.__setattr__ would only find that `pname` is no longer a parameter: go direct
        module.__dict__[pname] = hook.apply_mask(module)


def merged(a: prune.BasePruningMethod, b: prune.BasePruningMethod) -> prune.BasePruningMethod | None:
    """One record saying what ``a`` then ``b`` did, or None: the same class and options, and counts as
    amounts (which add up: each counts entries or channels of what was left)."""
    if type(a) is not type(b):
        return None
    amount_a, amount_b = getattr(a, "amount", None), getattr(b, "amount", None)
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in (amount_a, amount_b)):
        return None
    own = ("amount", "apply_mask")  # apply_mask: the installed hook's MaskedWeight, not a setting
    if {k: v for k, v in vars(a).items() if k not in own} != {k: v for k, v in vars(b).items() if k not in own}:
        return None
    out = _copy(b)
    out.amount = amount_a + amount_b  # type: ignore[attr-defined,operator]
    return out


def remove(module: nn.Module, pname: str) -> None:
    """Make ``pname``'s pruning permanent (torch's ``prune.remove``) and tidy prunespec's hook. A DTensor
    parameter (FSDP2) is masked in place instead (:func:`_remove_in_place`)."""
    orig = module._parameters.get(pname + ORIG)
    with fsdp.renamed(module, pname + ORIG, pname):
        if distributed.is_dtensor(orig):
            _remove_in_place(module, pname)
        else:
            prune.remove(module, pname)
    drop_detach_hook(module)


def _remove_in_place(module: nn.Module, pname: str) -> None:
    """What ``prune.remove`` leaves, with ``<pname>_orig``'s local shard multiplied by the mask's in
    place: torch rebinds ``orig.data``, which would cut the Parameter off the storage FSDP all-gathers
    from."""
    key = hook_key(module, pname)
    if key is None or not is_pruned(module, pname):
        raise ValueError(f"Parameter '{pname}' of module {module} has to be pruned before pruning can be removed")
    orig, mask = module._parameters[pname + ORIG], module._buffers[pname + MASK]
    assert orig is not None and mask is not None
    with torch.no_grad():
        fsdp.values(orig).mul_(fsdp.values(mask))
    del module._forward_pre_hooks[key]
    module.__dict__.pop(pname, None)
    del module._parameters[pname + ORIG], module._buffers[pname + MASK]
    module._parameters[pname] = orig  # at the end, where prune.remove's setattr puts it


def remove_all(owners: Sequence[tuple[nn.Module, str]]) -> None:
    """:func:`remove` on each ``(module, parameter name)``, all or nothing: on any exception or interrupt
    every module is put back as it was, and the exception re-raised."""
    restores = [snapshot(module, values=True) for module in {id(m): m for m, _ in owners}.values()]
    try:
        for module, pname in owners:
            remove(module, pname)
    except BaseException:
        for restore in restores:
            restore()
        raise


def finalized_in_place(
    owners: Sequence[tuple[nn.Module, str]], mask: torch.Tensor, values: torch.Tensor | None
) -> None:
    """What :func:`install` then :func:`remove` leave, without the layout in between: the Parameter
    (the same object) holds ``values * mask`` (``values``: new original values, or its own), and moves to
    the end of each owner's parameters, as ``prune.remove`` puts it. No mask, no second copy: the
    memory-lean way to finalize a tensor no earlier pruning touched. Interrupts wait until it is done. A
    DTensor parameter (FSDP2) takes a DTensor mask and values sharded like it, applied to its shard."""
    first = owners[0][0]._parameters[owners[0][1]]
    assert first is not None
    for what, given in (("mask", mask), ("values", values)):
        problem = None if given is None else fsdp.same_sharding(first, given)
        if problem is not None:
            raise ValueError(f"the {what} for {owners[0][1]}: {problem}")
    with torch.no_grad():
        if values is not None:
            fsdp.values(first).copy_(fsdp.values(values))
        local = fsdp.values(first)
        product(local, fsdp.values(mask), out=local)
    for module, pname in owners:
        param = module._parameters.pop(pname)
        module._parameters[pname] = param


def keep_only(module: nn.Module, pname: str, dim: int, index: torch.Tensor) -> None:
    """Keep only the entries ``index`` along ``dim`` of ``pname`` (a Parameter, pruned or not, or a
    buffer), in new tensors (the old ones are left as they were, for an undo). A pruned tensor whose
    mask keeps everything that is left is made permanent (``prune.remove``). Not for a DTensor (FSDP2):
    new, smaller Parameters would leave FSDP managing the old ones."""
    current = original(module, pname)
    if distributed.is_dtensor(current if current is not None else module._buffers.get(pname)):
        raise ValueError(f"{pname} is a DTensor (FSDP2): its pruned units cannot be cut out of its shards")
    if is_pruned(module, pname):
        orig = module._parameters[pname + ORIG]
        mask = module._buffers[pname + MASK]
        assert orig is not None and mask is not None
        at = index.to(orig.device)
        module._parameters[pname + ORIG] = nn.Parameter(orig.detach().index_select(dim, at), orig.requires_grad)
        module._buffers[pname + MASK] = mask.index_select(dim, at)
        hook_at = hook_key(module, pname)
        assert hook_at is not None
        hook: Any = module._forward_pre_hooks[hook_at]
        with torch.no_grad():
            module.__dict__[pname] = hook.apply_mask(module)
        if bool(mask.index_select(dim, at).all()):
            remove(module, pname)
        return
    param = module._parameters.get(pname)
    if param is not None:
        at = index.to(param.device)
        module._parameters[pname] = nn.Parameter(param.detach().index_select(dim, at), param.requires_grad)
        return
    buffer = module._buffers[pname]
    assert buffer is not None
    module._buffers[pname] = buffer.index_select(dim, index.to(buffer.device))


_MISSING = object()


def snapshot(module: nn.Module, pname: str | None = None, *, values: bool = False) -> Callable[[], None]:
    """A function that puts ``module``'s parameters, buffers, hooks (and ``pname``'s attribute, or every
    pruned attribute) back as they are now; ``values``: the Parameters' data too (what ``prune.remove``
    rebinds, or a DTensor's shard changes in place). FSDP2 is told of the names it puts back."""
    params, buffers = dict(module._parameters), dict(module._buffers)
    # torch's prune.remove rebinds `<name>_orig.data` to the masked values: keep each Parameter's data;
    # a DTensor's shard is masked in place (FSDP all-gathers from its storage): keep a copy of it
    data = {n: p.data for n, p in params.items() if p is not None and not distributed.is_dtensor(p)} if values else {}
    shards = {n: fsdp.values(p).clone() for n, p in params.items() if distributed.is_dtensor(p)} if values else {}
    hooks, post_hooks = OrderedDict(module._forward_pre_hooks), OrderedDict(module._forward_hooks)
    names = [pname] if pname is not None else [h._tensor_name for _, h in pruning_hooks(module)]
    attrs = {name: module.__dict__.get(name, _MISSING) for name in names}

    def restore() -> None:
        for name, saved in data.items():
            param = params[name]
            if param is not None:
                param.data = saved
        with torch.no_grad():
            for name, shard in shards.items():
                fsdp.values(params[name]).copy_(shard)  # type: ignore[arg-type]
        now = {id(p): name for name, p in module._parameters.items() if p is not None}  # where each is now
        module._parameters.clear()
        module._parameters.update(params)
        for name, param in params.items():
            if param is not None and now.get(id(param), name) != name:
                fsdp.rename(module, now[id(param)], name)
        module._buffers.clear()
        module._buffers.update(buffers)
        module._forward_pre_hooks.clear()
        module._forward_pre_hooks.update(hooks)
        module._forward_hooks.clear()
        module._forward_hooks.update(post_hooks)
        for name, attr in attrs.items():
            module.__dict__.pop(name, None)
            if attr is not _MISSING:
                module.__dict__[name] = attr

    return restore


def pruned_in(model: nn.Module) -> Iterator[tuple[str, nn.Module, str, prune.BasePruningMethod]]:
    """Every pruning hook in ``model``: ``(qualified tensor name, module, parameter name, hook)``."""
    for module_name, module in model.named_modules():
        for _, hook in pruning_hooks(module):
            pname = hook._tensor_name
            yield (f"{module_name}.{pname}" if module_name else pname), module, pname, hook
