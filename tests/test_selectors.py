"""Name globs, full-match regexes and type entries."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prunespec.selectors import compile_name_pattern, nearest_names, nearest_types, select_modules


@pytest.mark.parametrize(
    ("pattern", "name", "expected"),
    [
        ("features.*", "features.0", True),
        ("features.*", "features.0.conv", False),  # `*` never crosses a dot
        ("features.*", "features", False),
        ("*", "fc1", True),
        ("*", "a.b", False),
        ("**", "a.b.c", True),
        ("**.c_fc", "c_fc", True),  # `**` matches zero segments too
        ("**.c_fc", "transformer.h.0.mlp.c_fc", True),
        ("**.c_fc", "transformer.h.0.mlp.c_fc2", False),
        ("transformer.h.*.mlp.c_fc", "transformer.h.11.mlp.c_fc", True),
        ("transformer.h.*.mlp.c_fc", "transformer.h.1.x.mlp.c_fc", False),
        ("encoder.**", "encoder", True),
        ("encoder.**", "encoder.layer.3.out", True),
        ("encoder.**", "encoder2.layer", False),
        ("a.**.b", "a.b", True),
        ("a.**.b", "a.x.y.b", True),
        ("a.**.b", "a.x.y.bc", False),
        ("fc?", "fc1", True),
        ("fc?", "fc10", False),
        ("fc[12]", "fc2", True),
        ("fc[!12]", "fc2", False),
        ("fc[!12]", "fc3", True),
        ("layer.0", "layerX0", False),  # dots are literal
        ("re:fc[12]", "fc1", True),
        ("re:fc[12]", "fc10", False),  # full match, not prefix (transformers#47990)
        ("re:.*mlp.gate", "model.layers.0.mlp.gate_proj", False),
        ("re:.*mlp.gate", "model.layers.0.mlp.gate", True),
        ("re:model.layers.1", "model.layers.10", False),
    ],
)
def test_name_patterns(pattern: str, name: str, expected: bool) -> None:
    assert (compile_name_pattern(pattern).fullmatch(name) is not None) is expected


@pytest.mark.parametrize("pattern", ["re:fc[", "a.b**", "fc[12"])
def test_malformed_patterns_raise(pattern: str) -> None:
    with pytest.raises(ValueError):
        compile_name_pattern(pattern)


class Conv1D(nn.Module):  # a non-torch.nn type, like transformers' Conv1D
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(2, 2))


class Special(nn.Linear):
    pass


def modules() -> list[tuple[str, nn.Module]]:
    model = nn.Sequential()
    model.add_module("fc1", nn.Linear(2, 2))
    model.add_module("fc10", Special(2, 2))
    model.add_module("proj", Conv1D())
    model.add_module("conv", nn.Conv2d(1, 1, 1))
    return list(model.named_modules())


def names(selection: list[tuple[str, nn.Module, str]]) -> list[str]:
    return [name for name, _, _ in selection]


def test_types_match_by_isinstance_short_name_and_dotted_path() -> None:
    assert names(select_modules(modules(), ["Linear"], None, []).modules) == ["fc1", "fc10"]
    assert names(select_modules(modules(), ["torch.nn.Linear"], None, []).modules) == ["fc1", "fc10"]
    assert names(select_modules(modules(), ["Special"], None, []).modules) == ["fc10"]
    assert names(select_modules(modules(), [f"{__name__}.Conv1D"], None, []).modules) == ["proj"]


def test_types_and_names_intersect_and_exclude_removes() -> None:
    selection = select_modules(modules(), ["Linear"], ["fc*"], ["fc10"])
    assert names(selection.modules) == ["fc1"]
    assert selection.modules[0][2] == "types: Linear, names: fc*"
    assert selection.unmatched == []


def test_unmatched_entries_are_reported_each() -> None:
    selection = select_modules(modules(), ["Linear", "Conv3d"], ["fc1", "nope.*"], ["ghost"])
    assert selection.unmatched == [("types", 1, "Conv3d"), ("names", 1, "nope.*"), ("exclude", 0, "ghost")]


def test_dotted_path_of_a_module_not_imported_matches_nothing_and_imports_nothing() -> None:
    import sys

    assert "some_uninstalled_pkg" not in sys.modules
    selection = select_modules(modules(), ["some_uninstalled_pkg.layers.Linear"], None, [])
    assert selection.modules == []
    assert "some_uninstalled_pkg" not in sys.modules


def test_nearest_suggestions() -> None:
    assert nearest_types("Conv3d", modules())[0] == "Conv2d"
    assert "fc1" in nearest_names("fc", modules())


def test_selection_says_why_it_is_empty() -> None:
    from prunespec.selectors import why_nothing

    excluded = select_modules(modules(), ["Linear"], None, ["fc*"])
    assert excluded.modules == [] and excluded.candidates == ["fc1", "fc10"] and excluded.excluded == ["fc1", "fc10"]
    assert "`exclude` removed every module the rule selected (fc1, fc10)" in why_nothing(excluded)[0]
    disjoint = select_modules(modules(), ["Conv2d"], ["fc1"], [])
    assert disjoint.matched == {"types": ["conv"], "names": ["fc1"]} and disjoint.candidates == []
    assert "no module matches `types` and `names` at once" in why_nothing(disjoint)[0]


def test_nearest_params_prefers_the_models_own() -> None:
    from prunespec.selectors import nearest_params

    assert nearest_params("wieght", modules())[0] == "weight"
    assert nearest_params("in_proj_wieght", [])[0] == "in_proj_weight"


@pytest.mark.parametrize("pattern", ["re:(a+)+", "re:(.)\\1", "*a*a*a*a*a"])
def test_patterns_that_can_take_exponential_time_raise(pattern: str) -> None:
    with pytest.raises(ValueError, match="time"):
        compile_name_pattern(pattern)
