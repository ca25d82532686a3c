"""The masked weight is made once and reused while nothing it depends on changes (layout.MaskedWeight).

torch recomputes ``weight_orig * weight_mask`` before every forward; prunespec's installed hooks keep
the product while ``weight_orig`` and ``weight_mask`` are unchanged and no gradient needs a fresh one.
Everything torch users rely on must hold as before: the values, gradients to ``weight_orig``, the
hook's class, the state_dict, copying and pickling.
"""

from __future__ import annotations

import copy
import io
import pickle

import torch
from torch import nn
from torch.nn.utils import prune

import prunespec

SPEC = {"version": 1, "rules": [{"select": {"types": ["Linear"]}, "method": "l1_unstructured", "amount": 0.5}]}


def pruned() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    prunespec.apply(model, SPEC)
    return model


def by_torch() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    for layer in (model[0], model[2]):
        prune.l1_unstructured(layer, "weight", amount=0.5)
    return model


def test_eval_forwards_reuse_one_product_and_it_is_torchs() -> None:
    model, reference = pruned().eval(), by_torch().eval()
    x = torch.randn(3, 8)
    with torch.no_grad():
        first = model(x)
        weight = model[0].weight
        second = model(x)
        assert model[0].weight is weight  # not made again
        assert torch.equal(first, second) and torch.equal(first, reference(x))
    assert isinstance(model[0]._forward_pre_hooks[next(iter(model[0]._forward_pre_hooks))], prune.L1Unstructured)
    assert set(model.state_dict()) == set(reference.state_dict())


def test_training_sends_gradients_to_weight_orig_and_steps_are_seen() -> None:
    model, reference = pruned(), by_torch()
    x = torch.randn(5, 8)
    for m in (model, reference):
        optimizer = torch.optim.SGD(m.parameters(), lr=0.1)
        for _ in range(3):
            optimizer.zero_grad()
            m(x).square().sum().backward()
            optimizer.step()
    assert torch.equal(model[0].weight_orig.grad, reference[0].weight_orig.grad)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))  # the eval product after the steps is the new one


def test_changes_to_the_weight_or_the_mask_are_seen() -> None:
    model = pruned().eval()
    x = torch.randn(2, 8)
    layer = model[0]

    def expected() -> torch.Tensor:
        with torch.no_grad():
            return torch.relu(x @ (layer.weight_orig * layer.weight_mask).T + layer.bias) @ model[2].weight.T

    with torch.no_grad():
        model(x)
        layer.weight_orig.mul_(2)  # in place
        assert torch.allclose(model(x) - model[2].bias, expected())
        layer.weight_mask[0].zero_()  # the mask in place
        assert torch.allclose(model(x) - model[2].bias, expected())
        layer.weight_orig.data = torch.randn_like(layer.weight_orig)  # new data bound
        assert torch.allclose(model(x) - model[2].bias, expected())
        state = {k: v.clone() for k, v in pruned().state_dict().items()}
        model.load_state_dict(state)
        assert torch.equal(model(x), pruned().eval()(x))
    with torch.inference_mode():
        model(x)
    with torch.no_grad():
        model(x)  # an inference-mode product is not reused outside it
    x.requires_grad_(True)
    model(x).sum().backward()  # and autograd works after both


def test_a_copied_or_pickled_model_makes_its_own_product() -> None:
    model = pruned().eval()
    x = torch.randn(2, 8)
    with torch.no_grad():
        expected = model(x)
    clone = copy.deepcopy(model)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    unpickled = pickle.loads(pickle.dumps(model))
    for other in (clone, loaded, unpickled):
        with torch.no_grad():
            other[0].weight_orig.mul_(0)
            assert not torch.equal(other(x), expected)  # its own weights, not model's product
    with torch.no_grad():
        assert torch.equal(model(x), expected)
