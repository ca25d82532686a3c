"""Writing what the engine computed into the model, all or nothing.

:func:`install` puts every mask (and new values) into torch's layout, undoing all of it on any
exception or interrupt; :func:`finalize` does that and makes the pruning permanent, a tensor no
earlier pruning touched getting its pruned values in place, never torch's layout. With
``snapshot="disk"`` or ``"none"`` such a tensor is written as soon as its last step is done
(:func:`finished`), its old values saved to a temporary file first for ``disk``
(:class:`Streamed`, :func:`undone_on_error`).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from . import distributed, layout, runtime
from .errors import ApplyError
from .masks import Slab, pack, zeros
from .pruned import Pruned

__all__ = ["SNAPSHOTS", "Streamed", "finalize", "finished", "install", "make_permanent", "undone_on_error"]


def make_permanent(pruned: list[Pruned]) -> None:
    """torch's ``prune.remove`` on every owner of each tensor :func:`execute` pruned, all or nothing."""
    layout.remove_all([owner for tensor in pruned for owner in tensor.owners])


SNAPSHOTS = ("memory", "disk", "none")


class Streamed:
    """The tensors finalized in place before the end of an apply, and how to put them back: their old
    values in a temporary folder (``disk``), or nothing (``none``)."""

    def __init__(self, snapshot: str) -> None:
        self.snapshot = snapshot
        self.done: list[Pruned] = []
        self.folder: Path | None = None
        self.files: list[tuple[Pruned, Path]] = []

    def save(self, tensor: Pruned) -> None:
        if self.snapshot != "disk":
            return
        if self.folder is None:
            self.folder = Path(tempfile.mkdtemp(prefix="prunespec-undo-"))
        path = self.folder / f"{len(self.files)}.pt"
        torch.save(tensor.orig.detach(), path)  # written from the tensor's own storage: no copy in memory
        self.files.append((tensor, path))

    def restore(self) -> None:
        for tensor, path in reversed(self.files):
            saved = torch.load(path, weights_only=True, mmap=True)
            with torch.no_grad():
                tensor.orig.data.copy_(saved)

    def close(self) -> None:
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


@contextlib.contextmanager
def undone_on_error(undo: Streamed | None) -> Iterator[None]:
    """Put streamed tensors back on any exception (with ``disk``), or say which stay pruned (``none``)."""
    if undo is None:
        yield
        return
    try:
        yield
    except BaseException as exc:
        if undo.snapshot == "disk":
            undo.restore()
        elif undo.done and isinstance(exc, ApplyError):
            left = (
                f"{len(undo.done)} tensors finalized before it stay pruned (snapshot: none), the first "
                f"{undo.done[0].name}; the rest of the model was left unchanged"
            )
            raise ApplyError(exc.rule, exc.tensor, exc.detail, left=left) from exc
        raise
    finally:
        undo.close()


def finished(tensor: Pruned, undo: Streamed | None, slab: Slab | None = None) -> None:
    """A tensor whose last step of the plan has run, with ``finalize``: its mask kept compact (cut from
    ``slab``), or (with ``undo``) its values written in place now, when no earlier pruning gave it
    torch's layout."""
    if tensor.mask is None or tensor.start is not None or any(layout.is_pruned(m, p) for m, p in tensor.owners):
        return
    if tensor.zeros is None and tensor.sharding is None:
        tensor.zeros = zeros(tensor.mask)
    if undo is None:
        if tensor.sharding is None:  # 1 bit an entry until the install
            tensor.bits, tensor.mask = pack(tensor.mask, slab), None
        else:  # 1 byte: a DTensor's zeros are counted over ranks with the others'
            tensor.mask = tensor.mask.bool()
        return
    if tensor.sharding is not None:  # its mask goes now: count it over ranks before
        tensor.zeros = zeros(distributed.wrap(tensor.mask, tensor.sharding))
    undo.save(tensor)
    with runtime.deferred_interrupts():
        mask, values = distributed.wrap(tensor.mask, tensor.sharding), _values(tensor)
        layout.finalized_in_place(tensor.owners, mask, values)
        undo.done.append(tensor)
        tensor.streamed = True
    tensor.mask, tensor.values = None, None


def finalize(tensors: list[Pruned], merge: bool) -> None:
    """Install then finalize, all or nothing: tensors in torch's layout already go through it (and
    ``prune.remove``); the others get their values in place, once nothing can fail any more."""
    tensors = [t for t in tensors if not t.streamed]
    layered = [t for t in tensors if t.start is not None or any(layout.is_pruned(m, p) for m, p in t.owners)]
    lean = [t for t in tensors if all(t is not other for other in layered)]
    with runtime.deferred_interrupts():
        install(layered, merge)
        make_permanent(layered)
        for tensor in lean:
            mask = tensor.final_mask()  # unpacked one at a time
            assert mask is not None
            if tensor.zeros is None:  # the report counts the mask's zeros, not zeros the values had anyway
                tensor.zeros = zeros(mask)
            layout.finalized_in_place(tensor.owners, distributed.wrap(mask, tensor.sharding), _values(tensor))
            tensor.mask, tensor.bits = None, None


def install(tensors: list[Pruned], merge: bool) -> None:
    sharded = any(t.sharding is not None for t in tensors)
    restores = [
        layout.snapshot(module, pname, values=t.values is not None) for t in tensors for module, pname in t.owners
    ]
    current: Pruned | None = None
    try:
        for current in tensors:
            for module, pname in current.owners:
                mask = current.mask
                assert mask is not None
                if mask.dtype == torch.bool:  # kept compact while other masks were computed
                    mask = mask.to(current.orig.dtype)
                mask = distributed.wrap(mask, current.sharding)  # a DTensor's mask: sharded like it
                layout.install(module, pname, mask, current.new_hooks, merge=merge, values=_values(current))
        current = None
        if sharded:  # every rank installs, or none does (another rank's failure undoes this one's)
            distributed.agree_or_raise()
    except BaseException as exc:  # an interrupt too: the model is all pruned or not at all
        for restore in restores:
            restore()
        if not isinstance(exc, Exception) or current is None:
            raise
        message = f"could not install the mask: {type(exc).__name__}: {exc}"
        raise ApplyError(current.rules[-1], current.name, message) from exc


def _values(tensor: Pruned) -> torch.Tensor | None:
    """A reconstructing method's new values (this rank's part, for a DTensor: sharded like it), or None."""
    return None if tensor.values is None else distributed.wrap(tensor.values, tensor.sharding)
