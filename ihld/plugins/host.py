"""What the loaded plugins registered, and calling their observer hooks.

A :class:`PluginHost` is built by ``ihld.plugins.loader.load_plugins``: the
actors, pipelines, policies and intake formats by name, job resolution against
them, and ``notify``, which calls an observer hook on every plugin and never
raises. A reload builds a new host; a running one never changes.

Observers are called one plugin at a time through pluggy's
``subset_hook_caller``, so ``notify`` keeps calling them after one raised,
which a plain pluggy call would not.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pluggy
import structlog

from ihld.common.errors import JobError
from ihld.core.actors import ActorLike
from ihld.core.formats import IntakeFormat
from ihld.core.jobs import Job, JobSpec, StageOverride, StageSpec, resolve
from ihld.core.scheduler import PolicyFactory
from ihld.plugins import builtin, hookspecs

BUILTIN_NAME = "ihld.plugins.builtin"
OPENAI_BATCH_NAME = "ihld.plugins.openai_batch"
BUILTIN_NAMES = frozenset({BUILTIN_NAME, OPENAI_BATCH_NAME})  # replaceable by user plugins
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
    formats: list[str] = field(default_factory=list)

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
        formats: dict[str, IntakeFormat] | None = None,
    ) -> None:
        self.pm = pm
        self.actors = actors
        self.policies = policies or {}  # scheduling policies by name (register_policies)
        self.formats = formats or {}  # intake formats by name (register_intake_formats)
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
            "formats": info.formats,
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
