"""Loading plugins and keeping what they registered.

``load_plugins`` is a factory (pluggy's own host example), not an import-time
global: every start-up and every reload builds a fresh ``PluginManager``, so a
broken reload leaves the running host untouched and tests never share state.

Order: the default plugin ``ihld.plugins.builtin``, installed distributions with an
``ihld`` entry point, then every ``*.py`` of the plugin directories (sorted),
then ``check_pending`` (a misspelt hook fails start-up), then the
registration hooks, then the config file's ``[pipelines]``. Anything wrong
raises ``PluginError`` with the plugin's file or entry point in the message.

Registration is recorded per plugin (for ``ihld plugins``), so the hooks are
called one plugin at a time through pluggy's ``subset_hook_caller``; that also
lets ``notify`` keep calling observers after one of them raised, which a plain
pluggy call would not.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.metadata
import importlib.util
import inspect
import os
import re
import sys
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pluggy
import structlog
from pydantic import ValidationError

from ihld.common.errors import JobError, PluginError
from ihld.core.actors import ActorLike
from ihld.core.config import PipelineConfig
from ihld.core.jobs import Job, JobSpec, StageOverride, StageSpec, format_validation_error, resolve
from ihld.core.scheduler import PolicyFactory
from ihld.plugins import builtin, hookspecs

BUILTIN_NAME = "ihld.plugins.builtin"
ENTRY_POINT_GROUP = "ihld"
ALLOW_ENV = "IHLD_LOAD_PLUGINS"
TRACE_ENV = "IHLD_TRACE_HOOKS"
NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


def _log() -> Any:
    # Looked up per call so structlog.testing.capture_logs sees it even when
    # the daemon configures cache_logger_on_first_use.
    return structlog.get_logger("ihld.plugins")


@dataclass
class _PluginInfo:
    """Where a plugin came from and what it registered (for messages and ``describe``)."""

    name: str
    kind: str  # builtin | entry_point | directory | object
    file: str | None = None
    dist: str | None = None
    actors: list[str] = field(default_factory=list)
    pipelines: list[str] = field(default_factory=list)
    policies: list[str] = field(default_factory=list)

    def label(self) -> str:
        where = self.file or self.dist
        return f"{self.name!r} ({where})" if where else repr(self.name)


class PluginHost:
    """The loaded plugins: actors and pipelines by name, and the observer hooks.

    Built by ``load_plugins``; immutable in practice (a reload builds a new one).
    """

    def __init__(
        self,
        pm: pluggy.PluginManager,
        actors: dict[str, ActorLike],
        pipelines: dict[str, tuple[StageSpec, ...]],
        pipeline_overrides: dict[str, dict[str, StageOverride]],
        *,
        infos: dict[str, _PluginInfo],
        actor_owners: dict[str, str],
        pipeline_owners: dict[str, str],
        policies: dict[str, PolicyFactory] | None = None,
    ) -> None:
        self.pm = pm
        self.actors = actors
        self.policies = policies or {}  # scheduling policies by name (register_policies)
        self.pipelines = pipelines
        self.pipeline_overrides = pipeline_overrides
        self._infos = infos
        self._actor_owners = actor_owners
        self._pipeline_owners = pipeline_owners
        # The plugin set never changes after loading (a reload builds a new host).
        self._observers = {name: _per_plugin(pm, name) for name in hookspecs.OBSERVER_HOOKS}

    def actor_models(self) -> dict[str, str | None]:
        """Each actor's default model, as ``jobs.resolve(actor_models=...)`` wants it."""
        return {name: actor.default_model for name, actor in self.actors.items()}

    def resolve(self, spec: JobSpec, job_id: str, *, source: dict[str, Any] | None = None) -> Job:
        """``jobs.resolve`` against these tables, plus the prompt templates' check.

        Raises ``JobError`` naming the field, so a job with an unsafe or
        malformed template goes to ``failed/`` before any model is loaded.
        """
        job = resolve(
            spec,
            job_id,
            pipelines=self.pipelines,
            actor_models=self.actor_models(),
            config_overrides=self.pipeline_overrides,
            source=source,
        )
        finished = finished_before(job.stages)
        for index, stage in enumerate(job.stages):
            if self.actors.get(stage.actor) is not builtin.PROMPT_ACTOR:
                continue
            try:
                builtin.check_stage(stage, earlier=finished[stage.name])
            except ValueError as exc:
                path = f"stages[{index}].prompt" if spec.stages is not None else "pipeline"
                raise JobError(f"{path}: {exc}", kind="invalid_schema", path=path) from None
        return job

    def describe(self) -> list[dict[str, Any]]:
        """One entry per plugin, in load order, for ``ihld plugins``.

        Keys: ``name``, ``kind`` (builtin, entry_point, directory, object,
        config), ``file``, ``dist``, ``hooks`` (implemented), ``actors`` and
        ``pipelines`` (those in effect) and ``shadowed`` (names it registered
        that a user plugin or the config replaced).
        """
        rows: list[dict[str, Any]] = []
        for name, plugin in self.pm.list_name_plugin():
            if plugin is None:
                continue
            info = self._infos.get(name, _PluginInfo(name, "object"))
            hooks = sorted(caller.name for caller in self.pm.get_hookcallers(plugin) or [])
            rows.append(self._row(info, hooks))
        config = self._infos.get("(config)")
        if config is not None:
            rows.append(self._row(config, []))
        return rows

    def _row(self, info: _PluginInfo, hooks: list[str]) -> dict[str, Any]:
        actors = [a for a in info.actors if self._actor_owners.get(a) == info.name]
        pipelines = [p for p in info.pipelines if self._pipeline_owners.get(p) == info.name]
        shadowed = [n for n in info.actors + info.pipelines if n not in actors + pipelines]
        return {
            "name": info.name,
            "kind": info.kind,
            "file": info.file,
            "dist": info.dist,
            "hooks": hooks,
            "actors": actors,
            "pipelines": pipelines,
            "policies": info.policies,
            "shadowed": shadowed,
        }

    async def notify(self, hook_name: str, **kwargs: Any) -> None:
        """Call an observer hook on every plugin; await awaitable results; never raise.

        A failing observer is logged as ``plugin_hook_failed`` and the next
        one still runs (datasette's ``await_me_maybe`` on every result, no
        early exit). Cancellation is not swallowed.
        """
        if hook_name not in hookspecs.OBSERVER_HOOKS:
            raise ValueError(f"{hook_name!r} is not an observer hook ({hookspecs.OBSERVER_HOOKS})")
        caller = getattr(self.pm.hook, hook_name)
        expected = set(caller.spec.argnames) if caller.spec else set()
        if set(kwargs) != expected:
            raise TypeError(f"{hook_name} takes {sorted(expected)}, got {sorted(kwargs)}")
        for plugin_name, subset in self._observers[hook_name]:
            try:
                results = subset(**kwargs)
            except Exception as exc:
                _observer_failed(plugin_name, hook_name, exc)
                continue
            for index, result in enumerate(results):
                if not inspect.isawaitable(result):
                    continue
                try:
                    await result
                except Exception as exc:
                    _observer_failed(plugin_name, hook_name, exc)
                except BaseException:  # cancelled: don't leave "never awaited" warnings behind
                    for rest in results[index + 1 :]:
                        if inspect.iscoroutine(rest):
                            rest.close()
                    raise


