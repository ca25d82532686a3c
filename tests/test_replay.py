"""Calibrating with ``replay_blocks``: each batch waits at a block's entry holding its arguments, and the
block runs again from them, one batch at a time, for each stop inside it; and with ``calibration.sequential:
blocks``, every module of a block calibrated in one such run of the block as it was."""

from __future__ import annotations

import gc
import weakref
from collections import Counter
from collections.abc import Callable
from typing import Any

import greenlet
import pytest
import torch
from torch import nn

import prunespec
from examples.tiny_transformers import tiny_gpt2, tiny_llama
from prunespec import calibration

LINEARS = {"names": ["re:.*(layers|\\.h)\\.\\d+\\..*(proj|attn|fc)$"]}  # a Llama's or a GPT-2's blocks


def _batches(n: int = 5, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        mask = torch.ones(2, 12, dtype=torch.long)
        if i % 2:
            mask[1, 7:] = 0  # padded on the right
        out.append({"input_ids": torch.randint(0, 128, (2, 12), generator=gen), "attention_mask": mask})
    return out


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _untouched(model: nn.Module, before: dict[str, torch.Tensor]) -> bool:
    after = model.state_dict()
    hooks = any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    swapped = any({"forward", "weight"} & set(m.__dict__) for m in model.modules())
    return (
        after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before) and not hooks | swapped
    )


def _suspended() -> int:
    here = greenlet.getcurrent()
    return sum(1 for o in gc.get_objects() if issubclass(type(o), greenlet.greenlet) and o and o is not here)


def _rule(method: str, how: dict[str, Any]) -> dict[str, Any]:
    return {"version": 1, "rules": [{"select": LINEARS, "method": method, **how}]}


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize(
    ("method", "how"), [("wanda", {"sparsity": 0.5}), ("sparsegpt", {"options": {"n": 2, "m": 4}})]
)
def test_replayed_blocks_give_the_same_masks_values_and_errors(
    make: Callable[[], nn.Module], method: str, how: dict[str, Any]
) -> None:
    results = []
    for replay in (False, True):
        model = make()
        report = prunespec.apply(model, _rule(method, how), data=_batches(), replay_blocks=replay)
        results.append((_state(model), {name: entry.error for name, entry in report.entries.items()}))
    (held, held_errors), (replayed, replayed_errors) = results
    assert held.keys() == replayed.keys() and any(k.endswith("weight_mask") for k in held)
    assert all(torch.equal(held[k], replayed[k]) for k in held)
    assert held_errors == replayed_errors and all(e is not None and e > 0 for e in held_errors.values())


def test_a_llama_block_runs_again_once_per_distinct_input_inside_it() -> None:
    # q/k/v share one input, gate/up another, o_proj and down_proj one each: 4 replays per batch
    for replay, runs in ((False, 1), (True, 1 + 4)):
        model = tiny_llama()
        calls: Counter[int] = Counter()
        for i, layer in enumerate(model.model.layers):
            layer.register_forward_pre_hook(lambda *_, i=i, calls=calls: calls.update([i]))
        prunespec.apply(model, _rule("sparsegpt", {"sparsity": 0.5}), data=_batches(3), replay_blocks=replay)
        assert calls == {0: 3 * runs, 1: 3 * runs}


class Wide(nn.Module):
    """A block whose inner activation is recorded, to count how many are alive while batches wait."""

    def __init__(self, alive: list[weakref.ref[torch.Tensor]]) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(6, 32), nn.Linear(32, 6)
        self.alive = alive

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.up(x))
        self.alive.append(weakref.ref(h))
        return x + self.down(h)


