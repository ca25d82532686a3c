"""`prunespec.inventory` and `prunespec inspect`: a model's modules collapsed into patterns, each with a
selector that picks exactly its modules (checked by planning a rule with it), tied parameters, current
sparsity and the known structures a `group:` rule takes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ROOT, ModelState
from tiny_transformers import tiny_bert, tiny_gpt2, tiny_llama
from torch import nn

import prunespec
from prunespec.cli import main
from prunespec.inventory import Inventory, ModuleRow, escape_glob

GPT2 = "examples/tiny_transformers.py:tiny_gpt2"


class Block(nn.Module):
    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.ReLU()


class SmallCNN(nn.Module):
    """Three alike blocks and a fourth of another width: the wider one is a row of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3)
        self.blocks = nn.ModuleList([Block(8, 8), Block(8, 8), Block(8, 8), Block(8, 16)])
        self.head = nn.Linear(16, 10)


def small_cnn() -> SmallCNN:
    torch.manual_seed(0)
    return SmallCNN()


def rows(inv: Inventory) -> dict[str, tuple[int, str, dict[str, tuple[int, ...]]]]:
    """pattern -> (count, type, {param: shape})."""
    return {r.pattern: (r.count, r.type, {p.name: p.shape for p in r.params}) for r in inv.modules}


def planned(model: nn.Module, rule: dict[str, Any]) -> set[str]:
    plan = prunespec.plan(model, {"version": 1, "rules": [rule]}, methods=prunespec.load_methods(builtins_only=True))
    return {step.tensor.name for step in plan.steps}


