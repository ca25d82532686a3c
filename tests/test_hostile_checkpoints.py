"""Checkpoints that must not load: each is refused with one CheckpointError naming the key (or record)
and what would be right, before anything changes: the model is compared in full (ModelState) after.

Also: plugin options that are Enums or Paths round-trip through ``weights_only=True``; an interrupted
load (KeyboardInterrupt) restores the model; a file that declares far more data than it holds, or than
the model can need, is refused without the memory ever being used (peak RSS measured in a child).
"""

from __future__ import annotations

import collections
import enum
import io
import math
import os
import pickle
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ROOT, ModelState
from lenet import LeNet
from pydantic import BaseModel, ConfigDict
from torch import nn
from torch.nn.utils import prune

import prunespec
from prunespec import checkpoint
from prunespec.methods.base import MethodInfo

SPEC: dict[str, Any] = {
    "version": 1,
    "seed": 7,
    "rules": [
        {"select": {"types": ["Conv2d", "Linear"]}, "method": "l1_unstructured", "amount": 0.3},
        {"select": {"types": ["Linear"]}, "method": "ln_structured", "options": {"n": 2, "dim": 0}, "amount": 0.25},
        {"select": {"types": ["Conv2d"]}, "scope": "global", "method": "l1_unstructured", "amount": 0.1},
    ],
}


def lenet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return LeNet().eval()


