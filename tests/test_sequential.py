"""The calibration pass: stops in forward order, each module calibrated on the outputs of the modules
before it as pruned, with the arguments the model really passes it; failures leave the model as it was."""

from __future__ import annotations

import gc
import subprocess
import sys
import threading
from pathlib import Path

import greenlet
import pytest
import torch
from torch import nn

import prunespec
from examples.tiny_transformers import tiny_gpt2, tiny_llama
from prunespec import calibration
from prunespec.sequential import Arrival, BatchFailed, Pass


class Blocks(nn.Module):
    """Two blocks; the model passes each its own ``scale`` (as Gemma-2 passes each layer its own mask)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block() for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x, scale=float(i + 1))
        return x


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(6, 10), nn.Linear(10, 6)

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(x)) * scale)


def _suspended() -> int:
    """Batches' forwards started and not finished (greenlets other than this one)."""
    here = greenlet.getcurrent()
    return sum(1 for o in gc.get_objects() if issubclass(type(o), greenlet.greenlet) and o and o is not here)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    after = model.state_dict()
    hooks = any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    return after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before) and not hooks


def test_stops_come_in_forward_order_once_per_module() -> None:
    torch.manual_seed(0)
    model = Blocks()
    watched = {name: model.get_submodule(name) for name in ("layers.1.down", "layers.0.up", "layers.0.down")}
    seen = []
    with Pass(model, [torch.randn(3, 6), torch.randn(2, 6)], watched) as p:
        while (stop := p.next_stop()) is not None:
            seen.append((stop.module, [a.batch for a in stop.arrivals]))
            p.release(stop.module)
    assert seen == [("layers.0.up", [0, 1]), ("layers.0.down", [0, 1]), ("layers.1.down", [0, 1])]


def test_each_block_sees_its_own_arguments_and_the_pruned_outputs_before_it() -> None:
    torch.manual_seed(0)
    model = Blocks()
    data = [torch.randn(4, 6), torch.randn(3, 6)]
    spec = {
        "version": 1,
        "rules": [{"select": {"names": ["layers.*.down"]}, "method": "wanda", "amount": 0.5}],
    }
    with torch.no_grad():  # by hand: block 0 pruned by the formula, then block 1's input to down
        x = torch.cat(data)
        first = model.layers[0]
        hidden0 = torch.relu(first.up(x)) * 1.0
        score0 = first.down.weight.abs() * hidden0.pow(2).sum(0).sqrt()
        mask0 = torch.ones_like(score0).scatter_(1, torch.sort(score0, dim=1, stable=True).indices[:, :5], 0.0)
        x1 = x + nn.functional.linear(hidden0, first.down.weight * mask0, first.down.bias)
        second = model.layers[1]
        hidden1 = torch.relu(second.up(x1)) * 2.0  # block 1's own scale
        score1 = second.down.weight.abs() * hidden1.pow(2).sum(0).sqrt()
        mask1 = torch.ones_like(score1).scatter_(1, torch.sort(score1, dim=1, stable=True).indices[:, :5], 0.0)
    prunespec.apply(model, spec, data=data)
    assert torch.equal(model.layers[0].down.weight_mask, mask0)
    assert torch.equal(model.layers[1].down.weight_mask, mask1)


