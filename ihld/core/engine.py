"""The engine: jobs in memory, the scheduler, and the actions it asks for.

One dispatch loop asks the scheduler what to do and starts one asyncio task
per action (run a stage, load or unload a model). When an action ends, its
outcome is applied in a fixed order: checkpoint the job, enqueue the stages
that became ready, and only then free the slot, so the scheduler never sees
a model as idle while its next stage is on the way.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import Callable, Coroutine, Mapping
from types import MappingProxyType
from typing import Any

import structlog

from ihld.backends.base import Backend
from ihld.backends.settings import BackendConfig
from ihld.common.backoff import backoff_delay
from ihld.core import events
from ihld.core.actors import ActorLike
from ihld.core.commit import GroupCommitter
from ihld.core.config import Config, live_update
from ihld.core.endings import JobEndings
from ihld.core.executor import (
    ModelUnusable,
    Outcome,
    StageDone,
    StageFailed,
    StageRetry,
    Transient,
    run_stage,
)
from ihld.core.figures import LearnedCosts, ModelFigures
from ihld.core.health import BackendHealth
from ihld.core.inflight import InflightLog
from ihld.core.models import ModelActions
from ihld.core.parallelism import ParallelWatch
from ihld.core.progress import JobProgress
from ihld.core.scheduler import PolicyFactory, Scheduler
from ihld.core.snapshot import Counters, EngineSnapshot, build
from ihld.core.spool import Spool
from ihld.core.store import JobStore
from ihld.core.tasks import Action, BackendSlots, Dispatch, Drop, Load, Task, Unload

log = structlog.get_logger("ihld")

# Transient failures of one stage back off from this, doubling, up to the cap.
TRANSIENT_BACKOFF = (0.5, 30.0)


class Engine:
    def __init__(
        self,
        *,
        config: Config,
        spool: Spool,
        store: JobStore,
        backends: Mapping[str, Backend],
        actors: Callable[[], Mapping[str, ActorLike]],
        inflight_log: InflightLog | None = None,
        policy: PolicyFactory,
        arrivals: Callable[[], bool] = lambda: False,  # jobs on their way in (``hold_dry``)
    ) -> None:
        self.config = config
        # Backends are fixed for the daemon's life (a change needs a restart), so a
        # reload can never leave a running task without its backend's settings.
        self.backend_configs: dict[str, BackendConfig] = {b.name: b for b in config.backends}
        self.spool = spool
        self.backends = dict(backends)
        self.actors = actors
        self.events = events.EventBus()  # lifecycle events for whoever subscribes
        self.inflight_log = inflight_log
        slots = [
            BackendSlots(
                b.name,
                slots=b.slots,
                max_loaded=b.max_loaded,
                models=frozenset(b.models) if b.models else None,
            )
            for b in config.backends
        ]
        self.figures: dict[str, ModelFigures] = collections.defaultdict(ModelFigures)
        self.scheduler = Scheduler(
            slots,
            policy=policy,
            max_wait_s=config.scheduler.max_wait_s,
            fair_wait_s=config.scheduler.fair_wait_s,
            fifo_workers=config.scheduler.fifo_workers,
            prefetch=config.scheduler.prefetch,
            prompt_cache=config.scheduler.prompt_cache,
            longest_first=config.scheduler.longest_first,
            hold_dry=config.scheduler.hold_dry,
            costs=LearnedCosts(self.figures),
            arrivals=arrivals,
        )
        self.jobs: dict[str, JobProgress] = {}
        self.counters = Counters()
        self.started = time.monotonic()
        self._kick = asyncio.Event()
        self._actions: set[asyncio.Task[None]] = set()
        self.store = store
        self.committer = GroupCommitter(spool, store)
        self.health = BackendHealth(
            self.backends, self.scheduler, self.backend_configs, on_change=self.kick
        )
        self._requests: dict[tuple[str, str], asyncio.Task[Any]] = {}  # stages waiting on a server
        self.parallel = ParallelWatch()
        self.models = ModelActions(
            backends=self.backends,
            configs=self.backend_configs,
            scheduler=self.scheduler,
            figures=self.figures,
            parallel=self.parallel,
            health=self.health,
            max_attempts=lambda: self.config.limits.max_attempts,
            kick=self.kick,
        )
        self._dispatching = True
        self._idle = asyncio.Event()
        self._idle.set()
        self.endings = JobEndings(
            jobs=self.jobs,
            scheduler=self.scheduler,
            committer=self.committer,
            spool=spool,
            counters=self.counters,
            bus=self.events,
            requests=self._requests,
            on_empty=self._idle.set,
        )

    @property
    def down(self) -> Mapping[str, str]:
        """Backends down now, with why (read-only; ``BackendHealth`` owns it)."""
        return MappingProxyType(self.health.down)

    def apply_settings(self, config: Config) -> list[str]:
        """Take a reloaded config: what can change live does; returns the keys that need a restart.

        Backends, the policy and the spool keep their old values until a restart.
        """
        self.config, restart = live_update(self.config, config)
        for name in ("max_wait_s", "fair_wait_s", "prefetch", "fifo_workers", "prompt_cache",
                     "longest_first", "hold_dry"):  # the scheduler's own copies of the keys
            setattr(self.scheduler, name, getattr(self.config.scheduler, name))
        self.kick()
        return restart

    # -- jobs in ----------------------------------------------------------------

    def add_job(self, progress: JobProgress, *, ready: bool = True) -> None:
        """A job into memory with its ready stages queued (not if only to fail it)."""
        self.jobs[progress.job.id] = progress
        self._idle.clear()
        if ready:
            self._enqueue_ready(progress)
        self.kick()

    def _enqueue_ready(self, progress: JobProgress) -> None:
        actors = self.actors() if self.scheduler.prompt_cache else None
        for task in progress.ready_tasks(time.monotonic(), actors):
            self.scheduler.add(task)

    def kick(self) -> None:
        self._kick.set()

    def job_rejected(self, record: dict[str, Any]) -> None:
        """Intake rejected an entry (its record is in ``failed/``): count it, tell observers."""
        self.counters.jobs_rejected += 1
        self.events.publish(events.JobFailed(record["id"], None, record["error"]))

    def snapshot(self) -> EngineSnapshot:
        """What status, metrics and the STATUS= line read; nothing else of the engine."""
        return build(
            scheduler=self.scheduler,
            figures=self.figures,
            jobs=self.jobs,
            counts=self.counters.counts(),
            finished_at=self.counters.finished_at,
            down=self.health.down,
            started=self.started,
            slots=max(b.slots for b in self.config.backends),
            waiting=self.store.waiting_view(),
        )  # fmt: skip

    # -- the loop -------------------------------------------------------------------

    async def run(self) -> None:
        """Dispatch until ``stop_dispatching``; actions started keep running."""
        self.committer.start()
        self.health.start(lambda: self.config.scheduler.reconcile_s)
        while self._dispatching:
            self._kick.clear()
            now = time.monotonic()
            for action in self.scheduler.next_actions(now):
                self._spawn(action)
            if not self.jobs and not self._actions:
                self._idle.set()
            wake = self.scheduler.next_wakeup(now)
            timeout = None if wake is None else max(0.0, wake - time.monotonic()) + 0.001
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._kick.wait()

    def _spawn(self, action: Action) -> None:
        coro: Coroutine[Any, Any, None]
        if isinstance(action, Dispatch):
            coro = self._run_task(action.task)
        elif isinstance(action, Load):
            coro = self.models.load(action)
        elif isinstance(action, Unload):
            coro = self.models.unload(action)
        else:
            coro = self._drop(action)
        task = asyncio.create_task(coro)
        self._actions.add(task)
        task.add_done_callback(self._action_done)

    def _action_done(self, task: asyncio.Task[None]) -> None:
        self._actions.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("action_crashed", error=repr(task.exception()))
        self.kick()

    async def wait_idle(self) -> None:
        """Return when no job is in memory and no action runs (``--once``)."""
        while True:
            await self._idle.wait()
            if not self.jobs and not self._actions:
                return
            self._idle.clear()

    async def stop_dispatching(self, grace_s: float) -> int:
        """Stop starting work; let running actions finish within ``grace_s``; cancel the rest.

        Returns how many actions were cancelled (their stages re-run after restart).
        """
        self._dispatching = False
        self.kick()
        self.health.stop()
        if self._actions:
            _done, pending = await asyncio.wait(set(self._actions), timeout=grace_s)
        else:
            pending = set()
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=5)
        await self.committer.close()
        await self.events.drain(5.0)  # let observers (and batch outputs) finish, briefly
        return len(pending)

    # -- stages ---------------------------------------------------------------------

    async def _run_task(self, task: Task) -> None:
        """One dispatched stage; the slot is released and the task forgotten on every path."""
        progress = self.jobs.get(task.job_id)
        outcome: Outcome | None = None
        shutting_down = False
        try:
            if progress is not None:  # else the job ended (deadline, failure) while this waited
                outcome = await self._attempt(task, progress)
        except asyncio.CancelledError:
            shutting_down = progress is not None and self.jobs.get(task.job_id) is progress
            if shutting_down:
                raise  # stop: the stage was not checkpointed and re-runs after a restart
            # else its job ended while the request ran: nothing to apply
        finally:
            self.scheduler.release(task)  # the slot can serve the next request while we save
            self.kick()
            if outcome is None and not shutting_down:
                if self.inflight_log is not None and progress is not None:
                    self.inflight_log.finished(task.job_id, task.stage)
                self.scheduler.task_done(task)
        if outcome is not None and progress is not None:
            await asyncio.shield(self._apply(task, progress, outcome))

    async def _attempt(self, task: Task, progress: JobProgress) -> Outcome:
        """Send one stage to its backend; cancellable while it waits on the server."""
        stage = progress.job.stage(task.stage)
        backend = self.backends[task.backend or ""]
        cfg = self.backend_configs[backend.name]
        structlog.contextvars.bind_contextvars(
            job_id=task.job_id, stage=task.stage, model=stage.model, backend=backend.name
        )
        actor = self.actors().get(stage.actor)
        queued_s = time.monotonic() - task.ready_at
        if self.inflight_log is not None:
            self.inflight_log.started(task.job_id, task.stage)
        log.debug("stage_started", attempt=task.attempt, queue_s=round(queued_s, 6))
        if actor is None:
            return StageFailed("unknown_actor", f"actor {stage.actor!r} is not registered")
        ctx = progress.context(task.stage, task.attempt)
        keep_alive = cfg.keep_alive if self.scheduler.policy.pins_models else None
        current = asyncio.current_task()
        if current is not None:
            self._requests[task.key] = current
        try:
            return await run_stage(
                actor=actor,
                ctx=ctx,
                backend=backend,
                keep_alive=keep_alive,
                timeout_s=self.config.limits.stage_timeout_s,
                queued_s=queued_s,
                first_byte_s=self.scheduler.first_byte_s(
                    task.model_key, cfg.slots, cfg.read_timeout_s
                ),
            )
        finally:
            self._requests.pop(task.key, None)

    async def _apply(self, task: Task, progress: JobProgress, outcome: Outcome) -> None:
        try:
            if self.jobs.get(task.job_id) is not progress:
                return
            if isinstance(outcome, StageDone):
                await self._stage_done(task, progress, outcome)
            elif isinstance(outcome, Transient):
                self._transient(task, progress, outcome)
            elif isinstance(outcome, ModelUnusable):
                self.models.unusable(
                    task.backend or "", task.model_key, outcome.kind, outcome.message
                )
                # Elsewhere if another backend may have it; else the scheduler drops it.
                self._requeue(task, progress, delay=0.0, counts=False)
            elif isinstance(outcome, StageRetry) and task.attempt < self.config.limits.max_attempts:
                log.warning(
                    "stage_retried", kind=outcome.kind, error=outcome.message, attempt=task.attempt
                )
                progress.event(
                    "stage_retried",
                    stage=task.stage,
                    kind=outcome.kind,
                    error=outcome.message,
                    attempt=task.attempt,
                )
                self.counters.stage_retries += 1
                backoff = backoff_delay(
                    task.attempt, base_s=self.config.limits.retry_backoff_s, cap_s=300.0
                )
                self._requeue(task, progress, delay=backoff, counts=outcome.counts)
                self._stage_failed(progress, task, outcome.message, final=False)
            else:
                assert isinstance(outcome, StageRetry | StageFailed)
                self._stage_failed(progress, task, outcome.message, final=True)
                await self.fail_job(
                    progress, task.stage, outcome.kind, outcome.message, attempts=task.attempt
                )
        finally:
            if self.inflight_log is not None:
                self.inflight_log.finished(task.job_id, task.stage)
            self.scheduler.task_done(task)
            self.kick()

    def _transient(self, task: Task, progress: JobProgress, outcome: Transient) -> None:
        """The server, not the stage: try again later, no attempt counted; check its health."""
        progress.event(
            "stage_interrupted", stage=task.stage, backend=task.backend, reason=outcome.message
        )
        log.warning("stage_interrupted", kind=outcome.kind, error=outcome.message)
        if outcome.residency_lost:
            self.scheduler.unloaded(task.backend or "", task.model_key, time.monotonic())
        base, cap = TRANSIENT_BACKOFF
        delay = backoff_delay(task.setbacks + 1, base_s=base, cap_s=cap)
        self._requeue(task, progress, delay=delay, counts=False, setback=True)
        self.health.suspect(task.backend or "", outcome.message)

    async def _drop(self, action: Drop) -> None:
        """No backend can serve this task's model: its job fails with the servers' reason."""
        progress = self.jobs.get(action.task.job_id)
        if progress is None:
            return
        kind, message = action.why
        await self.fail_job(progress, action.task.stage, kind, message)

    def _requeue(
        self,
        task: Task,
        progress: JobProgress,
        *,
        delay: float,
        counts: bool,
        setback: bool = False,
    ) -> None:
        self.scheduler.task_done(task)  # before the retry (same key) can be dispatched
        if counts:
            progress.attempts[task.stage] = task.attempt
        now = time.monotonic()
        self.scheduler.add(
            task.again(
                now,
                attempt=task.attempt + 1 if counts else task.attempt,
                not_before=now + delay,
                setbacks=task.setbacks + 1 if setback else 0,
            )
        )

    async def _stage_done(self, task: Task, progress: JobProgress, done: StageDone) -> None:
        stage = progress.job.stage(task.stage)
        progress.finish_stage(task.stage, done.output, done.record)
        progress.event(
            "stage_finished",
            stage=task.stage,
            model=stage.model,
            backend=task.backend,
            wall_s=done.record["wall_s"],
        )
        self.figures[task.model_key].learn_stage(done.record, task.stage)
        self.parallel.watch(self.scheduler, task, done.record)
        self.counters.stages_done += 1
        log.info(
            "stage_finished",
            attempt=task.attempt,
            wall_s=done.record["wall_s"],
            queue_s=done.record["queue_s"],
            eval_count=done.record.get("eval_count"),
            eval_duration=done.record.get("eval_duration"),  # tokens/s in metrics and reports
            load_duration=done.record.get("load_duration"),
            truncated=done.record["truncated"] or None,
        )
        if progress.is_complete():
            await self.endings.finish(progress)
        else:
            await self._checkpoint(progress)
            self._enqueue_ready(progress)
        self.events.publish(events.StageFinished(progress.job, stage, done.output, done.record))

    def _stage_failed(self, progress: JobProgress, task: Task, error: str, *, final: bool) -> None:
        stage = progress.job.stage(task.stage)
        self.events.publish(events.StageFailed(progress.job, stage, error, task.attempt, final))

    async def _checkpoint(self, progress: JobProgress) -> None:
        """Durably record finished stages before their successors may run."""
        await self.committer.checkpoint(progress.job.id, progress.checkpoint())

    async def fail_job(
        self, progress: JobProgress, stage: str | None, kind: str, message: str, **extra: Any
    ) -> None:
        await self.endings.fail(progress, stage, kind, message, **extra)

    async def expire_deadlines(self) -> None:
        """Fail jobs whose deadline passed: the only way an outage fails a job."""
        await self.endings.expire_deadlines(self.health.down)