@pytest.fixture(scope="module")
def saved_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A real prunespec checkpoint of a pruned LeNet, made once."""
    methods = prunespec.load_methods(builtins_only=True)
    model = lenet()
    prunespec.apply(model, SPEC, methods=methods)
    path = tmp_path_factory.mktemp("saved") / "good.pt"
    prunespec.save(model, path, spec=SPEC, methods=methods)
    return path.read_bytes()


@pytest.fixture
def saved(saved_bytes: bytes) -> dict[str, Any]:
    """That checkpoint as torch.load reads it, to be damaged."""
    data: dict[str, Any] = torch.load(io.BytesIO(saved_bytes), weights_only=True)
    return data


def target(pruned_first: bool, methods: prunespec.MethodRegistry) -> nn.Module:
    model = lenet(seed=1)
    if pruned_first:  # a model with pruning of its own keeps it
        rule = {"select": {"types": ["Linear"]}, "method": "random_unstructured", "amount": 0.5}
        prunespec.apply(model, {"version": 1, "seed": 3, "rules": [rule]}, methods=methods)
    return model


def refused(path: Path, methods: prunespec.MethodRegistry, pruned_first: bool = False) -> str:
    """Load ``path``; assert it is refused and the model untouched; return the message."""
    model = target(pruned_first, methods)
    before = ModelState(model)
    with pytest.raises(prunespec.CheckpointError) as info:
        prunespec.load(model, path, methods=methods)
    before.assert_unchanged(model)
    return str(info.value)


# --- hook records and metadata -----------------------------------------------------------------------------

Edit = Callable[[dict[str, Any]], None]


def hooks(data: dict[str, Any]) -> dict[str, Any]:
    result: dict[str, Any] = data["prunespec"]["hooks"]
    return result


def _set(record: tuple[str, int], **changes: Any) -> Edit:
    def edit(data: dict[str, Any]) -> None:
        hooks(data)[record[0]][record[1]].update(changes)

    return edit


def _replace_record(value: Any) -> Edit:
    def edit(data: dict[str, Any]) -> None:
        hooks(data)["fc1.weight"][0] = value

    return edit


def _rename_option(data: dict[str, Any]) -> None:  # a plugin renamed `n` to `norm` between versions
    options = hooks(data)["fc1.weight"][1]["options"]
    options["norm"] = options.pop("n")


def _meta(**changes: Any) -> Edit:
    def edit(data: dict[str, Any]) -> None:
        data["prunespec"].update(changes)

    return edit


def _hooks_entry(name: str, value: Any) -> Edit:
    def edit(data: dict[str, Any]) -> None:
        hooks(data)[name] = value

    return edit


BAD_RECORDS: dict[str, tuple[Edit, list[str]]] = {
    "amount 'x'": (
        _set(("fc1.weight", 0), amount="x"),
        ["prunespec.hooks['fc1.weight'][0].amount: is 'x', not a number; expected a fraction in [0, 1]"],
    ),
    "amount -1": (_set(("fc1.weight", 0), amount=-1), ["[0].amount: is -1; expected a count >= 0 of at most 48000"]),
    "amount 1.5": (_set(("fc1.weight", 0), amount=1.5), ["[0].amount: is 1.5; expected a fraction in [0, 1]"]),
    "amount NaN": (_set(("fc1.weight", 0), amount=math.nan), ["[0].amount: is nan"]),
    "a count larger than the tensor": (_set(("fc1.weight", 0), amount=10**9), ["at most 48000"]),
    "an int record": (_replace_record(3), ["prunespec.hooks['fc1.weight'][0]: is an int; expected a mapping"]),
    "renamed option": (
        _rename_option,
        ["prunespec.hooks['fc1.weight'][1].options: not valid for ln_structured", "norm", "options of ln_structured"],
    ),
    "option of a wrong type": (_set(("fc1.weight", 1), options={"n": 2, "dim": "rows"}), ["[1].options", "dim"]),
    "dim out of range": (
        _set(("fc1.weight", 1), options={"n": 2, "dim": 5}),
        ["[1].options: dim=5 is out of range for shape [120, 400]"],
    ),
    "options not a mapping": (_set(("fc1.weight", 1), options=[2, 0]), ["[1].options: is [2, 0]; expected a mapping"]),
    "unknown key": (_set(("fc1.weight", 0), scale=2), ["[0]: unknown key 'scale'"]),
    "method not a name": (_set(("fc1.weight", 0), method=7), ["[0].method: is 7; expected the name of a method"]),
    "uninstalled method": (
        _set(("fc1.weight", 0), method="magnitude_v2", package="prunespec-magnitude", version="2.0"),
        ["[0]: method 'magnitude_v2' is not installed", "saved with the package prunespec-magnitude 2.0"],
    ),
    "uninstalled known plugin": (_set(("fc1.weight", 0), method="nm", package=None), ["'nm'", "prunespec-nm"]),
    "global group size 0": (_set(("conv1.weight", 1), group_size=0), ["[1].group_size: is 0; expected an integer"]),
    "empty records": (_hooks_entry("fc1.weight", []), ["['fc1.weight']: is []; expected a non-empty list"]),
    "records of a dense tensor": (_hooks_entry("fc1.bias", [{"method": "identity"}]), ["prunes no such tensor"]),
    "hooks not a mapping": (_meta(hooks=[1]), ["prunespec.hooks is a list; expected a mapping"]),
    "newer format": (_meta(format=2), ["prunespec.format is 2; this prunespec reads format 1"]),
    "spec not a mapping": (_meta(spec="rules"), ["prunespec.spec is a str; expected a mapping or None"]),
    "metadata not a mapping": (lambda d: d.update(prunespec=5), ["prunespec is an int; expected prunespec's metadata"]),
    "calibration record not a mapping": (_meta(calibration=5), ["prunespec.calibration: is 5; expected a mapping"]),
    "calibration record with a huge name": (
        _meta(calibration={"samples": 1, "tokens": 1, "sequential": True, "blocks": ["b" * 5_000_000]}),
        ["prunespec.calibration.blocks[0]: is a str of 5000000 characters; expected a module name"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_RECORDS))
@pytest.mark.parametrize("pruned_first", [False, True], ids=["dense", "pruned"])
def test_bad_hook_records_and_metadata_are_refused_before_anything_loads(
    case: str, pruned_first: bool, saved: dict[str, Any], tmp_path: Path, methods: prunespec.MethodRegistry
) -> None:
    edit, words = BAD_RECORDS[case]
    edit(saved)
    path = tmp_path / "bad.pt"
    torch.save(saved, path)
    message = refused(path, methods, pruned_first)
    assert message.startswith(f"{path}: "), message
    for word in words:
        assert word in message, message


# --- tensors -------------------------------------------------------------------------------------------


def _tensor(key: str, make: Callable[[torch.Tensor], Any]) -> Edit:
    def edit(data: dict[str, Any]) -> None:
        data["state_dict"][key] = make(data["state_dict"][key])

    return edit


def _mask_value(value: float) -> Edit:
    def make(mask: torch.Tensor) -> torch.Tensor:
        mask = mask.clone()
        mask.view(-1)[7] = value
        return mask

    return _tensor("fc2.weight_mask", make)


BAD_TENSORS: dict[str, tuple[Edit, list[str]]] = {
    "mask 0.5": (_mask_value(0.5), ["fc2.weight_mask: a mask must hold only 0 and 1; it holds 0.5"]),
    "mask 2": (_mask_value(2.0), ["fc2.weight_mask: a mask must hold only 0 and 1; it holds 2.0"]),
    "mask -1": (_mask_value(-1.0), ["it holds -1.0"]),
    "mask NaN": (_mask_value(math.nan), ["it holds nan"]),
    "complex mask": (_tensor("fc2.weight_mask", lambda m: m.to(torch.complex64)), ["a mask of dtype torch.complex64"]),
    "integer weights": (
        _tensor("conv1.bias", lambda t: t.to(torch.int32)),
        ["conv1.bias: dtype torch.int32, but the model's is torch.float32; expected a floating-point dtype"],
    ),
    "not a tensor": (
        _tensor("conv1.bias", lambda t: t.tolist()),
        ["['state_dict']['conv1.bias']: a list, not a tensor"],
    ),
    "a None": (_tensor("conv1.bias", lambda t: None), ["['conv1.bias']: None, not a tensor"]),
    "meta tensor": (
        _tensor("conv1.bias", lambda t: torch.empty_like(t, device="meta")),
        ["['state_dict']['conv1.bias']: a tensor on meta, without data; expected a CPU tensor"],
    ),
    "sparse tensor": (
        _tensor("fc3.weight_orig", lambda t: t.to_sparse()),
        ["['fc3.weight_orig']: a torch.sparse_coo tensor; expected a dense (torch.strided) tensor"],
    ),
    "stride 0": (
        _tensor("fc2.weight_mask", lambda m: torch.ones(1).expand(m.shape)),
        ["['fc2.weight_mask']: strides [0, 0] for shape [84, 120] make entries share memory"],
    ),
    "overlapping strides": (
        _tensor("conv1.weight_orig", lambda t: torch.arange(200.0).as_strided(t.shape, (1, 1, 1, 1))),
        ["['conv1.weight_orig']: strides [1, 1, 1, 1] for shape [6, 1, 3, 3] make entries share memory"],
    ),
    "wrong shape": (
        _tensor("fc3.bias", lambda t: torch.zeros(11)),
        ["shape mismatch fc3.bias (checkpoint [11], model [10])"],
    ),
    "non-str key": (
        lambda d: d["state_dict"].update({3: torch.zeros(1)}),
        ["[3]: an int key; state_dict keys are names (str)"],
    ),
}


@pytest.mark.parametrize("case", list(BAD_TENSORS))
def test_bad_tensors_are_refused_before_anything_loads(
    case: str, saved: dict[str, Any], tmp_path: Path, methods: prunespec.MethodRegistry
) -> None:
    edit, words = BAD_TENSORS[case]
    edit(saved)
    path = tmp_path / "bad.pt"
    torch.save(saved, path)
    message = refused(path, methods, pruned_first=case.startswith("mask"))
    for word in words:
        assert word in message, message


def test_load_state_dict_refuses_a_non_binary_mask_too(
    saved: dict[str, Any], methods: prunespec.MethodRegistry
) -> None:
    state_dict = saved["state_dict"]
    state_dict["fc2.weight_mask"].view(-1)[0] = 0.5
    model = lenet(seed=1)
    before = ModelState(model)
    with pytest.raises(prunespec.CheckpointError, match=r"fc2\.weight_mask: a mask must hold only 0 and 1"):
        checkpoint.load_state_dict(model, state_dict)
    before.assert_unchanged(model)


def test_bool_masks_and_other_precisions_load(saved: dict[str, Any], tmp_path: Path) -> None:
    """What is refused is what would be wrong; a bool mask or float64 weights convert, as in torch."""
    state_dict = saved["state_dict"]
    reference = {k: v.clone() for k, v in state_dict.items()}
    state_dict["fc2.weight_mask"] = state_dict["fc2.weight_mask"].bool()
    state_dict["conv1.bias"] = state_dict["conv1.bias"].double()
    path = tmp_path / "mixed.pt"
    torch.save(saved, path)
    model = lenet(seed=1)
    prunespec.load(model, path, methods=prunespec.load_methods(builtins_only=True))
    for key, value in reference.items():
        assert torch.equal(model.state_dict()[key], value), key


def test_a_legacy_format_file_still_loads(tmp_path: Path) -> None:
    model = lenet()
    prune.l1_unstructured(model.fc1, "weight", amount=0.5)
    path = tmp_path / "legacy.pt"
    torch.save(model.state_dict(), path, _use_new_zipfile_serialization=False)
    fresh = lenet(seed=1)
    prunespec.load(fresh, path, methods=prunespec.load_methods(builtins_only=True))
    assert torch.equal(fresh.fc1.weight_mask, model.fc1.weight_mask)


# --- options that are not plain data ------------------------------------------------------------------------


class Side(enum.Enum):
    LOW = "low"
    HIGH = "high"


class EdgeOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    side: Side = Side.LOW
    notes: Path = Path("notes.txt")
    window: tuple[int, int] = (0, 1)
    scale: float = math.inf


class PruneOneEdge(prunespec.PruningMethod):
    """Prunes the first (LOW) or last (HIGH) ``amount`` entries."""

    name = "one_edge"
    PRUNING_TYPE = "unstructured"
    Options = EdgeOptions

    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        mask = default_mask.clone()
        k = self.n_to_prune(t.numel())
        flat = mask.view(-1)
        if k:
            if self.side is Side.LOW:  # type: ignore[attr-defined]
                flat[:k] = 0
            else:
                flat[-k:] = 0
        return mask


def test_enum_and_path_options_round_trip_through_weights_only(tmp_path: Path) -> None:
    registry = prunespec.load_methods(builtins_only=True)
    registry.add(MethodInfo.from_class(PruneOneEdge))
    options = {"side": "high", "notes": "a/b.txt", "window": [2, 3]}
    spec = {
        "version": 1,
        "rules": [{"select": {"names": ["fc1"]}, "method": "one_edge", "amount": 0.25, "options": options}],
    }
    model = lenet()
    prunespec.apply(model, spec, methods=registry)
    path = tmp_path / "edge.pt"
    prunespec.save(model, path, methods=registry)

    # plain data only: torch's safe loader reads it, and the record is what JSON would hold
    record = torch.load(path, weights_only=True)["prunespec"]["hooks"]["fc1.weight"][0]
    assert record["options"] == {"side": "high", "notes": "a/b.txt", "window": [2, 3], "scale": math.inf}

    fresh = lenet(seed=1)
    prunespec.load(fresh, path, methods=registry)
    hook = next(iter(fresh.fc1._forward_pre_hooks.values()))
    assert type(hook) is PruneOneEdge
    assert (hook.side, hook.notes, hook.window, hook.scale) == (Side.HIGH, Path("a/b.txt"), (2, 3), math.inf)  # type: ignore[attr-defined]
    assert torch.equal(fresh.fc1.weight_mask, model.fc1.weight_mask)


# --- interrupted loads --------------------------------------------------------------------------------------


@pytest.mark.parametrize("pruned_first", [False, True], ids=["dense", "pruned"])
def test_an_interrupted_load_restores_the_model_and_reraises(
    pruned_first: bool, saved: dict[str, Any], tmp_path: Path, methods: prunespec.MethodRegistry
) -> None:
    path = tmp_path / "good.pt"
    torch.save(saved, path)
    model = target(pruned_first, methods)
    before = ModelState(model)
    calls = []

    def interrupt(*args: Any) -> None:  # fc3 loads last: everything before it has been written
        calls.append(args)
        raise KeyboardInterrupt

    handle = model.fc3.register_load_state_dict_pre_hook(interrupt)
    with pytest.raises(KeyboardInterrupt):
        prunespec.load(model, path, methods=methods)
    assert calls, "the interruption happened during the load"
    handle.remove()
    before.assert_unchanged(model)
    prunespec.load(model, path, methods=methods)  # and the model is still fit to load it
    assert torch.equal(model.conv1.weight_orig, saved["state_dict"]["conv1.weight_orig"])


def test_a_failure_while_loading_is_a_checkpoint_error_and_restores(
    saved: dict[str, Any], tmp_path: Path, methods: prunespec.MethodRegistry
) -> None:
    path = tmp_path / "good.pt"
    torch.save(saved, path)
    model = lenet(seed=1)
    before = ModelState(model)

    def fails(*args: Any) -> None:
        raise RuntimeError("disk on fire")

    model.fc3.register_load_state_dict_pre_hook(fails)
    with pytest.raises(prunespec.CheckpointError, match=r"RuntimeError: disk on fire \(the model was left unchanged\)"):
        prunespec.load(model, path, methods=methods)
    before.assert_unchanged(model)


# --- files that lie about their sizes ----------------------------------------------------------------------


class _Storage:
    def __init__(self, key: str, numel: int) -> None:
        self.key, self.numel = key, numel


class _Declared:
    """A tensor as torch.save pickles one, declaring ``shape`` over storage ``key``: no data needed."""

    def __init__(self, key: str, shape: tuple[int, ...]) -> None:
        self.storage, self.shape = _Storage(key, math.prod(shape)), shape

    def __reduce__(self) -> Any:
        strides = tuple(math.prod(self.shape[i + 1 :]) for i in range(len(self.shape)))
        args = (self.storage, 0, self.shape, strides, False, collections.OrderedDict())
        return torch._utils._rebuild_tensor_v2, args


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj: Any) -> Any:
        if isinstance(obj, _Storage):
            return ("storage", torch.FloatStorage, obj.key, "cpu", obj.numel)
        return None


def craft(path: Path, state_dict: dict[str, _Declared], records: dict[str, tuple[int, bool]]) -> None:
    """A zip archive laid out as torch.save lays one out, with data records of (size, deflated?)."""
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=2).dump(state_dict)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", buffer.getvalue())
        archive.writestr("archive/byteorder", sys.byteorder)
        for key, (size, deflated) in records.items():
            kind = zipfile.ZIP_DEFLATED if deflated else zipfile.ZIP_STORED
            info = zipfile.ZipInfo(f"archive/data/{key}")
            info.compress_type = kind
            info._compresslevel = 1  # type: ignore[attr-defined]  # (fast: the bomb is made in a second)
            with archive.open(info, "w", force_zip64=True) as record:
                chunk = bytes(1 << 24)
                for start in range(0, size, len(chunk)):
                    record.write(chunk[: min(len(chunk), size - start)])
        archive.writestr("archive/version", "3\n")


GIB = 1 << 30

CHILD = """
import sys, warnings
import torch
sys.path.insert(0, sys.argv[1])
from lenet import LeNet
import prunespec

