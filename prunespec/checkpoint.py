"""Saving pruned models and loading checkpoints, pruned or not, into fresh models.

A prunespec checkpoint is a plain dict that ``torch.load(..., weights_only=True)`` reads::

    {"state_dict": ...,                    # with <name>_orig / <name>_mask for pruned tensors
     "prunespec": {"format": 1,
                   "spec": {...} or None,  # the spec that pruned it
                   "hooks": {"conv1.weight": [{"method": "l1_unstructured", "amount": 0.2,
                                               "options": {}}, ...]}}}

``hooks`` records which methods pruned each tensor, so that loading installs the same hook objects
(torch's ``L1Unstructured``, a ``PruningContainer`` ...) and not a generic one. A bare state_dict
(what ``torch.save(model.state_dict())`` writes, pruned by torch or not) loads too.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.utils import prune

from .errors import CheckpointError, SpecError
from .layout import GlobalMask, ensure_detach_hook
from .loader import load_spec, validate_document
from .plugins import MethodRegistry, load_methods
from .spec import SourceMap, Spec

FORMAT = 1


def save(
    model: nn.Module,
    path: str | os.PathLike[str],
    spec: Spec | str | os.PathLike[str] | Mapping[str, Any] | None = None,
    *,
    methods: MethodRegistry | None = None,
) -> None:
    """Write ``model``'s state_dict (masks and original weights included), the spec that pruned it (a
    Spec, a YAML path or a mapping) and which methods pruned each tensor."""
    methods = load_methods() if methods is None else methods
    spec = load_spec(spec, methods=methods) if spec is not None else None
    meta: dict[str, Any] = {
        "format": FORMAT,
        "spec": spec.model_dump(mode="json", exclude_none=True) if spec is not None else None,
        "hooks": _describe_hooks(model, methods),
    }
    torch.save({"state_dict": model.state_dict(), "prunespec": meta}, path)


def load(model: nn.Module, path: str | os.PathLike[str], *, methods: MethodRegistry | None = None) -> Spec | None:
    """Load a checkpoint (prunespec's or a plain state_dict, pruned or not) into ``model``, with its
    masks and hooks; returns the spec that pruned it, if the checkpoint recorded one.

    Raises CheckpointError, leaving the model as it was, when the checkpoint does not fit.
    """
    state_dict, meta = read(path)
    methods = load_methods() if methods is None else methods
    recorded = meta.get("spec") if meta else None
    spec = None
    if isinstance(recorded, Mapping):
        try:
            spec = validate_document(recorded, SourceMap(file=str(path)), methods)
        except SpecError as exc:  # e.g. a plugin method that is not installed here: the weights still load
            warnings.warn(f"{path}: the spec recorded in the checkpoint is not valid here: {exc}", stacklevel=2)
    load_state_dict(model, state_dict)
    if meta and isinstance(meta.get("hooks"), Mapping):
        _restore_hooks(model, meta["hooks"], methods)
    return spec


def _pruning_hooks(model: nn.Module) -> Iterator[tuple[str, nn.Module, Any, prune.BasePruningMethod]]:
    for module_name, module in model.named_modules():
        for key, hook in module._forward_pre_hooks.items():
            if isinstance(hook, prune.BasePruningMethod):
                name = f"{module_name}.{hook._tensor_name}" if module_name else hook._tensor_name
                yield name, module, key, hook


def _describe_hooks(model: nn.Module, methods: MethodRegistry) -> dict[str, list[dict[str, Any]]]:
    by_class = {info.cls: info for info in methods.values()}
    out = {}
    for name, _, _, hook in _pruning_hooks(model):
        parts = list(hook) if isinstance(hook, prune.PruningContainer) else [hook]
        records: list[dict[str, Any]] = []
        for part in parts:
            if isinstance(part, GlobalMask):
                records.append({"global": part.method, "amount": part.amount, "group_size": part.group_size})
                continue
            info = by_class.get(type(part))
            if info is None:
                records.append({"method": None, "class": f"{type(part).__module__}.{type(part).__qualname__}"})
                continue
            options = {key: getattr(part, key) for key in info.options_model.model_fields if hasattr(part, key)}
            records.append({"method": info.name, "amount": getattr(part, "amount", None), "options": options})
        out[name] = records
    return out


def _restore_hooks(model: nn.Module, hooks: Mapping[str, Any], methods: MethodRegistry) -> None:
    """Replace the identity hooks that loading installed by the methods recorded at save time."""
    for name, module, key, hook in list(_pruning_hooks(model)):
        records = hooks.get(name)
        if not isinstance(hook, prune.Identity) or not isinstance(records, list) or not records:
            continue
        rebuilt: list[prune.BasePruningMethod] = []
        for record in records:
            if "global" in record:
                rebuilt.append(GlobalMask(record["global"], record["amount"], record["group_size"]))
            elif record.get("method") in methods:
                rebuilt.append(methods[record["method"]].build(record.get("amount"), record.get("options", {})))
            else:
                warnings.warn(
                    f"{name} was pruned by {record.get('method') or record.get('class')}, which is not installed; "
                    "its mask is loaded, with torch's Identity as its hook",
                    stacklevel=3,
                )
                break
        else:
            for method in rebuilt:
                method._tensor_name = hook._tensor_name
            container = prune.PruningContainer(rebuilt[0])
            for method in rebuilt[1:]:
                container.add_pruning_method(method)
            module._forward_pre_hooks[key] = rebuilt[0] if len(rebuilt) == 1 else container


def read(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """The state_dict in a checkpoint file and prunespec's metadata (None for a bare state_dict).

    Loads with ``weights_only=True``: a checkpoint can hold tensors and plain data, never code.
    """
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot load the checkpoint with weights_only=True: {exc}") from None
    if isinstance(data, Mapping) and "state_dict" in data and isinstance(data["state_dict"], Mapping):
        meta = data.get("prunespec")
        return dict(data["state_dict"]), dict(meta) if isinstance(meta, Mapping) else None
    if isinstance(data, Mapping) and all(isinstance(v, torch.Tensor) for v in data.values()):
        return dict(data), None
    raise CheckpointError(f"{path}: expected a state_dict (a mapping of names to tensors), got {type(data).__name__}")


def load_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Load ``state_dict`` into ``model``, pruned keys (``<name>_orig``/``<name>_mask``) included.

    A tensor that is pruned in the checkpoint but dense in the model is first given torch's identity
    pruning, so that its original weights *and* mask load (torch alone refuses, or with
    ``strict=False`` silently keeps the random weights). Every key and shape is checked before
    anything changes: on a mismatch, CheckpointError names the first mismatching keys and the model is
    left as it was. Returns the names of the tensors that were made pruned to fit.
    """
    to_prune = _pruned_in_checkpoint(model, state_dict)
    expected = _expected_shapes(model, to_prune)
    problems = []
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing:
        problems.append("missing " + _first(missing))
    if unexpected:
        problems.append("unexpected " + _first(unexpected))
    wrong = [
        f"{k} (checkpoint {list(v.shape)}, model {list(expected[k])})"
        for k, v in state_dict.items()
        if k in expected and tuple(v.shape) != expected[k]
    ]
    if wrong:
        problems.append("shape mismatch " + _first(wrong))
    if problems:
        raise CheckpointError(
            "the checkpoint does not fit the model: " + "; ".join(problems) + " (the model was left unchanged)"
        )
    modules = dict(model.named_modules())
    for module_name, pname in to_prune:
        prune.identity(modules[module_name], pname)
        ensure_detach_hook(modules[module_name])
    model.load_state_dict(state_dict, strict=True)
    _share_tied_masks(model)
    with torch.no_grad():  # the masked attribute would otherwise be stale until the next forward
        for module in modules.values():
            for hook in module._forward_pre_hooks.values():
                if isinstance(hook, prune.BasePruningMethod):
                    setattr(module, hook._tensor_name, hook.apply_mask(module))
    return [f"{m}.{p}" if m else p for m, p in to_prune]


def _share_tied_masks(model: nn.Module) -> None:
    """Owners of one (tied) original Parameter share one mask tensor, as after apply."""
    masks: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for pname, param in module._parameters.items():
            base = pname.removesuffix("_orig")
            if param is None or not pname.endswith("_orig") or base + "_mask" not in module._buffers:
                continue
            mask = masks.setdefault(id(param), module._buffers[base + "_mask"])  # type: ignore[arg-type]
            module._buffers[base + "_mask"] = mask


def _first(keys: list[str], n: int = 5) -> str:
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _pruned_in_checkpoint(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> list[tuple[str, str]]:
    """(module, param) pairs pruned in the checkpoint and dense, as a Parameter, in the model."""
    out = []
    modules = dict(model.named_modules())
    for key in state_dict:
        if not key.endswith("_orig"):
            continue
        base = key[: -len("_orig")]
        if base + "_mask" not in state_dict:
            continue
        module_name, _, pname = base.rpartition(".")
        module = modules.get(module_name)
        if module is not None and isinstance(module._parameters.get(pname), nn.Parameter):
            out.append((module_name, pname))
    return out


def _expected_shapes(model: nn.Module, to_prune: list[tuple[str, str]]) -> dict[str, tuple[int, ...]]:
    """The model's state_dict keys and shapes, as they will be once ``to_prune`` is pruned."""
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for module_name, pname in to_prune:
        key = f"{module_name}.{pname}" if module_name else pname
        shape = shapes.pop(key)
        shapes[key + "_orig"] = shape
        shapes[key + "_mask"] = shape
    return shapes
