"""``fifo``: job by job, stage by stage, ``fifo_workers`` jobs at a time.

The seed script's behaviour, kept as the baseline the benchmarks compare
against. No explicit loads and no ``keep_alive``: the server swaps models as
requests arrive, which is exactly what makes a mixed batch thrash.
"""

from __future__ import annotations

from ihld.core.scheduler import Scheduler
from ihld.core.tasks import Action, BackendSlots, Task


class Fifo:
    name = "fifo"
    pins_models = False  # the server loads on demand
    releases_early = False  # the next job waits for this one's outcome

    def __init__(self, scheduler: Scheduler) -> None:
        self.s = scheduler

    def queue_order(self, task: Task) -> float:
        return float(task.job_seq)

    def wakeups(self, now: float) -> list[float]:
        return []

    def plan(self, backend: BackendSlots, now: float, actions: list[Action]) -> None:
        while backend.inflight < self.s.fifo_workers:
            best: tuple[int, float, str] | None = None
            for key, queue in self.s.queues.items():
                head = queue.peek()
                if head is None or not backend.serves(head.model):
                    continue
                candidate = (-head.priority, float(head.job_seq), key)
                if best is None or candidate < best:
                    best = candidate
            if best is None:
                return
            self.s.dispatch(backend, self.s.queues[best[2]], actions, in_order=True)
