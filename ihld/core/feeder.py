"""The feeder: jobs from the job store into the engine, while the engine has room.

A waiting job lives only in the store (``ihld.core.store``). The engine holds
at most ``[limits] max_jobs_in_memory`` jobs; whenever it has room (a chunk
of jobs came in, jobs ended), the feeder takes the next jobs from the store
(started ones first, then by priority and age) and *materialises* them: a
``JobProgress`` with its ready stages queued for the scheduler.

Recovery has dropped, before the feeder starts, any job that ended just
before a crash (``ihld.service.wiring.recover_crashed``): every job the
store gives is one to run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog

from ihld.common.backoff import Backoff
from ihld.core.progress import JobProgress
from ihld.core.store import JobStore

log = structlog.get_logger("ihld")

BATCH = 1000  # jobs taken from the store at once


class Feeder:
    def __init__(
        self,
        store: JobStore,
        *,
        in_memory: Callable[[], int],
        limit: Callable[[], int],
        admit: Callable[[JobProgress], None],
    ) -> None:
        self.store = store
        self.in_memory = in_memory  # jobs the engine holds now
        self.limit = limit  # [limits] max_jobs_in_memory (a reload may change it)
        self.admit = admit
        self._wake = asyncio.Event()
        self.idle = asyncio.Event()  # set when the store had nothing left to take
        self._taking = False
        self._backoff = Backoff(0.5, 30.0)
        self.taken = 0

    def wake(self) -> None:
        self.idle.clear()
        self._wake.set()

    def drained(self) -> bool:
        """Nothing in the store that is not in the engine (``--once`` may stop)."""
        return self.store.counted and not self._taking and not self.store.backlog()

    def arriving(self) -> bool:
        """Jobs about to come into the engine: being taken, or waiting while it has room."""
        return self._taking or self.room() > 0

    def room(self) -> int:
        """How many jobs to take now: none until a batch's worth of room (or the rest)."""
        backlog = self.store.backlog()
        room = self.limit() - self.in_memory()
        want = min(BATCH, backlog, max(1, self.limit() // 10))
        return min(room, BATCH, backlog) if room >= want and backlog else 0

    async def run(self) -> None:
        if not self.store.counted:  # after a restart: one pass over the queue, after READY
            await asyncio.to_thread(self.store.recount)
            await asyncio.to_thread(self.store.forget_ended_batches)
        self._wake.set()
        while True:
            await self._wake.wait()
            self._wake.clear()
            while (count := self.room()) > 0:
                self._taking = True
                try:
                    taken = await asyncio.to_thread(self._take, count)
                except OSError as exc:  # a failing disk: the jobs wait in the store
                    delay = self._backoff.next()
                    log.error("feeder_failed", error=str(exc), retry_in_s=round(delay, 3))
                    await asyncio.sleep(delay)
                    continue
                finally:
                    self._taking = False
                self._backoff.reset()
                if taken is None:
                    break  # the counts were off; recounted
                for progress in taken:
                    if not progress.records:
                        log.info(
                            "job_claimed",
                            job_id=progress.job.id,
                            stages=len(progress.job.stages),
                            priority=progress.job.priority,
                        )
                    self.admit(progress)
                    self.taken += 1
            if not self.store.backlog():
                self.idle.set()

    def _take(self, count: int) -> list[JobProgress] | None:
        """Blocking: the next jobs; None if the store had none to give although its counts
        said so (recounted)."""
        stored_jobs = self.store.take(count)
        if not stored_jobs:
            self.store.recount()
            return None
        out = [JobProgress.from_stored(stored) for stored in stored_jobs]
        # Into the engine in arrival order, as the daemon did before the job store: the
        # store chose *which* jobs (started first); their age in the queues follows
        # arrival, so the job that was running at a crash is not put at the head again.
        out.sort(key=lambda p: p.seq)
        return out