class Stack(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.alive: list[weakref.ref[torch.Tensor]] = []
        self.layers = nn.ModuleList(Wide(self.alive) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def test_waiting_batches_hold_no_activation_from_inside_a_replayed_block() -> None:
    data = [torch.randn(3, 6, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    spec = {"version": 1, "rules": [{"select": {"types": ["Linear"]}, "method": "wanda", "amount": 0.5}]}
    most, masks = {}, {}
    for replay in (False, True):
        torch.manual_seed(0)
        model = Stack()
        seen: list[int] = []

        def progress(done: int, total: int, what: str, model: Stack = model, seen: list[int] = seen) -> None:
            seen.append(sum(ref() is not None for ref in model.alive))  # at each stop, as its masks are done

        prunespec.apply(model, spec, data=data, replay_blocks=replay, progress=progress)
        most[replay] = max(seen)
        masks[replay] = {k: v for k, v in model.state_dict().items() if k.endswith("_mask")}
    assert most == {False: len(data), True: 0}  # holding: every batch's, at the stop of `down`
    assert masks[False].keys() == masks[True].keys() and all(
        torch.equal(masks[False][k], masks[True][k]) for k in masks[False]
    )


class Faulty(nn.Module):
    """A block that raises ``error`` on a batch whose first value is 99, or that changes its input in
    place, or that the model hands a cache."""

    def __init__(self, error: BaseException | None = None, in_place: bool = False) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(4, 8), nn.Linear(8, 4)
        self.error, self.in_place = error, in_place

    def forward(self, x: torch.Tensor, past_key_values: object = None) -> torch.Tensor:
        if self.error is not None and float(x[0, 0]) == 99.0:
            raise self.error
        h = self.up(x)
        if self.in_place:
            x.mul_(1.0)
        return x + self.down(torch.relu(h))


class Faulties(nn.Module):
    def __init__(self, cache: object = None, **kwargs: Any) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Faulty(**kwargs) for _ in range(2))
        self.cache = cache

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, past_key_values=self.cache)
        return x


def _faulty_data() -> list[torch.Tensor]:
    data = [torch.randn(2, 4, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    data[2][0, 0] = 99.0
    return data


@pytest.mark.parametrize(
    ("model", "error", "match"),
    [
        (
            lambda: Faulties(error=RuntimeError("boom")),
            prunespec.ApplyError,
            "batch 2: the forward pass failed: RuntimeError: boom",
        ),
        (lambda: Faulties(error=KeyboardInterrupt()), KeyboardInterrupt, None),
        (lambda: Faulties(in_place=True), prunespec.ApplyError, "layers.0 changed its own input in place"),
        (lambda: Faulties(cache=object()), prunespec.ApplyError, r"key/value cache \(past_key_values\) to layers.0"),
    ],
)
@pytest.mark.parametrize("sequential", [True, "blocks"])  # replayed for each stop, or swept once
def test_a_replay_that_fails_is_named_and_nothing_changes(
    model: Callable[[], nn.Module], error: type[BaseException], match: str | None, sequential: bool | str
) -> None:
    torch.manual_seed(0)
    built = model()
    before, suspended = _state(built), _suspended()
    spec = {
        "version": 1,
        "calibration": {"sequential": sequential},
        "rules": [{"select": {"types": ["Linear"]}, "method": "sparsegpt", "amount": 0.5}],
    }
    with pytest.raises(error, match=match) as caught:
        prunespec.apply(built, spec, data=_faulty_data(), replay_blocks=True)
    if match is not None and "layers.0" in match:  # what to do instead, for the setting in use
        assert ("sequential: true" in str(caught.value)) == (sequential == "blocks")
    assert _untouched(built, before)
    assert _suspended() == suspended


class Trap(nn.Module):
    """A block that raises ``error`` where ``up`` gave all zeros: what a replay past its stop at ``up``
    sees (the modules still to be pruned compute zeros then), never a real forward here."""

    def __init__(self, error: BaseException) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(4, 8), nn.Linear(8, 4)
        self.error = error

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        if not bool(h.any()):
            raise self.error
        return x + self.down(torch.relu(h))


def test_past_its_stop_a_replay_that_fails_only_ends_but_an_interrupt_propagates() -> None:
    data = [torch.randn(2, 4, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    spec = {"version": 1, "rules": [{"select": {"types": ["Linear"]}, "method": "wanda", "amount": 0.5}]}
    torch.manual_seed(0)
    model = nn.Sequential(Trap(RuntimeError("zeros")), Trap(RuntimeError("zeros")))
    held = nn.Sequential(Trap(RuntimeError("zeros")), Trap(RuntimeError("zeros")))
    held.load_state_dict(model.state_dict())
    prunespec.apply(model, {**spec, "calibration": {"blocks": "*"}}, data=data, replay_blocks=True)
    prunespec.apply(held, spec, data=data)
    masks = {k: v for k, v in held.state_dict().items() if k.endswith("_mask")}
    assert len(masks) == 4 and all(torch.equal(model.state_dict()[k], v) for k, v in masks.items())
    torch.manual_seed(0)
    trapped = nn.Sequential(Trap(KeyboardInterrupt()), Trap(KeyboardInterrupt()))
    before, suspended = _state(trapped), _suspended()
    with pytest.raises(KeyboardInterrupt):
        prunespec.apply(trapped, {**spec, "calibration": {"blocks": "*"}}, data=data, replay_blocks=True)
    assert _untouched(trapped, before) and _suspended() == suspended


def test_without_blocks_replay_changes_nothing() -> None:
    data = [torch.randn(3, 6, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    spec = {"version": 1, "rules": [{"select": {"types": ["Linear"]}, "method": "sparsegpt", "amount": 0.5}]}
    states = []
    for replay in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
        prunespec.apply(model, spec, data=data, replay_blocks=replay)
        states.append(_state(model))
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_a_replayed_stop_no_later_module_shares_lets_sparsegpt_factor_its_hessian_in_place(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from prunespec.methods import sparsegpt

    real = sparsegpt._factor
    in_place: Counter[bool] = Counter()

    def counted(*args: Any, **kwargs: Any) -> torch.Tensor:
        in_place.update([bool(kwargs.get("in_place", False))])
        return real(*args, **kwargs)

    monkeypatch.setattr(sparsegpt, "_factor", counted)
    states = []
    for replay in (False, True):
        in_place.clear()
        model = tiny_llama()
        prunespec.apply(model, _rule("sparsegpt", {"sparsity": 0.5}), data=_batches(3), replay_blocks=replay)
        states.append(_state(model))
        # holding, a stop cannot know whether the next shares its input; replayed, o_proj and down_proj
        # (2 of each layer's 4 distinct inputs) are known to be the last to read theirs
        assert in_place == ({False: 4, True: 4} if replay else {False: 8})
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


# --- calibration.sequential: blocks ---------------------------------------------------------------------


def _spec(method: str, how: dict[str, Any], names: Any = LINEARS, **settings: Any) -> dict[str, Any]:
    return {"version": 1, "calibration": settings, "rules": [{"select": names, "method": method, **how}]}


def _layers(model: nn.Module) -> nn.ModuleList:
    return model.model.layers if hasattr(model, "model") else model.transformer.h  # type: ignore[no-any-return]


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize(
    ("method", "how"), [("wanda", {"sparsity": 0.5}), ("sparsegpt", {"options": {"n": 2, "m": 4}})]
)
def test_each_block_is_calibrated_on_the_pruned_blocks_before_it_and_itself_as_it_was(
    make: Callable[[], nn.Module], method: str, how: dict[str, Any]
) -> None:
    model = make()
    report = prunespec.apply(model, _spec(method, how, sequential="blocks"), data=_batches())
    got = _state(model)
    # independently: block i pruned in one pass over the unpruned block i, blocks before it replaced by
    # their pruned values (as plain weights)
    prefixes = [name for name, _ in model.named_modules() if name.count(".") == 2 and name.split(".")[-1].isdigit()]
    assert len(prefixes) == 2
    for i, prefix in enumerate(prefixes):
        ref = make()
        with torch.no_grad():
            for name, param in ref.named_parameters():
                if any(name.startswith(p + ".") for p in prefixes[:i]) and name + "_mask" in got:
                    param.copy_(got[name + "_orig"] * got[name + "_mask"])
        names = [n for n in report.entries if n.startswith(prefix + ".")]
        modules = sorted({n.rsplit(".", 1)[0] for n in names})
        prunespec.apply(ref, _spec(method, how, {"names": modules}, sequential=False), data=_batches())
        want = _state(ref)
        for name in names:
            for part in ("_orig", "_mask"):
                assert torch.equal(got[name + part], want[name + part]), name + part
    # block 0 sees what the unpruned model gives it; block 1 does not
    plain = make()
    prunespec.apply(plain, _spec(method, how, sequential=False), data=_batches())
    first = [k for k in got if k.startswith(prefixes[0] + ".") and k.endswith("_mask")]
    second = [k for k in got if k.startswith(prefixes[1] + ".") and k.endswith("_mask")]
    assert all(torch.equal(got[k], plain.state_dict()[k]) for k in first)
    assert not all(torch.equal(got[k], plain.state_dict()[k]) for k in second)


@pytest.mark.parametrize("sequential", [True, "blocks", False])
def test_a_block_runs_twice_per_batch_and_each_distinct_input_is_summed_once(
    sequential: bool | str, monkeypatch: pytest.MonkeyPatch
) -> None:
    grams: Counter[int] = Counter()
    real = calibration._COMPUTE["input_gram"]

    def counted(x: torch.Tensor, *args: Any) -> torch.Tensor:
        grams.update([x.shape[-1]])
        return real(x, *args)

    monkeypatch.setitem(calibration._COMPUTE, "input_gram", counted)
    model = tiny_llama()
    calls: Counter[int] = Counter()
    for i, layer in enumerate(_layers(model)):
        layer.register_forward_pre_hook(lambda *_, i=i, calls=calls: calls.update([i]))
    report = prunespec.apply(model, _spec("sparsegpt", {"sparsity": 0.5}, sequential=sequential), data=_batches(3))
    runs = 2 if sequential == "blocks" else 1
    assert calls == {0: 3 * runs, 1: 3 * runs}
    # per layer: q/k/v share the 64-wide input, gate/up another 64-wide, o_proj 64 wide, down_proj 128
    assert grams == {64: 3 * 2 * 3, 128: 3 * 2}
    assert report.calibration is not None and report.calibration.sequential == sequential


class Fork(nn.Module):
    """``b`` is given ``a``'s very input for batches of two rows, and twice it otherwise."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 6), nn.Linear(4, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + (self.a(x) * self.b(x if x.shape[0] == 2 else 2 * x))[..., :4]


class Forks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Fork() for _ in range(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


@pytest.mark.parametrize("rows", [[2, 2, 3], [3, 2, 2], [2, 3, 2]])
def test_modules_share_statistics_only_when_every_batch_gives_them_the_same_input(rows: list[int]) -> None:
    data = [torch.randn(n, 4, generator=torch.Generator().manual_seed(i)) for i, n in enumerate(rows)]
    states = []
    for sequential in ("blocks", False):  # one block: the same statistics either way
        torch.manual_seed(0)
        model = Forks()
        spec = _spec("wanda", {"amount": 0.5}, {"types": ["Linear"]}, sequential=sequential, blocks="layers.*")
        prunespec.apply(model, spec, data=data)
        states.append(_state(model))
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_reconstruction_errors_are_those_of_the_block_as_it_was() -> None:
    errors = []
    for sequential in ("blocks", False):
        report = prunespec.apply(
            tiny_llama(), _spec("wanda", {"sparsity": 0.5}, sequential=sequential), data=_batches()
        )
        errors.append({n: e.error for n, e in report.entries.items() if ".layers.0." in n})
    assert errors[0].keys() == errors[1].keys() and len(errors[0]) == 7
    for name, error in errors[0].items():
        assert error is not None and error > 0 and error == pytest.approx(errors[1][name], rel=1e-4)


def test_without_repeated_blocks_it_is_a_plan_error_at_the_setting() -> None:
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4))
    rule = "  - select: {types: [Linear]}\n    method: wanda\n    amount: 0.5\n"
    text = "version: 1\ncalibration:\n  sequential: blocks\nrules:\n" + rule
    with pytest.raises(prunespec.PlanError) as caught:
        prunespec.plan(model, prunespec.loads_spec(text))
    message = str(caught.value)
    assert "calibration.sequential" in message and ":3:" in message and "calibration.blocks" in message


def test_a_typo_in_the_setting_is_a_spec_error_naming_the_choices() -> None:
    rule = "  - select: {types: [Linear]}\n    method: wanda\n    amount: 0.5\n"
    text = "version: 1\ncalibration:\n  sequential: block\nrules:\n" + rule
    with pytest.raises(prunespec.SpecError) as caught:
        prunespec.loads_spec(text)
    message = str(caught.value)
    assert ":3:" in message and "blocks" in message
