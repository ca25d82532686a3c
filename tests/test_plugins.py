"""Method plugins: the packages under plugins/ (installed with pip, as a user would), specs that name
their methods, the schema and CLI covering them, failure containment (with fake installed distributions),
and the contract check of ``prunespec.testing``.

The plugin packages must be installed into the test environment:
``pip install -e plugins/prunespec-foobar -e plugins/prunespec-nm`` (``make test`` does it).
"""

from __future__ import annotations

import copy
import importlib.metadata
import itertools
import json
import sys
import textwrap
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pluggy
import pytest
import torch
from pydantic import BaseModel
from torch import nn
from torch.nn.utils import prune

import prunespec
import prunespec.plugins
import prunespec.schema
from prunespec.cli import main
from prunespec.masks import Blocks
from prunespec.methods.base import MethodInfo, NoOptions
from prunespec.plugins import KNOWN_PLUGINS, PluginWarning, provider_hint
from prunespec.testing import check_method, registered_methods

BUILTIN_NAMES = {
    "identity",
    "random_unstructured",
    "l1_unstructured",
    "random_structured",
    "ln_structured",
    "wanda",
    "sparsegpt",
    "block_influence",
}
PLUGIN_PACKAGES = {"foobar": "prunespec-foobar", "nm": "prunespec-nm"}


