"""The method contract: capabilities declared on the class, the context a method sees, units."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import prunespec
import prunespec.testing
from prunespec.methods.base import MethodInfo
from prunespec.plugins import MethodRegistry
from prunespec.testing import check_method, registered_methods, synthetic_statistics

SEEN: list[prunespec.MaskContext] = []


class Recorder(prunespec.PruningMethod):
    """Prunes by |w|, remembering what it was shown."""

    name = "recorder"

    def score(self, ctx: prunespec.MaskContext) -> torch.Tensor:
        SEEN.append(ctx)
        return ctx.values.abs()


def registry(*methods: type) -> MethodRegistry:
    reg = prunespec.load_methods(builtins_only=True)
    for method in methods:
        reg.add(MethodInfo.from_class(method))
    return reg


def test_a_method_sees_the_module_its_name_the_mask_so_far_and_its_options() -> None:
    SEEN.clear()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    spec = {
        "version": 1,
        "rules": [
            {"select": {"names": ["2"]}, "method": "l1_unstructured", "amount": 3},
            {"select": {"names": ["2"]}, "method": "recorder", "amount": 2},
        ],
    }
    prunespec.apply(model, spec, methods=registry(Recorder))
    (ctx,) = SEEN
    assert (ctx.name, ctx.module_name, ctx.param) == ("2.weight", "2", "weight")
    assert ctx.module is model[2]
    assert ctx.values is not None and torch.equal(ctx.values, model[2].weight_orig)
    assert ctx.mask is not None and int((ctx.mask == 0).sum()) == 3  # the earlier rule's mask
    assert torch.equal(ctx.masked, model[2].weight_orig * ctx.mask)
    assert int((model[2].weight_mask == 0).sum()) == 5  # the 2 lowest of what was left, on top


def test_capabilities_are_read_from_the_class() -> None:
    builtins = prunespec.load_methods(builtins_only=True)
    l1, ln, rnd, ident = (
        builtins[n].capabilities for n in ("l1_unstructured", "ln_structured", "random_unstructured", "identity")
    )
    assert (l1.unit, l1.scores, l1.elementwise, l1.supports_global) == ("entries", True, True, True)
    assert (ln.granularity, ln.unit, ln.scores, ln.elementwise) == ("structured", "channels", True, False)
    assert (rnd.scores, rnd.supports_global) == (False, True)  # global through torch's concatenation
    assert (ident.granularity, ident.takes_amount, ident.supports_global) == ("self-directed", False, False)
    assert Recorder.capabilities().scores and not Recorder.capabilities().elementwise


def test_builtins_install_torchs_own_hook_classes() -> None:
    model = nn.Sequential(nn.Linear(4, 6))
    prunespec.apply(
        model,
        {
            "version": 1,
            "rules": [
                {"select": {"types": ["Linear"]}, "method": "ln_structured", "amount": 2, "options": {"n": 1, "dim": 0}}
            ],
        },
    )
    (hook,) = model[0]._forward_pre_hooks.values()
    assert type(hook) is prune.LnStructured and (hook.amount, hook.n, hook.dim) == (2, 1, 0)


def test_register_takes_only_its_typed_keywords() -> None:
    class Plugin:
        @prunespec.hookimpl
        def prunespec_register_methods(self, register: Any) -> None:
            register(prune.L1Unstructured, name="my_l1", importance=torch.abs)

    with pytest.raises(TypeError, match="importance"):
        registered_methods(Plugin())


def test_a_per_tensor_score_of_the_wrong_shape_is_an_apply_error_naming_the_tensor() -> None:
    class Flat(prunespec.PruningMethod):
        name = "flat"

        def score(self, ctx: prunespec.MaskContext) -> torch.Tensor:
            return ctx.values.reshape(-1)

    model = nn.Sequential(nn.Linear(4, 6))
    spec = {"version": 1, "rules": [{"select": {"types": ["Linear"]}, "method": "flat", "amount": 0.5}]}
    with pytest.raises(
        prunespec.ApplyError, match=r"tensor 0\.weight: flat gave scores of shape \[24\], expected \[6, 4\]"
    ):
        prunespec.apply(model, spec, methods=registry(Flat))
    assert not prune.is_pruned(model)


# --- check_method on data-aware methods and methods that update values ------------------------------


def test_synthetic_statistics_cover_every_statistic_prunespec_collects() -> None:
    made = synthetic_statistics(12, seed=3)
    assert set(made) == set(prunespec.STATISTICS)
    gram, sq_norms = made["input_gram"], made["input_sq_norms"]
    assert gram.shape == (12, 12) and gram.dtype == torch.float32 and torch.equal(gram, gram.T)
    assert float(torch.linalg.eigvalsh(gram.double()).min()) > 0  # positive definite
    assert sq_norms.shape == (12,) and torch.equal(sq_norms, gram.diagonal()) and bool((sq_norms > 0).all())
    assert torch.equal(synthetic_statistics(12, seed=3)["input_gram"], gram)  # the same from the same seed


class Rescales(prunespec.PruningMethod):
    """A stand-in for a reconstructing method (SparseGPT): prunes the smallest |w| and doubles the rest."""

    name = "rescales"
    statistics = ("input_sq_norms", "input_gram")
    updates_values = True

    @classmethod
    def check_tensor(cls, shape: tuple[int, ...], options: Any) -> str | None:
        return None if len(shape) == 2 else "statistics are about a Linear weight's inputs: 2-D weights only"

    def score(self, ctx: prunespec.MaskContext) -> torch.Tensor:
        # the same ranking as reconstruct's: what an engine that only masks selects from
        return ctx.values.abs()

    def reconstruct(self, ctx: prunespec.MaskContext) -> tuple[torch.Tensor, torch.Tensor]:
        torch.linalg.cholesky(ctx.statistics["input_gram"])  # as SparseGPT's would: it needs a positive-definite gram
        keep = ctx.default_mask.clone()
        alive = (keep != 0).reshape(-1).nonzero().reshape(-1)
        k = self.n_to_prune(alive.numel())
        lowest = torch.topk(ctx.values.reshape(-1)[alive].abs().float(), k, largest=False).indices
        keep.view(-1)[alive[lowest]] = 0
        return keep, ctx.values * (1 + keep)  # kept entries doubled, pruned ones as they were


class WritesValues(Rescales):
    def reconstruct(self, ctx: prunespec.MaskContext) -> tuple[torch.Tensor, torch.Tensor]:
        mask, values = super().reconstruct(ctx)
        ctx.values.copy_(values)
        return mask, ctx.values


class DampensInPlace(Rescales):
    """SparseGPT's reference code adds its dampening to the Hessian in place: here a shared statistic."""

    def reconstruct(self, ctx: prunespec.MaskContext) -> tuple[torch.Tensor, torch.Tensor]:
        gram = ctx.statistics["input_gram"]
        gram.add_(torch.eye(gram.shape[0]) * 0.01)
        return super().reconstruct(ctx)