class Routed(nn.Module):
    """A mixture: batches whose first value is positive go through ``a``, the others through ``b``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.out = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x) if float(x[0, 0]) > 0 else self.b(x)
        return self.out(h)


def test_a_module_some_batches_never_reach_does_not_hold_up_the_others() -> None:
    torch.manual_seed(0)
    model = Routed()
    up, down = torch.randn(2, 4), torch.randn(3, 4)
    up[0, 0], down[0, 0] = 1.0, -1.0
    spec = {"version": 1, "rules": [{"select": {"types": ["Linear"]}, "method": "wanda", "amount": 0.25}]}
    report = prunespec.apply(model, spec, data=[up, down, up.clone()])
    assert set(report.tensors) == {"a.weight", "b.weight", "out.weight"}
    with torch.no_grad():  # `a` saw batches 0 and 2 only
        norms = torch.cat([up, up]).pow(2).sum(0).sqrt()
    score = model.a.weight_orig.abs() * norms
    expected = torch.ones_like(score).scatter_(1, torch.sort(score, dim=1, stable=True).indices[:, :1], 0.0)
    assert torch.equal(model.a.weight_mask, expected)


def test_a_module_the_forward_never_runs_is_an_error_and_nothing_changes() -> None:
    model = Routed()
    before = _state(model)
    x = torch.ones(2, 4)
    spec = {"version": 1, "rules": [{"select": {"names": ["b"]}, "method": "wanda", "amount": 0.25}]}
    with pytest.raises(prunespec.ApplyError, match="never ran b"):
        prunespec.apply(model, spec, data=[x])
    assert _same(model, before)


class Failing(nn.Module):
    def __init__(self, error: BaseException, at: int) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(4, 4), nn.Linear(4, 4)
        self.error, self.at, self.calls = error, at, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.first(x)
        self.calls += 1
        if self.calls == self.at:
            raise self.error
        return self.second(h)


def test_a_batch_failing_mid_pass_is_named_and_nothing_changes() -> None:
    model = Failing(RuntimeError("boom"), at=2)
    before = _state(model)
    suspended = _suspended()
    spec = {"version": 1, "rules": [{"select": {"types": ["Linear"]}, "method": "wanda", "amount": 0.5}]}
    with pytest.raises(prunespec.ApplyError, match="calibration batch 1: the forward pass failed: RuntimeError: boom"):
        prunespec.apply(model, spec, data=[torch.randn(2, 4) for _ in range(3)])
    assert _same(model, before)
    assert "weight" in model.first._parameters and "weight" not in model.first.__dict__
    assert _suspended() == suspended


def test_an_interrupt_inside_the_model_propagates_and_nothing_changes() -> None:
    model = Failing(KeyboardInterrupt(), at=3)
    before = _state(model)
    spec = {"version": 1, "rules": [{"select": {"types": ["Linear"]}, "method": "wanda", "amount": 0.5}]}
    with pytest.raises(KeyboardInterrupt):
        prunespec.apply(model, spec, data=[torch.randn(2, 4) for _ in range(3)])
    assert _same(model, before)


def test_a_pass_started_from_another_thread_gives_the_same_masks() -> None:
    # the batches' greenlets belong to the thread that runs the pass, whichever it is
    torch.manual_seed(0)
    spec = {"version": 1, "rules": [{"select": {"types": ["Linear"]}, "method": "wanda", "amount": 0.5}]}
    data = [torch.randn(3, 6) for _ in range(3)]
    here, there = Blocks(), Blocks()
    there.load_state_dict(here.state_dict())
    prunespec.apply(here, spec, data=data)
    failed: list[BaseException] = []

    def run() -> None:
        try:
            prunespec.apply(there, spec, data=data)
        except BaseException as exc:
            failed.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    assert not failed
    masks = {k: v for k, v in here.state_dict().items() if k.endswith("_mask")}
    assert masks and all(torch.equal(v, there.state_dict()[k]) for k, v in masks.items())


def test_an_interrupt_in_the_coordinator_stops_every_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    model = Blocks()
    before = _state(model)
    suspended = _suspended()
    real = calibration.Accumulator.at
    calls = []

    def interrupted(self: calibration.Accumulator, *args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(calibration.Accumulator, "at", interrupted)
    spec = {"version": 1, "rules": [{"select": {"types": ["Linear"]}, "method": "wanda", "amount": 0.5}]}
    with pytest.raises(KeyboardInterrupt):
        prunespec.apply(model, spec, data=[torch.randn(2, 6) for _ in range(4)])
    assert _same(model, before)
    assert _suspended() == suspended


class Autocast(nn.Module):
    """``first`` runs under bfloat16 autocast, ``second`` outside it: a batch waiting at ``first`` is
    inside the ``with``, one waiting at ``second`` is not."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.second = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = self.first(x)
        return self.second(y.float())