def _installed() -> None:
    missing = [pkg for pkg in PLUGIN_PACKAGES.values() if _version(pkg) is None]
    if missing:
        pytest.fail(
            f"plugin packages {missing} are not installed in this environment: run "
            "`pip install -e plugins/prunespec-foobar -e plugins/prunespec-nm` (make test does)",
            pytrace=False,
        )


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test decides for itself whether plugins are restricted."""
    monkeypatch.delenv(prunespec.plugins.ENV_BUILTINS_ONLY, raising=False)
    monkeypatch.delenv(prunespec.plugins.ENV_ALLOW, raising=False)


@pytest.fixture(scope="module")
def registry() -> prunespec.MethodRegistry:
    """The built-ins and the two plugin packages, loaded through their entry points without a warning."""
    _installed()
    with warnings.catch_warnings():
        warnings.simplefilter("error", PluginWarning)
        return prunespec.load_methods(builtins_only=False, allow=list(PLUGIN_PACKAGES))


def write(tmp_path: Path, text: str, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    return path


def groups_of(mask: torch.Tensor, m: int) -> torch.Tensor:
    """A (out, in) mask as (out, in // m, m): the N:M groups along the input dimension."""
    return mask.reshape(mask.shape[0], -1, m)


# --- the installed packages ----------------------------------------------------------------------


def test_plugins_are_installed_and_found_through_entry_points(registry: prunespec.MethodRegistry) -> None:
    eps = {ep.name: ep for ep in importlib.metadata.entry_points(group="prunespec")}
    for method, package in PLUGIN_PACKAGES.items():
        assert eps[method].dist is not None and eps[method].dist.name == package
        info = registry[method]
        assert (info.provider, info.package, info.version) == (method, package, _version(package))
    assert set(registry) == BUILTIN_NAMES | set(PLUGIN_PACKAGES)
    assert registry.problems == []


def test_known_plugins_table_matches_the_packages(registry: prunespec.MethodRegistry) -> None:
    assert {name: KNOWN_PLUGINS[name] for name in PLUGIN_PACKAGES} == PLUGIN_PACKAGES
    for method, package in KNOWN_PLUGINS.items():
        if method in registry:
            assert registry[method].package == package


def test_make_plugin_manager_is_a_factory() -> None:
    pm1, sources, _ = prunespec.plugins.make_plugin_manager(builtins_only=True)
    pm2, _, _ = prunespec.plugins.make_plugin_manager(builtins_only=True)
    assert pm1 is not pm2
    assert list(sources) == [prunespec.plugins.BUILTIN]
    assert not any(isinstance(value, pluggy.PluginManager) for value in vars(prunespec.plugins).values())


# --- the tutorial's FooBar -----------------------------------------------------------------------


def test_tutorial_foobar_spec_reproduces_the_tutorial_mask(
    lenet: nn.Module, registry: prunespec.MethodRegistry, tmp_path: Path
) -> None:
    from prunespec_foobar import FooBarPruningMethod

    by_hand = copy.deepcopy(lenet)
    spec = write(
        tmp_path,
        """
        version: 1
        rules:
          - select: {names: [fc3], params: [bias]}
            method: foobar
        """,
    )
    prunespec.apply(lenet, spec, methods=registry)
    FooBarPruningMethod.apply(by_hand.fc3, "bias")

    assert lenet.fc3.bias_mask.tolist() == [0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.0, 1.0]
    assert torch.equal(lenet.fc3.bias_mask, by_hand.fc3.bias_mask)
    assert torch.equal(lenet.fc3.bias, by_hand.fc3.bias)
    assert lenet.state_dict().keys() == by_hand.state_dict().keys()
    hook = next(iter(lenet.fc3._forward_pre_hooks.values()))
    assert type(hook) is FooBarPruningMethod and hook._tensor_name == "bias"
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(lenet(x), by_hand(x))


# --- N:M ------------------------------------------------------------------------------------------


def test_2_4_keeps_exactly_2_of_every_4_along_the_input_dim(
    lenet: nn.Module, registry: prunespec.MethodRegistry, tmp_path: Path
) -> None:
    spec = write(
        tmp_path,
        """
        version: 1
        rules:
          - select: {types: [Linear]}
            method: nm
            options: {n: 2, m: 4}
        """,
    )
    report = prunespec.apply(lenet, spec, methods=registry)
    for name in ("fc1", "fc2", "fc3"):
        layer = lenet.get_submodule(name)
        mask = groups_of(layer.weight_mask, 4)
        assert torch.equal(mask.sum(-1), torch.full(mask.shape[:2], 2.0)), name
        magnitude = groups_of(layer.weight_orig.detach().abs(), 4)
        kept_min = magnitude.masked_fill(mask == 0, float("inf")).min(-1).values
        pruned_max = magnitude.masked_fill(mask == 1, -1.0).max(-1).values
        assert bool((kept_min >= pruned_max).all()), f"{name}: a pruned weight is larger than a kept one"
        assert report.tensors[f"{name}.weight"] == pytest.approx(0.5)


def test_2_4_on_top_of_an_earlier_rule_keeps_the_earlier_zeros(
    lenet: nn.Module, registry: prunespec.MethodRegistry, tmp_path: Path
) -> None:
    from prunespec_nm import NMPruning

    by_hand = copy.deepcopy(lenet)
    spec = write(
        tmp_path,
        """
        version: 1
        rules:
          - select: {types: [Linear]}
            method: l1_unstructured
            amount: 0.6
          - select: {types: [Linear]}
            method: nm
            options: {n: 2, m: 4}
        """,
    )
    prunespec.apply(lenet, spec, methods=registry)
    for name in ("fc1", "fc2", "fc3"):
        layer, ref = lenet.get_submodule(name), by_hand.get_submodule(name)
        prune.l1_unstructured(ref, "weight", amount=0.6)
        earlier = ref.weight_mask.clone()
        NMPruning.apply(ref, "weight", n=2, m=4)  # torch's own composition, through a PruningContainer
        mask = layer.weight_mask
        assert torch.equal(mask, ref.weight_mask), name
        assert not bool(mask[earlier == 0].any()), f"{name}: an entry pruned by the first rule came back"
        alive = groups_of(earlier, 4).sum(-1)
        assert torch.equal(groups_of(mask, 4).sum(-1), alive.clamp(max=2)), name
        assert bool((alive > 2).any()) and bool((alive < 2).any())  # both kinds of group were exercised
        hook = next(iter(layer._forward_pre_hooks.values()))
        assert isinstance(hook, prune.PruningContainer)
        assert [type(h) for h in hook] == [prune.L1Unstructured, NMPruning]


def test_nm_on_a_tensor_that_does_not_fit_is_a_plan_error_naming_it(
    registry: prunespec.MethodRegistry, tmp_path: Path
) -> None:
    model = nn.Sequential(nn.Linear(6, 5))  # weight (5, 6): 6 inputs, not a multiple of 4
    before = {k: v.clone() for k, v in model.state_dict().items()}
    spec = write(
        tmp_path,
        """
        version: 1
        rules:
          - select: {types: [Linear], params: [weight, bias]}
            method: nm
            options: {n: 2, m: 4}
        """,
    )
    with pytest.raises(prunespec.PlanError) as caught:
        prunespec.apply(model, spec, methods=registry)
    messages = [str(issue) for issue in caught.value.issues]
    assert len(messages) == 2
    assert "tensor 0.weight: nm:" in messages[0] and "size 6, which is not a multiple of m=4" in messages[0]
    assert "tensor 0.bias: nm:" in messages[1] and "2 or more dims" in messages[1]
    assert all(m.startswith(f"{spec}:3:") for m in messages)
    assert model.state_dict().keys() == before.keys() and not model._forward_pre_hooks


def test_plugin_hooks_round_trip_through_a_checkpoint(registry: prunespec.MethodRegistry, tmp_path: Path) -> None:
    from prunespec_foobar import FooBarPruningMethod
    from prunespec_nm import NMPruning

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 10))
    spec = {
        "version": 1,
        "rules": [
            {"select": {"names": ["0"]}, "method": "nm", "options": {"n": 1, "m": 4}},
            {"select": {"names": ["1"], "params": ["bias"]}, "method": "foobar"},
        ],
    }
    prunespec.apply(model, spec, methods=registry)
    prunespec.save(model, tmp_path / "pruned.pt", methods=registry)
    fresh = nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 10))
    prunespec.load(fresh, tmp_path / "pruned.pt", methods=registry)
    nm_hook = next(iter(fresh[0]._forward_pre_hooks.values()))
    assert type(nm_hook) is NMPruning and (nm_hook.n, nm_hook.m) == (1, 4)
    assert type(next(iter(fresh[1]._forward_pre_hooks.values()))) is FooBarPruningMethod
    assert torch.equal(fresh[0].weight_mask, model[0].weight_mask)
    assert fresh[1].bias_mask.tolist() == [0.0, 1.0] * 5
    x = torch.randn(3, 8)
    assert torch.equal(fresh(x), model(x))


# --- schema and CLI -------------------------------------------------------------------------------


def _condition(schema: dict[str, Any], method: str) -> dict[str, Any]:
    for condition in schema["$defs"]["Rule"]["allOf"]:
        if condition["if"]["properties"]["method"] == {"const": method}:
            then: dict[str, Any] = condition["then"]
            return then
    raise AssertionError(f"no schema condition for method {method!r}")


