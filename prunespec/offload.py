"""A waiting batch's hidden state parked on the CPU while it waits at a block's entry.

With ``replay_blocks`` or ``calibration.sequential: blocks``, every batch waits at the entry of the
current block holding its input to it, referenced from the model's own frames (the loop's hidden
state). On an accelerator those inputs are the largest part of the calibration's memory (every batch's
tokens x hidden), while only one batch at a time runs the block. To free them without touching the
frames that hold them, the input's storage is copied to the CPU and resized to nothing; before the
block runs from it again its bytes come back, so every reference, views included, sees the same
values (torch's FSDP frees parameters between uses the same way). Only the block's first tensor
argument (its hidden state) is parked: attention masks and position embeddings are small, and may be
shared with caches that other code reads meanwhile. A storage that belongs to the model (a parameter
or buffer), or that two batches share, is never parked, nor is a tensor subclass (a DTensor).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["Parked", "Parking"]


@dataclass
class Parked:
    """One batch's parked storage: its bytes on the parking device while the storage itself is empty."""

    storage: torch.UntypedStorage
    nbytes: int
    device: torch.device
    copy: torch.UntypedStorage | None = None  # None: in place (the bytes are back)
    stays: bool = False  # another batch's too: left in place for good

    def restore(self) -> None:
        """The bytes back into the storage, where the tensors that share it read them."""
        if self.copy is None:
            return
        self.storage.resize_(self.nbytes)
        self.storage.copy_(self.copy)
        self.copy = None

    def park(self) -> None:
        """The bytes moved to the parking device, the storage left empty (its memory freed)."""
        if self.copy is not None or self.stays:
            return
        # a copy even on the same device (Storage.to would give the storage itself there)
        self.copy = torch.empty(self.nbytes, dtype=torch.uint8, device=self.device).untyped_storage()
        self.copy.copy_(self.storage)
        self.storage.resize_(0)


@dataclass
class Parking:
    """Where a pass parks the waiting batches' hidden states (``device``); ``everywhere``: also when a
    storage is on that device already (a copy beside it: for tests on a machine without an accelerator)."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    everywhere: bool = False
    _owned: set[int] = field(default_factory=set)  # the model's parameters' and buffers' storages
    _parked: dict[int, Parked] = field(default_factory=dict)  # by storage, across batches

    def watch(self, model: nn.Module) -> None:
        """Never park what ``model`` owns."""
        tensors = [*model.parameters(), *model.buffers()]
        self._owned = {_key(t.untyped_storage()) for t in tensors}

    def park(self, tensor: torch.Tensor | None) -> Parked | None:
        """``tensor``'s storage parked, or None where it stays (nothing to park, the model's, another
        batch's too, already on the parking device, or a storage that cannot be resized)."""
        # a plain tensor only: a subclass (a DTensor, a quantized wrapper) may not own its bytes so
        if tensor is None or type(tensor) is not torch.Tensor or tensor.is_meta or tensor.layout != torch.strided:
            return None
        storage = tensor.untyped_storage()
        key = _key(storage)
        if key in self._parked:  # two batches share it: it stays where it is, for both
            shared = self._parked.pop(key)
            shared.restore()
            shared.stays = True
            self._owned.add(key)
            return None
        if key in self._owned or storage.nbytes() == 0 or not storage.resizable():
            return None
        if storage.device == self.device and not self.everywhere:
            return None
        parked = Parked(storage, storage.nbytes(), self.device)
        parked.park()
        self._parked[key] = parked
        return parked

    def forget(self, parked: Parked | None) -> None:
        """``parked``'s bytes back for good (its batch goes on into the block)."""
        if parked is None:
            return
        parked.restore()
        self._parked.pop(_key(parked.storage), None)

    def close(self) -> None:
        """Every parked storage given its bytes back (the pass is over)."""
        for parked in self._parked.values():
            parked.restore()
        self._parked.clear()


def _key(storage: torch.UntypedStorage) -> int:
    # the storage's own identity, unlike data_ptr(), which an empty storage no longer has
    return int(storage._cdata)