def test_each_batch_keeps_its_own_torch_thread_state_where_it_waits() -> None:
    # every batch runs in the caller's thread: one that left autocast must not take it from the next
    torch.manual_seed(0)
    model = Autocast()
    batches = [torch.randn(3, 8) for _ in range(3)]
    with torch.no_grad():
        expected = [model.second(model.first(b).float()) for b in batches]  # `first` in float32 here
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = [model.first(b).float() for b in batches]
    watched = {"first": model.first, "second": model.second}
    assert torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
    seen: dict[str, list[torch.Tensor]] = {}
    with Pass(model, batches, watched) as p:
        while (stop := p.next_stop()) is not None:
            assert torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")  # the caller's own, still
            seen[stop.module] = [a.x for a in stop.arrivals]
            p.release(stop.module)
    assert torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
    assert [x.dtype for x in seen["first"]] == [torch.float32] * 3
    for got, want in zip(seen["second"], bf16, strict=True):  # each batch's `first` ran under autocast
        assert torch.equal(got, want)
    assert not any(torch.equal(got, want.float()) for got, want in zip(seen["second"], expected, strict=True))


def test_pass_reports_a_failed_batch_by_index() -> None:
    model = Failing(ValueError("bad"), at=1)
    with (
        Pass(model, [torch.randn(1, 4), torch.randn(1, 4)], {"second": model.second}) as p,
        pytest.raises(BatchFailed) as info,
    ):
        p.next_stop()
    assert info.value.index == 0 and isinstance(info.value.error, ValueError)


def _gpt2_batches() -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128, (2, 12), generator=gen)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 7:] = 0
    return [{"input_ids": ids, "attention_mask": mask}, {"input_ids": ids[:1, :5], "attention_mask": mask[:1, :5]}]


GPT2_SPEC = {
    "version": 1,
    "rules": [
        {"select": {"names": ["re:transformer\\.h\\..*"], "types": ["Conv1D"]}, "method": "wanda", "sparsity": 0.5}
    ],
}


