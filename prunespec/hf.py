"""Hugging Face model directories in and out, never downloading.

In: a local directory with ``config.json`` (``--model DIR``) is built with its config's architecture
(or a named transformers class) and ``from_pretrained(..., local_files_only=True)``: a hub id that is
not on disk is an error, not a download.

Out: :func:`save_dir` writes a ``save_pretrained`` directory (safetensors) that plain
``from_pretrained`` loads: the weights as the model computes with them (each pruned tensor's
``orig * mask`` under its own name, no ``_orig``/``_mask`` keys), plus ``prunespec.yaml`` (the spec,
the calibration record, each tensor's sparsity, the shrink history) and, for a model still pruned
(not finalized), its masks in ``prunespec-masks.safetensors``. :func:`read_dir` reads such a
directory back as a checkpoint in torch's layout (``<name>_orig`` = the saved weight, ``<name>_mask``
= the sidecar's mask), so :func:`prunespec.load` restores the pruned model: what it computes is
bit-exact, and the original values under the mask, which the directory does not keep, are zeros.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import layout
from .errors import CheckpointError, ModelRefError, OutputError

SIDECAR = "prunespec-masks.safetensors"
RECORD = "prunespec.yaml"


def is_model_dir(ref: str | os.PathLike[str]) -> bool:
    """Whether ``ref`` is a local transformers model directory (a folder with ``config.json``)."""
    path = Path(ref)
    return path.is_dir() and (path / "config.json").is_file()


def is_pretrained(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers model (it can be saved as a ``save_pretrained`` directory)."""
    try:
        import transformers
    except ImportError:
        return False
    return isinstance(model, transformers.PreTrainedModel)


def load_dir(path: str | os.PathLike[str], model_class: str | None = None) -> nn.Module:
    """The model saved in ``path`` (eval mode), its class named by ``model_class`` (a transformers
    class name, e.g. ``LlamaForCausalLM``) or by the config's ``architectures``. Nothing is downloaded."""
    import transformers

    folder = Path(path)
    if not is_model_dir(folder):
        hint = "a hub id is never downloaded: download it first (huggingface-cli download) and pass the folder"
        raise ModelRefError(f"{path}: not a model directory (no config.json there); {hint}")
    try:
        config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:
        raise ModelRefError(f"{path}/config.json cannot be read: {type(exc).__name__}: {exc}") from exc
    names = [model_class] if model_class else list(getattr(config, "architectures", None) or [])
    if not names:
        raise ModelRefError(f"{path}/config.json names no architecture; pass --model-class (e.g. LlamaForCausalLM)")
    cls = getattr(transformers, names[0], None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ModelRefError(f"{names[0]!r} is not a transformers model class (--model-class names one)")
    leftover = [k for k in _saved_keys(folder) if k.endswith(("_orig", "_mask"))]
    if leftover:
        warnings.warn(
            f"{path}: its weights hold {leftover[0]!r} (and {len(leftover) - 1} more pruning keys): the model was "
            "saved with save_pretrained while still pruned, so from_pretrained leaves those weights newly "
            "initialised; finalize before save_pretrained, or save with prunespec (--out DIR)",
            stacklevel=2,
        )
    try:
        model: nn.Module = cls.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:
        raise ModelRefError(f"{path}: from_pretrained failed: {type(exc).__name__}: {exc}") from exc
    model.train(False)
    return model


def _saved_keys(folder: Path) -> list[str]:
    from safetensors import safe_open

    keys: list[str] = []
    for file in _weight_files(folder):
        with safe_open(str(file), framework="pt") as f:
            keys += list(f.keys())
    return keys


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / n for n in names]
    single = folder / "model.safetensors"
    return [single] if single.is_file() else []


