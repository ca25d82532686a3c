"""Every step of PyTorch's pruning tutorial, twice: the example spec through ``prunespec.apply`` on one
model, the tutorial's own ``torch.nn.utils.prune`` calls on a deep copy of it, and the two must agree.

Both LeNets of the tutorial are covered: ``LeNet()`` (3x3 kernels, 28x28 input) and
``LeNet(kernel_size=5)`` (5x5 kernels, 32x32 input).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from conftest import SPECS
from lenet import LeNet
from torch import nn
from torch.nn.utils import prune

import prunespec

TorchSteps = Callable[[nn.Module], Iterator[None]]
RANDOM_METHODS = {"random_unstructured", "random_structured"}

kernel_sizes = pytest.mark.parametrize("kernel_size", [3, 5], ids=["lenet28", "lenet32"])


# --- the tutorial's torch calls, one `yield` after each rule of the matching spec -------------------


def torch_random_conv1(model: nn.Module) -> Iterator[None]:
    prune.random_unstructured(model.conv1, name="weight", amount=0.3)
    yield


def torch_l1_conv1_bias(model: nn.Module) -> Iterator[None]:
    prune.l1_unstructured(model.conv1, name="bias", amount=3)
    yield


def torch_iterative_conv1(model: nn.Module) -> Iterator[None]:
    prune.random_unstructured(model.conv1, name="weight", amount=0.3)
    yield
    prune.l1_unstructured(model.conv1, name="bias", amount=3)
    yield
    prune.ln_structured(model.conv1, name="weight", amount=0.5, n=2, dim=0)
    yield


def torch_every_layer_type(model: nn.Module) -> Iterator[None]:
    # the tutorial's loop does both types in one pass; per module, the calls are the same
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            prune.l1_unstructured(module, name="weight", amount=0.2)
    yield
    for module in model.modules():
        if isinstance(module, nn.Linear):
            prune.l1_unstructured(module, name="weight", amount=0.4)
    yield


def torch_global_l1(model: nn.Module) -> Iterator[None]:
    parameters_to_prune = (
        (model.conv1, "weight"),
        (model.conv2, "weight"),
        (model.fc1, "weight"),
        (model.fc2, "weight"),
        (model.fc3, "weight"),
    )
    prune.global_unstructured(parameters_to_prune, pruning_method=prune.L1Unstructured, amount=0.2)
    yield


def torch_sparsity_target(model: nn.Module) -> Iterator[None]:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    for module in linears:
        prune.l1_unstructured(module, name="weight", amount=0.4)
    yield
    for module in linears:  # sparsity 0.6: round(0.6 * n) - already pruned, as a count
        already = int((module.weight_mask == 0).sum())
        prune.l1_unstructured(module, name="weight", amount=round(0.6 * module.weight.numel()) - already)
    yield
    channels = model.conv2.weight.shape[0]  # sparsity 0.25 of conv2's output channels
    prune.ln_structured(model.conv2, name="weight", amount=round(0.25 * channels), n=1, dim=0)
    yield


CASES: dict[str, TorchSteps] = {
    "random_conv1.yaml": torch_random_conv1,
    "l1_conv1_bias.yaml": torch_l1_conv1_bias,
    "iterative_conv1.yaml": torch_iterative_conv1,
    "every_layer_type.yaml": torch_every_layer_type,
    "global_l1.yaml": torch_global_l1,
    "sparsity_target.yaml": torch_sparsity_target,
}


# --- helpers ---------------------------------------------------------------------------------------


def fresh(kernel_size: int) -> tuple[LeNet, LeNet]:
    """A seeded LeNet and its deep copy, made before any forward."""
    torch.manual_seed(0)
    model = LeNet(kernel_size=kernel_size)
    return model, copy.deepcopy(model)


def masks_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """``"conv1.weight"`` -> a copy of its mask, for every pruned tensor."""
    return {
        name.removesuffix("_mask"): buf.detach().clone()
        for name, buf in model.named_buffers()
        if name.endswith("_mask")
    }


def run_torch(steps: TorchSteps, model: nn.Module, seed: int | None) -> list[dict[str, torch.Tensor]]:
    """Run the torch calls (after ``torch.manual_seed(seed)`` when the spec has a seed); the masks after
    each rule."""
    if seed is not None:
        torch.manual_seed(seed)
    return [masks_of(model) for _ in steps(model)]


def sample_input(model: LeNet) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1234)
    return torch.randn(4, 1, model.input_size, model.input_size, generator=generator)


def assert_same_structure(model: nn.Module, twin: nn.Module) -> None:
    assert [n for n, _ in model.named_parameters()] == [n for n, _ in twin.named_parameters()]
    assert [n for n, _ in model.named_buffers()] == [n for n, _ in twin.named_buffers()]
    assert list(model.state_dict()) == list(twin.state_dict())


def assert_same_outputs(model: LeNet, twin: LeNet) -> None:
    x = sample_input(model)
    with torch.no_grad():
        assert torch.equal(model(x), twin(x))


def assert_report_counts(report: prunespec.Report, masks: dict[str, torch.Tensor]) -> None:
    """The report says what the masks say: zeros per tensor, and over all of them."""
    assert set(report.tensors) == set(masks)
    for name, mask in masks.items():
        zeros = int((mask == 0).sum())
        assert report.entries[name].zeros == zeros, name
        assert report.tensors[name] == zeros / mask.numel(), name
    total = sum(mask.numel() for mask in masks.values())
    assert report.global_sparsity == sum(int((m == 0).sum()) for m in masks.values()) / total


def is_deterministic(spec: prunespec.Spec) -> bool:
    return spec.seed is not None or not any(rule.method in RANDOM_METHODS for rule in spec.rules)


# --- the tests -------------------------------------------------------------------------------------


def test_every_example_spec_has_its_torch_calls() -> None:
    assert sorted(p.name for p in SPECS.glob("*.yaml")) == sorted(CASES)


@kernel_sizes
@pytest.mark.parametrize("spec_name", list(CASES))
def test_spec_matches_the_tutorials_torch_calls(
    spec_name: str, kernel_size: int, methods: prunespec.MethodRegistry
) -> None:
    model, twin = fresh(kernel_size)
    path = SPECS / spec_name
    spec = prunespec.load_spec(path, methods=methods)

    report = prunespec.apply(model, path, methods=methods)
    history = run_torch(CASES[spec_name], twin, spec.seed)

    assert len(history) == len(spec.rules)
    assert_same_structure(model, twin)
    assert prune.is_pruned(model)
    masks, expected = masks_of(model), history[-1]
    assert masks.keys() == expected.keys()
    for name, mask in masks.items():
        if is_deterministic(spec):
            assert torch.equal(mask, expected[name]), name
        else:
            assert int((mask == 0).sum()) == int((expected[name] == 0).sum()), name
        # the masked attribute is orig * mask, as torch computes it
        module_name, _, pname = name.rpartition(".")
        module = model.get_submodule(module_name)
        assert torch.equal(getattr(module, pname), getattr(module, pname + "_orig") * mask)
    if is_deterministic(spec):
        assert_same_outputs(model, twin)
    assert_report_counts(report, masks)
    # the tutorial measures sparsity as zero values of the masked attribute
    for name in masks:
        module_name, _, pname = name.rpartition(".")
        value = getattr(twin.get_submodule(module_name), pname)
        assert report.tensors[name] == float(torch.sum(value == 0)) / float(value.nelement()), name
    # the report of a model pruned by torch itself reads the same
    assert prunespec.sparsity(twin).tensors == report.tensors
    assert prunespec.sparsity(model).tensors == report.tensors


@kernel_sizes
@pytest.mark.parametrize("spec_name", ["iterative_conv1.yaml", "every_layer_type.yaml", "sparsity_target.yaml"])
def test_later_rules_keep_the_zeros_of_earlier_ones(
    spec_name: str, kernel_size: int, methods: prunespec.MethodRegistry
) -> None:
    model, twin = fresh(kernel_size)
    spec = prunespec.load_spec(SPECS / spec_name, methods=methods)
    assert len(spec.rules) > 1
    prunespec.apply(model, spec, methods=methods)
    final = masks_of(model)
    history = run_torch(CASES[spec_name], twin, spec.seed)
    for k in range(1, len(spec.rules)):
        partial, _ = fresh(kernel_size)
        prunespec.apply(partial, spec.model_copy(update={"rules": spec.rules[:k]}), methods=methods)
        earlier = masks_of(partial)
        assert earlier.keys() == history[k - 1].keys()
        for name, mask in earlier.items():
            if is_deterministic(spec):
                assert torch.equal(mask, history[k - 1][name]), (k, name)
            assert bool((final[name][mask == 0] == 0).all()), (k, name)


@kernel_sizes
def test_structured_rule_after_random_prunes_whole_remaining_channels(
    kernel_size: int, methods: prunespec.MethodRegistry
) -> None:
    model, _ = fresh(kernel_size)
    prunespec.apply(model, SPECS / "random_conv1.yaml", methods=methods)
    random_mask = masks_of(model)["conv1.weight"]
    model, _ = fresh(kernel_size)
    prunespec.apply(model, SPECS / "iterative_conv1.yaml", methods=methods)
    mask = masks_of(model)["conv1.weight"]
    channels = mask.shape[0]
    dead_before = int((random_mask.reshape(channels, -1) == 0).all(dim=1).sum())
    dead_after = int((mask.reshape(channels, -1) == 0).all(dim=1).sum())
    # ln_structured amount=0.5 ranks only the channels the random rule left (torch's PruningContainer)
    assert dead_after == dead_before + round(0.5 * (channels - dead_before))
    assert bool((mask[random_mask == 0] == 0).all())
    alive = (mask.reshape(channels, -1) != 0).any(dim=1)
    assert torch.equal(mask[alive], random_mask[alive])  # surviving channels keep exactly the random zeros


@kernel_sizes
@pytest.mark.parametrize("first_by", ["prunespec", "torch"])
def test_step_by_step_applies_compose_like_the_tutorial(
    first_by: str, kernel_size: int, methods: prunespec.MethodRegistry
) -> None:
    """The tutorial prunes one call at a time; separate applies (on top of torch's pruning too) compose the same."""
    model, twin = fresh(kernel_size)
    ln_structured = {
        "version": 1,
        "rules": [
            {
                "select": {"names": ["conv1"]},
                "method": "ln_structured",
                "amount": 0.5,
                "options": {"n": 2, "dim": 0},
            }
        ],
    }
    if first_by == "prunespec":
        prunespec.apply(model, SPECS / "random_conv1.yaml", methods=methods)
    else:
        seed = prunespec.load_spec(SPECS / "random_conv1.yaml", methods=methods).seed
        assert seed is not None
        torch.manual_seed(seed)
        prune.random_unstructured(model.conv1, name="weight", amount=0.3)
    bias_report = prunespec.apply(model, SPECS / "l1_conv1_bias.yaml", methods=methods)
    weight_report = prunespec.apply(model, ln_structured, methods=methods)
    run_torch(torch_iterative_conv1, twin, prunespec.load_spec(SPECS / "iterative_conv1.yaml", methods=methods).seed)

    assert_same_structure(model, twin)
    masks = masks_of(model)
    assert masks.keys() == masks_of(twin).keys()
    for name, mask in masks_of(twin).items():
        assert torch.equal(masks[name], mask), name
    assert_same_outputs(model, twin)
    assert_report_counts(bias_report, {"conv1.bias": masks["conv1.bias"]})
    assert_report_counts(weight_report, {"conv1.weight": masks["conv1.weight"]})
    assert sorted(prunespec.finalize(model)) == ["conv1.bias", "conv1.weight"]
    assert not prune.is_pruned(model)


@kernel_sizes
def test_random_without_seed_prunes_exact_counts(
    kernel_size: int, methods: prunespec.MethodRegistry, tmp_path: Path
) -> None:
    text = (SPECS / "random_conv1.yaml").read_text(encoding="utf-8")
    assert "seed: 0\n" in text
    path = tmp_path / "random_no_seed.yaml"
    path.write_text(text.replace("seed: 0\n", ""), encoding="utf-8")
    assert prunespec.load_spec(path, methods=methods).seed is None

    model, twin = fresh(kernel_size)
    torch.manual_seed(1)
    report = prunespec.apply(model, path, methods=methods)
    torch.manual_seed(2)
    prune.random_unstructured(twin.conv1, name="weight", amount=0.3)

    assert_same_structure(model, twin)
    zeros = int((model.conv1.weight_mask == 0).sum())
    assert zeros == int((twin.conv1.weight_mask == 0).sum())
    assert zeros == round(0.3 * twin.conv1.weight.numel())
    assert report.entries["conv1.weight"].zeros == zeros


@kernel_sizes
def test_seeded_spec_gives_the_same_mask_every_time(kernel_size: int, methods: prunespec.MethodRegistry) -> None:
    first, second = fresh(kernel_size)
    torch.manual_seed(7)
    rng = torch.get_rng_state()
    prunespec.apply(first, SPECS / "random_conv1.yaml", methods=methods)
    assert torch.equal(torch.get_rng_state(), rng)  # the spec's seed does not leak into the caller's RNG
    torch.manual_seed(8)
    prunespec.apply(second, SPECS / "random_conv1.yaml", methods=methods)
    assert torch.equal(first.conv1.weight_mask, second.conv1.weight_mask)


@kernel_sizes
def test_sparsity_target_counts_follow_torch_rounding(kernel_size: int, methods: prunespec.MethodRegistry) -> None:
    path = SPECS / "sparsity_target.yaml"
    spec = prunespec.load_spec(path, methods=methods)
    # the numbers below are the spec's; fail loudly if the example changes
    assert [(r.amount, r.sparsity) for r in spec.rules] == [(0.4, None), (None, 0.6), (None, 0.25)]
    model, _ = fresh(kernel_size)
    report = prunespec.apply(model, path, methods=methods)

    expected: dict[str, int] = {}
    for name in ("fc1", "fc2", "fc3"):
        n = model.get_submodule(name).weight_orig.numel()
        first = round(0.4 * n)  # amount: a fraction of what is left, rounded half to even
        second = round(0.6 * n) - first  # sparsity: round(s * N) - already pruned
        expected[f"{name}.weight"] = first + second
    channels = model.conv2.weight_orig.shape[0]
    per_channel = model.conv2.weight_orig.numel() // channels
    expected["conv2.weight"] = round(0.25 * channels) * per_channel

    assert {name: s.zeros for name, s in report.entries.items()} == expected
    for name, zeros in expected.items():
        assert report.tensors[name] == zeros / report.entries[name].numel
    assert report.global_sparsity == sum(expected.values()) / sum(s.numel for s in report.entries.values())
    dead = (model.conv2.weight_mask.reshape(channels, -1) == 0).all(dim=1)
    assert int(dead.sum()) == round(0.25 * channels)
    assert_report_counts(report, masks_of(model))


def test_sparsity_rounds_half_to_even_like_torch(lenet: LeNet, methods: prunespec.MethodRegistry) -> None:
    # conv1.bias has 6 entries (0.75 * 6 = 4.5), fc3.bias 10 (0.25 * 10 = 2.5): exact ties
    twin = copy.deepcopy(lenet)
    spec = {
        "version": 1,
        "rules": [
            {"select": {"names": ["conv1"], "params": ["bias"]}, "method": "l1_unstructured", "amount": 1},
            {"select": {"names": ["conv1"], "params": ["bias"]}, "method": "l1_unstructured", "sparsity": 0.75},
            {"select": {"names": ["fc3"], "params": ["bias"]}, "method": "l1_unstructured", "sparsity": 0.25},
        ],
    }
    report = prunespec.apply(lenet, spec, methods=methods)
    prune.l1_unstructured(twin.conv1, name="bias", amount=1)
    prune.l1_unstructured(twin.conv1, name="bias", amount=round(0.75 * 6) - 1)
    prune.l1_unstructured(twin.fc3, name="bias", amount=0.25)  # torch rounds the fraction itself
    assert round(0.75 * 6) == 4 and round(0.25 * 10) == 2  # half to even, not half up
    assert report.entries["conv1.bias"].zeros == int((twin.conv1.bias_mask == 0).sum()) == 4
    assert report.entries["fc3.bias"].zeros == int((twin.fc3.bias_mask == 0).sum()) == 2
    assert torch.equal(lenet.conv1.bias_mask, twin.conv1.bias_mask)
    assert torch.equal(lenet.fc3.bias_mask, twin.fc3.bias_mask)


def _finalize_spec(tmp_path: Path) -> Path:
    text = (SPECS / "iterative_conv1.yaml").read_text(encoding="utf-8")
    assert "finalize" not in text
    path = tmp_path / "iterative_finalized.yaml"
    path.write_text(text + "finalize: true\n", encoding="utf-8")
    return path


@kernel_sizes
@pytest.mark.parametrize("how", ["spec", "argument", "function"])
def test_finalize_matches_prune_remove(
    how: str, kernel_size: int, methods: prunespec.MethodRegistry, tmp_path: Path
) -> None:
    model, twin = fresh(kernel_size)
    path = SPECS / "iterative_conv1.yaml"
    spec = prunespec.load_spec(path, methods=methods)
    if how == "spec":
        report = prunespec.apply(model, _finalize_spec(tmp_path), methods=methods)
    elif how == "argument":
        report = prunespec.apply(model, path, methods=methods, finalize=True)
    else:
        report = prunespec.apply(model, path, methods=methods)
        assert prune.is_pruned(model)
        assert sorted(prunespec.finalize(model)) == ["conv1.bias", "conv1.weight"]

    run_torch(torch_iterative_conv1, twin, spec.seed)
    masked_weight = twin.conv1.weight.detach().clone()
    prune.remove(twin.conv1, "weight")  # the tutorial's step
    assert isinstance(twin.conv1.weight, nn.Parameter)
    assert isinstance(model.conv1.weight, nn.Parameter)
    assert torch.equal(model.conv1.weight, twin.conv1.weight)
    assert torch.equal(model.conv1.weight, masked_weight)
    prune.remove(twin.conv1, "bias")  # prunespec finalizes every pruned tensor

    assert_same_structure(model, twin)
    names = [n for n, _ in model.named_parameters()] + [n for n, _ in model.named_buffers()] + list(model.state_dict())
    assert not [n for n in names if n.endswith(("_orig", "_mask"))]
    assert not prune.is_pruned(model)
    assert not any(len(m._forward_pre_hooks) for m in model.modules())
    for (name, param), (_, expected) in zip(model.named_parameters(), twin.named_parameters(), strict=True):
        assert type(param) is nn.Parameter and param.requires_grad, name
        assert torch.equal(param, expected), name
    assert_same_outputs(model, twin)
    # the report counts zero values of the finalized tensors
    for name in ("conv1.weight", "conv1.bias"):
        value = twin.get_parameter(name)
        assert report.tensors[name] == int((value == 0).sum()) / value.numel()


@kernel_sizes
def test_finalize_works_on_a_model_pruned_by_torch(kernel_size: int) -> None:
    model, twin = fresh(kernel_size)
    for pruned_by_torch in (model, twin):  # no deepcopy: torch's pruned attribute is not a graph leaf
        run_torch(torch_iterative_conv1, pruned_by_torch, seed=0)
        run_torch(torch_every_layer_type, pruned_by_torch, seed=None)
    finalized = prunespec.finalize(model)
    pruned = [name for name in masks_of(twin)]
    assert sorted(finalized) == sorted(pruned)
    for name in pruned:
        module_name, _, pname = name.rpartition(".")
        prune.remove(twin.get_submodule(module_name), pname)
    assert dict(model.named_buffers()).keys() == dict(twin.named_buffers()).keys()
    params, expected = dict(model.named_parameters()), dict(twin.named_parameters())
    assert params.keys() == expected.keys()
    assert all(torch.equal(params[k], expected[k]) for k in params)
    assert not prune.is_pruned(model)
    assert_same_outputs(model, twin)
