"""The reconstructed run as data, and the figures derived from it.

``Run`` holds a window's stage intervals, model bands and outages
(``ihld.observe.report_model`` builds it from the event log); its methods
derive the queue depth per model, the totals per model and per backend,
the server's own loads and each backend's activity segments.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from dataclasses import dataclass, field

from ihld.observe.report_intervals import (
    _counter,
    _intersect,
    _length,
    _subtract,
    _union,
)

SERVER_LOAD_MIN_S = 0.05  # a load_duration this long means the server loaded (or queued)


@dataclass
class StageRun:
    start: float
    end: float
    model: str
    backend: str
    job_id: str
    stage: str
    queue_s: float
    eval_count: int | None
    eval_duration_ns: int | None
    load_duration_ns: int | None
    lane: int = 0

    @property
    def wall_s(self) -> float:
        return self.end - self.start

    @property
    def ready(self) -> float:
        return self.start - self.queue_s

    @property
    def server_s(self) -> float:
        """Ollama's ``load_duration``: its own model load, or queue wait, before this ran."""
        if not self.load_duration_ns:
            return 0.0
        return min(self.load_duration_ns / 1e9, self.wall_s)

    @property
    def serve_start(self) -> float:
        return self.start + self.server_s


@dataclass
class Band:
    """A model on a backend: ``loading`` (the load call) or ``resident`` (loaded, held)."""

    backend: str
    model: str
    kind: str
    start: float
    end: float
    open: bool = False  # still going at the end of the window


@dataclass
class Outage:
    backend: str
    start: float
    end: float
    reason: str


@dataclass
class ModelTotals:
    stages: int = 0
    wall_s: float = 0.0
    queue_s: float = 0.0
    tokens: int = 0
    eval_s: float = 0.0
    loads: int = 0  # ihld's loads plus the server's own (see Run.server_loads)
    server_loads: int = 0
    load_s: float = 0.0
    resident_s: float = 0.0

    @property
    def tokens_per_s(self) -> float | None:
        return self.tokens / self.eval_s if self.eval_s > 0 else None


@dataclass
class BackendTotals:
    """Where a backend's time went, in seconds; the five add up to the window."""

    slots: int
    serving_s: float = 0.0  # at least one stage running (past the server's load or wait)
    loading_s: float = 0.0  # a load running (ihld's, or the server's inside a request), no stage
    idle_waiting_s: float = 0.0  # nothing running although stages were ready (and up)
    idle_s: float = 0.0  # nothing running, nothing ready
    down_s: float = 0.0  # nothing running, marked down
    slot_s: float = 0.0  # sum over stages of their run time (slot-seconds)

    @property
    def busy_slots(self) -> float:
        """Mean stages running at once while serving."""
        return self.slot_s / self.serving_s if self.serving_s > 0 else 0.0


