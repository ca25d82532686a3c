"""Data-aware applies end to end: sparsegpt through the engine, OWL's allocations, the calibration block
and its record in the report and the checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import prunespec
from examples.tiny_transformers import tiny_llama
from prunespec.methods.sparsegpt import SparseGPT

LINEARS = {"types": ["Linear"], "exclude": ["lm_head"]}


def _llama_batches(n: int = 3) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        ids = torch.randint(0, 128, (2, 16), generator=gen)
        mask = torch.ones(2, 16, dtype=torch.long)
        mask[1, 10 - i :] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    after = model.state_dict()
    return after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def _sequential_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 8))


def _correlated(n: int = 4, tokens: int = 64) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    mix = torch.randn(16, 16, generator=gen)
    return [torch.randn(tokens, 16, generator=gen) @ mix for _ in range(n)]


def test_sparsegpt_writes_reconstructed_values_into_weight_orig() -> None:
    model = _sequential_model()
    data = _correlated()
    dense = model[0].weight.detach().clone()
    spec = {"version": 1, "rules": [{"select": {"names": ["0"]}, "method": "sparsegpt", "sparsity": 0.5}]}
    report = prunespec.apply(model, spec, data=data)
    layer = model[0]
    assert report.tensors["0.weight"] == 0.5
    kept = layer.weight_mask == 1
    assert not torch.equal(layer.weight_orig[kept], dense[kept])  # kept weights changed: reconstruction
    assert torch.equal(layer.weight_orig[~kept], dense[~kept])  # pruned ones keep the values they had
    # the same as the method on the statistics by hand
    gram = sum(x.T @ x for x in data)
    ctx = prunespec.MaskContext("0.weight", "0", "weight", layer, dense, None, {}, {"input_gram": gram})
    mask, values = SparseGPT(amount=round(0.5 * dense.numel())).reconstruct(ctx)
    assert torch.equal(mask, layer.weight_mask)
    assert torch.allclose(values, layer.weight_orig, rtol=1e-4, atol=1e-5)
    x = torch.cat(data)
    error = ((x @ dense.T - x @ layer.weight.T).pow(2).sum() / (x @ dense.T).pow(2).sum()).item()
    assert report.entries["0.weight"].error == pytest.approx(error, rel=1e-3)
    assert prunespec.finalize(model) == ["0.weight"]
    assert torch.allclose(model[0].weight, values * mask, rtol=1e-4, atol=1e-5)
    assert torch.equal(model[0].weight == 0, mask == 0)


def test_sparsegpt_beats_wanda_and_magnitude_on_correlated_inputs() -> None:
    errors = {}
    x = torch.cat(_correlated())
    for method in ("sparsegpt", "wanda", "l1_unstructured"):
        model = _sequential_model()
        dense = model[0].weight.detach().clone()
        spec = {"version": 1, "rules": [{"select": {"names": ["0"]}, "method": method, "sparsity": 0.5}]}
        prunespec.apply(model, spec, data=_correlated())
        errors[method] = ((x @ dense.T - x @ model[0].weight.T).pow(2).sum() / (x @ dense.T).pow(2).sum()).item()
    assert errors["sparsegpt"] < errors["wanda"] and errors["sparsegpt"] < errors["l1_unstructured"]


def test_a_failure_after_sparsegpt_changed_values_leaves_the_model_bit_for_bit(monkeypatch: pytest.MonkeyPatch) -> None:
    model = _sequential_model()
    before = _state(model)
    real, calls = SparseGPT.reconstruct, []

    def second_fails(self: SparseGPT, ctx: prunespec.MaskContext) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(ctx.name)
        if len(calls) == 2:
            raise RuntimeError("out of luck")
        return real(self, ctx)

    monkeypatch.setattr(SparseGPT, "reconstruct", second_fails)
    spec = {"version": 1, "rules": [{"select": {"types": ["Linear"]}, "method": "sparsegpt", "sparsity": 0.5}]}
    with pytest.raises(prunespec.ApplyError, match=r"tensor 2\.weight: sparsegpt failed: RuntimeError: out of luck"):
        prunespec.apply(model, spec, data=_correlated())
    assert calls == ["0.weight", "2.weight"]
    assert _same(model, before)
    assert "weight" in model[0]._parameters and not model[0]._forward_pre_hooks


def test_two_four_sparsegpt_on_a_tiny_llama_with_padded_batches() -> None:
    model = tiny_llama()
    spec = {"version": 1, "rules": [{"select": LINEARS, "method": "sparsegpt", "options": {"n": 2, "m": 4}}]}
    report = prunespec.apply(model, spec, data=_llama_batches())
    assert all(s == 0.5 for s in report.tensors.values())
    mask = model.model.layers[0].mlp.down_proj.weight_mask
    assert torch.all(mask.reshape(mask.shape[0], -1, 4).sum(dim=2) == 2)
    assert report.calibration is not None and report.calibration.samples == 3
    tokens = sum(int(b["attention_mask"].sum()) for b in _llama_batches())
    assert report.calibration.tokens == tokens  # padding left out


def test_calibration_samples_sequential_and_errors_settings() -> None:
    data = _llama_batches(4)
    base = {"select": LINEARS, "method": "wanda", "sparsity": 0.5}
    first = tiny_llama()
    two = prunespec.apply(first, {"version": 1, "calibration": {"samples": 2}, "rules": [base]}, data=data)
    again = tiny_llama()
    prunespec.apply(again, {"version": 1, "rules": [base]}, data=data[:2])
    assert two.calibration is not None and two.calibration.samples == 2
    for name in two.tensors:
        module = name.rsplit(".", 1)[0]
        assert torch.equal(first.get_submodule(module).weight_mask, again.get_submodule(module).weight_mask)
    with pytest.raises(prunespec.ApplyError, match=r"calibration\.samples is 9, but the data gave 4 batches"):
        prunespec.apply(tiny_llama(), {"version": 1, "calibration": {"samples": 9}, "rules": [base]}, data=data)
    dense = prunespec.apply(
        tiny_llama(), {"version": 1, "calibration": {"sequential": False}, "rules": [base]}, data=data
    )
    sequential = prunespec.apply(tiny_llama(), {"version": 1, "rules": [base]}, data=data)
    assert dense.calibration is not None and not dense.calibration.sequential
    later = "model.layers.1.mlp.down_proj.weight"
    assert dense.entries[later].error != sequential.entries[later].error  # layer 1 saw other inputs
    quiet = prunespec.apply(tiny_llama(), {"version": 1, "calibration": {"errors": False}, "rules": [base]}, data=data)
    assert all(s.error is None for s in quiet.entries.values()) and "recon. error" not in str(quiet)


def test_owl_allocates_per_block_around_the_target_and_the_plan_shows_it() -> None:
    data = _llama_batches()
    rule = {"select": LINEARS, "method": "wanda", "sparsity": 0.6, "owl": {"m": 2, "lambda": 0.1}}
    spec = {"version": 1, "rules": [rule]}
    model = tiny_llama()
    bare = prunespec.plan(model, spec)
    assert bare.needs_data == ["rules[0]"] and bare.owl[0].allocated is None
    planned = prunespec.plan(model, spec, data=data)
    allocated = planned.owl[0].allocated
    assert allocated is not None and set(allocated) == {"model.layers.0", "model.layers.1"}
    assert sum(allocated.values()) / len(allocated) == pytest.approx(0.6, abs=1e-9)
    assert len(set(allocated.values())) > 1
    for block, sparsity in allocated.items():
        assert f"{sparsity:.2%}"[:-1] in str(planned) or block in str(planned)
    report = prunespec.apply(model, planned, data=data)
    for name, achieved in report.tensors.items():
        block = ".".join(name.split(".")[:3])
        assert achieved == pytest.approx(allocated[block], abs=0.02)  # per-row rounding
    assert report.calibration is not None and report.calibration.allocations == {0: allocated}


def test_owl_with_l1_needs_data_only_to_allocate() -> None:
    data = _llama_batches()
    spec = {"version": 1, "rules": [{"select": LINEARS, "method": "l1_unstructured", "sparsity": 0.5, "owl": {}}]}
    model = tiny_llama()
    with pytest.raises(prunespec.PlanError, match="needs calibration data"):
        prunespec.apply(model, spec)
    report = prunespec.apply(model, spec, data=data)
    assert report.calibration is not None and report.calibration.allocations
    per_block = report.calibration.allocations[0]
    for name, achieved in report.tensors.items():
        assert achieved == pytest.approx(per_block[".".join(name.split(".")[:3])], abs=1e-3)


def test_the_record_goes_into_the_checkpoint(tmp_path: Path) -> None:
    data = _llama_batches()
    spec = {
        "version": 1,
        "calibration": {"errors": False},
        "rules": [{"select": LINEARS, "method": "wanda", "sparsity": 0.5}],
    }
    model = tiny_llama()
    report = prunespec.apply(model, spec, data=data)
    path = tmp_path / "wanda.pt"
    prunespec.save(model, path, spec=spec, record=report.calibration)
    saved = prunespec.inspect(path)
    assert saved.calibration == report.calibration
    assert saved.spec is not None and saved.spec.calibration.errors is False
    fingerprint = prunespec.Fingerprint()
    for batch in data:
        fingerprint.add(batch)
    assert saved.calibration is not None and saved.calibration.fingerprint == fingerprint.hexdigest()
    again = tiny_llama()  # the saved spec and the same data give the same masks
    prunespec.apply(again, saved.spec, data=data)
    for name in report.tensors:
        module = name.rsplit(".", 1)[0]
        assert torch.equal(again.get_submodule(module).weight_mask, model.get_submodule(module).weight_mask)


class ActivationL1(prunespec.PruningMethod):
    """|W_ij| * ||X_j||, ranked across a global group (a plugin may: prunespec does not forbid it)."""

    name = "activation_l1"
    statistics = ("input_sq_norms",)
    own_random = True

    def score(self, ctx: prunespec.MaskContext) -> torch.Tensor:
        return ctx.values.abs() * ctx.statistics["input_sq_norms"].sqrt()


def test_a_global_data_aware_rule_ranks_across_layers_from_the_statistics_of_each() -> None:
    from prunespec.methods.base import MethodInfo
    from prunespec.plugins import MethodRegistry

    registry = MethodRegistry(
        {**prunespec.load_methods(builtins_only=True), "activation_l1": MethodInfo.from_class(ActivationL1)}
    )
    model = _sequential_model()
    data = _correlated()
    dense = {name: model.get_submodule(name).weight.detach().clone() for name in ("0", "2")}
    spec = {
        "version": 1,
        "rules": [{"select": {"types": ["Linear"]}, "method": "activation_l1", "amount": 100, "scope": "global"}],
    }
    prunespec.apply(model, spec, data=data, methods=registry)
    with torch.no_grad():  # statistics from the dense model: a global group is decided after the pass
        x = torch.cat(data)
        norms = {
            "0": x.pow(2).sum(0).sqrt(),
            "2": torch.relu(nn.functional.linear(x, dense["0"], model[0].bias)).pow(2).sum(0).sqrt(),
        }
    scores = torch.cat([(dense[n].abs() * norms[n]).reshape(-1) for n in ("0", "2")])
    lowest = set(torch.sort(scores, stable=True).indices[:100].tolist())
    masks = torch.cat([model.get_submodule(n).weight_mask.reshape(-1) for n in ("0", "2")])
    assert set((masks == 0).nonzero().reshape(-1).tolist()) == lowest


def test_planning_with_data_uses_the_same_samples_as_apply(monkeypatch: pytest.MonkeyPatch) -> None:
    from prunespec import budgets

    real, seen = budgets.owl_allocations, []

    def counted(model: nn.Module, plan: prunespec.Plan, batches: list[Any]) -> dict[int, dict[str, float]]:
        seen.append(len(batches))
        return real(model, plan, batches)

    monkeypatch.setattr(budgets, "owl_allocations", counted)
    rule = {"select": LINEARS, "method": "wanda", "sparsity": 0.6, "owl": {}}
    spec = {"version": 1, "calibration": {"samples": 2}, "rules": [rule]}
    planned = prunespec.plan(tiny_llama(), spec, data=_llama_batches(3))
    assert seen == [2] and planned.owl[0].allocated is not None
    prunespec.apply(tiny_llama(), spec, data=_llama_batches(3))
    assert seen == [2, 2]
