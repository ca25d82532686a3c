"""The calibration record: the data fingerprint, CalibrationRecord's plain-data round trip, and its
place in checkpoints (saved, read back by load/inspect, refused when hostile, absent in older files)."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ModelState
from lenet import LeNet
from torch import nn

import prunespec
from prunespec.record import MAX_NAME, CalibrationRecord, Fingerprint

METHODS = prunespec.load_methods(builtins_only=True)
SPEC: dict[str, Any] = {
    "version": 1,
    "calibration": {"sequential": False, "samples": 2},
    "rules": [{"select": {"types": ["Linear"]}, "method": "l1_unstructured", "amount": 0.3}],
}
RECORD = CalibrationRecord(
    samples=2,
    tokens=24,
    sequential=False,
    blocks=("layers.0", "layers.1"),
    fingerprint="ab" * 32,
    allocations={0: {"layers.0": 0.25, "layers.1": 0.35}},
)


def digest(*batches: Any) -> str:
    fp = Fingerprint()
    for batch in batches:
        fp.add(batch)
    return fp.hexdigest()


# --- Fingerprint ---------------------------------------------------------------------------------------


def test_the_fingerprint_sees_values_dtypes_shapes_structure_and_keys() -> None:
    x = torch.arange(12).reshape(3, 4)
    base = digest({"input_ids": x, "attention_mask": torch.ones(3, 4)})
    assert base == digest({"attention_mask": torch.ones(3, 4), "input_ids": x.clone()})  # key order, copies
    changed = [
        {"input_ids": x + (x == 5), "attention_mask": torch.ones(3, 4)},  # one value
        {"input_ids": x.int(), "attention_mask": torch.ones(3, 4)},  # dtype
        {"input_ids": x.reshape(4, 3), "attention_mask": torch.ones(3, 4)},  # shape
        {"ids": x, "attention_mask": torch.ones(3, 4)},  # a key
        {"input_ids": x},  # structure
        (x, torch.ones(3, 4)),
    ]
    digests = [digest(b) for b in changed]
    assert base not in digests and len(set(digests)) == len(digests)
    assert digest((x,)) != digest([x]) != digest(x)
    assert digest(x, x) != digest(x) and digest(x, x + 1) != digest(x + 1, x)  # batches, in order


def test_the_fingerprint_ignores_layout_and_autograd() -> None:
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(0))
    assert digest(x) == digest(x.t().contiguous().t())  # a non-contiguous view of the same values
    assert digest(x) == digest(x.clone().requires_grad_())
    assert digest(x.to(torch.bfloat16)) != digest(x.half())
    assert digest(torch.zeros(0, 3)) != digest(torch.zeros(3, 0))


def test_plain_values_hash_and_other_objects_make_it_partial() -> None:
    fp = Fingerprint()
    fp.add({"x": torch.ones(2), "use_cache": False, "n": 3, "name": "a"})
    assert not fp.partial and fp.batches == 1
    assert digest({"use_cache": False}) != digest({"use_cache": 0})
    fp.add({"x": object()})
    assert fp.partial and fp.batches == 2
    assert len(fp.hexdigest()) == 64


def test_a_batch_that_nests_without_end_is_refused() -> None:
    deep: list[Any] = []
    deep.append(deep)
    with pytest.raises(ValueError, match="deeper than"):
        Fingerprint().add(deep)


# --- CalibrationRecord ---------------------------------------------------------------------------------


def test_the_record_round_trips_through_plain_data() -> None:
    data = RECORD.to_dict()
    assert data["allocations"] == [{"rule_index": 0, "sparsities": {"layers.0": 0.25, "layers.1": 0.35}}]
    assert CalibrationRecord.from_dict(data) == RECORD
    bare = CalibrationRecord(samples=1, tokens=0, sequential=True)
    assert CalibrationRecord.from_dict(bare.to_dict()) == bare
    assert CalibrationRecord.from_dict({"samples": 1, "tokens": 0, "sequential": True}) == bare


def _with(**changes: Any) -> dict[str, Any]:
    data = RECORD.to_dict()
    data.update(changes)
    return {k: v for k, v in data.items() if v is not _DROP}


_DROP = object()
HUGE = "x" * 10_000_000

BAD_RECORDS: dict[str, tuple[Any, str]] = {
    "not a mapping": ([1, 2], "is a list of 2 items; expected a mapping"),
    "unknown key": (_with(seed=3), "unknown key 'seed'"),
    "a huge key": (_with(**{HUGE: 1}), "unknown key a str of 10000000 characters"),
    "missing samples": (_with(samples=_DROP), "missing key 'samples'"),
    "samples a string": (_with(samples="2"), "samples: is '2'; expected an integer >= 0"),
    "samples a bool": (_with(samples=True), "samples: is True"),
    "samples negative": (_with(samples=-1), "samples: is -1"),
    "samples too large": (_with(samples=2**80), "expected an integer >= 0"),
    "tokens a float": (_with(tokens=2.0), "tokens: is 2.0"),
    "sequential an int": (_with(sequential=1), "sequential: is 1; expected true, false or 'blocks'"),
    "blocks a str": (_with(blocks="layers.0"), "blocks: is 'layers.0'; expected a list of module names"),
    "a block an int": (_with(blocks=["layers.0", 3]), "blocks[1]: is 3; expected a module name"),
    "a huge block name": (
        _with(blocks=[HUGE]),
        f"blocks[0]: is a str of 10000000 characters; expected a module name (a str of 1 to {MAX_NAME}",
    ),
    "too many blocks": (_with(blocks=["b"] * 1_000_001), "blocks: 1,000,001 items, more than the 1,000,000"),
    "fingerprint not hex": (
        _with(fingerprint="z" * 64),
        "fingerprint: is a str of 64 characters; expected 64 hex digits",
    ),
    "fingerprint huge": (_with(fingerprint=HUGE), "fingerprint: is a str of 10000000 characters"),
    "allocations a dict": (_with(allocations={"0": {}}), "allocations: is a dict of 1 items"),
    "allocation without index": (_with(allocations=[{"sparsities": {}}]), "allocations[0]: is a dict of 1 items"),
    "allocation index a str": (
        _with(allocations=[{"rule_index": "0", "sparsities": {}}]),
        "allocations[0].rule_index: is '0'",
    ),
    "allocated twice": (
        _with(allocations=[{"rule_index": 0, "sparsities": {}}, {"rule_index": 0, "sparsities": {}}]),
        "allocations[1].rule_index: rules[0] is allocated twice",
    ),
    "sparsity 1.5": (
        _with(allocations=[{"rule_index": 0, "sparsities": {"layers.0": 1.5}}]),
        "allocations[0].sparsities['layers.0']: is 1.5; expected a sparsity in [0, 1]",
    ),
    "sparsity NaN": (_with(allocations=[{"rule_index": 0, "sparsities": {"a": math.nan}}]), "is nan"),
    "sparsity a str": (_with(allocations=[{"rule_index": 0, "sparsities": {"a": "0.5"}}]), "is '0.5'"),
    "sparsity block an int": (
        _with(allocations=[{"rule_index": 0, "sparsities": {3: 0.5}}]),
        "allocations[0].sparsities key: is 3",
    ),
}


@pytest.mark.parametrize("case", list(BAD_RECORDS))
def test_hostile_records_are_refused_with_where_and_what(case: str) -> None:
    data, words = BAD_RECORDS[case]
    with pytest.raises(ValueError) as info:
        CalibrationRecord.from_dict(data)
    message = str(info.value)
    assert words in message, message
    assert len(message) < 300, message  # a huge value is described, never echoed


# --- checkpoints ---------------------------------------------------------------------------------------


def lenet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return LeNet().eval()


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = lenet()
    prunespec.apply(model, SPEC, methods=METHODS)
    path = tmp_path_factory.mktemp("record") / "with-record.pt"
    prunespec.save(model, path, SPEC, methods=METHODS, record=RECORD)
    return path


def test_save_keeps_the_calibration_block_and_the_record(saved: Path) -> None:
    meta = torch.load(saved, weights_only=True)["prunespec"]
    assert meta["spec"]["calibration"] == {"sequential": False, "samples": 2, "errors": True}
    assert meta["calibration"] == RECORD.to_dict()
    spec = prunespec.load(lenet(1), saved, methods=METHODS)
    assert spec is not None and spec.calibration_given and spec.calibration.samples == 2
    found = prunespec.inspect(saved, methods=METHODS)
    assert found.calibration == RECORD
    assert found.spec == spec
    assert found.pruned == ("fc1.weight", "fc2.weight", "fc3.weight")
    assert set(found.hooks) == set(found.pruned)


def test_a_spec_without_the_block_is_saved_without_it(tmp_path: Path) -> None:
    model = lenet()
    spec = {k: v for k, v in SPEC.items() if k != "calibration"}
    prunespec.apply(model, spec, methods=METHODS)
    path = tmp_path / "plain.pt"
    prunespec.save(model, path, spec, methods=METHODS)
    meta = torch.load(path, weights_only=True)["prunespec"]
    assert "calibration" not in meta["spec"] and "calibration" not in meta
    loaded = prunespec.load(lenet(1), path, methods=METHODS)
    assert loaded is not None and not loaded.calibration_given
    assert prunespec.inspect(path, methods=METHODS).calibration is None


def test_older_checkpoints_and_bare_state_dicts_still_load(saved: Path, tmp_path: Path) -> None:
    data = torch.load(saved, weights_only=True)
    del data["prunespec"]["calibration"]
    del data["prunespec"]["spec"]["calibration"]
    older = tmp_path / "older.pt"
    torch.save(data, older)
    assert prunespec.load(lenet(1), older, methods=METHODS) is not None
    assert prunespec.inspect(older, methods=METHODS).calibration is None
    bare = tmp_path / "bare.pt"
    torch.save(lenet().state_dict(), bare)
    found = prunespec.inspect(bare, methods=METHODS)
    assert (found.spec, found.calibration, found.pruned) == (None, None, ())


@pytest.mark.parametrize(
    ("record", "words"),
    [
        ("fast", "prunespec.calibration: is 'fast'; expected a mapping"),
        ({**RECORD.to_dict(), "samples": "2"}, "prunespec.calibration.samples: is '2'"),
        ({**RECORD.to_dict(), "blocks": [HUGE]}, "prunespec.calibration.blocks[0]: is a str of 10000000 characters"),
        ({**RECORD.to_dict(), "extra": 1}, "prunespec.calibration: unknown key 'extra'"),
    ],
)
def test_a_hostile_record_in_a_checkpoint_is_refused_before_anything_loads(
    saved: Path, tmp_path: Path, record: Any, words: str
) -> None:
    data = torch.load(saved, weights_only=True)
    data["prunespec"]["calibration"] = record
    path = tmp_path / "hostile.pt"
    buffer = io.BytesIO()
    torch.save(data, buffer)
    path.write_bytes(buffer.getvalue())
    model = lenet(1)
    before = ModelState(model)
    with pytest.raises(prunespec.CheckpointError) as info:
        prunespec.load(model, path, methods=METHODS)
    before.assert_unchanged(model)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and words in message, message
    assert len(message) < 400, message
    with pytest.raises(prunespec.CheckpointError, match=r"prunespec\.calibration"):
        prunespec.inspect(path, methods=METHODS)
