"""Sharded checkpoints: a model whose parameters are DTensors (FSDP2's ``fully_shard``, tensor parallel)
saved by every rank with ``torch.distributed.checkpoint`` (DCP), and loaded on any number of ranks, or
into a plain model in one process.

A checkpoint is a directory::

    DIR/.metadata, DIR/__<rank>_<n>.distcp   DCP's files: the state_dict, with <name>_orig / <name>_mask
    DIR/prunespec.json                      prunespec's metadata (what a .pt checkpoint has under
                                            "prunespec": format, spec, hooks, calibration), from rank 0

Saved on N ranks, it loads on M: each rank reads its part of every DTensor from whichever files hold
it, and a plain model reads every tensor whole. Loading installs torch's layout on the tensors the
checkpoint prunes (masks of ones, DTensors placed like their parameters), then DCP reads every value in
place, then the masks are checked to hold only 0 and 1; the keys, shapes, dtypes and hook records are
checked before anything changes, against the same rules as :func:`prunespec.load` of a file.

What a load reads runs no code: DCP's ``.metadata`` is a pickle, read here by an unpickler that knows
only DCP's metadata classes, ``torch.Size`` and dtypes; tensors are read by DCP with
``torch.load(weights_only=True)``; only tensor entries are accepted.

Every rank must see the directory at the same path (a shared filesystem), as DCP itself needs. A save
writes into a temporary directory beside the target, which rank 0 renames into place once every rank
has written; an earlier checkpoint there is moved aside first and removed after, so a killed save
leaves the old checkpoint, the new one, or the old one under a ``.<name>.old-*`` name beside it. Any
error, on any rank, is raised on every rank (:func:`prunespec.distributed.collective`), and a failed
load leaves every rank's model as it was. A model that is not sharded (``format="dcp"``) is saved or
loaded by the calling process alone.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import secrets
import shutil
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.filesystem import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

from . import checkpoint, distributed
from .checkpoint_hooks import a_type
from .errors import CheckpointError, OutputError
from .files import _fsync_folder, atomic_write_text
from .plugins import MethodRegistry, load_methods
from .record import CalibrationRecord
from .spec import Spec

METADATA = "prunespec.json"
DCP_METADATA = ".metadata"

# names that say "a file": a sharded model is saved as a directory, and `model.pt/` would surprise
FILE_SUFFIXES = frozenset({".pt", ".pth", ".bin", ".ckpt", ".safetensors", ".pkl", ".tar", ".zip"})


def is_checkpoint(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a directory of DCP (it has DCP's ``.metadata``)."""
    return (Path(path) / DCP_METADATA).is_file()


def save(
    model: nn.Module,
    path: str | os.PathLike[str],
    spec: Any,
    *,
    methods: MethodRegistry | None,
    record: CalibrationRecord | None,
    format: str,
) -> None:
    """:func:`prunespec.save` of a sharded model (every rank calls it), or of any model with
    ``format="dcp"``: DCP's files and ``prunespec.json`` in the directory ``path``."""
    sharded = distributed.sharded(model)
    with distributed.collective(sharded):
        if format != "dcp":
            raise OutputError(
                f"{path}: the model's parameters are DTensors split across ranks: it is saved as a directory "
                f"of torch.distributed.checkpoint (format='dcp', the default for such a model), not format={format!r}"
            )
        target = _check_target(path)
        methods = load_methods() if methods is None else methods
        text = _json(path, checkpoint.metadata(model, spec, methods, record))
        writer = not sharded or dist.get_rank() == 0  # the one process that makes, names and renames
        temp = target.with_name(f".{target.name}.tmp-{_token(sharded):016x}")
        made = False
        try:
            if writer:
                try:
                    temp.mkdir()
                except OSError as exc:
                    raise OutputError(f"{path}: could not create {temp.name} beside it: {exc}") from exc
                made = True
            if sharded:
                distributed.agree_or_raise()  # the folder exists; and DCP's collectives start on every rank
            with _quiet():
                dcp_save(model.state_dict(), storage_writer=FileSystemWriter(temp), no_dist=not sharded)
            if writer:
                atomic_write_text(temp / METADATA, text)
            if sharded:
                distributed.agree_or_raise()  # every rank's files are written before the rename
            if writer:
                _replace(temp, target)
        except BaseException as exc:
            if made:
                shutil.rmtree(temp, ignore_errors=True)
            if isinstance(exc, OSError):
                raise OutputError(f"{path}: could not write the checkpoint: {exc}") from exc
            raise


