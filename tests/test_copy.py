"""``copy.deepcopy`` and ``pickle`` of prunespec-pruned models — right after apply, after a training
forward + backward, after optimizer steps — and re-prunes that fail.

Plain ``torch.nn.utils.prune`` fails both: deepcopy raises after a forward with grad
(pytorch/pytorch#37322), and a failed second prune drops the module's hook. Each is shown here too, so
that the prunespec tests mean something.
"""

from __future__ import annotations

import copy
import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import state_of
from lenet import LeNet
from torch import nn
from torch.nn.utils import prune

import prunespec
from prunespec.layout import DetachAfterForward
from prunespec.methods.base import MethodInfo

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

from tiny_transformers import tiny_gpt2  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402


def lenet() -> nn.Module:
    torch.manual_seed(0)
    return LeNet()


SPECS: dict[str, dict[str, Any]] = {
    "lenet": {
        "version": 1,
        "rules": [
            {"select": {"types": ["Conv2d", "Linear"]}, "method": "l1_unstructured", "amount": 0.5},
            {"select": {"names": ["fc1"]}, "method": "ln_structured", "options": {"n": 2, "dim": 0}, "amount": 0.25},
        ],
    },
    "gpt2": {
        "version": 1,
        "rules": [
            {"select": {"types": ["Conv1D"]}, "method": "l1_unstructured", "amount": 0.5},
            {"select": {"names": ["lm_head"]}, "method": "l1_unstructured", "amount": 0.3},
        ],
    },
}
FACTORIES: dict[str, Callable[[], nn.Module]] = {"lenet": lenet, "gpt2": tiny_gpt2}
MORE = {"version": 1, "rules": [{"select": {"preset": "prunable"}, "method": "l1_unstructured", "amount": 0.5}]}


def inputs(model: nn.Module) -> torch.Tensor:
    gen = torch.Generator().manual_seed(3)
    if isinstance(model, LeNet):
        return torch.randn(4, 1, 28, 28, generator=gen)
    return torch.randint(0, 128, (2, 10), generator=gen)