def _observer_failed(plugin: str, hook: str, exc: Exception) -> None:
    _log().error(
        "plugin_hook_failed",
        plugin=plugin,
        hook=hook,
        error=f"{type(exc).__name__}: {exc}",
        exc_info=exc,
    )


def _per_plugin(pm: pluggy.PluginManager, hook_name: str) -> list[tuple[str, pluggy.HookCaller]]:
    """One caller per implementing plugin, in pluggy's call order (LIFO, tryfirst/trylast)."""
    impls = getattr(pm.hook, hook_name).get_hookimpls()
    order: list[tuple[str, object]] = []
    for impl in reversed(impls):
        if all(impl.plugin is not plugin for _, plugin in order):
            order.append((impl.plugin_name, impl.plugin))
    everyone = [plugin for _, plugin in order]
    return [
        (name, pm.subset_hook_caller(hook_name, [p for p in everyone if p is not plugin]))
        for name, plugin in order
    ]


def allowed_plugins(allow: Collection[str] | None = None) -> frozenset[str] | None:
    """The allow-list: the ``allow`` argument, else ``$IHLD_LOAD_PLUGINS``, else None (all).

    ``IHLD_LOAD_PLUGINS=""`` allows none beyond the built-in one.
    """
    if allow is not None:
        return frozenset(allow)
    raw = os.environ.get(ALLOW_ENV)
    if raw is None:
        return None
    return frozenset(name.strip() for name in raw.split(",") if name.strip())


