"""Matching a rule's ``select`` against a model's modules.

Name patterns are matched against qualified module names (``features.0.conv``), as a whole:

* ``*`` matches any run of characters within one dotted segment (it never crosses a ``.``);
* ``?`` matches one character within a segment, ``[abc]`` / ``[!abc]`` one of (not of) a set;
* ``**`` as a whole segment matches zero or more segments: ``**.c_fc`` matches ``c_fc`` and
  ``transformer.h.0.mlp.c_fc``; ``encoder.**`` matches ``encoder`` and everything below it;
* ``re:<regex>`` is a Python regular expression that must match the *whole* name (``re:fc[12]``
  matches ``fc1``, not ``fc10``).

Type entries are class names (``Conv2d``, matching any module whose class or a base class has that
name) or dotted paths (``torch.nn.Conv2d``), resolved among the modules already imported — a spec
never imports code.
"""

from __future__ import annotations

import difflib
import inspect
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from torch import nn

from .patterns import compile_name_pattern

Matcher = Callable[[str, nn.Module], bool]


def name_matcher(pattern: str) -> Matcher:
    """A matcher for one ``names``/``exclude`` entry."""
    regex = compile_name_pattern(pattern)
    return lambda name, module: regex.fullmatch(name) is not None


def type_matcher(entry: str) -> Matcher:
    """A matcher for one ``types`` entry: a class name or a dotted path (isinstance semantics)."""
    if "." in entry:
        cls = _resolve_loaded(entry)
        if cls is not None:
            return lambda name, module: isinstance(module, cls)
        return lambda name, module: any(_qualified(c) == entry for c in type(module).__mro__)
    return lambda name, module: any(c.__name__ == entry for c in type(module).__mro__)


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _resolve_loaded(path: str) -> type | None:
    """The class at ``path`` if its module is already imported. Nothing is imported and no code runs:
    the longest prefix of ``path`` in ``sys.modules`` is the module, and the rest is looked up with
    ``inspect.getattr_static``, which reads ``__dict__`` and never calls a module's lazy ``__getattr__``
    (``torch._dynamo`` through ``torch`` would import hundreds of modules)."""
    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        obj: object = sys.modules.get(".".join(parts[:cut]))
        if obj is None:
            continue
        for attr in parts[cut:]:
            obj = inspect.getattr_static(obj, attr, None)
            if obj is None:
                return None
        return obj if isinstance(obj, type) else None
    return None


@dataclass
class Selection:
    """The modules one ``select`` picked, the entries that matched nothing, and why the selection is what
    it is (so that a rule that selects nothing can be explained without parsing messages)."""

    modules: list[tuple[str, nn.Module, str]] = field(default_factory=list)  # (name, module, selected by)
    unmatched: list[tuple[str, int, str]] = field(default_factory=list)  # (field, index, entry)
    # per given field (types, names, preset): the modules one of its entries matched
    matched: dict[str, list[str]] = field(default_factory=dict)
    candidates: list[str] = field(default_factory=list)  # modules every given field matched, before exclude
    excluded: list[str] = field(default_factory=list)  # candidates that `exclude` removed


HEAD_NAMES = frozenset({"lm_head", "classifier", "cls", "score", "qa_outputs", "head"})


def prunable_matcher(modules: Sequence[tuple[str, nn.Module]]) -> Matcher:
    """The ``prunable`` preset: modules with a weight of 2+ dims, except embeddings, norm layers and the
    output head (a weight tied to an embedding's, or a module under one of :data:`HEAD_NAMES`)."""
    embedding_weights = {id(_weight(m)) for _, m in modules if _is_embedding(m) and _weight(m) is not None}

    def match(name: str, module: nn.Module) -> bool:
        weight = _weight(module)
        if weight is None or weight.dim() < 2 or _is_embedding(module):
            return False
        if any("Norm" in cls.__name__ for cls in type(module).__mro__):
            return False
        return id(weight) not in embedding_weights and not HEAD_NAMES.intersection(name.split("."))

    return match


def _weight(module: nn.Module) -> nn.Parameter | None:
    weight = module._parameters.get("weight")
    if weight is None and "weight_mask" in module._buffers:  # already pruned
        weight = module._parameters.get("weight_orig")
    return weight


def _is_embedding(module: nn.Module) -> bool:
    return any("Embedding" in cls.__name__ for cls in type(module).__mro__)


