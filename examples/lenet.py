"""The LeNet of PyTorch's pruning tutorial, as an importable module.

``LeNet()`` is the tutorial's current model (3x3 kernels, 28x28 input); ``LeNet(kernel_size=5)`` is the
older one (5x5 kernels, 32x32 input). ``make_lenet`` seeds the weights so that runs are repeatable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LeNet(nn.Module):
    def __init__(self, kernel_size: int = 3) -> None:
        super().__init__()
        # 1 input image channel, 6 output channels, kernel_size x kernel_size square conv kernel
        self.conv1 = nn.Conv2d(1, 6, kernel_size)
        self.conv2 = nn.Conv2d(6, 16, kernel_size)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)  # 5x5 image dimension
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)
        self.input_size = 28 if kernel_size == 3 else 32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), (2, 2))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = x.view(-1, int(x.nelement() / x.shape[0]))
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def make_lenet(seed: int = 0) -> LeNet:
    """A LeNet with weights drawn from ``seed``."""
    torch.manual_seed(seed)
    return LeNet()
