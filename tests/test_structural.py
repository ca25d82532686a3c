"""Structural pruning: `group` rules on transformers models, then shrink.

Each test builds a small model from a config (random weights, nothing downloaded), prunes coupled
groups, and checks what a user relies on: the masks agree across every tensor of a unit, shrink
removes exactly those units, the shrunk model computes what the masked one did, and whatever cannot
be done is a clear error with the model left as it was.
"""

from __future__ import annotations

import copy
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from torch import nn

import prunespec
from prunespec import cli, groups
from prunespec.layout import is_pruned

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from tiny_transformers import tiny_bert, tiny_gpt2

transformers.logging.set_verbosity_error()


def llama(layers: int = 4, heads: int = 8, kv: int = 4, seed: int = 0) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(
        num_hidden_layers=layers,
        hidden_size=64,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        intermediate_size=96,
        vocab_size=101,
        max_position_embeddings=64,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def tokens(vocab: int, seed: int = 1) -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(0, vocab, (2, 11), generator=torch.Generator().manual_seed(seed))}


def logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def rule(names: str, unit: str, amount: float | int, **group: Any) -> dict[str, Any]:
    return {
        "select": {"names": [names]},
        "method": "l1_unstructured",
        "amount": amount,
        "group": {"unit": unit, **group},
    }


def close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-4) -> bool:
    return bool((a - b).abs().max() <= rtol * a.abs().max())


def zero_rows(mask: torch.Tensor) -> set[int]:
    return set((~mask.bool().any(dim=1)).nonzero().reshape(-1).tolist())


def zero_cols(mask: torch.Tensor) -> set[int]:
    return zero_rows(mask.t())


def test_mlp_channels_are_masked_alike_in_gate_up_and_down_and_by_lowest_magnitude() -> None:
    model = llama()
    mlp = model.model.layers[1].mlp
    weights = [mlp.gate_proj.weight.detach().clone(), mlp.up_proj.weight.detach().clone()]
    down = mlp.down_proj.weight.detach().clone()
    prunespec.apply(model, {"version": 1, "rules": [rule("model.layers.*.mlp", "channels", 0.25)]})
    pruned = zero_rows(mlp.gate_proj.weight_mask)
    assert len(pruned) == 24  # round(0.25 * 96)
    assert zero_rows(mlp.up_proj.weight_mask) == pruned
    assert zero_cols(mlp.down_proj.weight_mask) == pruned
    assert int((mlp.gate_proj.weight_mask == 0).sum()) == 24 * 64  # nothing else
    # the group's score of a channel: the sum of |W| over its gate row, up row and down column
    score = weights[0].abs().sum(1) + weights[1].abs().sum(1) + down.abs().sum(0)
    assert pruned == set(torch.argsort(score)[:24].tolist())


def test_round_to_and_min_bound_what_each_group_keeps() -> None:
    model = llama(layers=2)
    prunespec.apply(model, {"version": 1, "rules": [rule("model.layers.*.mlp", "channels", 0.3, round_to=8)]})
    # 96 - round(28.8) = 67 kept, to the nearest multiple of 8: 64
    assert len(zero_rows(model.model.layers[0].mlp.gate_proj.weight_mask)) == 96 - 64
    model = llama(layers=2)
    prunespec.apply(model, {"version": 1, "rules": [rule("model.layers.*.mlp", "channels", 1.0, min=10)]})
    assert len(zero_rows(model.model.layers[0].mlp.gate_proj.weight_mask)) == 96 - 10
    assert groups.kept_count(100, 50, 64, 1) == 64  # 50 kept -> 64 (nearest multiple, halves keep more)
    assert groups.kept_count(100, 99, 64, 1) == 64  # min 1 rounds up to a multiple
    assert groups.kept_count(100, 0, 64, 1) == 100  # never more than there are


