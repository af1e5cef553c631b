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


class SimStats:
    """Counters and the request log; all times are real (wall) seconds."""

    def __init__(self, speed: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.speed = speed
        self._clock = clock
        self._active: dict[str, int] = {}
        self._busy_since: dict[str, float] = {}
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
        self.max_concurrent[model] = max(self.max_concurrent.get(model, 0), active)

    def slot_freed(self, model: str) -> None:
        active = max(0, self._active.get(model, 0) - 1)
        self._active[model] = active
        if active == 0 and model in self._busy_since:
            began = self._busy_since.pop(model)
            self.busy_seconds[model] = self.busy_seconds.get(model, 0.0) + self._clock() - began

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
            "speed": self.speed,
        }

    def requests_json(self) -> list[dict[str, Any]]:
        """The request log as JSON (GET /sim/requests)."""
        return [asdict(rec) for rec in self.log]
