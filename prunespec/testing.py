"""Contract checks for pruning methods, to call from a method plugin's own tests.

::

    from prunespec.testing import check_method, registered_methods

    import my_plugin
    from my_plugin import MyMethod


    def test_my_method_keeps_the_contract() -> None:
        check_method(MyMethod, options={"n": 2, "m": 4})


    def test_the_hook_registers_it() -> None:
        assert registered_methods(my_plugin)["my_method"].cls is MyMethod

:func:`check_method` adapts the class exactly as the registry does (:meth:`MethodInfo.from_class`) and
runs it on small random tensors in float32, float16 and bfloat16, directly and through torch's
``PruningContainer`` (which is how prunespec and torch compose a method with earlier pruning), and
through ``prunespec.apply``. Each capability the class declares is checked. It raises
one ``AssertionError`` naming the method and every rule it breaks:

* **registers**: the class can be registered (a ``BasePruningMethod`` subclass, a snake_case name, a
  valid ``PRUNING_TYPE``) and built with the given options;
* **options schema**: the options model has a JSON Schema (what ``prunespec schema`` publishes) that is
  JSON-serialisable; for an adapted torch class, the options match the constructor's keyword arguments;
* **mask shape and dtype**: ``compute_mask`` returns a tensor of the tensor's shape, and of its dtype
  (or ``torch.bool``);
* **binary**: every mask value is 0 or 1;
* **options kept on the instance**: each option is the method object's attribute of the same name
  (``prunespec.save`` records options from there, and ``prunespec.load`` rebuilds the hook from them);
* **inputs untouched**: ``compute_mask`` changes neither ``t`` nor ``default_mask`` in place;
  ``score``/``mask``/``reconstruct`` write into none of ``ctx.values``, ``ctx.mask`` and
  ``ctx.statistics`` (statistics are shared by modules fed the same input);
* **respects default_mask**: entries that are 0 in ``default_mask`` stay 0, called directly and
  through ``PruningContainer`` (and in ``reconstruct``'s mask, the zeros of ``ctx.mask``);
* **honours the amount** (methods that take one): exactly ``round(amount * remaining)`` of the units
  the method declares (entries, channels along ``dim``, blocks, ...) are pruned, as torch rounds (an
  integer amount is a count), and from a dense start every unit is kept or pruned whole;
* **works through prunespec**: ``prunespec.apply`` with ``amount`` and with ``sparsity`` prunes that
  many units of a module holding the tensor (plan, engine and all; ``sparsity`` counts units too);
* **scores agree with compute_mask** (methods that score, through ``importance(t)`` or
  ``score(ctx)``; prunespec then selects by those scores itself): one score per unit (the unit grid's
  shape), the same scores twice, ``importance`` elementwise (each entry's score from its value alone),
  and, where the method also computes masks, every unit it prunes scores no higher than every unit it
  keeps;
* **deterministic under a seed**: ``torch.manual_seed(s)`` before two calls gives the same mask;
* **data-aware methods** (a class with ``statistics``): ``score``/``mask``/``reconstruct`` get synthetic
  statistics for the weight's inputs (dim 1), those the class declares, from :func:`synthetic_statistics`
  (``input_gram``: a random symmetric positive-definite float32 ``(in, in)`` matrix; ``input_sq_norms``: its
  diagonal, positive); **statistics**: each declared one can be made so; and "works through prunespec"
  runs ``prunespec.apply`` on an ``nn.Linear`` holding the weight with random calibration batches (other
  shapes are not run through prunespec: statistics are collected for Linear layers only; a method reading
  ``block_influence``, a statistic of whole blocks, gets a synthetic one and is not run through prunespec
  either: only a ``group: {unit: blocks}`` rule over a model's blocks runs it); a method whose
  amount applies per row (``per_row``) is counted, and its scores compared, row by row (each row pruning
  its share of the entries left in it);
* **reconstruct (mask, values)** (a class with ``updates_values``): ``reconstruct(ctx)``, from a dense
  start and after earlier pruning, returns a ``(mask, values)`` pair of tensors of ``ctx.values``'s shape,
  dtype and device; the mask is also checked for **binary**, **respects default_mask**, **honours the
  amount** and **inputs untouched** as above; "works through prunespec" gives it calibration batches too
  and counts what the mask prunes (whether apply installs the new values is the engine's part, not
  checked here);
* **pickle-able**: the method object (which becomes the module's forward pre-hook, and is pickled with
  the model by ``torch.save(model)``) survives ``pickle`` and computes the same mask afterwards.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import pickle
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pluggy
import torch
from pydantic import BaseModel, ValidationError
from torch import nn
from torch.nn.utils import prune

from . import hookspecs
from .calibration import BLOCK_LEVEL
from .masks import Channels, Entries, Unit, n_to_prune
from .methods.base import MaskContext, MethodInfo, PruningMethod
from .plugins import MethodRegistry, PluginSource, _registrar
from .schema import build_schema

__all__ = ["DEFAULT_DTYPES", "DEFAULT_SHAPES", "check_method", "registered_methods", "synthetic_statistics"]

DEFAULT_SHAPES: tuple[tuple[int, ...], ...] = ((16,), (8, 16), (8, 16, 3, 3))
"""A bias, a ``Linear`` weight (out, in) and a ``Conv2d`` weight (out, in, kh, kw). Shapes the method's
``check_tensor`` refuses (a structured method on the 1-D bias, say) are skipped."""

DEFAULT_DTYPES: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16)

_KEPT_FRACTION = 0.7  # of entries left unpruned by the random default masks


def synthetic_statistics(inputs: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Made-up calibration statistics of a module with ``inputs`` input features, one for each name in
    :data:`prunespec.calibration.STATISTICS`, consistent with each other as collected ones are:
    ``input_gram`` is ``A A^T / k + 0.01 I`` for a random ``(inputs, k)`` matrix ``A`` of ``k = 2 * inputs``
    "tokens" (float32, symmetric positive definite), ``input_sq_norms`` its diagonal (positive), and
    ``block_influence`` a value in (0, 1) (float64 scalar)."""
    gen = torch.Generator().manual_seed(seed)
    k = 2 * inputs
    a = torch.randn(inputs, k, generator=gen)
    gram = a @ a.T / k + 0.01 * torch.eye(inputs)
    gram = (gram + gram.T) / 2  # exactly symmetric, whatever the matmul's rounding
    influence = torch.rand((), generator=gen, dtype=torch.float64) * 0.9 + 0.05
    return {"input_sq_norms": gram.diagonal().clone(), "input_gram": gram, "block_influence": influence}