def test_gpt2_rows_tied_weights_and_prunable() -> None:
    model = tiny_gpt2()
    state = ModelState(model)
    inv = prunespec.inventory(model)
    state.assert_unchanged(model)
    assert rows(inv) == {
        "transformer.wte": (1, "Embedding", {"weight": (128, 64)}),
        "transformer.wpe": (1, "Embedding", {"weight": (64, 64)}),
        "transformer.h.*.ln_1": (2, "LayerNorm", {"weight": (64,), "bias": (64,)}),
        "transformer.h.*.attn.c_attn": (2, "Conv1D", {"weight": (64, 192), "bias": (192,)}),
        "transformer.h.*.attn.c_proj": (2, "Conv1D", {"weight": (64, 64), "bias": (64,)}),
        "transformer.h.*.ln_2": (2, "LayerNorm", {"weight": (64,), "bias": (64,)}),
        "transformer.h.*.mlp.c_fc": (2, "Conv1D", {"weight": (64, 256), "bias": (256,)}),
        "transformer.h.*.mlp.c_proj": (2, "Conv1D", {"weight": (256, 64), "bias": (64,)}),
        "transformer.ln_f": (1, "LayerNorm", {"weight": (64,), "bias": (64,)}),
        "lm_head": (1, "Linear", {"weight": (128, 64)}),
    }
    prunable = {r.pattern for r in inv.modules if r.prunable}
    assert prunable == {f"transformer.h.*.{m}" for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert [t.names for t in inv.tied] == [("transformer.wte.weight", "lm_head.weight")]
    tied = {r.pattern for r in inv.modules if any(p.tied for p in r.params)}
    assert tied == {"transformer.wte", "lm_head"}
    assert inv.parameters == sum(p.numel() for p in model.parameters())  # the tied weight once
    assert inv.prunable_weights == 2 * (64 * 192 + 64 * 64 + 64 * 256 + 256 * 64)


def test_bert_and_llama_rows() -> None:
    bert = rows(prunespec.inventory(tiny_bert()))
    assert bert["bert.encoder.layer.*.intermediate.dense"] == (2, "Linear", {"weight": (128, 64), "bias": (128,)})
    assert bert["bert.encoder.layer.*.output.dense"] == (2, "Linear", {"weight": (64, 128), "bias": (64,)})
    assert bert["cls.predictions"] == (1, "BertLMPredictionHead", {"bias": (128,)})  # owns a parameter itself
    assert "bert.encoder.layer.*.attention.self" not in bert  # a container: no parameters of its own
    assert len(bert) == 16
    llama = prunespec.inventory(tiny_llama())
    assert rows(llama)["model.layers.*.self_attn.k_proj"] == (2, "Linear", {"weight": (32, 64)})
    assert rows(llama)["model.layers.*.mlp.down_proj"] == (2, "Linear", {"weight": (64, 128)})
    assert rows(llama)["model.layers.*.input_layernorm"] == (2, "LlamaRMSNorm", {"weight": (64,)})
    assert not llama.tied  # Llama's lm_head is not tied by default
    assert {r.pattern for r in llama.modules if r.prunable} == {
        f"model.layers.*.{m}" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    } | {f"model.layers.*.{m}" for m in ("self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}


def test_bert_ties_the_decoder_to_the_embeddings_and_the_bias() -> None:
    inv = prunespec.inventory(tiny_bert())
    assert [t.names for t in inv.tied] == [
        ("bert.embeddings.word_embeddings.weight", "cls.predictions.decoder.weight"),
        ("cls.predictions.bias", "cls.predictions.decoder.bias"),
    ]


def test_a_layer_of_another_width_is_a_row_of_its_own() -> None:
    inv = prunespec.inventory(small_cnn())
    assert rows(inv) == {
        "stem": (1, "Conv2d", {"weight": (8, 3, 3, 3), "bias": (8,)}),
        "blocks.*.conv": (3, "Conv2d", {"weight": (8, 8, 3, 3), "bias": (8,)}),
        "blocks.*.bn": (3, "BatchNorm2d", {"weight": (8,), "bias": (8,)}),
        "blocks.3.conv": (1, "Conv2d", {"weight": (16, 8, 3, 3), "bias": (16,)}),
        "blocks.3.bn": (1, "BatchNorm2d", {"weight": (16,), "bias": (16,)}),
        "head": (1, "Linear", {"weight": (10, 16), "bias": (10,)}),
    }
    by = {r.pattern: r for r in inv.modules}
    # the glob blocks.*.conv would take blocks.3.conv too: the selector names the three
    assert by["blocks.*.conv"].selector == {"names": [r"re:blocks\.(?:0|1|2)\.conv"]}
    assert by["blocks.3.conv"].selector == {"names": ["blocks.3.conv"]}
    assert by["stem"].prunable and not by["head"].prunable and not by["blocks.*.bn"].prunable  # head: the output
    assert not inv.structures


def test_irregular_names_stay_apart() -> None:
    model = nn.Module()
    model.experts = nn.ModuleDict({"a": nn.Linear(4, 4), "b": nn.Linear(4, 4)})
    model.fc1, model.fc2 = nn.Linear(4, 4), nn.Linear(4, 4)  # an integer inside a segment is not one
    model.layers = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])
    model.mixed = nn.ModuleDict({"0": nn.Linear(4, 4), "1": nn.Linear(4, 4), "x": nn.Linear(4, 4)})
    inv = prunespec.inventory(model)
    assert [(r.pattern, r.count) for r in inv.modules] == [
        ("experts.a", 1),
        ("experts.b", 1),
        ("fc1", 1),
        ("fc2", 1),
        ("layers.*", 2),
        ("mixed.*", 2),
        ("mixed.x", 1),
    ]
    assert [r.selector["names"] for r in inv.modules][-3:] == [["layers.*"], [r"re:mixed\.[0-9]+"], ["mixed.x"]]


def test_a_selector_may_pick_modules_without_parameters_too() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    (row,) = prunespec.inventory(model).modules
    assert (row.pattern, row.names, row.selector) == ("*", ("0", "2"), {"names": ["*"]})  # and the ReLU, the root
    assert planned(model, {"select": row.selector, "method": "identity"}) == {"0.weight", "2.weight"}
    model.register_parameter("scale", nn.Parameter(torch.ones(4)))  # now the root owns one: `*` would pick it
    rows = {r.pattern: r for r in prunespec.inventory(model).modules}
    assert rows["*"].selector == {"names": ["?*"]} and rows[""].selector == {"names": [""]}
    assert planned(model, {"select": {"names": ["", "?*"], "params": ["scale"]}, "method": "identity"}) == {"scale"}


def test_only_the_integer_segments_that_differ_are_starred() -> None:
    model = nn.Module()
    model.stages = nn.ModuleList(
        [nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)]), nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 8)])]
    )
    model.only = nn.ModuleList([nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])])
    inv = prunespec.inventory(model)
    by = {r.pattern: r for r in inv.modules}
    assert set(by) == {"stages.*.*", "stages.1.1", "only.0.*"}
    # neither the glob nor a regex of each segment's values (0|1).(0|1) leaves out stages.1.1
    assert by["stages.*.*"].names == ("stages.0.0", "stages.0.1", "stages.1.0")
    assert by["stages.*.*"].selector == {"names": ["stages.0.0", "stages.0.1", "stages.1.0"]}
    assert by["only.0.*"].selector == {"names": ["only.0.*"]}


