"""wanda: masks against an independent computation of |W_ij| * ||X_j||, per row, per tensor and 2:4."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import prunespec
from examples.tiny_transformers import tiny_llama
from prunespec.methods.wanda import Wanda
from prunespec.testing import check_method


def _model_and_data(seed: int = 0) -> tuple[nn.Sequential, list[torch.Tensor]]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8))
    data = [torch.randn(5, 16), torch.randn(3, 16)]
    return model, data


Masker = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _expected(model: nn.Sequential, data: list[torch.Tensor], masker: Masker, *, sequential: bool = True) -> dict:
    """Each Linear's mask by hand, from ||X_j||_2 of its input over every token of every batch; with
    ``sequential``, layer 2's input comes from layer 0 already pruned (the formula's mask applied)."""
    masks = {}
    with torch.no_grad():
        x = torch.cat(data)
        first = model[0]
        masks["0"] = masker(first.weight, x.pow(2).sum(0).sqrt())
        weight = first.weight * masks["0"] if sequential else first.weight
        hidden = torch.relu(nn.functional.linear(x, weight, first.bias))
        masks["2"] = masker(model[2].weight, hidden.pow(2).sum(0).sqrt())
    return masks


def _per_row(amount: float) -> Masker:
    def masker(w: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
        score = w.abs() * norms
        expected = torch.ones_like(w)
        expected.scatter_(1, torch.sort(score, dim=1, stable=True).indices[:, : round(amount * w.shape[1])], 0.0)
        return expected

    return masker


def _per_tensor(sparsity: float) -> Masker:
    def masker(w: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
        score = (w.abs() * norms).reshape(-1)
        expected = torch.ones(w.numel())
        expected[torch.sort(score, stable=True).indices[: round(sparsity * w.numel())]] = 0.0
        return expected.reshape(w.shape)

    return masker


def _two_four(w: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    score = w.abs() * norms
    expected = torch.ones_like(w)
    for i in range(w.shape[0]):
        for g in range(0, w.shape[1], 4):
            low = torch.sort(score[i, g : g + 4], descending=True, stable=True).indices[2:]
            expected[i, g + low] = 0.0
    return expected


def _spec(**rule: object) -> dict[str, object]:
    return {"version": 1, "rules": [{"select": {"types": ["Linear"]}, "method": "wanda", **rule}]}


def _masks(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: model.get_submodule(name).weight_mask for name in ("0", "2")}


def test_per_row_masks_are_the_formula_layer_after_pruned_layer() -> None:
    model, data = _model_and_data()
    expected = _expected(model, data, _per_row(0.3))
    dense = _expected(model, data, _per_row(0.3), sequential=False)
    assert not torch.equal(expected["2"], dense["2"])  # the test tells sequential from one dense pass
    prunespec.apply(model, _spec(amount=0.3), data=data)
    for name, mask in _masks(model).items():
        assert torch.equal(mask, expected[name])


def test_per_tensor_masks_are_the_formula() -> None:
    model, data = _model_and_data(1)
    expected = _expected(model, data, _per_tensor(0.4))
    prunespec.apply(model, _spec(sparsity=0.4, options={"compare": "tensor"}), data=data)
    for name, mask in _masks(model).items():
        assert torch.equal(mask, expected[name])


def test_two_four_keeps_the_two_highest_of_every_four() -> None:
    model, data = _model_and_data(2)
    expected = _expected(model, data, _two_four)
    report = prunespec.apply(model, _spec(options={"n": 2, "m": 4}), data=data)
    assert report.global_sparsity == 0.5
    for name, mask in _masks(model).items():
        assert torch.equal(mask, expected[name])


def test_amount_and_n_m_together_is_a_spec_error() -> None:
    model, data = _model_and_data()
    with pytest.raises(prunespec.SpecError, match="with n and m takes no `amount`"):
        prunespec.apply(model, _spec(amount=0.5, options={"n": 2, "m": 4}), data=data)
    with pytest.raises(prunespec.SpecError, match="needs `amount` or `sparsity`"):
        prunespec.apply(model, _spec(), data=data)


def test_no_data_is_a_plan_error_before_anything_changes() -> None:
    model, _ = _model_and_data()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = prunespec.plan(model, _spec(amount=0.5))
    assert plan.to_dict()["needs_data"] == ["rules[0]"]
    assert "Calibration data: needed by rules[0]" in str(plan)
    with pytest.raises(prunespec.PlanError, match=r"needs calibration data.*data=batches.*--data file.py:factory"):
        prunespec.apply(model, _spec(amount=0.5))
    assert model.state_dict().keys() == before.keys()


def test_a_bad_batch_is_an_apply_error_naming_it_and_the_model_is_untouched() -> None:
    model, data = _model_and_data()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    message = r"calibration batch 2: its input to 0 has shape \[2, 5\], but 0 takes 16 features"
    with pytest.raises(prunespec.ApplyError, match=message) as info:
        prunespec.apply(model, _spec(amount=0.5), data=[*data, torch.randn(2, 5)])
    assert info.value.batch == 2  # type: ignore[attr-defined]
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert all(not m._forward_pre_hooks for m in model.modules())


def test_conv_and_global_are_refused() -> None:
    conv = nn.Sequential(nn.Conv2d(3, 4, 3))
    with pytest.raises(prunespec.PlanError, match="is a Conv2d"):
        prunespec.plan(conv, {"version": 1, "rules": [{"select": {"names": ["0"]}, "method": "wanda", "amount": 0.5}]})
    model, _ = _model_and_data()
    with pytest.raises(prunespec.SpecError, match="scope: global"):
        prunespec.plan(model, _spec(amount=0.5, scope="global"))


def test_check_method_supplies_statistics() -> None:
    check_method(Wanda, shapes=((8, 16),))
    check_method(Wanda, options={"compare": "tensor"}, amount=5, shapes=((8, 16),))
    check_method(Wanda, options={"n": 2, "m": 4}, shapes=((8, 16),))


def _llama_batches() -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128, (2, 10), generator=gen)
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, 6:] = 0
    return [{"input_ids": ids, "attention_mask": mask}, {"input_ids": ids[:1, :7], "attention_mask": mask[:1, :7]}]


LLAMA_SPEC = {
    "version": 1,
    "rules": [{"select": {"types": ["Linear"], "exclude": ["lm_head"]}, "method": "wanda", "sparsity": 0.5}],
}


def test_tiny_llama_through_the_api() -> None:
    model = tiny_llama()
    report = prunespec.apply(model, LLAMA_SPEC, data=_llama_batches())
    assert report.global_sparsity == 0.5
    assert all(abs(s - 0.5) < 1e-9 for s in report.tensors.values())
    with torch.no_grad():
        model(**_llama_batches()[0])  # still runs


def test_tiny_llama_through_the_cli(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[1]
    factory = tmp_path / "calib.py"
    factory.write_text(
        "import torch\n\n\ndef batches():\n"
        "    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))\n"
        "    mask = torch.ones(2, 10, dtype=torch.long)\n    mask[1, 6:] = 0\n"
        "    return [{'input_ids': ids, 'attention_mask': mask}]\n"
    )
    spec = tmp_path / "wanda.yaml"
    spec.write_text(
        "version: 1\nrules:\n  - select: {types: [Linear], exclude: [lm_head]}\n    method: wanda\n    sparsity: 0.5\n"
    )
    out = tmp_path / "pruned.pt"
    cmd = [sys.executable, "-m", "prunespec", "apply", str(spec), "--model", "examples/tiny_transformers.py:tiny_llama"]
    args = [*cmd, "--data", f"{factory}:batches", "--out", str(out)]
    done = subprocess.run(args, cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "50.00%" in done.stdout and out.is_file()
    missing = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    assert missing.returncode == 1 and "--data file.py:factory" in missing.stderr


def test_two_four_saves_and_loads(tmp_path: Path) -> None:
    model, data = _model_and_data(3)
    spec = _spec(options={"n": 2, "m": 4})
    prunespec.apply(model, spec, data=data)
    path = tmp_path / "nm.pt"
    prunespec.save(model, path, spec=spec)
    fresh, _ = _model_and_data(4)  # other weights: everything must come from the file
    loaded = prunespec.load(fresh, path)
    assert loaded is not None and loaded.rules[0].options == {"compare": "row", "n": 2, "m": 4}
    for name in ("0", "2"):
        assert torch.equal(fresh.get_submodule(name).weight_mask, model.get_submodule(name).weight_mask)
        assert torch.equal(fresh.get_submodule(name).weight, model.get_submodule(name).weight)
    x = torch.randn(3, 16)
    assert torch.equal(fresh(x), model(x))