def test_schema_covers_the_plugins_options(capsys: pytest.CaptureFixture[str]) -> None:
    _installed()
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert {"foobar", "nm"} <= set(schema["$defs"]["Rule"]["properties"]["method"]["enum"])
    nm = _condition(schema, "nm")
    options = nm["properties"]["options"]
    assert options["required"] == ["n", "m"] and options["additionalProperties"] is False
    assert options["properties"]["n"]["type"] == "integer" and options["properties"]["n"]["minimum"] == 1
    assert "KEPT" in options["properties"]["n"]["description"]
    assert "not" in nm  # nm takes neither amount nor sparsity
    assert _condition(schema, "foobar")["properties"]["options"]["properties"] == {}

    assert main(["schema", "--builtins-only"]) == 0
    builtins = json.loads(capsys.readouterr().out)
    assert set(builtins["$defs"]["Rule"]["properties"]["method"]["enum"]) == BUILTIN_NAMES


def test_validate_rejects_a_non_integer_n_with_file_and_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    _installed()
    text = """
        version: 1
        rules:
          - select: {types: [Linear]}
            method: nm
            options: {n: "two", m: 4}
        """
    bad = write(tmp_path, text, "bad.yaml")
    good = write(tmp_path, text.replace('"two"', "2"), "good.yaml")
    assert main(["validate", str(good)]) == 0
    capsys.readouterr()
    assert main(["validate", str(bad)]) == 1
    err = capsys.readouterr().err
    line = bad.read_text().splitlines()[4]
    column = line.index('"two"') + 1
    assert f"{bad}:5:{column}: rules[0].options.n: expected an integer" in err
    assert "'two'" in err


