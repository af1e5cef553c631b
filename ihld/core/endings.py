"""How a job ends: its result or failure record published, then it leaves the job store.

A finished job's result, or a failed job's record (a stage that failed for
good, a deadline, a model no backend serves), is published through the
group committer after every checkpoint of it; then the job leaves memory,
its requests still waiting on a server are cancelled, the counters move and
observers hear of it (``JobFinished``, ``JobFailed``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from typing import Any

import structlog

from ihld.core import events
from ihld.core.commit import GroupCommitter
from ihld.core.progress import JobProgress
from ihld.core.scheduler import Scheduler
from ihld.core.snapshot import Counters
from ihld.core.spool import Spool

log = structlog.get_logger("ihld")


class JobEndings:
    def __init__(
        self,
        *,
        jobs: dict[str, JobProgress],
        scheduler: Scheduler,
        committer: GroupCommitter,
        spool: Spool,
        counters: Counters,
        bus: events.EventBus,
        requests: Mapping[tuple[str, str], asyncio.Task[Any]],
        on_empty: Callable[[], None],
    ) -> None:
        self.jobs = jobs  # the engine's: an ended job leaves it here
        self.scheduler = scheduler
        self.committer = committer
        self.spool = spool
        self.counters = counters
        self.events = bus
        self.requests = requests  # stages waiting on a server, by (job, stage)
        self.on_empty = on_empty

    async def finish(self, progress: JobProgress) -> None:
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
        self.events.publish(events.JobFinished(progress.job, result))

    async def fail(
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
            request = self.requests.get((job_id, stage_spec.name))
            if request is not None and request is not asyncio.current_task():
                request.cancel()
        self.counters.jobs_failed += 1
        log.warning("job_failed", job_id=job_id, stage=stage, kind=kind, error=message)
        self.events.publish(events.JobFailed(job_id, progress.job, record["error"]))

    async def _publish(self, job_id: str, record: dict[str, Any], *, failed: bool) -> None:
        """Publish the final record, then drop the checkpoint: the job leaves memory.

        The committer keeps order, so every checkpoint of this job asked for
        earlier is on disk before the result, and none can re-appear after
        the checkpoint is removed.
        """
        self.jobs.pop(job_id, None)
        await self.committer.final(job_id, record, failed=failed)
        self.committer.drop(job_id)  # out of the store; a restart redoes it if it is lost
        if not self.jobs:
            self.on_empty()

    async def expire_deadlines(self, down: Mapping[str, str]) -> None:
        """Fail jobs whose deadline passed: the only way an outage fails a job."""
        now = time.time()
        for progress in list(self.jobs.values()):
            if progress.deadline_at is not None and now >= progress.deadline_at:
                waiting: list[str | None] = [*sorted(progress.running)] or [None]
                await self.fail(
                    progress,
                    waiting[0],
                    "deadline",
                    "job deadline passed before it finished (deadline_s / [limits] job_deadline_s)",
                    backends_down=dict(down) or None,
                )