def computed_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s state_dict with each pruned tensor as the model computes with it (``orig * mask``)
    under its own name, and no ``_orig``/``_mask`` keys: what ``from_pretrained`` expects."""
    pruned = {name: (module, pname) for name, module, pname, _ in layout.pruned_in(model)}
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        base = key.removesuffix(layout.ORIG).removesuffix(layout.MASK)
        if base != key and base in pruned:
            if key.endswith(layout.ORIG):
                module, pname = pruned[base]
                orig, mask = layout.original(module, pname), layout.mask(module, pname)
                assert orig is not None and mask is not None
                out[base] = (orig.detach() * mask.to(orig.dtype)).contiguous()
            continue
        out[key] = value
    return out


def save_dir(model: nn.Module, path: str | os.PathLike[str], meta: Mapping[str, Any]) -> None:
    """Write ``model`` (a transformers model) as a ``save_pretrained`` directory at ``path``, with
    ``prunespec.yaml`` (``meta``: plain data) and, if it is still pruned, the sidecar of its masks.

    The directory appears whole or not at all: it is written beside ``path`` and renamed into place;
    an existing ``path`` must be an empty folder or an earlier output of this function (it is replaced).
    """
    import transformers
    from ruamel.yaml import YAML
    from safetensors.torch import save_file

    if not isinstance(model, transformers.PreTrainedModel):
        raise OutputError(f"{path}: a directory output needs a transformers model; save to a .pt file instead")
    target = Path(path).resolve()
    if target.exists() and not (target.is_dir() and (not any(target.iterdir()) or (target / RECORD).is_file())):
        raise OutputError(f"{path}: exists and is not an earlier prunespec output; choose a new folder")
    if not target.parent.is_dir() or not os.access(target.parent, os.W_OK):
        raise OutputError(f"{path}: the folder {target.parent} does not exist or is not writable")
    temp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(str(temp), state_dict=computed_state_dict(model), safe_serialization=True)
        masks = {name: layout.mask(module, pname) for name, module, pname, _ in layout.pruned_in(model)}
        if masks:
            tensors = {k: v.detach().to(torch.bool).contiguous() for k, v in masks.items() if v is not None}
            save_file(tensors, str(temp / SIDECAR), metadata={"format": "prunespec-masks", "version": "1"})
        yaml = YAML(typ="safe", pure=True)
        yaml.default_flow_style = False
        with open(temp / RECORD, "w", encoding="utf-8") as file:
            file.write("# what prunespec did to this model (prunespec.load reads it back)\n")
            yaml.dump(dict(meta) | {"masks": SIDECAR if masks else None}, file)
        if target.exists():
            shutil.rmtree(target)
        os.replace(temp, target)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


def read_dir(model: nn.Module, path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """A directory written by :func:`save_dir` (or any ``save_pretrained`` directory) as a checkpoint
    in torch's layout for ``model``: its state_dict and prunespec's metadata (None without
    ``prunespec.yaml``). Tensors are read with safetensors (no code runs); tied weights that
    ``save_pretrained`` stores once are given to every owner."""
    from ruamel.yaml import YAML
    from safetensors.torch import load_file

    folder = Path(path)
    files = _weight_files(folder)
    if not files:
        raise CheckpointError(f"{path}: no model.safetensors (or index) in the folder")
    state: dict[str, torch.Tensor] = {}
    try:
        for file in files:
            state.update(load_file(str(file)))
        masks = load_file(str(folder / SIDECAR)) if (folder / SIDECAR).is_file() else {}
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot be read: {type(exc).__name__}: {exc}") from exc
    meta: dict[str, Any] | None = None
    if (folder / RECORD).is_file():
        try:
            loaded = YAML(typ="safe", pure=True).load((folder / RECORD).read_text(encoding="utf-8"))
        except Exception as exc:
            raise CheckpointError(f"{path}/{RECORD}: not valid YAML: {exc}") from exc
        if not isinstance(loaded, dict):
            raise CheckpointError(f"{path}/{RECORD}: expected a mapping of prunespec's records")
        meta = {k: v for k, v in loaded.items() if k in ("format", "spec", "hooks", "calibration", "shrunk")}
    for name, mask in masks.items():
        if name not in state:
            raise CheckpointError(f"{path}/{SIDECAR}: a mask for {name!r}, which the weights do not have")
        weight = state.pop(name)
        if mask.shape != weight.shape:
            raise CheckpointError(
                f"{path}/{SIDECAR}: {name}'s mask is {list(mask.shape)}, its weight {list(weight.shape)}"
            )
        state[name + layout.ORIG] = weight
        state[name + layout.MASK] = mask.to(weight.dtype)
    return _with_tied(model, state), meta


def _with_tied(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys the model has for a tied tensor that the checkpoint stores under another of its names."""
    by_tensor: dict[int, list[str]] = {}
    for key, value in model.state_dict(keep_vars=True).items():
        by_tensor.setdefault(id(value), []).append(key)
    for keys in by_tensor.values():
        present = [k for k in keys if k in state]
        for key in keys:
            if key not in state and present:
                state[key] = state[present[0]]
    return state
