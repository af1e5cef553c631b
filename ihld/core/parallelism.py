"""How many requests a server really runs at once for one model.

A backend's ``slots`` is what the user configured (``OLLAMA_NUM_PARALLEL``),
but Ollama forces one slot for embedding models and some architectures
(mllama, qwen3vl, qwen3next, lfm2, nemotron_h: ``server/sched.go``), and no
API says so. Requests then queue inside the server, and ihld, counting four
slots, would keep four in flight and misjudge every switch.

The server's own figures show it: each answer says how long the model
computed (prompt evaluation plus generation), so each request's compute span
ends when the answer arrived and starts that long before. When requests were
sent with every slot asked for, the most spans that overlap is the real
parallelism. llama.cpp reports ``total_slots`` directly; this is for servers
that do not.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import structlog

if TYPE_CHECKING:
    from ihld.core.scheduler import Scheduler
    from ihld.core.tasks import Task

log = structlog.get_logger("ihld")

# A span overlapping another by less than this share of the shorter one is
# clock noise between the server's durations and our arrival times.
_NOISE = 0.2


def max_overlap(spans: list[tuple[float, float]]) -> int:
    """The largest number of spans that overlap at one moment (noise-tolerant)."""
    best = 0
    for start, end in spans:
        length = end - start
        at_once = 0
        for other_start, other_end in spans:
            shared = min(end, other_end) - max(start, other_start)
            if shared > _NOISE * max(1e-9, min(length, other_end - other_start)):
                at_once += 1
        best = max(best, at_once)
    return best


class ParallelWatch:
    """Per (backend, model key): the compute spans of requests sent with all slots asked for."""

    def __init__(self) -> None:
        self._spans: dict[tuple[str, str], deque[tuple[float, float]]] = {}

    def observe(
        self,
        backend: str,
        key: str,
        *,
        slots: int,
        demand: int,
        finished_at: float,
        metrics: Mapping[str, int],
    ) -> int | None:
        """Record one finished request; return the parallelism once it is clear.

        ``demand``: requests in flight on the model when this one was sent.
        Returns a number below ``slots`` when the server ran fewer at once, and
        None while unsure or when it ran as many as asked.
        """
        compute_ns = metrics.get("prompt_eval_duration", 0) + metrics.get("eval_duration", 0)
        if slots < 2 or demand < slots or compute_ns <= 0:
            return None
        window = self._spans.setdefault((backend, key), deque(maxlen=3 * slots))
        window.append((finished_at - compute_ns / 1e9, finished_at))
        if len(window) < window.maxlen:  # type: ignore[operator]
            return None
        seen = max_overlap(list(window))
        return seen if 0 < seen < slots else None

    def forget(self, backend: str, key: str) -> None:
        """The model was (re)loaded: what the old runner did no longer says anything."""
        self._spans.pop((backend, key), None)

    def watch(self, scheduler: Scheduler, task: Task, record: Mapping[str, Any]) -> None:
        """Learn from a finished stage when the server runs fewer requests at once than its
        slots; the scheduler then counts that many (status says so)."""
        backend = scheduler.backends.get(task.backend or "")
        resident = backend.resident.get(task.model_key) if backend else None
        if backend is None or resident is None or resident.parallel is not None:
            return
        seen = self.observe(
            backend.name,
            task.model_key,
            slots=backend.slots,
            demand=task.demand,
            finished_at=record["finished_at"],
            metrics={k: v for k, v in record.items() if isinstance(v, int)},
        )
        if seen is not None:
            scheduler.parallel_seen(backend.name, task.model_key, seen)
            log.warning("parallel_limited", parallel=seen, slots=backend.slots)
