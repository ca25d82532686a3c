"""Real architectures: transformers' GPT-2, BERT and Llama built from tiny configs (random weights, nothing
downloaded), pruned through type names, dotted paths, ``**`` globs and ``preset: prunable``.

What each spec should select is derived from the model's own structure (every projection inside an
attention or MLP block), never written out by hand, so a selector that over- or under-selects fails.
"""

from __future__ import annotations

import copy
import runpy
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import EXAMPLES
from torch import nn
from torch.nn.utils import prune

import prunespec
from prunespec.cli import load_model, main

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

from tiny_transformers import SPEC as GPT2_SPEC  # noqa: E402
from tiny_transformers import tiny_bert, tiny_gpt2, tiny_llama  # noqa: E402
from transformers.models.bert.modeling_bert import BertLayer  # noqa: E402
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP, GPT2Attention  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP  # noqa: E402
from transformers.pytorch_utils import Conv1D  # noqa: E402

VOCAB = 128


# name -> (factory, the blocks holding attention and MLP projections, the projections' class, how many)
ARCHITECTURES: dict[str, tuple[Callable[..., nn.Module], tuple[type, ...], type, int]] = {
    "gpt2": (tiny_gpt2, (GPT2Attention, GPT2MLP), Conv1D, 8),
    "bert": (tiny_bert, (BertLayer,), nn.Linear, 12),
    "llama": (tiny_llama, (LlamaAttention, LlamaMLP), nn.Linear, 14),
}

SELECTS: list[tuple[str, dict[str, Any]]] = [
    ("gpt2", {"types": ["Conv1D"]}),
    ("gpt2", {"types": ["transformers.pytorch_utils.Conv1D"]}),
    ("gpt2", {"types": ["Conv1D"], "names": ["transformer.h.*.attn.*", "transformer.h.*.mlp.*"]}),
    ("gpt2", {"preset": "prunable"}),
    (
        "bert",
        {
            "types": ["Linear"],
            "names": ["**.attention.**", "bert.encoder.layer.*.intermediate.*", "bert.encoder.layer.*.output.dense"],
        },
    ),
    ("bert", {"types": ["torch.nn.Linear"], "names": ["bert.encoder.**"]}),
    ("bert", {"preset": "prunable"}),
    ("llama", {"types": ["Linear"], "names": ["model.layers.*.self_attn.*", "model.layers.*.mlp.*"]}),
    ("llama", {"types": ["Linear"], "names": ["**.*_proj"], "exclude": ["lm_head"]}),
    ("llama", {"preset": "prunable"}),
]


def tokens(batch: int = 2, length: int = 12) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(1))


def projections(model: nn.Module, blocks: tuple[type, ...], kind: type) -> list[str]:
    """``<module>.weight`` of every ``kind`` module inside one of ``blocks``, in ``named_modules`` order."""
    inside = {
        sub
        for name, module in model.named_modules()
        if isinstance(module, blocks)
        for sub, child in module.named_modules(prefix=name)
        if isinstance(child, kind)
    }
    return [f"{name}.weight" for name, _ in model.named_modules() if name in inside]


def pruned_tensors(model: nn.Module) -> list[str]:
    """Every ``module.param`` with a prune mask, each owner of a tied tensor listed."""
    return [
        f"{name}.{key.removesuffix('_mask')}"
        for name, module in model.named_modules()
        for key in module._buffers
        if key.endswith("_mask")
    ]


def mask_of(model: nn.Module, tensor: str) -> torch.Tensor:
    module, _, pname = tensor.rpartition(".")
    mask: torch.Tensor = model.get_submodule(module).get_buffer(pname + "_mask")
    return mask


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = model(x).logits
    return out


def l1_spec(select: dict[str, Any], amount: float = 0.5, **rule: Any) -> dict[str, Any]:
    return {
        "version": 1,
        "rules": [{"name": "projections", "select": select, "method": "l1_unstructured", "amount": amount, **rule}],
    }


