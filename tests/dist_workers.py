"""What each rank runs in tests/test_distributed.py (module level: pickled by reference into new processes)."""

from __future__ import annotations

import copy
import time
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

import prunespec
from prunespec.methods.base import MaskContext, MethodInfo, PruningMethod


def mlp(ties: bool = False) -> nn.Module:
    """The same small MLP on every rank (one layer's rows do not divide among 4 ranks)."""
    torch.manual_seed(0)
    # the first layer is large enough (19,200 entries) that selection brackets the cut from a sample
    model = nn.Sequential(nn.Linear(160, 120), nn.ReLU(), nn.Linear(120, 8), nn.ReLU(), nn.Linear(8, 5))
    if ties:  # a handful of distinct magnitudes: global cuts fall inside runs of tied entries
        with torch.no_grad():
            for p in model.parameters():
                p.copy_((p * 10).round() / 10)
    return model


def fsdp(model: nn.Module) -> nn.Module:
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def hsdp(model: nn.Module) -> nn.Module:
    """FSDP2 across 2 replicas of 2 shards (placements Replicate(), Shard(0)): each part is held twice."""
    mesh = init_device_mesh("cpu", (2, dist.get_world_size() // 2), mesh_dim_names=("replicate", "shard"))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def tensor_parallel(model: nn.Module, dim: int) -> nn.Module:
    """Every parameter a DTensor split along ``dim`` (biases along 0), without FSDP."""
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model:
        if isinstance(layer, nn.Linear):
            layer.weight = nn.Parameter(distribute_tensor(layer.weight.detach(), mesh, [Shard(dim)]))
            layer.bias = nn.Parameter(distribute_tensor(layer.bias.detach(), mesh, [Shard(0)]))
    return model


def masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every mask buffer, whole (a DTensor's gathered: only tests do that)."""
    out = {}
    for name, buffer in model.named_buffers():
        if name.endswith("_mask"):
            assert isinstance(buffer, DTensor), f"{name} is not a DTensor"
            out[name] = buffer.full_tensor()
    return out


def spec(rules: list[dict[str, Any]], seed: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"version": 1, "rules": rules}
    if seed is not None:
        out["seed"] = seed
    return out


LINEARS = {"types": ["Linear"]}
WEIGHTS = {"types": ["Linear"], "params": ["weight"]}
SPECS = {
    "local_l1": spec([{"select": LINEARS, "method": "l1_unstructured", "amount": 0.3}]),
    "global_l1": spec([{"select": LINEARS, "scope": "global", "method": "l1_unstructured", "amount": 0.5}]),
    "global_bounded": spec(
        [
            {
                "select": WEIGHTS,
                "scope": "global",
                "method": "l1_unstructured",
                "sparsity": 0.6,
                "max_sparsity": 0.7,
            }
        ]
    ),
    "ln_structured": spec(
        [{"select": WEIGHTS, "method": "ln_structured", "amount": 0.5, "options": {"n": 2, "dim": 0}}]
    ),
    "random": spec(
        [
            {"select": LINEARS, "method": "random_unstructured", "amount": 0.3},
            {"select": WEIGHTS, "method": "random_unstructured", "amount": 0.25},
        ],
        seed=7,
    ),
    "nm": spec([{"select": WEIGHTS, "method": "nm", "options": {"n": 2, "m": 4}}]),
    "iterative": spec(
        [
            {"select": WEIGHTS, "method": "l1_unstructured", "amount": 0.2},
            {"select": WEIGHTS, "method": "ln_structured", "amount": 1, "options": {"n": 1, "dim": 0}},
            {"select": LINEARS, "scope": "global", "method": "l1_unstructured", "sparsity": 0.5},
        ]
    ),
}


def same_masks(rank: int, world: int, names: list[str], layout: str) -> dict[str, Any]:
    """Each spec on a sharded model and on a plain copy: the masks and the report's zeros must agree."""
    results: dict[str, Any] = {}
    for name in names:
        ties = name.endswith("_ties")
        the_spec = SPECS[name.removesuffix("_ties")]
        reference = mlp(ties)
        sharded = copy.deepcopy(reference)
        if layout == "fsdp":
            sharded = fsdp(sharded)
        elif layout == "hsdp":
            sharded = hsdp(sharded)
        else:
            sharded = tensor_parallel(sharded, int(layout[-1]))
        want = prunespec.apply(reference, the_spec)
        got = prunespec.apply(sharded, the_spec)
        have = masks(sharded)
        expected = {n: b for n, b in reference.named_buffers() if n.endswith("_mask")}
        assert have.keys() == expected.keys(), (have.keys(), expected.keys())
        differ = [n for n in have if not torch.equal(have[n], expected[n])]
        zeros = {n: t.zeros for n, t in got.entries.items()}, {n: t.zeros for n, t in want.entries.items()}
        results[name] = {"differ": differ, "zeros_equal": zeros[0] == zeros[1], "sparsity": got.global_sparsity}
        again = prunespec.sparsity(sharded)
        results[name]["report_equal"] = again.to_dict() == prunespec.sparsity(reference).to_dict()
        # the effective weights too: torch's attribute, orig * mask, equal to the plain model's
        results[name]["weights"] = all(
            torch.equal(
                sharded_layer.weight.full_tensor(),  # type: ignore[operator]
                plain.weight,
            )
            for sharded_layer, plain in zip(sharded, reference, strict=True)
            if isinstance(plain, nn.Linear)
        )
    return results


class FailsOnRankOne(PruningMethod):
    """Scores like l1 everywhere but on rank 1, where it raises: a problem only one rank sees."""

    name = "fails_on_rank_one"
    shards: ClassVar[bool] = True

    def score(self, ctx: MaskContext) -> torch.Tensor:
        if dist.get_rank() == 1:
            raise RuntimeError("only rank 1 sees this")
        return ctx.values.abs()


def errors(rank: int, world: int) -> dict[str, Any]:
    """Errors are raised on every rank, as the same error, and leave every rank's model as it was."""
    out: dict[str, Any] = {}
    registry = prunespec.load_methods()
    registry.add(MethodInfo.from_class(FailsOnRankOne, name=FailsOnRankOne.name))
    model = fsdp(mlp())
    before = {k: v.to_local().clone() for k, v in model.state_dict().items()}
    for label, the_spec in {
        "one_rank": spec([{"select": WEIGHTS, "method": "fails_on_rank_one", "amount": 0.5}]),
        "data_aware": spec([{"select": WEIGHTS, "method": "wanda", "sparsity": 0.5}]),
        "too_much": spec([{"select": WEIGHTS, "method": "l1_unstructured", "amount": 500}]),
    }.items():
        try:
            prunespec.apply(model, the_spec, methods=registry)
        except prunespec.PrunespecError as exc:
            out[label] = (type(exc).__name__, str(exc))
        else:
            out[label] = None
    after = model.state_dict()
    out["unchanged"] = after.keys() == before.keys() and all(
        torch.equal(after[k].to_local(), before[k]) for k in before
    )
    return out


def rank_batches(rank: int, count: int = 3) -> list[torch.Tensor]:
    """This rank's own calibration batches (different on every rank)."""
    generator = torch.Generator().manual_seed(100 + rank)
    return [torch.randn(4, 160, generator=generator) for _ in range(count)]


WANDA = {
    "wanda_rows": {"method": "wanda", "sparsity": 0.5},
    "wanda_2_4": {"method": "wanda", "options": {"n": 2, "m": 4}},
    "wanda_tensor": {"method": "wanda", "sparsity": 0.6, "options": {"compare": "tensor"}},
}


def data_parallel(rank: int, world: int) -> dict[str, Any]:
    """Wanda with each rank's own batches equals one process's Wanda on all of them (in rank order)."""
    everyone = [b for r in range(world) for b in rank_batches(r)]
    out: dict[str, Any] = {}
    for label, rule in WANDA.items():
        the_spec = {"version": 1, "calibration": {"sequential": False}, "rules": [{"select": WEIGHTS, **rule}]}
        reference = mlp()
        sharded = fsdp(copy.deepcopy(reference))
        want = prunespec.apply(reference, the_spec, data=everyone)
        got = prunespec.apply(sharded, the_spec, data=rank_batches(rank))
        have = masks(sharded)
        expected = {n: b for n, b in reference.named_buffers() if n.endswith("_mask")}
        out[label] = {
            "differ": [n for n in expected if not torch.equal(have[n], expected[n])],
            "tokens": (got.calibration.tokens, want.calibration.tokens)
            if got.calibration and want.calibration
            else None,
            "sparsity": (got.global_sparsity, want.global_sparsity),
        }
    return out


GRADUAL = {
    "version": 1,
    "schedule": {"start": 0, "end": 4, "every": 1, "initial": 0.0, "curve": "cubic", "unit": "step"},
    "rules": [
        {"name": "weights", "select": WEIGHTS, "scope": "global", "method": "l1_unstructured", "sparsity": 0.8},
        {
            "name": "biases",
            "select": {"types": ["Linear"], "params": ["bias"]},
            "method": "l1_unstructured",
            "sparsity": 0.5,
        },
    ],
}


def training(rank: int, world: int) -> dict[str, Any]:
    """A gradual schedule during FSDP2 training with AdamW: the masks equal one process's at every step,
    and pruned weights stay exactly zero through forward, backward and optimizer steps."""
    reference = mlp()
    sharded = fsdp(copy.deepcopy(reference))
    models = {"one": reference, "fsdp": sharded}
    optimizers = {k: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1) for k, m in models.items()}
    schedulers = {k: prunespec.Scheduler(m, GRADUAL) for k, m in models.items()}
    generator = torch.Generator().manual_seed(5)  # the same batches on every rank: FSDP averages equal gradients
    out: dict[str, Any] = {"steps": []}
    for step in range(7):
        x, y = torch.randn(8, 160, generator=generator), torch.randn(8, 5, generator=generator)
        for key, model in models.items():
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            optimizers[key].step()
            optimizers[key].zero_grad()
            schedulers[key].step(step)
        have, want = masks(sharded), {n: b for n, b in reference.named_buffers() if n.endswith("_mask")}
        sharded(x)  # a forward: the masked weights as the model computes with them
        zero_kept = all(
            bool((layer.weight.full_tensor()[have[f"{i}.weight_mask"] == 0] == 0).all())  # type: ignore[operator]
            for i, layer in enumerate(sharded)
            if isinstance(layer, nn.Linear)
        )
        close = all(
            torch.allclose(s.weight_orig.full_tensor(), r.weight_orig, atol=1e-5)  # type: ignore[operator]
            for s, r in zip(sharded, reference, strict=True)
            if isinstance(r, nn.Linear)
        )
        out["steps"].append(
            {
                "differ": [n for n in want if not torch.equal(have[n], want[n])],
                "zeros_stay": zero_kept,
                "close": close,
                "sparsity": prunespec.sparsity(sharded).global_sparsity,
                "want": prunespec.sparsity(reference).global_sparsity,
            }
        )
    return out


def spec_on_one_rank(rank: int, world: int, folder: str) -> str | None:
    """A spec file that only rank 1 finds broken: a SpecError on every rank, not a hang."""
    from pathlib import Path

    path = Path(folder) / f"spec-{rank}.yaml"
    rule = "  - {select: {types: [Linear]}, method: l1_unstructured, amount: 0.5}"
    path.write_text("version: 1\nrules:\n" + (rule if rank == 0 else rule.replace("amount", "amout")) + "\n")
    try:
        prunespec.apply(fsdp(mlp()), path)
    except prunespec.PrunespecError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def finalized(rank: int, world: int, snapshot: str) -> dict[str, Any]:
    """``finalize: true`` on an FSDP2 model: the same Parameters, holding one process's pruned values."""
    the_spec = {**SPECS["global_l1"], "finalize": True}
    reference = mlp()
    sharded = fsdp(copy.deepcopy(reference))
    params = [id(p) for p in sharded.parameters()]
    prunespec.apply(reference, the_spec)
    prunespec.apply(sharded, the_spec, snapshot=snapshot)
    x = torch.randn(3, 160, generator=torch.Generator().manual_seed(1))
    return {
        "same_objects": {id(p) for p in sharded.parameters()} == set(params),  # (reordered, as torch does)
        "no_masks": not any(n.endswith("_mask") for n, _ in sharded.named_buffers()),
        "values": all(
            torch.equal(s.full_tensor(), r)  # type: ignore[operator]
            for s, r in zip(sharded.parameters(), reference.parameters(), strict=True)
        ),
        "forward": torch.allclose(sharded(x), reference(x), atol=1e-6),
    }


SPARSEGPT = {
    "sparsegpt_half": {"method": "sparsegpt", "sparsity": 0.5},
    "sparsegpt_2_4": {"method": "sparsegpt", "options": {"n": 2, "m": 4}},
}


def sparsegpt_data_parallel(rank: int, world: int) -> dict[str, Any]:
    """SparseGPT on FSDP2 with each rank's own batches, against one process on all of them (rank order):
    how many mask entries agree, how close the reconstructed ``weight_orig`` is, and the sparsity."""
    everyone = [b for r in range(world) for b in rank_batches(r)]
    out: dict[str, Any] = {}
    for label, rule in SPARSEGPT.items():
        the_spec = {"version": 1, "calibration": {"sequential": False}, "rules": [{"select": WEIGHTS, **rule}]}
        reference = mlp()
        sharded = fsdp(copy.deepcopy(reference))
        params = [layer.weight for layer in sharded if isinstance(layer, nn.Linear)]
        started = time.perf_counter()
        want = prunespec.apply(reference, the_spec, data=everyone)
        middle = time.perf_counter()
        got = prunespec.apply(sharded, the_spec, data=rank_batches(rank))
        ended = time.perf_counter()
        have = masks(sharded)
        expected = {n: b for n, b in reference.named_buffers() if n.endswith("_mask")}
        linears = [(s, r) for s, r in zip(sharded, reference, strict=True) if isinstance(r, nn.Linear)]
        origs = [(s.weight_orig.detach(), r.weight_orig.detach()) for s, r in linears]
        before = [layer.weight.detach() for layer in mlp() if isinstance(layer, nn.Linear)]
        sharded(everyone[0])  # a forward: pruned entries of the weight the model computes with are zeros
        out[label] = {
            "agree": {n: float((have[n] == expected[n]).double().mean()) for n in expected},
            "entries": sum(t.numel() for t in expected.values()),
            "differ": sum(int((have[n] != expected[n]).sum()) for n in expected),
            "dtensors": all(isinstance(s, DTensor) for s, _ in origs),
            "same_parameters": all(s.weight_orig is p for (s, _), p in zip(linears, params, strict=True)),
            "close": all(
                torch.allclose(s.full_tensor(), r, rtol=1e-3, atol=1e-5)  # type: ignore[operator]
                for s, r in origs
            ),
            "worst": max(float((s.full_tensor() - r).abs().max()) for s, r in origs),  # type: ignore[operator]
            "moved": all(not torch.equal(s.full_tensor(), b) for (s, _), b in zip(origs, before, strict=True)),
            "zeros_stay": all(
                bool((s.weight.full_tensor()[have[f"{i}.weight_mask"] == 0] == 0).all())  # type: ignore[operator]
                for i, s in enumerate(sharded)
                if isinstance(s, nn.Linear)
            ),
            "sparsity": (got.global_sparsity, want.global_sparsity),
            "report_equal": prunespec.sparsity(sharded).to_dict() == prunespec.sparsity(reference).to_dict(),
            "seconds": (middle - started, ended - middle),
        }
    # finalized at once (each snapshot way): the Parameter holds the reconstructed, masked values in place
    rule = {"select": WEIGHTS, **SPARSEGPT["sparsegpt_half"]}
    the_spec = {"version": 1, "calibration": {"sequential": False}, "finalize": True, "rules": [rule]}
    reference = mlp()
    prunespec.apply(reference, the_spec, data=everyone)
    for snapshot in ("memory", "disk"):
        sharded = fsdp(mlp())
        prunespec.apply(sharded, the_spec, data=rank_batches(rank), snapshot=snapshot)
        out[f"finalized_{snapshot}"] = all(
            torch.allclose(s.weight.detach().full_tensor(), r.weight, rtol=1e-3, atol=1e-5)
            and not any(n.endswith("_mask") for n, _ in s.named_buffers())
            for s, r in zip(sharded, reference, strict=True)
            if isinstance(r, nn.Linear)
        )
    return out


def sparsegpt_parts(rank: int, world: int) -> dict[str, Any]:
    """The pieces of SparseGPT across ranks. The Hessian summed over ranks (each rank's batches, then
    the ranks in float64) is the same on every rank and close to one process's, while Wanda's norms
    stay exact. The per-block selection across ranks picks the entries one process picks, ties included
    (in row-major order of the whole block), also where a rank holds no rows and where the block is
    large enough to be bracketed from a sample. Rows split across ranks are refused."""
    from torch.distributed.tensor import Shard

    from prunespec import calibration
    from prunespec.distributed import Sharding
    from prunespec.methods import sparsegpt

    names = {"input_gram", "input_sq_norms"}
    reference = mlp()
    sharded = fsdp(copy.deepcopy(reference))
    everyone = [b for r in range(world) for b in rank_batches(r)]
    want = calibration.collect(reference, {"2": reference[2]}, names, everyone, "test")["2"]
    got = calibration.collect_across_ranks(sharded, {"2": sharded[2]}, lambda _: names, rank_batches(rank), "test")
    have = got[0]["2"]
    out: dict[str, Any] = {
        "gram": have["input_gram"].tolist(),  # compared across ranks by the test (a list: tensors do not travel well)
        "gram_dtype": have["input_gram"].dtype == torch.float32,
        "gram_close": torch.allclose(have["input_gram"], want["input_gram"], rtol=1e-5, atol=1e-5),
        "gram_error": float((have["input_gram"] - want["input_gram"]).abs().max() / want["input_gram"].abs().max()),
        "norms_exact": torch.equal(have["input_sq_norms"], want["input_sq_norms"]),
    }
    generator = torch.Generator().manual_seed(3)
    for label, rows, width, splits in (
        ("small", 10, 6, [6, 4]),
        ("empty_rank", 7, 5, [7, 0]),
        ("large", 300, 128, [151, 149]),
    ):
        scores = torch.randint(0, 5, (rows, width), generator=generator).float()  # many ties
        done = torch.rand(rows, width, generator=generator) < 0.2
        count = int((~done).sum()) // 2 + 1
        want = sparsegpt._select_block(scores, done, count, 0) | done
        start = sum(splits[:rank])
        local_rows = splits[rank] if rank < len(splits) else 0
        part = Sharding((rows, width), (local_rows, width), (start, 0), True, None, (Shard(0),))
        left = [int((~done).sum())]
        select = sparsegpt._AcrossRanks(part, left)
        chosen = select(scores[start : start + local_rows], done[start : start + local_rows], count, 0)
        out[label] = torch.equal(chosen | done[start : start + local_rows], want[start : start + local_rows])
    # a weight only one rank's part of which cannot be reconstructed: the same error on every rank, and
    # every rank's model as it was
    broken = fsdp(mlp())
    if rank == 1:
        with torch.no_grad():
            broken[0].weight.to_local()[0, 0] = float("inf")
    before = {k: v.to_local().clone() for k, v in broken.state_dict().items()}
    the_spec = {
        "version": 1,
        "calibration": {"sequential": False},
        "rules": [{"select": WEIGHTS, **SPARSEGPT["sparsegpt_half"]}],
    }
    try:
        prunespec.apply(broken, the_spec, data=rank_batches(rank))
    except prunespec.ApplyError as exc:
        out["one_rank_fails"] = "inf or NaN" in str(exc)
    else:
        out["one_rank_fails"] = False
    after = broken.state_dict()
    out["unchanged"] = after.keys() == before.keys() and all(
        torch.equal(after[k].to_local(), before[k]) for k in before
    )
    # rows split across ranks (a Linear split along its inputs): refused when planned, on every rank
    the_spec = {
        "version": 1,
        "calibration": {"sequential": False},
        "rules": [{"select": WEIGHTS, **SPARSEGPT["sparsegpt_half"]}],
    }
    try:
        prunespec.plan(tensor_parallel(mlp(), 1), the_spec)
    except prunespec.PlanError as exc:
        out["split_rows_refused"] = "rows must lie whole on one rank" in str(exc)
    else:
        out["split_rows_refused"] = False
    return out


SEQUENTIAL = {
    "wanda_rows": [{"method": "wanda", "sparsity": 0.5}],
    "wanda_2_4": [{"method": "wanda", "options": {"n": 2, "m": 4}}],
    # l1's masks, computed first and not yet installed, are what the passes compute with too
    "l1_then_wanda": [{"method": "l1_unstructured", "amount": 0.2}, {"method": "wanda", "sparsity": 0.5}],
}


def forwards(model: nn.Module) -> list[int]:
    """A counter of the model's forwards (the list's length), kept by a hook."""
    calls: list[int] = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


def sequential_data_parallel(rank: int, world: int) -> dict[str, Any]:
    """Sequential Wanda on FSDP2, each rank its own batches, against one process's sequential Wanda on
    all of them (rank order); and one process's non-sequential masks, which must differ somewhere."""
    import time

    everyone = [b for r in range(world) for b in rank_batches(r)]
    out: dict[str, Any] = {}
    for label, rules in SEQUENTIAL.items():
        the_spec = {"version": 1, "rules": [{"select": WEIGHTS, **rule} for rule in rules]}
        reference, plain = mlp(), mlp()
        sharded = fsdp(copy.deepcopy(reference))
        calls = forwards(sharded)
        start = time.perf_counter()
        want = prunespec.apply(reference, the_spec, data=everyone)
        middle = time.perf_counter()
        got = prunespec.apply(sharded, the_spec, data=rank_batches(rank))
        end = time.perf_counter()
        prunespec.apply(plain, {**the_spec, "calibration": {"sequential": False}}, data=everyone)
        have = masks(sharded)
        expected = {n: b for n, b in reference.named_buffers() if n.endswith("_mask")}
        dense = {n: b for n, b in plain.named_buffers() if n.endswith("_mask")}
        out[label] = {
            "differ": [n for n in expected if not torch.equal(have[n], expected[n])],
            "sequential_matters": [n for n in expected if not torch.equal(dense[n], expected[n])],
            "tokens": (got.calibration.tokens, want.calibration.tokens)
            if got.calibration and want.calibration
            else None,
            "sparsity": (got.global_sparsity, want.global_sparsity),
            "origs": all(  # calibration pruned the parts in place, then restored them
                torch.equal(s.weight_orig.full_tensor(), r.weight_orig)  # type: ignore[operator]
                for s, r in zip(sharded, reference, strict=True)
                if isinstance(r, nn.Linear)
            ),
            "forwards": len(calls),
            "seconds": (middle - start, end - middle),
        }
    return out


class Boom(Exception):
    pass


def sequential_fails(rank: int, world: int) -> dict[str, Any]:
    """A batch failing on every rank in the second pass (the first layer's parts pruned in place): a
    CalibrationError on every rank, and the model exactly as it was (values, training flags, hooks)."""
    reference = mlp()
    model = fsdp(copy.deepcopy(reference))
    model.train()
    calls = [0]

    def fail_late(*_: Any) -> None:
        calls[0] += 1
        if calls[0] == 4:  # 3 batches a pass: pass 2's first batch
            raise Boom("the fourth call fails")

    model[2].register_forward_pre_hook(fail_late)
    before = {k: v.to_local().clone() for k, v in model.state_dict().items()}
    hooks = sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())
    error = None
    try:
        prunespec.apply(
            model,
            {"version": 1, "rules": [{"select": WEIGHTS, "method": "wanda", "sparsity": 0.5}]},
            data=rank_batches(rank),
        )
    except prunespec.PrunespecError as exc:
        error = (type(exc).__name__, str(exc))
    after, ran = model.state_dict(), calls[0]
    x = torch.randn(3, 160, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        same_forward = torch.equal(model(x), reference(x))
    return {
        "error": error,
        "calls": ran,
        "unchanged": after.keys() == before.keys() and all(torch.equal(after[k].to_local(), before[k]) for k in before),
        "no_masks": not any(n.endswith("_mask") for n, _ in model.named_buffers()),
        "training": all(m.training for m in model.modules()),
        "hooks": sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()) == hooks,
        "forward": same_forward,
    }


def tiny_llama() -> nn.Module:
    from tiny_transformers import tiny_llama as example  # examples/: a 2-layer Llama with GQA

    return example(0)


def llama_batches(rank: int, count: int = 2) -> list[dict[str, torch.Tensor]]:
    """This rank's batches of token ids, some rows padded at the end (attention_mask 0 there)."""
    generator = torch.Generator().manual_seed(200 + rank)
    out = []
    for i in range(count):
        ids = torch.randint(0, 128, (2, 10), generator=generator)
        mask = torch.ones(2, 10, dtype=torch.long)
        mask[1, 6 + i + rank :] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


LLAMA_RULE = {"select": {"names": ["model.layers.**"], "types": ["Linear"], "params": ["weight"]}, "method": "wanda"}


def sequential_llama(rank: int, world: int) -> dict[str, Any]:
    """Sequential Wanda on a tiny Llama, each decoder layer and the root under FSDP2, padded batches:
    against one process's on every rank's batches (rank order)."""
    import time

    everyone = [b for r in range(world) for b in llama_batches(r)]
    out: dict[str, Any] = {}
    for label, extra in {
        "rows": {"sparsity": 0.5}
    }.items():  # 2:4 is tested on the MLP; one rule keeps this spawn short
        the_spec = {"version": 1, "rules": [{**LLAMA_RULE, **extra}]}
        reference = tiny_llama()
        sharded = copy.deepcopy(reference)
        for layer in sharded.model.layers:  # type: ignore[union-attr]
            fully_shard(layer)
        fully_shard(sharded)
        calls = forwards(sharded)
        start = time.perf_counter()
        want = prunespec.apply(reference, the_spec, data=everyone)
        middle = time.perf_counter()
        got = prunespec.apply(sharded, the_spec, data=llama_batches(rank))
        end = time.perf_counter()
        plain = tiny_llama()
        prunespec.apply(plain, {**the_spec, "calibration": {"sequential": False}}, data=everyone)
        have = masks(sharded)
        expected = {n: b for n, b in reference.named_buffers() if n.endswith("_mask")}
        dense = {n: b for n, b in plain.named_buffers() if n.endswith("_mask")}
        out[label] = {
            "masks": len(expected),
            "sequential_matters": [n for n in expected if not torch.equal(dense[n], expected[n])],
            "differ": [n for n in expected if not torch.equal(have[n], expected[n])],
            "agree": min(float((have[n] == expected[n]).double().mean()) for n in expected),
            "tokens": (got.calibration.tokens, want.calibration.tokens)
            if got.calibration and want.calibration
            else None,
            "forwards": len(calls),
            "seconds": (middle - start, end - middle),
        }
    return out


def wanda_after_l1(rank: int, world: int) -> dict[str, Any]:
    """Wanda on an FSDP2 model that already has masks (an earlier apply): one process's masks."""
    first = spec([{"select": WEIGHTS, "method": "l1_unstructured", "amount": 0.2}])
    then = {
        "version": 1,
        "calibration": {"sequential": False},
        "rules": [{"select": WEIGHTS, "method": "wanda", "sparsity": 0.5}],
    }
    reference = mlp()
    sharded = fsdp(copy.deepcopy(reference))
    everyone = [b for r in range(world) for b in rank_batches(r)]
    for model, data in ((reference, everyone), (sharded, rank_batches(rank))):
        prunespec.apply(model, first)
        prunespec.apply(model, then, data=data)
    have = masks(sharded)
    want = {n: b for n, b in reference.named_buffers() if n.endswith("_mask")}
    return {"differ": [n for n in want if not torch.equal(have[n], want[n])], "masks": len(want)}