@dataclass
class Run:
    t0: float
    t1: float
    stages: list[StageRun] = field(default_factory=list)  # ran (at least partly) in the window
    pending: list[StageRun] = field(default_factory=list)  # still waiting when it closed
    bands: list[Band] = field(default_factory=list)
    outages: list[Outage] = field(default_factory=list)
    slots: dict[str, int] = field(default_factory=dict)  # lanes per backend
    models: list[str] = field(default_factory=list)  # in order of first appearance
    jobs_claimed: int = 0
    jobs_done: int = 0
    jobs_failed: int = 0
    jobs_rejected: int = 0
    retries: int = 0
    first_claim: float | None = None
    last_finish: float | None = None
    done_times: list[float] = field(default_factory=list)
    failures: list[tuple[float, str, str]] = field(default_factory=list)  # (t, job, kind)
    daemon_starts: list[float] = field(default_factory=list)
    policy: str | None = None
    events: int = 0

    @property
    def span_s(self) -> float:
        return max(self.t1 - self.t0, 0.0)

    @property
    def backends(self) -> list[str]:
        return sorted(self.slots)

    @property
    def jobs_per_min(self) -> float | None:
        """Finished jobs per minute from the first claim to the last finish."""
        if self.first_claim is None or self.last_finish is None or not self.jobs_done:
            return None
        span = self.last_finish - self.first_claim
        return self.jobs_done / span * 60 if span > 0 else None

    def queue_depth(self) -> dict[str, list[tuple[float, int]]]:
        """Ready stages per model as steps ``(t, depth from t on)``, clipped to the window."""
        changes: dict[str, list[tuple[float, int]]] = defaultdict(list)
        for s in self.stages + self.pending:
            if s.queue_s <= 0:
                continue
            changes[s.model].append((max(s.ready, self.t0), +1))
            if s.start < self.t1:
                changes[s.model].append((max(s.start, self.t0), -1))
        series: dict[str, list[tuple[float, int]]] = {}
        for model in self.models:
            depth = 0
            steps: list[tuple[float, int]] = [(self.t0, 0)]
            # Ends before starts at the same instant: a stage leaving as another arrives.
            for t, delta in sorted(changes.get(model, []), key=lambda c: (c[0], c[1])):
                depth += delta
                if steps and steps[-1][0] == t:
                    steps[-1] = (t, depth)
                else:
                    steps.append((t, depth))
            series[model] = steps
        return series

    def model_totals(self) -> dict[str, ModelTotals]:
        totals: dict[str, ModelTotals] = {m: ModelTotals() for m in self.models}
        for s in self.stages:
            t = totals[s.model]
            t.stages += 1
            t.wall_s += s.wall_s
            t.queue_s += s.queue_s
            if s.eval_count and s.eval_duration_ns:
                t.tokens += s.eval_count
                t.eval_s += s.eval_duration_ns / 1e9
        for b in self.bands:
            t = totals.setdefault(b.model, ModelTotals())
            if b.kind == "loading":
                t.load_s += b.end - b.start
                if not b.open:
                    t.loads += 1
            else:
                t.resident_s += b.end - b.start
        for b in self.server_loads():
            t = totals.setdefault(b.model, ModelTotals())
            t.load_s += b.end - b.start
            t.loads += 1
            t.server_loads += 1
        return totals

    def server_loads(self) -> list[Band]:
        """Loads the *server* did on demand, estimated from the stages' ``load_duration``.

        Under ``fifo`` ihld sends requests without loading first, so Ollama
        loads (and swaps) models inside requests. Each stage whose
        ``load_duration`` is at least ``SERVER_LOAD_MIN_S`` marks
        ``[start, start + load_duration]``; overlapping marks of one model on
        one backend are one load (requests that waited for the same load).
        Marks inside one of ihld's own load bands are not counted again.
        """
        marks: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
        for st in self.stages:
            if st.server_s >= SERVER_LOAD_MIN_S:
                marks[(st.backend, st.model)].append((st.start, st.serve_start))
        own: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
        for band in self.bands:
            if band.kind == "loading":
                own[(band.backend, band.model)].append((band.start, band.end))
        found = []
        for (backend, model), intervals in marks.items():
            for lo, hi in _union(intervals):
                if _intersect([(lo, hi)], _union(own[(backend, model)])):
                    continue
                found.append(Band(backend, model, "server-load", lo, hi))
        return sorted(found, key=lambda band: band.start)

    def backend_totals(self) -> dict[str, BackendTotals]:
        """Split each backend's window into serving / loading / idle (work waiting) / idle."""
        waiting = _union(self._waits())
        result: dict[str, BackendTotals] = {}
        for backend in self.backends:
            mine = [s for s in self.stages if s.backend == backend]
            serving = _union([(s.serve_start, s.end) for s in mine])
            loads = [(b.start, b.end) for b in self._loads(backend)]
            loads += [(s.start, s.serve_start) for s in mine]  # the server's loads and waits
            loading = _subtract(_union(loads), serving)
            idle = _subtract([(self.t0, self.t1)], _union(serving + loading))
            outages = [(o.start, o.end) for o in self.outages if o.backend == backend]
            down = _intersect(idle, _union(outages))
            idle_waiting = _intersect(_subtract(idle, down), waiting)
            serving_s = _length(serving)
            loading_s = _length(loading)
            waiting_s = _length(idle_waiting)
            down_s = _length(down)
            result[backend] = BackendTotals(
                slots=self.slots[backend],
                serving_s=serving_s,
                loading_s=loading_s,
                idle_waiting_s=waiting_s,
                idle_s=max(0.0, self.span_s - serving_s - loading_s - waiting_s - down_s),
                down_s=down_s,
                slot_s=sum(s.end - s.serve_start for s in mine),
            )
        return result

    def _waits(self) -> list[tuple[float, float]]:
        """When stages sat ready in ihld's queue (any model), within the window."""
        return [
            (max(s.ready, self.t0), min(s.start, self.t1))
            for s in self.stages + self.pending
            if s.start > s.ready
        ]

    def _loads(self, backend: str) -> list[Band]:
        return [b for b in self.bands if b.backend == backend and b.kind == "loading"]

    def activity(self, backend: str) -> list[tuple[float, float, str, int]]:
        """The backend's window as segments ``(start, end, state, stages running)``.

        State is ``serving`` (at least one stage running), ``loading``,
        ``down``, ``waiting`` (idle although stages were ready) or ``idle``.
        Adjacent segments with the same state and count are merged.
        """
        stages = [s for s in self.stages if s.backend == backend]
        mine = [(s.serve_start, s.end) for s in stages]
        loads = [(b.start, b.end) for b in self._loads(backend)]
        loads += [(s.start, s.serve_start) for s in stages if s.server_s > 0]
        outages = [(o.start, o.end) for o in self.outages if o.backend == backend]
        waits = self._waits()
        edges = {self.t0, self.t1}
        for a, b in mine + loads + outages + waits:
            edges.update((a, b))
        points = sorted(t for t in edges if self.t0 <= t <= self.t1)
        running, loading = _counter(mine), _counter(loads)
        down, ready = _counter(outages), _counter(waits)
        segments: list[tuple[float, float, str, int]] = []
        for a, b in itertools.pairwise(points):
            if b <= a:
                continue
            mid = (a + b) / 2
            n = running(mid)
            if n:
                state = "serving"
            elif loading(mid):
                state = "loading"
            elif down(mid):
                state = "down"
            elif ready(mid):
                state = "waiting"
            else:
                state = "idle"
            if segments and segments[-1][2:] == (state, n) and segments[-1][1] == a:
                segments[-1] = (segments[-1][0], b, state, n)
            else:
                segments.append((a, b, state, n))
        return segments
