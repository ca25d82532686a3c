"""Workers of tests/test_fsdp_layout.py, run on every rank of a gloo group by ``ranks.spawn``.

Each builds the same model on every rank (one seed), a single-process copy pruned by torch's own
``prune`` as the reference, and an FSDP2 copy (``fully_shard``) pruned through ``prunespec.layout``
with the reference's masks as DTensors; every rank feeds the same batch, so FSDP's averaged gradients
are the reference's. A worker returns the names of the checks it passed (the test compares them).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, Replicate, distribute_tensor
from torch.nn.utils import prune

from prunespec import distributed, fsdp, layout

PRUNED = {"0": 0.5, "2": 0.3, "4.0": 0.6}  # layer -> amount, through layout.install
IN_PLACE = "4.2"  # finalized without the layout (layout.finalized_in_place)
ATOL = 1e-5


def build() -> nn.Sequential:
    """16-12-7-5-3: out_features 7, 5 and 3 split unevenly over 2 and 4 ranks (5 and 3 leave a rank
    nothing at 4); the last two Linears sit in a block FSDP shards as one (their parent's records)."""
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(7, 5), nn.ReLU(), nn.Linear(5, 3))
    return nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 7), nn.ReLU(), block)


def sharded(model: nn.Module, mesh: DeviceMesh, parts: tuple[str, ...]) -> nn.Module:
    for name in parts:
        fully_shard(model.get_submodule(name), mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def fsdp_name(model: nn.Module, param: torch.Tensor) -> tuple[str, list[str]]:
    """The name (and shared names) under which FSDP manages ``param``."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            for group in module._get_fsdp_state()._fsdp_param_groups:
                for fsdp_param in group.fsdp_params:
                    if fsdp_param.sharded_param is param:
                        info = fsdp_param._module_info
                        return info.param_name, list(info.shared_param_names)
    raise AssertionError("FSDP does not manage this parameter")


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def step(models: list[tuple[nn.Module, torch.optim.Optimizer]], x: torch.Tensor, steps: int = 1) -> None:
    for _ in range(steps):
        for model, optimizer in models:
            optimizer.zero_grad()
            model(x).square().mean().backward()
            optimizer.step()


def close(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(full(a), full(b), rtol=0, atol=ATOL, msg=lambda m: f"{what}: {m}")


def equal(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    """Bit for bit: before any training step FSDP's all-gathered weights are the reference's."""
    assert torch.equal(full(a), full(b)), f"{what}: {(full(a) - full(b)).abs().max()}"


def train_finalize_undo(rank: int, world: int) -> list[str]:
    """Install, forward, train, undo a finalize, finalize, train, finalize in place: the FSDP2 model
    against torch's pruning on one process at every stage."""
    done: list[str] = []
    mesh = init_device_mesh("cpu", (world,))
    ref = build()
    for name, amount in PRUNED.items():
        prune.l1_unstructured(ref.get_submodule(name), "weight", amount=amount)
    model = sharded(build(), mesh, ("0", "2", "4"))
    params = {name: model.get_submodule(name).weight for name in [*PRUNED, IN_PLACE]}
    for name, amount in PRUNED.items():
        layer, mask = model.get_submodule(name), ref.get_submodule(name).weight_mask
        layout.install(
            layer, "weight", distribute_tensor(mask, mesh, layer.weight.placements), [prune.L1Unstructured(amount)]
        )
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))

    # the layout: torch's names, the same Parameter objects, FSDP managing them at their new names
    assert list(model.state_dict()) == list(ref.state_dict()), (list(model.state_dict()), list(ref.state_dict()))
    assert prune.is_pruned(model)
    for name in PRUNED:
        layer = model.get_submodule(name)
        orig, mask = layer.weight_orig, layer.weight_mask
        assert orig is params[name] and isinstance(orig, nn.Parameter) and isinstance(orig, DTensor)
        assert isinstance(mask, DTensor) and mask.placements == orig.placements
        assert mask.to_local().shape == orig.to_local().shape
        assert torch.equal(mask.full_tensor(), ref.get_submodule(name).weight_mask)
        assert fsdp_name(model, orig) == ("weight_orig", [])
        assert isinstance(layer.weight, DTensor) and torch.equal(
            layer.weight.full_tensor(), ref.get_submodule(name).weight
        )
    done.append("layout")

    # forward, with grad (the mask all-gathered in the autograd function) and without
    equal(model(x), ref(x), "forward")
    for name in PRUNED:  # between forwards a module keeps its shard of the masked weight, not all of it
        weight = model.get_submodule(name).weight
        assert isinstance(weight, DTensor) and weight.grad_fn is None
        assert torch.equal(weight.full_tensor(), ref.get_submodule(name).weight)
    with torch.no_grad():
        equal(model(x), ref(x), "no_grad forward")
    model.load_state_dict(model.state_dict())  # FSDP re-reads each parameter at its (new) name
    equal(model(x), ref(x), "forward after load_state_dict")
    done.append("forward")

    # the cached product of two DTensors sees an in-place change of the shard
    layer = model.get_submodule("0")
    hook: Any = layer._forward_pre_hooks[layout.hook_key(layer, "weight")]
    with torch.no_grad():
        first = hook.apply_mask(layer)
        assert hook.apply_mask(layer) is first
        distributed.local(layer.weight_orig).mul_(2)
        second = hook.apply_mask(layer)
        assert second is not first and torch.equal(second.full_tensor(), 2 * first.full_tensor())
        distributed.local(layer.weight_orig).mul_(0.5)
    done.append("cache")

    # training: gradients reach weight_orig masked, AdamW's decay never revives a pruned weight
    optimizers = [(m, torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)) for m in (model, ref)]
    step(optimizers, x, 3)
    for name in PRUNED:
        layer, theirs = model.get_submodule(name), ref.get_submodule(name)
        grad = layer.weight_orig.grad
        assert isinstance(grad, DTensor)
        assert torch.all(grad.full_tensor()[theirs.weight_mask == 0] == 0)
        close(grad, theirs.weight_orig.grad, f"{name}.weight_orig.grad")
        close(layer.weight_orig, theirs.weight_orig, f"{name}.weight_orig")
        effective = fsdp.masked(layer.weight_orig, layer.weight_mask).full_tensor()
        assert torch.all(effective[theirs.weight_mask == 0] == 0)
        close(effective, theirs.weight_orig * theirs.weight_mask, f"{name} effective weight")
        assert isinstance(layer.weight_mask, DTensor) and layer.weight_mask.placements == layer.weight_orig.placements
    close(params[IN_PLACE], ref.get_submodule(IN_PLACE).weight, "unpruned weight")
    close(model(x), ref(x), "forward after training")
    done.append("training")

    # undo: a finalize, then the snapshot restored, gives the pruned layout back, and FSDP trains it
    with torch.no_grad():
        before_out = model(x)
    values = {name: params[name].full_tensor() for name in PRUNED}
    restores = [layout.snapshot(model.get_submodule(name), values=True) for name in PRUNED]
    for name in PRUNED:
        layout.remove(model.get_submodule(name), "weight")
    assert not prune.is_pruned(model)
    equal(model(x), before_out, "forward after a finalize")
    for restore in restores:
        restore()
    assert prune.is_pruned(model)
    for name in PRUNED:
        layer = model.get_submodule(name)
        assert layer.weight_orig is params[name] and isinstance(layer.weight_mask, DTensor)
        assert fsdp_name(model, params[name]) == ("weight_orig", [])
        assert torch.equal(params[name].full_tensor(), values[name])
    with torch.no_grad():
        assert torch.equal(model(x), before_out)
    step(optimizers, x)
    for name in PRUNED:
        close(params[name], ref.get_submodule(name).weight_orig, f"{name}.weight_orig after an undo")
    close(model(x), ref(x), "forward after an undo and a step")
    done.append("undo")

    # finalize: the same DTensor Parameter, masked in place, FSDP managing it as `weight` again
    for name in PRUNED:
        layout.remove(model.get_submodule(name), "weight")
        prune.remove(ref.get_submodule(name), "weight")
    assert not prune.is_pruned(model)
    assert list(model.state_dict()) == list(ref.state_dict())
    for name in PRUNED:
        layer, theirs = model.get_submodule(name), ref.get_submodule(name)
        assert layer.weight is params[name] and isinstance(layer.weight, DTensor)
        assert isinstance(layer.weight, nn.Parameter) and "weight_mask" not in layer._buffers
        assert next(layout.pruning_hooks(layer), None) is None
        assert not any(isinstance(h, layout.DetachAfterForward) for h in layer._forward_hooks.values())
        assert fsdp_name(model, params[name]) == ("weight", [])
        assert torch.equal(layer.weight.full_tensor(), theirs.weight)
    close(model(x), ref(x), "forward after finalize")
    step(optimizers, x, 2)
    for name in PRUNED:
        close(params[name], ref.get_submodule(name).weight, f"{name}.weight trained after finalize")
    done.append("finalize")

    # finalized in place, never in the layout: the same Parameter, its shard masked
    layer, theirs = model.get_submodule(IN_PLACE), ref.get_submodule(IN_PLACE)
    mask = prune.L1Unstructured(0.5).compute_mask(theirs.weight.detach(), torch.ones_like(theirs.weight))
    with torch.no_grad():
        theirs.weight.mul_(mask)
    layout.finalized_in_place([(layer, "weight")], distribute_tensor(mask, mesh, layer.weight.placements), None)
    assert layer.weight is params[IN_PLACE] and fsdp_name(model, layer.weight) == ("weight", [])
    assert torch.equal(layer.weight.full_tensor(), theirs.weight)
    close(model(x), ref(x), "forward after finalized_in_place")
    step(optimizers, x)
    close(layer.weight, theirs.weight, "trained after finalized_in_place")
    done.append("finalized_in_place")
    return done


