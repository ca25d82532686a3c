"""A model's repeated blocks (prunespec.blocks): detected in transformers models built from tiny configs,
named by patterns, and which block a module lies in."""

from __future__ import annotations

import pytest
from torch import nn

from prunespec.blocks import block_of, find_blocks
from prunespec.patterns import PatternError

transformers = pytest.importorskip("transformers")

from tiny_transformers import tiny_bert, tiny_gpt2, tiny_llama  # noqa: E402


@pytest.mark.parametrize(
    ("factory", "expected"),
    [
        (tiny_llama, ["model.layers.0", "model.layers.1"]),
        (tiny_gpt2, ["transformer.h.0", "transformer.h.1"]),
        (tiny_bert, ["bert.encoder.layer.0", "bert.encoder.layer.1"]),
    ],
)
def test_blocks_are_detected_in_transformers_models(factory: type, expected: list[str]) -> None:
    model = factory()
    assert find_blocks(model) == expected
    # the same through a pattern
    assert find_blocks(model, expected[0].rsplit(".", 1)[0] + ".*") == expected


def test_a_pattern_keeps_the_outermost_matches_in_module_order() -> None:
    model = tiny_llama()
    assert find_blocks(model, "model.layers.**") == ["model.layers"]  # everything below is nested in it
    assert find_blocks(model, "re:model\\.layers\\.[0-9]+(\\.mlp)?") == ["model.layers.0", "model.layers.1"]
    assert find_blocks(model, "**.mlp") == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert find_blocks(model, "**") == [name for name, _ in model.named_children()]
    assert find_blocks(model, "nothing.*") == []
    with pytest.raises(PatternError):
        find_blocks(model, "re:(a+)+")


def test_plain_sequential_models_have_no_detected_blocks_but_patterns_work() -> None:
    flat = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    assert find_blocks(flat) == []
    assert find_blocks(flat, "*") == ["0", "1", "2"]
    nested = nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), nn.Sequential(nn.Linear(4, 2)))
    assert find_blocks(nested, "*") == ["0", "1"]
    assert find_blocks(nested, "*.0") == ["0.0", "1.0"]


class Stack(nn.Module):
    """Two ModuleLists of repeated blocks: the one holding more parameters wins."""

    def __init__(self) -> None:
        super().__init__()
        self.small = nn.ModuleList([nn.Linear(2, 2) for _ in range(4)])
        self.big = nn.ModuleList([nn.Sequential(nn.Linear(8, 8)) for _ in range(2)])
        self.mixed = nn.ModuleList([nn.Linear(64, 64), nn.ReLU()])  # no two children of one class
        self.single = nn.ModuleList([nn.Linear(64, 64)])


def test_detection_picks_the_modulelist_of_repeated_blocks_with_the_most_parameters() -> None:
    assert find_blocks(Stack()) == ["big.0", "big.1"]
    experts = nn.ModuleList([nn.Linear(3, 3), nn.Linear(3, 3), nn.ReLU()])  # two of one class suffice
    assert find_blocks(nn.Sequential(experts)) == ["0.0", "0.1", "0.2"]
    assert find_blocks(nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])) == ["0", "1"]  # the root itself


def test_block_of() -> None:
    blocks = ["model.layers.0", "model.layers.1", "model.layers.10"]
    assert block_of("model.layers.1.mlp.up_proj", blocks) == "model.layers.1"
    assert block_of("model.layers.10", blocks) == "model.layers.10"
    assert block_of("model.layers.10.self_attn", blocks) == "model.layers.10"
    assert block_of("model.layers.100.mlp", blocks) is None  # a prefix of the name, not a parent
    assert block_of("lm_head", blocks) is None
    assert block_of("anything", []) is None
