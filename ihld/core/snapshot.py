"""A typed, read-only picture of the engine at one moment.

``Engine.snapshot()`` builds it; status, ``/status``, ``/metrics`` and the
systemd STATUS= line read it and nothing else of the engine. ``as_dict`` is
the JSON that ``GET /status`` returns.
"""

from __future__ import annotations

import collections
import time
from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ihld.core.figures import ModelFigures
from ihld.core.progress import JobProgress
from ihld.core.scheduler import Scheduler
from ihld.core.storerows import Waiting


@dataclass(frozen=True)
class ModelView:
    ready: int = 0
    in_flight: int = 0
    done: int = 0
    loads: int | None = None  # None: nothing learned of this model yet
    load_s_total: float | None = None
    stage_s: float | None = None
    tokens_per_s: float | None = None
    prompt_evaluated: int | None = None  # prompt tokens the server evaluated

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"ready": self.ready, "in_flight": self.in_flight, "done": self.done}
        if self.loads is not None:
            out["loads"] = self.loads
            out["load_s_total"] = self.load_s_total
        if self.stage_s is not None:
            out["stage_s"] = self.stage_s
        if self.tokens_per_s is not None:
            out["tokens_per_s"] = self.tokens_per_s
        if self.prompt_evaluated is not None:
            out["prompt_evaluated"] = self.prompt_evaluated
        return out


@dataclass(frozen=True)
class BackendView:
    up: bool
    down_reason: str | None
    slots: int
    in_flight: int
    resident: dict[str, str]  # model key -> loading / resident / unloading
    parallel: dict[str, int]  # where the server runs fewer requests at once than the slots


@dataclass(frozen=True)
class Counts:
    jobs_done: int = 0
    jobs_failed: int = 0
    jobs_rejected: int = 0
    stages_done: int = 0
    stage_retries: int = 0


@dataclass
class Counters:
    """The engine's running counts (mutable); ``counts()`` is their frozen copy."""

    jobs_done: int = 0
    jobs_failed: int = 0
    jobs_rejected: int = 0
    stages_done: int = 0
    stage_retries: int = 0
    finished_at: collections.deque[float] = field(
        default_factory=lambda: collections.deque(maxlen=100_000)
    )

    def counts(self) -> Counts:
        return Counts(
            self.jobs_done, self.jobs_failed, self.jobs_rejected, self.stages_done,
            self.stage_retries,
        )  # fmt: skip


@dataclass(frozen=True)
class EngineSnapshot:
    time: float  # wall clock
    uptime_s: float
    policy: str
    jobs_in_progress: int
    counts: Counts
    stages_ready: int
    stages_in_flight: int
    jobs_per_min_1m: float
    jobs_per_min_15m: float
    eta_s: float | None
    loads: int
    load_s_total: float
    holds: int = 0  # a dry model kept its slots for work on its way ([scheduler] hold_dry)
    jobs_waiting: int = 0  # in the job store, not yet in memory
    waiting_by_model: dict[str, int] = field(default_factory=dict)  # by first stage's model
    models: dict[str, ModelView] = field(default_factory=dict)
    backends: dict[str, BackendView] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        c = self.counts
        return {
            "time": self.time,
            "pid_uptime_s": self.uptime_s,
            "policy": self.policy,
            "jobs": {
                "in_progress": self.jobs_in_progress,
                "done": c.jobs_done,
                "failed": c.jobs_failed,
                "rejected": c.jobs_rejected,
                "waiting": self.jobs_waiting,
            },
            "waiting_by_model": dict(self.waiting_by_model),
            "stages": {
                "done": c.stages_done,
                "retries": c.stage_retries,
                "ready": self.stages_ready,
                "in_flight": self.stages_in_flight,
            },
            "jobs_per_min": {"1m": self.jobs_per_min_1m, "15m": self.jobs_per_min_15m},
            "eta_s": self.eta_s,
            "loads": self.loads,
            "load_s_total": self.load_s_total,
            "holds": self.holds,
            "models": {key: view.as_dict() for key, view in self.models.items()},
            "backends": {name: vars(view).copy() for name, view in self.backends.items()},
        }


