"""The hooks an ihld plugin may implement.

Few hooks, registration-shaped and synchronous (the llm pattern): a plugin is
handed a ``register`` callback and the host owns validation, name clashes and
recording which plugin gave what. Async work lives in the registered actors'
callers (the daemon), never in pluggy, which cannot await. The observer hooks
are the one exception: an implementation may be ``async def``; the host awaits
whatever it returns (see ``PluginHost.notify``).

Specs only grow: pluggy passes an implementation only the arguments it names,
so adding an argument here is safe and renaming one breaks plugins.

Plugins mark implementations with ``from ihld.plugins.hookspecs import hookimpl``.
Every hook here has a section with its exact signature in ``docs/plugins.md``
and a ``test_hook_<name>`` test; ``tests/test_hookspecs_documented.py``
enforces both.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pluggy

from ihld.core.actors import Actor
from ihld.core.formats import IntakeFormat
from ihld.core.jobs import Job, StageSpec
from ihld.core.scheduler import PolicyFactory

PROJECT = "ihld"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

# Called once per load, with a ``register`` callback, to build the tables.
REGISTRATION_HOOKS = (
    "register_actors",
    "register_pipelines",
    "register_policies",
    "register_intake_formats",
)
# Called by the daemon through ``PluginHost.notify``; may be async, never fail a job.
OBSERVER_HOOKS = ("stage_finished", "stage_failed", "job_finished", "job_failed")


@hookspec
def register_actors(register: Callable[[Actor], None]) -> None:
    """Register the actors this plugin provides.

    Called once each time plugins are loaded (daemon start-up and every
    reload), after all plugins are imported and before any pipeline is
    registered.

    :param register: call it once per actor with an *instance* that satisfies
        ``ihld.core.actors.Actor``: a ``name`` matching ``[A-Za-z0-9_.-]{1,64}``,
        a ``default_model`` (a model name or ``None``) and synchronous
        ``build_request`` / ``parse_response`` methods. ``register`` raises
        ``ihld.common.errors.PluginError`` for an invalid actor, or for a name that
        another user plugin already registered. A user plugin may reuse a
        name of the built-in plugin (``prompt``): it replaces the built-in.
    :returns: nothing; registration happens only through ``register``.
    """


@hookspec
def register_pipelines(register: Callable[[str, Sequence[StageSpec]], None]) -> None:
    """Register named pipelines, which jobs select with ``"pipeline": "<name>"``.

    Called once per load, after every plugin's ``register_actors``, so a
    pipeline may use actors from any plugin.

    :param register: ``register(name, stages)``; ``name`` matches
        ``[A-Za-z0-9_.-]{1,64}``; ``stages`` is a non-empty sequence of
        ``ihld.core.jobs.StageSpec`` objects or plain dicts with the same fields
        (validated into ``StageSpec``). Stage names must be unique and
        ``needs`` may only name earlier stages; every stage's actor must
        exist once all plugins are registered. Invalid input or a name
        another user plugin registered raises ``ihld.common.errors.PluginError``.
        The config file's ``[pipelines.<name>]`` tables may override stages
        of a registered pipeline or replace it.
    :returns: nothing; registration happens only through ``register``.
    """


@hookspec
def register_policies(register: Callable[[str, PolicyFactory], None]) -> None:
    """Register scheduling policies: what runs next, where, and when models switch.

    Called once each time plugins are loaded, after pipelines. The daemon
    uses the one named by ``[scheduler] policy`` (default ``affinity``); the
    built-in plugin registers ``affinity`` and ``fifo`` (``ihld.core.policies``).

    :param register: call it as ``register(name, factory)``: ``name`` matches
        ``[A-Za-z0-9_.-]{1,64}``; ``factory`` is a class (or any callable)
        called with the ``ihld.core.scheduler.Scheduler`` once per daemon start,
        returning an object with the ``ihld.core.scheduler.Policy`` shape: ``name``,
        ``pins_models``, ``releases_early``, ``queue_order(task)``,
        ``plan(backend, now, actions)`` and ``wakeups(now)``. A user plugin may
        reuse a built-in name: it replaces the built-in policy.
    :returns: nothing; registration happens only through ``register``.
    """


@hookspec
def register_intake_formats(register: Callable[[IntakeFormat], None]) -> None:
    """Register intake formats: other kinds of JSON Lines files that become jobs.

    Called once each time plugins are loaded, after policies. Intake offers
    each line of a ``.jsonl`` file to the formats in turn (the built-in
    ``openai-batch`` format among them); the first whose ``recognise(value)``
    is true turns it into a job with ``to_spec(value)`` and keeps
    ``tag(value)``. When every job of the file has ended, ``finish(batch)``
    returns the files to publish in ``outbox/``.

    :param register: call it as ``register(fmt)`` with an object of the
        ``ihld.IntakeFormat`` shape: ``name`` (matching
        ``[A-Za-z0-9_.-]{1,64}``), ``recognise``, ``to_spec`` (a
        ``ihld.JobSpec``, or raise ``ihld.JobError`` naming the field),
        ``tag`` (small JSON) and ``finish`` (``ihld.FinishedBatch`` →
        ``{file name: bytes}``). A name another user plugin registered raises
        ``PluginError``; a user plugin may replace a built-in format.
    :returns: nothing; registration happens only through ``register``.
    """


@hookspec
def stage_finished(job: Job, stage: StageSpec, output: Any, record: dict[str, Any]) -> None:
    """Observe a stage that finished and whose output is checkpointed.

    Called by the daemon after the stage's output is durably stored, so an
    observer never sees work that a crash could undo. The implementation may
    be ``async def``; the daemon awaits it. An exception is logged as
    ``plugin_hook_failed`` and does not affect the job.

    :param job: the resolved job.
    :param stage: the resolved stage (``model`` set, ``needs`` explicit).
    :param output: the stage's parsed output, as the actor returned it.
    :param record: the stage's result record as written to the result file
        (model, backend, timings, Ollama's token counts). Do not modify it.
    :returns: ``None`` (or an awaitable resolving to ``None``).
    """


@hookspec
def stage_failed(job: Job, stage: StageSpec, error: str, attempt: int, final: bool) -> None:
    """Observe a failed attempt of a stage.

    Called after every failed attempt, retried or not. The implementation may
    be ``async def``; the daemon awaits it. An exception is logged as
    ``plugin_hook_failed`` and does not affect the job.

    :param job: the resolved job.
    :param stage: the resolved stage.
    :param error: what went wrong, one line (the ``StageError`` or backend
        error message).
    :param attempt: the attempt that failed, starting at 1.
    :param final: ``True`` when no retry follows: the job is about to fail.
    :returns: ``None`` (or an awaitable resolving to ``None``).
    """


@hookspec
def job_finished(job: Job, result: dict[str, Any]) -> None:
    """Observe a job whose result file is published in ``outbox/``.

    Called once per job, after the atomic rename, so the file at
    ``outbox/<job.id>.json`` is complete. The implementation may be
    ``async def``; the daemon awaits it. An exception is logged as
    ``plugin_hook_failed``; the job stays finished.

    :param job: the resolved job.
    :param result: the document written to the result file (stages'
        outputs, models, timings, the event timeline). Do not modify it.
    :returns: ``None`` (or an awaitable resolving to ``None``).
    """


@hookspec
def job_failed(job_id: str, job: Job | None, error: dict[str, Any]) -> None:
    """Observe a job whose error file is published in ``failed/``.

    Called once per failed job, after the atomic rename. A job that never
    parsed (malformed JSON, unknown pipeline) has no ``Job``, only its id.
    The implementation may be ``async def``; the daemon awaits it. An
    exception is logged as ``plugin_hook_failed``.

    :param job_id: the job's id (from the file, or derived from its name).
    :param job: the resolved job, or ``None`` if it failed validation.
    :param error: the error as written to ``failed/<job_id>.json``: it names
        the cause and, when known, the stage and the field path. Do not
        modify it.
    :returns: ``None`` (or an awaitable resolving to ``None``).
    """
