"""Saving pruned models and loading checkpoints, pruned or not, into fresh models.

A prunespec checkpoint is a plain dict that ``torch.load(..., weights_only=True)`` reads::

    {"state_dict": ...,                    # with <name>_orig / <name>_mask for pruned tensors
     "prunespec": {"format": 1,
                   "spec": {...} or None,  # the spec that pruned it (its `calibration` block included)
                   "hooks": {"conv1.weight": [{"method": "l1_unstructured", "amount": 0.2,
                                               "options": {}, ...}, ...]},
                   "calibration": {...}}}  # optional: the CalibrationRecord of the apply

``hooks`` records which methods pruned each tensor (:mod:`prunespec.checkpoint_hooks`), so that loading
installs the same hook objects (torch's ``L1Unstructured``, a ``PruningContainer`` ...) and not a generic
one. ``calibration`` (a :class:`~prunespec.record.CalibrationRecord`, read back by :func:`inspect`) says
what data the calibration used; checkpoints without one load as before. A bare state_dict (what
``torch.save(model.state_dict())`` writes, pruned by torch or not) loads too.

A model whose parameters are DTensors split across ranks (FSDP2, tensor parallel) is saved by every
rank into a directory of ``torch.distributed.checkpoint``, with the same metadata beside it, and loads
on any number of ranks or in one process (:mod:`prunespec.sharded_checkpoint`).

Saving is atomic (:mod:`prunespec.files`). Loading checks the whole checkpoint before it changes the
model: the file (:mod:`prunespec.checkpoint_file`), then every key, dtype, shape, mask and hook record
against the model and the installed methods; then it loads all or nothing, restoring the model on any
exception, KeyboardInterrupt included.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

import torch
from torch import nn
from torch.nn.utils import prune

from . import checkpoint_hooks, distributed, hf, shrink, sparse_file
from .checkpoint_file import check_geometry, read_file
from .checkpoint_hooks import a_type
from .errors import CheckpointError, OutputError, PrunespecError, ShrinkError, SpecError
from .files import atomic_write, check_writable
from .layout import cache_masked_weight, ensure_detach_hook
from .loader import load_spec, validate_document
from .plugins import MethodRegistry, load_methods
from .record import CalibrationRecord
from .spec import SourceMap, Spec
from .transaction import ModelSnapshot

FORMAT = 1


def save(
    model: nn.Module,
    path: str | os.PathLike[str],
    spec: Spec | str | os.PathLike[str] | Mapping[str, Any] | None = None,
    *,
    methods: MethodRegistry | None = None,
    record: CalibrationRecord | None = None,
    format: Literal["pt", "sparse", "pretrained", "dcp"] | None = None,
) -> None:
    """Write ``model``'s state_dict (masks and original weights included), the spec that pruned it (a
    Spec, a YAML path or a mapping), which methods pruned each tensor and, given a ``record``, what
    the calibration used (:func:`inspect` reads it back).

    ``format``: ``"pt"``, one file for ``torch.load(weights_only=True)``; ``"sparse"``, a compact
    safetensors file (:mod:`prunespec.sparse_file`): each pruned tensor's kept values and its mask as
    bits (or N:M codes), without the original values under the mask; ``"pretrained"``, for a
    transformers model, a ``save_pretrained`` directory that plain ``from_pretrained`` loads (the
    weights as the model computes them), with ``prunespec.yaml`` and the masks beside it
    (:mod:`prunespec.hf`); ``"dcp"``, a directory of ``torch.distributed.checkpoint`` that loads on any
    number of ranks (:mod:`prunespec.sharded_checkpoint`): the only format, and the default, for a model
    whose parameters are DTensors split across ranks, which every rank saves together. The default is
    ``"pt"`` for any other model. :func:`load` reads each. The file or directory appears whole or not
    at all: a failed or killed save leaves the previous one as it was.
    """
    if format not in (None, "pt", "sparse", "pretrained", "dcp"):
        raise ValueError(f"format={format!r}: expected 'pt' (torch's layout), 'sparse', 'pretrained' or 'dcp'")
    if format == "dcp" or distributed.sharded(model):
        from . import sharded_checkpoint  # imports torch.distributed.checkpoint: only when it is needed

        sharded_checkpoint.save(model, path, spec, methods=methods, record=record, format=format or "dcp")
        return
    format = format or "pt"
    if format != "pretrained":
        if format == "pt" and Path(path).is_dir():
            raise OutputError(
                f"{path}: is a folder; give a file name, e.g. {Path(path) / 'model.pt'}, or format='dcp' to "
                "write a torch.distributed.checkpoint directory"
            )
        check_writable(path)
    methods = load_methods() if methods is None else methods
    meta = metadata(model, spec, methods, record)
    if format == "pretrained":
        hf.save_dir(model, path, meta | {"sparsity": _sparsities(model)})
        return
    if format == "sparse":
        sparse_file.write(path, model.state_dict(), meta)
        return
    content = {"state_dict": _storable(model.state_dict()), "prunespec": meta}

    def write(file: BinaryIO) -> None:
        try:
            torch.save(content, file)
        except OSError:
            raise
        except Exception as exc:  # torch reports a failed write of its zip writer as a RuntimeError
            raise OutputError(f"{path}: could not write the checkpoint: {type(exc).__name__}: {exc}") from exc

    atomic_write(path, write)


def metadata(
    model: nn.Module,
    spec: Spec | str | os.PathLike[str] | Mapping[str, Any] | None,
    methods: MethodRegistry,
    record: CalibrationRecord | None = None,
) -> dict[str, Any]:
    """prunespec's records of a model, as plain data: the spec, the hooks of each pruned tensor, the
    calibration record and the shrink history (what a checkpoint stores beside the tensors)."""
    the_spec = load_spec(spec, methods=methods) if spec is not None else None
    meta: dict[str, Any] = {
        "format": FORMAT,
        "spec": _spec_record(the_spec) if the_spec is not None else None,
        "hooks": checkpoint_hooks.describe(model, methods),
    }
    if record is not None:
        meta["calibration"] = record.to_dict()
    if shrink.history(model):
        meta["shrunk"] = shrink.history(model)
    return meta


def _sparsities(model: nn.Module) -> dict[str, float]:
    from .report import sparsity

    return {name: round(value, 6) for name, value in sparsity(model).tensors.items()}


def _spec_record(spec: Spec) -> dict[str, Any]:
    """The spec as plain data in the document's own keys (`lambda`, not `lam`); the `calibration` block
    only when the spec gives one, so that a spec read back says the same."""
    exclude = None if spec.calibration_given else {"calibration"}
    return spec.model_dump(mode="json", exclude_none=True, by_alias=True, exclude=exclude)


def _storable(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state_dict with tensors whose entries share memory (an expanded mask) made contiguous, since
    :func:`load` refuses those; tensors shared between keys stay shared."""
    out: dict[str, torch.Tensor] = {}
    made: dict[int, torch.Tensor] = {}
    for key, value in state_dict.items():
        if value.layout == torch.strided and check_geometry(value) is not None:
            value = made.setdefault(id(value), value.contiguous())
        out[key] = value
    return out


