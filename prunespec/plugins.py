"""Finding plugins and building the method registry.

Built-in methods and third-party plugins go through the same hook
(:func:`prunespec.hookspecs.prunespec_register_methods`). Plugins fail one at a time: a plugin that fails
to import or to register, a hook whose name matches no hookspec, a method whose options model is broken,
or a method name that is already taken is one :class:`PluginWarning` naming the plugin (and package), and
everything else still loads (built-in methods win a name clash; between plugins, the first keeps it).
:data:`KNOWN_PLUGINS` and :func:`provider_hint` tell a user which package provides a method they named but
do not have, including one whose plugin failed or was left out.
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


@dataclass(frozen=True)
class PluginProblem:
    """One problem met while loading plugins: the warning line, the plugin it concerns (None for an
    allow-list entry that names no plugin), and the method names known to be lost with it."""

    message: str
    source: PluginSource | None = None
    methods: frozenset[str] = frozenset()

    def __str__(self) -> str:
        return self.message


BUILTINS_ONLY = f"--builtins-only (or {ENV_BUILTINS_ONLY})"
LEFT_OUT = f"the allow-list ({ENV_ALLOW} or allow=) leaves it out"


@dataclass(frozen=True)
class SkippedPlugin:
    """An installed plugin that was deliberately not loaded, and why (:data:`BUILTINS_ONLY` or
    :data:`LEFT_OUT`)."""

    source: PluginSource
    reason: str


@dataclass
class Loaded:
    """What :func:`make_plugin_manager` found besides the manager."""

    sources: dict[str, PluginSource]
    problems: list[PluginProblem] = field(default_factory=list)
    skipped: list[SkippedPlugin] = field(default_factory=list)


def make_plugin_manager(
    *, builtins_only: bool | None = None, allow: Iterable[str] | None = None
) -> tuple[pluggy.PluginManager, dict[str, PluginSource], list[PluginProblem]]:
    """A fresh plugin manager with the built-ins and every installed plugin registered.

    ``builtins_only`` (default: the ``PRUNESPEC_BUILTINS_ONLY`` environment variable) skips third-party
    plugins; ``allow`` (default: the comma-separated ``PRUNESPEC_PLUGINS`` variable) loads only the
    named ones (entry-point names such as ``nm``, or package names such as ``prunespec-nm``). Returns the
    manager, the source of each registered plugin, and the problems met (an allow-list entry that names no
    installed plugin, a plugin that failed to load, two plugins with one name, a hook that matches no
    hookspec).
    """
    pm, loaded = _manager(builtins_only=builtins_only, allow=allow)
    return pm, loaded.sources, loaded.problems


def _manager(*, builtins_only: bool | None, allow: Iterable[str] | None) -> tuple[pluggy.PluginManager, Loaded]:
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
    loaded = Loaded({BUILTIN: PluginSource(BUILTIN, "prunespec", _version("prunespec"))})
    installed = list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
    if builtins_only:
        loaded.skipped += [SkippedPlugin(_source(ep), BUILTINS_ONLY) for ep in installed]
        return pm, loaded
    if wanted is not None:
        known = {ep.name for ep in installed} | {_normalize(ep.dist.name) for ep in installed if ep.dist}
        for name in wanted:
            if name not in known and _normalize(name) not in known:
                loaded.problems.append(
                    PluginProblem(
                        f"the allow-list ({ENV_ALLOW} or allow=) names {name!r}, which is no installed plugin; "
                        f"installed plugins: {', '.join(sorted({ep.name for ep in installed})) or 'none'}"
                    )
                )
    for ep in installed:
        source = _source(ep)
        if allowed is not None and not (
            ep.name in allowed or (source.package and _normalize(source.package) in allowed)
        ):
            loaded.skipped.append(SkippedPlugin(source, LEFT_OUT))
            continue
        problem = _register(pm, ep, source, loaded.sources)
        if problem is None:
            loaded.sources[ep.name] = source
            problem = _unknown_hooks(pm, source)
        if problem is not None:
            loaded.problems.append(problem)
    return pm, loaded


def _source(ep: importlib.metadata.EntryPoint) -> PluginSource:
    dist = ep.dist
    return PluginSource(ep.name, dist.name if dist else None, dist.version if dist else None)


def _register(
    pm: pluggy.PluginManager,
    ep: importlib.metadata.EntryPoint,
    source: PluginSource,
    sources: Mapping[str, PluginSource],
) -> PluginProblem | None:
    """Import one entry point and register it; what went wrong, if anything, as one problem."""
    if ep.name in sources:
        return PluginProblem(
            f"two plugins are named {ep.name!r}: {_describe(sources[ep.name])} and {_describe(source)}; "
            f"the second is not loaded (uninstall one of the packages)",
            source,
        )
    if importlib.metadata.EntryPoint.pattern.match(ep.value) is None:
        return PluginProblem(
            f"{_describe(source)} could not be loaded: its entry point {ep.name} = {ep.value!r} is not "
            f"'module' or 'module:object' (fix [project.entry-points.{ENTRY_POINT_GROUP}] in the package, or "
            f"leave it out with {ENV_ALLOW} or --builtins-only)",
            source,
        )
    try:
        pm.register(ep.load(), name=ep.name)
    except (Exception, SystemExit) as exc:  # a broken plugin must not take the others down
        return PluginProblem(
            _problem(source, f"could not be loaded (entry point {ep.value!r})", exc, ep.module), source
        )
    return None


def _unknown_hooks(pm: pluggy.PluginManager, source: PluginSource) -> PluginProblem | None:
    """A warning for hook implementations of this plugin that match no hookspec (a misspelt name would
    otherwise be ignored in silence) — what ``PluginManager.check_pending`` checks, for one plugin."""
    plugin = pm.get_plugin(source.name)
    unknown = sorted(
        caller.name
        for caller in pm.get_hookcallers(plugin) or []
        if caller.spec is None
        and any(impl.plugin is plugin and not impl.optionalhook for impl in caller.get_hookimpls())
    )
    if not unknown:
        return None
    hooks = [name for name in dir(hookspecs) if name.startswith(f"{hookspecs.PROJECT}_")]
    parts = []
    for name in unknown:
        close = difflib.get_close_matches(name, hooks, n=1, cutoff=0.6)
        parts.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return PluginProblem(
        f"{_describe(source)} has hook implementation{'s' * (len(parts) > 1)} {', '.join(parts)} that match no "
        f"prunespec hook, so prunespec never calls them (hooks: {', '.join(hooks)})",
        source,
    )


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


def _may_provide(source: PluginSource, method_name: str) -> bool:
    """Whether a plugin that did not load is likely to be where ``method_name`` comes from: a known
    package, or a plugin (or package ``prunespec-<name>``) named after the method."""
    if source.name == method_name:
        return True
    if not source.package:
        return False
    package = _normalize(source.package)
    known = KNOWN_PLUGINS.get(method_name)
    return package in {_normalize(method_name), _normalize(f"prunespec-{method_name}")} or (
        known is not None and package == _normalize(known)
    )


def provider_hint(method_name: str, methods: MethodRegistry | None = None) -> str | None:
    """Which package provides ``method_name``, for a spec naming a method that is not installed.

    Pass the registry in use as ``methods``: a plugin that failed to load (or lost that method while
    registering), or that was left out (``--builtins-only``, an allow-list), is then named with the reason.
    Otherwise the hint comes from :data:`KNOWN_PLUGINS`; ``None`` when nothing is known.
    """
    if methods is not None:
        for problem in methods.failed:
            source = problem.source
            if source is not None and (method_name in problem.methods or _may_provide(source, method_name)):
                return f"{_provided(method_name, source)} but failed to load: {problem.message}"
        for skipped in methods.skipped:
            if _may_provide(skipped.source, method_name):
                why = f" because of {BUILTINS_ONLY}" if skipped.reason == BUILTINS_ONLY else f": {skipped.reason}"
                return f"{_provided(method_name, skipped.source)} but was not loaded{why}"
    package = KNOWN_PLUGINS.get(method_name)
    if package is None:
        return None
    version = _version(package)
    if version is None:
        return f"method {method_name!r} is provided by the package {package}: pip install {package}"
    return (
        f"{_provided(method_name, PluginSource(method_name, package, version))} but was not loaded: drop "
        f"--builtins-only / {ENV_BUILTINS_ONLY}, or add it to {ENV_ALLOW}, and see any PluginWarning above"
    )


def _provided(method_name: str, source: PluginSource) -> str:
    if source.package is None:
        return f"method {method_name!r} comes from the plugin {source.name!r}, which is installed"
    version = f" ({source.version})" if source.version else ""
    return f"method {method_name!r} is provided by the package {source.package}, which is installed{version}"


@dataclass
class MethodRegistry(Mapping[str, MethodInfo]):
    """Every method the installed plugins registered, by name.

    ``problems`` are the warning lines met while loading; ``failed`` the same, typed, with the plugin each
    concerns; ``skipped`` the installed plugins deliberately not loaded.
    """

    methods: dict[str, MethodInfo] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    failed: list[PluginProblem] = field(default_factory=list)
    skipped: list[SkippedPlugin] = field(default_factory=list)

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
        """Add one method; a name that is taken is a :class:`PluginError` naming both providers
        (:func:`load_methods` instead keeps the first and warns)."""
        if info.name in self.methods:
            raise PluginError(_clash(self.methods[info.name], info))
        self.methods[info.name] = info

    def _problem(self, problem: PluginProblem) -> None:
        self.problems.append(problem.message)
        self.failed.append(problem)


def _clash(kept: MethodInfo, dropped: MethodInfo) -> str:
    first = _describe(PluginSource(kept.provider, kept.package, kept.version))
    second = _describe(PluginSource(dropped.provider, dropped.package, dropped.version))
    if kept.provider == BUILTIN:
        return (
            f"{second} registers method {dropped.name!r}, which is one of prunespec's built-in methods: the "
            f"built-in is kept and the plugin's dropped (the plugin should rename it)"
        )
    return (
        f"method {dropped.name!r} is registered twice: by {first} and by {second}; the first is kept and "
        f"{dropped.package or dropped.provider}'s dropped (uninstall one of the packages, or allow only one "
        f"plugin with {ENV_ALLOW})"
    )


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


def check_options_model(info: MethodInfo) -> str | None:
    """Why a method's options model cannot serve prunespec (validation, the JSON Schema, the defaults
    ``prunespec methods`` lists), or None if it can."""
    model = info.options_model
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return f"its options model {model!r} is not a pydantic BaseModel subclass"
    try:
        model.model_json_schema(ref_template=f"#/$defs/{info.name}__{{model}}")
    except Exception as exc:
        return f"its options model {model.__qualname__} gives no JSON Schema: {type(exc).__name__}: {exc}"
    for key, option in model.model_fields.items():
        if option.is_required():
            continue
        try:
            option.get_default(call_default_factory=True, validated_data={})
        except Exception as exc:
            return f"the default of its option {key!r} cannot be built: {type(exc).__name__}: {exc}"
    return None


def load_methods(*, builtins_only: bool | None = None, allow: Iterable[str] | None = None) -> MethodRegistry:
    """Build a :class:`MethodRegistry` from the built-ins and the installed plugins.

    Each problem with a plugin or one of its methods is one :class:`PluginWarning` (kept in
    ``registry.problems``), and everything else still loads.
    """
    pm, loaded = _manager(builtins_only=builtins_only, allow=allow)
    registry = MethodRegistry(skipped=loaded.skipped)
    for problem in loaded.problems:
        registry._problem(problem)
    impls = sorted(pm.hook.prunespec_register_methods.get_hookimpls(), key=lambda i: i.plugin_name != BUILTIN)
    for impl in impls:
        source = loaded.sources.get(impl.plugin_name, PluginSource(impl.plugin_name))
        staged: list[MethodInfo] = []
        try:
            impl.function(register=_registrar(source, staged))
        except (Exception, SystemExit) as exc:  # contain one plugin's failure
            module = getattr(impl.plugin, "__name__", None)
            what = "failed while registering its methods"
            lost = frozenset(info.name for info in staged)
            registry._problem(PluginProblem(_problem(source, what, exc, module), source, lost))
            continue
        for info in staged:
            why = check_options_model(info)
            if why is not None:
                message = f"{_describe(source)}: method {info.name!r} is dropped: {why} (the plugin should fix it)"
                registry._problem(PluginProblem(message, source, frozenset({info.name})))
            elif info.name in registry:
                registry._problem(PluginProblem(_clash(registry[info.name], info), source))
            else:
                registry.methods[info.name] = info
    for message in registry.problems:
        warnings.warn(message, PluginWarning, stacklevel=2)
    return registry
