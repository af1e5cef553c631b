"""A discrete-event driver for the scheduler: virtual time, no I/O.

Jobs are DAGs of stages on models; a stage takes ``service`` virtual
seconds once dispatched on a loaded model, a load takes ``load_s``. The
driver records everything the invariants need.
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field

from ihld.core.policies import BUILTIN
from ihld.core.scheduler import Scheduler
from ihld.core.tasks import BackendSlots, Dispatch, FixedCosts, Load, ModelState, Task, Unload


@dataclass
class SimStage:
    name: str
    model: str
    needs: tuple[str, ...]
    service: float


@dataclass
class SimJob:
    id: str
    stages: list[SimStage]
    priority: int = 0
    arrival: float = 0.0


@dataclass
class Trace:
    dispatched: list[tuple[float, str, str, str, str]] = field(default_factory=list)
    finished: dict[tuple[str, str], float] = field(default_factory=dict)
    started: dict[tuple[str, str], float] = field(default_factory=dict)
    ready_at: dict[tuple[str, str], float] = field(default_factory=dict)
    loads: int = 0
    max_inflight: dict[tuple[str, str], int] = field(default_factory=dict)  # running at server
    max_outstanding: dict[tuple[str, str], int] = field(default_factory=dict)  # sent by ihld
    max_resident: dict[str, int] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    makespan: float = 0.0


def run(
    jobs: list[SimJob],
    backends: list[BackendSlots],
    *,
    policy: str = "affinity",
    load_s: float = 2.0,
    max_wait_s: float = 600.0,
    max_events: int = 200_000,
    prefetch: int = 1,
    service_estimate: float = 5.0,
) -> Trace:
    """Drive the scheduler; the server runs at most ``slots`` requests per model at once
    and queues the rest FIFO, as Ollama's per-model semaphore does."""
    sched = Scheduler(
        backends,
        policy=BUILTIN[policy],
        max_wait_s=max_wait_s,
        prefetch=prefetch,
        costs=FixedCosts(load=load_s, service=service_estimate),
    )
    slots = {b.name: b.slots for b in backends}
    trace = Trace()
    by_id = {job.id: job for job in jobs}
    done: dict[str, set[str]] = {job.id: set() for job in jobs}
    queued: dict[str, set[str]] = {job.id: set() for job in jobs}
    events: list[tuple[float, int, str, object]] = []
    seq = itertools.count()
    for job in jobs:
        heapq.heappush(events, (job.arrival, next(seq), "arrive", job.id))
    sent: set[tuple[str, str]] = set()
    outstanding: dict[tuple[str, str], int] = {}
    running: dict[tuple[str, str], int] = {}
    waiting: dict[tuple[str, str], list[tuple[Dispatch, float]]] = {}
    now = 0.0

    def start(action: Dispatch, service: float, key: tuple[str, str]) -> None:
        running[key] = running.get(key, 0) + 1
        trace.max_inflight[key] = max(trace.max_inflight.get(key, 0), running[key])
        trace.started[action.task.key] = now
        heapq.heappush(events, (now + service, next(seq), "finish", (action, key)))

    def enqueue_ready(job: SimJob) -> None:
        for stage in job.stages:
            if stage.name in done[job.id] or stage.name in queued[job.id]:
                continue
            if all(n in done[job.id] for n in stage.needs):
                queued[job.id].add(stage.name)
                trace.ready_at[(job.id, stage.name)] = now
                sched.add(
                    Task(
                        job.id,
                        stage.name,
                        stage.model,
                        stage.model,
                        priority=job.priority,
                        job_seq=jobs.index(job),
                        ready_at=now,
                        job_ready_at=job.arrival,
                    )
                )

    for _ in range(max_events):
        for action in sched.next_actions(now):
            if isinstance(action, Dispatch):
                task = action.task
                job = by_id[task.job_id]
                stage = next(s for s in job.stages if s.name == task.stage)
                key = (action.backend, task.model_key)
                if task.key in sent:
                    trace.violations.append(f"{task.key} dispatched twice")
                sent.add(task.key)
                if any(n not in done[job.id] for n in stage.needs):
                    trace.violations.append(f"{task.key} dispatched before its needs")
                resident = sched.backends[action.backend].resident.get(task.model_key)
                if policy == "affinity" and (
                    resident is None or resident.state is not ModelState.LOADED
                ):
                    trace.violations.append(f"{task.key} dispatched to a model not loaded")
                trace.dispatched.append((now, action.backend, task.model_key, *task.key))
                outstanding[key] = outstanding.get(key, 0) + 1
                trace.max_outstanding[key] = max(
                    trace.max_outstanding.get(key, 0), outstanding[key]
                )
                if running.get(key, 0) < slots[action.backend]:
                    start(action, stage.service, key)
                else:
                    waiting.setdefault(key, []).append((action, stage.service))
            elif isinstance(action, Load):
                trace.loads += 1
                heapq.heappush(events, (now + load_s, next(seq), "loaded", action))
            elif isinstance(action, Unload):
                heapq.heappush(events, (now, next(seq), "unloaded", action))
        for backend in sched.backends.values():
            count = len(backend.resident)
            trace.max_resident[backend.name] = max(trace.max_resident.get(backend.name, 0), count)
        if not events:
            break
        wake = sched.next_wakeup(now)
        if wake is not None and wake < events[0][0]:
            now = wake
            continue
        now, _, kind, payload = heapq.heappop(events)
        if kind == "arrive":
            enqueue_ready(by_id[str(payload)])
        elif kind == "finish":
            action, key = payload  # type: ignore[misc]
            task = action.task
            outstanding[key] -= 1
            running[key] -= 1
            if waiting.get(key):
                start(*waiting[key].pop(0), key)
            done[task.job_id].add(task.stage)
            trace.finished[task.key] = now
            enqueue_ready(by_id[task.job_id])
            sched.task_done(task)
        elif kind == "loaded":
            assert isinstance(payload, Load)
            sched.loaded(payload.backend, payload.model_key, now)
        elif kind == "unloaded":
            assert isinstance(payload, Unload)
            sched.unloaded(payload.backend, payload.model_key)
    trace.makespan = now
    return trace


def debate_jobs(n: int, service: float = 3.8) -> list[SimJob]:
    return [
        SimJob(
            f"j{i}",
            [
                SimStage("proposer", "qwen", (), service),
                SimStage("critic", "gemma", ("proposer",), service),
                SimStage("judge", "qwen", ("critic",), service),
            ],
        )
        for i in range(n)
    ]
