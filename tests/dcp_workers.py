"""What each rank runs in tests/test_dcp.py (module level: pickled by reference into new processes).

Workers return plain data only (tensors sent back through the queue of a rank that has exited are lost).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dist_workers as dw
import torch
from torch import nn
from torch.distributed.tensor import DTensor

import prunespec
from prunespec import layout

NAMES = list(dw.SPECS)


def scrambled(model: nn.Module) -> nn.Module:
    """``model`` with other values than :func:`dist_workers.mlp`'s, so that a load that left a value
    as it was shows."""
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-3.0).add_(0.25)
    return model


def fresh(sharded: bool, model: nn.Module | None = None) -> nn.Module:
    """A freshly built model (the MLP, scrambled), FSDP2-sharded or plain."""
    model = scrambled(dw.mlp()) if model is None else model
    return dw.fsdp(model) if sharded else model


def full(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state_dict, every DTensor gathered whole (collective: every rank calls it)."""
    return {k: v.full_tensor() if isinstance(v, DTensor) else v.detach().clone() for k, v in model.state_dict().items()}


def hooks(model: nn.Module) -> dict[str, list[list[Any]]]:
    """Per pruned tensor: the class and amount of each method record in its hook."""
    return {
        name: [[type(m).__name__, getattr(m, "amount", None)] for m in layout.methods_of(hook)]
        for name, _, _, hook in layout.pruned_in(model)
    }


def reference(model: nn.Module, path: Path) -> None:
    """What a load of this model's checkpoint must give (rank 0 writes it; every rank calls this)."""
    state, report = full(model), prunespec.sparsity(model).to_dict()
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        torch.save({"state": state, "sparsity": report, "hooks": hooks(model)}, path)


def compare(model: nn.Module, ref_path: Path) -> dict[str, Any]:
    """A loaded model against the saved one's reference."""
    ref = torch.load(ref_path, weights_only=True)
    got = full(model)
    masks = [b for n, b in model.named_buffers() if n.endswith("_mask")]
    sharded = any(isinstance(p, DTensor) for p in model.parameters())
    return {
        "keys": sorted(got) == sorted(ref["state"]),
        "differ": [k for k in ref["state"] if k not in got or not torch.equal(got[k], ref["state"][k])],
        "masks": len(masks),
        "masks_placed": all(isinstance(m, DTensor) == sharded for m in masks),
        "hooks": hooks(model),
        "saved_hooks": ref["hooks"],
        "sparsity": prunespec.sparsity(model).to_dict() == ref["sparsity"],
    }


def error(call: Callable[[], Any]) -> list[str] | None:
    try:
        call()
    except prunespec.PrunespecError as exc:
        return [type(exc).__name__, str(exc)]
    return None


class Fingerprint:
    """What a failed load must leave as it was: the objects, hooks and each rank's values."""

    def __init__(self, model: nn.Module) -> None:
        self.objects = self._objects(model)
        self.values = {k: _local(v).clone() for k, v in model.state_dict().items()}

    @staticmethod
    def _objects(model: nn.Module) -> list[Any]:
        return [
            [(n, id(p)) for n, p in model.named_parameters()],
            [(n, id(b)) for n, b in model.named_buffers()],
            [(list(m._forward_pre_hooks.items()), list(m._forward_hooks.items())) for m in model.modules()],
            [sorted(m.__dict__) for m in model.modules()],
        ]

    def same(self, model: nn.Module) -> bool:
        values = {k: _local(v) for k, v in model.state_dict().items()}
        return (
            self._objects(model) == self.objects
            and values.keys() == self.values.keys()
            and all(torch.equal(values[k], v) for k, v in self.values.items())
        )


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def failed_load(sharded: bool, path: Path, model: nn.Module | None = None) -> dict[str, Any]:
    """A load that must fail: its error, and whether the model was left as it was."""
    model = fresh(sharded, model)
    before = Fingerprint(model)
    return {"error": error(lambda: prunespec.load(model, path)), "unchanged": before.same(model)}


def save_on_two(rank: int, world: int, root: str, names: list[str]) -> dict[str, Any]:
    """Prune with each spec under FSDP2 and save; saves that must be refused; a checkpoint that one
    process saved, loaded here."""
    base = Path(root)
    out: dict[str, Any] = {}
    model = dw.fsdp(dw.mlp())
    for name in names:
        model = dw.fsdp(dw.mlp())
        prunespec.apply(model, dw.SPECS[name])
        prunespec.save(model, base / name, spec=dw.SPECS[name])
        reference(model, base / f"{name}.ref.pt")
    out["files"] = sorted(os.listdir(base / names[0]))
    bad_spec = dw.SPECS["local_l1"] if rank == 0 else {"version": 1, "rules": "not a list"}
    out["refused"] = {
        label: error(lambda p=p, kw=kw: prunespec.save(model, base / p, **kw))
        for label, (p, kw) in {
            "file_name": ("model.pt", {}),
            "existing_file": ("a_file", {}),
            "not_empty": ("not_empty", {}),
            "format_pt": ("as_pt", {"format": "pt"}),
            "spec_on_one_rank": ("bad_spec", {"spec": bad_spec}),
        }.items()
    }
    torch.distributed.barrier()
    out["left"] = sorted(os.listdir(base))
    loaded = fresh(True)
    spec = prunespec.load(loaded, base / "plain")
    out["plain_on_two"] = compare(loaded, base / "plain.ref.pt") | {"spec": spec is not None}
    return out


def load_on_four(rank: int, world: int, root: str, names: list[str]) -> dict[str, Any]:
    """Load each checkpoint saved on two ranks; loads that must fail, on every rank."""
    base = Path(root)
    out: dict[str, Any] = {}
    for name in names:
        model = fresh(True)
        spec = prunespec.load(model, base / name)
        out[name] = compare(model, base / f"{name}.ref.pt")
        out[name]["spec"] = spec is not None and spec.model_dump() == prunespec.load_spec(dw.SPECS[name]).model_dump()
    torch.manual_seed(0)
    narrower = nn.Sequential(nn.Linear(160, 100), nn.ReLU(), nn.Linear(100, 8), nn.ReLU(), nn.Linear(8, 5))
    out["failed"] = {
        "no_prunespec_json": failed_load(True, base / "no_prunespec_json"),
        "empty_dir": failed_load(True, base / "empty"),
        "a_file": failed_load(True, base / "local_l1.ref.pt"),
        "other_shape": failed_load(True, base / "local_l1", narrower),
        # 0.5 in row 0 of 0.weight_mask: only rank 0 reads it, after DCP's read; every rank must undo
        "bad_mask_on_one_rank": failed_load(True, base / "bad_mask"),
        # rank 1 fails before reading; rank 0 gets as far as the read and must undo
        "bad_path_on_one_rank": failed_load(True, base / ("local_l1" if rank == 0 else "empty")),
    }
    return out
