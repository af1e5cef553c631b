"""What a run measured, from the daemon's own records: its event log and result files.

All inputs are wall-clock epochs written by the daemon (one clock); every
duration is multiplied by the speed factor to give simulated seconds.

* makespan: first ``job_claimed`` to last ``job_finished``/``job_failed``.
* job latency: ``job_finished`` minus the job's arrival: its file's drop
  time for timed workloads, its ``job_claimed`` for a batch (so daemon
  start-up, which the speed factor would inflate, is not counted).
* slot occupancy: each stage holds a slot from ``finished_at -
  (prompt_eval_duration + eval_duration)`` (Ollama's own figures, in the
  result file) to ``finished_at``; it is *waiting* from when it became
  ready (``started_at - queue_s``) until it holds a slot. Occupancy is
  busy slot-time over capacity (``slots x max_loaded``) during the time at
  least one stage was waiting: the share of the server ihld kept busy
  while it had work to give. Loads, daemon gaps and a model with empty
  slots while work waits for another model all count against it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


def epoch(timestamp: str) -> float:
    """An event's ISO-8601 ``timestamp`` as seconds since the epoch."""
    return datetime.fromisoformat(timestamp).timestamp()


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100), linear between closest ranks; None if empty."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


@dataclass
class JobTimes:
    claimed: float | None = None
    finished: float | None = None
    failed: bool = False
    priority: int = 0


def job_times(events: Iterable[Mapping[str, Any]]) -> dict[str, JobTimes]:
    """Per job id: claim and end epochs (first claim, last end), priority, failure."""
    jobs: dict[str, JobTimes] = {}
    for event in events:
        name = event.get("event")
        job_id = event.get("job_id")
        ts = event.get("timestamp")
        if not isinstance(job_id, str) or not isinstance(ts, str):
            continue
        if name == "job_claimed":
            times = jobs.setdefault(job_id, JobTimes())
            if times.claimed is None:
                times.claimed = epoch(ts)
            times.priority = int(event.get("priority") or 0)
        elif name in ("job_finished", "job_failed"):
            times = jobs.setdefault(job_id, JobTimes())
            times.finished = epoch(ts)
            times.failed = name == "job_failed"
    return jobs


def stage_waits(events: Iterable[Mapping[str, Any]]) -> list[tuple[str, float]]:
    """``(job_id, queue_s)`` of every finished stage: ready until dispatched, in ihld."""
    out = []
    for event in events:
        if event.get("event") == "stage_finished" and isinstance(event.get("job_id"), str):
            out.append((str(event["job_id"]), float(event.get("queue_s") or 0.0)))
    return out


@dataclass(frozen=True)
class StageSpan:
    """One finished stage on the daemon's clock: ready, slot taken, slot freed."""

    ready: float
    slot_start: float
    slot_end: float


def stage_spans(results: Iterable[Mapping[str, Any]]) -> list[StageSpan]:
    """The stage spans of every result file (``outbox/<id>.json``)."""
    spans = []
    for result in results:
        for stage in result.get("stages", []):
            if "finished_at" not in stage or "started_at" not in stage:
                continue
            end = float(stage["finished_at"])
            hold = (stage.get("prompt_eval_duration", 0) + stage.get("eval_duration", 0)) / 1e9
            ready = float(stage["started_at"]) - float(stage.get("queue_s", 0.0))
            spans.append(StageSpan(ready, max(ready, end - hold), end))
    return spans


def slot_occupancy(spans: Sequence[StageSpan], capacity: int) -> float | None:
    """Busy slot-time / (capacity x time some stage was waiting); None if none ever waited."""
    marks: list[tuple[float, int, int]] = []
    for span in spans:
        marks += [(span.slot_start, 1, 0), (span.slot_end, -1, 0)]
        if span.slot_start > span.ready:
            marks += [(span.ready, 0, 1), (span.slot_start, 0, -1)]
    marks.sort()
    busy = waiting = 0
    waited = used = 0.0
    last = marks[0][0] if marks else 0.0
    for t, d_busy, d_wait in marks:
        if waiting > 0 and t > last:
            waited += t - last
            used += (t - last) * min(busy, capacity) / capacity
        busy += d_busy
        waiting += d_wait
        last = t
    return used / waited if waited > 0 else None


def tail_idle(events: Iterable[Mapping[str, Any]], slots: int) -> tuple[int, float]:
    """(switches, slot-seconds idle in their drains), on the daemon's clock.

    Before a model is unloaded its last requests drain: the slots whose last
    request ended early sit idle until the last one ends, and the next load
    waits for it. Per unload: the last ``slots`` stages of that model on that
    backend, and the sum of (last end - each end).
    """
    ends: dict[tuple[str, str], list[float]] = {}
    switches = 0
    idle = 0.0
    for event in events:
        name = event.get("event")
        key = (str(event.get("backend")), str(event.get("model")))
        if name == "stage_finished":
            ends.setdefault(key, []).append(epoch(event["timestamp"]))
        elif name == "model_unloaded" and ends.get(key):
            last = sorted(ends.pop(key))[-slots:]
            switches += 1
            idle += sum(last[-1] - t for t in last)
    return switches, idle


@dataclass
class Measured:
    """The figures of one run, in simulated seconds unless named otherwise."""

    jobs: int
    done: int
    failed: int
    makespan_s: float
    p50_latency_s: float | None
    p99_latency_s: float | None
    slot_occupancy: float | None
    latencies_s: dict[str, float] = field(default_factory=dict)
    max_wait_s: dict[int, float] = field(default_factory=dict)  # per priority, in ihld's queue

    @property
    def jobs_per_min(self) -> float | None:
        return self.done / (self.makespan_s / 60.0) if self.makespan_s > 0 else None