def load(model: nn.Module, path: str | os.PathLike[str], *, methods: MethodRegistry | None = None) -> Spec | None:
    """Load a checkpoint (prunespec's or a plain state_dict, pruned or not) into ``model``, with its
    masks and hooks; returns the spec that pruned it, if the checkpoint recorded one.

    The whole checkpoint is checked first; a CheckpointError names what does not fit, and the model is
    left as it was (also when any other exception, KeyboardInterrupt included, interrupts the load).
    """
    methods = load_methods() if methods is None else methods
    if distributed.sharded(model) or _is_sharded_checkpoint(path):
        from . import sharded_checkpoint

        return sharded_checkpoint.load(model, path, methods)
    if Path(path).is_dir():  # a save_pretrained directory (prunespec's, with its masks, or any)
        state_dict, meta = hf.read_dir(model, path)
    else:
        state_dict, meta = _read(path, limit=_data_limit(model))
    return _load_checked(model, path, state_dict, meta, methods)


def _is_sharded_checkpoint(path: str | os.PathLike[str]) -> bool:
    """A directory of torch.distributed.checkpoint (its ``.metadata`` file), without importing it."""
    return (Path(path) / ".metadata").is_file()


def _load_checked(
    model: nn.Module,
    path: str | os.PathLike[str],
    state_dict: Mapping[str, torch.Tensor],
    meta: dict[str, Any] | None,
    methods: MethodRegistry,
    fill: Callable[[], None] | None = None,
    *,
    agree: bool = False,
) -> Spec | None:
    """Check ``state_dict`` and ``meta`` against ``model``, then load them all or nothing.

    ``fill``: None to load ``state_dict``'s values; else ``state_dict`` gives only the shapes and dtypes
    (tensors on the meta device) and ``fill()`` writes the values into the model's state_dict in place
    once the layout is installed, checking them. ``agree``: every rank of a sharded model loads, or none
    does (see :func:`_commit`).
    """
    undo_shrink = _replay_shrinks(model, path, meta)
    try:
        to_prune = _check_state_dict(model, state_dict, path, data=fill is None)
        pruned = {
            key.removesuffix("_mask"): tuple(value.shape)
            for key, value in state_dict.items()
            if key.endswith("_mask") and key.removesuffix("_mask") + "_orig" in state_dict
        }
        hooks = checkpoint_hooks.rebuild(str(path), meta.get("hooks") if meta else None, pruned, methods)
        _recorded_calibration(path, meta)  # refused here, before the model changes, if it is not a record
        spec = _recorded_spec(path, meta, methods)
        _commit(model, to_prune, hooks, fill or (lambda: _fill_from(model, state_dict)), agree=agree)
    except BaseException:
        undo_shrink()
        raise
    return spec