def registered_methods(plugin: object, *, name: str = "plugin-under-test") -> dict[str, MethodInfo]:
    """What ``plugin``'s ``prunespec_register_methods`` hook registers, as the registry sees it.

    ``plugin`` is what the plugin's entry point names (usually its module). The hook is validated and
    called exactly as :func:`prunespec.load_methods` does, without needing the package installed.
    Errors from the hook propagate; two registrations of one name raise ``PluginError``.
    """
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(plugin, name=name)
    registry = MethodRegistry()
    for impl in pm.hook.prunespec_register_methods.get_hookimpls():
        staged: list[MethodInfo] = []
        impl.function(register=_registrar(PluginSource(name), staged))
        for info in staged:
            registry.add(info)
    return dict(registry.methods)


def check_method(
    method: type | MethodInfo,
    *,
    name: str | None = None,
    options: Mapping[str, Any] | None = None,
    amount: float | int = 0.5,
    shapes: Sequence[tuple[int, ...]] = DEFAULT_SHAPES,
    dtypes: Sequence[torch.dtype] = DEFAULT_DTYPES,
    seed: int = 0,
    options_model: type[BaseModel] | None = None,
    summary: str | None = None,
) -> MethodInfo:
    """Check that a pruning method keeps prunespec's method contract; raise ``AssertionError`` if not.

    ``method`` is the class you register (a :class:`prunespec.PruningMethod` subclass, or any
    ``torch.nn.utils.prune.BasePruningMethod`` subclass together with the ``name=`` you register it
    under), or a :class:`MethodInfo` from a registry. ``options`` are option values for the check (the
    method's required options must be given); ``options_model`` and ``summary`` are what you pass to
    ``register(...)`` as ``options=`` and ``summary=``, if anything (for an adapted torch class).
    ``amount`` is used for methods that take one (a float is a fraction, an int a count). ``shapes`` and
    ``dtypes`` are the tensors tried; shapes the method's ``check_tensor`` refuses are skipped, but at
    least one must be accepted. Random tensors and masks are drawn from ``seed``; the caller's random
    state is left as it was.

    Returns the :class:`MethodInfo` the registry would hold.
    """
    if isinstance(method, MethodInfo):
        info = method
    else:
        try:
            info = MethodInfo.from_class(method, name=name, options=options_model, summary=summary)
        except Exception as exc:
            raise AssertionError(
                f"method {name or getattr(method, '__qualname__', method)!r} breaks the rule 'registers': "
                f"{type(exc).__name__}: {exc}"
            ) from exc
    checker = _Checker(info, dict(options or {}), amount, seed)
    checker.run(list(shapes), list(dtypes))
    checker.raise_failures()
    return info