def loss(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    logits = out if isinstance(out, torch.Tensor) else out.logits
    return logits.float().pow(2).mean()


def evaluate(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    was = model.training
    model.eval()
    with torch.no_grad():
        out = model(x)
    model.train(was)
    return out if isinstance(out, torch.Tensor) else out.logits


def masks(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: buf for name, buf in model.named_buffers(remove_duplicate=False) if name.endswith("_mask")}


def origs(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p for name, p in model.named_parameters(remove_duplicate=False) if name.endswith("_orig")}


def pruning_hooks(model: nn.Module) -> dict[str, list[Any]]:
    return {
        name: [h for h in m._forward_pre_hooks.values() if isinstance(h, prune.BasePruningMethod)]
        for name, m in model.named_modules()
        if m._forward_pre_hooks
    }


def train_steps(model: nn.Module, x: torch.Tensor, optimizer: torch.optim.Optimizer | None, steps: int = 2) -> None:
    model.train()
    for _ in range(steps if optimizer is not None else 1):
        if optimizer is not None:
            optimizer.zero_grad()
        loss(model, x).backward()
        if optimizer is not None:
            optimizer.step()


STAGES: dict[str, Callable[[nn.Module], torch.optim.Optimizer | None] | None] = {
    "applied": None,
    "backward": lambda model: None,
    "sgd-momentum": lambda model: torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
    "adam": lambda model: torch.optim.Adam(model.parameters(), lr=1e-2),
}
COPIES: dict[str, Callable[[nn.Module], nn.Module]] = {
    "deepcopy": copy.deepcopy,
    "pickle": lambda model: pickle.loads(pickle.dumps(model)),
}


def assert_grads_respect_masks(model: nn.Module, x: torch.Tensor) -> None:
    __tracebackhide__ = True
    model.train()
    model.zero_grad(set_to_none=True)
    loss(model, x).backward()
    for key, mask in masks(model).items():
        grad = model.get_parameter(key.removesuffix("_mask") + "_orig").grad
        assert grad is not None, key
        assert bool((grad[mask == 0] == 0).all()), f"{key}: a pruned entry got a gradient"
        assert bool((grad[mask == 1] != 0).any()), f"{key}: no gradient at all"


@pytest.mark.parametrize("how", list(COPIES))
@pytest.mark.parametrize("stage", list(STAGES))
@pytest.mark.parametrize("arch", list(FACTORIES))
def test_copy_of_a_pruned_model(arch: str, stage: str, how: str, methods: prunespec.MethodRegistry) -> None:
    model = FACTORIES[arch]()
    prunespec.apply(model, SPECS[arch], methods=methods)
    x = inputs(model)
    make_optimizer = STAGES[stage]
    if make_optimizer is not None:
        train_steps(model, x, make_optimizer(model))
        assert any(p.grad is not None for p in model.parameters())

    the_copy = COPIES[how](model)

    # the same model ...
    assert prune.is_pruned(the_copy)
    assert masks(the_copy).keys() == masks(model).keys()
    for key, mask in masks(model).items():
        assert torch.equal(masks(the_copy)[key], mask) and masks(the_copy)[key] is not mask, key
    for key, orig in origs(model).items():
        assert torch.equal(origs(the_copy)[key], orig) and origs(the_copy)[key] is not orig, key
    for name, module in the_copy.named_modules():
        original = model.get_submodule(name)
        assert [type(h) for h in module._forward_pre_hooks.values()] == [
            type(h) for h in original._forward_pre_hooks.values()
        ], name
        assert sum(isinstance(h, DetachAfterForward) for h in module._forward_hooks.values()) == sum(
            isinstance(h, DetachAfterForward) for h in original._forward_hooks.values()
        ), name
    if arch == "gpt2":  # the tie survives the copy: one Parameter, one mask
        assert the_copy.lm_head.weight_orig is the_copy.transformer.wte.weight_orig
        assert the_copy.lm_head.weight_mask is the_copy.transformer.wte.weight_mask
    assert torch.equal(evaluate(the_copy, x), evaluate(model, x))

    # ... but independent of the original: pruning and training the copy leave the original alone
    before, out = state_of(model), evaluate(model, x)
    prunespec.apply(the_copy, MORE, methods=methods)
    train_steps(the_copy, x, torch.optim.SGD(the_copy.parameters(), lr=0.5))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert torch.equal(evaluate(model, x), out)
    assert not torch.equal(evaluate(the_copy, x), out)

    # gradients still reach <name>_orig, never through a pruned entry, in both
    assert_grads_respect_masks(model, x)
    assert_grads_respect_masks(the_copy, x)
    # and a copy of the copy, after all that, works too
    assert torch.equal(evaluate(COPIES[how](the_copy), x), evaluate(the_copy, x))


@pytest.mark.parametrize("arch", list(FACTORIES))
def test_copy_between_forward_and_backward(arch: str, methods: prunespec.MethodRegistry) -> None:
    """The graph of a training forward is still alive when the model is copied; backward works after."""
    model = FACTORIES[arch]()
    prunespec.apply(model, SPECS[arch], methods=methods)
    x = inputs(model)
    model.train()
    pending = loss(model, x)
    for how, make_copy in COPIES.items():
        the_copy = make_copy(model)
        assert torch.equal(evaluate(the_copy, x), evaluate(model, x)), how
    pending.backward()
    for key, mask in masks(model).items():
        grad = model.get_parameter(key.removesuffix("_mask") + "_orig").grad
        assert grad is not None and bool((grad[mask == 0] == 0).all()), key


def torch_prune(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear, Conv1D)) and module is not getattr(model, "lm_head", None):
            prune.l1_unstructured(module, "weight", amount=0.5)


@pytest.mark.parametrize("arch", list(FACTORIES))
def test_plain_torch_pruning_cannot_be_deepcopied_after_a_forward_with_grad(
    arch: str, methods: prunespec.MethodRegistry
) -> None:
    """The torch bug the tests above guard against; the same model pruned by prunespec copies fine."""
    torch_model, ours = FACTORIES[arch](), FACTORIES[arch]()
    torch_prune(torch_model)
    prunespec.apply(ours, {"version": 1, "rules": [{"select": {"preset": "prunable"}, **L1}]}, methods=methods)
    x = inputs(torch_model)
    # torch computes the masked attribute with autograd history, even right after pruning
    with pytest.raises(RuntimeError, match="graph leaves"):
        copy.deepcopy(torch_model)
    assert torch.equal(evaluate(copy.deepcopy(ours), x), evaluate(ours, x))
    for model in (torch_model, ours):
        model.train()
        loss(model, x).backward()
    with pytest.raises(RuntimeError, match="graph leaves"):
        copy.deepcopy(torch_model)
    assert torch.equal(evaluate(copy.deepcopy(ours), x), evaluate(ours, x))


L1 = {"method": "l1_unstructured", "amount": 0.5}


# --- a re-prune that fails -------------------------------------------------------------------------------


class Raises(prunespec.PruningMethod):
    name = "raises"
    PRUNING_TYPE = "unstructured"

    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")


@pytest.fixture(scope="module")
def with_raises() -> prunespec.MethodRegistry:
    registry = prunespec.load_methods(builtins_only=True)
    registry.add(MethodInfo.from_class(Raises, name="raises"))
    return registry


FAILING: dict[str, tuple[type[prunespec.PrunespecError], Callable[[str], dict[str, Any]]]] = {
    # a count larger than what the first apply left: found by the plan, before anything changes
    "count too large": (
        prunespec.PlanError,
        lambda target: {"version": 1, "rules": [{"select": {"names": [target]}, **L1, "amount": 10**6}]},
    ),
    # a method that raises, on a tensor the first apply pruned (through torch's PruningContainer), after a
    # rule that succeeds: neither is applied
    "method raises": (
        prunespec.ApplyError,
        lambda target: {
            "version": 1,
            "rules": [
                {"select": {"preset": "prunable"}, **L1},
                {"select": {"names": [target]}, "method": "raises", "amount": 0.5},
            ],
        },
    ),
}
TARGETS = {"lenet": "fc3", "gpt2": "lm_head"}


@pytest.mark.parametrize("case", list(FAILING))
@pytest.mark.parametrize("arch", list(FACTORIES))
def test_failed_re_prune_leaves_the_earlier_pruning_working(
    arch: str, case: str, with_raises: prunespec.MethodRegistry
) -> None:
    model = FACTORIES[arch]()
    prunespec.apply(model, SPECS[arch], methods=with_raises)
    x = inputs(model)
    model.train()
    loss(model, x).backward()  # a forward with grad first: the masked attributes have been recomputed
    before_state = state_of(model)
    before_hooks = {n: list(m._forward_pre_hooks.items()) for n, m in model.named_modules()}
    before_post = {n: list(m._forward_hooks.items()) for n, m in model.named_modules()}
    before_params = [(n, id(p)) for n, p in model.named_parameters(remove_duplicate=False)]
    out = evaluate(model, x)

    error, make_spec = FAILING[case]
    with pytest.raises(error):
        prunespec.apply(model, make_spec(TARGETS[arch]), methods=with_raises)

    # nothing changed: values, parameter objects, hooks
    assert list(model.state_dict()) == list(before_state)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before_state.items())
    assert [(n, id(p)) for n, p in model.named_parameters(remove_duplicate=False)] == before_params
    assert {n: list(m._forward_pre_hooks.items()) for n, m in model.named_modules()} == before_hooks
    assert {n: list(m._forward_hooks.items()) for n, m in model.named_modules()} == before_post
    # and it works: pruned, the forward uses the masks, gradients respect them, it copies
    assert prune.is_pruned(model)
    assert torch.equal(evaluate(model, x), out)
    for key, mask in masks(model).items():
        module_name, _, buffer = key.rpartition(".")
        module = model.get_submodule(module_name)
        pname = buffer.removesuffix("_mask")
        assert torch.equal(getattr(module, pname), getattr(module, pname + "_orig") * mask), key
    assert_grads_respect_masks(model, x)
    assert torch.equal(evaluate(copy.deepcopy(model), x), out)
    # prune.remove makes it permanent, as after any torch pruning
    expected = {
        key.removesuffix("_mask"): model.get_parameter(key.removesuffix("_mask") + "_orig").detach() * mask
        for key, mask in masks(model).items()
    }
    for module in model.modules():
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, prune.BasePruningMethod):
                prune.remove(module, hook._tensor_name)
    assert not prune.is_pruned(model)
    for name, value in expected.items():
        assert torch.equal(model.get_parameter(name), value), name
    assert torch.equal(evaluate(model, x), out)


