"""FSDP2 (``torch.distributed.fsdp.fully_shard``) specifics of torch's pruning layout.

Under FSDP2 a parameter is a DTensor Parameter sharded on dim 0, tracked by an ``FSDPParam`` that
knows it by module and name: FSDP's pre-forward hook all-gathers it and writes the full, plain
Parameter at that name, its post-forward hook writes the sharded one back. A pruned parameter moves
from ``<name>`` to ``<name>_orig``, so FSDP is told (:func:`rename`); its mask is a DTensor sharded
like it, multiplied locally outside the forward and all-gathered, one byte an entry, inside it
(:func:`masked`). Values are changed in place in the local shard (:func:`values`): FSDP all-gathers
from that storage, and optimizers and FSDP hold the Parameter object.

Nothing here imports DTensor or FSDP (1 s with torch 2.13): a model can only hold DTensors or be
managed by FSDP once the program has imported them. The records of FSDP used are private to torch (looked up
in :func:`_records`); if they move, :func:`rename` fails with the torch version rather than leave
FSDP unsharding a name that is gone.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn

from .distributed import is_dtensor, local

if TYPE_CHECKING:
    from torch.distributed.fsdp._fully_shard._fsdp_param import FSDPParam
    from torch.distributed.tensor import DTensor

__all__ = ["gathers", "masked", "rename", "renamed", "resharded", "same_sharding", "values"]


def values(t: torch.Tensor) -> torch.Tensor:
    """What to read or write ``t``'s values through in place, outside autograd: ``t.data``, or a
    DTensor's local shard (FSDP all-gathers from that storage; rebinding ``.data`` would cut it off)."""
    return local(t) if is_dtensor(t) else t.data


def same_sharding(param: torch.Tensor, other: torch.Tensor) -> str | None:
    """Why ``other`` (a mask or new values) cannot go with the DTensor ``param``, or None if it can:
    it must be a DTensor of the same shape, mesh and placements, so that it multiplies locally."""
    if not is_dtensor(param):
        return None
    if not is_dtensor(other):
        return f"{param.placements} DTensor parameter given a {type(other).__name__}, not a DTensor sharded like it"
    if other.shape != param.shape or other.device_mesh != param.device_mesh or other.placements != param.placements:
        return (
            f"a DTensor of shape {tuple(other.shape)} with placements {other.placements} does not match the "
            f"parameter (shape {tuple(param.shape)}, placements {param.placements}, on the same mesh)"
        )
    return None


class _GatheredMask(torch.autograd.Function):
    """``orig * mask`` for the full ``orig`` FSDP unsharded and a sharded mask: the mask is all-gathered
    in the forward and again in the backward, not kept whole between them (FSDP frees the full
    parameter after the forward for the same reason)."""

    @staticmethod
    def forward(ctx: Any, orig: torch.Tensor, mask: DTensor) -> torch.Tensor:
        ctx.mask = mask  # the sharded buffer: no memory of its own
        return orig * _gathered(mask)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * _gathered(ctx.mask), None


def _gathered(mask: DTensor) -> torch.Tensor:
    """The whole mask on every rank, one byte an entry (DTensor's all-gather; uint8 times a float
    tensor is a float tensor, so no float copy of it is made)."""
    full: torch.Tensor = cast("DTensor", mask.to(torch.uint8)).full_tensor()
    return full