def _tracing_enabled() -> bool:
    return os.environ.get(TRACE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def _add_tracing(pm: pluggy.PluginManager) -> None:
    """Log every hook call (datasette's trace switch) with pluggy's monitoring hook."""
    started: list[float] = []

    def before(
        hook_name: str, impls: Sequence[pluggy.HookImpl], kwargs: Mapping[str, object]
    ) -> None:
        started.append(time.perf_counter())
        _log().info(
            "plugin_hook_called",
            hook=hook_name,
            plugins=[impl.plugin_name for impl in impls],
            args=sorted(kwargs),
        )

    def after(
        outcome: pluggy.Result[object],
        hook_name: str,
        impls: Sequence[pluggy.HookImpl],
        kwargs: Mapping[str, object],
    ) -> None:
        duration_ms = (time.perf_counter() - started.pop()) * 1000 if started else 0.0
        error = outcome.exception
        _log().info(
            "plugin_hook_returned",
            hook=hook_name,
            plugins=[impl.plugin_name for impl in impls],
            duration_ms=round(duration_ms, 3),
            error=f"{type(error).__name__}: {error}" if error else None,
        )

    pm.add_hookcall_monitoring(before, after)


class _Loader:
    """The state of one ``load_plugins`` call."""

    def __init__(self, allow: frozenset[str] | None) -> None:
        self.allow = allow
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        if _tracing_enabled():
            _add_tracing(self.pm)
        self.infos: dict[str, _PluginInfo] = {}
        self.actors: dict[str, ActorLike] = {}
        self.actor_owners: dict[str, str] = {}
        self.pipelines: dict[str, tuple[StageSpec, ...]] = {}
        self.pipeline_owners: dict[str, str] = {}
        self.policies: dict[str, PolicyFactory] = {}
        self.policy_owners: dict[str, str] = {}
        self.overrides: dict[str, dict[str, StageOverride]] = {}

    # -- registering plugin objects -------------------------------------------------

    def add(self, plugin: object, info: _PluginInfo) -> None:
        if info.name in self.infos or self.pm.get_plugin(info.name) is not None:
            raise PluginError(
                f"two plugins are named {info.name!r}: {self._label(info.name)} and "
                f"{info.label()}; rename one"
            )
        try:
            self.pm.register(plugin, name=info.name)
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"plugin {info.label()}: {_one_line(exc)}") from None
        except ValueError as exc:  # the same object registered twice
            raise PluginError(f"plugin {info.label()}: {exc}") from None
        self.infos[info.name] = info
        self._check_plugin(plugin, info)

    def _label(self, name: str) -> str:
        info = self.infos.get(name)
        return info.label() if info else repr(name)

    def _check_plugin(self, plugin: object, info: _PluginInfo) -> None:
        """Catch what pluggy would silently accept: undecorated hooks, wrappers."""
        marker = f"{hookspecs.PROJECT}_impl"
        for hook_name in (*hookspecs.REGISTRATION_HOOKS, *hookspecs.OBSERVER_HOOKS):
            value = inspect.getattr_static(plugin, hook_name, None)
            if isinstance(value, staticmethod | classmethod):
                value = value.__func__
            if callable(value) and not hasattr(value, marker):
                raise PluginError(
                    f"plugin {info.label()}: {hook_name}() is not decorated with @hookimpl "
                    "(from ihld.plugins.hookspecs import hookimpl), so it would never be called"
                )
        for caller in self.pm.get_hookcallers(plugin) or []:
            for impl in caller.get_hookimpls():
                if impl.plugin is plugin and (impl.wrapper or impl.hookwrapper):
                    raise PluginError(
                        f"plugin {info.label()}: {caller.name} is a wrapper; "
                        "ihld hooks do not support wrapper=True or hookwrapper=True"
                    )

    def load_entry_points(self) -> None:
        """Installed distributions' ``ihld`` entry points, one name at a time.

        One at a time so an import error names its entry point, and so a name
        outside the allow-list is never imported at all.
        """
        values = {
            ep.name: ep.value for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
        }
        for name in sorted(values):
            if not self._allowed(name):
                continue
            where = f"entry point {name} = {values[name]!r}"
            if name in self.infos:
                raise PluginError(
                    f"two plugins are named {name!r}: {self._label(name)} and {where}; rename one"
                )
            try:
                self.pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP, name=name)
            except pluggy.PluginValidationError as exc:
                raise PluginError(f"{where}: {_one_line(exc)}") from None
            except Exception as exc:
                raise PluginError(f"{where} failed to import: {type(exc).__name__}: {exc}") from exc
            plugin = self.pm.get_plugin(name)
            dists = [d for p, d in self.pm.list_plugin_distinfo() if p is plugin]
            info = _PluginInfo(
                name,
                "entry_point",
                file=getattr(plugin, "__file__", None),
                dist=f"{dists[0].project_name} {dists[0].version}" if dists else None,
            )
            self.infos[name] = info
            self._check_plugin(plugin, info)

    def load_dir(self, directory: Path) -> None:
        if not directory.is_dir():
            raise PluginError(f"plugins.dirs: {directory} is not a directory")
        for path in sorted(directory.glob("*.py")):
            if path.name.startswith(("_", ".")) or not path.is_file():
                continue
            if not self._allowed(path.stem):
                continue
            info = _PluginInfo(path.stem, "directory", file=str(path.absolute()))
            if path.stem in self.infos:
                raise PluginError(
                    f"two plugins are named {path.stem!r}: {self.infos[path.stem].label()} "
                    f"and {info.label()}; rename one"
                )
            self.add(_import_file(path), info)

    def warn_unknown_allowed(self) -> None:
        """An allow-list name that matched nothing is probably a typo; say so, don't fail.

        Not an error: one allow-list may serve hosts with different plugins installed.
        """
        for name in sorted((self.allow or frozenset()) - set(self.infos)):
            _log().warning("plugin_not_found", plugin=name, allow_list=sorted(self.allow or ()))

    def _allowed(self, name: str) -> bool:
        return self.allow is None or name in self.allow

    def check_hooks(self) -> None:
        """Fail on implementations of hooks that do not exist (pluggy's ``check_pending``)."""
        known = [*hookspecs.REGISTRATION_HOOKS, *hookspecs.OBSERVER_HOOKS]
        for hook_name, caller in vars(self.pm.hook).items():
            if caller.has_spec():
                continue
            for impl in caller.get_hookimpls():
                if impl.optionalhook:
                    continue
                info = self.infos.get(impl.plugin_name, _PluginInfo(impl.plugin_name, "object"))
                close = difflib.get_close_matches(hook_name, known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise PluginError(
                    f"plugin {info.label()}: unknown hook {hook_name!r}{hint} "
                    f"(hooks: {', '.join(known)})"
                )
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            raise PluginError(_one_line(exc)) from None

    # -- registration hooks ---------------------------------------------------------

    def call_registration(self, hook_name: str, make: Callable[[str], Callable[..., None]]) -> None:
        """Call a registration hook plugin by plugin, each with its own ``register``."""
        for plugin_name, subset in _per_plugin(self.pm, hook_name):
            info = self.infos[plugin_name]
            try:
                subset(register=make(plugin_name))
            except PluginError:
                raise
            except Exception as exc:
                raise PluginError(
                    f"plugin {info.label()}: {hook_name} raised {type(exc).__name__}: {exc}"
                ) from exc

    def actor_registrar(self, plugin_name: str) -> Callable[[ActorLike], None]:
        def register(actor: ActorLike) -> None:
            _check_actor(actor, self.infos[plugin_name])
            self._claim("actor", actor.name, plugin_name, self.actors, self.actor_owners, actor)
            self.infos[plugin_name].actors.append(actor.name)

        return register

    def policy_registrar(self, plugin_name: str) -> Callable[[str, PolicyFactory], None]:
        def register(name: str, factory: PolicyFactory) -> None:
            info = self.infos[plugin_name]
            if not isinstance(name, str) or not NAME_RE.match(name):
                raise PluginError(
                    f"plugin {info.label()}: policy name {name!r} must match [A-Za-z0-9_.-]{{1,64}}"
                )
            if not callable(factory):
                raise PluginError(
                    f"plugin {info.label()}: policy {name!r} must be a class (or factory) "
                    "called with the scheduler"
                )
            self._claim("policy", name, plugin_name, self.policies, self.policy_owners, factory)
            info.policies.append(name)

        return register

    def pipeline_registrar(self, plugin_name: str) -> Callable[[str, Sequence[StageSpec]], None]:
        def register(name: str, stages: Sequence[StageSpec]) -> None:
            info = self.infos[plugin_name]
            checked = _check_stages(name, stages, f"plugin {info.label()}: pipeline {name!r}")
            self._claim(
                "pipeline", name, plugin_name, self.pipelines, self.pipeline_owners, checked
            )
            info.pipelines.append(name)

        return register

    def _claim(
        self,
        kind: str,
        name: str,
        plugin_name: str,
        table: dict[str, Any],
        owners: dict[str, str],
        value: Any,
    ) -> None:
        """Record ``name``; a user plugin beats the built-in one, two user plugins clash."""
        owner = owners.get(name)
        if owner == plugin_name:
            raise PluginError(
                f"plugin {self.infos[plugin_name].label()} registers {kind} {name!r} twice"
            )
        if owner is not None and owner != BUILTIN_NAME:
            if plugin_name == BUILTIN_NAME:
                return  # a user plugin already replaced the built-in one
            order = list(self.infos)
            first, second = sorted((owner, plugin_name), key=order.index)
            raise PluginError(
                f"{kind} {name!r} is registered by two plugins: {self.infos[first].label()} "
                f"and {self.infos[second].label()}; remove or rename one "
                f"(or limit plugins with {ALLOW_ENV})"
            )
        table[name] = value
        owners[name] = plugin_name

    # -- config pipelines and final checks ------------------------------------------

    def apply_config(self, config_pipelines: Mapping[str, PipelineConfig]) -> None:
        info = _PluginInfo("(config)", "config")
        for name, pipeline in config_pipelines.items():
            where = f"pipelines.{name}"
            if pipeline.stages is not None:
                self.pipelines[name] = _check_stages(name, pipeline.stages, where)
                self.pipeline_owners[name] = info.name
                info.pipelines.append(name)
            elif name not in self.pipelines:
                known = ", ".join(sorted(self.pipelines)) or "none"
                raise PluginError(
                    f"{where}: overrides for unknown pipeline {name!r} (known: {known}); "
                    "give 'stages' to define it"
                )
            stage_names = [stage.name for stage in self.pipelines[name]]
            for stage_name in pipeline.overrides:
                if stage_name not in stage_names:
                    raise PluginError(
                        f"{where}.overrides.{stage_name}: pipeline {name!r} has no stage "
                        f"{stage_name!r} (stages: {', '.join(stage_names)})"
                    )
            if pipeline.overrides:
                self.overrides[name] = dict(pipeline.overrides)
        if info.pipelines:
            self.infos[info.name] = info

    def check_pipelines(self) -> None:
        """Every stage's actor exists; prompt stages have a template that can render."""
        for name, stages in self.pipelines.items():
            owner = self.infos[self.pipeline_owners[name]]
            where = f"plugin {owner.label()}: pipeline {name!r}"
            if owner.kind == "config":
                where = f"pipelines.{name}"
            finished = finished_before(stages)
            for stage in stages:
                if stage.actor not in self.actors:
                    known = ", ".join(sorted(self.actors))
                    raise PluginError(
                        f"{where}: stage {stage.name!r} uses unknown actor {stage.actor!r} "
                        f"(known: {known})"
                    )
                if self.actors[stage.actor] is builtin.PROMPT_ACTOR:
                    try:
                        builtin.check_stage(stage, earlier=finished[stage.name])
                    except ValueError as exc:
                        raise PluginError(f"{where}: {exc}") from None

    def host(self) -> PluginHost:
        return PluginHost(
            self.pm,
            self.actors,
            self.pipelines,
            self.overrides,
            infos=self.infos,
            actor_owners=self.actor_owners,
            pipeline_owners=self.pipeline_owners,
            policies=self.policies,
        )


def _one_line(exc: Exception) -> str:
    """pluggy's multi-line messages as one log-friendly line."""
    return "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())


def finished_before(stages: Sequence[StageSpec]) -> dict[str, set[str]]:
    """For each stage, the stages certain to have finished before it starts.

    Its ``needs`` (or the stage before it, when ``needs`` is unset) and,
    transitively, what those needed: the outputs a template may read.
    """
    finished: dict[str, set[str]] = {}
    for index, stage in enumerate(stages):
        needs = (
            stage.needs if stage.needs is not None else ((stages[index - 1].name,) if index else ())
        )
        finished[stage.name] = set(needs).union(*(finished.get(n, set()) for n in needs))
    return finished


def _check_actor(actor: object, info: _PluginInfo) -> None:
    """The Actor protocol, checked up front so a bad actor fails start-up, not a job."""
    where = f"plugin {info.label()}: actor {getattr(actor, 'name', actor)!r}"
    if isinstance(actor, type):
        raise PluginError(f"{where}: register an instance, not the class ({actor.__name__}())")
    name = getattr(actor, "name", None)
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise PluginError(f"{where}: name must be a string matching [A-Za-z0-9_.-]{{1,64}}")
    if not hasattr(actor, "default_model"):
        raise PluginError(f"{where}: set default_model (a model name, or None)")
    model = getattr(actor, "default_model")  # noqa: B009 - actor is not yet known to be an Actor
    if model is not None and (not isinstance(model, str) or not model):
        raise PluginError(f"{where}: default_model must be a model name or None")
    for method in ("build_request", "parse_response"):
        function = getattr(actor, method, None)
        if not callable(function):
            raise PluginError(f"{where}: {method}(ctx, ...) is missing")
        if inspect.iscoroutinefunction(function):
            raise PluginError(f"{where}: {method} must be synchronous (the daemon does the I/O)")


def _check_stages(name: object, stages: object, where: str) -> tuple[StageSpec, ...]:
    """A pipeline's name and stages: StageSpec-valid, unique names, needs only earlier stages."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise PluginError(f"{where}: pipeline name must match [A-Za-z0-9_.-]{{1,64}}")
    if isinstance(stages, str | bytes | Mapping) or not isinstance(stages, Sequence):
        raise PluginError(f"{where}: stages must be a list of StageSpec or dicts")
    if not stages:
        raise PluginError(f"{where}: a pipeline needs at least one stage")
    checked: list[StageSpec] = []
    for index, stage in enumerate(stages):
        if isinstance(stage, StageSpec):
            checked.append(stage)
            continue
        try:
            checked.append(StageSpec.model_validate(stage))
        except ValidationError as exc:
            raise PluginError(format_validation_error(exc, f"{where}: stages[{index}]")) from None
    names = [stage.name for stage in checked]
    for index, stage in enumerate(checked):
        if stage.name in names[:index]:
            raise PluginError(f"{where}: two stages are named {stage.name!r}")
        for need in stage.needs or ():
            if need not in names[:index]:
                raise PluginError(
                    f"{where}: stage {stage.name!r} needs {need!r}, which is not an earlier stage"
                )
    return tuple(checked)


def _import_file(path: Path) -> ModuleType:
    """Import one plugin file under a module name unique to its path.

    Unique so two directories may both hold a ``debate.py`` without one
    replacing the other in ``sys.modules``; registered there because
    dataclasses and pickling look modules up by name.
    """
    digest = hashlib.sha256(str(path.resolve()).encode("utf-8", "surrogateescape")).hexdigest()
    module_name = f"_ihld_plugin_{digest[:12]}_{re.sub(r'[^A-Za-z0-9_]', '_', path.stem)}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise PluginError(f"{path}: cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:
        sys.modules.pop(module_name, None)
        raise PluginError(f"{path}: plugin failed to import: {type(exc).__name__}: {exc}") from exc
    return module


def load_plugins(
    dirs: Sequence[Path],
    *,
    entry_points: bool = True,
    config_pipelines: Mapping[str, PipelineConfig] | None = None,
    allow: Collection[str] | None = None,
    plugins: Mapping[str, object] | None = None,
) -> PluginHost:
    """Load the built-in plugin, entry points and plugin directories; raise PluginError.

    ``allow`` (else ``$IHLD_LOAD_PLUGINS``) limits entry-point and directory
    plugins to those names (entry-point name or file stem); the built-in
    plugin always loads. ``plugins`` registers extra plugin objects by name
    (tests, embedding) and is not subject to the allow-list.
    ``config_pipelines`` is ``Config.pipelines``.
    """
    loader = _Loader(allowed_plugins(allow))
    loader.add(builtin, _PluginInfo(BUILTIN_NAME, "builtin", file=builtin.__file__))
    if entry_points:
        loader.load_entry_points()
    for directory in dirs:
        loader.load_dir(Path(directory))
    for name, plugin in (plugins or {}).items():
        file = plugin.__file__ if isinstance(plugin, ModuleType) else None
        loader.add(plugin, _PluginInfo(name, "object", file=file))
    loader.warn_unknown_allowed()
    loader.check_hooks()
    loader.call_registration("register_actors", loader.actor_registrar)
    loader.call_registration("register_pipelines", loader.pipeline_registrar)
    loader.call_registration("register_policies", loader.policy_registrar)
    loader.apply_config(config_pipelines or {})
    loader.check_pipelines()
    host = loader.host()
    _log().debug(
        "plugins_loaded",
        plugins=[row["name"] for row in host.describe()],
        actors=sorted(host.actors),
        pipelines=sorted(host.pipelines),
    )
    return host