def test_heads_with_grouped_query_attention_go_as_a_kv_head_and_its_query_heads() -> None:
    model = llama(heads=8, kv=4)
    prunespec.apply(model, {"version": 1, "rules": [rule("model.layers.*.self_attn", "heads", 2)]})
    attn = model.model.layers[0].self_attn
    head_dim = attn.head_dim  # 8; 2 query heads per KV head
    kv_rows = zero_rows(attn.k_proj.weight_mask)
    assert len(kv_rows) == 2 * head_dim and zero_rows(attn.v_proj.weight_mask) == kv_rows
    kv_heads = {r // head_dim for r in kv_rows}
    assert len(kv_heads) == 2
    q_rows = {h * 2 * head_dim + i for h in kv_heads for i in range(2 * head_dim)}
    assert zero_rows(attn.q_proj.weight_mask) == q_rows
    assert zero_cols(attn.o_proj.weight_mask) == q_rows


def test_global_scope_ranks_channels_across_groups() -> None:
    model = llama(layers=2)
    with torch.no_grad():
        for p in model.model.layers[0].mlp.parameters():
            p.mul_(10)  # layer 0's channels all score higher than layer 1's
    spec = {"version": 1, "rules": [{**rule("model.layers.*.mlp", "channels", 0.25, min=8), "scope": "global"}]}
    plan = prunespec.plan(model, spec)
    assert all(g.pruned is None for g in plan.groups)  # known once scored
    prunespec.apply(model, plan)
    first = len(zero_rows(model.model.layers[0].mlp.gate_proj.weight_mask))
    second = len(zero_rows(model.model.layers[1].mlp.gate_proj.weight_mask))
    assert (first, second) == (0, 48)  # round(0.25 * 192), all from the low layer


def test_global_scope_keeps_min_per_group() -> None:
    model = llama(layers=2)
    with torch.no_grad():
        for p in model.model.layers[0].mlp.parameters():
            p.mul_(10)
    spec = {"version": 1, "rules": [{**rule("model.layers.*.mlp", "channels", 0.75, min=16), "scope": "global"}]}
    prunespec.apply(model, spec)
    assert len(zero_rows(model.model.layers[1].mlp.gate_proj.weight_mask)) == 96 - 16
    assert len(zero_rows(model.model.layers[0].mlp.gate_proj.weight_mask)) == 144 - 80


@pytest.mark.parametrize(
    "make, rules",
    [
        (
            lambda: llama(),
            [
                rule("model.layers.*.mlp", "channels", 0.5, round_to=8),
                rule("model.layers.*.self_attn", "heads", 0.5),
                rule("model.layers.*", "blocks", 0.25),
            ],
        ),
        (
            tiny_gpt2,
            [
                rule("transformer.h.*.mlp", "channels", 0.5),
                rule("transformer.h.*.attn", "heads", 1),
                rule("transformer.h.*", "blocks", 1),
            ],
        ),
        (
            tiny_bert,
            [rule("bert.encoder.layer.*", "channels", 0.5), rule("bert.encoder.layer.*.attention", "heads", 2)],
        ),
    ],
    ids=["llama", "gpt2", "bert"],
)
def test_shrunk_model_computes_what_the_masked_model_did(make: Any, rules: list[dict[str, Any]]) -> None:
    model = make()
    batch = tokens(model.config.vocab_size)
    dense_parameters = sum(p.numel() for p in model.parameters())
    prunespec.apply(model, {"version": 1, "rules": rules})
    masked = logits(model, batch)
    report = prunespec.shrink(model, batch)
    assert close(masked, logits(model, batch))
    assert report.error is not None and report.error <= 1e-4
    assert report.parameters_before == dense_parameters
    assert report.parameters_after == sum(p.numel() for p in model.parameters()) < dense_parameters
    assert not any(is_pruned(m, n) for m in model.modules() for n in ("weight", "bias")), "no mask is left"
    model.train()  # and it trains: gradients reach the sliced weights
    model(**batch).logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad and p.dim() == 2)


def test_llama_widths_and_config_after_shrink_and_from_pretrained(tmp_path: Path) -> None:
    model = llama(layers=4, heads=8, kv=4)
    batch = tokens(101)
    spec = {
        "version": 1,
        "rules": [
            rule("model.layers.*.mlp", "channels", 0.5),
            rule("model.layers.*.self_attn", "heads", 2),
            rule("model.layers.*", "blocks", 1),
        ],
        "shrink": True,
    }
    report = prunespec.apply(model, spec)
    assert report.shrink is not None and len(report.shrink.groups) == 1 + 3 + 3  # blocks, then 3 MLPs, 3 attentions
    config = model.config
    assert (config.num_hidden_layers, config.intermediate_size) == (3, 48)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (4, 2, 8)
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2]
    mlp = model.model.layers[0].mlp
    assert (mlp.gate_proj.out_features, mlp.down_proj.in_features, mlp.intermediate_size) == (48, 48, 48)
    expected = logits(model, batch)
    model.save_pretrained(tmp_path)
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(logits(loaded, batch), expected)


