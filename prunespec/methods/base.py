"""What a pruning method is to prunespec.

A method is a :class:`PruningMethod` subclass. Everything prunespec may rely on is declared on the class,
in one place (the *capabilities*, see :class:`Capabilities`): whether it takes an amount, what the
amount counts (:mod:`prunespec.masks` units), whether it scores units (then prunespec selects them itself,
exactly, locally or across a global group), which calibration statistics it needs. It computes masks with
torch's ``compute_mask(t, default_mask)``, or with :meth:`PruningMethod.mask` when it needs more context
(:class:`MaskContext`: the module, its name, the mask so far, its options, statistics).

A plain ``torch.nn.utils.prune.BasePruningMethod`` subclass can be registered too (with a name): it is
adapted into a :class:`PruningMethod` whose ``hook_class`` is that class, so its instances are what gets
installed, and it has no capabilities beyond torch's ``PRUNING_TYPE``.

:class:`MethodInfo` is the registry's view of a registered method.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from numbers import Integral, Real
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, create_model
from torch import nn
from torch.nn.utils import prune

from ..calibration import STATISTICS
from ..distributed import Sharding
from ..masks import Channels, Entries, Unit, n_to_prune

PRUNING_TYPES = ("unstructured", "structured", "global")
METHOD_ID = re.compile(r"^[a-z][a-z0-9_]*$")
Granularity = Literal["unstructured", "structured", "self-directed"]
UnitName = Literal["entries", "channels", "blocks", "units"]


class NoOptions(BaseModel):
    """Options model of a method that takes none."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Generators:
    """Random generators seeded with a spec's ``seed``, one per device, made on first use.

    A random method draws from these (``ctx.generators(t.device)``), so its masks are the same in any
    thread and the program's own random state is left alone. Seeded as ``torch.manual_seed(seed)`` seeds
    torch's default generators, they draw the same numbers those would.
    """

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._made: dict[torch.device, torch.Generator] = {}

    def __call__(self, device: torch.device | str = "cpu") -> torch.Generator:
        key = torch.device(device)
        if key not in self._made:
            self._made[key] = torch.Generator(device=key).manual_seed(self.seed)
        return self._made[key]


@dataclass(frozen=True)
class MaskContext:
    """What a method sees of one tensor when it scores or masks it.

    ``values`` are the parameter's original values (``<name>_orig``, detached; never write into them),
    ``mask`` the mask so far (None: nothing pruned yet). ``statistics`` holds, by name, each calibration
    statistic the method declares in ``statistics``, for this tensor's module (see
    :mod:`prunespec.calibration`: ``"input_sq_norms"`` is a float32 vector, the sum over every calibration
    token of each input feature squared); empty for a method that declares none. The context grows
    (coupled groups, weight updates) without breaking methods that ignore what they do not use.
    """

    name: str  # "features.0.weight"
    module_name: str
    param: str
    module: nn.Module
    values: torch.Tensor
    mask: torch.Tensor | None
    options: Mapping[str, Any]
    statistics: Mapping[str, torch.Tensor] = field(default_factory=dict)
    generators: Generators | None = None  # the spec's seeded generators (None: no seed, torch's own)
    sharding: Sharding | None = None  # a DTensor's: values and mask are this rank's part (``shards``)
    # nothing reads ``statistics`` after this method: it may overwrite them rather than copy them (sparsegpt
    # factors its Hessian in place); False: they are shared (siblings, other rules), read-only
    statistics_consumable: bool = False

    @property
    def masked(self) -> torch.Tensor:
        """The values as the model sees them: original values times the mask so far."""
        return self.values if self.mask is None else self.values * self.mask.to(self.values.dtype)

    @property
    def default_mask(self) -> torch.Tensor:
        """The mask so far, or all ones: what torch's ``compute_mask`` takes as ``default_mask``."""
        return torch.ones_like(self.values) if self.mask is None else self.mask


