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


class ObjectState:
    """An object's attributes (the objects themselves) and the contents of its dicts and sets: for a
    module its parameters, buffers, hooks and submodules. :meth:`restore` puts them back; tensor values
    changed in place are not covered."""

    def __init__(self, obj: Any) -> None:
        self.obj = obj
        self.attrs = dict(obj.__dict__)
        self.contents = {k: copy.copy(v) for k, v in self.attrs.items() if isinstance(v, (dict, set))}

    def restore(self) -> None:
        for key, saved in self.contents.items():
            container: Any = self.attrs[key]
            container.clear()
            container.update(saved)
        self.obj.__dict__.clear()
        self.obj.__dict__.update(self.attrs)


class ModelSnapshot:
    """What :meth:`restore` needs to undo any change to ``model`` made through its modules and its
    state_dict tensors. The values are copied to the CPU: this costs one copy of the state_dict."""

    def __init__(self, model: nn.Module) -> None:
        self._modules = [ObjectState(module) for module in model.modules()]
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
        for state in self._modules:
            state.restore()


class BindingsSnapshot:
    """What undoes changes that bind new objects rather than write values: every module's parameters,
    buffers, hooks, submodules and attributes, each Parameter's ``.data`` binding, and the model's
    ``config`` attributes. Nothing is copied but references, so it costs no tensor memory; values
    written in place are not covered (use :class:`ModelSnapshot` for those)."""

    def __init__(self, model: nn.Module) -> None:
        self._states = [ObjectState(module) for module in model.modules()]
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "__dict__"):
            self._states.append(ObjectState(config))
        self._data = [(p, p.data) for p in {id(p): p for p in model.parameters()}.values()]

    def restore(self) -> None:
        """Put every binding back as it was when the snapshot was taken."""
        for param, data in self._data:
            param.data = data
        for state in self._states:
            state.restore()
