"""torch's pruning layout on FSDP2 (``fully_shard``) models: DTensor parameters, masks sharded like them.

The checks run on spawned CPU ranks (tests/ranks.py, gloo) in tests/fsdp_workers.py, against torch's
own pruning of a single-process copy; see there for what each one does.
"""

from __future__ import annotations

import re

import pytest
import ranks
import torch
import torch.distributed as dist
from torch import nn

from prunespec import fsdp

if not dist.is_available():
    pytest.skip("torch built without torch.distributed", allow_module_level=True)

import fsdp_workers  # after the skip: it imports FSDP and DTensor (so rename below looks for FSDP's records)

STAGES = ["layout", "forward", "cache", "training", "undo", "finalize", "finalized_in_place"]


@pytest.mark.parametrize("world", [2, 4])
def test_pruned_fsdp_model_trains_finalizes_and_undoes_like_torchs_pruning(world: int) -> None:
    assert ranks.spawn(fsdp_workers.train_finalize_undo, world) == [STAGES] * world


def test_tied_weights_refusals_and_an_undone_install() -> None:
    expected = [
        "refuses a mask not sharded like its parameter, and a shrink",
        "undoes an install",
        "tied",
        "refuses while unsharded",
        "tied finalize",
    ]
    assert ranks.spawn(fsdp_workers.tied_and_refusals, 2) == [expected] * 2


def test_fsdp_records_torch_does_not_have_any_more_fail_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    def moved(module: nn.Module, name: str) -> None:
        raise AttributeError("'FSDPState' object has no attribute '_fsdp_param_groups'")

    monkeypatch.setattr(fsdp, "_records", moved)
    layer = nn.Linear(3, 2)
    fsdp.rename(layer, "weight", "weight_orig")  # not FSDP's: nothing to tell it
    monkeypatch.setattr(fsdp, "_is_fsdp_module", lambda module: True)
    with pytest.raises(RuntimeError, match=re.escape(f"torch {torch.__version__}")):
        fsdp.rename(layer, "weight", "weight_orig")
