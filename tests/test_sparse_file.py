"""The sparse checkpoint format (``prunespec.save(..., format="sparse")``, ``prunespec export``): a
safetensors file with each pruned tensor's kept values and its mask as bits or N:M codes.

Round trips are bit-exact for unstructured, N:M and structured masks in fp32, fp16 and bf16, into the
pruned state and as finalized weights: masks and kept values bit for bit, zeros as +0.0 (the format
does not keep the sign of a zero, nor the original values under a mask). The encoding of each tensor is
the smallest; file sizes meet the issue's targets; hostile files are refused, naming the tensor, with
the model left as it was.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import EXAMPLES, SPECS, ModelState
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils import prune

import prunespec
from prunespec import layout, sparse_file
from prunespec.cli import main
from prunespec.errors import OutputError
from prunespec.record import CalibrationRecord

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
INT = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}


class MLP(nn.Module):
    """fc1 64x32 (2048 entries), fc2 48x64 (groups of 4 along its rows), fc3 10x48 (480 entries: its mask
    bits are padded to 512)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 48)
        self.fc3 = nn.Linear(48, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def mlp(seed: int = 0, dtype: torch.dtype = torch.float32) -> MLP:
    torch.manual_seed(seed)
    return MLP().to(dtype).eval()


def nm_mask(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` largest ``|w|`` of every ``m`` consecutive entries of each row."""
    groups = weight.detach().abs().float().reshape(-1, m)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(1, groups.topk(n, dim=1).indices, True)
    return keep.reshape(weight.shape).to(weight.dtype)


def prune_2_4(module: nn.Module) -> None:
    """A 2:4 mask built here, installed in torch's layout (with torch's Identity as its hook record)."""
    weight = module.get_parameter("weight")
    layout.install(module, "weight", nm_mask(weight, 2, 4), [prune.Identity()])


UNSTRUCTURED = {"select": {"types": ["Linear"]}, "method": "l1_unstructured", "amount": 0.5}
RANDOM = {"select": {"names": ["fc1"]}, "method": "random_unstructured", "amount": 0.2}
STRUCTURED = {"select": {"types": ["Linear"]}, "method": "ln_structured", "options": {"n": 2, "dim": 0}, "amount": 0.5}


def pruned(kind: str, dtype: torch.dtype, methods: prunespec.MethodRegistry) -> MLP:
    model = mlp(0, dtype)
    if kind == "unstructured":  # and a PruningContainer on fc1
        prunespec.apply(model, {"version": 1, "seed": 3, "rules": [UNSTRUCTURED, RANDOM]}, methods=methods)
    elif kind == "structured":
        prunespec.apply(model, {"version": 1, "rules": [STRUCTURED]}, methods=methods)
    else:
        for module in (model.fc1, model.fc2, model.fc3):
            prune_2_4(module)
    return model


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bits, as integers of its item size."""
    return t.detach().contiguous().view(INT[t.element_size()])


def canonical(t: torch.Tensor) -> torch.Tensor:
    """``t`` with every zero as +0.0: what the format keeps of a zero."""
    return torch.where(t == 0, torch.zeros_like(t), t.detach())


def assert_bits_equal(saved: torch.Tensor, loaded: torch.Tensor, what: str) -> None:
    __tracebackhide__ = True
    assert saved.dtype == loaded.dtype and saved.shape == loaded.shape, what
    assert torch.equal(bits(canonical(saved)), bits(loaded)), f"{what}: bits differ"


def inputs(dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(3, 32, generator=torch.Generator().manual_seed(1)).to(dtype)


def forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = model(x)
    return out


def linears(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, module) for name, module in model.named_modules() if isinstance(module, nn.Linear)]


# --- round trips ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("kind", ["unstructured", "nm", "structured"])
def test_round_trip_is_bit_exact_into_the_pruned_state_and_as_finalized_weights(
    kind: str, dtype: str, tmp_path: Path, methods: prunespec.MethodRegistry
) -> None:
    model = pruned(kind, DTYPES[dtype], methods)
    path = tmp_path / "model.safetensors"
    prunespec.save(model, path, format="sparse", methods=methods)
    expected = {"unstructured": "bitmask", "structured": "bitmask", "nm": "nm"}[kind]
    contents = sparse_file.contents(path)
    assert {contents[f"fc{i}.weight"]["encoding"] for i in (1, 2, 3)} == {expected}
    if kind == "nm":
        assert (contents["fc2.weight"]["n"], contents["fc2.weight"]["m"]) == (2, 4)

    fresh = mlp(1, DTYPES[dtype])
    prunespec.load(fresh, path, methods=methods)
    for (name, saved), (_, loaded) in zip(linears(model), linears(fresh), strict=True):
        mask, orig = saved.get_buffer("weight_mask"), saved.get_parameter("weight_orig")
        got_mask = loaded.get_buffer("weight_mask")
        assert torch.equal(got_mask, mask) and got_mask.dtype == mask.dtype, f"{name}: mask"
        kept = mask != 0
        got = loaded.get_parameter("weight_orig")
        assert torch.equal(bits(got)[kept], bits(orig)[kept]), f"{name}: kept values"
        assert bool((bits(got)[~kept] == 0).all()), f"{name}: not +0.0 under the mask"
        assert_bits_equal(orig * mask, got * loaded.get_buffer("weight_mask"), f"{name}: orig * mask")
        assert_bits_equal(saved.weight, loaded.weight, f"{name}.weight")
        assert_bits_equal(saved.bias, loaded.bias, f"{name}.bias")
        assert list(map(type, saved._forward_pre_hooks.values())) == list(map(type, loaded._forward_pre_hooks.values()))
    x = inputs(DTYPES[dtype])
    assert torch.equal(forward(fresh, x), forward(model, x))

    prunespec.finalize(model)
    prunespec.finalize(fresh)
    for key, value in model.state_dict().items():
        assert_bits_equal(value, fresh.state_dict()[key], f"finalized {key}")


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("kind", ["unstructured", "nm", "structured"])
def test_a_finalized_model_round_trips_as_plain_weights(
    kind: str, dtype: str, tmp_path: Path, methods: prunespec.MethodRegistry
) -> None:
    model = pruned(kind, DTYPES[dtype], methods)
    prunespec.finalize(model)
    path = tmp_path / "final.safetensors"
    prunespec.save(model, path, format="sparse", methods=methods)
    contents = sparse_file.contents(path)
    expected = "nm" if kind == "nm" else "bitmask"
    assert {contents[f"fc{i}.weight"]["encoding"] for i in (1, 2, 3)} == {expected}
    assert not any(entry.get("pruned") for entry in contents.values())

    fresh = mlp(1, DTYPES[dtype])
    prunespec.load(fresh, path, methods=methods)
    assert sorted(fresh.state_dict()) == sorted(model.state_dict())  # no masks: plain weights
    for key, value in model.state_dict().items():
        assert_bits_equal(value, fresh.state_dict()[key], key)
    assert not any(module._forward_pre_hooks for module in fresh.modules())


def test_a_dense_model_round_trips_and_is_a_plain_safetensors_file(tmp_path: Path) -> None:
    model = mlp(0)
    path = tmp_path / "dense.safetensors"
    prunespec.save(model, path, format="sparse")
    assert {entry["encoding"] for entry in sparse_file.contents(path).values()} == {"dense"}
    plain = load_file(path)  # any safetensors reader: the tensors under their own names
    for key, value in model.state_dict().items():
        assert torch.equal(bits(plain[key]), bits(value)), key
    fresh = mlp(1)
    prunespec.load(fresh, path)
    for key, value in model.state_dict().items():
        assert torch.equal(bits(fresh.state_dict()[key]), bits(value)), key  # bit for bit: no zeros to lose

    save_file(mlp(2).state_dict(), tmp_path / "theirs.safetensors")  # someone else's plain state_dict loads too
    prunespec.load(fresh, tmp_path / "theirs.safetensors")
    assert torch.equal(fresh.fc1.weight, mlp(2).fc1.weight)


def test_nm_plugin_masks_are_stored_as_nm_and_its_hooks_rebuilt(tmp_path: Path) -> None:
    methods = prunespec.load_methods()
    if "nm" not in methods:
        pytest.skip("the prunespec-nm plugin is not installed")
    model = mlp(0)
    spec = {"version": 1, "rules": [{"select": {"names": ["fc2"]}, "method": "nm", "options": {"n": 1, "m": 4}}]}
    prunespec.apply(model, spec, methods=methods)
    path = tmp_path / "nm.safetensors"
    prunespec.save(model, path, spec=spec, methods=methods, format="sparse")
    entry = sparse_file.contents(path)["fc2.weight"]
    assert (entry["encoding"], entry["n"], entry["m"]) == ("nm", 1, 4)
    assert entry["bytes"] == 48 * 16 * 4 + 48 * 16 * 2 // 8  # values + 2 bits a group of 4
    fresh = mlp(1)
    loaded = prunespec.load(fresh, path, methods=methods)
    assert loaded is not None and loaded.model_dump() == prunespec.load_spec(spec, methods=methods).model_dump()
    assert type(fresh.fc2._forward_pre_hooks[next(iter(fresh.fc2._forward_pre_hooks))]) is type(
        next(iter(model.fc2._forward_pre_hooks.values()))
    )
    assert torch.equal(fresh.fc2.weight, model.fc2.weight)


def test_tied_weights_are_stored_once_and_stay_tied(tmp_path: Path, methods: prunespec.MethodRegistry) -> None:
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    from tiny_transformers import tiny_gpt2

    model = tiny_gpt2()
    rules = [
        {"select": {"preset": "prunable"}, "method": "l1_unstructured", "amount": 0.6},
        {"select": {"names": ["lm_head"]}, "method": "l1_unstructured", "amount": 0.3},
    ]
    prunespec.apply(model, {"version": 1, "rules": rules}, methods=methods)
    path = tmp_path / "gpt2.safetensors"
    prunespec.save(model, path, spec={"version": 1, "rules": rules}, methods=methods, format="sparse")
    contents = sparse_file.contents(path)
    assert contents["lm_head.weight"] == {"same_as": "transformer.wte.weight", "bytes": 0}
    fresh = tiny_gpt2(seed=1)
    prunespec.load(fresh, path, methods=methods)
    assert fresh.lm_head.weight_orig is fresh.transformer.wte.weight_orig
    assert fresh.lm_head.weight_mask is fresh.transformer.wte.weight_mask
    x = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(fresh(x).logits, model(x).logits)


def test_the_spec_hooks_calibration_record_and_shrinks_come_back(
    tmp_path: Path, methods: prunespec.MethodRegistry
) -> None:
    pytest.importorskip("transformers")
    from tiny_transformers import tiny_gpt2

    model = tiny_gpt2()
    group = {"select": {"names": ["transformer.h.*.mlp"]}, "method": "l1_unstructured", "amount": 0.5}
    prunespec.apply(model, {"version": 1, "rules": [{**group, "group": {"unit": "channels"}}], "shrink": True})
    spec = {"version": 1, "rules": [{"select": {"preset": "prunable"}, "method": "l1_unstructured", "amount": 0.5}]}
    prunespec.apply(model, spec, methods=methods)
    record = CalibrationRecord(samples=2, tokens=24, sequential=False, fingerprint="ab" * 32)
    path = tmp_path / "shrunk.safetensors"
    prunespec.save(model, path, spec=spec, methods=methods, record=record, format="sparse")
    saved = prunespec.inspect(path, methods=methods)
    assert saved.spec is not None and saved.spec.model_dump() == prunespec.load_spec(spec, methods=methods).model_dump()
    assert saved.calibration == record
    assert set(saved.pruned) == {name for name, _, _, _ in layout.pruned_in(model)}
    fresh = tiny_gpt2(seed=1)  # the original architecture: the recorded shrink is replayed first
    prunespec.load(fresh, path, methods=methods)
    x = torch.randint(0, 128, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(fresh(x).logits, model(x).logits)


# --- encodings and sizes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_the_encoding_follows_the_break_even(dtype: str, tmp_path: Path) -> None:
    """Bitmask beats dense where ``(1 - s) * itemsize + 1/8 < itemsize``: at 1024 entries, more than
    1024 / (8 * itemsize) zeros."""
    torch_dtype = DTYPES[dtype]
    itemsize = torch_dtype.itemsize
    cut = 1024 // (8 * itemsize)  # exactly the break-even: a tie, which stays dense
    state = {}
    for zeros in (0, cut - 1, cut, cut + 1, 1000):
        t = torch.randn(1024, generator=torch.Generator().manual_seed(zeros)).add_(0.1).to(torch_dtype)
        t[torch.randperm(1024, generator=torch.Generator().manual_seed(1))[:zeros]] = 0
        state[f"zeros_{zeros}"] = t
    state["ints"] = torch.zeros(1024, dtype=torch.int64)  # not floating point: dense, whatever its zeros
    state["low_orig"], state["low_mask"] = torch.randn(1024).to(torch_dtype), torch.ones(1024, dtype=torch_dtype)
    path = tmp_path / "t.safetensors"
    encodings = sparse_file.write(path, state, {"format": 1})
    for zeros in (0, cut - 1, cut):
        assert encodings[f"zeros_{zeros}"] == "dense", zeros
    for zeros in (cut + 1, 1000):
        assert encodings[f"zeros_{zeros}"] == "bitmask", zeros
    assert encodings["ints"] == "dense"
    assert encodings["low"] == "bitmask"  # a pruned tensor always keeps its mask, even pruning nothing
    contents = sparse_file.contents(path)
    assert contents["zeros_1000"]["bytes"] == 1024 // 8 + 24 * itemsize
    loaded, _ = sparse_file.read(path)
    for key, value in state.items():
        assert torch.equal(bits(loaded[key]), bits(value)), key


def test_nm_is_chosen_only_where_it_is_smaller_and_exact(tmp_path: Path) -> None:
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    state = {
        "two_four": w * nm_mask(w, 2, 4),  # 3 bits a group of 4: nm
        "one_eight": w * nm_mask(w, 1, 8),  # 3 bits a group of 8
        "almost": w * nm_mask(w, 2, 4),  # one group with a third zero: no longer 2:4
    }
    state["almost"][0, :4] = torch.tensor([0.0, 0.0, 0.0, 1.0])
    encodings = sparse_file.write(tmp_path / "nm.safetensors", state, {})
    contents = sparse_file.contents(tmp_path / "nm.safetensors")
    assert encodings == {"two_four": "nm", "one_eight": "nm", "almost": "bitmask"}
    assert (contents["two_four"]["n"], contents["two_four"]["m"]) == (2, 4)
    assert (contents["one_eight"]["n"], contents["one_eight"]["m"]) == (1, 8)
    loaded, _ = sparse_file.read(tmp_path / "nm.safetensors")
    for key, value in state.items():
        assert torch.equal(bits(loaded[key]), bits(canonical(value))), key


@pytest.mark.parametrize(("sparsity", "target"), [(0.5, 0.55), (0.9, 0.15)])
def test_fp32_file_sizes_meet_the_targets(
    sparsity: float, target: float, tmp_path: Path, methods: prunespec.MethodRegistry
) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(256, 256, bias=False) for _ in range(3)))
    rule = {"select": {"types": ["Linear"]}, "method": "l1_unstructured", "sparsity": sparsity}
    prunespec.apply(model, {"version": 1, "rules": [rule]}, methods=methods)
    prunespec.save(model, tmp_path / "pruned.safetensors", format="sparse", methods=methods)
    prunespec.finalize(model)
    prunespec.save(model, tmp_path / "final.safetensors", format="sparse", methods=methods)
    torch.save(model.state_dict(), tmp_path / "dense.pt")
    dense = (tmp_path / "dense.pt").stat().st_size
    for name in ("pruned", "final"):
        ratio = (tmp_path / f"{name}.safetensors").stat().st_size / dense
        assert ratio <= target, (name, ratio)


# --- refused files ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """A sparse file of an MLP: fc1 l1 (bitmask), fc2 2:4 (nm), fc3 structured rows (bitmask, padded)."""
    methods = prunespec.load_methods(builtins_only=True)
    model = mlp(0)
    rules = [
        {"select": {"names": ["fc1"]}, "method": "l1_unstructured", "amount": 0.5},
        {"select": {"names": ["fc3"]}, "method": "ln_structured", "options": {"n": 2, "dim": 0}, "amount": 0.3},
    ]
    prunespec.apply(model, {"version": 1, "rules": rules}, methods=methods)
    prune_2_4(model.fc2)
    path = tmp_path_factory.mktemp("good") / "good.safetensors"
    prunespec.save(model, path, format="sparse", methods=methods)
    assert [sparse_file.contents(path)[f"fc{i}.weight"]["encoding"] for i in (1, 2, 3)] == ["bitmask", "nm", "bitmask"]
    return path.read_bytes()


Parts = tuple[dict[str, Any], dict[str, Any], bytearray]  # the safetensors table, prunespec's doc, the data


def rewrite(data: bytes, edit: Callable[[dict[str, Any], dict[str, Any], bytearray], Any]) -> bytes:
    """``data`` with its header and data edited in place by ``edit(table, doc, body)``; a string it
    returns replaces prunespec's metadata as written."""
    size = struct.unpack("<Q", data[:8])[0]
    table = json.loads(data[8 : 8 + size])
    body = bytearray(data[8 + size :])
    doc = json.loads(table["__metadata__"]["prunespec"])
    raw = edit(table, doc, body)
    table["__metadata__"]["prunespec"] = raw if isinstance(raw, str) else json.dumps(doc)
    header = json.dumps(table).encode()
    header += b" " * (-len(header) % 8)
    return struct.pack("<Q", len(header)) + header + bytes(body)


def at(table: dict[str, Any], name: str) -> int:
    start: int = table[name]["data_offsets"][0]
    return start


def entry(name: str, **changes: Any) -> Callable[..., None]:
    def edit(table: dict[str, Any], doc: dict[str, Any], body: bytearray) -> None:
        doc["tensors"][name].update(changes)

    return edit


def _flip_a_mask_bit(table: dict[str, Any], doc: dict[str, Any], body: bytearray) -> None:
    start = at(table, "fc1.weight:bits")
    byte = next(i for i in range(start, start + 256) if body[i] != 0xFF)
    body[byte] |= ~body[byte] & (body[byte] + 1) & 0xFF  # its lowest clear bit set: one more kept entry


def _padding_bit(table: dict[str, Any], doc: dict[str, Any], body: bytearray) -> None:
    body[at(table, "fc3.weight:bits") + 63] |= 0x80  # the last of 512 bits; fc3 has 480 entries


def _bad_nm_code(table: dict[str, Any], doc: dict[str, Any], body: bytearray) -> None:
    body[at(table, "fc2.weight:codes")] |= 0x07  # the first group's code is 7: C(4, 2) = 6 patterns


def _extra_tensor(table: dict[str, Any], doc: dict[str, Any], body: bytearray) -> None:
    table["extra"] = {"dtype": "F32", "shape": [1], "data_offsets": [len(body), len(body) + 4]}
    body.extend(b"\0\0\0\0")


def _renamed_tensor(table: dict[str, Any], doc: dict[str, Any], body: bytearray) -> None:
    table["fc1.weight:valuez"] = table.pop("fc1.weight:values")


def _hooks_for(name: str) -> Callable[..., None]:
    def edit(table: dict[str, Any], doc: dict[str, Any], body: bytearray) -> None:
        doc["checkpoint"]["hooks"][name] = [{"method": "l1_unstructured", "amount": 0.5, "options": {}}]

    return edit


def _doc(**changes: Any) -> Callable[..., None]:
    def edit(table: dict[str, Any], doc: dict[str, Any], body: bytearray) -> None:
        doc.update(changes)

    return edit


def _tensors(name: str, value: Any) -> Callable[..., None]:
    def edit(table: dict[str, Any], doc: dict[str, Any], body: bytearray) -> None:
        doc["tensors"][name] = value

    return edit


HOSTILE: dict[str, tuple[Callable[[bytes], bytes], str]] = {
    "truncated": (lambda data: data[:-5], "not a readable safetensors file"),
    "truncated header": (lambda data: data[:40], "not a readable safetensors file"),
    "shape lie": (lambda d: rewrite(d, entry("fc1.weight", shape=[64, 33])), "'fc1.weight:bits' is uint8 [256]"),
    "same-size shape lie": (lambda d: rewrite(d, entry("fc1.weight", shape=[32, 64])), "fc1.weight_orig"),
    "count lie": (lambda d: rewrite(d, entry("fc1.weight", kept=1025)), "'fc1.weight:values' is float32 [1024]"),
    "wrong popcount": (lambda d: rewrite(d, _flip_a_mask_bit), "its bits mark 1025 kept entries"),
    "padding bits": (lambda d: rewrite(d, _padding_bit), "padding after its 480 mask bits"),
    "nm code": (lambda d: rewrite(d, _bad_nm_code), "code 7 is no pattern of 2 in 4"),
    "nm n >= m": (lambda d: rewrite(d, entry("fc2.weight", n=4)), "expected 0 < n < m"),
    "unknown encoding": (lambda d: rewrite(d, entry("fc1.weight", encoding="rle")), "unknown encoding 'rle'"),
    "dense pruned": (lambda d: rewrite(d, entry("fc1.weight", encoding="dense")), "stored as bitmask or nm"),
    "unknown key": (lambda d: rewrite(d, entry("fc1.weight", order="F")), "unknown key 'order'"),
    "mask dtype": (lambda d: rewrite(d, entry("fc1.weight", mask_dtype="complex64")), "`mask_dtype` is 'complex64'"),
    "not JSON": (lambda d: rewrite(d, lambda t, doc, b: "{"), "not valid JSON"),
    "deep JSON": (lambda d: rewrite(d, lambda t, doc, b: "[" * 100_000), "not valid JSON"),
    "version": (lambda d: rewrite(d, _doc(version=2)), "sparse format version 2"),
    "format": (lambda d: rewrite(d, _doc(format="other")), "names format 'other'"),
    "extra tensor": (lambda d: rewrite(d, _extra_tensor), "holds tensor 'extra'"),
    "renamed tensor": (lambda d: rewrite(d, _renamed_tensor), "fc1.weight:valuez"),
    "bad tie": (lambda d: rewrite(d, _tensors("fc9.weight", {"same_as": "nope"})), "`same_as` is 'nope'"),
    "hooks of a dense tensor": (lambda d: rewrite(d, _hooks_for("fc1.bias")), "prunes no such tensor"),
    "spec not a mapping": (lambda d: rewrite(d, lambda t, doc, b: doc["checkpoint"].update(spec=[1])), "spec is"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_a_bad_file_is_refused_naming_what_is_wrong_and_the_model_is_untouched(
    case: str, good: bytes, tmp_path: Path, methods: prunespec.MethodRegistry
) -> None:
    damage, words = HOSTILE[case]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(damage(good))
    model = mlp(1)
    prunespec.apply(model, {"version": 1, "rules": [RANDOM]}, methods=methods)  # pruning of its own to keep
    before = ModelState(model)
    with pytest.raises(prunespec.CheckpointError) as info:
        prunespec.load(model, path, methods=methods)
    before.assert_unchanged(model)
    assert words in str(info.value), str(info.value)


def test_the_unedited_file_loads(good: bytes, tmp_path: Path, methods: prunespec.MethodRegistry) -> None:
    path = tmp_path / "good.safetensors"
    path.write_bytes(rewrite(good, lambda table, doc, body: None))  # the test's rewrite changes nothing else
    prunespec.load(mlp(1), path, methods=methods)


def test_a_file_that_decodes_to_more_than_the_model_can_need_is_refused(tmp_path: Path) -> None:
    sparse_file.write(tmp_path / "big.safetensors", {"weight": torch.zeros(1 << 19)}, {"format": 1})
    assert (tmp_path / "big.safetensors").stat().st_size < 70_000  # 2 MiB of zeros as 64 KiB of bits
    model = nn.Linear(2, 2)
    before = ModelState(model)
    with pytest.raises(prunespec.CheckpointError, match="decode to 2097152 bytes, more than"):
        prunespec.load(model, tmp_path / "big.safetensors")
    before.assert_unchanged(model)


def test_what_cannot_be_stored_is_refused_before_writing(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    with pytest.raises(OutputError, match=r"w_mask holds 0\.5"):
        sparse_file.write(path, {"w_orig": torch.ones(4), "w_mask": torch.tensor([1.0, 0.5, 0.0, 1.0])}, {})
    with pytest.raises(OutputError, match="complex64"):
        sparse_file.write(path, {"z": torch.zeros(2, dtype=torch.complex64)}, {})
    with pytest.raises(OutputError, match="stored as 'a:bits'"):
        sparse_file.write(path, {"a": torch.zeros(64), "a:bits": torch.ones(8)}, {})
    assert not path.exists()
    with pytest.raises(ValueError, match="format='zip'"):
        prunespec.save(mlp(0), path, format="zip")  # type: ignore[arg-type]


# --- command line ------------------------------------------------------------------------------------------


def test_cli_apply_out_safetensors_writes_the_sparse_format_and_export_converts_a_checkpoint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = f"{EXAMPLES / 'lenet.py'}:make_lenet"
    spec = SPECS / "every_layer_type.yaml"
    sparse, pt, exported = tmp_path / "a.safetensors", tmp_path / "a.pt", tmp_path / "b.safetensors"
    assert main(["apply", str(spec), "--model", model, "--out", str(sparse), "--builtins-only"]) == 0
    assert main(["apply", str(spec), "--model", model, "--out", str(pt), "--builtins-only"]) == 0
    assert sparse_file.is_safetensors(sparse) and not sparse_file.is_safetensors(pt)
    capsys.readouterr()
    assert main(["report", str(sparse), "--model", model, "--json"]) == 0
    from_sparse = json.loads(capsys.readouterr().out)
    assert main(["report", str(pt), "--model", model, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == from_sparse

    assert main(["export", str(pt), "--model", model, "--out", str(exported), "--json", "--builtins-only"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["out_bytes"] == exported.stat().st_size < summary["checkpoint_bytes"] / 1.5
    assert summary["encodings"]["fc1.weight"] == "bitmask"
    assert exported.read_bytes() == sparse.read_bytes()  # the same model, spec and hooks: the same file
    assert main(["export", str(pt), "--model", model, "--out", str(exported), "--builtins-only"]) == 0
    assert "Exported" in capsys.readouterr().out