def peak():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

methods = prunespec.load_methods(builtins_only=True)
model = LeNet()
start = peak()
for path in sys.argv[2:]:
    try:
        prunespec.load(model, path, methods=methods)
        print("loaded", path)
    except prunespec.CheckpointError as exc:
        print("refused", path, str(exc).replace(chr(10), " "))
    try:
        prunespec.checkpoint.load_state_dict(model, prunespec.checkpoint.read(path)[0])
        print("loaded", path)
    except prunespec.CheckpointError as exc:
        print("refused", path, str(exc).replace(chr(10), " "))
print("growth", peak() - start)
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="measures VmHWM in /proc")
def test_files_declaring_huge_tensors_are_refused_without_using_the_memory(tmp_path: Path) -> None:
    big = {"fc1.weight": _Declared("0", (GIB // 4,))}
    bomb = tmp_path / "bomb.pt"  # ~4 MB on disk: 1 GiB of zeros, deflated
    craft(bomb, big, {"0": (GIB, True)})
    assert bomb.stat().st_size < 8 << 20
    liar = tmp_path / "liar.pt"  # stored, but 16 bytes where 1 GiB is declared
    craft(liar, big, {"0": (16, False)})
    large = tmp_path / "large.pt"  # 64 MB genuinely stored, for a model of 250 kB
    craft(large, {"fc1.weight": _Declared("0", (16 << 20,))}, {"0": (64 << 20, False)})

    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(ROOT / "examples"), str(bomb), str(liar), str(large)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    lines = done.stdout.splitlines()
    assert done.returncode == 0, done.stderr
    results = [line for line in lines if line.startswith(("refused", "loaded"))]
    assert len(results) == 6 and all(line.startswith("refused") for line in results), lines
    assert "archive/data/0 is compressed (1073741824 bytes inflated from" in results[0]
    assert "a tensor declares 1073741824 bytes, which no record holds" in results[2]
    assert "67108864 bytes of tensor data, more than a checkpoint of this model can need" in results[4]
    assert "shape mismatch fc1.weight (checkpoint [16777216], model [120, 400])" in results[5]  # read(): no limit
    growth = int(lines[-1].split()[1])
    assert growth < 48 << 20, f"peak RSS grew by {growth >> 20} MiB"
