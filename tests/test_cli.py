"""The command line, driven in-process through ``prunespec.cli.main`` (and once as ``python -m prunespec``).

Models come from ``examples/lenet.py:make_lenet`` (seed 0), so the direct torch calls can be run on the
very same weights.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import EXAMPLES, ROOT, SPECS
from lenet import LeNet
from torch import nn
from torch.nn.utils import prune

import prunespec
import prunespec.cli
from prunespec.cli import main
from prunespec.methods.block_influence import BlockInfluence
from prunespec.methods.sparsegpt import SparseGPT
from prunespec.methods.wanda import Wanda

MODEL = f"{EXAMPLES / 'lenet.py'}:make_lenet"
SCHEMA = ROOT / "schemas" / "prunespec.schema.json"
BUILTINS = {
    "identity": prune.Identity,
    "random_unstructured": prune.RandomUnstructured,
    "l1_unstructured": prune.L1Unstructured,
    "random_structured": prune.RandomStructured,
    "ln_structured": prune.LnStructured,
    "wanda": Wanda,
    "sparsegpt": SparseGPT,
    "block_influence": BlockInfluence,
}
ALL_SPECS = sorted(SPECS.glob("*.yaml"))


def run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def direct_lenet() -> LeNet:
    """The model ``make_lenet`` builds: LeNet() with weights drawn from seed 0."""
    torch.manual_seed(0)
    return LeNet()


def torch_every_layer_type(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            prune.l1_unstructured(module, name="weight", amount=0.2)
        elif isinstance(module, nn.Linear):
            prune.l1_unstructured(module, name="weight", amount=0.4)


def torch_iterative_conv1(model: nn.Module) -> None:
    torch.manual_seed(0)  # the spec's seed
    prune.random_unstructured(model.conv1, name="weight", amount=0.3)
    prune.l1_unstructured(model.conv1, name="bias", amount=3)
    prune.ln_structured(model.conv1, name="weight", amount=0.5, n=2, dim=0)


def torch_global_l1(model: nn.Module) -> None:
    parameters = [(model.get_submodule(n), "weight") for n in ("conv1", "conv2", "fc1", "fc2", "fc3")]
    prune.global_unstructured(parameters, pruning_method=prune.L1Unstructured, amount=0.2)


TORCH: dict[str, Callable[[nn.Module], None]] = {
    "every_layer_type.yaml": torch_every_layer_type,
    "iterative_conv1.yaml": torch_iterative_conv1,
    "global_l1.yaml": torch_global_l1,
}


def mask_counts(state_dict: dict[str, torch.Tensor]) -> dict[str, tuple[int, int]]:
    """``"conv1.weight"`` -> (zeros, numel) for every mask in a state_dict."""
    return {
        key.removesuffix("_mask"): (int((v == 0).sum()), v.numel())
        for key, v in state_dict.items()
        if key.endswith("_mask")
    }


def report_counts(report: dict[str, object]) -> dict[str, tuple[int, int]]:
    tensors = report["tensors"]
    assert isinstance(tensors, dict)
    return {name: (t["zeros"], t["numel"]) for name, t in tensors.items()}


# --- validate, schema, methods ---------------------------------------------------------------------


def test_validate_accepts_every_example_spec(capsys: pytest.CaptureFixture[str]) -> None:
    assert ALL_SPECS
    code, out, err = run(capsys, "validate", *ALL_SPECS)
    assert code == 0, err
    for path in ALL_SPECS:
        assert f"{path}: valid" in out


def test_validate_json(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nrules: []\n", encoding="utf-8")
    code, out, _ = run(capsys, "validate", "--json", SPECS / "global_l1.yaml", bad)
    assert code == 1
    results = json.loads(out)
    assert [(r["spec"], r["valid"]) for r in results] == [(str(SPECS / "global_l1.yaml"), True), (str(bad), False)]
    assert results[0]["issues"] == [] and results[1]["issues"]


BAD_SPECS = {
    # name: (spec text, the text the error points at, words the message must hold)
    "unknown key": (
        "version: 1\nrules:\n  - select: {names: [conv1]}\n    method: l1_unstructured\n    amount: 0.3\n"
        "    amout: 2\n",
        "amout",
        "unknown key 'amout'",
    ),
    "amount out of range": (
        "version: 1\nrules:\n  - select: {names: [conv1]}\n    method: l1_unstructured\n    amount: 1.5\n",
        "1.5",
        "1.5",
    ),
    "unknown method": (
        "version: 1\nrules:\n  - select: {names: [conv1]}\n    method: l1_unstructurd\n    amount: 0.3\n",
        "l1_unstructurd",
        "unknown method 'l1_unstructurd'",
    ),
}


@pytest.mark.parametrize("case", list(BAD_SPECS))
def test_validate_reports_file_line_column_without_traceback(
    case: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    text, target, words = BAD_SPECS[case]
    path = tmp_path / "bad.yaml"
    path.write_text(text, encoding="utf-8")
    line_index = next(i for i, line in enumerate(text.splitlines()) if target in line)
    column = text.splitlines()[line_index].index(target) + 1
    code, out, err = run(capsys, "validate", path)
    assert code == 1
    assert f"{path}:{line_index + 1}:{column}:" in err
    assert words in err
    assert "Traceback" not in err and "Traceback" not in out
    assert "valid" not in out


def test_validate_reports_yaml_syntax_errors_located(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("version: 1\nrules:\n  - select: {names: [conv1]\n    method: l1_unstructured\n", encoding="utf-8")
    code, _, err = run(capsys, "validate", path)
    assert code == 1
    assert re.search(re.escape(str(path)) + r":\d+:\d+: invalid YAML", err), err
    assert "Traceback" not in err


def test_schema_equals_the_committed_schema(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "schema", "--builtins-only")
    assert code == 0
    assert json.loads(out) == json.loads(SCHEMA.read_text(encoding="utf-8"))


def test_methods_table_lists_the_builtins(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "methods", "--builtins-only")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["method", "prunes", "amount", "counts"]  # prunespec's words, not torch's
    rows = {line.split()[0]: line.split()[1:3] for line in lines[2:] if line.strip()}
    assert rows == {
        "identity": ["self-directed", "-"],
        "random_unstructured": ["unstructured", "entries"],
        "l1_unstructured": ["unstructured", "entries"],
        "random_structured": ["structured", "channels"],
        "ln_structured": ["structured", "channels"],
        "wanda": ["unstructured", "entries"],
        "sparsegpt": ["unstructured", "entries"],
        "block_influence": ["unstructured", "entries"],
    }


def test_methods_json_lists_the_builtins(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "methods", "--json", "--builtins-only")
    assert code == 0
    rows = json.loads(out)
    assert {r["name"]: r["PRUNING_TYPE"] for r in rows} == {name: cls.PRUNING_TYPE for name, cls in BUILTINS.items()}
    by_name = {r["name"]: r for r in rows}
    assert by_name["identity"]["takes_amount"] is False
    assert by_name["ln_structured"]["options"] == {"dim": "required", "n": "required"}
    assert by_name["random_structured"]["options"] == {"dim": "required"}
    # without --builtins-only (whatever plugins are installed) the built-ins are still all there
    code, out, _ = run(capsys, "methods", "--json")
    assert code == 0
    listed = {r["name"]: r["PRUNING_TYPE"] for r in json.loads(out)}
    assert {name: listed.get(name) for name in BUILTINS} == {name: cls.PRUNING_TYPE for name, cls in BUILTINS.items()}


# --- plan ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ALL_SPECS, ids=lambda p: p.name)
def test_plan_prints_a_table_and_json(
    spec: Path, capsys: pytest.CaptureFixture[str], methods: prunespec.MethodRegistry
) -> None:
    expected = prunespec.plan(direct_lenet(), spec, methods=methods)
    code, out, err = run(capsys, "plan", spec, "--model", MODEL, "--builtins-only")
    assert code == 0, err
    rules, steps = len(expected.spec.rules), len(expected.steps)
    assert out.startswith(f"Plan: {rules} rule{'s' * (rules != 1)}, {steps} step{'s' * (steps != 1)}")
    assert re.search(r"^#\s+rule\s+tensor\s+shape\s+method", out, re.MULTILINE)
    for step in expected.steps:
        assert step.tensor.name in out
    code, out, err = run(capsys, "plan", spec, "--model", MODEL, "--builtins-only", "--json")
    assert code == 0, err
    assert json.loads(out) == json.loads(json.dumps(expected.to_dict(), default=str))


# --- apply and report ------------------------------------------------------------------------------


@pytest.mark.parametrize("spec_name", list(TORCH))
def test_apply_out_saves_the_direct_torch_masks_and_report_reads_them(
    spec_name: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out_path = tmp_path / "pruned.pt"
    code, out, err = run(capsys, "apply", SPECS / spec_name, "--model", MODEL, "--out", out_path, "--json")
    assert code == 0, err
    applied = json.loads(out)
    assert applied["out"] == str(out_path)

    twin = direct_lenet()
    TORCH[spec_name](twin)
    expected = twin.state_dict()

    saved = torch.load(out_path, weights_only=True)
    state = saved["state_dict"]
    assert list(state) == list(expected)
    for key, value in expected.items():
        assert torch.equal(state[key], value), key
    assert saved["prunespec"]["format"] == 1
    assert saved["prunespec"]["spec"]["rules"]

    direct = mask_counts(expected)
    assert report_counts(applied["report"]) == direct
    code, out, err = run(capsys, "report", out_path, "--model", MODEL, "--json")
    assert code == 0, err
    reported = json.loads(out)
    assert report_counts(reported) == direct
    assert reported["tensors"].keys() == applied["report"]["tensors"].keys()
    for name, (zeros, numel) in direct.items():
        assert reported["tensors"][name]["sparsity"] == applied["report"]["tensors"][name]["sparsity"] == zeros / numel
    total = sum(numel for _, numel in direct.values())
    assert reported["global_sparsity"] == applied["report"]["global_sparsity"]
    assert reported["global_sparsity"] == sum(zeros for zeros, _ in direct.values()) / total

    code, out, err = run(capsys, "report", out_path, "--model", MODEL)
    assert code == 0, err
    for name, (zeros, _) in direct.items():
        assert re.search(rf"^{re.escape(name)}\s.*\s{zeros:,}\s", out, re.MULTILINE), (name, out)


def test_apply_prints_plan_and_report(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out_path = tmp_path / "pruned.pt"
    code, out, err = run(capsys, "apply", SPECS / "every_layer_type.yaml", "--model", MODEL, "--out", out_path)
    assert code == 0, err
    assert out.startswith("Plan: 2 rules")
    assert f"Saved to {out_path}" in out
    assert out_path.is_file()


def test_apply_finalize_saves_no_masks(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    out_path = tmp_path / "final.pt"
    spec = SPECS / "iterative_conv1.yaml"
    code, _, err = run(capsys, "apply", spec, "--model", MODEL, "--out", out_path, "--finalize")
    assert code == 0, err
    saved = torch.load(out_path, weights_only=True)
    state = saved["state_dict"]
    assert not [k for k in state if k.endswith(("_mask", "_orig"))]
    assert saved["prunespec"]["spec"]["finalize"] is True

    twin = direct_lenet()
    torch_iterative_conv1(twin)
    prune.remove(twin.conv1, "weight")
    prune.remove(twin.conv1, "bias")
    expected = twin.state_dict()
    assert list(state) == list(expected)
    for key, value in expected.items():
        assert torch.equal(state[key], value), key

    # a finalized checkpoint loads into a plain model; report counts zero values, and the tensors with
    # zeros (all finalizing leaves of a mask) are the pruned ones
    code, out, err = run(capsys, "report", out_path, "--model", MODEL, "--json")
    assert code == 0, err
    reported = json.loads(out)
    tensors, others = reported["tensors"], reported["other_parameters"]
    assert set(tensors) == {"conv1.weight", "conv1.bias"}
    for name, param in twin.named_parameters():
        entry = tensors.get(name) or others[name]
        assert entry["zeros"] == int((param == 0).sum()), name
        assert entry["mask"] is False
        assert entry["pruned"] is (name in tensors)


def test_report_reads_a_state_dict_pruned_by_torch(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    twin = direct_lenet()
    torch_iterative_conv1(twin)
    path = tmp_path / "torch_pruned.pt"
    torch.save(twin.state_dict(), path)
    direct = mask_counts(twin.state_dict())
    assert set(direct) == {"conv1.weight", "conv1.bias"}

    code, out, err = run(capsys, "report", path, "--model", MODEL, "--json")
    assert code == 0, err
    reported = json.loads(out)
    assert report_counts(reported) == direct
    total = sum(numel for _, numel in direct.values())
    assert reported["global_sparsity"] == sum(zeros for zeros, _ in direct.values()) / total
    # a plain LeNet factory (other random weights) reads the same masks from the checkpoint
    code, out, err = run(capsys, "report", path, "--model", f"{EXAMPLES / 'lenet.py'}:LeNet", "--json")
    assert code == 0, err
    assert report_counts(json.loads(out)) == direct


def test_weights_from_torch_then_apply_continues_like_torch(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    first = direct_lenet()
    torch_iterative_conv1(first)
    weights = tmp_path / "torch_pruned.pt"
    torch.save(first.state_dict(), weights)

    spec, model = SPECS / "every_layer_type.yaml", f"{EXAMPLES / 'lenet.py'}:LeNet"
    code, out, err = run(capsys, "plan", spec, "--model", model, "--weights", weights, "--json")
    assert code == 0, err
    steps = {s["tensor"]: s for s in json.loads(out)["steps"]}
    zeros, numel = mask_counts(first.state_dict())["conv1.weight"]
    assert steps["conv1.weight"]["predicted_before"] == zeros / numel  # the plan sees the loaded mask

    out_path = tmp_path / "more.pt"
    code, _, err = run(capsys, "apply", spec, "--model", model, "--weights", weights, "--out", out_path)
    assert code == 0, err
    torch_every_layer_type(first)  # the same rules, straight on the torch-pruned model
    expected = first.state_dict()
    state = torch.load(out_path, weights_only=True)["state_dict"]
    assert list(state) == list(expected)
    for key, value in expected.items():
        assert torch.equal(state[key], value), key


# --- errors and exit codes -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ref", "words"),
    [
        (f"{EXAMPLES / 'lenet.py'}:NoSuchFactory", "NoSuchFactory"),
        ("does/not/exist.py:LeNet", "does not exist"),
        ("no_colon_here", "must look like"),
        ("prunespec_no_such_module_xyz:f", "prunespec_no_such_module_xyz"),
    ],
)
def test_bad_model_ref_exits_2(ref: str, words: str, capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["plan", SPECS / "global_l1.yaml", "--model", ref], ["report", "x.pt", "--model", ref]):
        code, _, err = run(capsys, *argv)
        assert code == 2, argv
        assert words in err
        assert "Traceback" not in err


@pytest.mark.parametrize(
    "argv",
    [[], ["frobnicate"], ["plan", str(SPECS / "global_l1.yaml")], ["validate"], ["apply", "--model", MODEL]],
    ids=["no-args", "unknown-subcommand", "plan-without-model", "validate-without-spec", "apply-without-spec"],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert "usage:" in err
    assert "Traceback" not in err


def test_plan_error_exits_1_and_names_the_entry(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    text = "version: 1\nrules:\n  - select: {names: [conv1, conv9]}\n    method: l1_unstructured\n    amount: 0.3\n"
    spec = tmp_path / "typo.yaml"
    spec.write_text(text, encoding="utf-8")
    column = text.splitlines()[2].index("conv9") + 1
    out_path = tmp_path / "never.pt"
    for command in ("plan", "apply"):
        argv = [command, spec, "--model", MODEL] + (["--out", out_path] if command == "apply" else [])
        code, _, err = run(capsys, *argv)
        assert code == 1, command
        assert "'conv9'" in err
        assert f"{spec}:3:{column}:" in err
        assert "Traceback" not in err
    assert not out_path.exists()


def test_report_of_a_missing_checkpoint_exits_1(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    missing = tmp_path / "missing.pt"
    code, _, err = run(capsys, "report", missing, "--model", MODEL)
    assert code == 1
    assert str(missing) in err
    assert "Traceback" not in err


def test_python_m_prunespec(tmp_path: Path) -> None:
    ok = subprocess.run(
        [sys.executable, "-m", "prunespec", "validate", *map(str, ALL_SPECS)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    assert all(f"{p}: valid" in ok.stdout for p in ALL_SPECS)
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nrules:\n  - select: {names: [conv1]}\n    method: nope\n", encoding="utf-8")
    failed = subprocess.run(
        [sys.executable, "-m", "prunespec", "validate", str(bad)], capture_output=True, text=True, timeout=120
    )
    assert failed.returncode == 1
    assert f"{bad}:4:13:" in failed.stderr
    assert "Traceback" not in failed.stderr


# --- real projects: versions, flags, warnings, model references -----------------------------------


def test_version_is_written_once(capsys: pytest.CaptureFixture[str]) -> None:
    import importlib.metadata

    import tomllib
    from setuptools.config.pyprojecttoml import read_configuration

    code, out, _ = run(capsys, "--version")
    assert code == 0
    assert out == f"prunespec {prunespec.__version__}\n"
    assert prunespec.__version__ == importlib.metadata.version("prunespec")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert read_configuration(ROOT / "pyproject.toml", expand=True)["project"]["version"] == prunespec.__version__


@pytest.mark.parametrize(
    "argv",
    [
        ["--builtins-only", "--json", "methods"],
        ["--json", "methods", "--builtins-only"],
        ["methods", "--json", "--builtins-only"],
        ["--traceback", "methods", "--builtins-only", "--json"],
    ],
)
def test_global_flags_go_before_or_after_the_command(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, *argv)
    assert code == 0, err
    assert {row["name"] for row in json.loads(out)} == set(BUILTINS)


def test_a_warning_is_one_clean_line(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRUNESPEC_PLUGINS", "prunespec_no_such_plugin")
    monkeypatch.delenv("PRUNESPEC_BUILTINS_ONLY", raising=False)
    code, out, err = run(capsys, "methods", "--json")
    assert code == 0
    assert err.splitlines() == [err.splitlines()[0]] and err.startswith(
        "warning: the allow-list (PRUNESPEC_PLUGINS or allow=) names 'prunespec_no_such_plugin'"
    )
    assert "plugins.py" not in err and "warnings.warn" not in err
    assert {row["name"] for row in json.loads(out)} == set(BUILTINS)


FACTORIES = """
import torch
from torch import nn


