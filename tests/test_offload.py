"""``offload_activations``: while batches wait at a block's entry, their inputs to it are parked on the CPU
(the storage emptied, its bytes copied), and put back before the block runs from them. On a machine
without an accelerator nothing needs moving, so these tests park beside the CPU tensors
(``Parking(everywhere=True)``): the storage is emptied just the same."""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import prunespec
from examples.tiny_transformers import tiny_gpt2, tiny_llama
from prunespec import cli, engine
from prunespec.offload import Parking

LINEARS = {"names": ["re:.*(layers|\\.h)\\.\\d+\\..*(proj|attn|fc)$"]}


def _batches(n: int = 4) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        mask = torch.ones(2, 10, dtype=torch.long)
        if i % 2:
            mask[0, 6:] = 0
        out.append({"input_ids": torch.randint(0, 128, (2, 10), generator=gen), "attention_mask": mask})
    return out


@pytest.fixture
def parks_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The engine's parking, made to park CPU tensors too; the bytes of each storage it parked."""
    parked: list[int] = []

    class Counting(Parking):
        def park(self, tensor: torch.Tensor | None) -> Any:
            got = super().park(tensor)
            if got is not None:
                assert got.storage.nbytes() == 0  # emptied while the batch waits
                parked.append(got.nbytes)
            return got

    monkeypatch.setattr(engine, "Parking", functools.partial(Counting, everywhere=True))
    return parked


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize(
    ("method", "how"), [("wanda", {"sparsity": 0.5}), ("sparsegpt", {"options": {"n": 2, "m": 4}})]
)
@pytest.mark.parametrize("sequential", [True, "blocks"])
def test_parked_inputs_give_the_same_masks_values_and_errors(
    parks_on_the_cpu: list[int], make: Callable[[], nn.Module], method: str, how: dict[str, Any], sequential: bool | str
) -> None:
    spec = {
        "version": 1,
        "calibration": {"sequential": sequential},
        "rules": [{"select": LINEARS, "method": method, **how}],
    }
    results = []
    for offload in (False, True):
        model = make()
        report = prunespec.apply(
            model, spec, data=_batches(), replay_blocks=sequential is True, offload_activations=offload
        )
        results.append((_state(model), {name: entry.error for name, entry in report.entries.items()}))
    (plain, plain_errors), (parked, parked_errors) = results
    assert plain.keys() == parked.keys() and all(torch.equal(plain[k], parked[k]) for k in plain)
    assert plain_errors == parked_errors
    assert len(parks_on_the_cpu) >= 2 * len(_batches())  # every batch, at both blocks' entries


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(6, 16), nn.Linear(16, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(x)))


class Stack(nn.Module):
    """Three blocks; ``entered`` keeps each block input it was given (weakly), to look at while the
    batches wait."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block() for _ in range(3))
        self.entered: list[weakref.ref[torch.Tensor]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x * 1.0  # the block's input is the model's own tensor, not the caller's batch
            self.entered.append(weakref.ref(x))
            x = layer(x)
        return x


@pytest.mark.parametrize("replay", [True, False])
def test_while_the_batches_wait_at_a_block_their_inputs_are_parked(parks_on_the_cpu: list[int], replay: bool) -> None:
    data = [torch.randn(3, 6, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    spec: dict[str, Any] = {
        "version": 1,
        "rules": [{"select": {"types": ["Linear"]}, "method": "wanda", "amount": 0.5}],
    }
    if not replay:
        spec["calibration"] = {"sequential": "blocks"}
    torch.manual_seed(0)
    model = Stack()
    reference = Stack()
    reference.load_state_dict(model.state_dict())
    emptied: list[int] = []

    def progress(done: int, total: int, what: str) -> None:  # at each stop, every batch waits at a block
        alive = [ref() for ref in model.entered]
        emptied.append(sum(1 for x in alive if x is not None and x.untyped_storage().nbytes() == 0))

    prunespec.apply(model, spec, data=data, replay_blocks=replay, offload_activations=True, progress=progress)
    prunespec.apply(reference, spec, data=data, replay_blocks=replay)
    assert emptied and all(n == len(data) for n in emptied)
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in model.state_dict().items())
    assert all(ref() is None for ref in model.entered)  # nothing kept after the pass


def test_a_failure_while_inputs_are_parked_leaves_the_model_and_the_inputs_as_they_were(
    parks_on_the_cpu: list[int],
) -> None:
    good = [torch.randn(3, 6, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    data = [*good, torch.randn(3, 5)]  # the last batch does not fit the first Linear
    spec = {
        "version": 1,
        "calibration": {"sequential": "blocks"},
        "rules": [{"select": {"types": ["Linear"]}, "method": "wanda", "amount": 0.5}],
    }
    torch.manual_seed(0)
    model = Stack()
    before = _state(model)
    copies = [x.clone() for x in data]
    with pytest.raises(prunespec.ApplyError, match="batch 3"):
        prunespec.apply(model, spec, data=data, offload_activations=True)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert all(torch.equal(x, c) for x, c in zip(data, copies, strict=True))


def test_offloading_without_waiting_at_blocks_is_refused_before_anything_changes() -> None:
    model = tiny_llama()
    before = _state(model)
    spec = {"version": 1, "rules": [{"select": LINEARS, "method": "wanda", "sparsity": 0.5}]}
    with pytest.raises(prunespec.PlanError, match=r"replay_blocks=True \(--replay-blocks\) or set calibration"):
        prunespec.apply(model, spec, data=_batches(2), offload_activations=True)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_storage_two_batches_share_or_the_model_owns_stays_in_place() -> None:
    model = nn.Linear(4, 4)
    parking = Parking(everywhere=True)
    parking.watch(model)
    assert parking.park(model.weight) is None and model.weight.untyped_storage().nbytes() > 0
    shared = torch.arange(8.0)
    mine, theirs = shared[:4], shared[4:]  # two batches' views of one storage
    first = parking.park(mine)
    assert first is not None and shared.untyped_storage().nbytes() == 0
    assert parking.park(theirs) is None  # the second batch's: put back, for good
    assert torch.equal(shared, torch.arange(8.0))
    first.park()  # its batch's block is done: it would park again, but stays
    assert torch.equal(shared, torch.arange(8.0))
    alone = torch.ones(3)
    parked = parking.park(alone)
    assert parked is not None and alone.untyped_storage().nbytes() == 0
    parking.close()
    assert torch.equal(alone, torch.ones(3))


def test_on_its_own_device_nothing_is_parked() -> None:
    parking = Parking()  # the CPU: a tensor there stays
    assert parking.park(torch.ones(3)) is None


def test_the_cli_refuses_offloading_without_blocks_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # where examples/ is
    data = tmp_path / "calib.py"
    data.write_text("import torch\n\n\ndef batches():\n    return [torch.zeros(1, 8, dtype=torch.long)]\n")
    spec = tmp_path / "wanda.yaml"
    spec.write_text(
        "version: 1\nrules: [{select: {types: [Linear], exclude: [lm_head]}, method: wanda, amount: 0.5}]\n"
    )
    model = "examples/tiny_transformers.py:tiny_llama"
    code = cli.main(["apply", str(spec), "--model", model, "--data", f"{data}:batches", "--offload-activations"])
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err
    assert "calibration.sequential: offload_activations" in err and "--replay-blocks" in err
