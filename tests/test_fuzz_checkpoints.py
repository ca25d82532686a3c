"""Property-based tests: random damage to a real prunespec checkpoint.

The property: ``prunespec.load`` either refuses the file with a CheckpointError, leaving the model exactly
as it was, or loads it, and then the model holds exactly what was saved (or, for a harmless change such
as a bool mask or float64 weights, exactly the changed values, converted as torch converts them). Nothing
else: no other exception, no silently different weights.

What is detectable, and so asserted: every byte of the file is covered by a CRC or by a check of the zip
structure, except fields no reader uses (a local header's timestamps, sizes and version, the archive
comment); a flipped byte either changes nothing that is loaded or is refused. Truncation is always
refused. A wrong type, shape or dtype kind, a mask value other than 0 and 1, and a record that does not
rebuild are refused.

``PRUNESPEC_FUZZ_SCALE=10`` multiplies the number of examples, as in test_fuzz.py.
"""

from __future__ import annotations

import io
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from conftest import ModelState
from hypothesis import HealthCheck, currently_in_test_context, event, given, note, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import prune

import prunespec

METHODS = prunespec.load_methods(builtins_only=True)
SCALE = float(os.environ.get("PRUNESPEC_FUZZ_SCALE", "1"))
SPEC: dict[str, Any] = {
    "version": 1,
    "rules": [
        {"select": {"types": ["Linear"]}, "method": "l1_unstructured", "amount": 0.3},
        {"select": {"names": ["0"]}, "method": "ln_structured", "options": {"n": 1, "dim": 0}, "amount": 1},
        {"select": {"types": ["Linear"]}, "scope": "global", "method": "l1_unstructured", "amount": 0.1},
    ],
}


def fuzz(max_examples: int) -> settings:
    return settings(
        max_examples=max(1, int(max_examples * SCALE)),
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4))


def _saved() -> tuple[bytes, dict[str, torch.Tensor]]:
    model = mlp(0)
    prunespec.apply(model, SPEC, methods=METHODS)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "good.pt"
        prunespec.save(model, path, spec=SPEC, methods=METHODS)
        return path.read_bytes(), {k: v.clone() for k, v in model.state_dict().items()}


GOOD, STATE = _saved()
TARGETS = {
    "fresh": lambda: mlp(1),
    "pruned": lambda: _pruned_target(),
}


def _pruned_target() -> nn.Module:
    model = mlp(2)
    prune.random_unstructured(model[2], "weight", amount=0.5)
    return model


def check(path: Path, target: str, expected: Callable[[dict[str, torch.Tensor]], None] | None) -> str:
    """Load ``path`` into a target model: refused with the model unchanged, or loaded and then
    ``expected(state)`` holds (None: it must be refused). Returns what happened."""
    model = TARGETS[target]()
    before = ModelState(model)
    try:
        prunespec.load(model, path, methods=METHODS)
    except prunespec.CheckpointError as exc:
        if currently_in_test_context():
            note(str(exc))
        before.assert_unchanged(model)
        return "refused"
    assert expected is not None, "this damage must be refused"
    expected(model.state_dict())
    return "loaded"


def exactly(reference: dict[str, torch.Tensor]) -> Callable[[dict[str, torch.Tensor]], None]:
    def compare(state: dict[str, torch.Tensor]) -> None:
        assert list(state) == list(reference)
        for key, value in reference.items():
            assert torch.equal(state[key], value.to(state[key].dtype)), key

    return compare


@fuzz(120)
@given(data=st.data(), target=st.sampled_from(list(TARGETS)))
def test_a_flipped_byte_is_refused_or_changes_nothing(tmp_path: Path, data: st.DataObject, target: str) -> None:
    position = data.draw(st.integers(0, len(GOOD) - 1), label="position")
    xor = data.draw(st.integers(1, 255), label="xor")
    damaged = bytearray(GOOD)
    damaged[position] ^= xor
    path = tmp_path / "flipped.pt"
    path.write_bytes(bytes(damaged))
    event(check(path, target, exactly(STATE)))


@fuzz(40)
@given(length=st.integers(0, len(GOOD) - 1), target=st.sampled_from(list(TARGETS)))
def test_a_truncated_file_is_refused(tmp_path: Path, length: int, target: str) -> None:
    path = tmp_path / "truncated.pt"
    path.write_bytes(GOOD[:length])
    check(path, target, None)


# --- changed values --------------------------------------------------------------------------------------

