"""Gradual magnitude pruning during training, in a plain PyTorch loop.

A small MLP learns to imitate a fixed random "teacher" network on synthetic data (no downloads), while
``prunespec.Scheduler`` raises the sparsity of its Linear weights from 0% to 90% along a cubic curve, one
update per epoch (the schedule is in ``examples/specs/schedules/gradual_cubic.yaml``). Training goes on at
90% for a few epochs after the schedule ends, and the pruning is made permanent at the very end::

    python examples/gradual_pruning.py

Runs in a few seconds on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import prunespec
from prunespec.scheduler import Scheduler

SPEC = Path(__file__).resolve().parent / "specs" / "schedules" / "gradual_cubic.yaml"


@dataclass(frozen=True)
class Epoch:
    epoch: int
    sparsity: float  # fraction of zeros over every Linear weight
    loss: float  # mean training loss over the epoch


def make_student() -> nn.Sequential:
    return nn.Sequential(nn.Linear(20, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 10))


def make_data(samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and the targets a fixed random teacher gives them."""
    teacher = nn.Sequential(nn.Linear(20, 64), nn.Tanh(), nn.Linear(64, 10))
    x = torch.randn(samples, 20)
    with torch.no_grad():
        y = teacher(x)
    return x, y


def weight_sparsity(model: nn.Module) -> float:
    """Fraction of zeros over the effective Linear weights (masked while pruning, plain once finalized)."""
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def main(epochs: int = 10, samples: int = 1024, batch_size: int = 64, seed: int = 0) -> list[Epoch]:
    torch.manual_seed(seed)
    x, y = make_data(samples)
    model = make_student()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    scheduler = Scheduler(model, SPEC)  # checks the spec against the model before training starts
    history = []
    for epoch in range(epochs):
        scheduler.step(epoch)  # at the start of each epoch: this epoch trains at the new sparsity
        total = 0.0
        order = torch.randperm(samples)
        for start in range(0, samples, batch_size):
            batch = order[start : start + batch_size]
            loss = nn.functional.mse_loss(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()  # updates weight_orig; the mask keeps pruned weights at zero in forward
            total += loss.item() * len(batch)
        history.append(Epoch(epoch, weight_sparsity(model), total / samples))
        print(f"epoch {epoch:2d}  sparsity {history[-1].sparsity:6.2%}  loss {history[-1].loss:.5f}")
    prunespec.finalize(model)  # training is over: make it permanent (plain weights, no masks or hooks)
    print(f"finalized: sparsity {weight_sparsity(model):.2%} after {scheduler.updates} updates")
    return history


if __name__ == "__main__":
    main()
