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
