"""Gradual pruning with ``prunespec.scheduler.Scheduler``: exact counts along each curve (local, global,
structured), monotone masks, nothing done between update points, resume from a checkpoint, optimizers,
finalize, located spec errors, ``apply`` on a scheduled spec, and the example."""

from __future__ import annotations

import copy
import io
import logging
import math
import re
from collections.abc import Callable, Iterator
from contextlib import redirect_stdout
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import EXAMPLES, SPECS
from torch import nn
from torch.nn.utils import prune

import prunespec
import prunespec.api
import prunespec.engine
from prunespec.checkpoint import load_state_dict
from prunespec.layout import DetachAfterForward
from prunespec.scheduler import Scheduler, Timeline, ordered_parameters
from prunespec.spec import Schedule

Registry = prunespec.MethodRegistry


# --- helpers -------------------------------------------------------------------------------------


def mlp() -> nn.Sequential:
    """Sizes that make rounding matter: 91, 65 and 15 entries; 13 and 5 rows."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(7, 13), nn.ReLU(), nn.Linear(13, 5), nn.ReLU(), nn.Linear(5, 3))


LINEARS = ["0", "2", "4"]


def spec_of(rule: dict[str, Any], **top: Any) -> prunespec.Spec:
    return prunespec.load_spec({"version": 1, "rules": [rule], **top})


def scheduled(schedule: dict[str, Any], sparsity: float, **rule: Any) -> prunespec.Spec:
    base = {"select": {"types": ["Linear"]}, "method": "l1_unstructured", "sparsity": sparsity}
    return spec_of({**base, **rule, "schedule": schedule})


def curve(kind: str, p: float, start: float, end: float, initial: float, final: float) -> float:
    """The documented curves, written out independently of the scheduler."""
    if kind == "constant":
        return final
    if kind == "linear":
        return final + (initial - final) * (1 - (p - start) / (end - start))
    return final + (initial - final) * (1 - (p - start) / (end - start)) ** 3


def mask(model: nn.Module, name: str, param: str = "weight") -> torch.Tensor:
    buffer = model.get_submodule(name)._buffers[param + "_mask"]
    assert buffer is not None
    return buffer.detach().clone()


def tensor(model: nn.Module, name: str, attr: str = "weight") -> torch.Tensor:
    """``model.<name>.<attr>``: the effective weight (``weight``) or the trained one (``weight_orig``)."""
    value = getattr(model.get_submodule(name), attr)
    assert isinstance(value, torch.Tensor)
    return value


def masks(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: mask(model, name) for name in LINEARS}


def zeros(t: torch.Tensor) -> int:
    return int((t == 0).sum())


def assert_grown(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> None:
    """Nothing pruned before came back."""
    for name, old in before.items():
        assert bool((after[name][old == 0] == 0).all()), f"{name}: a pruned entry came back"


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """These models are tiny: one intra-op thread is fastest, and spares the tests from OpenMP threads
    spinning against another busy process (40x slower on a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts of engine runs and plans made (``api.plan``, ``api.apply`` and the Scheduler all go through
    make_plan)."""
    counts = {"execute": 0, "plan": 0}
    execute, make_plan = prunespec.engine.execute, prunespec.api.make_plan

    def counted_execute(*args: Any, **kwargs: Any) -> list[str]:
        counts["execute"] += 1
        return execute(*args, **kwargs)

    def counted_plan(*args: Any, **kwargs: Any) -> prunespec.Plan:
        counts["plan"] += 1
        return make_plan(*args, **kwargs)

    monkeypatch.setattr(prunespec.engine, "execute", counted_execute)
    monkeypatch.setattr(prunespec.api, "make_plan", counted_plan)
    monkeypatch.setattr(prunespec.scheduler, "make_plan", counted_plan)  # the Scheduler plans its updates itself
    return counts


# --- the curves, with exact counts -----------------------------------------------------------------


@pytest.mark.parametrize("kind", ["cubic", "linear", "constant"])
def test_local_rule_follows_the_curve_with_exact_counts(kind: str, methods: Registry) -> None:
    start, end, every, initial, final = 2, 12, 2, 0.1, 0.85
    model = mlp()
    schedule = {"start": start, "end": end, "every": every, "initial": initial, "curve": kind}
    scheduler = Scheduler(model, scheduled(schedule, final), methods=methods)
    points = [2, 4, 6, 8, 10, 12] if kind != "constant" else [2]
    previous: dict[str, torch.Tensor] | None = None
    for t in range(16):
        report = scheduler.step(t)
        assert (report is not None) == (t in points), t
        if t < start:
            assert all(name + ".weight_mask" not in dict(model.named_buffers()) for name in LINEARS)
            continue
        p = max(q for q in points if q <= t) if kind != "constant" else start
        target = curve(kind, p, start, end, initial, final)
        current = masks(model)
        for name, m in current.items():
            assert zeros(m) == round(target * m.numel()), (t, name)
        if previous is not None:
            assert_grown(previous, current)
        previous = current
    assert [(t, i, target) for t, i, target, _ in scheduler.history] == [
        (p, 0, curve(kind, p, start, end, initial, final)) for p in points
    ]
    assert [zeros(m) for m in masks(model).values()] == [round(0.85 * 91), round(0.85 * 65), round(0.85 * 15)]
    assert scheduler.done


def test_global_rule_reaches_each_target_for_the_group(methods: Registry) -> None:
    model = mlp()
    spec = scheduled({"end": 8, "every": 2}, 0.8, scope="global")
    scheduler = Scheduler(model, spec, methods=methods)
    total = sum(tensor(model, name).numel() for name in LINEARS)
    previous: dict[str, torch.Tensor] | None = None
    shares = set()
    for t in range(0, 9, 2):
        scheduler.step(t)
        current = masks(model)
        target = curve("cubic", t, 0, 8, 0.0, 0.8)
        assert sum(zeros(m) for m in current.values()) == round(target * total), t
        if previous is not None:
            assert_grown(previous, current)
        previous = current
        shares.add(tuple(round(zeros(m) / m.numel(), 3) for m in current.values()))
    assert scheduler.history[-1][2:] == (0.8, round(0.8 * total) / total)
    # one budget for the group: the tensors do not all end at 80%
    assert len({zeros(m) / m.numel() for m in masks(model).values()}) > 1


def test_a_global_floor_grows_with_the_target(methods: Registry) -> None:
    model = mlp()
    spec = scheduled({"end": 4}, 0.8, scope="global", min_sparsity=0.6)
    scheduler = Scheduler(model, spec, methods=methods)  # at t=0 the target is 0: a fixed 60% floor would fail
    for t in range(5):
        scheduler.step(t)
        target = curve("cubic", t, 0, 4, 0.0, 0.8)
        current = masks(model)
        assert sum(zeros(m) for m in current.values()) == round(target * 171), t
        assert all(zeros(m) >= math.ceil(0.6 * target / 0.8 * m.numel()) for m in current.values()), t
    assert all(zeros(m) >= math.ceil(0.6 * m.numel()) for m in masks(model).values())


def test_structured_rule_prunes_whole_channels_along_the_curve(methods: Registry) -> None:
    model = mlp()
    spec = scheduled(
        {"start": 1, "end": 5, "curve": "linear"},
        0.6,
        method="ln_structured",
        options={"n": 1, "dim": 0},
        select={"types": ["Linear"], "exclude": ["4"]},
    )
    scheduler = Scheduler(model, spec, methods=methods)
    for t in range(7):
        scheduler.step(t)
        if t < 1:
            continue
        target = curve("linear", min(t, 5), 1, 5, 0.0, 0.6)
        for name in ["0", "2"]:
            m = mask(model, name)
            rows = (m == 0).all(dim=1)
            assert int(rows.sum()) == round(target * m.shape[0]), (t, name)
            assert zeros(m) == int(rows.sum()) * m.shape[1]  # whole rows only
    assert [int((mask(model, n) == 0).all(dim=1).sum()) for n in ["0", "2"]] == [round(0.6 * 13), round(0.6 * 5)]


def test_update_points_with_a_remainder_and_float_steps() -> None:
    timeline = Timeline(Schedule(start=0, end=10, every=4), 0.5)
    assert timeline.last == 3
    assert [timeline.time(k) for k in range(4)] == [0, 4, 8, 10]
    assert [timeline.point(t) for t in (-1, 0, 3.9, 4, 9.99, 10, 50)] == [-1, 0, 0, 1, 2, 3, 3]
    # epochs in tenths: 0.1 * 3 is 0.30000000000000004, 0.3 / 0.1 is 2.9999999999999996
    tenths = Timeline(Schedule(start=0, end=0.3, every=0.1, curve="linear"), 0.6)
    assert tenths.last == 3
    assert [tenths.point(0.1 * k) for k in range(4)] == [0, 1, 2, 3]
    assert tenths.target(3) == 0.6
    one_shot = Timeline(Schedule(start=5, end=5, curve="constant"), 0.4)
    assert (one_shot.last, one_shot.point(4.9), one_shot.point(5), one_shot.target(0)) == (0, -1, 0, 0.4)


def test_skipped_steps_prune_to_the_latest_point(methods: Registry) -> None:
    model = mlp()
    scheduler = Scheduler(model, scheduled({"end": 10, "every": 4}, 0.5), methods=methods)
    assert scheduler.sparsity_at(-1) == [None]
    assert scheduler.sparsity_at(6) == [curve("cubic", 4, 0, 10, 0.0, 0.5)]
    for t in (0, 6, 7, 13):
        scheduler.step(t)
    assert [(t, target) for t, _, target, _ in scheduler.history] == [
        (0, 0.0),
        (6, curve("cubic", 4, 0, 10, 0.0, 0.5)),
        (13, 0.5),
    ]
    assert zeros(mask(model, "0")) == round(0.5 * 91)


# --- monotone, cheap, composed with rules that have no schedule ------------------------------------


def test_unscheduled_rules_run_once_at_the_first_step_and_masks_only_grow(
    methods: Registry, calls: dict[str, int]
) -> None:
    model = mlp()
    spec = prunespec.load_spec(
        {
            "version": 1,
            "rules": [
                {"select": {"names": ["0"]}, "method": "random_unstructured", "amount": 0.3},  # runs once
                {
                    "select": {"types": ["Linear"]},
                    "method": "l1_unstructured",
                    "sparsity": 0.9,
                    "schedule": {"end": 20},
                },
                {"select": {"types": ["Linear"], "params": ["bias"]}, "method": "l1_unstructured", "amount": 2},
            ],
            "seed": 3,
        }
    )
    scheduler = Scheduler(model, spec, methods=methods)
    assert calls == {"execute": 0, "plan": 1}  # the check at construction; the model is untouched
    assert not any(name.endswith("_mask") for name, _ in model.named_buffers())
    scheduler.step(0)
    assert sorted(i for _, i, _, _ in scheduler.history) == [0, 1, 2]
    assert [zeros(mask(model, n, "bias")) for n in LINEARS] == [2, 2, 2]
    previous = masks(model)
    assert zeros(previous["0"]) == round(0.3 * 91)  # the random rule (s_0 = 0 adds nothing)
    for t in range(1, 21):
        scheduler.step(t)
        current = masks(model)
        assert_grown(previous, current)
        previous = current
    assert calls["execute"] == 21
    assert [i for _, i, _, _ in scheduler.history[3:]] == [1] * 20  # the unscheduled ones never again
    assert [zeros(mask(model, n, "bias")) for n in LINEARS] == [2, 2, 2]
    assert [zeros(m) for m in previous.values()] == [round(0.9 * 91), round(0.9 * 65), round(0.9 * 15)]


def test_nothing_happens_between_update_points(methods: Registry, calls: dict[str, int]) -> None:
    model = mlp()
    scheduler = Scheduler(model, scheduled({"start": 10, "end": 50, "every": 10}, 0.7), methods=methods)
    assert calls["plan"] == 1
    runs = []
    for t in range(61):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        hooks_before = [list(model.get_submodule(n)._forward_pre_hooks.values()) for n in LINEARS]
        scheduler.step(t)
        runs.append(calls["execute"])
        if t % 10 or not 10 <= t <= 50:
            after = model.state_dict()
            assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before), t
            assert hooks_before == [list(model.get_submodule(n)._forward_pre_hooks.values()) for n in LINEARS]
    # one engine run (and one plan) at each of 10, 20, 30, 40, 50, and none at any other step
    assert [t for t in range(61) if runs[t] != (runs[t - 1] if t else 0)] == [10, 20, 30, 40, 50]
    assert calls == {"execute": 5, "plan": 6}
    assert scheduler.updates == 5 and scheduler.done and scheduler.last_step == 60


def test_progress_and_logging(methods: Registry, caplog: pytest.LogCaptureFixture) -> None:
    seen: list[tuple[int, int, str]] = []
    scheduler = Scheduler(
        mlp(),
        scheduled({"end": 2, "unit": "epoch"}, 0.5),
        methods=methods,
        progress=lambda done, total, what: seen.append((done, total, what)),
    )
    with caplog.at_level(logging.INFO, logger="prunespec"):
        for epoch in range(3):
            scheduler.step(epoch)
    assert [what.split(":")[0] for _, _, what in seen] == [f"epoch {e}" for e in range(3) for _ in LINEARS]
    assert [(done, total) for done, total, _ in seen[:3]] == [(1, 3), (2, 3), (3, 3)]
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    achieved = sum(round(0.5 * n) for n in (91, 65, 15)) / 171  # 46 + 32 + 8: half to even
    assert infos[-1] == f"epoch 2: rules[0] now {achieved:.2%} pruned (target 50.00%)"
    assert len(infos) == 3


# --- resume --------------------------------------------------------------------------------------

RESUME_SPEC: dict[str, Any] = {
    "version": 1,
    "schedule": {"start": 2, "end": 14, "every": 3},
    "rules": [
        {"select": {"names": ["0", "2"]}, "method": "l1_unstructured", "sparsity": 0.75},
        {"select": {"types": ["Linear"]}, "scope": "global", "method": "l1_unstructured", "sparsity": 0.8},
    ],
}


def batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [(torch.randn(16, 7, generator=generator), torch.randn(16, 3, generator=generator)) for _ in range(n)]


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Scheduler,
    steps: range,
    data: list[tuple[torch.Tensor, torch.Tensor]],
) -> None:
    for step in steps:
        x, y = data[step]
        loss = nn.functional.mse_loss(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step(step)


@pytest.mark.parametrize("checkpoint", ["prunespec.save", "torch-state-dict"])
def test_resume_from_a_checkpoint_continues_the_same_curve(checkpoint: str, tmp_path: Path, methods: Registry) -> None:
    data = batches(20)
    spec = prunespec.load_spec(RESUME_SPEC)

    model = mlp()
    optimizer = torch.optim.Adam(ordered_parameters(model), lr=1e-2)
    scheduler = Scheduler(model, spec, methods=methods)
    train(model, optimizer, scheduler, range(20), data)

    first = mlp()
    first_optimizer = torch.optim.Adam(ordered_parameters(first), lr=1e-2)
    first_scheduler = Scheduler(first, spec, methods=methods)
    train(first, first_optimizer, first_scheduler, range(9), data)  # stops between update points 8 and 11
    if checkpoint == "prunespec.save":
        prunespec.save(first, tmp_path / "model.pt", spec, methods=methods)
    else:
        torch.save(first.state_dict(), tmp_path / "model.pt")  # weight_orig / weight_mask keys
    torch.save(
        {"optimizer": first_optimizer.state_dict(), "scheduler": first_scheduler.state_dict()}, tmp_path / "train.pt"
    )

    resumed = mlp()  # fresh everything, as in a new process
    if checkpoint == "prunespec.save":
        prunespec.load(resumed, tmp_path / "model.pt", methods=methods)
    else:  # a dense model takes a pruned state_dict through prunespec's loader (masks and all)
        load_state_dict(resumed, torch.load(tmp_path / "model.pt", weights_only=True))
    state = torch.load(tmp_path / "train.pt", weights_only=True)
    resumed_optimizer = torch.optim.Adam(ordered_parameters(resumed), lr=1e-2)
    resumed_optimizer.load_state_dict(state["optimizer"])  # the same order: `weight_orig` sorts as `weight`
    resumed_scheduler = Scheduler(resumed, spec, methods=methods)
    resumed_scheduler.load_state_dict(state["scheduler"])
    assert resumed_scheduler.history == first_scheduler.history
    train(resumed, resumed_optimizer, resumed_scheduler, range(9, 20), data)

    assert resumed_scheduler.history == scheduler.history
    assert [t for t, i, _, _ in scheduler.history if i == 0] == [2, 5, 8, 11, 14]
    assert resumed_scheduler.updates == scheduler.updates == 5
    expected, got = model.state_dict(), resumed.state_dict()
    assert expected.keys() == got.keys()
    for key in expected:
        assert torch.equal(expected[key], got[key]), key


def test_ordered_parameters_keep_their_order_through_pruning(methods: Registry) -> None:
    model = mlp()
    dense, plain = [id(p) for p in ordered_parameters(model)], [id(p) for p in model.parameters()]
    prunespec.apply(model, scheduled({"end": 1}, 0.5), methods=methods)
    assert [id(p) for p in ordered_parameters(model)] == dense
    assert [id(p) for p in model.parameters()] != plain  # torch moved each weight_orig after its bias


def test_scheduler_state_is_plain_data(tmp_path: Path, methods: Registry) -> None:
    scheduler = Scheduler(mlp(), prunespec.load_spec(RESUME_SPEC), methods=methods)
    for t in range(6):
        scheduler.step(t)
    torch.save(scheduler.state_dict(), tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    again = Scheduler(mlp(), prunespec.load_spec(RESUME_SPEC), methods=methods)
    again.load_state_dict(state)
    assert again.state_dict() == scheduler.state_dict()
    assert (again.last_step, again.updates, len(again.history)) == (5, 2, 4)

    other = copy.deepcopy(RESUME_SPEC)
    other["schedule"]["end"] = 20
    with pytest.raises(
        ValueError, match=r"saved for another spec: the `sparsity` or `schedule` of rules\[0\], rules\[1\]"
    ):
        Scheduler(mlp(), prunespec.load_spec(other), methods=methods).load_state_dict(state)
    fewer = {**RESUME_SPEC, "rules": RESUME_SPEC["rules"][:1]}
    with pytest.raises(ValueError, match=r"saved for another spec \(2 rules, not 1\)"):
        Scheduler(mlp(), prunespec.load_spec(fewer), methods=methods).load_state_dict(state)
    with pytest.raises(ValueError, match="not a prunespec scheduler state"):
        again.load_state_dict({"format": 99})


def test_a_failed_update_leaves_the_scheduler_where_it_was(methods: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    model = mlp()
    scheduler = Scheduler(model, scheduled({"end": 4}, 0.5), methods=methods)
    scheduler.step(0)
    state = scheduler.state_dict()

    def broken(*args: Any, **kwargs: Any) -> list[str]:
        raise prunespec.ApplyError("rules[0]", "0.weight", "boom")

    monkeypatch.setattr(prunespec.engine, "execute", broken)
    with pytest.raises(prunespec.ApplyError):
        scheduler.step(1)
    assert {k: v for k, v in scheduler.state_dict().items() if k != "last_step"} == {
        k: v for k, v in state.items() if k != "last_step"
    }
    monkeypatch.undo()
    scheduler.step(1)  # the update is still due
    assert [t for t, _, _, _ in scheduler.history] == [0, 1]


# --- optimizers, finalize ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9),
        lambda params: torch.optim.Adam(params, lr=1e-2),
    ],
    ids=["sgd-momentum", "adam"],
)
def test_masked_weights_stay_zero_through_optimizer_steps(
    make_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer], methods: Registry
) -> None:
    model = mlp()
    optimizer = make_optimizer(list(model.parameters()))
    scheduler = Scheduler(model, scheduled({"start": 3, "end": 12, "every": 3}, 0.7), methods=methods)
    data = batches(20)
    origs_moved = 0
    for step, (x, y) in enumerate(data):
        scheduler.step(step)
        before = {n: tensor(model, n, "weight_orig").detach().clone() for n in LINEARS} if step >= 3 else {}
        out = model(x)
        for name in LINEARS if step >= 3 else []:
            m = mask(model, name)
            assert bool((tensor(model, name)[m == 0] == 0).all()), (step, name)  # what forward used
        nn.functional.mse_loss(out, y).backward()
        optimizer.step()
        optimizer.zero_grad()
        for name, old in before.items():
            m = mask(model, name)
            origs_moved += int((tensor(model, name, "weight_orig").detach()[m == 0] != old[m == 0]).sum())
    assert origs_moved > 0  # momentum moved pruned entries of weight_orig: the mask is what keeps them out
    x = data[0][0]
    model(x)
    for name in LINEARS:
        m = mask(model, name)
        assert zeros(m) == round(0.7 * m.numel())
        effective = tensor(model, name, "weight_orig").detach() * m
        assert torch.equal(tensor(model, name).detach(), effective)


def test_finalize_at_the_end_leaves_a_plain_model(methods: Registry, caplog: pytest.LogCaptureFixture) -> None:
    model = mlp()
    dense_keys = set(model.state_dict())
    spec = prunespec.load_spec(
        {
            "version": 1,
            "finalize": True,
            "rules": [
                {"select": {"types": ["Linear"]}, "method": "l1_unstructured", "sparsity": 0.6, "schedule": {"end": 4}},
                {
                    "select": {"names": ["0"]},
                    "method": "ln_structured",
                    "options": {"n": 2, "dim": 0},
                    "sparsity": 0.5,
                    "schedule": {"start": 1, "end": 6, "every": 5},
                },
            ],
        }
    )
    scheduler = Scheduler(model, spec, methods=methods)
    for t in range(6):
        scheduler.step(t)
        assert not scheduler.finalized and "0.weight_mask" in model.state_dict()
    with caplog.at_level(logging.INFO, logger="prunespec"):
        scheduler.step(6)  # the last schedule ends: rules[1] reaches 50% of the rows of 0.weight, then finalize
    assert scheduler.finalized
    achieved = scheduler.history[-1][3]
    assert achieved is not None
    final = {"0": round(achieved * 91), "2": round(0.6 * 65), "4": round(0.6 * 15)}
    assert set(model.state_dict()) == dense_keys
    for name in LINEARS:
        module = model.get_submodule(name)
        assert not any(isinstance(h, prune.BasePruningMethod) for h in module._forward_pre_hooks.values())
        assert not any(isinstance(h, DetachAfterForward) for h in module._forward_hooks.values())
        assert isinstance(module._parameters["weight"], nn.Parameter)
        assert zeros(tensor(model, name)) == final[name], name  # the values carry the final sparsity
    assert final["0"] >= round(0.6 * 91)
    assert int((tensor(model, "0") == 0).all(dim=1).sum()) == round(0.5 * 13)
    assert "finalized 3 tensors" in caplog.text
    with caplog.at_level(logging.WARNING, logger="prunespec"):
        scheduler.step(7)
        scheduler.step(8)
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        "step 7: the model was finalized at 6; pruned weights are no longer masked, so training can make them "
        "nonzero again (set `finalize: false` and call prunespec.finalize after training)"
    ]


def test_the_finalize_argument_overrides_the_spec(methods: Registry) -> None:
    spec = scheduled({"end": 2}, 0.5)
    model = mlp()
    scheduler = Scheduler(model, spec, methods=methods, finalize=True)
    for t in range(3):
        scheduler.step(t)
    assert scheduler.finalized and not any(name.endswith("_mask") for name, _ in model.named_buffers())
    assert zeros(tensor(model, "2")) == round(0.5 * 65)
    kept = mlp()
    off = Scheduler(kept, spec.model_copy(update={"finalize": True}), methods=methods, finalize=False)
    for t in range(3):
        off.step(t)
    assert not off.finalized and zeros(mask(kept, "2")) == round(0.5 * 65)


# --- bad specs -----------------------------------------------------------------------------------

RULE = """\
version: 1
rules:
  - select: {types: [Linear]}
    method: l1_unstructured
"""


def where(text: str, line_marker: str, token: str) -> tuple[int, int]:
    """1-based (line, column) of ``token`` on the line containing ``line_marker``."""
    for number, line in enumerate(text.splitlines(), start=1):
        if line_marker in line:
            return number, line.index(token, line.index(line_marker)) + 1
    raise AssertionError(f"{line_marker!r} not in the text")


BAD_SCHEDULES = {
    "end-before-start": (
        RULE + "    sparsity: 0.5\n    schedule:\n      start: 10\n      end: 5\n",
        ("start: 10", "start"),
        "rules[0].schedule",
        "`end` (5) must come after `start` (10)",
    ),
    "every-zero": (
        RULE + "    sparsity: 0.5\n    schedule: {end: 5, every: 0}\n",
        ("every: 0", "0}"),
        "rules[0].schedule.every",
        "expected a number > 0, got 0",
    ),
    "initial-above-sparsity": (
        RULE + "    sparsity: 0.5\n    schedule:\n      end: 5\n      initial: 0.8\n",
        ("initial: 0.8", "0.8"),
        "rules[0].schedule.initial",
        "initial sparsity 0.8 is above the final `sparsity` 0.5",
    ),
    "amount-with-schedule": (
        RULE + "    amount: 0.5\n    schedule: {end: 5}\n",
        ("amount: 0.5", "0.5"),
        "rules[0].amount",
        "a scheduled rule needs `sparsity`",
    ),
    "amount-under-the-spec-schedule": (
        "version: 1\nschedule: {end: 3}\nrules:\n  - select: {names: ['0']}\n    method: random_unstructured\n"
        "    amount: 0.2\n",
        ("amount: 0.2", "0.2"),
        "rules[0].amount",
        "a scheduled rule needs `sparsity`",
    ),
}


@pytest.mark.parametrize("case", list(BAD_SCHEDULES))
def test_invalid_schedules_are_spec_errors_with_locations(case: str, tmp_path: Path, methods: Registry) -> None:
    text, (marker, token), path, message = BAD_SCHEDULES[case]
    spec_file = tmp_path / "bad.yaml"
    spec_file.write_text(text)
    model = mlp()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(prunespec.SpecError) as info:
        Scheduler(model, spec_file, methods=methods)
    [issue] = info.value.issues
    assert (issue.file, issue.line, issue.column, issue.path) == (str(spec_file), *where(text, marker, token), path)
    assert message in issue.message
    assert str(info.value).startswith(f"{spec_file}:{issue.line}:{issue.column}: {path}: ")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_a_spec_built_in_python_is_checked_too(methods: Registry) -> None:
    spec = prunespec.Spec.model_validate(
        {"version": 1, "rules": [{"select": {"types": ["Linear"]}, "method": "l1_unstructured", "amount": 0.5}]}
    )
    spec = spec.model_copy(update={"schedule": Schedule(end=3)})
    with pytest.raises(prunespec.SpecError, match=r"rules\[0\]\.amount: a scheduled rule needs `sparsity`"):
        Scheduler(mlp(), spec, methods=methods)


def test_a_spec_that_does_not_fit_fails_before_training(tmp_path: Path, methods: Registry) -> None:
    text = RULE.replace("{types: [Linear]}", "{names: [fc9]}") + "    sparsity: 0.5\n    schedule: {end: 5}\n"
    spec_file = tmp_path / "nofit.yaml"
    spec_file.write_text(text)
    model = mlp()
    with pytest.raises(prunespec.PlanError) as info:
        Scheduler(model, spec_file, methods=methods)
    [issue] = info.value.issues
    assert (issue.line, issue.column) == where(text, "names: [fc9]", "fc9")
    assert not any(name.endswith("_mask") for name, _ in model.named_buffers())


# --- apply() on a scheduled spec -----------------------------------------------------------------


def test_apply_on_a_scheduled_spec_prunes_to_the_final_sparsity_at_once(methods: Registry) -> None:
    model = mlp()
    report = prunespec.apply(model, scheduled({"start": 5, "end": 50}, 0.7), methods=methods)
    assert [zeros(m) for m in masks(model).values()] == [round(0.7 * n) for n in (91, 65, 15)]
    assert report.tensors == {f"{n}.weight": round(0.7 * s) / s for n, s in zip(LINEARS, (91, 65, 15), strict=True)}


def test_plan_warns_that_apply_ignores_the_schedule(methods: Registry) -> None:
    plan = prunespec.plan(mlp(), scheduled({"start": 5, "end": 50}, 0.7), methods=methods)
    assert any("schedule" in warning and "Scheduler" in warning for warning in plan.warnings)


# --- the example ---------------------------------------------------------------------------------


def test_the_example_spec_is_valid_and_kept_out_of_the_tutorial_specs(methods: Registry) -> None:
    path = SPECS / "schedules" / "gradual_cubic.yaml"
    spec = prunespec.load_spec(path, methods=methods)
    assert spec.schedule is not None and spec.schedule.unit == "epoch"
    assert [rule.sparsity for rule in spec.rules] == [0.9]
    assert path not in set(SPECS.glob("*.yaml"))


def test_the_example_reaches_90_percent_with_a_finite_loss() -> None:
    import gradual_pruning  # examples/ is on sys.path (conftest)

    assert Path(gradual_pruning.__file__).parent == EXAMPLES
    out = io.StringIO()
    with redirect_stdout(out):
        history = gradual_pruning.main()
    lines = out.getvalue().splitlines()
    assert len(lines) == len(history) + 1 == 11
    assert [e.sparsity for e in history[:7]] == [
        sum(round(curve("cubic", e, 0, 6, 0.0, 0.9) * n) for n in (2000, 10000, 1000)) / 13000 for e in range(7)
    ]
    assert [e.sparsity for e in history[6:]] == [0.9] * 4
    assert all(math.isfinite(e.loss) for e in history)
    assert history[-1].loss < history[0].loss
    assert lines[-2].startswith("epoch  9  sparsity 90.00%  loss ")
    assert lines[-1] == "finalized: sparsity 90.00% after 7 updates"


def test_spec_wide_schedule_leaves_methods_without_amount_alone(methods: prunespec.MethodRegistry) -> None:
    spec = prunespec.load_spec(
        {
            "version": 1,
            "schedule": {"end": 4},
            "rules": [
                {"select": {"types": ["Linear"]}, "method": "l1_unstructured", "sparsity": 0.5},
                {"select": {"types": ["Conv2d"]}, "method": "identity"},
            ],
        },
        methods=methods,
    )
    assert spec.rules[1].sparsity is None


def test_schedules_must_share_one_unit(methods: prunespec.MethodRegistry) -> None:
    with pytest.raises(prunespec.SpecError, match="schedules mix units: epoch and step"):
        prunespec.load_spec(
            {
                "version": 1,
                "schedule": {"end": 4, "unit": "epoch"},
                "rules": [
                    {"select": {"types": ["Linear"]}, "method": "l1_unstructured", "sparsity": 0.5},
                    {
                        "select": {"types": ["Conv2d"]},
                        "method": "l1_unstructured",
                        "sparsity": 0.5,
                        "schedule": {"end": 100},
                    },
                ],
            },
            methods=methods,
        )


def test_updates_merge_into_one_hook_record_per_tensor(methods: Registry) -> None:
    model = mlp()
    scheduler = Scheduler(model, scheduled({"end": 40}, 0.8), methods=methods)
    for t in range(41):
        scheduler.step(t)
    assert scheduler.updates == 41
    for name in LINEARS:
        hook = next(h for h in model.get_submodule(name)._forward_pre_hooks.values())
        assert isinstance(hook, torch.nn.utils.prune.L1Unstructured)  # one record, not a container of 41
        # the record says what all the updates did together: the count it prunes is the mask's
        assert hook.amount == zeros(mask(model, name))


def test_a_step_that_is_not_a_finite_number_is_refused(methods: Registry) -> None:
    scheduler = Scheduler(mlp(), scheduled({"end": 4}, 0.5), methods=methods)
    for bad in (math.nan, math.inf, True, "3"):
        with pytest.raises(prunespec.PrunespecError, match="finite number"):
            scheduler.step(bad)  # type: ignore[arg-type]
    assert scheduler.last_step is None and scheduler.updates == 0


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("points", [1, "x"], "`points` must be a list of 2 integers"),
        ("points", [99, 0], "`points[0]` is 99"),
        ("targets", [0.5, 2.0], "`targets` must be a list"),
        ("updates", -1, "`updates` must be an integer"),
        ("last_step", math.nan, "`last_step` must be a finite number"),
        ("finalized", "no", "`finalized` must be true or false"),
        ("history", [[0, 7, 0.1, 0.1]], "`history` must be a list"),
    ],
)
def test_a_damaged_state_is_refused_whole(key: str, value: Any, problem: str, methods: Registry) -> None:
    scheduler = Scheduler(mlp(), prunespec.load_spec(RESUME_SPEC), methods=methods)
    for t in range(3):
        scheduler.step(t)
    state = scheduler.state_dict()
    fresh = Scheduler(mlp(), prunespec.load_spec(RESUME_SPEC), methods=methods)
    before = fresh.state_dict()
    with pytest.raises(prunespec.PrunespecError, match=re.escape(problem)):
        fresh.load_state_dict({**state, key: value})
    assert fresh.state_dict() == before  # nothing of the damaged state was adopted