def measure(
    events: Sequence[Mapping[str, Any]],
    results: Sequence[Mapping[str, Any]],
    *,
    job_ids: Iterable[str],
    speed: float,
    capacity: int,
    arrivals: Mapping[str, float] | None = None,
) -> Measured:
    """Measure the jobs ``job_ids`` of a run; ``arrivals`` (epochs) for timed workloads."""
    wanted = set(job_ids)
    times = {k: v for k, v in job_times(events).items() if k in wanted}
    claims = [t.claimed for t in times.values() if t.claimed is not None]
    ends = [t.finished for t in times.values() if t.finished is not None]
    makespan = (max(ends) - min(claims)) * speed if claims and ends else 0.0
    latencies: dict[str, float] = {}
    for job_id, t in times.items():
        start = (arrivals or {}).get(job_id, t.claimed)
        if t.finished is not None and start is not None and not t.failed:
            latencies[job_id] = (t.finished - start) * speed
    waits: dict[int, float] = {}
    for job_id, queue_s in stage_waits(events):
        if job_id in times:
            prio = times[job_id].priority
            waits[prio] = max(waits.get(prio, 0.0), queue_s * speed)
    spans = stage_spans(r for r in results if r.get("id") in wanted)
    values = list(latencies.values())
    return Measured(
        jobs=len(wanted),
        done=sum(1 for t in times.values() if t.finished is not None and not t.failed),
        failed=sum(1 for t in times.values() if t.failed),
        makespan_s=makespan,
        p50_latency_s=percentile(values, 50),
        p99_latency_s=percentile(values, 99),
        slot_occupancy=slot_occupancy(spans, capacity),
        latencies_s=latencies,
        max_wait_s=waits,
    )


def sim_slowdown(
    results: Iterable[Mapping[str, Any]], modelled: Mapping[tuple[str, str], float], speed: float
) -> float | None:
    """How much longer stages held their slot than the cost model says (one-slot servers).

    Each stage's slot time is the simulator's own ``prompt_eval_duration +
    eval_duration`` (x speed); ``modelled`` is its one-slot service time.
    The simulator wakes up late by up to a timer tick per phase, a fixed real
    cost that grows with the speed factor: this separates that from the
    scheduler's own losses. Only meaningful when one request runs at a time.
    """
    real = model = 0.0
    for result in results:
        for stage in result.get("stages", []):
            key = (str(result.get("id")), str(stage.get("name")))
            if key not in modelled or "eval_duration" not in stage:
                continue
            held = stage.get("prompt_eval_duration", 0) + stage.get("eval_duration", 0)
            real += held / 1e9 * speed
            model += modelled[key]
    return real / model - 1.0 if model > 0 else None


def cost_check(
    results: Iterable[Mapping[str, Any]], predicted: Mapping[tuple[str, str], tuple[int, int]]
) -> dict[str, int]:
    """Compare predicted (prompt, output) tokens with what the simulator reported per stage.

    Output tokens must match. The prompt is evaluated in full unless a slot's cache
    held part of it (``prompt_eval_count`` counts what was evaluated, as Ollama's
    does): at most the predicted count, and ``cached`` counts the stages it was less.
    """
    checked = mismatched = cached = 0
    for result in results:
        for stage in result.get("stages", []):
            key = (str(result.get("id")), str(stage.get("name")))
            if key not in predicted or "eval_count" not in stage:
                continue
            checked += 1
            prompt, output = predicted[key]
            evaluated = int(stage.get("prompt_eval_count") or 0)
            if stage.get("eval_count") != output or not 0 < evaluated <= prompt:
                mismatched += 1
            elif evaluated < prompt:
                cached += 1
    return {"stages": checked, "mismatched": mismatched, "cached": cached}


def speed_free_makespan(
    events: Sequence[Mapping[str, Any]],
    job_ids: Iterable[str],
    stats: Mapping[str, Any],
    speed: float,
    lag: float | None = None,
) -> float | None:
    """The makespan as if the daemon ran against a server at speed 1.

    The simulator divides the work it models by ``speed``, but not ihld's own
    time between requests (its round trips, checkpoints, dispatch), which the
    plain makespan then multiplies by ``speed``: the ratio to the bound grows
    with the speed although the schedule is the same. Here the time the server
    was working (a request running or a model loading: ``/sim/stats`` ``work``)
    counts at ``speed``, and the time it sat idle counts as it passed, so the
    figure is what the same schedule would take at speed 1. ``lag`` is the
    simulator's own slowness (``sim_slowdown``: its slot time over the modelled
    one, minus 1); where it is known, the working time is counted at the
    modelled rate, so neither the daemon's speed nor the simulator's shows.
    """
    wanted = set(job_ids)
    times = [t for k, t in job_times(events).items() if k in wanted]
    claims = [t.claimed for t in times if t.claimed is not None]
    ends = [t.finished for t in times if t.finished is not None]
    origin = stats.get("started_at")
    if not claims or not ends or not isinstance(origin, int | float):
        return None
    start, end = min(claims), max(ends)
    busy = 0.0
    for a, b in stats.get("work") or []:
        lo, hi = max(start, origin + a), min(end, origin + b)
        if hi > lo:
            busy += hi - lo
    modelled = busy / (1.0 + lag) if lag is not None and lag > -1.0 else busy
    return speed * modelled + (end - start - busy)
