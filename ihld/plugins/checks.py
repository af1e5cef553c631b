"""What plugin loading checks, and how it imports a plugin file.

Each check raises ``PluginError`` naming the plugin (its file or entry point)
and what is wrong: an actor without ``name`` or ``build_request``, a
pipeline whose stages do not validate. ``import_file`` imports a plugin
directory's ``*.py`` under a private module name; ``IHLD_TRACE_HOOKS``
logs every hook call (``add_tracing``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import os
import re
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType

import pluggy
from pydantic import ValidationError

from ihld.common.errors import PluginError
from ihld.core.jobs import StageSpec, format_validation_error
from ihld.plugins.host import NAME_RE, TRACE_ENV, _log, _PluginInfo


def tracing_enabled() -> bool:
    return os.environ.get(TRACE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def add_tracing(pm: pluggy.PluginManager) -> None:
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


def one_line(exc: Exception) -> str:
    """pluggy's multi-line messages as one log-friendly line."""
    return "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())


def check_actor(actor: object, info: _PluginInfo) -> None:
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


def check_stages(name: object, stages: object, where: str) -> tuple[StageSpec, ...]:
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


def import_file(path: Path) -> ModuleType:
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
