"""A run, reconstructed from the event log: stage intervals, model bands, queues, totals.

Pure data, no rendering (``ihld.observe.report_html`` draws it). Everything comes
from events the daemon logs anyway:

* a stage's run interval is ``[t - wall_s, t]`` and its wait in ihld's
  ready queue ``[t - wall_s - queue_s, t - wall_s]``, where ``t`` is the
  timestamp of its ``stage_finished`` event; so the queue depth per model
  at any moment is exact for every stage that finished, with no sampling;
* stages are put on a backend's slot lanes greedily (first free lane), so
  the lanes show how many requests the backend served at once;
* ``model_loaded`` (``load_s``) gives a load band ``[t - load_s, t]``, and
  the model is resident from then until ``model_unloaded`` (or the next
  daemon start, or the end of the window);
* ``backend_down``/``backend_up`` delimit outages; ``daemon_ready`` carries
  the configured slots per backend (older logs: the most lanes used).

A stage's first ``load_duration`` seconds (Ollama's own figure) are the
server loading the model, or queueing the request: that part counts as
loading, not serving, and loads the server did on demand (``fifo``) are
counted from it (:meth:`Run.server_loads`).

Time is seconds since the epoch throughout.
"""

from __future__ import annotations

import bisect
import itertools
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

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


# -- interval helpers ------------------------------------------------------------------


