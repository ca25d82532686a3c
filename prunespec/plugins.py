"""Finding plugins and building the method registry.

Built-in methods and third-party plugins go through the same hook
(:func:`prunespec.hookspecs.prunespec_register_methods`). A plugin that fails to import or to register
is reported by name as a warning, and the others still load.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pluggy

from . import hookspecs
from .errors import PluginError
from .methods.base import MethodInfo

ENTRY_POINT_GROUP = "prunespec"
BUILTIN = "prunespec.builtin"
ENV_BUILTINS_ONLY = "PRUNESPEC_BUILTINS_ONLY"
ENV_ALLOW = "PRUNESPEC_PLUGINS"


class PluginWarning(UserWarning):
    """A plugin could not be loaded or could not register its methods; the others still load."""


@dataclass(frozen=True)
class PluginSource:
    """Where a plugin comes from: its name, and the distribution that ships it."""

    name: str
    package: str | None = None
    version: str | None = None


def make_plugin_manager(
    *, builtins_only: bool | None = None, allow: Iterable[str] | None = None
) -> tuple[pluggy.PluginManager, dict[str, PluginSource], list[str]]:
    """A fresh plugin manager with the built-ins and every installed plugin registered.

    ``builtins_only`` (default: the ``PRUNESPEC_BUILTINS_ONLY`` environment variable) skips third-party
    plugins; ``allow`` (default: the comma-separated ``PRUNESPEC_PLUGINS`` variable) loads only the
    named ones. Returns the manager, the source of each registered plugin, and the problems met.
    """
    from .methods import builtin

    if builtins_only is None:
        builtins_only = os.environ.get(ENV_BUILTINS_ONLY, "").strip().lower() not in ("", "0", "false", "no")
    if allow is None and os.environ.get(ENV_ALLOW, "").strip():
        allow = [name.strip() for name in os.environ[ENV_ALLOW].split(",") if name.strip()]
    allowed = set(allow) if allow is not None else None

    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(builtin, name=BUILTIN)
    sources = {BUILTIN: PluginSource(BUILTIN, "prunespec", _version("prunespec"))}
    problems: list[str] = []
    if builtins_only:
        return pm, sources, problems
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if allowed is not None and ep.name not in allowed:
            continue
        dist = ep.dist
        source = PluginSource(ep.name, dist.name if dist else None, dist.version if dist else None)
        try:
            plugin = ep.load()
            pm.register(plugin, name=ep.name)
        except Exception as exc:  # a broken plugin must not take the others down
            problems.append(_problem(source, "could not be loaded", exc))
            continue
        sources[ep.name] = source
    return pm, sources, problems


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _problem(source: PluginSource, what: str, exc: BaseException) -> str:
    package = f" (package {source.package} {source.version})" if source.package else ""
    return f"plugin {source.name!r}{package} {what}: {type(exc).__name__}: {exc}"


@dataclass
class MethodRegistry(Mapping[str, MethodInfo]):
    """Every method the installed plugins registered, by name."""

    methods: dict[str, MethodInfo] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def __getitem__(self, name: str) -> MethodInfo:
        return self.methods[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.methods)

    def __len__(self) -> int:
        return len(self.methods)

    def suggest(self, name: str) -> list[str]:
        """Installed method names close to ``name``."""
        return difflib.get_close_matches(name, list(self.methods), n=3, cutoff=0.5)

    def add(self, info: MethodInfo) -> None:
        """Add one method; two providers of one name are an error naming both."""
        if info.name in self.methods:
            other = self.methods[info.name]
            raise PluginError(
                f"method {info.name!r} is registered twice: by plugin {other.provider!r} "
                f"({other.package}) and by plugin {info.provider!r} ({info.package}); "
                f"uninstall one, or allow only one with {ENV_ALLOW}"
            )
        self.methods[info.name] = info


def _registrar(source: PluginSource, staged: list[MethodInfo]) -> hookspecs.Register:
    """The ``register`` callable handed to one plugin: it records where each method came from."""

    def register(method: type, *, name: str | None = None, **kwargs: Any) -> None:
        info = MethodInfo.from_class(
            method, name=name, provider=source.name, package=source.package, version=source.version, **kwargs
        )
        staged.append(info)

    return register


def load_methods(*, builtins_only: bool | None = None, allow: Iterable[str] | None = None) -> MethodRegistry:
    """Build a :class:`MethodRegistry` from the built-ins and the installed plugins.

    Problems with single plugins are warned about (:class:`PluginWarning`) and kept in
    ``registry.problems``; a name registered by two plugins raises :class:`PluginError`.
    """
    pm, sources, problems = make_plugin_manager(builtins_only=builtins_only, allow=allow)
    registry = MethodRegistry(problems=problems)
    for impl in pm.hook.prunespec_register_methods.get_hookimpls():
        source = sources.get(impl.plugin_name, PluginSource(impl.plugin_name))
        staged: list[MethodInfo] = []
        try:
            impl.function(register=_registrar(source, staged))
        except Exception as exc:  # contain one plugin's failure
            registry.problems.append(_problem(source, "failed while registering its methods", exc))
            continue
        for info in staged:
            registry.add(info)
    for problem in registry.problems:
        warnings.warn(problem, PluginWarning, stacklevel=2)
    return registry