def raises():
    raise RuntimeError("the weights are on another machine")


def needs(width, depth=2):
    return nn.Linear(width, width)


def not_a_module():
    return 42
"""


@pytest.mark.parametrize(
    ("factory", "words"),
    [
        ("raises", "calling raises() failed: RuntimeError: the weights are on another machine"),
        ("needs", "needs arguments (width)"),
        ("not_a_module", "returned int, not a torch.nn.Module"),
    ],
)
def test_a_factory_that_fails_is_a_clear_error(
    factory: str, words: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = tmp_path / "factories.py"
    path.write_text(FACTORIES, encoding="utf-8")
    ref = f"{path}:{factory}"
    code, _, err = run(capsys, "plan", SPECS / "global_l1.yaml", "--model", ref)
    assert code == 2
    assert err.startswith(f"prunespec: {ref}") and words in err
    assert "with no arguments" in err  # what to do
    assert "Traceback" not in err


def test_traceback_shows_the_cause(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "factories.py"
    path.write_text(FACTORIES, encoding="utf-8")
    code, _, err = run(capsys, "--traceback", "plan", SPECS / "global_l1.yaml", "--model", f"{path}:raises")
    assert code == 2
    assert "Traceback" in err and 'raise RuntimeError("the weights are on another machine")' in err
    assert "direct cause" in err and "ModelRefError" in err
    assert err.splitlines()[-1].startswith("prunespec: ")  # and then the usual one-line message


def test_a_model_file_imports_its_siblings(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    folder = tmp_path / "project" / "models"
    folder.mkdir(parents=True)
    (folder / "prunespec_test_blocks.py").write_text(
        "from torch import nn\n\ndef block():\n    return nn.Linear(8, 4)\n", encoding="utf-8"
    )
    (folder / "net.py").write_text(
        "from prunespec_test_blocks import block\nfrom torch import nn\n\n"
        "def make():\n    return nn.Sequential(block(), nn.Linear(4, 2))\n",
        encoding="utf-8",
    )
    before = list(sys.path)
    try:
        code, out, err = run(capsys, "plan", _linear_spec(tmp_path), "--model", f"{folder / 'net.py'}:make")
    finally:
        sys.modules.pop("prunespec_test_blocks", None)
    assert code == 0, err
    assert "0.weight" in out and "1.weight" in out
    assert sys.path == before


def _linear_spec(root: Path) -> Path:
    spec = root / "linears.yaml"
    spec.write_text(
        "version: 1\nrules:\n  - select: {types: [Linear]}\n    method: l1_unstructured\n    amount: 0.5\n",
        encoding="utf-8",
    )
    return spec


def _package(root: Path) -> None:
    package = root / "prunespec_test_models"
    package.mkdir()
    (package / "__init__.py").write_text("", encoding="utf-8")
    (package / "net.py").write_text(
        "from torch import nn\n\ndef make():\n    return nn.Sequential(nn.Linear(8, 4))\n", encoding="utf-8"
    )


def test_a_module_ref_is_found_from_the_current_directory(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _package(tmp_path)
    monkeypatch.chdir(tmp_path)
    # as in the installed `prunespec` script: the script's folder is on sys.path, the current directory not
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    before = list(sys.path)
    try:
        code, out, err = run(capsys, "plan", _linear_spec(tmp_path), "--model", "prunespec_test_models.net:make")
    finally:
        for name in [m for m in sys.modules if m.startswith("prunespec_test_models")]:
            del sys.modules[name]
    assert code == 0, err
    assert "0.weight" in out
    assert sys.path == before


def test_a_module_ref_works_from_a_script_like_the_installed_one(tmp_path: Path) -> None:
    _package(tmp_path)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "prunespec"
    script.write_text("import sys\nfrom prunespec.cli import main\nsys.exit(main())\n", encoding="utf-8")
    done = subprocess.run(
        [
            sys.executable,
            str(script),
            "plan",
            str(_linear_spec(tmp_path)),
            "--model",
            "prunespec_test_models.net:make",
            "--builtins-only",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Plan: 1 rule, 1 step on 1 tensor")


def test_plan_json_reports_errors_as_json(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    text = "version: 1\nrules:\n  - select: {names: [conv1, conv9]}\n    method: l1_unstructured\n    amount: 0.3\n"
    spec = tmp_path / "typo.yaml"
    spec.write_text(text, encoding="utf-8")
    code, out, _ = run(capsys, "plan", spec, "--model", MODEL, "--json")
    assert code == 1
    error = json.loads(out)["error"]
    assert error["type"] == "PlanError"
    [issue] = error["issues"]
    assert set(issue) == {"message", "path", "file", "line", "column", "hint"}
    assert (issue["file"], issue["line"], issue["column"]) == (str(spec), 3, text.splitlines()[2].index("conv9") + 1)
    assert "'conv9'" in issue["message"] and issue["path"].startswith("rules[0].select.names")
    code, out, _ = run(capsys, "plan", SPECS / "global_l1.yaml", "--model", "no_colon_here", "--json")
    assert code == 2 and json.loads(out)["error"]["type"] == "ModelRefError"


@pytest.mark.parametrize("command", ["plan", "apply", "validate"])
def test_a_missing_spec_file_is_a_usage_error(command: str, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    argv = [command, missing] + ([] if command == "validate" else ["--model", MODEL])
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert err == f"prunespec {command}: error: spec file {str(missing)!r} does not exist\n"
    assert out == ""


def test_long_option_defaults_are_shortened_in_the_methods_table(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from pydantic import BaseModel

    from prunespec.methods.base import MethodInfo

    class Long(BaseModel):
        pattern: str = "x" * 100

    registry = prunespec.load_methods(builtins_only=True)
    registry.add(MethodInfo.from_class(prune.Identity, name="long_options", options=Long))
    monkeypatch.setattr(prunespec.cli, "load_methods", lambda **_: registry)
    code, out, _ = run(capsys, "methods")
    assert code == 0
    row = next(line for line in out.splitlines() if line.startswith("long_options"))
    assert f"pattern={'x' * 39}…" in row and "x" * 40 not in row


def test_schema_out_writes_the_same_schema_atomically(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "schema.json"
    target.write_text("old")
    code, out, _ = run(capsys, "schema", "--builtins-only", "--out", str(target))
    assert code == 0 and out == ""
    code, printed, _ = run(capsys, "schema", "--builtins-only")
    assert target.read_text() == printed
    assert [p.name for p in tmp_path.iterdir()] == ["schema.json"]  # no temporary file left
