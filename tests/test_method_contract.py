"""The method contract: capabilities declared on the class, the context a method sees, units."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import prunespec
from prunespec.methods.base import MethodInfo
from prunespec.plugins import MethodRegistry
from prunespec.testing import registered_methods

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
