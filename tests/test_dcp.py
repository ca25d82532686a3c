"""Sharded checkpoints (torch.distributed.checkpoint): saved on 2 ranks under FSDP2, loaded on 1 (a plain
model, no process group) and on 4; a checkpoint one process saved, loaded on 2; and loads that must fail
on every rank, leaving every rank's model as it was."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import dcp_workers
import dist_workers as dw
import pytest
import ranks
import torch
from conftest import ModelState

import prunespec

pytestmark = pytest.mark.skipif(not ranks.gloo_available(), reason="torch.distributed with gloo is not available")

NAMES = dcp_workers.NAMES


def single_process_hooks() -> dict[str, Any]:
    """Each spec's hook records when one process prunes the plain model."""
    out = {}
    for name in NAMES:
        model = dw.mlp()
        prunespec.apply(model, dw.SPECS[name])
        out[name] = dcp_workers.hooks(model)
    return out


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("dcp")


@pytest.fixture(scope="module")
def on_two(root: Path) -> list[dict[str, Any]]:
    """Every spec pruned and saved on 2 ranks; the checkpoint of one process loaded on 2."""
    plain = dw.mlp()
    prunespec.apply(plain, dw.SPECS["global_l1"])
    prunespec.save(plain, root / "plain", spec=dw.SPECS["global_l1"], format="dcp")
    dcp_workers.reference(plain, root / "plain.ref.pt")
    (root / "a_file").write_bytes(b"not a checkpoint")
    (root / "not_empty").mkdir()
    (root / "not_empty" / "notes.txt").write_text("someone's")
    return ranks.spawn(dcp_workers.save_on_two, 2, str(root), NAMES)


def check_loaded(result: dict[str, Any], expected_hooks: dict[str, Any], where: Any) -> None:
    assert result["keys"], where
    assert result["differ"] == [], where  # every weight_orig, mask and bias equal to the saved ones
    assert result["masks"] > 0 and result["masks_placed"], where  # DTensors when sharded, plain otherwise
    assert result["hooks"] == expected_hooks == result["saved_hooks"], where
    assert result["sparsity"], where


def test_saved_on_two_ranks(on_two: list[dict[str, Any]]) -> None:
    assert on_two[0] == on_two[1]  # every rank saw the same, errors included
    result = on_two[0]
    assert result["files"] == [".metadata", "__0_0.distcp", "__1_0.distcp", "prunespec.json"]
    refused = result["refused"]
    for label in ("file_name", "existing_file", "not_empty", "format_pt"):
        assert refused[label] is not None and refused[label][0] == "OutputError", label
    assert "pass a directory path" in refused["file_name"][1]
    assert "is a file" in refused["existing_file"][1]
    assert "not an earlier prunespec checkpoint" in refused["not_empty"][1]
    assert "format='dcp'" in refused["format_pt"][1]
    assert refused["spec_on_one_rank"] is not None and refused["spec_on_one_rank"][0] == "SpecError"
    # nothing written for a refused save, no temporary directory left behind
    assert result["left"] == sorted(
        ["a_file", "not_empty", "plain", "plain.ref.pt", *NAMES, *(f"{n}.ref.pt" for n in NAMES)]
    )


def test_one_process_checkpoint_loads_on_two(on_two: list[dict[str, Any]], root: Path) -> None:
    expected = torch.load(root / "plain.ref.pt", weights_only=True)["hooks"]
    for rank, result in enumerate(on_two):
        check_loaded(result["plain_on_two"], expected, rank)
        assert result["plain_on_two"]["spec"]


def test_load_on_one_process(on_two: list[dict[str, Any]], root: Path) -> None:
    """Into a plain model, without a process group."""
    assert not torch.distributed.is_initialized()
    expected = single_process_hooks()
    for name in NAMES:
        model = dcp_workers.fresh(False)
        spec = prunespec.load(model, root / name)
        check_loaded(dcp_workers.compare(model, root / f"{name}.ref.pt"), expected[name], name)
        assert spec is not None and spec.model_dump() == prunespec.load_spec(dw.SPECS[name]).model_dump()
        saved = prunespec.inspect(root / name)
        assert saved.spec is not None and saved.spec.model_dump() == spec.model_dump()
        assert set(saved.pruned) == set(expected[name])


