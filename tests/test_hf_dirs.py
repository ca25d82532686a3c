"""Hugging Face model directories in and out of the CLI and prunespec.load (prunespec.hf).

Models are tiny, built from configs with random weights and saved to temporary directories; nothing
is downloaded.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers
from torch.nn.utils import prune

import prunespec
from prunespec import cli, hf
from prunespec.layout import is_pruned

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from tiny_transformers import tiny_gpt2, tiny_llama

transformers.logging.set_verbosity_error()

L1 = (
    "version: 1\nrules:\n  - select: {types: [Linear], exclude: [lm_head]}\n"
    "    method: l1_unstructured\n    amount: 0.5\n"
)
IDS = {"input_ids": torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))}


def logits(model: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(**IDS).logits


def saved(tmp_path: Path, make: Any = tiny_llama) -> Path:
    folder = tmp_path / "model"
    make().save_pretrained(folder)
    return folder


def spec_file(tmp_path: Path, text: str = L1) -> Path:
    path = tmp_path / "spec.yaml"
    path.write_text(text)
    return path


def test_cli_in_from_a_directory_out_to_one_that_plain_from_pretrained_loads(tmp_path: Path) -> None:
    folder, out = saved(tmp_path), tmp_path / "pruned"
    assert cli.main(["apply", str(spec_file(tmp_path)), "--model", str(folder), "--out", str(out)]) == 0
    expected = tiny_llama()
    prunespec.apply(expected, spec_file(tmp_path))
    loaded = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    assert torch.equal(logits(loaded), logits(expected))
    assert float((loaded.model.layers[0].mlp.up_proj.weight == 0).float().mean()) == 0.5
    assert {p.name for p in out.iterdir()} >= {"config.json", "model.safetensors", hf.RECORD, hf.SIDECAR}
    record = (out / hf.RECORD).read_text()
    assert "l1_unstructured" in record and "model.layers.0.mlp.up_proj.weight: 0.5" in record


def test_sidecar_masks_round_trip_through_prunespec_load(tmp_path: Path) -> None:
    folder, out = saved(tmp_path), tmp_path / "pruned"
    cli.main(["apply", str(spec_file(tmp_path)), "--model", str(folder), "--out", str(out)])
    fresh = tiny_llama(seed=3)
    spec = prunespec.load(fresh, out)
    assert spec is not None and spec.rules[0].method == "l1_unstructured"
    layer = fresh.model.layers[1].self_attn.q_proj
    assert is_pruned(layer, "weight")
    hook = next(h for h in layer._forward_pre_hooks.values() if isinstance(h, prune.BasePruningMethod))
    assert isinstance(hook, prune.L1Unstructured)
    reference = tiny_llama()
    prunespec.apply(reference, spec_file(tmp_path))
    assert torch.equal(layer.weight_mask, reference.model.layers[1].self_attn.q_proj.weight_mask)
    assert torch.equal(logits(fresh), logits(reference))
    # and --model DIR restores the masks too
    from_cli = cli._build_model(argparse.Namespace(model=str(out), config=None, model_class=None))
    assert is_pruned(from_cli.model.layers[1].self_attn.q_proj, "weight")
    assert torch.equal(logits(from_cli), logits(reference))


def test_a_finalized_output_has_no_sidecar_and_tied_weights_stay_tied(tmp_path: Path) -> None:
    folder, out = saved(tmp_path, tiny_gpt2), tmp_path / "gpt2"
    spec = spec_file(tmp_path, L1.replace("[Linear], exclude: [lm_head]", "[Conv1D]"))
    assert cli.main(["apply", str(spec), "--model", str(folder), "--out", str(out), "--finalize"]) == 0
    assert not (out / hf.SIDECAR).exists()
    loaded = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    expected = tiny_gpt2()
    prunespec.apply(expected, spec, finalize=True)
    assert torch.equal(logits(loaded), logits(expected))
    fresh = tiny_gpt2(seed=5)
    prunespec.load(fresh, out)
    assert torch.equal(logits(fresh), logits(expected))


def test_a_shrunk_model_with_uniform_widths_goes_out_as_a_smaller_pretrained_model(tmp_path: Path) -> None:
    folder, out = saved(tmp_path), tmp_path / "shrunk"
    spec = spec_file(
        tmp_path,
        "version: 1\nrules:\n  - select: {names: ['model.layers.*.mlp']}\n    method: l1_unstructured\n"
        "    amount: 0.5\n    group: {unit: channels}\nshrink: true\n",
    )
    assert cli.main(["apply", str(spec), "--model", str(folder), "--out", str(out)]) == 0
    loaded = transformers.LlamaForCausalLM.from_pretrained(out).eval()
    assert loaded.config.intermediate_size == 64
    expected = tiny_llama()
    prunespec.apply(expected, spec)
    assert torch.equal(logits(loaded), logits(expected))


def test_a_hub_id_is_never_downloaded(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code = cli.main(["plan", str(spec_file(tmp_path)), "--model", "meta-llama/Llama-3.2-1B"])
    err = capsys.readouterr().err
    assert code != 0 and "never downloads" in err


def test_model_class_and_config_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = saved(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config.pop("architectures")
    (folder / "config.json").write_text(json.dumps(config))
    assert cli.main(["plan", str(spec_file(tmp_path)), "--model", str(folder)]) != 0
    assert "--model-class" in capsys.readouterr().err
    spec = str(spec_file(tmp_path))
    assert cli.main(["plan", spec, "--model", str(folder), "--model-class", "LlamaForCausalLM"]) == 0
    assert cli.main(["plan", spec, "--model", str(folder), "--model-class", "NoSuchModel"]) != 0
    config_file = folder / "config.json"
    assert cli.main(["plan", spec, "--model", "transformers:LlamaForCausalLM", "--config", str(config_file)]) == 0
    assert "model.layers.1.mlp.down_proj.weight" in capsys.readouterr().out


def test_a_masked_model_saved_with_plain_save_pretrained_is_warned_about(tmp_path: Path) -> None:
    model = tiny_llama()
    prunespec.apply(model, spec_file(tmp_path))
    model.save_pretrained(tmp_path / "masked")
    with pytest.warns(UserWarning, match="finalize before save_pretrained"):
        hf.load_dir(tmp_path / "masked")


def test_a_directory_output_needs_a_transformers_model_and_a_free_folder(tmp_path: Path) -> None:
    model = tiny_llama()
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(prunespec.PrunespecError, match="not an earlier prunespec output"):
        prunespec.save(model, tmp_path / "taken", format="pretrained")
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"
    with pytest.raises(prunespec.PrunespecError, match="needs a transformers model"):
        prunespec.save(torch.nn.Linear(2, 2), tmp_path / "lin", format="pretrained")
