"""Putting a model back exactly as it was, after a change that did not finish.

A :class:`ModelSnapshot` keeps each module's attributes (the objects themselves), the contents of its
dicts and sets (parameters, buffers, hooks of every kind, submodules) and a copy of every tensor value
a ``load_state_dict`` writes into in place. :meth:`ModelSnapshot.restore` puts all of it back: the same
Parameter and buffer objects, with their old values.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


class _ModuleState:
    def __init__(self, module: nn.Module) -> None:
        self.attrs = dict(module.__dict__)
        self.contents = {k: copy.copy(v) for k, v in self.attrs.items() if isinstance(v, (dict, set))}

    def restore(self, module: nn.Module) -> None:
        for key, saved in self.contents.items():
            container: Any = self.attrs[key]
            container.clear()
            container.update(saved)
        module.__dict__.clear()
        module.__dict__.update(self.attrs)


class ModelSnapshot:
    """What :meth:`restore` needs to undo any change to ``model`` made through its modules and its
    state_dict tensors. The values are copied to the CPU: this costs one copy of the state_dict."""

    def __init__(self, model: nn.Module) -> None:
        self._modules = [(module, _ModuleState(module)) for module in model.modules()]
        seen: set[int] = set()
        self._values: list[tuple[torch.Tensor, torch.Tensor]] = []
        for tensor in model.state_dict(keep_vars=True).values():
            if id(tensor) in seen or tensor.is_meta:
                continue
            seen.add(id(tensor))
            self._values.append((tensor, tensor.detach().to("cpu", copy=True)))

    def restore(self) -> None:
        """Put the model back as it was when the snapshot was taken."""
        with torch.no_grad():
            for tensor, saved in self._values:
                tensor.copy_(saved)
        for module, state in self._modules:
            state.restore(module)
