"""finalize with snapshot "memory", "disk" or "none": the same pruned weights, and what a failure leaves.

"disk" and "none" write each tensor in place as soon as its mask is ready (the least memory); "disk"
saves the old values to a temporary file first and puts them back on any error; "none" keeps nothing
and says which tensors stay pruned.
"""

from __future__ import annotations

import itertools
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

import prunespec
from prunespec.methods.base import MethodInfo


class Raises(prunespec.PruningMethod):
    name = "raises"
    PRUNING_TYPE = "unstructured"

    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")


def model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*(nn.Linear(16, 16) for _ in range(4)))


L1 = {"select": {"types": ["Linear"]}, "method": "l1_unstructured", "amount": 0.5}


def values(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("snapshot", ["disk", "none"])
def test_streamed_finalize_gives_what_memory_gives(snapshot: str) -> None:
    spec = {"version": 1, "rules": [L1, {**L1, "select": {"names": ["2"]}, "amount": 0.5}]}  # "2" pruned twice
    expected, got = model(), model()
    report_memory = prunespec.apply(expected, spec, finalize=True)
    report = prunespec.apply(got, spec, finalize=True, snapshot=snapshot)
    assert values(got).keys() == values(expected).keys()  # no weight_orig / weight_mask left
    assert all(torch.equal(a, b) for a, b in zip(values(got).values(), values(expected).values(), strict=True))
    assert report.tensors == report_memory.tensors
    assert report.tensors["2.weight"] == 0.75


def failing(snapshot: str, tmp: Path) -> tuple[nn.Module, dict[str, torch.Tensor], str]:
    registry = prunespec.load_methods(builtins_only=True)
    registry.add(MethodInfo.from_class(Raises, name="raises"))
    m = model()
    before = values(m)
    spec = {"version": 1, "rules": [L1, {"select": {"names": ["3"]}, "method": "raises", "amount": 0.3}]}
    with pytest.raises(prunespec.ApplyError) as caught:
        prunespec.apply(m, spec, finalize=True, snapshot=snapshot, methods=registry)
    return m, before, str(caught.value)


def test_disk_puts_everything_back_and_leaves_no_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    m, before, message = failing("disk", tmp_path)
    assert values(m).keys() == before.keys()
    assert all(torch.equal(before[k], v) for k, v in values(m).items())
    assert "left unchanged" in message
    assert not list(tmp_path.iterdir())


def test_none_says_which_tensors_stay_pruned(tmp_path: Path) -> None:
    m, before, message = failing("none", tmp_path)
    assert "3 tensors finalized before it stay pruned (snapshot: none), the first 0.weight" in message
    now = values(m)
    assert float((now["0.weight"] == 0).float().mean()) == 0.5  # pruned in place before the failure
    assert torch.equal(now["3.weight"], before["3.weight"])  # its last step failed: untouched


def test_an_unknown_snapshot_is_refused() -> None:
    with pytest.raises(ValueError, match="snapshot must be one of"):
        prunespec.apply(model(), {"version": 1, "rules": [L1]}, finalize=True, snapshot="cloud")


def test_a_data_aware_finalize_with_disk_gives_the_same() -> None:
    spec = {"version": 1, "rules": [{**L1, "method": "wanda", "amount": None, "sparsity": 0.5}]}
    data = [torch.randn(8, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    expected, got = model(), model()
    prunespec.apply(expected, spec, finalize=True, data=data)
    prunespec.apply(got, spec, finalize=True, data=data, snapshot="disk")
    assert all(torch.equal(a, b) for a, b in zip(values(got).values(), values(expected).values(), strict=True))


class RaisesWithData(prunespec.PruningMethod):
    name = "raises_with_data"
    statistics = ("input_sq_norms",)

    def score(self, ctx: object) -> torch.Tensor:
        raise RuntimeError("boom")


def data_aware_failure(snapshot: str) -> tuple[nn.Module, dict[str, torch.Tensor], str]:
    registry = prunespec.load_methods(builtins_only=True)
    registry.add(MethodInfo.from_class(RaisesWithData, name="raises_with_data"))
    m = model()
    before = values(m)
    sparsegpt = {"select": {"names": ["0", "1", "2"]}, "method": "sparsegpt", "sparsity": 0.5}
    spec = {
        "version": 1,
        "rules": [sparsegpt, {"select": {"names": ["3"]}, "method": "raises_with_data", "amount": 0.3}],
    }
    data = [torch.randn(32, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    with pytest.raises(prunespec.ApplyError) as caught:
        prunespec.apply(m, spec, finalize=True, snapshot=snapshot, methods=registry, data=data)
    return m, before, str(caught.value)


@pytest.mark.parametrize("snapshot", ["memory", "disk"])
def test_a_data_aware_failure_after_reconstructed_values_leaves_the_model_as_it_was(snapshot: str) -> None:
    m, before, _ = data_aware_failure(snapshot)  # sparsegpt changed 0-2's values before 3 failed
    assert values(m).keys() == before.keys()
    assert all(torch.equal(before[k], v) for k, v in values(m).items())


def test_a_data_aware_failure_with_none_says_what_stays_pruned() -> None:
    m, before, message = data_aware_failure("none")
    assert "3 tensors finalized before it stay pruned (snapshot: none), the first 0.weight" in message
    assert not torch.equal(values(m)["0.weight"], before["0.weight"])
    assert torch.equal(values(m)["3.weight"], before["3.weight"])


@pytest.mark.parametrize(("snapshot", "sequential"), [("memory", True), ("disk", True), ("disk", False)])
def test_a_data_aware_finalize_writes_each_tensor_at_its_stop_only_when_streamed(
    snapshot: str, sequential: bool
) -> None:
    """With disk (or none) and sequential calibration, a tensor is written in place at its module's stop,
    so its old values are never held beyond the file; with memory, or without sequential calibration
    (every module must compute with the weights it had), only at the end."""
    spec = {
        "version": 1,
        "rules": [{"select": {"types": ["Linear"]}, "method": "wanda", "sparsity": 0.5}],
        "calibration": {"sequential": sequential},
    }
    data = [torch.randn(8, 16, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    m = model()
    seen: list[float] = []

    def progress(done: int, total: int, what: str) -> None:
        seen.append(float((m[0].weight == 0).float().mean()))

    prunespec.apply(m, spec, finalize=True, data=data, snapshot=snapshot, progress=progress)
    streamed = snapshot != "memory" and sequential
    assert seen[1] == (0.5 if streamed else 0.0)  # at the second stop: the first written already?
    assert float((m[0].weight == 0).float().mean()) == 0.5


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (3, 5), (64, 9), (0,), (2, 0, 3)])
def test_memory_holds_each_final_mask_at_one_bit_an_entry(shape: tuple[int, ...]) -> None:
    from prunespec.masks import pack

    mask = torch.rand(shape, generator=torch.Generator().manual_seed(len(shape))) < 0.5
    packed = pack(mask)
    assert packed.bits.dtype == torch.uint8 and packed.bits.numel() == -(-mask.numel() // 8)
    assert torch.equal(packed.unpack(), mask)
    assert torch.equal(pack(mask.to(torch.float16)).unpack(torch.float16), mask.to(torch.float16))
    assert torch.equal(pack(mask.T if mask.dim() == 2 else mask).unpack(), mask.T if mask.dim() == 2 else mask)


def test_masks_packed_from_a_slab_are_the_same_and_never_overlap() -> None:
    from prunespec.masks import Slab, pack

    gen = torch.Generator().manual_seed(3)
    masks = [torch.rand(shape, generator=gen) > 0.5 for shape in [(7, 5), (64,), (3, 300), (1,), (40, 40)]]
    slab = Slab(chunk=64)  # a few masks a chunk; the 3 x 300 one is bigger than a chunk: its own buffer
    packed = [pack(m, slab) for m in masks]
    for m, p in zip(masks, packed, strict=True):
        assert torch.equal(p.bits, pack(m).bits) and torch.equal(p.unpack(), m)
    spans = sorted((p.bits.untyped_storage().data_ptr() + p.bits.storage_offset(), p.bits.numel()) for p in packed)
    assert all(start + size <= after for (start, size), (after, _) in itertools.pairwise(spans))
    assert len({p.bits.untyped_storage().data_ptr() for p in packed}) < len(packed)  # some share a chunk


@pytest.mark.parametrize(
    "dtype, size",
    [(torch.float32, 3 * (1 << 18) + 77), (torch.bfloat16, 1000), (torch.float64, 1 << 18)],
    ids=["float32-chunks", "bfloat16-small", "float64-one-chunk"],
)
def test_a_product_with_a_bool_mask_equals_torchs_in_place_or_not(dtype: torch.dtype, size: int) -> None:
    from prunespec.masks import product

    gen = torch.Generator().manual_seed(size)
    values = torch.randn(size, generator=gen).to(dtype).reshape(-1, 1 if size % 2 else 2)
    keep = torch.rand(values.shape, generator=gen) < 0.5
    expected = values * keep
    made = product(values, keep)
    assert made.dtype == dtype and torch.equal(made, expected) and made.data_ptr() != values.data_ptr()
    before = values.data_ptr()
    assert product(values, keep, out=values) is values and values.data_ptr() == before
    assert torch.equal(values, expected)
    # torch's own product where chunks do not apply: a float mask, a transposed (non-contiguous) one
    assert torch.equal(product(values, keep.to(dtype)), expected)
    if values.shape[1] > 1:
        assert torch.equal(product(values.T, keep.T), expected.T)


def test_an_unpacked_bool_mask_is_a_bool_view_of_its_bytes_and_equals_the_mask() -> None:
    from prunespec.masks import pack

    mask = torch.rand(37, 11, generator=torch.Generator().manual_seed(5)) < 0.3
    unpacked = pack(mask).unpack()
    assert unpacked.dtype == torch.bool and torch.equal(unpacked, mask)
    assert torch.equal(unpacked.logical_not(), ~mask) and int(unpacked.sum()) == int(mask.sum())