class Tied(nn.Module):
    """Two Linears sharing one weight: FSDP manages it once, at a main and a shared name."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(6, 5), nn.Linear(6, 5)
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x) + self.b(x).relu()


def tied_and_refusals(rank: int, world: int) -> list[str]:
    """Tied weights on a root-only FSDP model (which keeps its parameters unsharded after a forward),
    the refusals, and the undo of an install."""
    done: list[str] = []
    mesh = init_device_mesh("cpu", (world,))
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(2))
    ref, model = Tied(), Tied()
    fully_shard(model, mesh=mesh)
    param = model.a.weight
    assert fsdp_name(model, param) == ("weight", ["weight"])
    mask = prune.L1Unstructured(0.4).compute_mask(ref.a.weight.detach(), torch.ones_like(ref.a.weight))
    dmask = distribute_tensor(mask, mesh, param.placements)

    # a mask that is not sharded like the parameter is refused, the module left as it was
    for wrong in (mask, distribute_tensor(mask, mesh, [Replicate()])):
        try:
            layout.install(model.a, "weight", wrong, [prune.L1Unstructured(0.4)])
        except ValueError as exc:
            assert "DTensor" in str(exc), exc
        else:
            raise AssertionError("a mask not sharded like its parameter was accepted")
        assert model.a.weight is param and not layout.is_pruned(model.a, "weight")
        assert fsdp_name(model, param) == ("weight", ["weight"])
    try:
        layout.keep_only(model.a, "weight", 0, torch.tensor([0, 1]))
    except ValueError as exc:
        assert "DTensor" in str(exc), exc
    else:
        raise AssertionError("a sharded weight was cut")
    assert model.a.weight is param and model.a.weight.shape == (5, 6)
    done.append("refuses a mask not sharded like its parameter, and a shrink")

    # an install undone (snapshot without values) tells FSDP the old names again
    restores = [layout.snapshot(m, "weight") for m in (model.a, model.b)]
    for m in (model.a, model.b):
        layout.install(m, "weight", dmask, [prune.L1Unstructured(0.4)])
    assert fsdp_name(model, param) == ("weight_orig", ["weight_orig"])
    for restore in restores:
        restore()
    assert fsdp_name(model, param) == ("weight", ["weight"]) and model.b.weight is param
    equal(model(x), ref(x), "forward after an undone install")
    model.reshard()
    done.append("undoes an install")

    # tied owners share one _orig and one mask; gradients of both uses reach it
    for m in (model.a, model.b):
        layout.install(m, "weight", dmask, [prune.L1Unstructured(0.4)])
    for m in (ref.a, ref.b):
        prune.custom_from_mask(m, "weight", mask)
    assert model.a.weight_orig is model.b.weight_orig is param
    assert fsdp_name(model, param) == ("weight_orig", ["weight_orig"])
    optimizers = [(m, torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)) for m in (model, ref)]
    step(optimizers, x, 2)
    close(param, ref.a.weight_orig, "tied weight_orig")
    assert torch.all(fsdp.masked(param, model.a.weight_mask).full_tensor()[mask == 0] == 0)
    done.append("tied")

    # while FSDP holds the parameter unsharded (a root keeps it so after a forward), no change
    with torch.no_grad():
        close(model(x), ref(x), "tied forward")
    assert not isinstance(model.a._parameters["weight_orig"], DTensor)  # the unsharded one
    try:
        layout.remove(model.a, "weight")
    except RuntimeError as exc:
        assert "reshard()" in str(exc), exc
    else:
        raise AssertionError("removed while FSDP holds the parameter unsharded")
    assert layout.is_pruned(model.a, "weight") and fsdp_name(model, param) == ("weight_orig", ["weight_orig"])
    done.append("refuses while unsharded")

    model.reshard()
    for m, theirs in ((model.a, ref.a), (model.b, ref.b)):
        layout.remove(m, "weight")
        prune.remove(theirs, "weight")
    assert model.a.weight is model.b.weight is param and fsdp_name(model, param) == ("weight", ["weight"])
    assert torch.equal(param.full_tensor(), ref.a.weight)
    step(optimizers, x)
    close(param, ref.a.weight, "tied weight after finalize")
    close(model(x), ref(x), "tied forward after finalize")
    done.append("tied finalize")
    return done