def test_plain_torch_failed_re_prune_loses_the_hook() -> None:
    """What the test above guards against: torch leaves <name>_orig and the mask, but no hook."""
    model = lenet()
    prune.l1_unstructured(model.fc3, "weight", amount=0.5)
    with pytest.raises(ValueError, match="amount"):
        prune.l1_unstructured(model.fc3, "weight", amount=10**6)
    assert "weight_orig" in model.fc3._parameters and "weight_mask" in model.fc3._buffers
    assert not model.fc3._forward_pre_hooks
    assert not prune.is_pruned(model)
    with pytest.raises(ValueError, match="has to be pruned before pruning can be removed"):
        prune.remove(model.fc3, "weight")


@pytest.mark.parametrize("pruned_by", ["prunespec", "torch"])
def test_model_loaded_from_a_checkpoint_copies_after_a_training_forward(
    pruned_by: str, tmp_path: Path, methods: prunespec.MethodRegistry
) -> None:
    """`prunespec.load` installs the same forward hook as `apply`, also for a torch-pruned state_dict."""
    source = tiny_gpt2()
    if pruned_by == "prunespec":
        prunespec.apply(source, SPECS["gpt2"], methods=methods)
    else:
        torch_prune(source)
    path = tmp_path / "ckpt.pt"
    torch.save(source.state_dict(), path)
    model = tiny_gpt2(seed=1)
    prunespec.load(model, path, methods=methods)
    x = inputs(model)
    train_steps(model, x, torch.optim.Adam(model.parameters(), lr=1e-2))
    for make_copy in COPIES.values():
        assert torch.equal(evaluate(make_copy(model), x), evaluate(model, x))
    assert_grads_respect_masks(model, x)
