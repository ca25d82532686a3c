"""The hooks prunespec calls on plugins.

A plugin is a module (or object) with functions marked ``@prunespec.hookimpl`` whose names match the
specifications below. Third-party packages are found through the ``prunespec`` entry-point group;
prunespec's built-in methods (:mod:`prunespec.methods.builtin`) register through the very same hook.
"""

from __future__ import annotations

from typing import Protocol

import pluggy
from pydantic import BaseModel
from torch.nn.utils import prune

PROJECT = "prunespec"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class Register(Protocol):
    """The callable handed to :func:`prunespec_register_methods`."""

    def __call__(
        self,
        method: type[prune.BasePruningMethod],
        *,
        name: str | None = None,
        options: type[BaseModel] | None = None,
        summary: str | None = None,
    ) -> None: ...


@hookspec
def prunespec_register_methods(register: Register) -> None:
    """Register pruning methods.

    Called once each time a method registry is built (by ``prunespec.plan``, ``apply``, ``load_spec``
    and the CLI when no registry is passed in). Call ``register(cls)`` once per method, where ``cls``
    is a :class:`prunespec.PruningMethod` subclass (its capabilities are declared on the class), or
    ``register(cls, name="snake_case_id")`` for any ``torch.nn.utils.prune.BasePruningMethod``
    subclass, whose constructor keyword arguments (other than ``amount``) become its options; pass
    ``options=SomePydanticModel`` to type them and ``summary=`` for the one-line description. Returns
    nothing; what it registers is what counts.
    """