def masked(orig: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``orig * mask`` as torch's pruning computes it, for plain tensors, two DTensors sharded alike
    (local, no communication) or, inside FSDP's forward, a full ``orig`` and a sharded mask."""
    if is_dtensor(mask) and not is_dtensor(orig):
        return cast(torch.Tensor, _GatheredMask.apply(orig, mask))  # type: ignore[no-untyped-call]
    return mask.to(dtype=orig.dtype) * orig


def gathers(orig: torch.Tensor, mask: torch.Tensor) -> bool:
    """Whether :func:`masked` all-gathers: a full-size product, not to be kept between forwards."""
    return is_dtensor(mask) and not is_dtensor(orig)


def resharded(value: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """A masked attribute made in FSDP's forward (full size), as this rank's shard of it in a DTensor
    like ``mask``, cut locally (no communication): what a module keeps as ``<name>`` between forwards,
    sharded like its parameter instead of a full copy of it on every rank; else ``value``."""
    if not gathers(value, mask):
        return value
    from torch.distributed.tensor import distribute_tensor  # imported already: mask is a DTensor

    assert is_dtensor(mask)
    return distribute_tensor(value.detach(), mask.device_mesh, mask.placements, src_data_rank=None)


def _states() -> Iterator[Any]:
    """Every FSDP2 state in the program (private to torch: a composable API's registry)."""
    from torch.distributed._composable_state import _module_state_mapping
    from torch.distributed.fsdp._fully_shard._fsdp_state import FSDPState

    seen: set[int] = set()
    for ref in list(_module_state_mapping.values()):
        state = ref()
        if isinstance(state, FSDPState) and id(state) not in seen:
            seen.add(id(state))
            yield state


def _records(module: nn.Module, name: str) -> list[tuple[FSDPParam, int | None]]:
    """The FSDPParams that unshard ``module.<name>``: with None where it is their main name, or the
    index in their shared (tied) names."""
    found: list[tuple[FSDPParam, int | None]] = []
    for state in _states():
        for group in state._fsdp_param_groups:
            for fsdp_param in group.fsdp_params:
                info = fsdp_param._module_info
                if info.module is module and info.param_name == name:
                    found.append((fsdp_param, None))
                for i, (shared, shared_name) in enumerate(
                    zip(info.shared_modules, info.shared_param_names, strict=True)
                ):
                    if shared is module and shared_name == name:
                        found.append((fsdp_param, i))
    return found


def rename(module: nn.Module, old: str, new: str) -> None:
    """Tell FSDP2 that the parameter it manages as ``module.<old>`` is ``module.<new>`` from now on (it
    unshards into, reshards into and re-reads that name). No-op for a parameter FSDP does not manage.
    Raises RuntimeError, before changing anything, while FSDP holds the parameter unsharded (inside
    a forward or backward, or after a forward that does not reshard): its sharded Parameter is not at
    that name then."""
    if old == new or "torch.distributed.fsdp" not in sys.modules:
        return
    try:
        found = _records(module, old)
        from torch.distributed.fsdp._fully_shard._fsdp_param import ShardedState
    except (ImportError, AttributeError) as exc:
        param = module._parameters.get(old)
        if not is_dtensor(param) and not _is_fsdp_module(module):
            return  # FSDP imported by some library, not used on this parameter
        raise RuntimeError(
            f"prunespec cannot find FSDP2's records of parameters in torch {torch.__version__} "
            f"({type(exc).__name__}: {exc}); pruning FSDP2 (fully_shard) models needs a torch it supports"
        ) from exc
    for fsdp_param, _ in found:
        if fsdp_param.sharded_state is not ShardedState.SHARDED:
            raise RuntimeError(
                f"FSDP holds {type(module).__name__}.{old} unsharded ({fsdp_param.sharded_state.name}): prune "
                "outside forward and backward, and after a forward that does not reshard call reshard() on "
                "the FSDP module first"
            )
    for fsdp_param, shared in found:
        info = fsdp_param._module_info
        if shared is None:
            info.param_name = new
        else:
            info.shared_param_names[shared] = new
        fqn = fsdp_param._param_fqn  # for FSDP's messages only
        if shared is None and fqn is not None and fqn.rsplit(".", 1)[-1] == old:
            fsdp_param._param_fqn = fqn[: len(fqn) - len(old)] + new


def _is_fsdp_module(module: nn.Module) -> bool:
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and isinstance(module, getattr(fsdp, "FSDPModule", ()))


@contextlib.contextmanager
def renamed(module: nn.Module, old: str, new: str) -> Iterator[None]:
    """:func:`rename`, then the body (which moves the parameter); renamed back if the body raises."""
    rename(module, old, new)
    try:
        yield
    except BaseException:
        rename(module, new, old)
        raise
