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
import json
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import structlog

from ihld.backends.base import Backend, BackendError
from ihld.backends.settings import BackendConfig
from ihld.common.backoff import backoff_delay
from ihld.core.actors import ActorLike, StageContext
from ihld.core.commit import GroupCommitter
from ihld.core.config import Config
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
from ihld.core.jobs import RUNNER_OPTIONS
from ihld.core.parallelism import ParallelWatch
from ihld.core.progress import JobProgress
from ihld.core.scheduler import (
    Action,
    BackendSlots,
    Dispatch,
    Drop,
    Load,
    PolicyFactory,
    Scheduler,
    Task,
    Unload,
)
from ihld.core.spool import InflightLog, Spool

log = structlog.get_logger("ihld")

Notify = Callable[..., Coroutine[Any, Any, None]]

# Transient failures of one stage back off from this, doubling, up to the cap.
TRANSIENT_BACKOFF = (0.5, 30.0)

@dataclass
class Counters:
    jobs_done: int = 0
    jobs_failed: int = 0
    jobs_rejected: int = 0
    stages_done: int = 0
    stage_retries: int = 0
    finished_at: collections.deque[float] = field(
        default_factory=lambda: collections.deque(maxlen=100_000)
    )


async def _no_notify(hook: str, **kwargs: Any) -> None:
    return None


