"""prunespec-foobar: the tutorial's method keeps prunespec's method contract and prunes through a spec."""

from __future__ import annotations

import copy

import prunespec
import torch
from prunespec.testing import check_method, registered_methods
from torch import nn
from torch.nn.utils import prune

import prunespec_foobar
from prunespec_foobar import FooBarPruningMethod, foobar_unstructured


def test_contract() -> None:
    check_method(FooBarPruningMethod, name="foobar")


def test_the_hook_registers_the_tutorial_class_unchanged() -> None:
    info = registered_methods(prunespec_foobar)["foobar"]
    assert info.cls is FooBarPruningMethod
    assert (info.pruning_type, info.takes_amount, info.options_model.model_fields) == ("unstructured", False, {})
    assert info.summary == "Prune every other entry in a tensor"


def test_a_spec_gives_what_the_tutorial_function_gives() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 10))
    by_hand = copy.deepcopy(model)
    spec = {"version": 1, "rules": [{"select": {"names": ["1"], "params": ["bias"]}, "method": "foobar"}]}
    prunespec.apply(model, spec, methods=prunespec.load_methods(allow=["foobar"]))
    foobar_unstructured(by_hand[1], name="bias")
    assert model[1].bias_mask.tolist() == [0.0, 1.0] * 5
    assert torch.equal(model[1].bias_mask, by_hand[1].bias_mask)
    assert torch.equal(model[1].bias, by_hand[1].bias)
    assert isinstance(next(iter(model[1]._forward_pre_hooks.values())), FooBarPruningMethod)


def test_composes_like_torch_after_an_earlier_rule() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 10))
    by_hand = copy.deepcopy(model)
    spec = {
        "version": 1,
        "rules": [
            {"select": {"names": ["0"], "params": ["bias"]}, "method": "l1_unstructured", "amount": 3},
            {"select": {"names": ["0"], "params": ["bias"]}, "method": "foobar"},
        ],
    }
    prunespec.apply(model, spec, methods=prunespec.load_methods(allow=["foobar"]))
    prune.l1_unstructured(by_hand[0], "bias", amount=3)
    earlier = by_hand[0].bias_mask.clone()
    foobar_unstructured(by_hand[0], name="bias")
    assert torch.equal(model[0].bias_mask, by_hand[0].bias_mask)
    assert not bool(model[0].bias_mask[earlier == 0].any())
    # every other one of the 7 survivors is pruned: 4 of them
    assert int(model[0].bias_mask.sum()) == 3
