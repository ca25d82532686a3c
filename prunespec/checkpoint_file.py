"""Reading a checkpoint file without trusting it.

``torch.load(..., weights_only=True)`` never runs code from the file, but it does believe the file's
sizes: a 4 MB deflated record that declares a 1 GiB tensor is inflated in full before anything can look
at it. :func:`read_file` therefore checks, before any tensor data is read:

* the zip container (what ``torch.save`` writes): no duplicate or encrypted records, tensor data stored
  uncompressed (``torch.save`` never compresses it), the other records small, everything together within
  the caller's limit; and the CRC of every record, so a corrupted file is refused, not half-believed;
* every tensor, declared but not read (the file is first loaded onto torch's ``meta`` device): strided
  (no sparse layouts), no overlapping or zero strides, inside its storage, and each storage exactly the
  size of its record.

Only then is the file loaded for real, memory-mapped: tensor data is read when it is used, after the
caller has checked the tensors against the model. Files in torch's legacy (pre-zip) format are loaded
whole, so they must fit the limit.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterator
from typing import IO, Any

import torch

from .errors import CheckpointError

METADATA_LIMIT = 64 << 20
"""Bytes that the records other than tensor data (the pickle: keys, spec, hook records) may take."""

_CHUNK = 1 << 20


def read_file(path: str | os.PathLike[str], *, limit: int | None = None) -> Any:
    """The object saved in ``path``, its tensors on the CPU and memory-mapped from the file.

    ``limit`` bounds the bytes of tensor data the file may hold (None: no bound but the file's size).
    Raises CheckpointError naming what is wrong, before any tensor data is read.
    """
    try:
        file = open(path, "rb")  # noqa: SIM115 (closed below; the stat must be of this very file)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot open the checkpoint: {exc}") from None
    with file:
        before = os.fstat(file.fileno())
        try:
            zipped = zipfile.is_zipfile(file)
        except (zipfile.BadZipFile, EOFError, ValueError) as exc:  # it found a zip ending, a broken one
            raise CheckpointError(f"{path}: not a readable zip archive (what torch.save writes): {exc}") from None
        records: list[int] | None = None
        if zipped:
            records = _check_zip(path, file, limit)
        elif limit is not None and before.st_size > limit + METADATA_LIMIT:
            raise CheckpointError(
                f"{path}: {before.st_size} bytes, more than a checkpoint of this model can need "
                f"({limit + METADATA_LIMIT}); is it the right file?"
            )
        file.seek(0)
        declared = _load(path, file, map_location="meta")  # unpickles, reads no tensor data
        for where, tensor in tensors_in(declared):
            problem = check_geometry(tensor)
            if problem is not None:
                raise CheckpointError(f"{path}: {where}: {problem}")
        mismatch = _storages_mismatch(declared, records)
        del declared
    try:
        data = _load(path, path, map_location="cpu", mmap=zipped)  # memory-mapped: nothing read yet
    except CheckpointError:
        if mismatch is not None:  # e.g. a storage that reaches past the end of the file
            raise CheckpointError(f"{path}: {mismatch}") from None
        raise
    try:
        after = os.stat(path)
    except OSError as exc:
        raise CheckpointError(f"{path}: the file went away while it was read: {exc}") from None
    if _identity(after) != _identity(before):
        raise CheckpointError(f"{path}: the file changed while it was read (another process wrote it?); load it again")
    for where, tensor in tensors_in(data):
        if tensor.device.type != "cpu":  # map_location moves everything but tensors saved on `meta`
            raise CheckpointError(f"{path}: {where}: a tensor on {tensor.device}, without data; expected a CPU tensor")
    mismatch = _storages_mismatch(data, records)
    if mismatch is not None:
        raise CheckpointError(f"{path}: {mismatch}")
    return data


def tensors_in(obj: Any, where: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor in a loaded checkpoint, with where it is (``["state_dict"]["fc1.weight"]``)."""
    if isinstance(obj, torch.Tensor):
        yield where or "the checkpoint", obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from tensors_in(value, f"{where}[{key!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from tensors_in(value, f"{where}[{i}]")


def check_geometry(tensor: torch.Tensor) -> str | None:
    """Why ``tensor`` is not a plain dense tensor (strided, no entry sharing memory with another,
    inside its storage), or None."""
    if tensor.layout != torch.strided:
        return f"a {tensor.layout} tensor; expected a dense (torch.strided) tensor"
    if tensor.is_quantized:
        return f"a quantized tensor ({tensor.dtype}); expected a plain one"
    if tensor.numel() == 0:
        return None
    dims = sorted((stride, size) for size, stride in zip(tensor.shape, tensor.stride(), strict=True) if size > 1)
    reach = 0  # the furthest element offset the smaller strides reach
    for stride, size in dims:
        if stride <= reach:
            return (
                f"strides {list(tensor.stride())} for shape {list(tensor.shape)} make entries share memory "
                "(a zero or overlapping stride); expected each entry stored once"
            )
        reach += (size - 1) * stride
    needed = (tensor.storage_offset() + reach + 1) * tensor.element_size()
    if tensor.storage_offset() < 0 or needed > tensor.untyped_storage().nbytes():
        return f"reaches past its storage ({needed} bytes needed, {tensor.untyped_storage().nbytes()} stored)"
    return None


def _load(path: str | os.PathLike[str], source: str | os.PathLike[str] | IO[bytes], **kwargs: Any) -> Any:
    try:
        return torch.load(source, weights_only=True, **kwargs)
    except Exception as exc:
        message = " ".join(str(exc).split())
        if len(message) > 500:
            message = message[:500] + " ..."
        raise CheckpointError(
            f"{path}: cannot load the checkpoint with weights_only=True: {type(exc).__name__}: {message}"
        ) from None


def _identity(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _is_data(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 3 and parts[1] == "data"


def _check_zip(path: str | os.PathLike[str], file: IO[bytes], limit: int | None) -> list[int]:
    """Check the container and every record's CRC; returns the sizes of the tensor-data records."""
    try:
        archive = zipfile.ZipFile(file)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise CheckpointError(f"{path}: not a readable zip archive (what torch.save writes): {exc}") from None
    with archive:
        return _check_archive(path, archive, limit)


def _check_archive(path: str | os.PathLike[str], archive: zipfile.ZipFile, limit: int | None) -> list[int]:
    infos = archive.infolist()
    names = [info.filename for info in infos]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise CheckpointError(f"{path}: the archive holds {twice[0]!r} twice; torch.save writes each record once")
    data = [info for info in infos if _is_data(info.filename)]
    for info in infos:
        if info.flag_bits & 0x1:
            raise CheckpointError(f"{path}: {info.filename} is encrypted; a checkpoint is a plain zip archive")
    for info in data:
        if info.compress_type != zipfile.ZIP_STORED:
            raise CheckpointError(
                f"{path}: {info.filename} is compressed ({info.file_size} bytes inflated from {info.compress_size}); "
                "torch.save stores tensor data uncompressed (was the file re-zipped?)"
            )
    metadata = sum(info.file_size for info in infos if not _is_data(info.filename))
    if metadata > METADATA_LIMIT:
        raise CheckpointError(
            f"{path}: {metadata} bytes of records besides tensor data, more than the {METADATA_LIMIT} allowed"
        )
    total = sum(info.file_size for info in data)
    if limit is not None and total > limit:
        raise CheckpointError(
            f"{path}: {total} bytes of tensor data, more than a checkpoint of this model can need ({limit}); "
            "is it the right file?"
        )
    for info in infos:
        _check_crc(path, archive, info)
    return [info.file_size for info in data]


def _check_crc(path: str | os.PathLike[str], archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> None:
    if info.CRC == 0 and info.file_size > 0:  # torch.save can skip the CRC (compute_crc32 = False)
        return
    try:
        with archive.open(info) as record:
            while record.read(_CHUNK):
                pass
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
        raise CheckpointError(f"{path}: {info.filename} is damaged: {exc}") from None


def _storages_mismatch(data: Any, records: list[int] | None) -> str | None:
    """Why the tensors' storages are not the archive's data records, one each (as torch.save writes
    them), or None."""
    if records is None:
        return None
    storages = {}
    for _, tensor in tensors_in(data):
        storage = tensor.untyped_storage()
        storages[storage._cdata] = storage.nbytes()
    if sorted(storages.values()) == sorted(records):
        return None
    extra = sorted(set(storages.values()) - set(records))
    detail = f"a tensor declares {extra[0]} bytes, which no record holds" if extra else "the sizes differ"
    return f"the tensors' storages do not match the archive's data records ({detail}); the file is damaged"