class _Checker:
    def __init__(self, info: MethodInfo, options: dict[str, Any], amount: float | int, seed: int) -> None:
        self.info = info
        self.raw_options = options
        self.options: dict[str, Any] = {}
        self.amount = amount
        self.seed = seed
        self.failures: dict[str, list[str]] = {}

    @property
    def label(self) -> str:
        return f"method {self.info.name!r} ({self.info.method.__module__}.{self.info.method.__qualname__})"

    @property
    def takes_amount(self) -> bool:
        """Whether the rules checked give an amount (with these options)."""
        return self.info.needs_amount(self.options)

    def statistics(self, t: torch.Tensor) -> dict[str, torch.Tensor]:
        """Synthetic calibration statistics for ``t``'s module, one per name the method declares (fresh
        tensors each call, so a method writing into them can be caught)."""
        names = self.info.capabilities.statistics
        if not names:
            return {}
        if t.dim() < 2:  # no input features: only statistics of whole blocks apply
            names = tuple(n for n in names if n in BLOCK_LEVEL)
        made = synthetic_statistics(t.shape[1] if t.dim() >= 2 else 2, self.seed + 7)
        return {name: made[name] for name in names if name in made}

    def check_statistics(self) -> None:
        """Every statistic the method declares can be made up here (a name prunespec collects but this
        module cannot make is prunespec's omission, named so rather than as the method's KeyError)."""
        missing = [name for name in self.info.capabilities.statistics if name not in synthetic_statistics(2, 0)]
        if missing:
            self.fail(
                "statistics",
                f"check_method has no synthetic {', '.join(missing)} (prunespec.testing.synthetic_statistics "
                "lacks them): report it to prunespec",
            )

    def fail(self, rule: str, detail: str, case: str | None = None) -> None:
        self.failures.setdefault(rule, []).append(f"{detail} [{case}]" if case else detail)

    def raise_failures(self) -> None:
        if not self.failures:
            return
        lines = [f"{self.label} breaks the method contract:"]
        for rule, details in self.failures.items():
            more = f" (and {len(details) - 1} more case{'s' if len(details) > 2 else ''})" if len(details) > 1 else ""
            lines.append(f"  - rule '{rule}': {details[0]}{more}")
        raise AssertionError("\n".join(lines))

    # --- the checks ----------------------------------------------------------------------------

    def run(self, shapes: list[tuple[int, ...]], dtypes: list[torch.dtype]) -> None:
        self.check_options_schema()
        if not self.check_options():
            return
        method = self.build()
        if method is None:
            return
        self.check_options_kept(method)
        self.check_statistics()
        refused: dict[tuple[int, ...], str] = {}
        for shape in shapes:
            try:
                reason = self.info.check_tensor(shape, self.options)
            except Exception as exc:
                self.fail("shapes", f"check_tensor({list(shape)}, {self.options}) raised {type(exc).__name__}: {exc}")
                return
            if reason is not None:
                refused[shape] = reason
        accepted = [shape for shape in shapes if shape not in refused]
        if not accepted:
            reasons = "; ".join(f"{list(s)}: {reason}" for s, reason in refused.items())
            self.fail("shapes", f"check_tensor refuses every shape tried ({reasons}); pass shapes= it accepts")
            return
        for index, shape in enumerate(accepted):
            for dtype in dtypes:
                self.check_case(shape, dtype, self.seed + index)
        self.check_pickle(accepted[0])

    def check_options_schema(self) -> None:
        model = self.info.options_model
        try:
            schema = model.model_json_schema()
            json.dumps(schema)
        except Exception as exc:
            self.fail("options schema", f"{model.__name__}.model_json_schema() failed: {type(exc).__name__}: {exc}")
            return
        if schema.get("type") != "object":
            self.fail("options schema", f"the options schema of {model.__name__} is not an object schema: {schema}")
        try:  # what `prunespec schema` publishes: the spec schema with this method's options in it
            json.dumps(build_schema({self.info.name: self.info}))
        except Exception as exc:
            self.fail("options schema", f"the spec schema cannot include it: {type(exc).__name__}: {exc}")
        if issubclass(self.info.cls, PruningMethod):
            return
        parameters = inspect.signature(self.info.cls).parameters
        if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
            return
        accepted = {n for n, p in parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
        required = {n for n in accepted if parameters[n].default is parameters[n].empty} - {"amount"}
        fields = set(model.model_fields)
        if fields - accepted:
            self.fail(
                "options schema",
                f"options {sorted(fields - accepted)} are not keyword arguments of {self.info.cls.__qualname__}()",
            )
        if required - fields:
            self.fail(
                "options schema",
                f"constructor arguments {sorted(required - fields)} of {self.info.cls.__qualname__}() are not options, "
                "so a spec cannot give them",
            )

    def check_options_kept(self, method: prune.BasePruningMethod) -> None:
        """prunespec.save records each option from the method object's attribute of the same name."""
        for key, value in self.options.items():
            if not hasattr(method, key) or getattr(method, key) != value:
                found = repr(getattr(method, key)) if hasattr(method, key) else "no such attribute"
                self.fail(
                    "options kept on the instance",
                    f"option {key}={value!r} is not the method object's attribute {key!r} ({found}); "
                    "prunespec.save records options from those attributes and load rebuilds the method from them",
                )

    def check_options(self) -> bool:
        try:
            self.options = self.info.validate_options(self.raw_options)
        except ValidationError as exc:
            errors = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'options'}: {e['msg']}" for e in exc.errors())
            self.fail("options", f"options={self.raw_options!r} do not validate ({errors}); pass valid options=")
            return False
        except Exception as exc:
            self.fail("options", f"validating options={self.raw_options!r} raised {type(exc).__name__}: {exc}")
            return False
        return True

    def build(self) -> prune.BasePruningMethod | None:
        try:
            method = self.info.build(self.amount if self.takes_amount else None, self.options)
        except Exception as exc:
            self.fail("registers", f"building it with options {self.options} failed: {type(exc).__name__}: {exc}")
            return None
        method._tensor_name = "weight"  # what prune.BasePruningMethod.apply sets on the hook
        return method

    def compute(
        self, rule: str, case: str, method: prune.BasePruningMethod, t: torch.Tensor, default: torch.Tensor
    ) -> torch.Tensor | None:
        """The mask, computed under the seed; None (and a failure) if the method raises or misbehaves."""
        if isinstance(method, prune.PruningContainer):
            # torch's container writes the new mask into `default_mask` itself (when the dtypes match), so
            # it gets a copy, as prunespec's engine gives it; whether `t` is left alone is still checked.
            default = default.clone()
        t_before, default_before = t.clone(), default.clone()
        try:
            with _seeded(self.seed):
                if self.masks_in_context and not isinstance(method, prune.PruningContainer):
                    assert isinstance(method, PruningMethod)
                    dense = bool((default == 1).all())
                    stats = self.statistics(t)
                    mask_so_far = None if dense else default
                    ctx = MaskContext("weight", "", "weight", nn.Module(), t, mask_so_far, self.options, stats)
                    mask = method.mask(ctx)
                    self.check_statistics_untouched(case, stats, t, "mask(ctx)")
                else:
                    mask = method.compute_mask(t, default_mask=default)
        except Exception as exc:
            self.fail(rule, f"compute_mask raised {type(exc).__name__}: {exc}", case)
            return None
        if not torch.equal(t, t_before) or not (
            isinstance(method, prune.PruningContainer) or torch.equal(default, default_before)
        ):
            self.fail("inputs untouched", "compute_mask changed `t` or `default_mask` in place", case)
        if not isinstance(mask, torch.Tensor):
            self.fail("mask shape and dtype", f"compute_mask returned {type(mask).__name__}, not a tensor", case)
            return None
        if mask.shape != t.shape:
            self.fail("mask shape and dtype", f"mask shape {list(mask.shape)} != tensor shape {list(t.shape)}", case)
            return None
        if mask.dtype not in (t.dtype, torch.bool):
            self.fail(
                "mask shape and dtype", f"mask dtype {mask.dtype} != tensor dtype {t.dtype} (or torch.bool)", case
            )
        if not bool(((mask == 0) | (mask == 1)).all()):
            values = sorted({float(v) for v in mask.detach().float().flatten().tolist()})[:6]
            self.fail("binary", f"the mask has values other than 0 and 1: {values}", case)
            return None
        return mask

    @property
    def computes_masks(self) -> bool:
        """Whether the method computes masks itself (torch's ``compute_mask``), rather than only scoring."""
        method = self.info.method
        return (
            method.hook_class is not None
            or method.compute_mask is not PruningMethod.compute_mask
            or method.mask is not PruningMethod.mask
            or method.capabilities().elementwise
        )

    @property
    def masks_in_context(self) -> bool:
        """Whether the method masks through :meth:`PruningMethod.mask` alone (prunespec calls it with the
        mask so far: torch's container is never involved)."""
        method = self.info.method
        return (
            method.hook_class is None
            and method.mask is not PruningMethod.mask
            and method.compute_mask is PruningMethod.compute_mask
        )

    def check_case(self, shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> None:
        case = f"shape {list(shape)}, {str(dtype).removeprefix('torch.')}"
        gen = torch.Generator().manual_seed(seed)
        t = torch.randn(shape, generator=gen).to(dtype)
        ones = torch.ones(shape, dtype=dtype)
        default = (torch.rand(shape, generator=gen) < _KEPT_FRACTION).to(dtype)
        default.view(-1)[0] = 1  # never all zeros
        masked = t * default  # what prunespec hands a method: the weight with earlier pruning applied

        self.check_through_prunespec(case, t)
        if self.info.capabilities.updates_values:
            self.check_reconstruct(case, t, None)
            self.check_reconstruct(case, t, default)
            return  # its masks come with its values from reconstruct(ctx), never from compute_mask
        if not self.computes_masks:
            self.check_scores(case, t, None)
            return
        fresh = self.build()
        if fresh is None:
            return
        dense = self.compute("mask shape and dtype", case, fresh, t, ones)
        if dense is not None and self.takes_amount:
            self.check_amount(case, dense, ones)
        if dense is not None:
            self.check_scores(case, t, dense)
        if dense is not None:
            again = self.build()
            repeat = None if again is None else self.compute("deterministic under a seed", case, again, t, ones)
            if repeat is not None and not torch.equal(dense, repeat):
                self.fail(
                    "deterministic under a seed", "two calls after torch.manual_seed(s) gave different masks", case
                )

        fresh = self.build()
        direct = None if fresh is None else self.compute("respects default_mask", case, fresh, masked, default)
        if direct is not None:
            self.check_keeps_zeros("respects default_mask", case, direct, default, "compute_mask(t, default_mask)")

        fresh = self.build()
        if fresh is None or self.masks_in_context:
            return
        try:
            container = prune.PruningContainer(fresh)
        except Exception as exc:
            self.fail("respects default_mask", f"PruningContainer refused it: {type(exc).__name__}: {exc}", case)
            return
        composed = self.compute("respects default_mask", case + ", via PruningContainer", container, masked, default)
        if composed is None:
            return
        self.check_keeps_zeros("respects default_mask", case, composed, default, "PruningContainer.compute_mask")
        if self.takes_amount:
            self.check_amount(case + ", via PruningContainer", composed, default)

    def check_keeps_zeros(
        self, rule: str, case: str, mask: torch.Tensor, default: torch.Tensor, how: str, earlier: str = "default_mask"
    ) -> None:
        revived = int((mask[default == 0] != 0).sum())
        if revived:
            self.fail(rule, f"{how} set {revived} entries to 1 that are 0 in {earlier}", case)

    def unit(self) -> Unit | None:
        try:
            return self.info.units(self.options)
        except Exception as exc:
            self.fail("units", f"units({self.options}) raised {type(exc).__name__}: {exc}")
            return None

    def check_amount(self, case: str, mask: torch.Tensor, default: torch.Tensor) -> None:
        """After pruning from ``default``: exactly the amount of what remained is newly pruned, counted in
        the method's declared units, and (from a dense start) every unit kept or pruned whole."""
        unit = self.unit()
        if unit is None:
            return
        if self.info.pruning_type == "global" and not torch.equal(default, torch.ones_like(default)):
            return  # through a container a self-directed method sees the whole tensor: its amount is its own
        shape = tuple(mask.shape)
        count = unit.count(shape)
        alive_before = count - unit.pruned(default)
        alive_after = count - unit.pruned(mask)
        name = unit.name if not isinstance(unit, Channels) else f"channels along dim {unit.dim % mask.dim()}"
        if not isinstance(unit, Entries) and torch.equal(default, torch.ones_like(default)):
            partly = ~unit.reduce(mask) & ~unit.reduce(1 - mask)  # neither all pruned nor all kept
            if bool(partly.any()):
                self.fail("honours the amount", f"{int(partly.sum())} {name} are only partly pruned", case)
        expected = n_to_prune(self.amount, alive_before)
        if self.per_row(mask):  # each row prunes its own share of the entries left in it
            left = (default != 0).sum(dim=1).tolist()
            wanted = [n_to_prune(self.amount, n) for n in left]
            got = [a - b for a, b in zip(left, (mask != 0).sum(dim=1).tolist(), strict=True)]
            wrong = [i for i, (w, g) in enumerate(zip(wanted, got, strict=True)) if w != g]
            if wrong:
                i = wrong[0]
                self.fail(
                    "honours the amount",
                    f"amount={self.amount} applies to each row: row {i} has {left[i]} entries left and should "
                    f"prune {wanted[i]}, but {got[i]} were pruned ({len(wrong)} rows wrong)",
                    case,
                )
                return
            expected = sum(wanted)
        pruned = alive_before - alive_after
        if pruned != expected:
            self.fail(
                "honours the amount",
                f"amount={self.amount} of {alive_before} remaining {name} should prune {expected} "
                f"(round(amount * remaining), as torch rounds), but {pruned} were pruned",
                case,
            )

    def per_row(self, t: torch.Tensor) -> bool:
        return self.info.per_row(self.options) and t.dim() == 2

    def check_scores(self, case: str, t: torch.Tensor, mask: torch.Tensor | None) -> None:
        """Scores that prunespec ranks by: of the unit grid's shape, elementwise when declared so, and
        ranking as ``compute_mask`` does when the method has one."""
        caps = self.info.capabilities
        if not caps.scores:
            return
        rule = "scores agree with compute_mask"
        unit = self.unit()
        if unit is None:
            return
        try:
            method = self.info.instance(self.amount if self.takes_amount else None, self.options)
            stats, values = self.statistics(t), t.clone()
            ctx = MaskContext("weight", "", "weight", nn.Module(), values, None, self.options, stats)
            scores = method.score(ctx)
            again = method.score(ctx)
            self.check_statistics_untouched(case, stats, t, "score(ctx)")
            if not torch.equal(values, t):
                self.fail("inputs untouched", "score(ctx) wrote into ctx.values: work on a copy", case)
            flat = method.importance(t.reshape(-1)) if caps.elementwise else None
        except Exception as exc:
            self.fail(rule, f"scoring raised {type(exc).__name__}: {exc}", case)
            return
        grid = unit.grid(tuple(t.shape))
        if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != grid:
            got = list(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
            self.fail(
                rule, f"the scores have shape {got}, expected {list(grid)} (one score per unit: {unit.name})", case
            )
            return
        if not isinstance(again, torch.Tensor) or not torch.equal(scores, again):
            self.fail(rule, "scoring the same tensor twice gives different scores", case)
            return
        if flat is not None and not torch.equal(flat.reshape(scores.shape), scores):
            self.fail(rule, "the scores are not elementwise: scoring the flattened tensor gives other values", case)
            return
        if mask is None:
            return
        if not self.takes_amount:
            return  # options that replace the amount (N:M) choose within groups, not by one cut
        pruned = unit.reduce(mask)
        groups = list(zip(scores, pruned, strict=True)) if self.per_row(t) else [(scores, pruned)]
        for row_scores, row_pruned in groups:
            if not (bool(row_pruned.any()) and bool((~row_pruned).any())):
                continue
            highest_pruned, lowest_kept = row_scores[row_pruned].max(), row_scores[~row_pruned].min()
            if bool(highest_pruned > lowest_kept):
                self.fail(
                    rule,
                    f"compute_mask pruned a unit scoring {float(highest_pruned):.4g} but kept one scoring "
                    f"{float(lowest_kept):.4g}; prunespec selects by the scores, so the two must agree",
                    case,
                )

    def check_statistics_untouched(
        self, case: str, stats: Mapping[str, torch.Tensor], t: torch.Tensor, how: str
    ) -> None:
        """Statistics are shared (modules fed the same input get the very same tensor): never written into."""
        fresh = self.statistics(t)
        changed = [name for name, value in stats.items() if not torch.equal(value, fresh[name])]
        if changed:
            self.fail(
                "inputs untouched",
                f"{how} wrote into ctx.statistics[{', '.join(map(repr, changed))}] (statistics are shared between "
                "modules fed the same input: work on a copy)",
                case,
            )

    def check_reconstruct(self, case: str, t: torch.Tensor, mask_so_far: torch.Tensor | None) -> None:
        """A method with ``updates_values``: ``reconstruct(ctx)`` gives a binary mask keeping the zeros of
        ``ctx.mask`` and new values, both like ``ctx.values``, leaves the context alone and prunes the amount."""
        rule = "reconstruct (mask, values)"
        case = case + ("" if mask_so_far is None else ", after earlier pruning")
        stats = self.statistics(t)
        values = t.clone()
        mask = None if mask_so_far is None else mask_so_far.clone()
        try:
            method = self.info.instance(self.amount if self.takes_amount else None, self.options)
            ctx = MaskContext("weight", "", "weight", nn.Module(), values, mask, self.options, stats)
            with _seeded(self.seed):
                result = method.reconstruct(ctx)
        except Exception as exc:
            self.fail(rule, f"reconstruct(ctx) raised {type(exc).__name__}: {exc}", case)
            return
        if not torch.equal(values, t) or (
            mask is not None and mask_so_far is not None and not torch.equal(mask, mask_so_far)
        ):
            self.fail(
                "inputs untouched", "reconstruct(ctx) wrote into ctx.values or ctx.mask: return new tensors", case
            )
        self.check_statistics_untouched(case, stats, t, "reconstruct(ctx)")
        if (
            not isinstance(result, tuple)
            or len(result) != 2
            or not all(isinstance(part, torch.Tensor) for part in result)
        ):
            self.fail(
                rule, f"reconstruct(ctx) returned {_describe(result)}, not a (mask, values) pair of tensors", case
            )
            return
        for what, part in zip(("mask is", "values are"), result, strict=True):
            if (part.shape, part.dtype, part.device) != (t.shape, t.dtype, t.device):
                self.fail(
                    rule,
                    f"reconstruct's {what} {list(part.shape)} {part.dtype} on {part.device}; ctx.values is "
                    f"{list(t.shape)} {t.dtype} on {t.device}, and both must be so",
                    case,
                )
                return
        new_mask = result[0]
        if not bool(((new_mask == 0) | (new_mask == 1)).all()):
            found = sorted({float(v) for v in new_mask.detach().float().flatten().tolist()})[:6]
            self.fail("binary", f"reconstruct's mask has values other than 0 and 1: {found}", case)
            return
        default = torch.ones_like(t) if mask_so_far is None else mask_so_far
        self.check_keeps_zeros("respects default_mask", case, new_mask, default, "reconstruct(ctx)'s mask", "ctx.mask")
        if self.takes_amount:
            self.check_amount(case + ", reconstruct", new_mask, default)

    def check_through_prunespec(self, case: str, t: torch.Tensor) -> None:
        """The method run by prunespec itself (plan, apply) on a module holding ``t``: with ``amount`` and
        with ``sparsity``, each counted in the method's units."""
        rule = "works through prunespec"
        unit = self.unit()
        if unit is None:
            return
        count = unit.count(tuple(t.shape))
        how: list[dict[str, Any]] = [{"amount": self.amount}, {"sparsity": 0.5}] if self.takes_amount else [{}]
        caps = self.info.capabilities
        data_aware = bool(caps.statistics) or caps.updates_values  # both work from calibration data
        if data_aware and t.dim() != 2:
            return  # calibration statistics are collected for Linear layers only
        if BLOCK_LEVEL & set(caps.statistics):
            return  # it scores whole blocks: only a group rule over a model's blocks runs it
        for extra in how:
            holder: nn.Module
            data = None
            if data_aware:
                holder = nn.Linear(t.shape[1], t.shape[0], bias=False, dtype=t.dtype)
                holder.weight = nn.Parameter(t.clone())
                gen = torch.Generator().manual_seed(self.seed)
                data = [torch.randn(2 * t.shape[1], t.shape[1], generator=gen).to(t.dtype) for _ in range(2)]
            else:
                holder = nn.Module()
                holder.weight = nn.Parameter(t.clone())
            spec = {
                "version": 1,
                "seed": self.seed,
                "rules": [
                    {"select": {"names": ["**"]}, "method": self.info.name, "options": self.raw_options, **extra}
                ],
            }
            registry = MethodRegistry({self.info.name: self.info})
            try:
                from .api import apply

                apply(holder, spec, methods=registry, data=data)
            except Exception as exc:
                self.fail(rule, f"prunespec.apply with {extra or 'no amount'} raised {type(exc).__name__}: {exc}", case)
                return
            if not self.takes_amount:
                continue
            wanted = n_to_prune(self.amount, count) if "amount" in extra else round(0.5 * count)
            if self.per_row(t):
                row = t.shape[1]
                each = n_to_prune(self.amount, row) if "amount" in extra else round(0.5 * row)
                wanted = t.shape[0] * each
            got = unit.pruned(holder.get_buffer("weight_mask"))
            if got != wanted:
                self.fail(rule, f"{extra} of {count} {unit.name} should prune {wanted}, pruned {got}", case)

    def check_pickle(self, shape: tuple[int, ...]) -> None:
        method = self.build()
        if method is None:
            return
        try:
            copy = pickle.loads(pickle.dumps(method))
        except Exception as exc:
            self.fail(
                "pickle-able",
                f"pickling the method object failed ({type(exc).__name__}: {exc}); it is the module's forward "
                "pre-hook, so torch.save(model) pickles it: keep lambdas, open files and locks out of it",
            )
            return
        if not self.computes_masks or self.info.capabilities.updates_values:
            return  # its masks come from scores or reconstruct(ctx), computed at apply, never from the hook
        gen = torch.Generator().manual_seed(self.seed)
        t = torch.randn(shape, generator=gen)
        ones = torch.ones(shape)
        case = f"shape {list(shape)}, float32"
        before = self.compute("pickle-able", case, method, t, ones)
        after = self.compute("pickle-able", case, copy, t, ones)
        if before is not None and after is not None and not torch.equal(before, after):
            self.fail("pickle-able", "the unpickled method computes a different mask than the original", case)


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator for the block, restoring the caller's random state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _describe(value: Any) -> str:
    """What a method returned, briefly: the type, and the parts' types for a tuple."""
    if isinstance(value, tuple):
        return f"a tuple of {len(value)} ({', '.join(type(v).__name__ for v in value)})"
    return type(value).__name__