@pytest.fixture(scope="module")
def broken(on_two: list[dict[str, Any]], root: Path) -> Path:
    """Checkpoints that must not load: without prunespec.json, empty, a mask holding 0.5."""
    shutil.copytree(root / "local_l1", root / "no_prunespec_json")
    (root / "no_prunespec_json" / "prunespec.json").unlink()
    (root / "empty").mkdir()
    model = dw.mlp()
    prunespec.apply(model, dw.SPECS["local_l1"])
    with torch.no_grad():
        model[0].weight_mask[0, 0] = 0.5
    prunespec.save(model, root / "bad_mask", format="dcp")
    return root


def test_load_on_four_ranks(broken: Path) -> None:
    results = ranks.spawn(dcp_workers.load_on_four, 4, str(broken), NAMES)
    expected = single_process_hooks()
    for rank, result in enumerate(results):
        for name in NAMES:
            check_loaded(result[name], expected[name], (rank, name))
            assert result[name]["spec"], (rank, name)
        for label, failed in result["failed"].items():
            assert failed["unchanged"], (rank, label)
            assert failed["error"] is not None and failed["error"][0] == "CheckpointError", (rank, label, failed)
    failed = results[0]["failed"]
    assert "no prunespec.json" in failed["no_prunespec_json"]["error"][1]
    assert "not a torch.distributed.checkpoint directory" in failed["empty_dir"]["error"][1]
    assert "not a torch.distributed.checkpoint directory" in failed["a_file"]["error"][1]
    assert "shape mismatch 0.bias (checkpoint [120], model [100])" in failed["other_shape"]["error"][1]
    assert "must hold only 0 and 1; it holds 0.5" in failed["bad_mask_on_one_rank"]["error"][1]
    assert "not a torch.distributed.checkpoint directory" in failed["bad_path_on_one_rank"]["error"][1]
    for result in results[1:]:  # the same error on every rank
        assert result["failed"] == {k: v | {"unchanged": True} for k, v in failed.items()}


def test_failed_loads_in_one_process(broken: Path) -> None:
    for path, message in [
        (broken / "bad_mask", "must hold only 0 and 1"),
        (broken / "no_prunespec_json", "no prunespec.json"),
    ]:
        model = dcp_workers.fresh(False)
        before = ModelState(model)
        with pytest.raises(prunespec.CheckpointError, match=message):
            prunespec.load(model, path)
        before.assert_unchanged(model)


class _Runs:
    """A pickle that would make a directory when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return os.mkdir, (str(self.marker),)


def test_metadata_runs_no_code(on_two: list[dict[str, Any]], root: Path, tmp_path: Path) -> None:
    """DCP's .metadata is a pickle: only its own classes are unpickled."""
    crafted = tmp_path / "crafted"
    shutil.copytree(root / "local_l1", crafted)
    marker = tmp_path / "ran"
    (crafted / ".metadata").write_bytes(pickle.dumps(_Runs(marker)))
    model = dcp_workers.fresh(False)
    with pytest.raises(prunespec.CheckpointError, match=r"posix\.mkdir is not part of a checkpoint's metadata"):
        prunespec.load(model, crafted)
    assert not marker.exists()


def test_plain_model_and_a_directory(tmp_path: Path) -> None:
    """Without format='dcp', a plain model is not saved into a directory; with it, it is."""
    model = dw.mlp()
    prunespec.apply(model, dw.SPECS["nm"])
    with pytest.raises(prunespec.PrunespecError, match="format='dcp'"):
        prunespec.save(model, tmp_path)
    prunespec.save(model, tmp_path / "ckpt", format="dcp")
    prunespec.save(model, tmp_path / "ckpt", format="dcp")  # an earlier checkpoint is replaced
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
