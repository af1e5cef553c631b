"""What the simulator saw: counters and a per-request log for tests and benchmarks.

Real Ollama exposes no metrics (issue #3144), so the simulator keeps its own:
how many loads a run caused, how busy each model was, how many requests ran
at once, and one log line per chat/generate request, tagged with the
``X-Ihld-Task`` header so a test can prove no finished stage was sent twice.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

# The request log is bounded so a long benchmark cannot grow it forever.
LOG_LIMIT = 200_000


@dataclass
class RequestRecord:
    """One chat/generate request as the log shows it.

    ``t``: seconds after the simulator started (or was reset) when it arrived.
    ``kind``: "chat" (has content), "load" or "unload". ``status``: the HTTP
    status sent (None if no response was sent). ``completed``: the whole
    successful response (final ``done`` object) was written.
    """

    t: float
    model: str | None
    task: str | None
    kind: str
    status: int | None = None
    done_reason: str | None = None
    completed: bool = False
    fault: str | None = None


WORK_LIMIT = 200_000  # busy intervals kept (the oldest go first)


class SimStats:
    """Counters and the request log; all times are real (wall) seconds."""

    def __init__(self, speed: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.speed = speed
        self._clock = clock
        self._active: dict[str, int] = {}
        self._busy_since: dict[str, float] = {}
        self._working_since: float | None = None  # some request of any model running
        self.reset()

    def reset(self) -> None:
        """Clear counters and log; models still busy count from now on."""
        now = self._clock()
        self.started_mono = now
        self.started_at = time.time()
        self.requests: Counter[str] = Counter()
        self.chat_requests = 0
        self.loads: Counter[str] = Counter()
        self.aborted_loads: Counter[str] = Counter()
        self.unloads: Counter[str] = Counter()
        self.load_seconds = 0.0
        self.busy_seconds: dict[str, float] = {}
        self.max_concurrent: dict[str, int] = {}
        self.max_resident = 0
        self.faults_injected: Counter[str] = Counter()
        self.log: deque[RequestRecord] = deque(maxlen=LOG_LIMIT)
        # When the server was working (a request running or a model loading), merged:
        # [start, end] in seconds since the start. The bench counts the rest as idle.
        self.work: list[list[float]] = []
        if self._working_since is not None:
            self._working_since = now
        for model, active in self._active.items():
            if active > 0:
                self._busy_since[model] = now
                self.max_concurrent[model] = active

    def record_request(self, model: str | None, task: str | None, kind: str) -> RequestRecord:
        """Log a request on arrival; the handler fills in the outcome."""
        t = round(self._clock() - self.started_mono, 6)
        rec = RequestRecord(t=t, model=model, task=task, kind=kind)
        self.log.append(rec)
        if model:
            self.requests[model] += 1
        if kind == "chat":
            self.chat_requests += 1
        return rec

    def note_load(self, model: str, seconds: float) -> None:
        self.loads[model] += 1
        self.load_seconds += seconds
        now = self._clock()
        self._worked(now - seconds, now)

    def _worked(self, start: float, end: float) -> None:
        start = max(start, self.started_mono) - self.started_mono
        end -= self.started_mono
        if end <= start:
            return
        if self.work and start <= self.work[-1][1] + 1e-6:
            self.work[-1][1] = max(self.work[-1][1], end)
            return
        for span in reversed(self.work[-8:]):  # a load that ended after a request began
            if start <= span[1] and end >= span[0]:
                span[0], span[1] = min(span[0], start), max(span[1], end)
                return
        self.work.append([start, end])
        if len(self.work) > WORK_LIMIT:
            del self.work[: len(self.work) - WORK_LIMIT]

    def note_aborted_load(self, model: str) -> None:
        self.aborted_loads[model] += 1

    def note_unload(self, model: str) -> None:
        self.unloads[model] += 1

    def note_resident(self, count: int) -> None:
        self.max_resident = max(self.max_resident, count)

    def note_fault(self, kind: str) -> None:
        self.faults_injected[kind] += 1

    def slot_taken(self, model: str) -> None:
        """A request of ``model`` started running (holds one of its slots)."""
        active = self._active.get(model, 0) + 1
        self._active[model] = active
        if active == 1:
            self._busy_since[model] = self._clock()
        if self._working_since is None:
            self._working_since = self._clock()
        self.max_concurrent[model] = max(self.max_concurrent.get(model, 0), active)

    def slot_freed(self, model: str) -> None:
        active = max(0, self._active.get(model, 0) - 1)
        self._active[model] = active
        if active == 0 and model in self._busy_since:
            began = self._busy_since.pop(model)
            self.busy_seconds[model] = self.busy_seconds.get(model, 0.0) + self._clock() - began
        if self._working_since is not None and not any(self._active.values()):
            self._worked(self._working_since, self._clock())
            self._working_since = None

    def snapshot(self) -> dict[str, Any]:
        """The counters as JSON (GET /sim/stats)."""
        now = self._clock()
        busy = dict(self.busy_seconds)
        for model, since in self._busy_since.items():
            busy[model] = busy.get(model, 0.0) + now - since
        return {
            "requests": dict(self.requests),
            "chat_requests": self.chat_requests,
            "loads": dict(self.loads),
            "aborted_loads": dict(self.aborted_loads),
            "unloads": dict(self.unloads),
            "load_seconds": round(self.load_seconds, 6),
            "busy_seconds": {m: round(s, 6) for m, s in busy.items()},
            "max_concurrent": dict(self.max_concurrent),
            "max_resident": self.max_resident,
            "faults_injected": dict(self.faults_injected),
            "started_at": self.started_at,
            "uptime_s": round(now - self.started_mono, 6),
            "work": [[round(a, 6), round(b, 6)] for a, b in self.work],
            "speed": self.speed,
        }

    def requests_json(self) -> list[dict[str, Any]]:
        """The request log as JSON (GET /sim/requests)."""
        return [asdict(rec) for rec in self.log]
