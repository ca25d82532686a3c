"""Shared fixtures: the tutorial's LeNet (from examples/), seeded, and a fresh method registry."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
SPECS = EXAMPLES / "specs"
sys.path.insert(0, str(EXAMPLES))

from lenet import LeNet  # noqa: E402

import prunespec  # noqa: E402


@pytest.fixture
def lenet() -> LeNet:
    """The tutorial's LeNet with weights drawn from seed 0."""
    torch.manual_seed(0)
    return LeNet()


@pytest.fixture(scope="session")
def methods() -> prunespec.MethodRegistry:
    """The built-in methods only, so tests do not depend on which plugins are installed."""
    return prunespec.load_methods(builtins_only=True)


def state_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of a model's state_dict, to check that it did not change."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _modules(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    return list(model.named_modules(remove_duplicate=False))


class ModelState:
    """Everything a failed load, plan or apply must leave as it was: state_dict values, parameter and
    buffer objects and values (tied ones counted under every name), forward and pre-forward hooks, and
    each module's attributes (the same objects; a pruned tensor's masked attribute, which every forward
    recomputes, the same values)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.state = state_of(model)
        self.params = [(n, id(p)) for n, p in model.named_parameters(remove_duplicate=False)]
        self.param_values = [p.detach().clone() for _, p in model.named_parameters(remove_duplicate=False)]
        self.buffers = [(n, id(b)) for n, b in model.named_buffers(remove_duplicate=False)]
        self.hooks = self._hooks(model)
        self.attrs = {n: dict(m.__dict__) for n, m in _modules(model)}

    @staticmethod
    def _hooks(model: torch.nn.Module) -> dict[str, object]:
        return {n: (list(m._forward_pre_hooks.items()), list(m._forward_hooks.items())) for n, m in _modules(model)}

    def assert_unchanged(self, model: torch.nn.Module) -> None:
        __tracebackhide__ = True
        after = model.state_dict()
        assert list(after) == list(self.state), "state_dict keys changed"
        for key, value in self.state.items():
            assert torch.equal(after[key], value), f"{key} changed"
        assert [(n, id(p)) for n, p in model.named_parameters(remove_duplicate=False)] == self.params
        named = model.named_parameters(remove_duplicate=False)
        for (name, p), value in zip(named, self.param_values, strict=True):
            assert torch.equal(p, value), f"parameter {name} changed"
        assert [(n, id(b)) for n, b in model.named_buffers(remove_duplicate=False)] == self.buffers
        assert self._hooks(model) == self.hooks, "hooks changed"
        for name, module in _modules(model):
            assert sorted(module.__dict__) == sorted(self.attrs[name]), f"{name}: attributes added or removed"
            for key, value in self.attrs[name].items():
                now = module.__dict__[key]
                if key + "_orig" in module._parameters and isinstance(value, torch.Tensor):
                    assert torch.equal(now, value), f"{name}.{key} changed"
                else:
                    assert now is value, f"{name}.{key} was replaced"
