"""What a pruning method is to prunespec.

A method is a ``torch.nn.utils.prune.BasePruningMethod`` subclass: its instances compute masks and are
the forward pre-hooks installed on pruned modules, exactly as in torch. Two ways to write one:

* subclass :class:`PruningMethod` (a name, ``PRUNING_TYPE``, a pydantic ``Options`` model and
  ``compute_mask``), or
* take any existing ``BasePruningMethod`` subclass and register it with a name; its constructor's
  keyword arguments become its options.

:class:`MethodInfo` is the registry's view of either kind.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict, create_model
from torch.nn.utils import prune

PRUNING_TYPES = ("unstructured", "structured", "global")
METHOD_ID = re.compile(r"^[a-z][a-z0-9_]*$")


class NoOptions(BaseModel):
    """Options model of a method that takes none."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def n_to_prune(amount: float | int, size: int) -> int:
    """How many of ``size`` units ``amount`` prunes, rounded exactly as ``torch.nn.utils.prune`` does:
    an integer is a count, a float is ``round(amount * size)`` (round half to even)."""
    if isinstance(amount, Integral):
        return int(amount)
    return round(float(amount) * size)


class PruningMethod(prune.BasePruningMethod):
    """Base class for prunespec pruning methods.

    Subclasses set ``name`` (a snake_case id), ``PRUNING_TYPE`` (``"unstructured"``, ``"structured"``
    or ``"global"``), optionally ``Options`` (a pydantic model; its fields become instance attributes,
    so a structured method's ``dim`` option is where torch's containers look for it) and
    ``takes_amount = False`` for methods without an amount, and implement
    ``compute_mask(t, default_mask)``. Override :meth:`importance` to support ``scope: global``.
    """

    name: ClassVar[str]
    Options: ClassVar[type[BaseModel]] = NoOptions
    takes_amount: ClassVar[bool] = True

    def __init__(self, amount: float | int | None = None, **options: Any) -> None:
        if self.takes_amount:
            if amount is None or isinstance(amount, bool) or not isinstance(amount, Real):
                raise TypeError(f"amount must be a number, got {amount!r}")
            if amount < 0 or (not isinstance(amount, Integral) and amount > 1):
                raise ValueError(f"amount must be a fraction in [0, 1] or a count >= 0, got {amount!r}")
        self.amount = amount
        for key, value in self.Options(**options).model_dump().items():
            setattr(self, key, value)

    def n_to_prune(self, size: int) -> int:
        """Units to prune out of ``size``; raises ValueError when a count exceeds ``size``."""
        assert self.amount is not None
        k = n_to_prune(self.amount, size)
        if k > size:
            raise ValueError(f"amount={self.amount} is larger than the {size} units left to prune")
        return k

    @classmethod
    def check_tensor(cls, shape: tuple[int, ...], options: Mapping[str, Any]) -> str | None:
        """Why this method cannot prune a tensor of ``shape`` with ``options``, or None if it can.

        Called by the planner, before anything is changed; a message here becomes a PlanError.
        """
        return None

    def importance(self, t: torch.Tensor) -> torch.Tensor | None:
        """Per-entry scores, lower pruned first, computed entry by entry (elementwise), or None.

        A method that gives scores can be used with ``scope: global``, and prunespec then selects the
        entries itself (exact counts, no concatenation; see :mod:`prunespec.selection`) instead of
        calling ``compute_mask``.
        """
        return None