def load(model: nn.Module, path: str | os.PathLike[str], methods: MethodRegistry) -> Spec | None:
    """:func:`prunespec.load` of a DCP directory: into a sharded model on every rank, or a plain model
    in one process (any number of ranks saved it)."""
    sharded = distributed.sharded(model)
    with distributed.collective(sharded):
        state, meta, reader = _open(path, sharded)

        def fill() -> None:
            values = model.state_dict()  # the model's own tensors (DTensors: the local parts), read in place
            wanted = {key: values[key] for key in state}
            if sharded:
                distributed.agree_or_raise()  # DCP's collectives: every rank is ready
            with _quiet():
                dcp_load(wanted, storage_reader=reader, no_dist=not sharded)
            for key, value in wanted.items():
                # each rank checks its part; a failure on one rank is raised on all (_commit agrees)
                problem = checkpoint._mask_problem(distributed.local(value)) if key.endswith("_mask") else None
                if problem is not None:
                    raise CheckpointError(f"{path}: {key}: {problem} (the model was left unchanged)")

        return checkpoint._load_checked(model, path, state, meta, methods, fill, agree=sharded)


def read(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """The tensors of a DCP directory (on the meta device: shapes and dtypes, no values) and
    prunespec's metadata, checked (what :func:`prunespec.inspect` needs)."""
    state, meta, _ = _open(path, sharded=False)
    return state, meta


# --- saving ---------------------------------------------------------------------------------------------


def _check_target(path: str | os.PathLike[str]) -> Path:
    """The directory to write: not a file (nor named like one), empty or an earlier checkpoint of
    this module, in a writable folder."""
    target = Path(os.path.abspath(path))
    hint = "a sharded checkpoint is a directory of torch.distributed.checkpoint: pass a directory path"
    if target.exists() and not target.is_dir():
        raise OutputError(f"{path}: is a file; {hint}, e.g. {target.with_suffix('')}")
    if target.suffix.lower() in FILE_SUFFIXES:
        raise OutputError(f"{path}: names a {target.suffix} file; {hint}, e.g. {target.with_suffix('')}")
    if target.is_dir() and any(target.iterdir()) and not (target / METADATA).is_file():
        raise OutputError(f"{path}: exists and is not an earlier prunespec checkpoint; choose a new folder")
    if not target.parent.is_dir() or not os.access(target.parent, os.W_OK | os.X_OK):
        raise OutputError(f"{path}: the folder {target.parent} does not exist or is not writable")
    return target


def _json(path: str | os.PathLike[str], meta: Mapping[str, Any]) -> str:
    """prunespec's metadata as JSON; it is plain data (what weights_only reads), so JSON keeps it as it is."""
    try:
        return json.dumps(meta, indent=1)
    except (TypeError, ValueError) as exc:
        raise OutputError(f"{path}: prunespec's metadata cannot be written as JSON: {exc}") from exc


def _token(sharded: bool) -> int:
    """A random number, rank 0's on every rank: the temporary directory's name."""
    mine = secrets.randbits(62)
    if not sharded:
        return mine
    return int(distributed.gather(torch.tensor([mine], dtype=torch.int64))[0].item())


def _replace(temp: Path, target: Path) -> None:
    """Put ``temp`` at ``target``; an earlier checkpoint there is moved aside, then removed."""
    old = target.with_name(f".{target.name}.old-{secrets.token_hex(6)}") if target.exists() else None
    if old is not None:
        os.replace(target, old)
    try:
        os.replace(temp, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)
        raise
    _fsync_folder(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def _quiet() -> Iterator[None]:
    """Without DCP's warning that it saves or loads in one process: prunespec asks it to."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


# --- loading --------------------------------------------------------------------------------------------


def _open(
    path: str | os.PathLike[str], sharded: bool
) -> tuple[dict[str, torch.Tensor], dict[str, Any], FileSystemReader]:
    """The checkpoint's tensors (meta-device stand-ins), prunespec's metadata and a reader that gives
    DCP the metadata read here (checked once, not read again)."""
    folder = Path(path)
    if not is_checkpoint(folder):
        who = "a model split across ranks loads only" if sharded else "expected"
        raise CheckpointError(
            f"{path}: not a torch.distributed.checkpoint directory (no {DCP_METADATA} file); {who} a directory "
            "that prunespec.save wrote for a sharded model or with format='dcp' (the model was left unchanged)"
        )
    metadata = _read_dcp_metadata(folder)
    record = folder / METADATA
    if not record.is_file():
        raise CheckpointError(
            f"{path}: no {METADATA}: not a checkpoint that prunespec.save wrote (a DCP checkpoint of another "
            "tool loads with torch.distributed.checkpoint.load) (the model was left unchanged)"
        )
    try:
        raw = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{path}/{METADATA}: cannot be read: {type(exc).__name__}: {exc}") from exc
    meta = checkpoint._checked_meta(path, raw)
    try:
        state = _stand_ins(path, metadata)
    except CheckpointError:
        raise
    except Exception as exc:  # fields of the wrong kinds: the metadata of no DCP save
        raise CheckpointError(f"{path}/{DCP_METADATA}: not DCP's metadata: {type(exc).__name__}: {exc}") from exc
    return state, meta, _Reader(folder, metadata)


def _stand_ins(path: str | os.PathLike[str], metadata: Metadata) -> dict[str, torch.Tensor]:
    """A meta-device tensor of each entry's shape and dtype; refuses entries that are not tensors, and
    tensors whose stored chunks do not cover them (DCP would leave the rest as it was)."""
    entries = metadata.state_dict_metadata
    if not isinstance(entries, dict):
        raise CheckpointError(f"{path}/{DCP_METADATA}: holds no table of tensors")
    out = {}
    for key, entry in entries.items():
        where = f"{path}: {key!r}"
        if not isinstance(entry, TensorStorageMetadata):
            raise CheckpointError(f"{where}: {a_type(entry)}, not a tensor; a checkpoint holds tensors")
        size, dtype = entry.size, getattr(entry.properties, "dtype", None)
        if not isinstance(size, torch.Size) or not isinstance(dtype, torch.dtype):
            raise CheckpointError(f"{where}: its shape or dtype is not recorded")
        covered = 0
        for chunk in entry.chunks:
            offsets, sizes = tuple(chunk.offsets), tuple(chunk.sizes)
            if len(offsets) != len(size) or len(sizes) != len(size):
                raise CheckpointError(f"{where}: a stored part of {len(sizes)} dims, of a {len(size)}-dim tensor")
            if any(o < 0 or n < 0 or o + n > s for o, n, s in zip(offsets, sizes, size, strict=True)):
                raise CheckpointError(f"{where}: a stored part at {list(offsets)} lies outside {list(size)}")
            covered += math.prod(sizes)
        if covered != math.prod(size):
            raise CheckpointError(f"{where}: its stored parts hold {covered} of its {math.prod(size)} entries")
        out[key] = torch.empty(size, dtype=dtype, device="meta")
    for info in (metadata.storage_data or {}).values():
        name = getattr(info, "relative_path", None)
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise CheckpointError(f"{path}/{DCP_METADATA}: names {name!r} as a data file; expected a file in {path}")
    return out


class _Reader(FileSystemReader):
    """DCP's reader of a directory, given the metadata already read and checked."""

    def __init__(self, path: Path, metadata: Metadata) -> None:
        super().__init__(path)
        self._metadata = metadata

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if self._metadata.storage_meta is None:  # as DCP's own reader does
            self._metadata.storage_meta = StorageMeta()
        self._metadata.storage_meta.load_id = self.load_id
        return self._metadata


# What DCP's .metadata holds (torch 2.13): its dataclasses, torch.Size, dtypes, layouts, a Path
_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "ChunkStorageMetadata",
        "BytesStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's metadata and nothing else: a global outside :data:`_METADATA_CLASSES` (or a
    torch dtype) is refused, so a crafted ``.metadata`` cannot run code."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_CLASSES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")


def _read_dcp_metadata(folder: Path) -> Metadata:
    try:
        with open(folder / DCP_METADATA, "rb") as file:
            metadata = _MetadataUnpickler(file).load()
    except Exception as exc:  # a refused global, a truncated file, anything unpickling raises
        raise CheckpointError(f"{folder}/{DCP_METADATA}: cannot be read: {type(exc).__name__}: {exc}") from exc
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{folder}/{DCP_METADATA}: holds {a_type(metadata)}, not DCP's metadata")
    return metadata