class FlatMask(Rescales):
    def reconstruct(self, ctx: prunespec.MaskContext) -> tuple[torch.Tensor, torch.Tensor]:
        mask, values = super().reconstruct(ctx)
        return mask.reshape(-1), values


class DoubleValues(Rescales):
    def reconstruct(self, ctx: prunespec.MaskContext) -> tuple[torch.Tensor, torch.Tensor]:
        mask, values = super().reconstruct(ctx)
        return mask, values.double()


class MaskOnly(Rescales):
    def reconstruct(self, ctx: prunespec.MaskContext) -> Any:
        return super().reconstruct(ctx)[0]


class HalfMask(Rescales):
    def reconstruct(self, ctx: prunespec.MaskContext) -> tuple[torch.Tensor, torch.Tensor]:
        mask, values = super().reconstruct(ctx)
        return mask * 0.5, values


class Revives(Rescales):
    def reconstruct(self, ctx: prunespec.MaskContext) -> tuple[torch.Tensor, torch.Tensor]:
        mask, values = super().reconstruct(ctx)
        return torch.ones_like(mask), values


class OneTooMany(Rescales):
    def n_to_prune(self, size: int) -> int:
        return super().n_to_prune(size) + 1


class NoReconstruct(prunespec.PruningMethod):
    name = "no_reconstruct"
    updates_values = True

    def score(self, ctx: prunespec.MaskContext) -> torch.Tensor:
        return ctx.values.abs()


class ScoreWritesStatistics(prunespec.PruningMethod):
    name = "score_writes_statistics"
    statistics = ("input_sq_norms",)

    def score(self, ctx: prunespec.MaskContext) -> torch.Tensor:
        norms = ctx.statistics["input_sq_norms"].sqrt_()
        return ctx.values.abs().float() * norms


class ScoreWritesValues(ScoreWritesStatistics):
    def score(self, ctx: prunespec.MaskContext) -> torch.Tensor:
        return ctx.values.abs_()


def test_check_method_accepts_a_method_that_reconstructs() -> None:
    assert Rescales.capabilities().updates_values
    check_method(Rescales)
    check_method(Rescales, amount=5, dtypes=[torch.float32])


@pytest.mark.parametrize(
    ("cls", "rule", "detail"),
    [
        (WritesValues, "inputs untouched", "reconstruct(ctx) wrote into ctx.values or ctx.mask"),
        (DampensInPlace, "inputs untouched", "reconstruct(ctx) wrote into ctx.statistics['input_gram']"),
        (FlatMask, "reconstruct (mask, values)", "mask is [128] torch.float32 on cpu; ctx.values is [8, 16]"),
        (DoubleValues, "reconstruct (mask, values)", "reconstruct's values are [8, 16] torch.float64 on cpu"),
        (MaskOnly, "reconstruct (mask, values)", "returned Tensor, not a (mask, values) pair of tensors"),
        (HalfMask, "binary", "reconstruct's mask has values other than 0 and 1: [0.0, 0.5]"),
        (Revives, "respects default_mask", "reconstruct(ctx)'s mask set"),
        (Revives, "honours the amount", "should prune 64 (round(amount * remaining), as torch rounds), but 0"),
        (OneTooMany, "honours the amount", "should prune 64 (round(amount * remaining), as torch rounds), but 65"),
        (NoReconstruct, "reconstruct (mask, values)", "raised NotImplementedError: "),
        (ScoreWritesStatistics, "inputs untouched", "score(ctx) wrote into ctx.statistics['input_sq_norms']"),
        (ScoreWritesValues, "inputs untouched", "score(ctx) wrote into ctx.values"),
    ],
)
def test_check_method_catches_a_method_that_breaks_the_data_aware_rules(cls: type, rule: str, detail: str) -> None:
    with pytest.raises(AssertionError) as caught:
        check_method(cls, name="broken_one", shapes=[(8, 16)], dtypes=[torch.float32])
    message = str(caught.value)
    assert f"rule '{rule}': " in message
    assert detail in message


def test_check_method_says_when_it_cannot_make_a_declared_statistic(monkeypatch: pytest.MonkeyPatch) -> None:
    made = prunespec.testing.synthetic_statistics
    monkeypatch.setattr(
        prunespec.testing, "synthetic_statistics", lambda n, seed=0: {"input_sq_norms": made(n)["input_sq_norms"]}
    )
    with pytest.raises(AssertionError, match=r"rule 'statistics': check_method has no synthetic input_gram"):
        check_method(Rescales, shapes=[(8, 16)], dtypes=[torch.float32])