def _fill_from(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    model.load_state_dict(state_dict, strict=True)


@dataclass(frozen=True)
class Saved:
    """What a checkpoint records besides its tensors (see :func:`inspect`)."""

    spec: Spec | None  # the spec that pruned it (None: not recorded, or not valid here: a warning says why)
    calibration: CalibrationRecord | None  # what the calibration used (None: not recorded)
    pruned: tuple[str, ...]  # the tensors pruned in it (``<name>_orig`` and ``<name>_mask`` both present)
    hooks: Mapping[str, Any]  # the recorded hook records per pruned tensor, as stored (unchecked)


def inspect(path: str | os.PathLike[str], *, methods: MethodRegistry | None = None) -> Saved:
    """Read what a checkpoint records (spec, calibration record, pruned tensors) without a model.

    The file is checked as :func:`read` checks it, and the calibration record as :func:`load` does (a
    CheckpointError if it is not a valid record). A bare state_dict has no spec and no record.
    """
    methods = load_methods() if methods is None else methods
    if _is_sharded_checkpoint(path):
        from . import sharded_checkpoint

        state_dict, meta = sharded_checkpoint.read(path)
    else:
        state_dict, meta = read(path)
    pruned = tuple(
        key.removesuffix("_mask")
        for key in state_dict
        if key.endswith("_mask") and key.removesuffix("_mask") + "_orig" in state_dict
    )
    hooks = meta.get("hooks") if meta else None
    return Saved(
        _recorded_spec(path, meta, methods),
        _recorded_calibration(path, meta),
        pruned,
        dict(hooks) if isinstance(hooks, Mapping) else {},
    )


def read(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """The state_dict in a checkpoint file and prunespec's metadata (None for a bare state_dict).

    Loads with ``weights_only=True``: a checkpoint can hold tensors and plain data, never code. The
    file is checked as :func:`prunespec.checkpoint_file.read_file` says, and its tensors are memory-mapped.
    A safetensors file (a sparse one, or a plain state_dict) is read by :func:`prunespec.sparse_file.read`.
    """
    return _read(path)


def _read(
    path: str | os.PathLike[str], limit: int | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    if sparse_file.is_safetensors(path):
        state_dict, meta = sparse_file.read(path, limit=limit)
        return state_dict, _checked_meta(path, meta) if meta is not None else None
    return _split(path, read_file(path, limit=limit))


def load_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Load ``state_dict`` into ``model``, pruned keys (``<name>_orig``/``<name>_mask``) included.

    A tensor that is pruned in the checkpoint but dense in the model is first given torch's identity
    pruning, so that its original weights *and* mask load (torch alone refuses, or with
    ``strict=False`` silently keeps the random weights). Every key, value, dtype, shape and mask is
    checked before anything changes: on a mismatch, CheckpointError names the first mismatching keys
    and the model is left as it was. Returns the names of the tensors that were made pruned to fit.
    """
    to_prune = _check_state_dict(model, state_dict, None)
    _commit(model, to_prune, {}, lambda: _fill_from(model, state_dict))
    return [f"{m}.{p}" if m else p for m, p in to_prune]


# --- what a checkpoint holds ----------------------------------------------------------------------------


def _split(path: str | os.PathLike[str], data: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """The state_dict and prunespec's metadata of a loaded checkpoint, their types checked."""
    if isinstance(data, Mapping) and "state_dict" in data:
        state_dict, meta = data["state_dict"], data.get("prunespec")
        if not isinstance(state_dict, Mapping):
            raise CheckpointError(f"{path}: state_dict is {a_type(state_dict)}; expected a mapping")
        _check_values(path, state_dict, "['state_dict']")
        if meta is None:
            return dict(state_dict), None
        return dict(state_dict), _checked_meta(path, meta)
    if isinstance(data, Mapping) and any(isinstance(v, torch.Tensor) for v in data.values()):
        _check_values(path, data, "")
        return dict(data), None
    raise CheckpointError(f"{path}: expected a state_dict (a mapping of names to tensors), got {type(data).__name__}")


def _checked_meta(path: str | os.PathLike[str], meta: Any) -> dict[str, Any]:
    """prunespec's metadata of a checkpoint, its format and the type of its spec checked."""
    if not isinstance(meta, Mapping):
        raise CheckpointError(f"{path}: prunespec is {a_type(meta)}; expected prunespec's metadata")
    if meta.get("format") != FORMAT or isinstance(meta.get("format"), bool):
        raise CheckpointError(
            f"{path}: prunespec.format is {meta.get('format')!r}; this prunespec reads format {FORMAT} "
            "(a newer prunespec wrote it?)"
        )
    spec = meta.get("spec")
    if spec is not None and not isinstance(spec, Mapping):
        raise CheckpointError(f"{path}: prunespec.spec is {a_type(spec)}; expected a mapping or None")
    return dict(meta)


def _check_values(path: str | os.PathLike[str], state_dict: Mapping[Any, Any], prefix: str) -> None:
    for key, value in state_dict.items():
        where = f"{prefix}[{key!r}]"
        if not isinstance(key, str):
            raise CheckpointError(f"{path}: {where}: {a_type(key)} key; state_dict keys are names (str)")
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: {where}: {a_type(value)}, not a tensor")


def _replay_shrinks(model: nn.Module, path: str | os.PathLike[str], meta: Mapping[str, Any] | None) -> Any:
    """A shrunk model's checkpoint records its shrinks: a freshly built model of the original
    architecture is shrunk the same way before the weights load. Returns what undoes that."""
    raw = meta.get("shrunk") if meta else None
    if raw is None:
        return lambda: None
    shrinks = _shrink_records(path, raw)
    have = shrink.history(model)
    if have == shrinks:  # already shrunk so (the model that was saved, or one loaded before)
        return lambda: None
    if have:
        raise CheckpointError(f"{path}: the model was shrunk otherwise than the checkpoint's model; build a fresh one")
    try:
        return shrink.replay(model, shrinks)
    except ShrinkError as exc:
        raise CheckpointError(f"{path}: the checkpoint's model was shrunk, and the shrink does not fit: {exc}") from exc


_SHRINK_FIELDS = {"kind": str, "name": str, "structure": str, "size": int, "kept": list, "units": list}


def _shrink_records(path: str | os.PathLike[str], raw: Any) -> list[list[dict[str, Any]]]:
    """The recorded shrinks, checked to be plain data of the right form."""
    bad = CheckpointError(f"{path}: its `shrunk` record is not a list of shrinks (lists of group records)")
    if not isinstance(raw, list) or not all(isinstance(r, list) for r in raw):
        raise bad
    for records in raw:
        for record in records:
            if not isinstance(record, dict) or set(record) - {"members"} != set(_SHRINK_FIELDS):
                raise bad
            if "members" in record and not _member_records(record["members"]):
                raise bad
            if not all(type(record[k]) is t for k, t in _SHRINK_FIELDS.items()):
                raise bad
            kept, size = record["kept"], record["size"]
            if not all(type(i) is int for i in kept) or kept != sorted(set(kept)) or (kept and kept[0] < 0):
                raise bad
            if size < 1 or (kept and kept[-1] >= size) or not all(isinstance(u, str) for u in record["units"]):
                raise bad
    return raw


_MEMBER_FIELDS = {"module": str, "param": str, "dim": int, "width": int, "offset": int, "role": str}


def _member_records(raw: Any) -> bool:
    return isinstance(raw, list) and all(
        isinstance(m, dict)
        and set(m) == set(_MEMBER_FIELDS)
        and all(type(m[k]) is t for k, t in _MEMBER_FIELDS.items())
        and m["role"] in ("scored", "masked", "sliced")
        for m in raw
    )


def _recorded_spec(
    path: str | os.PathLike[str], meta: Mapping[str, Any] | None, methods: MethodRegistry
) -> Spec | None:
    recorded = meta.get("spec") if meta else None
    if not isinstance(recorded, Mapping):
        return None
    try:
        return validate_document(recorded, SourceMap(file=str(path)), methods)
    except SpecError as exc:  # the weights still load; the spec is only a record
        warnings.warn(f"{path}: the spec recorded in the checkpoint is not valid here: {exc}", stacklevel=3)
        return None


def _recorded_calibration(path: str | os.PathLike[str], meta: Mapping[str, Any] | None) -> CalibrationRecord | None:
    """The checkpoint's calibration record, checked; CheckpointError saying where it is wrong."""
    recorded = meta.get("calibration") if meta else None
    if recorded is None:
        return None
    try:
        return CalibrationRecord.from_dict(recorded)
    except ValueError as exc:
        problem = str(exc)
        sep = ": " if problem.startswith(("is ", "unknown ", "missing ")) else "."  # the record itself, or a key
        raise CheckpointError(f"{path}: prunespec.calibration{sep}{problem} (nothing was loaded)") from None


def _data_limit(model: nn.Module) -> int:
    """Bytes of tensor data a checkpoint of ``model`` can need: every tensor pruned (an ``_orig`` and a
    ``_mask``), in up to 8 bytes an entry, and some slack."""
    entries = sum(2 * t.numel() * max(8, t.element_size()) for t in model.state_dict().values())
    return int(entries) + (1 << 20)


# --- checking a state_dict against the model -----------------------------------------------------------


def _check_state_dict(
    model: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str] | None,
    *,
    data: bool = True,
) -> list[tuple[str, str]]:
    """Check everything that :func:`_commit` will load; returns the (module, param) pairs to prune.

    ``data=False``: the tensors only say the shapes and dtypes (a sharded checkpoint's, whose values
    the load reads in place and checks then), so their values are not checked here.
    """
    where = f"{path}: " if path is not None else ""
    _check_values(path or "the state_dict", state_dict, "")
    for key, value in state_dict.items() if data else ():
        problem = "a tensor on the meta device, without data" if value.is_meta else check_geometry(value)
        if problem is not None:
            raise CheckpointError(f"{where}{key}: {problem} (the model was left unchanged)")
    to_prune = _pruned_in_checkpoint(model, state_dict)
    expected = _expected(model, to_prune)
    problems = []
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing:
        problems.append("missing " + _first(missing))
    if unexpected:
        problems.append("unexpected " + _first(unexpected))
    wrong = [
        f"{k} (checkpoint {list(v.shape)}, model {list(expected[k][0])})"
        for k, v in state_dict.items()
        if k in expected and tuple(v.shape) != expected[k][0]
    ]
    if wrong:
        problems.append("shape mismatch " + _first(wrong))
    if problems:
        raise CheckpointError(
            f"{where}the checkpoint does not fit the model: " + "; ".join(problems) + " (the model was left unchanged)"
        )
    for key, value in state_dict.items():
        problem = _dtype_problem(key, value.dtype, expected[key][1])
        if problem is None and data and key.endswith("_mask"):
            problem = _mask_problem(value)
        if problem is not None:
            raise CheckpointError(f"{where}{key}: {problem} (the model was left unchanged)")
    return to_prune


def _mask_problem(mask: torch.Tensor) -> str | None:
    """A mask of anything but exactly 0 and 1 (0.5, 2, -1, NaN) would load and then, on the next
    re-prune, make torch rank the entries it scales instead of the weights' magnitudes."""
    if mask.dtype == torch.bool:
        return None
    wrong = (mask != 0) & (mask != 1)
    if not bool(wrong.any()):
        return None
    return f"a mask must hold only 0 and 1; it holds {mask[wrong].reshape(-1)[0].item()!r}"


def _kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    if dtype.is_complex:
        return "complex"
    if dtype.is_floating_point:
        return "floating-point"
    return "integer"


def _dtype_problem(key: str, dtype: torch.dtype, model_dtype: torch.dtype) -> str | None:
    """A checkpoint tensor may differ from the model's in precision (it is converted, as torch does),
    never in kind; a mask may be bool, integer or floating-point."""
    if key.endswith("_mask"):
        if _kind(dtype) == "complex":
            return f"a mask of dtype {dtype}; expected {model_dtype} or torch.bool"
        return None
    if _kind(dtype) != _kind(model_dtype):
        return f"dtype {dtype}, but the model's is {model_dtype}; expected a {_kind(model_dtype)} dtype"
    return None


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


def _expected(model: nn.Module, to_prune: list[tuple[str, str]]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The model's state_dict keys, shapes and dtypes, as they will be once ``to_prune`` is pruned."""
    expected = {k: (tuple(v.shape), v.dtype) for k, v in model.state_dict().items()}
    for module_name, pname in to_prune:
        key = f"{module_name}.{pname}" if module_name else pname
        entry = expected.pop(key)
        expected[key + "_orig"] = entry
        expected[key + "_mask"] = entry
    return expected


# --- loading, all or nothing ----------------------------------------------------------------------------


def _commit(
    model: nn.Module,
    to_prune: list[tuple[str, str]],
    hooks: Mapping[str, prune.BasePruningMethod | None],
    fill: Callable[[], None],
    *,
    agree: bool = False,
) -> None:
    """Load what was checked: prune ``to_prune`` with torch's Identity (a DTensor's mask of ones is a
    DTensor placed like it), ``fill()`` the values, install the rebuilt ``hooks``. On any exception the
    model is restored, then the exception re-raised. ``agree``: every rank of a process group commits,
    or every rank restores (one rank's failure reaches the others here; see
    :func:`prunespec.distributed.collective`)."""
    snapshot = ModelSnapshot(model)
    try:
        modules = dict(model.named_modules())
        for module_name, pname in to_prune:
            prune.identity(modules[module_name], pname)
            ensure_detach_hook(modules[module_name])
        fill()
        _share_tied_masks(model)
        with torch.no_grad():  # the masked attribute would otherwise be stale until the next forward
            for module in modules.values():
                for hook in module._forward_pre_hooks.values():
                    if isinstance(hook, prune.BasePruningMethod):
                        setattr(module, hook._tensor_name, hook.apply_mask(module))
        for name, module, key, hook in list(checkpoint_hooks.pruning_hooks(model)):
            rebuilt = hooks.get(name)
            if rebuilt is not None and isinstance(hook, prune.Identity):
                module._forward_pre_hooks[key] = rebuilt
            installed = module._forward_pre_hooks[key]
            assert isinstance(installed, prune.BasePruningMethod)
            cache_masked_weight(installed)
        if agree:
            distributed.agree_or_raise()
    except BaseException as exc:
        snapshot.restore()
        if isinstance(exc, Exception) and not isinstance(exc, PrunespecError):
            raise CheckpointError(
                f"loading failed: {type(exc).__name__}: {exc} (the model was left unchanged)"
            ) from exc
        raise


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
