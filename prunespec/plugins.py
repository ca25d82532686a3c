"""Finding plugins and building the method registry.

Built-in methods and third-party plugins go through the same hook
(:func:`prunespec.hookspecs.prunespec_register_methods`). A plugin that fails to import or to register
is reported by name (and package) as a :class:`PluginWarning`, and the others still load; two plugins
registering one method name, or sharing one entry-point name, are a :class:`~prunespec.errors.PluginError`
naming both packages. :data:`KNOWN_PLUGINS` and :func:`provider_hint` tell a user which package provides a
method they named but do not have.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import os
import re
import traceback
import warnings
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import pluggy
from pydantic import BaseModel
from torch.nn.utils import prune

from . import hookspecs
from .errors import PluginError
from .methods.base import MethodInfo

ENTRY_POINT_GROUP = "prunespec"
BUILTIN = "prunespec.builtin"
ENV_BUILTINS_ONLY = "PRUNESPEC_BUILTINS_ONLY"
ENV_ALLOW = "PRUNESPEC_PLUGINS"

KNOWN_PLUGINS: dict[str, str] = {
    "foobar": "prunespec-foobar",
    "nm": "prunespec-nm",
}
"""Method name -> the distribution (pip package) that provides it, for methods published as plugins."""


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
    named ones (entry-point names such as ``nm``, or package names such as ``prunespec-nm``). Returns the
    manager, the source of each registered plugin, and the problems met (an allow-list entry that names no
    installed plugin, a plugin that failed to load). Two installed plugins with one entry-point name raise
    :class:`~prunespec.errors.PluginError`.
    """
    from .methods import builtin

    if builtins_only is None:
        builtins_only = os.environ.get(ENV_BUILTINS_ONLY, "").strip().lower() not in ("", "0", "false", "no")
    if allow is None and os.environ.get(ENV_ALLOW, "").strip():
        allow = [name.strip() for name in os.environ[ENV_ALLOW].split(",") if name.strip()]
    wanted = sorted(set(allow)) if allow is not None else None
    allowed = {*wanted, *map(_normalize, wanted)} if wanted is not None else None

    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    pm.register(builtin, name=BUILTIN)
    sources = {BUILTIN: PluginSource(BUILTIN, "prunespec", _version("prunespec"))}
    problems: list[str] = []
    if builtins_only:
        return pm, sources, problems
    installed = list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
    if wanted is not None:
        known = {ep.name for ep in installed} | {_normalize(ep.dist.name) for ep in installed if ep.dist}
        for name in wanted:
            if name not in known and _normalize(name) not in known:
                problems.append(
                    f"the allow-list ({ENV_ALLOW} or allow=) names {name!r}, which is no installed plugin; "
                    f"installed plugins: {', '.join(sorted({ep.name for ep in installed})) or 'none'}"
                )
    for ep in installed:
        dist = ep.dist
        if allowed is not None and not (ep.name in allowed or (dist and _normalize(dist.name) in allowed)):
            continue
        source = PluginSource(ep.name, dist.name if dist else None, dist.version if dist else None)
        if ep.name in sources:
            other = sources[ep.name]
            raise PluginError(
                f"two plugins are named {ep.name!r}: {_describe(other)} and {_describe(source)}; "
                f"uninstall one of the packages"
            )
        try:
            plugin = ep.load()
            pm.register(plugin, name=ep.name)
        except Exception as exc:  # a broken plugin must not take the others down
            problems.append(_problem(source, f"could not be loaded (entry point {ep.value!r})", exc, ep.module))
            continue
        sources[ep.name] = source
    return pm, sources, problems


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _normalize(name: str) -> str:
    """A distribution name as pip compares them (PEP 503): ``Prunespec_NM`` -> ``prunespec-nm``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _describe(source: PluginSource) -> str:
    """``plugin 'nm' (package prunespec-nm 0.1.0)``."""
    if source.package:
        version = f" {source.version}" if source.version else ""
        return f"plugin {source.name!r} (package {source.package}{version})"
    return f"plugin {source.name!r}"


def _problem(source: PluginSource, what: str, exc: BaseException, module: str | None = None) -> str:
    """One line naming the plugin, its package, the error, and where in the plugin's code it happened."""
    message = " ".join(str(exc).split())
    fix = f"uninstall {source.package}, or" if source.package else "uninstall it, or"
    return (
        f"{_describe(source)} {what}: {type(exc).__name__}: {message}{_where(exc, module)} "
        f"(the other plugins still load; {fix} leave it out with {ENV_ALLOW} or --builtins-only)"
    )


_MACHINERY = (
    *(os.path.dirname(m.__file__ or "") + os.sep for m in (pluggy, importlib)),
    os.path.dirname(__file__) + os.sep,
    "<",
)


def _where(exc: BaseException, module: str | None) -> str:
    """`` at file:line`` of the innermost frame in the plugin's own code (else outside prunespec and pluggy)."""
    frames: list[traceback.FrameSummary] = list(traceback.extract_tb(exc.__traceback__))
    top = module.split(".")[0] if module else None
    own = [
        f
        for f in frames
        if top and (os.path.splitext(os.path.basename(f.filename))[0] == top or top in f.filename.split(os.sep))
    ]
    frames = own or [f for f in frames if not f.filename.startswith(_MACHINERY)]
    return f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""


def provider_hint(method_name: str, methods: MethodRegistry | None = None) -> str | None:
    """Which package provides ``method_name``, for a spec naming a method that is not installed.

    ``None`` when the method is not a known plugin's (see :data:`KNOWN_PLUGINS`). When the package is
    installed but its plugin was not loaded (built-ins only, an allow-list, or an error while loading),
    the hint says so; pass the registry in use as ``methods`` to name the loading error.
    """
    package = KNOWN_PLUGINS.get(method_name)
    if package is None:
        return None
    version = _version(package)
    if version is None:
        return f"method {method_name!r} is provided by the package {package}: pip install {package}"
    hint = f"method {method_name!r} is provided by the package {package}, which is installed ({version}) but "
    needle = _normalize(f"(package {package} ")
    failed = [p for p in (methods.problems if methods is not None else []) if needle in _normalize(p)]
    if failed:
        return hint + f"failed to load: {failed[0]}"
    return (
        hint + f"was not loaded: drop --builtins-only / {ENV_BUILTINS_ONLY}, or add it to {ENV_ALLOW}, "
        "and see any PluginWarning above"
    )


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
            first = _describe(PluginSource(other.provider, other.package, other.version))
            second = _describe(PluginSource(info.provider, info.package, info.version))
            raise PluginError(
                f"method {info.name!r} is registered twice: by {first} and by {second}; "
                f"uninstall one of the packages, or allow only one plugin with {ENV_ALLOW}"
            )
        self.methods[info.name] = info


def _registrar(source: PluginSource, staged: list[MethodInfo]) -> hookspecs.Register:
    """The ``register`` callable handed to one plugin: it records where each method came from."""

    def register(
        method: type[prune.BasePruningMethod],
        *,
        name: str | None = None,
        options: type[BaseModel] | None = None,
        summary: str | None = None,
    ) -> None:
        info = MethodInfo.from_class(
            method,
            name=name,
            options=options,
            summary=summary,
            provider=source.name,
            package=source.package,
            version=source.version,
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
            module = getattr(impl.plugin, "__name__", None)
            registry.problems.append(_problem(source, "failed while registering its methods", exc, module))
            continue
        for info in staged:
            registry.add(info)
    for problem in registry.problems:
        warnings.warn(problem, PluginWarning, stacklevel=2)
    return registry
