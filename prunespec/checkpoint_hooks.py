"""A checkpoint's record of which methods pruned each tensor: written as plain data, checked and rebuilt
into hook objects before a load changes anything.

Records, per pruned tensor, in the order the methods ran::

    {"method": "ln_structured", "amount": 0.25, "options": {"n": 2, "dim": 0},
     "provider": "prunespec.builtin", "package": "prunespec", "version": "0.1.0"}
    {"global": "l1_unstructured", "amount": 0.1, "group_size": 5}     # a scope: global step
    {"method": None, "class": "torch.nn.utils.prune.CustomFromMask"}   # a hook no registered method made

Everything in a record is what ``torch.load(weights_only=True)`` reads: str, int, float, bool, None, lists
and dicts. Options go through the method's options model: JSON mode for values that are not plain
(Enums, Paths, tuples), and back through the model on load.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator, Mapping
from numbers import Integral, Real
from typing import Any

from pydantic import BaseModel, ValidationError
from torch import nn
from torch.nn.utils import prune

from .errors import CheckpointError
from .layout import GlobalMask
from .methods.base import MethodInfo
from .plugins import MethodRegistry, provider_hint

METHOD_KEYS = frozenset({"method", "amount", "options", "provider", "package", "version"})
GLOBAL_KEYS = frozenset({"global", "amount", "group_size"})
CLASS_KEYS = frozenset({"method", "class"})


def pruning_hooks(model: nn.Module) -> Iterator[tuple[str, nn.Module, Any, prune.BasePruningMethod]]:
    """(tensor name, module, hook key, hook) for every pruning hook of ``model``."""
    for module_name, module in model.named_modules():
        for key, hook in module._forward_pre_hooks.items():
            if isinstance(hook, prune.BasePruningMethod):
                name = f"{module_name}.{hook._tensor_name}" if module_name else hook._tensor_name
                yield name, module, key, hook


def is_plain(value: Any) -> bool:
    """Whether ``value`` is data that ``torch.load(weights_only=True)`` reads back as it was."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return type(value) in (type(None), str, bool, int, float)  # not subclasses such as IntEnum
    if isinstance(value, list):
        return all(is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(type(k) is str and is_plain(v) for k, v in value.items())
    return False


def describe(model: nn.Module, methods: MethodRegistry) -> dict[str, list[dict[str, Any]]]:
    """The records of every pruned tensor of ``model``.

    A hook whose options cannot be read back from it as plain data is recorded by its class, with a
    warning: its mask is saved all the same, and loads under torch's Identity.
    """
    by_class = {info.cls: info for info in methods.values()}
    out = {}
    for name, _, _, hook in pruning_hooks(model):
        parts = list(hook) if isinstance(hook, prune.PruningContainer) else [hook]
        records: list[dict[str, Any]] = []
        for part in parts:
            info = by_class.get(type(part))
            record: dict[str, Any] | None = None
            if isinstance(part, GlobalMask):
                record = {"global": part.method, "amount": part.amount, "group_size": part.group_size}
            elif info is not None:
                record = _method_record(name, info, part)
            if record is None or not is_plain(record):
                record = {"method": None, "class": f"{type(part).__module__}.{type(part).__qualname__}"}
            records.append(record)
        out[name] = records
    return out


def _method_record(name: str, info: MethodInfo, hook: prune.BasePruningMethod) -> dict[str, Any] | None:
    """The record of a registered method's hook; its options go through the options model: plain
    values as they are (so 2 stays an int and inf a float), the others (Enums, Paths, tuples) in the
    model's JSON mode."""
    fields = info.options_model.model_fields
    amount = getattr(hook, "amount", None) if info.takes_amount else None
    try:
        options = info.options_model(**{key: getattr(hook, key) for key in fields if hasattr(hook, key)})
        python, as_json = options.model_dump(), options.model_dump(mode="json")
    except (ValidationError, ValueError, TypeError) as exc:
        problem = _short(exc)
    else:
        record = {
            "method": info.name,
            "amount": amount,
            "options": {key: value if is_plain(value) else as_json[key] for key, value in python.items()},
            "provider": info.provider,
            "package": info.package,
            "version": info.version,
        }
        if is_plain(record):
            return record
        problem = f"amount {amount!r} is not a plain number"
    warnings.warn(
        f"{name}: the settings of its {info.name} hook cannot be recorded ({problem}); the checkpoint records "
        f"only its class, and its mask loads with torch's Identity as its hook",
        stacklevel=4,
    )
    return None


def rebuild(
    path: str, records: Any, pruned: Mapping[str, tuple[int, ...]], methods: MethodRegistry
) -> dict[str, prune.BasePruningMethod | None]:
    """The hook each recorded tensor gets (None: keep torch's Identity, for a hook no registered
    method made), checked against the installed methods and their options.

    ``pruned`` maps each tensor the checkpoint prunes to its shape. Raises CheckpointError,
    naming the record, for anything that does not fit.
    """
    if records is None:
        return {}
    if not isinstance(records, Mapping):
        raise CheckpointError(f"{path}: prunespec.hooks is {a_type(records)}; expected a mapping")
    out: dict[str, prune.BasePruningMethod | None] = {}
    for name, entries in records.items():
        where = f"{path}: prunespec.hooks[{name!r}]"
        if not isinstance(name, str) or name not in pruned:
            raise CheckpointError(f"{where}: the checkpoint prunes no such tensor (no {name}_orig and {name}_mask)")
        if not isinstance(entries, list) or not entries:
            raise CheckpointError(f"{where}: is {entries!r}; expected a non-empty list of records")
        built = [_build(f"{where}[{i}]", entry, pruned[name], methods) for i, entry in enumerate(entries)]
        hooks = [hook for hook in built if hook is not None]
        if len(hooks) < len(built):
            classes = [e.get("class") for e in entries if isinstance(e, Mapping) and e.get("method") is None]
            warnings.warn(
                f"{name} was pruned by {classes[0]}, which no installed method registers; "
                "its mask is loaded, with torch's Identity as its hook",
                stacklevel=4,
            )
            out[name] = None
            continue
        pname = name.rpartition(".")[2]
        for hook in hooks:
            hook._tensor_name = pname
        if len(hooks) == 1:
            out[name] = hooks[0]
            continue
        container = prune.PruningContainer(hooks[0])
        for hook in hooks[1:]:
            container.add_pruning_method(hook)
        out[name] = container
    return out


def _build(where: str, record: Any, shape: tuple[int, ...], methods: MethodRegistry) -> prune.BasePruningMethod | None:
    if not isinstance(record, Mapping):
        raise CheckpointError(
            f"{where}: is {a_type(record)}; expected a mapping like "
            "{'method': 'l1_unstructured', 'amount': 0.2, 'options': {}}"
        )
    if "global" in record:
        _keys(where, record, GLOBAL_KEYS, GLOBAL_KEYS)
        method, amount, group_size = record["global"], record["amount"], record["group_size"]
        if not isinstance(method, str):
            raise CheckpointError(f"{where}.global: is {method!r}; expected the name of a method")
        _check_amount(where, amount, None)
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise CheckpointError(f"{where}.group_size: is {group_size!r}; expected an integer >= 1")
        return GlobalMask(method, amount, group_size)
    method = record.get("method")
    if method is None and "class" in record:
        _keys(where, record, CLASS_KEYS, CLASS_KEYS)
        if not isinstance(record["class"], str):
            raise CheckpointError(f"{where}.class: is {record['class']!r}; expected a class name")
        return None
    _keys(where, record, METHOD_KEYS, frozenset({"method"}))
    if not isinstance(method, str):
        raise CheckpointError(f"{where}.method: is {method!r}; expected the name of a method")
    if method not in methods:
        raise CheckpointError(f"{where}: method {method!r} is not installed ({_provider(method, record, methods)})")
    info = methods[method]
    amount = record.get("amount")
    raw = record.get("options")
    if info.needs_amount(raw if isinstance(raw, Mapping) else {}):
        _check_amount(where, amount, math.prod(shape))
    elif amount is not None:
        raise CheckpointError(f"{where}.amount: is {amount!r}; {method} takes no amount, expected None")
    options = record.get("options", {})
    if not isinstance(options, Mapping) or not all(isinstance(k, str) for k in options):
        raise CheckpointError(f"{where}.options: is {options!r}; expected a mapping of option names to values")
    try:
        checked = info.options_model.model_validate(dict(options))
    except ValidationError as exc:
        raise CheckpointError(
            f"{where}.options: not valid for {method} {info.version or ''}: {_short(exc)} "
            f"(options of {method}: {', '.join(info.options_model.model_fields) or 'none'})"
        ) from None
    problem = info.check_tensor(shape, _fields(checked))
    if problem is not None:
        raise CheckpointError(f"{where}.options: {problem}")
    try:
        return info.build(amount, _fields(checked))
    except Exception as exc:  # a method's own constructor checks
        raise CheckpointError(f"{where}: {method} cannot be rebuilt from this record: {_short(exc)}") from None


def _fields(options: BaseModel) -> dict[str, Any]:
    """The validated options as the method's constructor takes them: attributes, not a dump (an Enum
    stays an Enum, a nested model a model)."""
    return {key: getattr(options, key) for key in type(options).model_fields}


def _keys(where: str, record: Mapping[Any, Any], allowed: frozenset[str], required: frozenset[str]) -> None:
    unknown = sorted(str(k) for k in record if k not in allowed)
    if unknown:
        raise CheckpointError(f"{where}: unknown key {unknown[0]!r}; a record has {', '.join(sorted(allowed))}")
    missing = sorted(required - set(record))
    if missing:
        raise CheckpointError(f"{where}: no {missing[0]!r}; a record has {', '.join(sorted(allowed))}")


def _check_amount(where: str, amount: Any, size: int | None) -> None:
    """A fraction in [0, 1] or a count >= 0 (at most ``size``, when given)."""
    right = "expected a fraction in [0, 1] or a count >= 0"
    if isinstance(amount, bool) or not isinstance(amount, Real):
        raise CheckpointError(f"{where}.amount: is {amount!r}, not a number; {right}")
    if isinstance(amount, Integral):
        if int(amount) < 0 or (size is not None and int(amount) > size):
            limit = f" of at most {size}" if size is not None else ""
            raise CheckpointError(f"{where}.amount: is {amount}; expected a count >= 0{limit}, or a fraction in [0, 1]")
        return
    if not (math.isfinite(float(amount)) and 0.0 <= float(amount) <= 1.0):
        raise CheckpointError(f"{where}.amount: is {amount!r}; {right}")


def _provider(method: str, record: Mapping[Any, Any], methods: MethodRegistry) -> str:
    package = record.get("package")
    if isinstance(package, str) and package and package != "prunespec":
        version = record.get("version")
        saved = f" {version}" if isinstance(version, str) and version else ""
        return f"it was saved with the package {package}{saved}: pip install {package}"
    return provider_hint(method, methods) or "no installed plugin provides it; install the one that does"


def a_type(value: Any) -> str:
    """``an int``, ``a list``, ``None``: what a value is, for messages."""
    if value is None:
        return "None"
    name = type(value).__name__
    return f"{'an' if name[0].lower() in 'aeiou' else 'a'} {name}"


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}" if not isinstance(exc, ValidationError) else text[:400]