def select_modules(
    modules: Sequence[tuple[str, nn.Module]],
    types: Sequence[str] | None,
    names: Sequence[str] | None,
    exclude: Sequence[str],
    preset: str | None = None,
) -> Selection:
    """Modules matching one of ``types`` (if given), one of ``names`` (if given), the ``preset`` (if
    given) and none of ``exclude``. Raises PatternError (a ValueError) for a malformed pattern.
    """
    fields: dict[str, Sequence[str]] = {
        "types": types or (),
        "names": names or (),
        "preset": [preset] if preset else [],
        "exclude": exclude,
    }
    makers = {"types": type_matcher, "names": name_matcher, "exclude": name_matcher}
    matchers = {
        key: [makers[key](entry) if key in makers else prunable_matcher(modules) for entry in entries]
        for key, entries in fields.items()
    }
    hits = {key: [0] * len(entries) for key, entries in fields.items()}
    given = [key for key, wanted in (("types", types), ("names", names), ("preset", preset)) if wanted is not None]
    selection = Selection(matched={key: [] for key in given})
    for name, module in modules:
        picked = {key: next((i for i, m in enumerate(ms) if m(name, module)), None) for key, ms in matchers.items()}
        for key, index in picked.items():
            if index is not None:
                hits[key][index] += 1
                if key in selection.matched:
                    selection.matched[key].append(name)
        if any(picked[key] is None for key in given):
            continue
        selection.candidates.append(name)
        if picked["exclude"] is not None:
            selection.excluded.append(name)
            continue
        by = ", ".join(f"{key}: {fields[key][i]}" for key, i in picked.items() if i is not None)
        selection.modules.append((name, module, by))
    for key, counts in hits.items():
        selection.unmatched += [(key, i, fields[key][i]) for i, n in enumerate(counts) if n == 0]
    return selection


def nearest_names(entry: str, modules: Sequence[tuple[str, nn.Module]], n: int = 3) -> list[str]:
    """Module names close to a ``names`` entry that matched nothing."""
    target = entry.removeprefix("re:").replace("*", "").replace("?", "")
    names = [name for name, _ in modules if name]
    return difflib.get_close_matches(target, names, n=n, cutoff=0.3)


def nearest_types(entry: str, modules: Sequence[tuple[str, nn.Module]], n: int = 3) -> list[str]:
    """Class names (short or qualified, as ``entry`` is) close to a ``types`` entry that matched nothing."""
    classes = {c for _, module in modules for c in type(module).__mro__ if c is not object}
    candidates = sorted({_qualified(c) if "." in entry else c.__name__ for c in classes})
    return difflib.get_close_matches(entry, candidates, n=n, cutoff=0.4)


COMMON_PARAMS = ("weight", "bias", "in_proj_weight", "in_proj_bias", "weight_ih_l0", "weight_hh_l0")


def nearest_params(entry: str, modules: Sequence[tuple[str, nn.Module]], n: int = 3) -> list[str]:
    """Parameter names close to a ``params`` entry: those of ``modules`` first, then common ones."""
    have = sorted({p.removesuffix("_orig") for _, m in modules for p in m._parameters})
    near = difflib.get_close_matches(entry, have, n=n, cutoff=0.5)
    return near or difflib.get_close_matches(entry, COMMON_PARAMS, n=n, cutoff=0.5)


def why_nothing(selection: Selection) -> tuple[str, str]:
    """(what happened, what to do) for a selection without modules whose every entry matched some."""
    if selection.candidates:
        return (
            f"`exclude` removed every module the rule selected ({_some(selection.excluded)})",
            "check `exclude`, or set `optional: true` if the rule may match nothing",
        )
    matched = " and ".join(f"{key} match {_some(names)}" for key, names in selection.matched.items())
    together = " and ".join(f"`{key}`" for key in selection.matched)
    return (
        f"no module matches {together} at once ({matched})",
        "a module is selected when it matches every one of `types`, `names` and `preset` given; "
        "split the rule in two to prune both",
    )


def _some(names: Sequence[str], n: int = 3) -> str:
    shown = ", ".join(name or "<root>" for name in names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


def params_hint(params: Sequence[str], modules: Sequence[tuple[str, nn.Module]]) -> str:
    """What to do when no selected module has any of ``params``: the nearest real parameter names."""
    near = dict.fromkeys(name for entry in params for name in nearest_params(entry, modules))
    fix = f"did you mean {' or '.join(map(repr, near))}? " if near else ""
    return fix + "check `params`, or set `optional: true` if the rule may match nothing"