def jobs_per_min(
    finished_at: Sequence[float], started: float, window_s: float, now: float
) -> float:
    """Jobs finished in the last ``window_s`` (or since start), per minute."""
    if not finished_at:
        return 0.0
    span = min(window_s, max(now - started, 1e-9))
    recent = 0
    for t in reversed(finished_at):
        if now - t > window_s:
            break
        recent += 1
    return recent / span * 60.0


def eta_s(
    jobs: Iterable[JobProgress],
    figures: Mapping[str, ModelFigures],
    *,
    resident: Collection[str],
    slots: int,
    backends_up: int,
    waiting: Mapping[str, int] | None = None,
) -> float | None:
    """Remaining work at the learned per-model stage time and slot count, plus one load each.

    ``waiting``: the stages of jobs still in the store, by model.
    """
    remaining: dict[str, int] = defaultdict(int, waiting or {})
    any_job = bool(remaining)
    for progress in jobs:
        any_job = True
        for stage in progress.job.stages:
            if stage.name not in progress.outputs:
                remaining[stage.model_key()] += 1
    if not remaining:
        return 0.0 if not any_job else None
    total = 0.0
    for key, count in remaining.items():
        learned = figures.get(key)
        if learned is None or learned.service_s_ewma is None:
            return None  # not learned yet
        total += count * learned.service_s_ewma / slots
        if key not in resident:
            total += learned.load_s_ewma or 0.0
    return total / max(1, backends_up)


def build(
    *,
    scheduler: Scheduler,
    figures: Mapping[str, ModelFigures],
    jobs: Mapping[str, JobProgress],
    counts: Counts,
    finished_at: Sequence[float],
    down: Mapping[str, str],
    started: float,
    slots: int,
    waiting: Waiting,
) -> EngineSnapshot:
    now = time.monotonic()
    models: dict[str, dict[str, Any]] = defaultdict(dict)
    for key, depth in scheduler.queue_depths().items():
        models[key]["ready"] = depth
    for task in scheduler.inflight.values():
        models[task.model_key]["in_flight"] = models[task.model_key].get("in_flight", 0) + 1
    for key, learned in figures.items():
        models[key].update(
            done=learned.stages,
            loads=learned.loads,
            load_s_total=round(learned.load_s_total, 3),
            prompt_evaluated=learned.prompt_evaluated,
            stage_s=None if learned.service_s_ewma is None else round(learned.service_s_ewma, 3),
            tokens_per_s=None
            if learned.tokens_per_s_ewma is None
            else round(learned.tokens_per_s_ewma, 1),
        )
    backends = {
        name: BackendView(
            up=name not in down,
            down_reason=down.get(name),
            slots=state.slots,
            in_flight=state.inflight,
            resident={r.model: r.state.value for r in state.resident.values()},
            parallel={r.model: r.parallel for r in state.resident.values() if r.parallel},
        )
        for name, state in scheduler.backends.items()
    }
    resident = {key for b in scheduler.backends.values() for key in b.resident}
    eta = eta_s(
        jobs.values(), figures, resident=resident, slots=slots,
        backends_up=len(scheduler.backends) - len(down), waiting=waiting.stages,
    )  # fmt: skip
    return EngineSnapshot(
        time=round(time.time(), 3),
        uptime_s=round(now - started, 3),
        policy=scheduler.policy.name,
        jobs_in_progress=len(jobs),
        counts=counts,
        stages_ready=scheduler.ready_count(),
        stages_in_flight=len(scheduler.inflight),
        jobs_per_min_1m=round(jobs_per_min(finished_at, started, 60, now), 2),
        jobs_per_min_15m=round(jobs_per_min(finished_at, started, 900, now), 2),
        eta_s=None if eta is None else round(eta, 1),
        jobs_waiting=waiting.jobs,
        waiting_by_model=dict(waiting.by_model),
        loads=scheduler.stats.loads,
        holds=scheduler.stats.holds,
        load_s_total=round(sum(f.load_s_total for f in figures.values()), 3),
        models={key: ModelView(**values) for key, values in models.items()},
        backends=backends,
    )