@dataclass(frozen=True)
class MethodInfo:
    """A registered method, as the planner and the engine see it."""

    name: str
    cls: type[prune.BasePruningMethod]
    pruning_type: str
    options_model: type[BaseModel]
    takes_amount: bool
    summary: str
    provider: str = "prunespec"
    package: str | None = None
    version: str | None = None
    importance: Callable[[torch.Tensor], torch.Tensor] | None = None  # elementwise scores, lower pruned first
    # structured methods: (tensor, dim, options) -> one score per channel along dim, the highest kept
    channel_importance: Callable[[torch.Tensor, int, Mapping[str, Any]], torch.Tensor] | None = None

    @property
    def granularity(self) -> str:
        """prunespec's word for what the method prunes: ``"unstructured"`` (entries), ``"structured"``
        (whole channels) or ``"self-directed"`` (it decides alone; torch's ``PRUNING_TYPE = "global"``)."""
        return {"global": "self-directed"}.get(self.pruning_type, self.pruning_type)

    @property
    def unit(self) -> str:
        """What ``amount`` and ``sparsity`` count for this method: ``"entries"`` or ``"channels"``."""
        return "channels" if self.pruning_type == "structured" else "entries"

    @property
    def gives_scores(self) -> bool:
        """Whether the method scores units, so prunespec selects them itself (exact counts, and what
        ``max_sparsity``/``min_sparsity`` need)."""
        if self.pruning_type == "unstructured":
            return self.importance is not None or (
                issubclass(self.cls, PruningMethod) and self.cls.importance is not PruningMethod.importance
            )
        return self.channel_importance is not None

    @property
    def supports_global(self) -> bool:
        """Whether ``scope: global`` (one budget across a rule's tensors) works with this method."""
        return self.pruning_type == "unstructured" and self.takes_amount

    def scorer(self, method: prune.BasePruningMethod) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The elementwise scoring of an unstructured method (built by :meth:`build`), if it has one."""
        if self.pruning_type != "unstructured":
            return None
        if self.importance is not None:
            return self.importance
        if isinstance(method, PruningMethod) and type(method).importance is not PruningMethod.importance:
            return lambda t: method.importance(t)  # type: ignore[return-value]
        return None

    def validate_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """Options checked and completed with defaults; raises pydantic's ValidationError."""
        return self.options_model(**options).model_dump()

    def build(self, amount: float | int | None, options: Mapping[str, Any]) -> prune.BasePruningMethod:
        """A fresh method instance: the object that computes the mask and becomes the hook."""
        factory: Any = self.cls  # torch's method classes take their own keyword arguments
        method: prune.BasePruningMethod = factory(amount=amount, **options) if self.takes_amount else factory(**options)
        return method

    def check_tensor(self, shape: tuple[int, ...], options: Mapping[str, Any]) -> str | None:
        """Why this method cannot prune a tensor of ``shape`` with ``options``, or None if it can."""
        if self.pruning_type == "structured":
            if len(shape) < 2:
                return f"structured pruning needs a tensor of 2 or more dims; this one has shape {list(shape)}"
            dim = options.get("dim")
            if not isinstance(dim, int):
                return "a structured method needs an integer `dim` option"
            if not -len(shape) <= dim < len(shape):
                return (
                    f"dim={dim} is out of range for shape {list(shape)}; use a dim in [{-len(shape)}, {len(shape) - 1}]"
                )
        if issubclass(self.cls, PruningMethod):
            return self.cls.check_tensor(shape, options)
        return None

    @classmethod
    def from_class(
        cls,
        method: type,
        *,
        name: str | None = None,
        options: type[BaseModel] | None = None,
        summary: str | None = None,
        importance: Callable[[torch.Tensor], torch.Tensor] | None = None,
        channel_importance: Callable[[torch.Tensor, int, Mapping[str, Any]], torch.Tensor] | None = None,
        provider: str = "prunespec",
        package: str | None = None,
        version: str | None = None,
    ) -> MethodInfo:
        """Describe ``method`` (a :class:`PruningMethod` or ``BasePruningMethod`` subclass)."""
        if not (isinstance(method, type) and issubclass(method, prune.BasePruningMethod)):
            raise TypeError(f"{method!r} is not a torch.nn.utils.prune.BasePruningMethod subclass")
        native = issubclass(method, PruningMethod)
        if native and not name:
            name = getattr(method, "name", None)
        if not name:
            raise TypeError(f"{method.__qualname__} needs a method name: pass name='snake_case_id'")
        if not METHOD_ID.match(name):
            raise ValueError(f"method name {name!r} must be snake_case: lower-case letters, digits, '_'")
        pruning_type = getattr(method, "PRUNING_TYPE", None)
        if pruning_type not in PRUNING_TYPES:
            raise ValueError(f"{method.__qualname__}.PRUNING_TYPE must be one of {PRUNING_TYPES}, got {pruning_type!r}")
        if native:
            assert issubclass(method, PruningMethod)
            options_model = options or method.Options
            takes_amount = method.takes_amount
        else:
            options_model, takes_amount = options or _options_from_signature(method), _takes_amount(method)
        doc = summary or inspect.getdoc(method) or ""
        return cls(
            name=name,
            cls=method,
            pruning_type=pruning_type,
            options_model=options_model,
            takes_amount=takes_amount,
            summary=doc.strip().splitlines()[0] if doc.strip() else "",
            provider=provider,
            package=package,
            version=version,
            importance=importance,
            channel_importance=channel_importance,
        )


def _takes_amount(method: type) -> bool:
    return "amount" in inspect.signature(method).parameters


def _options_from_signature(method: type) -> type[BaseModel]:
    """A pydantic model of a torch method's constructor keyword arguments, ``amount`` excluded."""
    fields: dict[str, Any] = {}
    for param in inspect.signature(method).parameters.values():
        if param.name == "amount" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        annotation = Any if param.annotation is param.empty or isinstance(param.annotation, str) else param.annotation
        default = ... if param.default is param.empty else param.default
        fields[param.name] = (annotation, default)
    model: type[BaseModel] = create_model(
        f"{method.__name__}Options",
        __config__=ConfigDict(extra="forbid", frozen=True),
        **fields,
    )
    return model
