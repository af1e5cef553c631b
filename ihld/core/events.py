"""The engine's lifecycle events, published to whoever subscribed.

The engine knows nothing of its observers: the daemon subscribes the
plugins' observer hooks and the batch tracker. Each event is delivered in
the background (a slow observer never holds a slot), to every subscriber in
order; one that raises is logged and the next still runs. Shutdown drains
what is still being delivered, briefly.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import structlog

from ihld.core.jobs import Job, StageSpec

log = structlog.get_logger("ihld")


@dataclass(frozen=True)
class StageFinished:
    """A stage's output is checkpointed (or its job's result published)."""

    job: Job
    stage: StageSpec
    output: Any
    record: dict[str, Any]


@dataclass(frozen=True)
class StageFailed:
    """An attempt failed; ``final`` when no retry follows."""

    job: Job
    stage: StageSpec
    error: str
    attempt: int
    final: bool


@dataclass(frozen=True)
class JobFinished:
    """The job's result is published in ``outbox/``."""

    job: Job
    result: dict[str, Any]


@dataclass(frozen=True)
class JobFailed:
    """The job's record is published in ``failed/`` (``job`` is None for a rejected entry)."""

    job_id: str
    job: Job | None
    error: dict[str, Any]


Event = StageFinished | StageFailed | JobFinished | JobFailed
Subscriber = Callable[[Event], Awaitable[None]]

# The plugin observer hook each event is, and its keyword arguments (hookspecs).
HOOKS: dict[type[Any], str] = {
    StageFinished: "stage_finished",
    StageFailed: "stage_failed",
    JobFinished: "job_finished",
    JobFailed: "job_failed",
}


def hook_call(event: Event) -> tuple[str, dict[str, Any]]:
    """The observer hook for ``event`` and its arguments, by field name."""
    fields = {f.name: getattr(event, f.name) for f in dataclasses.fields(event)}
    return HOOKS[type(event)], fields


def ended_job_id(event: Event) -> str | None:
    """The id of the job this event ends, if it ends one."""
    if isinstance(event, JobFinished):
        return event.job.id
    if isinstance(event, JobFailed):
        return event.job_id
    return None


class EventBus:
    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []
        self._tasks: set[asyncio.Task[None]] = set()

    def subscribe(self, subscriber: Subscriber) -> None:
        self._subscribers.append(subscriber)

    def publish(self, event: Event) -> None:
        if self._subscribers:
            self.spawn(self._deliver(event))

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run follow-up work in the background; ``drain`` waits for it."""
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, event: Event) -> None:
        for subscriber in list(self._subscribers):
            try:
                await subscriber(event)
            except Exception as exc:
                log.error("event_subscriber_failed", event=type(event).__name__, error=repr(exc))

    async def drain(self, timeout_s: float) -> None:
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout_s)
