"""Status: the daemon's live figures as one JSON-able snapshot, and its one-line summary.

The snapshot is what ``GET /status`` returns, what ``ihld status`` prints
and what the systemd ``STATUS=`` line summarises. It is derived from the
engine's state on demand; nothing here is stored.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

from ihld.engine import Engine
from ihld.scheduler import ModelState


def jobs_per_min(engine: Engine, window_s: float, now: float | None = None) -> float:
    now = time.monotonic() if now is None else now
    finished = engine.counters.finished_at
    if not finished:
        return 0.0
    span = min(window_s, max(now - engine.started, 1e-9))
    recent = 0
    for t in reversed(finished):
        if now - t > window_s:
            break
        recent += 1
    return recent / span * 60.0


def eta_s(engine: Engine) -> float | None:
    """Remaining work at the learned per-model stage time and slot count, plus one load each."""
    remaining: dict[str, int] = defaultdict(int)
    for progress in engine.jobs.values():
        for stage in progress.job.stages:
            if stage.name not in progress.outputs:
                remaining[stage.model_key()] += 1
    if not remaining:
        return 0.0 if not engine.jobs else None
    slots = max(b.slots for b in engine.config.backends)
    backends = max(1, len(engine.config.backends) - len(engine.down))
    total = 0.0
    resident = {key for b in engine.scheduler.backends.values() for key in b.resident}
    for key, count in remaining.items():
        figures = engine.figures.get(key)
        if figures is None or figures.service_s_ewma is None:
            return None  # not learned yet
        total += count * figures.service_s_ewma / slots
        if key not in resident:
            total += figures.load_s_ewma or 0.0
    return total / backends


def snapshot(engine: Engine, spool_counts: dict[str, int] | None = None) -> dict[str, Any]:
    now = time.monotonic()
    models: dict[str, dict[str, Any]] = defaultdict(lambda: {"ready": 0, "in_flight": 0, "done": 0})
    for key, depth in engine.scheduler.queue_depths().items():
        models[key]["ready"] = depth
    for task in engine.scheduler.inflight.values():
        models[task.model_key]["in_flight"] += 1
    for key, figures in engine.figures.items():
        models[key]["done"] = figures.stages
        models[key]["loads"] = figures.loads
        models[key]["load_s_total"] = round(figures.load_s_total, 3)
        if figures.service_s_ewma is not None:
            models[key]["stage_s"] = round(figures.service_s_ewma, 3)
        if figures.tokens_per_s_ewma is not None:
            models[key]["tokens_per_s"] = round(figures.tokens_per_s_ewma, 1)
    backends = {}
    for name, state in engine.scheduler.backends.items():
        backends[name] = {
            "up": name not in engine.down,
            "down_reason": engine.down.get(name),
            "in_flight": state.inflight,
            "resident": {r.model: r.state.value for r in state.resident.values()},
        }
    eta = eta_s(engine)
    counters = engine.counters
    return {
        "pid_uptime_s": round(now - engine.started, 3),
        "policy": engine.scheduler.policy,
        "jobs": {
            "in_progress": len(engine.jobs),
            "done": counters.jobs_done,
            "failed": counters.jobs_failed,
            "rejected": counters.jobs_rejected,
        },
        "stages": {
            "done": counters.stages_done,
            "retries": counters.stage_retries,
            "ready": engine.scheduler.ready_count(),
            "in_flight": len(engine.scheduler.inflight),
        },
        "jobs_per_min": {
            "1m": round(jobs_per_min(engine, 60, now), 2),
            "15m": round(jobs_per_min(engine, 900, now), 2),
        },
        "eta_s": None if eta is None else round(eta, 1),
        "loads": engine.scheduler.stats.loads,
        "models": dict(models),
        "backends": backends,
        "spool": spool_counts or {},
    }


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def summary_line(snap: dict[str, Any]) -> str:
    """The short human summary for systemd's STATUS= (one line)."""
    jobs = snap["jobs"]
    total = jobs["done"] + jobs["failed"] + jobs["in_progress"]
    parts = [f"{jobs['done']}/{total} done"]
    if jobs["failed"]:
        parts.append(f"{jobs['failed']} failed")
    parts.append(f"{snap['jobs_per_min']['1m']:.0f} jobs/min")
    if snap["eta_s"] and jobs["in_progress"]:
        parts.append(f"ETA {_duration(snap['eta_s'])}")
    resident = [
        model
        for b in snap["backends"].values()
        for model, state in b["resident"].items()
        if state == ModelState.LOADED.value
    ]
    if resident:
        parts.append(", ".join(sorted(set(resident))) + " resident")
    down = [name for name, b in snap["backends"].items() if not b["up"]]
    if down:
        parts.append("backend down: " + ", ".join(down))
    return ", ".join(parts)
