"""Loading plugins: the built-in ones, entry points and plugin directories.

``load_plugins`` is a factory (pluggy's own host example), not an import-time
global: every start-up and every reload builds a fresh ``PluginManager``, so a
broken reload leaves the running host untouched and tests never share state.

Order: the built-in plugins (``ihld.plugins.builtin``, then
``ihld.plugins.openai_batch``), installed distributions with an
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
import importlib.metadata
import importlib.util
import inspect
import os
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import pluggy

from ihld.common.errors import PluginError
from ihld.core.actors import ActorLike
from ihld.core.config import Config, PipelineConfig
from ihld.core.formats import IntakeFormat
from ihld.core.jobs import StageOverride, StageSpec
from ihld.core.scheduler import PolicyFactory
from ihld.plugins import builtin, hookspecs, openai_batch
from ihld.plugins.checks import (
    add_tracing,
    check_actor,
    check_stages,
    import_file,
    one_line,
    tracing_enabled,
)
from ihld.plugins.host import (
    ALLOW_ENV,
    BUILTIN_NAME,
    BUILTIN_NAMES,
    ENTRY_POINT_GROUP,
    NAME_RE,
    OPENAI_BATCH_NAME,
    PluginHost,
    _log,
    _per_plugin,
    _PluginInfo,
    finished_before,
)


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


class _Loader:
    """The state of one ``load_plugins`` call."""

    def __init__(self, allow: frozenset[str] | None) -> None:
        self.allow = allow
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        if tracing_enabled():
            add_tracing(self.pm)
        self.infos: dict[str, _PluginInfo] = {}
        self.actors: dict[str, ActorLike] = {}
        self.actor_owners: dict[str, str] = {}
        self.pipelines: dict[str, tuple[StageSpec, ...]] = {}
        self.pipeline_owners: dict[str, str] = {}
        self.policies: dict[str, PolicyFactory] = {}
        self.policy_owners: dict[str, str] = {}
        self.formats: dict[str, IntakeFormat] = {}
        self.format_owners: dict[str, str] = {}
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
            raise PluginError(f"plugin {info.label()}: {one_line(exc)}") from None
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
                raise PluginError(f"{where}: {one_line(exc)}") from None
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
            self.add(import_file(path), info)

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
            raise PluginError(one_line(exc)) from None

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
            check_actor(actor, self.infos[plugin_name])
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

    def format_registrar(self, plugin_name: str) -> Callable[[IntakeFormat], None]:
        def register(fmt: IntakeFormat) -> None:
            info = self.infos[plugin_name]
            name = getattr(fmt, "name", None)
            if not isinstance(name, str) or not NAME_RE.match(name):
                raise PluginError(
                    f"plugin {info.label()}: intake format name {name!r} must match "
                    "[A-Za-z0-9_.-]{1,64}"
                )
            if not isinstance(fmt, IntakeFormat):
                raise PluginError(
                    f"plugin {info.label()}: intake format {name!r} needs recognise, to_spec, "
                    "tag and finish (ihld.IntakeFormat)"
                )
            self._claim("intake format", name, plugin_name, self.formats, self.format_owners, fmt)
            info.formats.append(name)

        return register

    def pipeline_registrar(self, plugin_name: str) -> Callable[[str, Sequence[StageSpec]], None]:
        def register(name: str, stages: Sequence[StageSpec]) -> None:
            info = self.infos[plugin_name]
            checked = check_stages(name, stages, f"plugin {info.label()}: pipeline {name!r}")
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
        if owner is not None and owner not in BUILTIN_NAMES:
            if plugin_name in BUILTIN_NAMES:
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
                self.pipelines[name] = check_stages(name, pipeline.stages, where)
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
            formats=self.formats,
        )


def load_plugins(
    dirs: Sequence[Path],
    *,
    entry_points: bool = True,
    config_pipelines: Mapping[str, PipelineConfig] | None = None,
    allow: Collection[str] | None = None,
    plugins: Mapping[str, object] | None = None,
) -> PluginHost:
    """Load the built-in plugins, entry points and plugin directories; raise PluginError.

    ``allow`` (else ``$IHLD_LOAD_PLUGINS``) limits entry-point and directory
    plugins to those names (entry-point name or file stem); the built-in
    plugin always loads. ``plugins`` registers extra plugin objects by name
    (tests, embedding) and is not subject to the allow-list.
    ``config_pipelines`` is ``Config.pipelines``.
    """
    loader = _Loader(allowed_plugins(allow))
    loader.add(builtin, _PluginInfo(BUILTIN_NAME, "builtin", file=builtin.__file__))
    loader.add(openai_batch, _PluginInfo(OPENAI_BATCH_NAME, "builtin", file=openai_batch.__file__))
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
    loader.call_registration("register_intake_formats", loader.format_registrar)
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


def plugins_for(config: Config) -> PluginHost:
    """The plugins a config asks for: its directories, entry points and pipelines."""
    return load_plugins(
        config.plugins.dirs,
        entry_points=config.plugins.entry_points,
        config_pipelines=config.pipelines,
    )