def test_methods_json_lists_the_plugins_with_package_and_version(capsys: pytest.CaptureFixture[str]) -> None:
    _installed()
    assert main(["methods", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["nm"] == {
        "name": "nm",
        "granularity": "self-directed",  # prunespec's word: it takes no amount
        "unit": None,
        "scores": False,
        "global": False,
        "statistics": [],
        "PRUNING_TYPE": "global",
        "takes_amount": False,
        "provider": "nm",
        "package": "prunespec-nm",
        "version": _version("prunespec-nm"),
        "options": {"n": "required", "m": "required"},
        "summary": rows["nm"]["summary"],
    }
    assert "n largest-magnitude of every m" in rows["nm"]["summary"]
    foobar = rows["foobar"]
    assert (foobar["package"], foobar["version"], foobar["PRUNING_TYPE"], foobar["options"]) == (
        "prunespec-foobar",
        _version("prunespec-foobar"),
        "unstructured",
        {},
    )
    assert rows["l1_unstructured"]["package"] == "prunespec"
    assert main(["methods"]) == 0
    assert f"prunespec-nm {_version('prunespec-nm')}" in capsys.readouterr().out


# --- failure containment, with fake installed distributions ---------------------------------------

GOOD_PLUGIN = """
    import prunespec
    from torch.nn.utils import prune


    class KeepAll(prune.BasePruningMethod):
        '''Keep everything.'''

        PRUNING_TYPE = "unstructured"

        def compute_mask(self, t, default_mask):
            return default_mask.clone()


    @prunespec.hookimpl
    def prunespec_register_methods(register):
        register(KeepAll, name={name!r})
"""

FakePlugin = Callable[..., str]


def _line_of(code: str, text: str) -> int:
    return next(number for number, line in enumerate(code.splitlines(), 1) if text in line)


@pytest.fixture
def fake_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakePlugin]:
    """Install a fake distribution: ``make(dist, code, entry=..., value=...)`` writes ``<dist>-1.0.dist-info``
    (METADATA, entry_points.txt) and the plugin module into a folder on sys.path, so that
    ``importlib.metadata.entry_points(group="prunespec")`` finds it. Returns the module's name."""
    modules: list[str] = []

    def make(dist: str, code: str, *, entry: str | None = None, version: str = "1.0", value: str | None = None) -> str:
        module = f"_fake_{dist.replace('-', '_')}_{uuid.uuid4().hex[:8]}"
        root = tmp_path / module
        info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir(parents=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        (info / "entry_points.txt").write_text(f"[prunespec]\n{entry or dist} = {value or module}\n")
        (root / f"{module}.py").write_text(textwrap.dedent(code))
        monkeypatch.syspath_prepend(str(root))
        modules.append(module)
        return module

    yield make
    for module in modules:
        sys.modules.pop(module, None)


def test_a_plugin_that_fails_to_import_is_a_warning_and_the_others_load(fake_plugin: FakePlugin) -> None:
    _installed()
    module = fake_plugin("fake-broken", "import prunespec\nimport a_module_that_is_not_installed\n", entry="broken")
    with pytest.warns(PluginWarning) as record:
        methods = prunespec.load_methods()
    assert len(record) == 1
    message = str(record[0].message)
    assert "plugin 'broken' (package fake-broken 1.0) could not be loaded" in message
    assert "ModuleNotFoundError: No module named 'a_module_that_is_not_installed'" in message
    assert f"{module}.py:2 " in message  # where, in the plugin's code
    assert methods.problems == [message]
    assert set(methods) == BUILTIN_NAMES | {"foobar", "nm"}


def test_a_plugin_whose_hook_raises_is_a_warning_and_registers_nothing(fake_plugin: FakePlugin) -> None:
    _installed()
    code = textwrap.dedent(GOOD_PLUGIN + "\n        raise RuntimeError('cannot find my config file')\n")
    module = fake_plugin("fake-raising", code.format(name="fake_half_done"), entry="raising")
    line = _line_of(code, "raise RuntimeError")
    fake_plugin("fake-good", textwrap.dedent(GOOD_PLUGIN).format(name="fake_keep_all"))
    with pytest.warns(PluginWarning, match="cannot find my config file") as record:
        methods = prunespec.load_methods()
    message = str(record[0].message)
    assert "plugin 'raising' (package fake-raising 1.0) failed while registering its methods" in message
    assert "RuntimeError" in message
    assert f"{module}.py:{line} " in message
    assert "fake_half_done" not in methods  # what it registered before failing is dropped
    assert set(methods) == BUILTIN_NAMES | {"foobar", "nm", "fake_keep_all"}
    assert methods["fake_keep_all"].package == "fake-good"


def test_a_hook_with_a_wrong_signature_is_a_warning(fake_plugin: FakePlugin) -> None:
    _installed()
    code = "import prunespec\n\n@prunespec.hookimpl\ndef prunespec_register_methods(registry):\n    pass\n"
    fake_plugin("fake-wrong-hook", code, entry="wrong")
    with pytest.warns(PluginWarning, match=r"plugin 'wrong' \(package fake-wrong-hook 1\.0\) could not be loaded"):
        methods = prunespec.load_methods()
    assert {"foobar", "nm"} <= set(methods)


def test_a_plugin_registering_a_bad_method_is_a_warning_pointing_at_its_call(fake_plugin: FakePlugin) -> None:
    code = textwrap.dedent(GOOD_PLUGIN).format(name="Not-Snake-Case")
    module = fake_plugin("fake-bad-name", code, entry="bad_name")
    with pytest.warns(PluginWarning) as record:
        methods = prunespec.load_methods(allow=["bad_name", "nm"])
    message = str(record[0].message)
    assert "plugin 'bad_name' (package fake-bad-name 1.0) failed while registering its methods" in message
    assert "ValueError: method name 'Not-Snake-Case' must be snake_case" in message
    assert f"{module}.py:{_line_of(code, 'register(KeepAll')} " in message  # the call, not prunespec's internals
    assert "nm" in methods


def _one_warning(record: pytest.WarningsRecorder | list[warnings.WarningMessage]) -> str:
    messages = [str(w.message) for w in record if issubclass(w.category, PluginWarning)]
    assert len(messages) == 1, messages
    return messages[0]


def test_two_packages_registering_one_name_keep_the_first_and_warn_naming_both(
    fake_plugin: FakePlugin, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    fake_plugin("fake-a", textwrap.dedent(GOOD_PLUGIN).format(name="fake_same"), entry="a")
    fake_plugin("fake-b", textwrap.dedent(GOOD_PLUGIN).format(name="fake_same"), entry="b")
    with pytest.warns(PluginWarning) as record:
        methods = prunespec.load_methods(allow=["a", "b"])
    message = _one_warning(record)
    assert "method 'fake_same' is registered twice" in message
    assert "plugin 'a' (package fake-a 1.0)" in message and "plugin 'b' (package fake-b 1.0)" in message
    kept = methods["fake_same"].package
    dropped = ({"fake-a", "fake-b"} - {kept}).pop()
    assert f"the first is kept and {dropped}'s dropped" in message
    # specs that use other methods do not notice, and the CLI still runs
    assert set(methods) == BUILTIN_NAMES | {"fake_same"}
    spec = write(tmp_path, "version: 1\nrules:\n  - select: {types: [Linear]}\n    method: fake_same\n")
    assert main(["validate", str(spec)]) == 0
    assert main(["methods"]) == 0
    assert "registered twice" in capsys.readouterr().err


def test_a_plugin_taking_an_installed_plugins_name_loses_only_that_method(fake_plugin: FakePlugin) -> None:
    _installed()
    fake_plugin("fake-nm", textwrap.dedent(GOOD_PLUGIN).format(name="nm"), entry="other_nm")
    with pytest.warns(PluginWarning, match=r"method 'nm' is registered twice") as record:
        methods = prunespec.load_methods()
    message = _one_warning(record)
    assert "(package prunespec-nm " in message and "(package fake-nm 1.0)" in message
    assert {"foobar", "nm"} <= set(methods)


def test_a_plugin_taking_a_builtin_name_is_dropped_and_the_builtin_kept(fake_plugin: FakePlugin) -> None:
    fake_plugin("fake-l1", textwrap.dedent(GOOD_PLUGIN).format(name="l1_unstructured"), entry="l1")
    with pytest.warns(PluginWarning) as record:
        methods = prunespec.load_methods(allow=["l1"])
    message = _one_warning(record)
    assert message.startswith("plugin 'l1' (package fake-l1 1.0) registers method 'l1_unstructured'")
    assert "built-in is kept" in message
    assert methods["l1_unstructured"].cls is prune.L1Unstructured


def test_two_packages_with_one_entry_point_name_load_the_first_and_warn_naming_both(fake_plugin: FakePlugin) -> None:
    fake_plugin("fake-one", textwrap.dedent(GOOD_PLUGIN).format(name="fake_one"), entry="dup")
    fake_plugin("fake-two", textwrap.dedent(GOOD_PLUGIN).format(name="fake_two"), entry="dup")
    with pytest.warns(PluginWarning) as record:
        methods = prunespec.load_methods(allow=["dup"])
    message = _one_warning(record)
    assert "two plugins are named 'dup'" in message
    assert "fake-one 1.0" in message and "fake-two 1.0" in message
    assert len({"fake_one", "fake_two"} & set(methods)) == 1


MISSPELT_HOOK = """
    import prunespec

    @prunespec.hookimpl
    def prunespec_register_method(register):
        pass
"""


def test_a_misspelt_hook_is_one_warning_naming_the_plugin(fake_plugin: FakePlugin) -> None:
    fake_plugin("fake-typo", MISSPELT_HOOK, entry="typo")
    with pytest.warns(PluginWarning) as record:
        methods = prunespec.load_methods(allow=["typo"])
    message = _one_warning(record)
    assert message.startswith(
        "plugin 'typo' (package fake-typo 1.0) has hook implementation 'prunespec_register_method'"
    )
    assert "did you mean 'prunespec_register_methods'?" in message
    assert set(methods) == BUILTIN_NAMES


def test_bad_plugins_installed_with_a_good_one_are_one_warning_line_each(
    fake_plugin: FakePlugin, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    _installed()
    fake_plugin("fake-typo", MISSPELT_HOOK, entry="typo")
    fake_plugin("fake-l1", textwrap.dedent(GOOD_PLUGIN).format(name="l1_unstructured"), entry="l1")
    fake_plugin("fake-broken", "import a_module_that_is_not_installed\n", entry="broken")
    fake_plugin("fake-good", textwrap.dedent(GOOD_PLUGIN).format(name="fake_keep_all"), entry="good")
    with pytest.warns(PluginWarning) as record:
        methods = prunespec.load_methods()
    messages = sorted(str(w.message) for w in record)
    assert len(messages) == 3, messages
    for message, plugin in zip(messages, ["'broken'", "'l1'", "'typo'"], strict=True):
        assert message.startswith(f"plugin {plugin} (package fake-"), message
    assert set(methods) == BUILTIN_NAMES | {"foobar", "nm", "fake_keep_all"}
    assert methods["l1_unstructured"].cls is prune.L1Unstructured
    # the good plugin works from a spec, and the CLI prints each warning as one clean line
    spec = write(tmp_path, "version: 1\nrules:\n  - select: {types: [Linear]}\n    method: fake_keep_all\n")
    model = f"{Path(__file__).parent.parent / 'examples' / 'lenet.py'}:LeNet"
    assert main(["apply", str(spec), "--model", model]) == 0
    out, err = capsys.readouterr()
    assert "fake_keep_all" in out
    lines = err.splitlines()
    assert sorted(lines) == [f"warning: {message}" for message in messages]


NOT_A_MODEL = """
    import prunespec
    from torch.nn.utils import prune


    class KeepAll(prune.BasePruningMethod):
        PRUNING_TYPE = "unstructured"

        def compute_mask(self, t, default_mask):
            return default_mask.clone()


    class NoSchema:
        pass


    {models}


    @prunespec.hookimpl
    def prunespec_register_methods(register):
        register(KeepAll, name="fake_fine")
        register(KeepAll, name="fake_bad", options={options})
"""

BAD_OPTIONS = {
    "not a pydantic model": ("", "dict", "is not a pydantic BaseModel subclass"),
    "no JSON Schema": (
        "class Opts(pydantic.BaseModel):\n"
        "        model_config = pydantic.ConfigDict(arbitrary_types_allowed=True)\n"
        "        thing: NoSchema = NoSchema()",
        "Opts",
        "gives no JSON Schema",
    ),
    "a default_factory that raises": (
        "class Opts(pydantic.BaseModel):\n        k: int = pydantic.Field(default_factory=lambda: 1 // 0)",
        "Opts",
        "the default of its option 'k' cannot be built: ZeroDivisionError",
    ),
}


def _every_command_works(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = write(
        tmp_path, "version: 1\nrules:\n  - select: {types: [Linear]}\n    method: l1_unstructured\n    amount: 0.5\n"
    )
    model = f"{Path(__file__).parent.parent / 'examples' / 'lenet.py'}:LeNet"
    for argv in (
        ["plan", str(spec), "--model", model],
        ["apply", str(spec), "--model", model],
        ["validate", str(spec)],
        ["schema"],
        ["methods"],
        ["methods", "--json"],
    ):
        assert main(argv) == 0, (argv, capsys.readouterr())
    capsys.readouterr()
    assert main(["schema"]) == 0
    assert "l1_unstructured" in json.loads(capsys.readouterr().out)["$defs"]["Rule"]["properties"]["method"]["enum"]


@pytest.mark.parametrize("case", list(BAD_OPTIONS))
def test_a_method_with_a_broken_options_model_is_dropped_with_one_warning(
    case: str,
    fake_plugin: FakePlugin,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    models, options, words = BAD_OPTIONS[case]
    code = "import pydantic\n" + textwrap.dedent(NOT_A_MODEL).replace("{models}", models).replace("{options}", options)
    fake_plugin("fake-opts", code, entry="opts")
    with pytest.warns(PluginWarning) as record:
        methods = prunespec.load_methods(allow=["opts"])
    message = _one_warning(record)
    assert message.startswith("plugin 'opts' (package fake-opts 1.0): method 'fake_bad' is dropped: ")
    assert words in message
    assert set(methods) == BUILTIN_NAMES | {"fake_fine"}
    monkeypatch.setenv("PRUNESPEC_PLUGINS", "opts")
    _every_command_works(tmp_path, capsys)


def test_a_sys_exit_at_import_is_one_warning(
    fake_plugin: FakePlugin, capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_plugin("fake-exit", "import sys\nsys.exit(3)\n", entry="exits")
    with pytest.warns(PluginWarning) as record:
        methods = prunespec.load_methods(allow=["exits"])
    message = _one_warning(record)
    assert "plugin 'exits' (package fake-exit 1.0) could not be loaded" in message and "SystemExit: 3" in message
    assert set(methods) == BUILTIN_NAMES
    monkeypatch.setenv("PRUNESPEC_PLUGINS", "exits")
    _every_command_works(tmp_path, capsys)


def test_an_entry_point_that_does_not_parse_is_one_warning(fake_plugin: FakePlugin) -> None:
    fake_plugin("fake-value", "", entry="unparsable", value="not a module: at all")
    with pytest.warns(PluginWarning) as record:
        methods = prunespec.load_methods(allow=["unparsable"])
    message = _one_warning(record)
    assert message.startswith("plugin 'unparsable' (package fake-value 1.0) could not be loaded: its entry point")
    assert "'not a module: at all'" in message
    assert set(methods) == BUILTIN_NAMES


def test_a_spec_naming_a_method_of_a_plugin_that_failed_says_so(fake_plugin: FakePlugin, tmp_path: Path) -> None:
    fake_plugin("prunespec-never", "raise ImportError('libnever is missing')\n", entry="never")
    code = textwrap.dedent(GOOD_PLUGIN + "\n        raise RuntimeError('half way')\n").format(name="fake_half")
    fake_plugin("fake-half", code, entry="half")
    spec = write(tmp_path, "version: 1\nrules:\n  - select: {types: [Linear]}\n    method: never\n")
    with pytest.warns(PluginWarning):
        methods = prunespec.load_methods(allow=["never", "half"])
    with pytest.raises(prunespec.SpecError) as caught:
        prunespec.load_spec(spec, methods=methods)
    message = str(caught.value)
    assert "unknown method 'never'" in message
    assert "provided by the package prunespec-never, which is installed (1.0) but failed to load" in message
    assert "libnever is missing" in message
    # what a plugin registered before its hook failed is named too
    half = write(tmp_path, "version: 1\nrules:\n  - select: {types: [Linear]}\n    method: fake_half\n", "h.yaml")
    with pytest.raises(prunespec.SpecError, match=r"package fake-half, which is installed \(1\.0\) but failed"):
        prunespec.load_spec(half, methods=methods)
    # under --builtins-only, the plugin is installed but deliberately not loaded
    with pytest.raises(prunespec.SpecError) as caught:
        prunespec.load_spec(spec, methods=prunespec.load_methods(builtins_only=True))
    assert "prunespec-never, which is installed (1.0) but was not loaded because of --builtins-only" in str(
        caught.value
    )
    with pytest.warns(PluginWarning, match="half way"):
        only_half = prunespec.load_methods(allow=["half"])
    with pytest.raises(prunespec.SpecError, match=r"not loaded: the allow-list \(PRUNESPEC_PLUGINS or allow=\)"):
        prunespec.load_spec(spec, methods=only_half)


def test_the_schema_survives_a_method_that_skipped_the_registration_checks() -> None:
    registry = prunespec.load_methods(builtins_only=True)
    registry.add(MethodInfo.from_class(prune.Identity, name="fake_untyped", options=dict))
    schema = prunespec.schema.build_schema(registry)
    options = _condition(schema, "fake_untyped")["properties"]["options"]
    assert options["type"] == "object" and "gives no JSON Schema" in options["description"]
    assert "dim" in _condition(schema, "ln_structured")["properties"]["options"]["properties"]


def test_builtins_only_flag_and_env_var_load_no_plugin(
    fake_plugin: FakePlugin, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _installed()
    broken = fake_plugin("fake-broken", "raise ImportError('must not be imported')\n", entry="broken")
    methods = prunespec.load_methods(builtins_only=True)
    assert set(methods) == BUILTIN_NAMES and methods.problems == []
    assert main(["methods", "--json", "--builtins-only"]) == 0
    assert {row["name"] for row in json.loads(capsys.readouterr().out)} == BUILTIN_NAMES
    monkeypatch.setenv("PRUNESPEC_BUILTINS_ONLY", "1")
    assert set(prunespec.load_methods()) == BUILTIN_NAMES
    assert main(["methods", "--json"]) == 0
    assert {row["name"] for row in json.loads(capsys.readouterr().out)} == BUILTIN_NAMES
    assert broken not in sys.modules
    monkeypatch.setenv("PRUNESPEC_BUILTINS_ONLY", "0")
    with pytest.warns(PluginWarning, match="must not be imported"):
        assert {"foobar", "nm"} <= set(prunespec.load_methods())


def test_allow_list_loads_only_the_named_plugins(fake_plugin: FakePlugin, monkeypatch: pytest.MonkeyPatch) -> None:
    _installed()
    broken = fake_plugin("fake-broken", "raise ImportError('must not be imported')\n", entry="broken")
    assert set(prunespec.load_methods(allow=["nm"])) == BUILTIN_NAMES | {"nm"}
    assert set(prunespec.load_methods(allow=["prunespec-foobar"])) == BUILTIN_NAMES | {"foobar"}  # a package name
    assert set(prunespec.load_methods(allow=["Prunespec_NM"])) == BUILTIN_NAMES | {"nm"}  # normalised like pip
    monkeypatch.setenv("PRUNESPEC_PLUGINS", "foobar, nm")
    assert set(prunespec.load_methods()) == BUILTIN_NAMES | {"foobar", "nm"}
    assert broken not in sys.modules
    monkeypatch.setenv("PRUNESPEC_PLUGINS", "nmm")
    with pytest.warns(PluginWarning, match=r"names 'nmm', which is no installed plugin; installed plugins: .*nm"):
        assert set(prunespec.load_methods()) == BUILTIN_NAMES


def test_provider_hint(fake_plugin: FakePlugin, monkeypatch: pytest.MonkeyPatch) -> None:
    _installed()
    assert provider_hint("no_such_method") is None
    hint = provider_hint("nm")
    assert hint is not None and hint.startswith("method 'nm' is provided by the package prunespec-nm, which is")
    assert f"installed ({_version('prunespec-nm')}) but was not loaded" in hint
    monkeypatch.setitem(KNOWN_PLUGINS, "magic", "prunespec-magic")
    assert (
        provider_hint("magic")
        == "method 'magic' is provided by the package prunespec-magic: pip install prunespec-magic"
    )
    fake_plugin("prunespec-magic", "raise ImportError('libmagic is missing')\n", entry="magic")
    with pytest.warns(PluginWarning):
        methods = prunespec.load_methods(allow=["magic"])
    hint = provider_hint("magic", methods)
    assert hint is not None and "installed (1.0) but failed to load" in hint and "libmagic is missing" in hint


def test_a_spec_naming_a_missing_plugins_method_is_a_spec_error(tmp_path: Path) -> None:
    spec = write(tmp_path, "version: 1\nrules:\n  - select: {types: [Linear]}\n    method: nm\n")
    with pytest.raises(prunespec.SpecError, match=r"spec\.yaml:4:13: rules\[0\]\.method: unknown method 'nm'"):
        prunespec.load_spec(spec, methods=prunespec.load_methods(builtins_only=True))


def test_a_spec_naming_a_missing_plugins_method_names_its_package(tmp_path: Path) -> None:
    spec = write(tmp_path, "version: 1\nrules:\n  - select: {types: [Linear]}\n    method: nm\n")
    with pytest.raises(prunespec.SpecError) as caught:
        prunespec.load_spec(spec, methods=prunespec.load_methods(builtins_only=True))
    assert "unknown method 'nm'" in str(caught.value)
    assert "provided by the package prunespec-nm" in str(caught.value)


# --- the contract check ---------------------------------------------------------------------------

BUILTIN_OPTIONS: dict[str, dict[str, Any]] = {"random_structured": {"dim": 0}, "ln_structured": {"n": 2, "dim": 0}}


@pytest.mark.parametrize("name", sorted(BUILTIN_NAMES))
def test_builtins_keep_the_contract(name: str, methods: prunespec.MethodRegistry) -> None:
    info = check_method(methods[name], options=BUILTIN_OPTIONS.get(name))
    assert info is methods[name]


def test_builtins_keep_the_contract_with_counts_and_other_dims(methods: prunespec.MethodRegistry) -> None:
    check_method(methods["l1_unstructured"], amount=3)
    check_method(methods["random_unstructured"], amount=0.3, dtypes=[torch.float32])
    check_method(methods["ln_structured"], options={"n": 1, "dim": -1}, amount=2, dtypes=[torch.float32])
    check_method(methods["random_structured"], options={"dim": 1}, amount=0.25, dtypes=[torch.float32])


def test_plugins_keep_the_contract(registry: prunespec.MethodRegistry) -> None:
    check_method(registry["foobar"])
    check_method(registry["nm"], options={"n": 2, "m": 4})


def test_registered_methods_reads_a_plugins_hook() -> None:
    _installed()
    import prunespec_foobar
    import prunespec_nm

    assert set(registered_methods(prunespec_foobar)) == {"foobar"}
    assert registered_methods(prunespec_nm)["nm"].cls is prunespec_nm.NMPruning
    from prunespec.methods import builtin

    assert set(registered_methods(builtin)) == BUILTIN_NAMES


class _Base(prune.BasePruningMethod):
    PRUNING_TYPE = "unstructured"

    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        return default_mask.clone()


class Unprunes(_Base):
    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(default_mask)


class WrongShape(_Base):
    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        return default_mask.reshape(-1).clone()


class WrongDtype(_Base):
    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        return default_mask.to(torch.float64)


class NotBinary(_Base):
    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        return default_mask * 0.5


class MutatesDefault(_Base):
    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        default_mask.view(-1)[0] = 0
        return default_mask


class Raises(_Base):
    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("out of ideas")


class FloorsTheAmount(_Base):
    """Prunes int(amount * n) of the smallest entries: torch rounds instead."""

    def __init__(self, amount: float) -> None:
        self.amount = amount

    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        mask = default_mask.clone()
        k = int(self.amount * t.numel())
        if k:
            mask.view(-1)[torch.topk(t.abs().view(-1), k, largest=False).indices] = 0
        return mask


_calls = itertools.count()


class NotDeterministic(_Base):
    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        mask = default_mask.clone()
        mask.view(-1)[next(_calls) % t.numel()] = 0
        return mask


class NotPicklable(_Base):
    def __init__(self) -> None:
        self.score = lambda t: t.abs()


class PartlyStructured(_Base):
    """Claims to be structured but prunes single entries."""

    PRUNING_TYPE = "structured"

    def __init__(self, amount: float, dim: int = 0) -> None:
        self.amount, self.dim = amount, dim

    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        mask = default_mask.clone()
        mask.view(-1)[:: t.shape[self.dim]] = 0
        return mask


class RenamesItsOption(_Base):
    def __init__(self, k: int = 1) -> None:
        self.keep = k


class ScoresBackwards(prunespec.PruningMethod):
    """Claims to rank as torch's L1 does, but scores the largest lowest."""

    name = "scores_backwards"
    hook_class = prune.L1Unstructured

    def importance(self, t: torch.Tensor) -> torch.Tensor:
        return -t.abs()


class NotElementwise(ScoresBackwards):
    def importance(self, t: torch.Tensor) -> torch.Tensor:
        return t.abs().cumsum(-1)


class ScoresOfTheWrongShape(prunespec.PruningMethod):
    name = "wrong_shape_scores"

    def score(self, ctx: prunespec.MaskContext) -> torch.Tensor:
        return ctx.values.abs().reshape(-1)


class MiscountsBlocks(prunespec.PruningMethod):
    """Declares 2x2 blocks as its unit, but prunes every block whatever the amount."""

    name = "miscounts_blocks"
    unit = "blocks"

    @classmethod
    def units(cls, options: Any) -> Blocks:
        return Blocks(2, 2)

    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(default_mask)


class NeedsK(_Base):
    def __init__(self, k: int) -> None:
        self.k = k


@pytest.mark.parametrize(
    ("cls", "kwargs", "rule", "detail"),
    [
        (Unprunes, {}, "respects default_mask", "entries to 1 that are 0 in default_mask"),
        (WrongShape, {}, "mask shape and dtype", "mask shape [128] != tensor shape [8, 16]"),
        (WrongDtype, {}, "mask shape and dtype", "mask dtype torch.float64 != tensor dtype torch.float32"),
        (NotBinary, {}, "binary", "values other than 0 and 1: [0.5]"),
        (MutatesDefault, {}, "inputs untouched", "changed `t` or `default_mask` in place"),
        (Raises, {}, "mask shape and dtype", "compute_mask raised RuntimeError: out of ideas"),
        (FloorsTheAmount, {"amount": 0.3}, "honours the amount", "should prune 5 (round(amount * remaining)"),
        (NotDeterministic, {}, "deterministic under a seed", "gave different masks"),
        (NotPicklable, {}, "pickle-able", "pickling the method object failed"),
        (PartlyStructured, {"amount": 0.5}, "honours the amount", "only partly pruned"),
        (NeedsK, {"options_model": NoOptions}, "options schema", "constructor arguments ['k']"),
        (RenamesItsOption, {"options": {"k": 2}}, "options kept on the instance", "option k=2 is not the method"),
        (ScoresBackwards, {}, "scores agree with compute_mask", "compute_mask pruned a unit scoring"),
        (NotElementwise, {"shapes": [(4, 8)]}, "scores agree with compute_mask", "the scores are not elementwise"),
        (ScoresOfTheWrongShape, {}, "scores agree with compute_mask", "expected [8, 16] (one score per unit: entries)"),
        (MiscountsBlocks, {}, "works through prunespec", "of 32 blocks should prune 16, pruned 32"),
    ],
)
def test_check_method_catches_a_broken_method(cls: type, kwargs: dict[str, Any], rule: str, detail: str) -> None:
    with pytest.raises(AssertionError) as caught:
        check_method(cls, name="broken_one", **kwargs)
    message = str(caught.value)
    assert message.startswith(f"method 'broken_one' ({cls.__module__}.{cls.__qualname__}) breaks the method contract")
    assert f"rule '{rule}': " in message
    assert detail in message


def test_check_method_explains_what_it_cannot_even_start() -> None:
    with pytest.raises(AssertionError, match=r"method 'Bad-Name' breaks the rule 'registers': .*snake_case"):
        check_method(_Base, name="Bad-Name")
    with pytest.raises(AssertionError, match=r"rule 'options': options=\{\} do not validate \(n: Field required"):
        check_method(registered_methods(__import__("prunespec_nm"))["nm"])
    with pytest.raises(AssertionError, match=r"rule 'shapes': check_tensor refuses every shape tried"):
        check_method(registered_methods(__import__("prunespec_nm"))["nm"], options={"n": 1, "m": 3})


class _KOptions(BaseModel):
    k: int = 1


class OptionsCoverTheConstructor(_Base):
    def __init__(self, k: int = 1) -> None:
        self.k = k


def test_check_method_accepts_an_options_model_and_keyword_arguments() -> None:
    info = check_method(OptionsCoverTheConstructor, name="with_k", options={"k": 2}, options_model=_KOptions)
    assert info.options_model is _KOptions and not info.takes_amount


class TwoOptions(_Base):
    def __init__(self, n: int = 2, m: int = 4) -> None:
        self.n, self.m = n, m


def test_adapted_class_keeps_every_constructor_keyword_as_an_option() -> None:
    # inspect.signature(cls) has no `self`: the first keyword argument is an option like the others
    info = MethodInfo.from_class(TwoOptions, name="two_options")
    assert set(info.options_model.model_fields) == {"n", "m"}
    check_method(TwoOptions, name="two_options", options={"n": 1, "m": 3})
