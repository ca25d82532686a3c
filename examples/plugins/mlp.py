"""The model the plugin examples of docs/writing-a-plugin.md prune (three Linear layers, seeded), and
calibration batches for the data-aware one."""

from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 32)
        self.fc3 = nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))
        return out


def mlp(seed: int = 0) -> MLP:
    """An MLP with weights drawn from ``seed``; the caller's random state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MLP()


def batches(n: int = 4, size: int = 8, seed: int = 1) -> list[torch.Tensor]:
    """``n`` calibration batches of ``size`` random inputs of the MLP (16 features each), drawn from ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(size, 16, generator=gen) for _ in range(n)]