def test_a_config_that_cannot_hold_the_new_widths_is_left_alone_and_said_so() -> None:
    model = llama(layers=2, heads=8, kv=4)
    spec = {"version": 1, "rules": [rule("model.layers.*.self_attn", "heads", 1)], "shrink": True}
    report = prunespec.apply(model, spec)  # 6 query heads: transformers wants hidden_size % heads == 0
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (8, 4)
    assert report.shrink is not None
    assert any("num_attention_heads" in note and "from_pretrained" in note for note in report.shrink.notes)
    assert "num_attention_heads" in str(report)
    assert model.model.layers[0].self_attn.q_proj.out_features == 48


def test_plan_shows_each_group() -> None:
    model = llama(layers=2)
    before = copy.deepcopy(model.state_dict())
    plan = prunespec.plan(model, {"version": 1, "rules": [rule("model.layers.*.mlp", "channels", 0.5)]})
    text = str(plan)
    assert "Groups:" in text and "model.layers.1.mlp" in text and "swiglu_mlp" in text
    group = plan.to_dict()["groups"][0]
    assert (group["units"], group["pruned_after"], group["entries"], group["entries_after"]) == (
        96,
        48,
        3 * 96 * 64,
        3 * 48 * 64,
    )
    assert [m["tensor"].rsplit(".", 2)[-2] for m in group["members"]] == ["gate_proj", "up_proj", "down_proj"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # planning changes nothing


@pytest.mark.parametrize(
    "bad, message",
    [
        (rule("model.layers.*.mlp.gate_proj", "channels", 0.5), "no known structure"),
        (rule("model.layers.*.mlp", "heads", 0.5), "not an attention module"),
        (rule("model.layers.*.mlp", "blocks", 0.5), "must be children of one ModuleList"),
        (
            {**rule("model.layers.*.mlp", "channels", 0.5), "method": "random_structured", "options": {"dim": 0}},
            "no per-entry scores",
        ),
        (rule("model.layers.*.mlp", "channels", 200), "more than the 96 channels left"),
    ],
)
def test_rules_that_do_not_fit_are_plan_errors_naming_the_module(bad: dict[str, Any], message: str) -> None:
    model = llama(layers=2)
    with pytest.raises(prunespec.PlanError, match=message):
        prunespec.plan(model, {"version": 1, "rules": [bad]})


def test_blocks_of_a_post_norm_model_are_refused() -> None:
    with pytest.raises(prunespec.PlanError, match=r"BertLayer.*not a known pre-norm residual block"):
        prunespec.plan(tiny_bert(), {"version": 1, "rules": [rule("bert.encoder.layer.*", "blocks", 1)]})


def test_spec_errors_for_group_rules() -> None:
    bad = {"version": 1, "rules": [{**rule("a", "channels", 0.5), "select": {"names": ["a"], "params": ["bias"]}}]}
    with pytest.raises(prunespec.SpecError, match=r"leave out `select\.params`"):
        prunespec.loads_spec(__import__("json").dumps(bad))
    with pytest.raises(prunespec.SpecError, match="unit"):
        prunespec.loads_spec(
            '{"version": 1, "rules": [{"select": {"names": ["a"]}, "method": "l1_unstructured", '
            '"amount": 0.5, "group": {"unit": "rows"}}]}'
        )


class _PostNormLayer(nn.Module):
    """Looks like a decoder layer (self_attn.o_proj, mlp.down_proj) but normalizes after the residual
    add, so masking its writers does not make it pass its input through."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.self_attn = nn.Module()
        self.self_attn.o_proj = nn.Linear(width, width)
        self.mlp = nn.Module()
        self.mlp.down_proj = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.self_attn.o_proj(x) + self.mlp.down_proj(x))


class _PostNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_PostNormLayer(8) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def test_a_shrink_that_changes_outputs_is_undone_and_names_the_group() -> None:
    torch.manual_seed(0)
    model = _PostNorm()
    prunespec.apply(model, {"version": 1, "rules": [rule("layers.*", "blocks", 1)]})
    state = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 8)
    masked = model(x).detach()
    with pytest.raises(prunespec.ShrinkError, match=r"blocks group layers .*changes the outputs"):
        prunespec.shrink(model, x)
    assert len(model.layers) == 3
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert torch.equal(model(x), masked)


def test_spec_shrink_failure_leaves_the_model_unpruned() -> None:
    torch.manual_seed(0)
    model = _PostNorm()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    spec = {"version": 1, "rules": [rule("layers.*", "blocks", 1)], "shrink": True}
    with pytest.raises(prunespec.ShrinkError):
        prunespec.apply(model, spec, data=[torch.randn(2, 8)])
    assert model.state_dict().keys() == state.keys()  # no weight_orig / weight_mask either
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_shrink_needs_inputs_for_a_model_without_a_vocabulary() -> None:
    model = _PostNorm()
    prunespec.apply(model, {"version": 1, "rules": [rule("layers.*", "blocks", 1)]})
    with pytest.raises(prunespec.ShrinkError, match="pass example inputs"):
        prunespec.shrink(model)
    assert len(model.layers) == 3


def test_shrink_of_an_unpruned_model_changes_nothing() -> None:
    model = llama(layers=2)
    report = prunespec.shrink(model)
    assert report.groups == [] and report.parameters_after == report.parameters_before
    assert "nothing to remove" in str(report)


def test_unstructured_masks_on_top_stay_in_torch_layout_after_shrink() -> None:
    model = llama(layers=2)
    batch = tokens(101)
    spec = {
        "version": 1,
        "rules": [
            rule("model.layers.*.mlp", "channels", 0.5),
            {"select": {"names": ["model.layers.*.mlp.down_proj"]}, "method": "l1_unstructured", "amount": 0.5},
        ],
    }
    prunespec.apply(model, spec)
    masked = logits(model, batch)
    prunespec.shrink(model, batch)
    down = model.model.layers[0].mlp.down_proj
    assert is_pruned(down, "weight") and down.weight_mask.shape == (64, 48)
    assert not is_pruned(model.model.layers[0].mlp.gate_proj, "weight")
    assert close(masked, logits(model, batch))


def test_cli_apply_shrink(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "version: 1\nrules:\n  - select: {names: ['model.layers.*.mlp']}\n    method: l1_unstructured\n"
        "    amount: 0.5\n    group: {unit: channels}\n"
    )
    examples = Path(__file__).resolve().parents[1] / "examples" / "tiny_transformers.py"
    code = cli.main(["apply", str(spec), "--model", f"{examples}:tiny_llama", "--shrink"])
    out = capsys.readouterr().out
    assert code == 0
    assert "Shrink:" in out and "swiglu_mlp" in out and "outputs equal the masked model's" in out


@pytest.mark.parametrize("make", [lambda: llama(), tiny_gpt2], ids=["llama", "gpt2"])
def test_a_shrunk_checkpoint_loads_into_a_freshly_built_model(make: Any, tmp_path: Path) -> None:
    model = make()
    is_llama = hasattr(model, "model")
    prefix = "model.layers" if is_llama else "transformer.h"
    spec = {
        "version": 1,
        "rules": [
            rule(f"{prefix}.*.mlp", "channels", 0.5),
            rule(f"{prefix}.*." + ("self_attn" if is_llama else "attn"), "heads", 1),
            rule(f"{prefix}.*", "blocks", 1),
        ],
        "shrink": True,
    }
    prunespec.apply(model, spec)
    # and a second shrink on top, recorded after the first
    prunespec.apply(model, {"version": 1, "rules": [rule(f"{prefix}.*.mlp", "channels", 0.5)], "shrink": True})
    batch = tokens(model.config.vocab_size)
    expected = logits(model, batch)
    prunespec.save(model, tmp_path / "shrunk.pt")
    fresh = make()
    with torch.no_grad():
        for p in fresh.parameters():
            p.normal_()  # other weights: the checkpoint must bring its own
    prunespec.load(fresh, tmp_path / "shrunk.pt")
    assert torch.equal(logits(fresh, batch), expected)
    assert fresh.state_dict().keys() == model.state_dict().keys()
    prunespec.load(fresh, tmp_path / "shrunk.pt")  # into the shrunk model again: no second shrink
    assert torch.equal(logits(fresh, batch), expected)


def test_a_shrink_record_that_does_not_fit_is_refused_and_the_model_untouched(tmp_path: Path) -> None:
    model = llama(layers=2)
    prunespec.apply(model, {"version": 1, "rules": [rule("model.layers.*.mlp", "channels", 0.5)], "shrink": True})
    prunespec.save(model, tmp_path / "shrunk.pt")
    other = llama(layers=2, heads=4, kv=2)  # fine: the MLPs are the same
    prunespec.load(other, tmp_path / "shrunk.pt")
    narrow = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            num_hidden_layers=2,
            hidden_size=64,
            num_attention_heads=8,
            num_key_value_heads=4,
            intermediate_size=80,
            vocab_size=101,
        )
    )
    state = {k: v.clone() for k, v in narrow.state_dict().items()}
    with pytest.raises(prunespec.CheckpointError, match=r"recorded as 96 units"):
        prunespec.load(narrow, tmp_path / "shrunk.pt")
    assert {k: v.shape for k, v in narrow.state_dict().items()} == {k: v.shape for k, v in state.items()}
    assert narrow.config.intermediate_size == 80 and not hasattr(narrow, "_prunespec_shrunk")
    data = torch.load(tmp_path / "shrunk.pt", weights_only=True)
    data["prunespec"]["shrunk"][0][0]["kept"] = [5, 3]  # not sorted
    torch.save(data, tmp_path / "bad.pt")
    with pytest.raises(prunespec.CheckpointError, match="`shrunk` record"):
        prunespec.load(llama(layers=2), tmp_path / "bad.pt")


def test_wanda_scores_channels_from_the_calibration_data() -> None:
    model = llama(layers=2)
    data = [tokens(101, seed=s) for s in range(3)]
    mlp = model.model.layers[0].mlp
    sums: dict[str, torch.Tensor] = {}

    def record(name: str) -> Any:
        def hook(module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + (x * x).sum(0)

        return hook

    handles = [getattr(mlp, n).register_forward_pre_hook(record(n)) for n in ("gate_proj", "down_proj")]
    for batch in data:
        logits(model, batch)
    for h in handles:
        h.remove()
    gate, up, down = (getattr(mlp, n).weight.detach().double().abs() for n in ("gate_proj", "up_proj", "down_proj"))
    x_in, x_mid = sums["gate_proj"].sqrt(), sums["down_proj"].sqrt()
    score = (gate * x_in).sum(1) + (up * x_in).sum(1) + (down * x_mid).sum(0)
    spec = {"version": 1, "rules": [{**rule("model.layers.*.mlp", "channels", 0.25), "method": "wanda"}]}
    report = prunespec.apply(model, spec, data=data)
    assert report.calibration is not None
    assert zero_rows(mlp.gate_proj.weight_mask) == set(torch.argsort(score)[:24].tolist())
    batch = tokens(101)
    masked = logits(model, batch)
    prunespec.shrink(model, batch)
    assert close(masked, logits(model, batch))


# --- models without known structures: channel groups traced from example inputs -------------------

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import zoo  # noqa: E402

CONVS = {"select": {"types": ["Conv2d"]}, "method": "l1_unstructured", "amount": 0.5, "group": {"unit": "channels"}}


def _resnet() -> nn.Module:
    return zoo.resnet50_shaped(num_classes=10, width=8, layers=(1, 2, 1, 1)).eval()


@pytest.mark.parametrize(
    "make, shape",
    [(_resnet, (2, 3, 48, 48)), (lambda: zoo.depthwise_separable().eval(), (2, 3, 32, 32))],
    ids=["resnet", "depthwise"],
)
def test_cnn_channel_groups_prune_shrink_and_load_into_a_fresh_model(make: Any, shape: Any, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = make()
    x = torch.randn(*shape)
    before = sum(p.numel() for p in model.parameters())
    report = prunespec.apply(model, {"version": 1, "rules": [CONVS]}, data=[x])
    masked = model(x).detach()
    assert report.shrink is None
    shrunk = prunespec.shrink(model, x)
    assert all(g.structure == "traced" and g.after == g.before // 2 for g in shrunk.groups)
    assert close(masked, model(x).detach())
    assert sum(p.numel() for p in model.parameters()) < 0.4 * before
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert all(m.weight.shape[0] == m.out_channels for m in convs)
    prunespec.save(model, tmp_path / "cnn.pt")
    fresh = make()
    prunespec.load(fresh, tmp_path / "cnn.pt")
    assert torch.equal(fresh(x), model(x))


def test_vit_mlp_channels_and_heads_shrink() -> None:
    torch.manual_seed(0)
    model = zoo.vit_shaped().eval()
    x = torch.randn(2, 3, 32, 32)
    spec = {
        "version": 1,
        "rules": [rule("blocks.*.mlp", "channels", 0.5), rule("blocks.*.attn", "heads", 1)],
    }
    prunespec.apply(model, spec)
    masked = model(x).detach()
    report = prunespec.shrink(model, x)
    assert [(g.structure, g.before, g.after) for g in report.groups] == [("attention", 4, 3), ("mlp", 256, 128)] * 2
    assert model.blocks[0].attn.heads == 3 and model.blocks[0].attn.q.out_features == 48
    assert close(masked, model(x).detach())


def test_a_traced_rule_needs_example_inputs() -> None:
    with pytest.raises(prunespec.PlanError, match="example inputs"):
        prunespec.plan(_resnet(), {"version": 1, "rules": [CONVS]})


def test_a_model_fx_cannot_trace_is_a_plan_error_naming_the_op() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 8, 1)
            self.b = nn.Conv2d(8, 4, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.a(x)
            if y.sum() > 0:  # data-dependent control flow
                y = y * 2
            return self.b(y)

    model = Branchy()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(prunespec.PlanError, match=r"cannot be traced.*control flow"):
        prunespec.apply(model, {"version": 1, "rules": [CONVS]}, data=[torch.randn(1, 3, 4, 4)])
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def test_selected_layers_whose_channels_are_in_no_group_are_named_in_a_warning() -> None:
    torch.manual_seed(0)
    model = zoo.vit_shaped().eval()
    spec = {"version": 1, "rules": [{**CONVS, "select": {"names": ["blocks.*.mlp.fc1", "patch_embed"]}}]}
    plan = prunespec.plan(model, spec, data=[torch.randn(1, 3, 32, 32)])
    assert [g.group.name for g in plan.groups] == ["blocks.0.mlp.fc1", "blocks.1.mlp.fc1"]
    assert any("patch_embed: not pruned" in w and "LayerNorm" in w for w in plan.warnings)


def test_block_influence_removes_the_block_that_changes_its_input_least() -> None:
    model = llama(layers=4)
    data = [tokens(101, seed=s) for s in range(2)]
    with torch.no_grad():
        for name in ("self_attn.o_proj", "mlp.down_proj"):
            model.model.layers[2].get_submodule(name).weight.mul_(1e-3)  # layer 2 nearly passes x through
    spec = {
        "version": 1,
        "rules": [{**rule("model.layers.*", "blocks", 1), "method": "block_influence"}],
        "shrink": True,
    }
    report = prunespec.apply(model, spec, data=data)
    assert report.shrink is not None
    assert report.shrink.groups[0].removed == ("model.layers.2",)
    assert model.config.num_hidden_layers == 3


def test_block_influence_is_one_minus_the_cosine_of_input_and_output() -> None:
    from prunespec.budgets import block_influences

    model = llama(layers=2)
    batch = {"input_ids": torch.randint(0, 101, (2, 7)), "attention_mask": torch.tensor([[1] * 7, [1] * 4 + [0] * 3])}
    seen: dict[str, Any] = {}
    layer = model.model.layers[1]
    handle_in = layer.register_forward_pre_hook(lambda m, a: seen.update(x=a[0]))
    handle_out = layer.register_forward_hook(lambda m, a, o: seen.update(y=o[0] if isinstance(o, tuple) else o))
    logits(model, batch)
    handle_in.remove()
    handle_out.remove()
    cos = torch.nn.functional.cosine_similarity(seen["x"].double(), seen["y"].double(), dim=-1)
    expected = float((1 - cos)[batch["attention_mask"].bool()].mean())
    got = block_influences(model, ["model.layers.0", "model.layers.1"], [batch], "test")
    assert got["model.layers.1"] == pytest.approx(expected, rel=1e-9)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


def test_block_influence_outside_a_blocks_rule_is_a_plan_error() -> None:
    spec = {"version": 1, "rules": [{**rule("model.layers.*.mlp", "channels", 0.5), "method": "block_influence"}]}
    with pytest.raises(prunespec.PlanError, match="scores whole blocks"):
        prunespec.plan(llama(layers=2), spec)


def test_the_plan_counts_each_groups_macs() -> None:
    model = _resnet()
    x = torch.randn(2, 3, 48, 48)
    positions: dict[str, int] = {}
    handles = [
        m.register_forward_hook(lambda mod, a, out, name=name: positions.update({name: out[0, 0].numel()}))
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d)
    ]
    model(x)
    for h in handles:
        h.remove()
    plan = prunespec.plan(model, {"version": 1, "rules": [CONVS]}, data=[x])
    modules = dict(model.named_modules())
    for g in plan.groups:
        weights = [m for m in g.group.members if m.role == "scored"]
        expected = sum(modules[m.module].weight.numel() * positions.get(m.module, 1) for m in weights)
        assert (g.macs, g.macs_per) == (expected, "example")
        assert g.macs_after is not None and g.macs_after < g.macs
    llama_plan = prunespec.plan(llama(layers=1), {"version": 1, "rules": [rule("model.layers.*.mlp", "channels", 0.5)]})
    assert [(g.macs, g.macs_after, g.macs_per) for g in llama_plan.groups] == [(3 * 96 * 64, 3 * 48 * 64, "token")]


def test_the_structural_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    import structural

    structural.main()
    out = capsys.readouterr().out
    assert out.count("a fresh model loads it: True") == 2
    assert "decoder_blocks" in out and "traced" in out


DOC = Path(__file__).resolve().parents[1] / "docs" / "structural-pruning.md"


def test_the_pages_commands_run_and_print_what_it_says(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = DOC.read_text()
    commands = [c.replace("\\\n", " ").split() for c in re.findall(r"^prunespec (.+?(?:\\\n.+?)*)$", text, re.M)]
    assert len(commands) == 3
    for argv in commands:
        argv = [str(tmp_path / a) if a.endswith(".pt") else a for a in argv]
        assert cli.main(argv) == 0, argv
    out = capsys.readouterr().out
    claimed = re.search(r"`(Shrink: .+?)`\)", text)
    assert claimed is not None and claimed.group(1) in out


def test_the_pages_llama_saves_and_loads_with_plain_from_pretrained(tmp_path: Path) -> None:
    import structural

    model = structural.small_llama()
    batches = structural.token_batches()
    prunespec.apply(model, structural.SPECS / "llama.yaml", data=batches)
    assert model.config.num_hidden_layers == 3 and model.config.intermediate_size == 192
    model.save_pretrained(tmp_path)
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert torch.equal(logits(loaded, batches[0]), logits(model, batches[0]))


@pytest.mark.parametrize(
    "make, rules, batch",
    [
        (
            tiny_bert,
            [rule("bert.encoder.layer.*", "channels", 0.5), rule("bert.encoder.layer.*.attention", "heads", 1)],
            tokens(128),
        ),
        (
            lambda: (torch.manual_seed(0), zoo.vit_shaped().eval())[1],
            [rule("blocks.*.mlp", "channels", 0.5), rule("blocks.*.attn", "heads", 2)],
            torch.randn(2, 3, 32, 32),
        ),
    ],
    ids=["bert", "vit"],
)
def test_bert_and_vit_shrunk_checkpoints_load_into_fresh_models(
    make: Any, rules: list[dict[str, Any]], batch: Any, tmp_path: Path
) -> None:
    model = make()
    prunespec.apply(model, {"version": 1, "rules": rules, "shrink": True}, data=[batch])

    def run(m: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            out = m(**batch) if isinstance(batch, dict) else m(batch)
        return out.logits if hasattr(out, "logits") else out

    prunespec.save(model, tmp_path / "shrunk.pt")
    fresh = make()
    prunespec.load(fresh, tmp_path / "shrunk.pt")
    assert torch.equal(run(fresh), run(model))
    assert sum(p.numel() for p in fresh.parameters()) == sum(p.numel() for p in model.parameters())


def test_the_spec_of_a_group_rule_is_read_back_from_its_checkpoint(tmp_path: Path) -> None:
    model = llama(layers=2)
    spec = {"version": 1, "rules": [rule("model.layers.*.mlp", "channels", 0.5)]}
    prunespec.apply(model, spec)
    prunespec.save(model, tmp_path / "m.pt", spec=spec)
    saved = prunespec.inspect(tmp_path / "m.pt").spec
    assert saved is not None and saved.rules[0].group is not None and saved.rules[0].group.unit == "channels"