def _union(intervals: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for a, b in sorted(i for i in intervals if i[1] > i[0]):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def _subtract(
    base: list[tuple[float, float]], cut: list[tuple[float, float]]
) -> list[tuple[float, float]]:
    """``base`` minus ``cut`` (both sorted, disjoint)."""
    out: list[tuple[float, float]] = []
    for a, b in base:
        start = a
        for c, d in cut:
            if d <= start or c >= b:
                continue
            if c > start:
                out.append((start, c))
            start = max(start, d)
        if start < b:
            out.append((start, b))
    return out


def _intersect(
    xs: list[tuple[float, float]], ys: list[tuple[float, float]]
) -> list[tuple[float, float]]:
    out = []
    for a, b in xs:
        for c, d in ys:
            lo, hi = max(a, c), min(b, d)
            if hi > lo:
                out.append((lo, hi))
    return _union(out)


def _length(intervals: list[tuple[float, float]]) -> float:
    return sum(b - a for a, b in intervals)


def _counter(intervals: list[tuple[float, float]]) -> Any:
    """A function t → how many of the intervals contain t (binary search on sorted ends)."""
    starts = sorted(a for a, _ in intervals)
    ends = sorted(b for _, b in intervals)

    def count(t: float) -> int:
        return bisect.bisect_right(starts, t) - bisect.bisect_left(ends, t)

    return count


# -- building a run from events ----------------------------------------------------------


def epoch(timestamp: Any) -> float | None:
    if not isinstance(timestamp, str):
        return None
    try:
        return datetime.fromisoformat(timestamp).timestamp()
    except ValueError:
        return None


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _int(value: Any) -> int | None:
    number = _num(value)
    return None if number is None else int(number)


def build_run(
    events: Iterable[Mapping[str, Any]],
    *,
    since: float | None = None,
    until: float | None = None,
) -> Run:
    """Reconstruct a run from events (in log order), clipped to ``[since, until]``.

    Intervals that cross the window's edges are cut at them; events outside
    it only help to reconstruct such intervals.
    """
    stages: list[StageRun] = []
    bands: list[Band] = []
    outages: list[Outage] = []
    open_loads: dict[tuple[str, str], float] = {}
    resident: dict[tuple[str, str], float] = {}
    down: dict[str, tuple[float, str]] = {}
    slots: dict[str, int] = {}
    models: dict[str, None] = {}
    run = Run(t0=0.0, t1=0.0)
    first: float | None = None
    last: float | None = None

    def inside(t: float) -> bool:
        return (since is None or t >= since) and (until is None or t <= until)

    def close_resident(key: tuple[str, str], t: float) -> None:
        start = resident.pop(key, None)
        if start is not None:
            bands.append(Band(key[0], key[1], "resident", start, t))

    for event in events:
        t = epoch(event.get("timestamp"))
        if t is None:
            continue
        if until is not None and t > until + 86400:
            break
        name = event.get("event")
        backend = str(event.get("backend") or "")
        model = str(event.get("model") or "")
        if inside(t):
            run.events += 1
            first = t if first is None else min(first, t)
            last = t if last is None else max(last, t)
        if name == "stage_finished":
            wall = _num(event.get("wall_s")) or 0.0
            stages.append(
                StageRun(
                    start=t - wall,
                    end=t,
                    model=model,
                    backend=backend,
                    job_id=str(event.get("job_id") or ""),
                    stage=str(event.get("stage") or ""),
                    queue_s=max(0.0, _num(event.get("queue_s")) or 0.0),
                    eval_count=_int(event.get("eval_count")),
                    eval_duration_ns=_int(event.get("eval_duration")),
                    load_duration_ns=_int(event.get("load_duration")),
                )
            )
        elif name == "model_loading":
            open_loads[(backend, model)] = t
        elif name == "model_loaded":
            load_s = _num(event.get("load_s"))
            began = open_loads.pop((backend, model), None)
            start = t - load_s if load_s is not None else (began if began is not None else t)
            bands.append(Band(backend, model, "loading", start, t))
            close_resident((backend, model), t)
            resident[(backend, model)] = t
        elif name == "model_load_failed":
            began = open_loads.pop((backend, model), None)
            if began is not None:
                bands.append(Band(backend, model, "loading", began, t))
        elif name == "model_unloaded":
            close_resident((backend, model), t)
        elif name == "backend_down":
            down.setdefault(backend, (t, str(event.get("error") or "")))
            # The scheduler forgets what a down backend held (it reloads after).
            for key in [k for k in resident if k[0] == backend]:
                close_resident(key, t)
        elif name == "backend_up":
            began_down = down.pop(backend, None)
            if began_down is not None:
                outages.append(Outage(backend, began_down[0], t, began_down[1]))
        elif name == "daemon_ready":
            # A new daemon knows nothing of what the last one held: close its bands.
            for key in list(resident):
                close_resident(key, t)
            for key, began in list(open_loads.items()):
                bands.append(Band(key[0], key[1], "loading", began, t))
            open_loads.clear()
            for name_, (began, reason) in list(down.items()):
                outages.append(Outage(name_, began, t, reason))
            down.clear()
            configured = event.get("slots")
            if isinstance(configured, dict):
                for key_, n in configured.items():
                    if isinstance(n, int) and n > 0:
                        slots[str(key_)] = max(slots.get(str(key_), 0), n)
            if inside(t):
                run.daemon_starts.append(t)
                if isinstance(event.get("policy"), str):
                    run.policy = event["policy"]
        if not inside(t):
            continue
        if name == "job_claimed":
            run.jobs_claimed += 1
            run.first_claim = t if run.first_claim is None else min(run.first_claim, t)
        elif name == "job_finished":
            run.jobs_done += 1
            run.done_times.append(t)
            run.last_finish = t if run.last_finish is None else max(run.last_finish, t)
        elif name == "job_failed":
            run.jobs_failed += 1
            run.failures.append((t, str(event.get("job_id") or ""), str(event.get("kind") or "")))
            run.last_finish = t if run.last_finish is None else max(run.last_finish, t)
        elif name == "job_rejected":
            run.jobs_rejected += 1
        elif name == "stage_retried":
            run.retries += 1

    if since is None and first is not None:
        # The log may begin mid-run (rotated): stages and loads reach back before it.
        first = min([first, *(st.ready for st in stages), *(b.start for b in bands)])
    t0 = since if since is not None else first
    t1 = until if until is not None else last
    if t0 is None or t1 is None:
        t0 = t1 = since or until or 0.0
    # Stages that began before the first event in the window still count from t0.
    run.t0, run.t1 = t0, max(t0, t1)
    end = run.t1
    for key, start in resident.items():
        bands.append(Band(key[0], key[1], "resident", start, end, open=True))
    for key, start in open_loads.items():
        bands.append(Band(key[0], key[1], "loading", start, end, open=True))
    for name, (began, reason) in down.items():
        outages.append(Outage(name, began, end, reason))

    run.stages, run.pending = _clip_stages(stages, run.t0, run.t1)
    run.bands = [
        Band(b.backend, b.model, b.kind, max(b.start, run.t0), min(b.end, run.t1), b.open)
        for b in bands
        if b.end > run.t0 and b.start < run.t1
    ]
    run.outages = [
        Outage(o.backend, max(o.start, run.t0), min(o.end, run.t1), o.reason)
        for o in outages
        if o.end > run.t0 and o.start < run.t1
    ]
    for s in run.stages:
        models.setdefault(s.model, None)
        slots.setdefault(s.backend, 1)
    for band in run.bands:
        models.setdefault(band.model, None)
        slots.setdefault(band.backend, 1)
    for o in run.outages:
        slots.setdefault(o.backend, 1)
    run.models = list(models)
    lanes = _assign_lanes(run.stages)
    run.slots = {b: max(n, lanes.get(b, 0)) for b, n in slots.items()}
    return run


def _clip_stages(
    stages: list[StageRun], t0: float, t1: float
) -> tuple[list[StageRun], list[StageRun]]:
    """Stages that ran in the window, cut at its edges; and those still waiting at its end."""
    kept, pending = [], []
    for s in stages:
        if s.end <= t0 or s.ready >= t1:
            continue
        if s.start >= t1:
            if s.ready < t0:
                s.queue_s = s.start - t0
            pending.append(s)
            continue
        if s.start < t0:  # running when the window opens
            s.start, s.queue_s = t0, 0.0
        elif s.ready < t0:  # waiting when the window opens
            s.queue_s = s.start - t0
        if s.end > t1:  # still running when it closes
            s.end = t1
        kept.append(s)
    return kept, pending


def _assign_lanes(stages: list[StageRun]) -> dict[str, int]:
    """Greedy first-free lane per backend; returns the lanes each backend needed."""
    ends: dict[str, list[float]] = defaultdict(list)
    for s in sorted(stages, key=lambda s: (s.start, s.end)):
        lanes = ends[s.backend]
        for index, lane_end in enumerate(lanes):
            if lane_end <= s.start + 1e-6:
                s.lane = index
                lanes[index] = s.end
                break
        else:
            s.lane = len(lanes)
            lanes.append(s.end)
    return {b: len(v) for b, v in ends.items()}