def test_names_with_glob_characters_are_escaped() -> None:
    model = nn.Module()
    model.odd = nn.ModuleDict({"a*b": nn.Linear(2, 2), "ab": nn.Linear(2, 2), "w[0]": nn.Linear(2, 2)})
    model.odd.add_module("w0]", nn.Linear(2, 2))
    model.odd.add_module("?", nn.Linear(2, 2))
    model.odd.add_module("x", nn.Linear(2, 2))
    inv = prunespec.inventory(model)
    for row in inv.modules:
        assert planned(model, {"select": row.selector, "method": "identity"}) == {f"{row.names[0]}.weight"}
    assert escape_glob("re:x") == "[r]e:x" and escape_glob("a*b") == "a[*]b"


MODELS = {"gpt2": tiny_gpt2, "bert": tiny_bert, "llama": tiny_llama, "cnn": small_cnn}


@pytest.mark.parametrize("name", MODELS)
def test_every_selector_selects_exactly_its_modules(name: str) -> None:
    model = MODELS[name]()
    inv = prunespec.inventory(model)
    for row in inv.modules:
        param = row.params[0].name
        rule = {"select": {**row.selector, "params": [param]}, "method": "identity"}
        assert planned(model, rule) == {f"{n}.{param}" for n in row.names}, row.pattern


def _row(inv: Inventory, pattern: str) -> ModuleRow:
    return next(r for r in inv.modules if r.pattern == pattern)


def test_sparsity_after_apply_is_what_the_report_counts() -> None:
    model = tiny_llama()
    spec = {
        "version": 1,
        "rules": [
            {"select": {"names": ["model.layers.*.mlp.down_proj"]}, "method": "l1_unstructured", "amount": 0.5},
            {"select": {"names": ["model.layers.1.self_attn.q_proj"]}, "method": "l1_unstructured", "amount": 0.25},
        ],
    }
    report = prunespec.apply(model, spec)
    inv = prunespec.inventory(model)
    down = _row(inv, "model.layers.*.mlp.down_proj")
    assert down.sparsity == 0.5 and down.params[0].masked == 2
    q = _row(inv, "model.layers.*.self_attn.q_proj")  # one pruned, one not: still one row
    assert q.count == 2 and q.params[0].masked == 1 and q.zeros == 1024
    counted = prunespec.sparsity(model)
    everything = {**counted.entries, **counted.others}
    assert inv.zeros == sum(s.zeros for s in everything.values()) and inv.parameters == sum(
        s.numel for s in everything.values()
    )
    assert report.tensors["model.layers.0.mlp.down_proj.weight"] == 0.5
    prunespec.finalize(model)  # no masks left: the zeros are the values'
    after = prunespec.inventory(model)
    assert _row(after, "model.layers.*.mlp.down_proj").sparsity == 0.5
    assert _row(after, "model.layers.*.mlp.down_proj").params[0].masked == 0


def test_json_shape() -> None:
    data = json.loads(json.dumps(prunespec.inventory(tiny_gpt2()).to_dict()))
    assert set(data) == {"modules", "tied", "structures", "totals"}
    row = next(r for r in data["modules"] if r["pattern"] == "transformer.h.*.mlp.c_fc")
    assert row == {
        "pattern": "transformer.h.*.mlp.c_fc",
        "count": 2,
        "names": ["transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"],
        "type": "Conv1D",
        "type_path": "transformers.pytorch_utils.Conv1D",
        "parameters": [
            {"name": "weight", "shape": [64, 256], "numel": 16384, "zeros": 0, "masked": 0, "tied": False},
            {"name": "bias", "shape": [256], "numel": 256, "zeros": 512, "masked": 0, "tied": False},
        ],
        "numel": 33280,
        "zeros": 512,
        "sparsity": 512 / 33280,
        "prunable": True,
        "selector": {"names": ["transformer.h.*.mlp.c_fc"]},
    }
    assert data["tied"] == [{"names": ["transformer.wte.weight", "lm_head.weight"], "shape": [128, 64], "numel": 8192}]
    mlp = next(s for s in data["structures"] if s["structure"] == "mlp")
    assert {k: mlp[k] for k in ("pattern", "count", "unit", "units", "group", "selector", "pruned_units")} == {
        "pattern": "transformer.h.*.mlp",
        "count": 2,
        "unit": "channels",
        "units": 256,
        "group": {"unit": "channels"},
        "selector": {"names": ["transformer.h.*.mlp"]},
        "pruned_units": 0,
    }
    assert [m["tensor"] for m in mlp["members"]] == ["c_fc.weight", "c_fc.bias", "c_proj.weight"]
    assert set(data["totals"]) == {
        "rows",
        "modules",
        "parameters",
        "zeros",
        "sparsity",
        "prunable_modules",
        "prunable_weights",
    }
    assert data["totals"]["rows"] == 10 and data["totals"]["modules"] == 16 and data["totals"]["prunable_modules"] == 8