def test_tiny_gpt2_conv1d_through_the_api_rows_are_outputs() -> None:
    model = tiny_gpt2()
    report = prunespec.apply(model, GPT2_SPEC, data=_gpt2_batches())
    assert report.tensors and all(abs(s - 0.5) < 1e-9 for s in report.tensors.values())
    attn = model.transformer.h[0].attn.c_attn  # Conv1D: weight (in, out); each output column is a "row"
    zeros_per_output = (attn.weight_mask == 0).sum(dim=0)
    assert torch.all(zeros_per_output == attn.weight.shape[0] // 2)
    with torch.no_grad():
        model(**_gpt2_batches()[0])


@pytest.mark.parametrize("flags", [[], ["--replay-blocks"], ["--replay-blocks", "--offload-activations"]])
def test_tiny_gpt2_two_four_through_the_cli(tmp_path: Path, flags: list[str]) -> None:
    root = Path(__file__).resolve().parents[1]
    factory = tmp_path / "calib.py"
    factory.write_text(
        "import torch\n\n\ndef batches():\n"
        "    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))\n"
        "    mask = torch.ones(2, 12, dtype=torch.long)\n    mask[1, 7:] = 0\n"
        "    return [{'input_ids': ids, 'attention_mask': mask}]\n"
    )
    spec = tmp_path / "nm.yaml"
    spec.write_text(
        "version: 1\nrules:\n  - select: {types: [Conv1D], names: ['re:transformer\\.h\\..*']}\n"
        "    method: wanda\n    options: {n: 2, m: 4}\n"
    )
    out = tmp_path / "pruned.pt"
    cmd = [sys.executable, "-m", "prunespec", "apply", str(spec), "--model", "examples/tiny_transformers.py:tiny_gpt2"]
    done = subprocess.run(
        [*cmd, "--data", f"{factory}:batches", *flags, "--out", str(out)], cwd=root, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert "50.00%" in done.stdout
    model = tiny_gpt2()
    prunespec.load(model, out)
    mask = model.transformer.h[0].mlp.c_fc.weight_mask  # (in, out): groups of 4 run along the inputs, dim 0
    groups = mask.T.reshape(mask.shape[1], -1, 4)
    assert torch.all(groups.sum(dim=2) == 2)
    held = tiny_gpt2()  # the same masks as an apply here, without replay
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    padded = torch.ones(2, 12, dtype=torch.long)
    padded[1, 7:] = 0
    prunespec.apply(held, str(spec), data=[{"input_ids": ids, "attention_mask": padded}])
    masks = {k: v for k, v in held.state_dict().items() if k.endswith("_mask")}
    assert len(masks) == 8 and all(torch.equal(model.state_dict()[k], v) for k, v in masks.items())


def test_the_report_gives_each_tensors_reconstruction_error_on_the_calibration_data() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    data = [torch.randn(5, 8), torch.randn(4, 8)]
    dense = [model[0].weight.detach().clone(), model[2].weight.detach().clone()]
    spec = {"version": 1, "rules": [{"select": {"types": ["Linear"]}, "method": "wanda", "amount": 0.5}]}
    report = prunespec.apply(model, spec, data=data)
    with torch.no_grad():
        x = torch.cat(data)
        hidden = torch.relu(model[0](x))  # the pruned first layer's outputs: what the second layer saw
        for name, w, inputs in (("0.weight", dense[0], x), ("2.weight", dense[1], hidden)):
            pruned = model.get_submodule(name[0]).weight
            expected = ((inputs @ w.T - inputs @ pruned.T).pow(2).sum() / (inputs @ w.T).pow(2).sum()).item()
            assert report.entries[name].error == pytest.approx(expected, rel=1e-4)
    assert "recon. error" in str(report) and report.to_dict()["tensors"]["0.weight"]["reconstruction_error"] > 0


def _sample(arrivals: list[Arrival], limit: int) -> calibration.Sample:
    sampler = calibration.Sampler(limit)
    for a in arrivals:
        sampler.add(a.batch, a.x, calibration.tokens_kept(a.x, a.attention_mask, "m"))
    return sampler.result()


def test_errors_are_measured_on_a_spread_sample_of_kept_tokens() -> None:
    gen = torch.Generator().manual_seed(0)
    arrivals = []
    for i in range(3):
        x = torch.randn(4, 100, 8, generator=gen)
        mask = torch.ones(4, 100, dtype=torch.long)
        mask[:, 60:] = 0
        x[:, 60:] = 1e6  # padding: never sampled
        arrivals.append(Arrival(i, x, mask))
    sample = _sample(arrivals, 100).tokens
    assert sample.shape == (100, 8) and bool((sample.abs() < 1e5).all())
    firsts = {round(float(v), 5) for v in sample[:, 0]}
    for a in arrivals:  # every batch contributes
        assert firsts & {round(float(v), 5) for v in a.x[:, :60, 0].reshape(-1)}
    few = _sample(arrivals[:1], 10_000).tokens
    assert few.shape == (240, 8)  # all kept tokens when fewer than the limit


@pytest.mark.parametrize("sizes", [[5], [3, 4, 2], [40, 1, 33], [7] * 30, [100, 300, 2]])
@pytest.mark.parametrize("limit", [1, 4, 16])
def test_the_streamed_sample_is_spread_like_an_evenly_spaced_one(sizes: list[int], limit: int) -> None:
    # token t of the whole stream carries its position t: which ones were chosen, and from where
    arrivals, start = [], 0
    for i, n in enumerate(sizes):
        arrivals.append(Arrival(i, torch.arange(start, start + n, dtype=torch.float32).reshape(n, 1), None))
        start += n
    sample = _sample(arrivals, limit)
    chosen = sample.tokens.reshape(-1).long()
    total = sum(sizes)
    assert chosen.numel() == min(limit, total) and bool((chosen.diff() > 0).all())
    if total <= 2 * limit:  # exactly evenly spaced, as if the total had been known
        assert chosen.tolist() == [int(k * total / min(limit, total)) for k in range(min(limit, total))]
    else:  # no gap much wider than an even spacing's
        gaps = torch.cat([chosen[:1], chosen.diff(), torch.tensor([total - int(chosen[-1])])])
        assert int(gaps.max()) <= 4 * -(-total // limit)
    for batch, rows in sample.rows:  # the rows are the chosen tokens' rows in their batch's input
        offset = sum(sizes[:batch])
        assert bool(rows.lt(sizes[batch]).all()) and set((rows + offset).tolist()) <= set(chosen.tolist())
    assert sum(rows.numel() for _, rows in sample.rows) == chosen.numel()


class Doubled(nn.Linear):
    """A Linear whose output is not ``x W^T + b``: its error needs both products at the stop."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


def inputs_of(model: nn.Module, names: list[str], data: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    handles = [
        model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: seen[n].append(a[0].detach().clone()))
        for n in names
    ]
    with torch.no_grad():
        for x in data:
            model(x)
    for h in handles:
        h.remove()
    return {n: torch.cat(v) for n, v in seen.items()}


def expected_error(w: torch.Tensor, pruned: torch.Tensor, x: torch.Tensor) -> float:
    return float((x @ w.T - x @ pruned.T).pow(2).sum() / (x @ w.T).pow(2).sum())


@pytest.mark.parametrize(
    ("first", "sequential"), [(nn.Linear, False), (Doubled, True), (Doubled, False)], ids=["linear", "doubled", "both"]
)
def test_reconstruction_errors_with_and_without_sequential_calibration(first: type, sequential: bool) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(first(8, 6), nn.ReLU(), nn.Linear(6, 3))
    data = [torch.randn(5, 8), torch.randn(4, 8)]
    dense = {"0": model[0].weight.detach().clone(), "2": model[2].weight.detach().clone()}
    spec = {
        "version": 1,
        "rules": [{"select": {"types": ["Linear"]}, "method": "wanda", "amount": 0.5}],
        "calibration": {"sequential": sequential},
    }
    dense_inputs = inputs_of(model, ["0", "2"], data)
    report = prunespec.apply(model, spec, data=data)
    # sequentially each layer is calibrated on the pruned layers before it: the pruned model's inputs
    inputs = inputs_of(model, ["0", "2"], data) if sequential else dense_inputs
    for name in ("0", "2"):
        pruned = model.get_submodule(name).weight.detach()
        assert report.entries[f"{name}.weight"].error == pytest.approx(
            expected_error(dense[name], pruned, inputs[name]), rel=1e-4
        )


def test_reconstruction_errors_of_conv1d_from_its_outputs() -> None:
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(6, 8), nn.ReLU(), Conv1D(3, 6))  # weights (in, out)
    data = [torch.randn(2, 5, 8), torch.randn(3, 5, 8)]
    dense = {"0": model[0].weight.detach().T.clone(), "2": model[2].weight.detach().T.clone()}
    spec = {"version": 1, "rules": [{"select": {"types": ["Conv1D"]}, "method": "wanda", "sparsity": 0.5}]}
    report = prunespec.apply(model, spec, data=data)
    inputs = {k: v.reshape(-1, v.shape[-1]) for k, v in inputs_of(model, ["0", "2"], data).items()}
    for name in ("0", "2"):
        pruned = model.get_submodule(name).weight.detach().T
        error = report.entries[f"{name}.weight"].error
        assert error is not None and error > 0
        assert error == pytest.approx(expected_error(dense[name], pruned, inputs[name]), rel=1e-4)


def test_the_pass_keeps_no_key_value_cache_and_puts_use_cache_back() -> None:
    """A decoder caching keys and values would hold every layer's for every waiting batch."""
    model = tiny_llama()
    assert model.config.use_cache is True
    caches: list[object] = []
    model.model.register_forward_hook(lambda m, a, out: caches.append(out.past_key_values))
    ids = torch.randint(0, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    spec = {"version": 1, "rules": [{"select": {"names": ["re:.*mlp\\..*"]}, "method": "wanda", "sparsity": 0.5}]}
    prunespec.apply(model, spec, data=[{"input_ids": ids}, {"input_ids": ids}])
    assert caches == [None, None]
    assert model.config.use_cache is True
    model(ids)
    assert caches[-1] is not None  # the model's own setting again
