"""Calibration statistics: shared between siblings that see one input, padded positions left out."""

from __future__ import annotations

import torch
from torch import nn

from prunespec import calibration


class Attention(nn.Module):
    """q, k and v read one input tensor; o reads another."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(8, 8) for _ in range(4))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = input_ids
        return self.o(self.q(x) + self.k(x) + self.v(x))


def _modules(model: nn.Module) -> dict[str, nn.Module]:
    return {name: model.get_submodule(name) for name in ("q", "k", "v", "o")}


def test_siblings_share_one_statistic_computed_once(monkeypatch: object) -> None:
    model = Attention()
    calls = []
    real = calibration.input_sq_sums

    def counted(x: torch.Tensor, keep: torch.Tensor | None, into: torch.Tensor | None = None) -> torch.Tensor:
        calls.append(tuple(x.shape))
        return real(x, keep, into)

    monkeypatch.setitem(calibration._COMPUTE, "input_sq_norms", counted)  # type: ignore[attr-defined]
    batches = [torch.randn(2, 3, 8), torch.randn(1, 4, 8)]
    stats = calibration.collect(model, _modules(model), {"input_sq_norms"}, batches, "rules[0]")
    assert len(calls) == 4  # per batch: once for q/k/v's input, once for o's
    assert stats["q"]["input_sq_norms"] is stats["k"]["input_sq_norms"] is stats["v"]["input_sq_norms"]
    assert stats["o"]["input_sq_norms"] is not stats["q"]["input_sq_norms"]
    expected = sum(b.reshape(-1, 8).pow(2).sum(0) for b in batches)
    assert torch.equal(stats["q"]["input_sq_norms"], expected)
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_padded_positions_are_left_out() -> None:
    model = Attention()
    x = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    padded = calibration.collect(
        model, _modules(model), {"input_sq_norms"}, [{"input_ids": x, "attention_mask": mask}], "r"
    )
    alone = calibration.collect(model, _modules(model), {"input_sq_norms"}, [x[:1], x[1:, :2]], "r")
    for name in ("q", "o"):
        assert torch.allclose(padded[name]["input_sq_norms"], alone[name]["input_sq_norms"], rtol=1e-6, atol=0)


def test_modes_are_restored() -> None:
    model = Attention().train()
    seen = []
    model.q.register_forward_hook(lambda m, a, o: seen.append(m.training))
    calibration.collect(model, _modules(model), {"input_sq_norms"}, [torch.randn(1, 2, 8)], "r")
    assert seen == [False] and all(m.training for m in model.modules())
