"""A run, reconstructed from the event log: stage intervals, model bands, queues, totals.

This module reads the events into a ``Run`` (:func:`build_run`); the
``Run`` itself and the figures derived from it live in
``ihld.observe.report_run`` (re-exported here), and
``ihld.observe.report_html`` draws it. Everything comes from events the
daemon logs anyway:

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

from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

from ihld.observe.logs_read import epoch as epoch
from ihld.observe.report_run import SERVER_LOAD_MIN_S as SERVER_LOAD_MIN_S
from ihld.observe.report_run import BackendTotals as BackendTotals
from ihld.observe.report_run import Band as Band
from ihld.observe.report_run import ModelTotals as ModelTotals
from ihld.observe.report_run import Outage as Outage
from ihld.observe.report_run import Run as Run
from ihld.observe.report_run import StageRun as StageRun


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
