"""The hooks prunespec calls on plugins.

A plugin is a module (or object) with functions marked ``@prunespec.hookimpl`` whose names match the
specifications below. Third-party packages are found through the ``prunespec`` entry-point group;
prunespec's built-in methods (:mod:`prunespec.methods.builtin`) register through the very same hook.
A marked function whose name matches no specification (``prunespec_register_method``, say) is never
called: loading the plugin warns about it (a ``PluginWarning`` naming the plugin).
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

    Each method is checked as it is registered: an options model that is not a pydantic model, that
    gives no JSON Schema, or whose defaults cannot be built, and a name already taken (a built-in's, or
    an earlier plugin's), drop that method with a ``PluginWarning``; the plugin's other methods stay. If
    the hook raises, none of its methods are kept.
    """