@pytest.mark.parametrize(("arch", "select"), SELECTS, ids=[f"{a}-{'/'.join(map(str, s.values()))}" for a, s in SELECTS])
def test_attention_and_mlp_projections_at_half(
    arch: str, select: dict[str, Any], methods: prunespec.MethodRegistry
) -> None:
    factory, blocks, kind, count = ARCHITECTURES[arch]
    model = factory()
    x = tokens()
    dense_logits = logits(model, x)
    dense = copy.deepcopy(model)
    expected = projections(model, blocks, kind)
    assert len(expected) == count, expected

    plan = prunespec.plan(model, l1_spec(select), methods=methods)
    assert [step.tensor.name for step in plan.steps] == expected
    assert list(plan.tensors) == expected
    assert all(step.after == 0.5 and step.exact for step in plan.steps)
    assert not prune.is_pruned(model), "plan must not touch the model"

    report = prunespec.apply(model, plan)

    assert pruned_tensors(model) == expected
    assert list(report.tensors) == expected
    zeros_total = numel_total = 0
    for name in expected:
        mask = mask_of(model, name)
        orig = model.get_parameter(name + "_orig")
        zeros = int((mask == 0).sum())
        assert zeros == mask.numel() // 2, name
        assert report.entries[name].zeros == zeros
        assert report.tensors[name] == zeros / mask.numel()
        assert report.entries[name].predicted == 0.5
        # l1: every pruned entry is no larger (in absolute value) than every kept one
        assert orig.detach().abs()[mask == 0].max() <= orig.detach().abs()[mask == 1].min(), name
        zeros_total += zeros
        numel_total += mask.numel()
    assert report.global_sparsity == zeros_total / numel_total == 0.5

    pruned_logits = logits(model, x)
    assert pruned_logits.shape == dense_logits.shape
    assert bool(torch.isfinite(pruned_logits).all())
    assert not torch.allclose(pruned_logits, dense_logits), "pruning half the projections changed nothing"
    # the forward uses exactly orig * mask: a dense copy with those weights computes the same logits
    with torch.no_grad():
        for name in expected:
            dense.get_parameter(name).mul_(mask_of(model, name))
    torch.testing.assert_close(logits(dense, x), pruned_logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_prunable_preset_is_the_same_selection_as_naming_the_projections(
    arch: str, methods: prunespec.MethodRegistry
) -> None:
    """Embeddings, norms and the output head (tied or not) are left out on every architecture."""
    factory, blocks, kind, _ = ARCHITECTURES[arch]
    model = factory()
    plan = prunespec.plan(model, l1_spec({"preset": "prunable"}), methods=methods)
    picked = {step.tensor.name for step in plan.steps}
    assert picked == set(projections(model, blocks, kind))
    for name, module in model.named_modules():
        weight = module._parameters.get("weight")
        is_norm = "Norm" in type(module).__name__
        is_head = weight is not None and weight is model.get_output_embeddings().weight
        if isinstance(module, nn.Embedding) or is_norm or is_head:
            assert f"{name}.weight" not in picked, name
    assert all(step.selected_by == "preset: prunable" for step in plan.steps)
    assert "preset: prunable" in str(plan)


# --- GPT-2's tied lm_head / wte --------------------------------------------------------------------


def test_gpt2_lm_head_and_wte_are_tied() -> None:
    """What the tests below rely on: one Parameter reachable through two modules."""
    model = tiny_gpt2()
    assert model.lm_head.weight is model.transformer.wte.weight


def test_gpt2_tied_lm_head_is_pruned_once_with_one_mask(methods: prunespec.MethodRegistry) -> None:
    model = tiny_gpt2()
    head, wte = model.lm_head, model.transformer.wte
    weight = head.weight
    n_params = sum(p.numel() for p in model.parameters())
    x = tokens()

    plan = prunespec.plan(model, l1_spec({"names": ["lm_head"]}), methods=methods)
    assert len(plan.steps) == 1
    step = plan.steps[0]
    assert step.tensor.name == "lm_head.weight"
    assert step.tensor.owners == (("lm_head", "weight"), ("transformer.wte", "weight"))
    assert plan.to_dict()["steps"][0]["tied_with"] == ["transformer.wte.weight"]
    assert "lm_head.weight (tied: transformer.wte.weight)" in str(plan)

    report = prunespec.apply(model, plan)

    # one Parameter, one mask, on both owners
    assert head.weight_orig is weight and wte.weight_orig is weight
    assert head.weight_mask is wte.weight_mask
    assert "weight" not in head._parameters and "weight" not in wte._parameters
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert [name for name, _ in model.named_parameters() if name.endswith("_orig")] == ["transformer.wte.weight_orig"]
    hooks = [h for m in (head, wte) for h in m._forward_pre_hooks.values() if isinstance(h, prune.BasePruningMethod)]
    assert [type(h) for h in hooks] == [prune.L1Unstructured, prune.L1Unstructured]
    mask = head.weight_mask
    assert int((mask == 0).sum()) == weight.numel() // 2  # pruned once: 50%, not 75%
    assert report.tensors == {"lm_head.weight": 0.5}
    assert prunespec.sparsity(model).global_sparsity == 0.5
    assert len(prunespec.sparsity(model).entries) == 1, "a tied tensor is counted once"

    model.train()
    out = model(x, labels=x)
    # after a forward both owners show the same masked weight: the head and the embedding lookup use it
    assert torch.equal(head.weight, wte.weight)
    assert torch.equal(head.weight, weight.detach() * mask)
    with torch.no_grad():
        torch.testing.assert_close(wte(x), F.embedding(x, weight * mask), rtol=0, atol=0)
    out.loss.backward()
    assert weight.grad is not None
    assert bool((weight.grad[mask == 0] == 0).all()), "a pruned entry got a gradient"
    assert bool((weight.grad[mask == 1] != 0).any())


def test_gpt2_rule_naming_both_owners_prunes_the_tensor_once(methods: prunespec.MethodRegistry) -> None:
    model = tiny_gpt2()
    plan = prunespec.plan(model, l1_spec({"names": ["lm_head", "transformer.wte"]}), methods=methods)
    assert len(plan.steps) == 1
    assert any("tied" in warning and "pruned once" in warning for warning in plan.warnings), plan.warnings
    prunespec.apply(model, plan)
    assert int((model.lm_head.weight_mask == 0).sum()) == model.lm_head.weight_mask.numel() // 2


def test_gpt2_two_rules_on_the_two_owners_compose_on_one_mask(methods: prunespec.MethodRegistry) -> None:
    model = tiny_gpt2()
    spec = {
        "version": 1,
        "rules": [
            {"select": {"names": ["lm_head"]}, "method": "l1_unstructured", "amount": 0.5},
            {"select": {"names": ["transformer.wte"]}, "method": "l1_unstructured", "amount": 0.5},
        ],
    }
    plan = prunespec.plan(model, spec, methods=methods)
    assert [s.after for s in plan.steps] == [0.5, 0.75]
    prunespec.apply(model, plan)
    head, wte = model.lm_head, model.transformer.wte
    assert head.weight_mask is wte.weight_mask
    assert int((head.weight_mask == 0).sum()) == head.weight_mask.numel() * 3 // 4
    for module in (head, wte):
        (hook,) = module._forward_pre_hooks.values()
        assert isinstance(hook, prune.PruningContainer) and len(hook) == 2
    logits(model, tokens())
    assert torch.equal(head.weight, wte.weight)


def test_gpt2_prunable_preset_leaves_the_tied_head_and_embeddings_alone(methods: prunespec.MethodRegistry) -> None:
    model = tiny_gpt2()
    weight = model.lm_head.weight
    plan = prunespec.plan(model, l1_spec({"preset": "prunable"}), methods=methods)
    names = {step.tensor.name for step in plan.steps}
    assert not names & {"lm_head.weight", "transformer.wte.weight", "transformer.wpe.weight"}
    assert all(not step.tensor.aliases for step in plan.steps)
    prunespec.apply(model, plan)
    assert model.lm_head._parameters["weight"] is weight
    assert model.transformer.wte._parameters["weight"] is weight
    assert "lm_head.weight" not in pruned_tensors(model) and "transformer.wte.weight" not in pruned_tensors(model)


def test_gpt2_global_budget_with_max_sparsity(methods: prunespec.MethodRegistry) -> None:
    """One 50% budget over every Conv1D and the tied head, no tensor above 55%: the cap binds on some."""
    model = tiny_gpt2()
    x = tokens()
    spec = l1_spec({"types": ["Conv1D", "Linear"]}, scope="global", max_sparsity=0.55)
    expected = [*projections(model, (GPT2Attention, GPT2MLP), Conv1D), "lm_head.weight"]

    plan = prunespec.plan(model, spec, methods=methods)
    assert list(plan.tensors) == expected
    assert all(exact for _, _, exact in plan.tensors.values()), "an l1 global split is known before apply"
    assert plan.steps[-1].tensor.aliases == (("transformer.wte", "weight"),)
    report = prunespec.apply(model, plan)

    total = sum(numel for numel, _, _ in plan.tensors.values())
    zeros = {name: int((mask_of(model, name) == 0).sum()) for name in expected}
    assert sum(zeros.values()) == round(0.5 * total)
    capped = []
    for name, (numel, predicted, _) in plan.tensors.items():
        assert report.tensors[name] == predicted == zeros[name] / numel, name
        assert zeros[name] <= int(0.55 * numel), name
        if zeros[name] == int(0.55 * numel):
            capped.append(name)
    assert capped and len(capped) < len(expected), "the cap should bind on some tensors, not all"
    # entries are pruned smallest first across the whole group, wherever the cap does not stop it
    values = {name: model.get_parameter(name + "_orig").detach().abs() for name in expected}
    pruned_max = max(float(values[n][mask_of(model, n) == 0].max()) for n in expected)
    kept_min = min(float(values[n][mask_of(model, n) == 1].min()) for n in expected if n not in capped)
    assert pruned_max <= kept_min
    assert logits(model, x).shape == (*x.shape, VOCAB)


# --- the example -------------------------------------------------------------------------------------


def test_example_spec_validates_and_points_at_the_schema(capsys: pytest.CaptureFixture[str]) -> None:
    first = GPT2_SPEC.read_text(encoding="utf-8").splitlines()[0]
    prefix = "# yaml-language-server: $schema="
    assert first.startswith(prefix)
    assert (GPT2_SPEC.parent / first.removeprefix(prefix)).resolve().is_file(), first
    assert main(["validate", str(GPT2_SPEC), "--builtins-only"]) == 0
    assert capsys.readouterr().out.strip() == f"{GPT2_SPEC}: valid"


def test_example_factory_is_a_cli_model_reference(methods: prunespec.MethodRegistry) -> None:
    model = load_model(f"{EXAMPLES / 'tiny_transformers.py'}:tiny_gpt2")
    assert type(model).__name__ == "GPT2LMHeadModel" and not model.training
    again = tiny_gpt2()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True))
    plan = prunespec.plan(model, GPT2_SPEC, methods=methods)
    assert [s.tensor.name for s in plan.steps] == projections(model, (GPT2Attention, GPT2MLP), Conv1D)


def test_example_script_prunes_and_prints_plan_and_report(capsys: pytest.CaptureFixture[str]) -> None:
    runpy.run_path(str(EXAMPLES / "tiny_transformers.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert out.startswith("Plan: 1 rule, 8 steps on 8 tensors")
    assert "transformer.h.1.mlp.c_proj.weight" in out
    assert "lm_head" not in out
    assert "total" in out and "50.00%" in out
    assert "logits (2, 16, 128), 8 tensors pruned, 50.00% sparse" in out