JUNK = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 10**6) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
RECORD_KEYS = ["method", "amount", "options", "global", "group_size", "class", "provider", "package", "dim"]
METHOD_NAMES = [*sorted(METHODS), "nm", "renamed_method", None, 3]
RECORDS = (
    st.fixed_dictionaries(
        {},
        optional={
            "method": st.sampled_from(METHOD_NAMES),
            "amount": st.one_of(st.floats(), st.integers(-3, 10**6), st.text(max_size=3), st.none()),
            "options": st.one_of(
                st.dictionaries(st.sampled_from(["n", "dim", "norm", "x"]), st.integers(-3, 3) | st.text(max_size=2)),
                JUNK,
            ),
            "global": st.sampled_from(METHOD_NAMES),
            "group_size": st.integers(-1, 4) | JUNK,
            "class": JUNK,
        },
    )
    | JUNK
)


def load_saved() -> dict[str, Any]:
    data: dict[str, Any] = torch.load(io.BytesIO(GOOD), weights_only=True)
    return data


@fuzz(60)
@given(data=st.data(), target=st.sampled_from(list(TARGETS)))
def test_a_changed_hook_record_is_refused_or_rebuilds(tmp_path: Path, data: st.DataObject, target: str) -> None:
    saved = load_saved()
    hooks = saved["prunespec"]["hooks"]
    name = data.draw(st.sampled_from(sorted(hooks)), label="tensor")
    index = data.draw(st.integers(0, len(hooks[name]) - 1), label="record")
    hooks[name][index] = data.draw(RECORDS, label="new record")
    path = tmp_path / "record.pt"
    torch.save(saved, path)
    # a record that happens to be valid still loads the weights exactly; which hook it makes is its own
    event(check(path, target, exactly(STATE)))


def _mask_value(value: float) -> Callable[[dict[str, Any], str], bool]:
    def change(state: dict[str, Any], key: str) -> bool:
        mask = state[key].clone()
        mask.view(-1)[0] = value
        state[key] = mask
        return value in (0.0, 1.0)

    return change


def _dtype(dtype: torch.dtype) -> Callable[[dict[str, Any], str], bool]:
    def change(state: dict[str, Any], key: str) -> bool:
        state[key] = state[key].to(dtype)
        return dtype.is_floating_point or (key.endswith("_mask") and not dtype.is_complex)

    return change


def _replace(value: Any) -> Callable[[dict[str, Any], str], bool]:
    def change(state: dict[str, Any], key: str) -> bool:
        state[key] = value
        return False

    return change


def _reshape(state: dict[str, Any], key: str) -> bool:
    state[key] = state[key].reshape(-1)[:-1] if state[key].numel() > 1 else torch.zeros(2)
    return False


def _drop(state: dict[str, Any], key: str) -> bool:
    del state[key]
    return False


def _expand(state: dict[str, Any], key: str) -> bool:
    state[key] = state[key].reshape(-1)[:1].expand(state[key].shape)
    return state[key].numel() == 1  # one entry: stride 0 is no sharing


CHANGES = st.one_of(
    st.floats(width=32).map(_mask_value),
    st.sampled_from([0.0, 1.0, 0.5, -1.0, 2.0, math.nan]).map(_mask_value),
    st.sampled_from([torch.float64, torch.float16, torch.int64, torch.bool, torch.complex64]).map(_dtype),
    st.sampled_from([None, 3, "weights", [1.0, 2.0], {"a": 1}]).map(_replace),
    st.just(_reshape),
    st.just(_drop),
    st.just(_expand),
)


@fuzz(80)
@given(data=st.data(), target=st.sampled_from(list(TARGETS)))
def test_a_changed_tensor_is_refused_or_harmless(tmp_path: Path, data: st.DataObject, target: str) -> None:
    saved = load_saved()
    state = saved["state_dict"]
    change = data.draw(CHANGES, label="change")
    masks = sorted(k for k in state if k.endswith("_mask"))
    key = data.draw(st.sampled_from(masks if change.__qualname__.startswith("_mask_value") else sorted(state)))
    harmless = change(state, key)
    note(f"{key}: harmless={harmless}")
    path = tmp_path / "changed.pt"
    torch.save(saved, path)
    reference = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
    event(check(path, target, exactly(reference) if harmless else None))


# --- what the fuzzing found ------------------------------------------------------------------------------


def test_a_damaged_zip_ending_is_a_checkpoint_error(tmp_path: Path) -> None:
    """zipfile.is_zipfile raises (instead of answering False) when the zip64 end locator claims several
    disks."""
    damaged = bytearray(GOOD)
    damaged[GOOD.rfind(b"PK\x06\x07") + 4] ^= 2  # the locator's disk number
    path = tmp_path / "disks.pt"
    path.write_bytes(bytes(damaged))
    assert check(path, "fresh", None) == "refused"