@dataclass(frozen=True)
class Capabilities:
    """What a method declares, read from its class. Each is checked by ``prunespec.testing.check_method``."""

    granularity: Granularity  # prunespec's word, from the unit and the amount; torch's PRUNING_TYPE is separate
    unit: UnitName  # what `amount`/`sparsity` count
    takes_amount: bool
    scores: bool  # gives per-unit scores: prunespec selects the lowest itself
    elementwise: bool  # its scores are per entry, from each value alone (computed lazily, never stored)
    supports_global: bool  # `scope: global` works
    statistics: tuple[str, ...]  # calibration statistics it needs
    own_random: bool  # draws random numbers only from ``ctx.generators`` (or none): torch's RNG is left alone
    updates_values: bool = False  # changes the kept weights too (:meth:`PruningMethod.reconstruct`)
    shards: bool = False  # works on one rank's part of a DTensor (elementwise scores always do)


class PruningMethod(prune.BasePruningMethod):
    """Base class of prunespec methods.

    Set ``name`` (a snake_case id), ``PRUNING_TYPE`` (torch's word, which its ``PruningContainer`` reads:
    ``"unstructured"``, ``"structured"`` or ``"global"``) and optionally ``Options`` (a pydantic model whose
    fields become instance attributes). Then the capabilities, all on the class:

    * ``takes_amount = False`` for a method that decides alone how much it prunes;
    * ``unit``: what an amount counts, ``"entries"`` (default), ``"channels"`` (along the ``dim`` option),
      or any other :class:`~prunespec.masks.Unit` returned by :meth:`units`;
    * override :meth:`score` (per-unit scores from a :class:`MaskContext`) or :meth:`importance`
      (elementwise, from the values alone): prunespec then selects the lowest scores itself, exactly,
      for ``scope: local`` and ``scope: global``, with ``max_sparsity``/``min_sparsity``;
    * ``own_random = True`` for a method that draws random numbers only from ``ctx.generators`` (seeded
      from the spec's ``seed``), or none at all; for any other, a seeded apply seeds torch's own
      generators instead (restored afterwards, one seeded apply at a time);
    * ``statistics``: names of the calibration statistics :meth:`score` or :meth:`mask` read (see
      :data:`prunespec.calibration.STATISTICS`); ``prunespec.apply`` then needs ``data=``;
    * ``amount_replaced_by``: options that, when a rule gives them, replace the amount (the rule then
      gives neither ``amount`` nor ``sparsity``; ``wanda``'s ``n``/``m``);
    * :meth:`per_row`: the amount applies to each row (dim 0) on its own; prunespec then selects the
      lowest scores within each row;
    * ``updates_values = True`` for a method that also changes the weights it keeps (``sparsegpt``):
      it implements :meth:`reconstruct`, and prunespec writes the new values into ``<name>_orig``;
    * ``hook_class``: the class whose instance is installed as the forward pre-hook (default: this class).
    * ``shards = True`` for a method whose :meth:`score` or :meth:`mask` works on one rank's part of a
      DTensor parameter (``ctx.values`` and ``ctx.mask`` are that part, ``ctx.sharding`` says where it
      lies) and gives that part of what it would give for the whole tensor. A method scoring entries
      elementwise (:meth:`importance`) needs nothing: prunespec selects across ranks itself.

    Masks come from :meth:`score` (when given), else :meth:`mask`, which by default calls torch's
    ``compute_mask(t, default_mask)``.
    """

    name: ClassVar[str]
    PRUNING_TYPE: ClassVar[str] = "unstructured"
    Options: ClassVar[type[BaseModel]] = NoOptions
    takes_amount: ClassVar[bool] = True
    unit: ClassVar[UnitName] = "entries"
    statistics: ClassVar[tuple[str, ...]] = ()
    own_random: ClassVar[bool] = False
    amount_replaced_by: ClassVar[tuple[str, ...]] = ()
    updates_values: ClassVar[bool] = False
    shards: ClassVar[bool] = False
    hook_class: ClassVar[type[prune.BasePruningMethod] | None] = None

    def __init__(self, amount: float | int | None = None, **options: Any) -> None:
        if self.needs_amount(options):
            if amount is None or isinstance(amount, bool) or not isinstance(amount, Real):
                raise TypeError(f"amount must be a number, got {amount!r}")
            if amount < 0 or (not isinstance(amount, Integral) and amount > 1):
                raise ValueError(f"amount must be a fraction in [0, 1] or a count >= 0, got {amount!r}")
        elif amount is not None and self.takes_amount:
            given = ", ".join(k for k in self.amount_replaced_by if options.get(k) is not None)
            raise ValueError(f"with {given} given, {self.name} takes no amount (they decide how much is pruned)")
        self.amount = amount
        for key, value in self.Options(**options).model_dump().items():
            setattr(self, key, value)

    # --- capabilities ------------------------------------------------------------------------------

    @classmethod
    def capabilities(cls) -> Capabilities:
        """What this class declares (see the class docstring)."""
        elementwise = cls.importance is not PruningMethod.importance
        scores = elementwise or cls.score is not PruningMethod.score
        granularity: Granularity
        if not cls.takes_amount:
            granularity = "self-directed"  # it decides alone how much it prunes
        else:
            granularity = "unstructured" if cls.unit == "entries" else "structured"
        return Capabilities(
            granularity=granularity,
            unit=cls.unit,
            takes_amount=cls.takes_amount,
            scores=scores,
            elementwise=elementwise,
            supports_global=cls.takes_amount and (scores or cls.PRUNING_TYPE == "unstructured"),
            statistics=tuple(cls.statistics),
            own_random=cls.own_random,
            updates_values=cls.updates_values,
            shards=cls.shards or elementwise,
        )

    @classmethod
    def needs_amount(cls, options: Mapping[str, Any]) -> bool:
        """Whether a rule with these options gives ``amount`` or ``sparsity``: a method that takes one,
        unless the rule gives one of the options in ``amount_replaced_by``."""
        return cls.takes_amount and not any(options.get(key) is not None for key in cls.amount_replaced_by)

    @classmethod
    def per_row(cls, options: Mapping[str, Any]) -> bool:
        """Whether, with these options, the amount applies to each row (dim 0) of a tensor on its own: each
        row prunes its own ``round(amount * left in the row)`` (``sparsity``: reaches its own
        ``round(sparsity * row length)``; an integer amount is a count per row), ranked by :meth:`score`
        within the row. Only for a method that scores entries of 2-D tensors."""
        return False

    @classmethod
    def units(cls, options: Mapping[str, Any]) -> Unit:
        """The units an amount counts, for these options."""
        if cls.unit == "channels":
            return Channels(int(options["dim"]))
        if cls.unit == "entries":
            return Entries()
        raise NotImplementedError(f"{cls.__qualname__} declares unit {cls.unit!r}: override units()")

    @classmethod
    def check_tensor(cls, shape: tuple[int, ...], options: Mapping[str, Any]) -> str | None:
        """Why this method cannot prune a tensor of ``shape`` with ``options``, or None if it can.

        Called by the planner, before anything is changed; a message here becomes a PlanError.
        """
        return None

    # --- the work ----------------------------------------------------------------------------------

    def n_to_prune(self, size: int) -> int:
        """Units to prune out of ``size``; raises ValueError when a count exceeds ``size``."""
        assert self.amount is not None
        k = n_to_prune(self.amount, size)
        if k > size:
            raise ValueError(f"amount={self.amount} is larger than the {size} units left to prune")
        return k

    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        """torch's mask computation. A method with ``hook_class`` uses that class's; a method that
        only scores (:meth:`score`, :meth:`importance`) needs none: prunespec selects from the scores."""
        if self.hook_class is not None:
            return self.hook().compute_mask(t, default_mask)  # type: ignore[no-any-return]
        scores = self.importance(t)
        if scores is None:
            raise NotImplementedError(
                f"{type(self).__qualname__} has no compute_mask: prunespec computes its masks from score() at apply"
            )
        mask = default_mask.clone(memory_format=torch.contiguous_format)
        k = self.n_to_prune(t.numel())
        if k:  # torch's own way for elementwise scores: the k lowest by topk
            mask.view(-1)[torch.topk(scores.reshape(-1), k=k, largest=False).indices] = 0
        return mask

    def importance(self, t: torch.Tensor) -> torch.Tensor | None:
        """Per-entry scores computed entry by entry from the values alone (lower pruned first), or None.

        Elementwise scores cost no memory: prunespec computes them as it goes, also across a global group.
        """
        return None

    def elementwise(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The elementwise scoring (:meth:`importance`) as a function, if the method has one."""
        if type(self).importance is PruningMethod.importance:
            return None

        def score(t: torch.Tensor) -> torch.Tensor:
            out = self.importance(t)
            if out is None:
                raise TypeError(f"{type(self).__qualname__}.importance returned None")
            return out

        return score

    def score(self, ctx: MaskContext) -> torch.Tensor | None:
        """Per-unit scores for one tensor (shape: the unit grid, e.g. the tensor's shape for entries, one
        per channel for channels), lower pruned first; or None. Override for scores that need more than
        each value alone (statistics, neighbours, the module). The default uses :meth:`importance`."""
        return self.importance(ctx.values)

    def mask(self, ctx: MaskContext) -> torch.Tensor:
        """The new mask for a method without scores: torch's ``compute_mask``, composed with the mask so
        far exactly as torch composes (its ``PruningContainer``: an unstructured method sees only the
        entries left, a structured one the channels left). Must keep every zero of ``ctx.mask``."""
        hook = self.hook()
        if not hasattr(hook, "_tensor_name"):
            hook._tensor_name = ctx.param  # torch's container reads it
        default = ctx.default_mask.clone(memory_format=torch.contiguous_format)
        if ctx.mask is None:
            return hook.compute_mask(ctx.values, default_mask=default)  # type: ignore[no-any-return]
        return prune.PruningContainer(hook).compute_mask(ctx.masked, default_mask=default)  # type: ignore[no-any-return]

    def reconstruct(self, ctx: MaskContext) -> tuple[torch.Tensor, torch.Tensor]:
        """For a method with ``updates_values``: ``(mask, values)``, the new mask (keeping every zero of
        ``ctx.mask``) and the new original values, both of ``ctx.values``'s shape, dtype and device.
        prunespec writes ``values`` into ``<name>_orig`` at install (restored if the apply fails), so the
        model computes with ``values * mask``. ``ctx.values`` must be left as it is."""
        raise NotImplementedError(f"{type(self).__qualname__} declares updates_values: implement reconstruct()")

    def hook(self) -> prune.BasePruningMethod:
        """The object installed as the module's forward pre-hook (and recorded in checkpoints)."""
        if self.hook_class is None:
            return self
        factory: Any = self.hook_class
        options = {key: getattr(self, key) for key in self.Options.model_fields}
        return factory(amount=self.amount, **options) if self.takes_amount else factory(**options)  # type: ignore[no-any-return]


@dataclass(frozen=True)
class MethodInfo:
    """A registered method, as the planner and the engine see it."""

    name: str
    method: type[PruningMethod]
    summary: str
    provider: str = "prunespec"
    package: str | None = None
    version: str | None = None

    @property
    def cls(self) -> type[prune.BasePruningMethod]:
        """The class of the installed hooks."""
        return self.method.hook_class or self.method

    @property
    def capabilities(self) -> Capabilities:
        return self.method.capabilities()

    @property
    def pruning_type(self) -> str:
        """torch's ``PRUNING_TYPE`` of the hooks (what its ``PruningContainer`` reads)."""
        return self.method.PRUNING_TYPE

    @property
    def options_model(self) -> type[BaseModel]:
        return self.method.Options

    @property
    def takes_amount(self) -> bool:
        return self.method.takes_amount

    @property
    def granularity(self) -> str:
        """prunespec's word for what the method prunes: ``"unstructured"`` (entries), ``"structured"``
        (whole channels, blocks or other units) or ``"self-directed"`` (it takes no amount and decides
        alone how much it prunes)."""
        return self.capabilities.granularity

    @property
    def unit(self) -> str:
        """What ``amount`` and ``sparsity`` count for this method (``"entries"``, ``"channels"``, ...)."""
        return self.method.unit

    @property
    def gives_scores(self) -> bool:
        """Whether the method scores units, so prunespec selects them itself (exact counts, and what
        ``max_sparsity``/``min_sparsity`` need)."""
        return self.capabilities.scores

    @property
    def supports_global(self) -> bool:
        """Whether ``scope: global`` (one budget across a rule's tensors) works with this method."""
        return self.capabilities.supports_global

    def units(self, options: Mapping[str, Any]) -> Unit:
        """What an amount counts in a tensor, for these options."""
        return self.method.units(options)

    def needs_amount(self, options: Mapping[str, Any]) -> bool:
        """Whether a rule with these options gives ``amount`` or ``sparsity``."""
        return self.method.needs_amount(options)

    def per_row(self, options: Mapping[str, Any]) -> bool:
        """Whether the amount applies to each row on its own, with these options."""
        return self.method.per_row(options)

    def validate_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """Options checked and completed with defaults; raises pydantic's ValidationError."""
        return self.options_model(**options).model_dump()

    def instance(self, amount: float | int | None, options: Mapping[str, Any]) -> PruningMethod:
        """A fresh method object (scores and masks come from it)."""
        return self.method(amount, **options) if self.takes_amount else self.method(**options)

    def build(self, amount: float | int | None, options: Mapping[str, Any]) -> prune.BasePruningMethod:
        """A fresh hook: the object installed on the module."""
        return self.instance(amount, options).hook()

    def check_tensor(self, shape: tuple[int, ...], options: Mapping[str, Any]) -> str | None:
        """Why this method cannot prune a tensor of ``shape`` with ``options``, or None if it can."""
        if self.unit == "channels" and not isinstance(options.get("dim"), int):
            return "a structured method needs an integer `dim` option"
        misfit = self.units(options).check(shape)
        return misfit.message if misfit else self.method.check_tensor(shape, options)

    @classmethod
    def from_class(
        cls,
        method: type,
        *,
        name: str | None = None,
        options: type[BaseModel] | None = None,
        summary: str | None = None,
        provider: str = "prunespec",
        package: str | None = None,
        version: str | None = None,
    ) -> MethodInfo:
        """Describe ``method`` (a :class:`PruningMethod` or ``BasePruningMethod`` subclass)."""
        if not (isinstance(method, type) and issubclass(method, prune.BasePruningMethod)):
            raise TypeError(f"{method!r} is not a torch.nn.utils.prune.BasePruningMethod subclass")
        if issubclass(method, PruningMethod):
            name = name or getattr(method, "name", None)
        if not name:
            raise TypeError(f"{method.__qualname__} needs a method name: pass name='snake_case_id'")
        if not METHOD_ID.match(name):
            raise ValueError(f"method name {name!r} must be snake_case: lower-case letters, digits, '_'")
        pruning_type = getattr(method, "PRUNING_TYPE", None)
        if pruning_type not in PRUNING_TYPES:
            raise ValueError(f"{method.__qualname__}.PRUNING_TYPE must be one of {PRUNING_TYPES}, got {pruning_type!r}")
        if issubclass(method, PruningMethod):
            unknown = [s for s in method.statistics if s not in STATISTICS]
            if unknown:
                raise ValueError(
                    f"{method.__qualname__}.statistics names {unknown}, which prunespec does not collect; "
                    f"it collects: {', '.join(STATISTICS)}"
                )
            if options is not None and options is not method.Options:
                raise TypeError(
                    f"{method.__qualname__} is a PruningMethod: declare its options on the class (Options = ...), "
                    "not in register(..., options=)"
                )
            native: type[PruningMethod] = method
        else:
            native = _adapt(method, name, options)
        doc = summary or inspect.getdoc(method) or ""
        first = doc.strip().splitlines()[0] if doc.strip() else ""
        return cls(name, native, first, provider, package, version)


def _adapt(method: type[prune.BasePruningMethod], name: str, options: type[BaseModel] | None) -> type[PruningMethod]:
    """A :class:`PruningMethod` that installs ``method``'s instances and masks with its ``compute_mask``."""
    pruning_type = getattr(method, "PRUNING_TYPE", "unstructured")
    attrs: dict[str, Any] = {
        "name": name,
        "PRUNING_TYPE": pruning_type,
        "Options": options or _options_from_signature(method),
        "takes_amount": "amount" in inspect.signature(method).parameters,
        "unit": "channels" if pruning_type == "structured" else "entries",
        "hook_class": method,
        "__module__": method.__module__,
        "__qualname__": method.__qualname__,
        "__doc__": method.__doc__,
    }
    adapted: type[PruningMethod] = type(method.__name__, (PruningMethod,), attrs)
    return adapted


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