STRUCTURES = {
    "gpt2": [
        ("transformer.h", "decoder_blocks", "blocks", 2, None),
        ("transformer.h.*.attn", "attention", "heads", 4, 4),
        ("transformer.h.*.mlp", "mlp", "channels", 256, None),
    ],
    "bert": [
        ("bert.encoder.layer.*", "mlp", "channels", 128, None),
        ("bert.encoder.layer.*.attention", "attention", "heads", 4, 4),
    ],
    "llama": [
        ("model.layers", "decoder_blocks", "blocks", 2, None),
        ("model.layers.*.self_attn", "attention", "heads", 2, 4),  # 2 KV heads, 2 query heads each
        ("model.layers.*.mlp", "swiglu_mlp", "channels", 128, None),
    ],
}


@pytest.mark.parametrize("name", STRUCTURES)
def test_known_structures_with_selectors_a_group_rule_takes(name: str) -> None:
    model = MODELS[name]()
    found = prunespec.inventory(model).structures
    assert [(s.pattern, s.structure, s.unit, s.units, s.heads) for s in found] == STRUCTURES[name]
    for row in found:
        rule = {"select": row.selector, "method": "l1_unstructured", "amount": 1, "group": {"unit": row.unit}}
        plan = prunespec.plan(model, {"version": 1, "rules": [rule]})
        assert [g.group.name for g in plan.groups] == list(row.names)
        assert all(g.group.size == row.units and g.group.structure == row.structure for g in plan.groups)


def test_units_pruned_before_are_counted() -> None:
    model = tiny_llama()
    rule = {
        "select": {"names": ["model.layers.*.mlp"]},
        "method": "l1_unstructured",
        "amount": 0.25,
        "group": {"unit": "channels"},
    }
    prunespec.apply(model, {"version": 1, "rules": [rule]})
    mlp = next(s for s in prunespec.inventory(model).structures if s.structure == "swiglu_mlp")
    assert mlp.count == 2 and mlp.pruned == 2 * 32


def test_cli_table_json_and_exit_codes(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    ref = str(ROOT / GPT2)
    assert main(["inspect", "--model", ref]) == 0
    out = capsys.readouterr().out
    assert "transformer.h.*.mlp.c_fc" in out and 'names: ["transformer.h.*.mlp.c_fc"]' in out
    assert "transformer.wte.weight = lm_head.weight" in out
    assert "decoder_blocks" in out and out.rstrip().endswith("(98,304 weight entries)")
    assert main(["inspect", "--model", ref, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["totals"]["modules"] == 16
    assert main(["inspect", "--model", "examples/nope.py:f"]) == 2
    assert "does not exist" in capsys.readouterr().err
    spec = tmp_path / "half.yaml"
    spec.write_text(
        "version: 1\nrules:\n  - select: {names: ['transformer.h.*.mlp.c_fc']}\n"
        "    method: l1_unstructured\n    amount: 0.5\n"
    )
    ckpt = tmp_path / "pruned.pt"
    assert main(["apply", str(spec), "--model", ref, "--out", str(ckpt)]) == 0
    capsys.readouterr()
    assert main(["inspect", "--model", ref, "--weights", str(ckpt), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    c_fc = next(r for r in data["modules"] if r["pattern"] == "transformer.h.*.mlp.c_fc")
    assert c_fc["parameters"][0]["masked"] == 2 and c_fc["parameters"][0]["zeros"] == 2 * 8192