class Engine:
    def __init__(
        self,
        *,
        config: Config,
        spool: Spool,
        backends: Mapping[str, Backend],
        actors: Callable[[], Mapping[str, ActorLike]],
        notify: Notify = _no_notify,
        inflight_log: InflightLog | None = None,
        policy: PolicyFactory,
    ) -> None:
        self.config = config
        # Backends are fixed for the daemon's life (a change needs a restart), so a
        # reload can never leave a running task without its backend's settings.
        self.backend_configs: dict[str, BackendConfig] = {b.name: b for b in config.backends}
        self.spool = spool
        self.backends = dict(backends)
        self.actors = actors
        self.notify = notify
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
            costs=LearnedCosts(self.figures),
        )
        self.jobs: dict[str, JobProgress] = {}
        self.counters = Counters()

        self.started = time.monotonic()
        self._kick = asyncio.Event()
        self._actions: set[asyncio.Task[None]] = set()
        self.committer = GroupCommitter(spool)
        self.health = BackendHealth(
            self.backends, self.scheduler, self.backend_configs, on_change=self.kick
        )
        self._requests: dict[tuple[str, str], asyncio.Task[Any]] = {}  # stages waiting on a server
        self.parallel = ParallelWatch()
        self._observers: set[asyncio.Task[None]] = set()
        self._dispatching = True
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def down(self) -> Mapping[str, str]:
        """Backends down now, with why (read-only; ``BackendHealth`` owns it)."""
        return MappingProxyType(self.health.down)

    def apply_config(self, config: Config) -> list[str]:
        """Take a reloaded config: what can change live does; returns the keys that need a restart.

        Backends, the policy and the spool keep their old values until a restart.
        """
        restart = []
        if config.spool.dir != self.config.spool.dir:
            restart.append("spool.dir")
        if config.backends != self.config.backends:
            restart.append("backends")
        if config.scheduler.policy != self.config.scheduler.policy:
            restart.append("scheduler.policy")
        scheduler = config.scheduler.model_copy(update={"policy": self.config.scheduler.policy})
        self.config = config.model_copy(
            update={"backends": self.config.backends, "spool": self.config.spool,
                    "scheduler": scheduler}
        )
        self.scheduler.max_wait_s = scheduler.max_wait_s
        self.scheduler.fair_wait_s = scheduler.fair_wait_s
        self.scheduler.prefetch = scheduler.prefetch
        self.scheduler.fifo_workers = scheduler.fifo_workers
        self.kick()
        return restart

    # -- jobs in ----------------------------------------------------------------

    def add_job(self, progress: JobProgress) -> None:
        self.jobs[progress.job.id] = progress
        self._idle.clear()
        self._enqueue_ready(progress)
        self.kick()

    def _enqueue_ready(self, progress: JobProgress) -> None:
        now = time.monotonic()
        for stage in progress.ready_stages():
            progress.running.add(stage.name)
            self.scheduler.add(
                Task(
                    job_id=progress.job.id,
                    stage=stage.name,
                    model_key=stage.model_key(),
                    model=stage.model or "",
                    priority=progress.job.priority,
                    job_seq=progress.seq,
                    ready_at=now,
                    job_ready_at=progress.arrived,
                    attempt=progress.attempts.get(stage.name, 0) + 1,
                    options={k: v for k, v in stage.options.items() if k in RUNNER_OPTIONS},
                )
            )

    def kick(self) -> None:
        self._kick.set()

    def observe(self, hook: str, **kwargs: Any) -> None:
        """Tell plugin observers, in the background: a slow observer never holds a slot."""
        self.observe_task(self.notify(hook, **kwargs))

    def observe_task(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run follow-up work in the background; shutdown waits for it (briefly)."""
        task = asyncio.create_task(coro)
        self._observers.add(task)
        task.add_done_callback(self._observers.discard)

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
            coro = self._load(action)
        elif isinstance(action, Unload):
            coro = self._unload(action)
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
        if self._observers:  # let plugin observers (and batch outputs) finish
            await asyncio.wait(set(self._observers), timeout=5)
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
        ctx = StageContext(
            job_id=task.job_id,
            input=progress.job.input,
            stage=stage,
            outputs=MappingProxyType(progress.outputs),
            attempt=task.attempt,
        )
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
                first_byte_s=self._first_byte_s(task, cfg),
            )
        finally:
            self._requests.pop(task.key, None)

    def _first_byte_s(self, task: Task, cfg: BackendConfig) -> float:
        """How long the server may hold a request before its first byte.

        A request sent beyond the slots (prefetch) waits at the server for a slot,
        and a first request may wait for a load: ``read_timeout_s`` (meant for
        gaps between chunks) plus twice the learned load and the service of the
        requests ahead of it.
        """
        costs = self.scheduler.costs
        rounds = 1 + -(-self.scheduler.prefetch // max(1, cfg.slots))
        ahead = costs.load_s(task.model_key) + rounds * costs.service_s(task.model_key)
        return cfg.read_timeout_s + 2 * ahead

    async def _apply(self, task: Task, progress: JobProgress, outcome: Outcome) -> None:
        try:
            if self.jobs.get(task.job_id) is not progress:
                return
            if isinstance(outcome, StageDone):
                await self._stage_done(task, progress, outcome)
            elif isinstance(outcome, Transient):
                self._transient(task, progress, outcome)
            elif isinstance(outcome, ModelUnusable):
                self._model_unusable(
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
                await self._notify_stage_failed(progress, task, outcome.message, final=False)
            else:
                assert isinstance(outcome, StageRetry | StageFailed)
                await self._notify_stage_failed(progress, task, outcome.message, final=True)
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

    def _model_unusable(self, backend: str, model_key: str, kind: str, message: str) -> None:
        """This backend cannot serve the model. The scheduler sends its stages elsewhere,
        or, where no backend can, drops every one of them (each job fails with ``message``)."""
        log.error("model_unusable", backend=backend, model_key=model_key, kind=kind, error=message)
        self.scheduler.model_missing(backend, model_key, kind, message)
        self.kick()

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
            Task(
                job_id=task.job_id,
                stage=task.stage,
                model_key=task.model_key,
                model=task.model,
                priority=task.priority,
                job_seq=task.job_seq,
                ready_at=now,
                job_ready_at=task.job_ready_at,
                attempt=task.attempt + 1 if counts else task.attempt,
                not_before=now + delay,
                options=task.options,
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
        self.figures[task.model_key].learn_stage(done.record)
        self._watch_parallel(task, done.record)
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
            await self._finish_job(progress)
        else:
            await self._checkpoint(progress)
            self._enqueue_ready(progress)
        self.observe(
            "stage_finished", job=progress.job, stage=stage, output=done.output, record=done.record
        )

    def _watch_parallel(self, task: Task, record: dict[str, Any]) -> None:
        """Learn when the server runs fewer requests at once than its slots (status says so)."""
        backend = self.scheduler.backends.get(task.backend or "")
        resident = backend.resident.get(task.model_key) if backend else None
        if backend is None or resident is None or resident.parallel is not None:
            return
        seen = self.parallel.observe(
            backend.name,
            task.model_key,
            slots=backend.slots,
            demand=task.demand,
            finished_at=record["finished_at"],
            metrics={k: v for k, v in record.items() if isinstance(v, int)},
        )
        if seen is not None:
            self.scheduler.parallel_seen(backend.name, task.model_key, seen)
            log.warning("parallel_limited", parallel=seen, slots=backend.slots)

    async def _notify_stage_failed(
        self, progress: JobProgress, task: Task, error: str, *, final: bool
    ) -> None:
        self.observe(
            "stage_failed",
            job=progress.job,
            stage=progress.job.stage(task.stage),
            error=error,
            attempt=task.attempt,
            final=final,
        )

    async def _checkpoint(self, progress: JobProgress) -> None:
        """Durably record finished stages before their successors may run."""
        await self.committer.checkpoint(progress.job.id, progress.checkpoint())

    async def _finish_job(self, progress: JobProgress) -> None:
        job_id = progress.job.id
        progress.event("job_finished")
        result = progress.result()
        truncated = [s["name"] for s in result["stages"] if s.get("truncated")]
        if truncated:
            result["truncated_stages"] = truncated
        await asyncio.shield(self._publish(job_id, result, failed=False))
        self.counters.jobs_done += 1
        self.counters.finished_at.append(time.monotonic())
        log.info(
            "job_finished", job_id=job_id, elapsed_s=round(time.time() - progress.claimed_at, 6)
        )
        self.observe("job_finished", job=progress.job, result=result)

    async def fail_job(
        self, progress: JobProgress, stage: str | None, kind: str, message: str, **extra: Any
    ) -> None:
        job_id = progress.job.id
        if self.jobs.get(job_id) is not progress:
            return
        progress.event("job_failed", stage=stage, kind=kind)
        record = progress.failure(stage, kind, message, **extra)
        self.scheduler.cancel_job(job_id, [s.name for s in progress.job.stages])
        await asyncio.shield(self._publish(job_id, record, failed=True))
        for stage_spec in progress.job.stages:  # a request still out for it ends now
            request = self._requests.get((job_id, stage_spec.name))
            if request is not None and request is not asyncio.current_task():
                request.cancel()
        self.counters.jobs_failed += 1
        log.warning("job_failed", job_id=job_id, stage=stage, kind=kind, error=message)
        self.observe("job_failed", job_id=job_id, job=progress.job, error=record["error"])

    async def _publish(self, job_id: str, record: dict[str, Any], *, failed: bool) -> None:
        """Publish the final record, then drop the checkpoint: the job leaves memory.

        The committer keeps order, so every checkpoint of this job asked for
        earlier is on disk before the result, and none can re-appear after
        the checkpoint is removed.
        """
        self.jobs.pop(job_id, None)
        if failed:
            await self.committer.failure(job_id, record)
        elif await self.committer.result(job_id, record) is None and not self._ours(record):
            # another job with this id (from another daemon sharing the spool) got there first
            duplicate = {
                **record,
                "status": "failed",
                "error": {
                    "stage": None,
                    "kind": "duplicate_id",
                    "message": f"duplicate id {job_id!r}: outbox/{job_id}.json holds another job",
                },
            }
            await self.committer.failure(job_id, duplicate)
        self.spool.remove_checkpoint(job_id)  # an unlink; recovery tidies up if it is lost
        if not self.jobs:
            self._idle.set()

    def _ours(self, record: dict[str, Any]) -> bool:
        """Is the published outbox record this job's own (written before a crash)?"""
        try:
            existing = json.loads((self.spool.outbox / f"{record['id']}.json").read_text())
        except (OSError, ValueError):
            return False
        mine = record.get("job", {}).get("source", {}).get("claim")
        return bool(existing.get("job", {}).get("source", {}).get("claim") == mine)

    async def expire_deadlines(self) -> None:
        """Fail jobs whose deadline passed: the only way an outage fails a job."""
        now = time.time()
        for progress in list(self.jobs.values()):
            if progress.deadline_at is not None and now >= progress.deadline_at:
                waiting: list[str | None] = [*sorted(progress.running)] or [None]
                await self.fail_job(
                    progress,
                    waiting[0],
                    "deadline",
                    "job deadline passed before it finished (deadline_s / [limits] job_deadline_s)",
                    backends_down=dict(self.health.down) or None,
                )

    # -- models -------------------------------------------------------------------------

    async def _load(self, action: Load) -> None:
        backend = self.backends[action.backend]
        cfg = self.backend_configs[action.backend]
        structlog.contextvars.bind_contextvars(model=action.model, backend=action.backend)
        log.info("model_loading")
        try:
            result = await backend.load(
                action.model, keep_alive=cfg.keep_alive, options=action.options
            )
        except BackendError as exc:
            self._load_failed(action, exc)
            return
        self.scheduler.loaded(
            action.backend, action.model_key, time.monotonic(), parallel=result.parallel
        )
        self.parallel.forget(action.backend, action.model_key)
        self.figures[action.model_key].learn_load(result.wall_s)
        log.info(
            "model_loaded",
            load_s=round(result.wall_s, 6),
            load_duration=result.load_duration_ns,
            parallel=result.parallel,
        )

    def _load_failed(self, action: Load, exc: BackendError) -> None:
        """A failed load backs off; one that cannot succeed fails the model's stages.

        Transient: the server, not the model (no count). Otherwise each failure
        counts, and ``max_attempts`` of them in a row mean the model cannot load.
        """
        transient = exc.effect == "transient"
        now = time.monotonic()
        failures = self.scheduler.backends[action.backend].load_failures.get(action.model_key, 0)
        base, cap = TRANSIENT_BACKOFF
        delay = backoff_delay(failures + 1, base_s=base, cap_s=cap)
        count = self.scheduler.load_failed(action.backend, action.model_key, retry_at=now + delay)
        log.error("model_load_failed", kind=exc.kind, error=str(exc), failures=count)
        if transient:
            self.health.suspect(action.backend, str(exc))
        elif exc.effect == "model" or count >= self.config.limits.max_attempts:
            self._model_unusable(action.backend, action.model_key, exc.kind, str(exc))
        self.kick()

    async def _unload(self, action: Unload) -> None:
        structlog.contextvars.bind_contextvars(model=action.model, backend=action.backend)
        try:
            await self.backends[action.backend].unload(action.model)
        except BackendError as exc:
            log.warning("model_unload_failed", error=str(exc))
        self.scheduler.unloaded(action.backend, action.model_key, time.monotonic())
        log.info("model_unloaded")
