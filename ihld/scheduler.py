"""The scheduler: which ready stage runs next, where, and when models switch.

A pure state machine with no I/O and no clock of its own, so the daemon,
the benchmarks' discrete-event runs and the property tests all drive the
same code. The daemon feeds it ready tasks and outcomes; ``next_actions``
answers with what to do now (dispatch a task, load or unload a model), and
the scheduler's view is updated as soon as it answers, so two calls never
hand out the same slot.

Policies:

``affinity`` (default)
    Keep each resident model's slots full while it has ready work. When a
    backend has room (``max_loaded``), preload the model with the most
    pressing work. When it is full, switch only when a resident model is
    idle (no ready and no in-flight work), or when a task whose priority is
    above everything the backend serves has waited ``max_wait_s`` (or any
    task has waited ``fair_wait_s``, if set): then the victim drains (its
    in-flight requests finish), is unloaded, and the next model is loaded on
    its own so its load time is measured.

    ``prefetch`` requests beyond the slots are kept waiting *at the server*
    (Ollama queues them on the model's own semaphore, uncapped and outside
    ``OLLAMA_MAX_QUEUE``), so a slot that frees starts the next request at
    once instead of after ihld's round trip; the server still runs at most
    ``slots`` at a time.

``fifo``
    Job by job, stage by stage, ``fifo_workers`` at a time: the seed
    script's behaviour, kept as the baseline. No explicit loads; the server
    swaps models as requests arrive.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal, Protocol


@dataclass(eq=False)
class Task:
    """One stage of one job, ready to run."""

    job_id: str
    stage: str
    model_key: str  # the scheduler's model identity (model + runner options)
    model: str  # the model name sent to the server
    priority: int = 0
    job_seq: int = 0  # arrival order of the job (fifo order)
    ready_at: float = 0.0  # when it became ready (for waits)
    job_ready_at: float | None = None  # when its job arrived: the wait bound counts per job
    attempt: int = 1
    not_before: float = 0.0  # retry backoff: not dispatched before this time
    backend: str | None = None  # set when dispatched
    released: bool = False  # its request ended; the slot is free, the outcome not yet applied
    options: Mapping[str, Any] = field(default_factory=dict)  # runner options (sent with a load)
    setbacks: int = 0  # transient failures so far (their backoff grows; no attempt counted)
    demand: int = 0  # requests in flight on its model when it was dispatched (parallelism)

    @property
    def key(self) -> tuple[str, str]:
        return (self.job_id, self.stage)

    @property
    def waiting_since(self) -> float:
        """For the wait bound: since its job arrived, so a job's waits add up to one bound."""
        return self.ready_at if self.job_ready_at is None else min(self.ready_at, self.job_ready_at)


class ModelState(Enum):
    LOADING = "loading"
    LOADED = "loaded"
    DRAINING = "draining"  # no new work; unload when in-flight ends
    UNLOADING = "unloading"


@dataclass
class Resident:
    key: str
    model: str
    state: ModelState
    inflight: int = 0  # requests holding a slot
    finishing: int = 0  # requests ended whose outcome (and successors) is still being saved
    since: float = 0.0
    # Requests the server really runs at once, when it is fewer than the backend's
    # slots (llama.cpp's total_slots; Ollama forces 1 for some architectures).
    parallel: int | None = None
    foreign: bool = False  # loaded by someone else; seen in the server's list

    @property
    def idle(self) -> bool:
        return self.inflight == 0 and self.finishing == 0


@dataclass
class BackendSlots:
    """The scheduler's view of one backend."""

    name: str
    slots: int = 1
    max_loaded: int = 1
    models: frozenset[str] | None = None  # allow-list of model names; None = any
    up: bool = True
    resident: dict[str, Resident] = field(default_factory=dict)
    inflight: int = 0  # all requests in flight on this backend
    # model -> (kind, message): why this server cannot serve it
    missing: dict[str, tuple[str, str]] = field(default_factory=dict)
    load_failures: dict[str, int] = field(default_factory=dict)  # model key -> failures in a row
    load_retry_at: dict[str, float] = field(default_factory=dict)  # model key -> no load before
    unloaded_at: dict[str, float] = field(default_factory=dict)  # model -> when ihld unloaded it

    def serves(self, model: str) -> bool:
        return (self.models is None or model in self.models) and model not in self.missing

    def slots_for(self, resident: Resident) -> int:
        return min(self.slots, resident.parallel or self.slots)


@dataclass(frozen=True)
class Dispatch:
    task: Task
    backend: str
    kind: Literal["dispatch"] = "dispatch"


@dataclass(frozen=True)
class Load:
    backend: str
    model_key: str
    model: str
    options: Mapping[str, Any] = field(default_factory=dict)  # runner options, as stages send
    kind: Literal["load"] = "load"


@dataclass(frozen=True)
class Unload:
    backend: str
    model_key: str
    model: str
    kind: Literal["unload"] = "unload"


@dataclass(frozen=True)
class Drop:
    """No backend can serve the task's model: its job must fail (``why``: kind, message)."""

    task: Task
    why: tuple[str, str]
    kind: Literal["drop"] = "drop"


Action = Dispatch | Load | Unload | Drop

# How long a model ihld unloaded may still be listed by the server (Ollama unloads once
# the model's in-flight requests end) without being taken for someone else's.
UNLOAD_GRACE_S = 30.0


def same_model(a: str, b: str) -> bool:
    """One model name as servers list it: case-insensitive, ``:latest`` by default."""

    def norm(name: str) -> str:
        name = name.strip().lower()
        return name if ":" in name.rsplit("/", 1)[-1] else name + ":latest"

    return norm(a) == norm(b)


class Costs(Protocol):
    """What a switch costs and what a model's work is worth, in seconds.

    The daemon answers from Ollama's own figures (learned load times and
    stage times); tests and the discrete-event harness use fixed figures.
    """

    def load_s(self, model_key: str) -> float: ...

    def service_s(self, model_key: str) -> float: ...


@dataclass(frozen=True)
class FixedCosts:
    load: float = 5.0
    service: float = 5.0

    def load_s(self, model_key: str) -> float:
        return self.load

    def service_s(self, model_key: str) -> float:
        return self.service


class ModelQueue:
    """Ready tasks of one model: highest priority first, then oldest."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, float, int, Task]] = []
        self._count = itertools.count()
        self._removed: set[int] = set()
        self._ids: dict[tuple[str, str], int] = {}

    def push(self, task: Task, order: float) -> None:
        n = next(self._count)
        self._ids[task.key] = n
        heapq.heappush(self._heap, (-task.priority, order, n, task))

    def _prune(self) -> None:
        while self._heap and self._heap[0][2] in self._removed:
            self._removed.discard(heapq.heappop(self._heap)[2])

    def peek(self) -> Task | None:
        self._prune()
        return self._heap[0][3] if self._heap else None

    def pop(self) -> Task:
        self._prune()
        task = heapq.heappop(self._heap)[3]
        self._ids.pop(task.key, None)
        return task

    def remove(self, key: tuple[str, str]) -> bool:
        n = self._ids.pop(key, None)
        if n is None:
            return False
        self._removed.add(n)
        return True

    def __len__(self) -> int:
        return len(self._ids)


@dataclass
class SchedulerStats:
    dispatched: int = 0
    loads: int = 0
    unloads: int = 0
    switches_forced: int = 0  # switches made because of the wait bound


class Scheduler:
    """Per-model ready queues and the policy that drains them onto backends."""

    def __init__(
        self,
        backends: Iterable[BackendSlots],
        *,
        policy: Literal["affinity", "fifo"] = "affinity",
        max_wait_s: float = 600.0,
        fair_wait_s: float | None = None,
        fifo_workers: int = 1,
        costs: Costs | None = None,
        prefetch: int = 1,
    ) -> None:
        self.backends = {b.name: b for b in backends}
        self.costs: Costs = costs or FixedCosts()
        self.policy = policy
        self.max_wait_s = max_wait_s
        self.fair_wait_s = fair_wait_s
        self.fifo_workers = fifo_workers
        self.prefetch = prefetch
        self.queues: dict[str, ModelQueue] = {}
        self.model_names: dict[str, str] = {}
        self.model_options: dict[str, Mapping[str, Any]] = {}
        self.inflight: dict[tuple[str, str], Task] = {}
        self.stats = SchedulerStats()
        self._delayed: list[tuple[float, int, Task]] = []  # retry backoff
        self._delay_seq = itertools.count()

    # -- input ----------------------------------------------------------------

    def add(self, task: Task) -> None:
        """A task became ready (or is back after a failed attempt)."""
        if task.not_before > task.ready_at:
            heapq.heappush(self._delayed, (task.not_before, next(self._delay_seq), task))
            return
        self._enqueue(task)

    def _enqueue(self, task: Task) -> None:
        queue = self.queues.get(task.model_key)
        if queue is None:
            queue = self.queues[task.model_key] = ModelQueue()
            self.model_names[task.model_key] = task.model
            self.model_options[task.model_key] = task.options
        order = float(task.job_seq) if self.policy == "fifo" else task.ready_at
        queue.push(task, order)

    def cancel_job(self, job_id: str, stages: Iterable[str]) -> None:
        """Forget a job's queued tasks (deadline passed, job failed)."""
        for stage in stages:
            for queue in self.queues.values():
                queue.remove((job_id, stage))
        self._delayed = [d for d in self._delayed if d[2].job_id != job_id]
        heapq.heapify(self._delayed)

    def release(self, task: Task) -> None:
        """The task's request ended: free its slot while its outcome is being saved.

        The model still counts as busy (``finishing``) until ``task_done``, so a
        successor stage on the same model arrives before any switch is
        considered. Under ``fifo`` the worker stays taken: job by job means the
        next job waits for this one's checkpoint.
        """
        if task.released or self.policy == "fifo" or self.inflight.get(task.key) is not task:
            return
        task.released = True
        backend = self.backends.get(task.backend or "")
        if backend is None:
            return
        backend.inflight = max(0, backend.inflight - 1)
        resident = backend.resident.get(task.model_key)
        if resident is not None:
            resident.inflight = max(0, resident.inflight - 1)
            resident.finishing += 1

    def task_done(self, task: Task) -> None:
        """A dispatched task ended (finished, failed or to be retried): forget it. Idempotent."""
        if self.inflight.get(task.key) is not task:
            return
        del self.inflight[task.key]
        backend = self.backends.get(task.backend or "")
        if backend is None:
            return
        resident = backend.resident.get(task.model_key)
        if task.released:
            if resident is not None:
                resident.finishing = max(0, resident.finishing - 1)
            return
        backend.inflight = max(0, backend.inflight - 1)
        if resident is not None:
            resident.inflight = max(0, resident.inflight - 1)

    def loaded(
        self, backend: str, model_key: str, now: float, *, parallel: int | None = None
    ) -> None:
        state = self.backends[backend]
        state.load_failures.pop(model_key, None)
        resident = state.resident.get(model_key)
        if resident is not None and resident.state is ModelState.LOADING:
            resident.state = ModelState.LOADED
            resident.since = now
            if parallel is not None and parallel < state.slots:
                resident.parallel = max(1, parallel)

    def load_failed(self, backend: str, model_key: str, *, retry_at: float) -> int:
        """A load failed; no new load of it here before ``retry_at``. Returns failures in a row."""
        state = self.backends[backend]
        state.resident.pop(model_key, None)
        state.load_retry_at[model_key] = retry_at
        state.load_failures[model_key] = state.load_failures.get(model_key, 0) + 1
        return state.load_failures[model_key]

    def unloaded(self, backend: str, model_key: str, now: float = 0.0) -> None:
        state = self.backends[backend]
        resident = state.resident.pop(model_key, None)
        if resident is not None:
            state.unloaded_at[resident.model] = now

    def model_missing(self, backend: str, model_key: str, kind: str, message: str) -> None:
        """The backend cannot serve this model (``kind``, ``message``: the server's answer).

        Its queued tasks go elsewhere; where no backend can serve the model,
        ``next_actions`` answers them with ``Drop``: every one fails at once.
        """
        model = self.model_names.get(model_key, model_key)
        self.backends[backend].missing[model] = (kind, message)
        self.backends[backend].resident.pop(model_key, None)

    def parallel_seen(self, backend: str, model_key: str, parallel: int | None) -> None:
        """The real parallelism observed for a resident model (None: as many as slots)."""
        resident = self.backends[backend].resident.get(model_key)
        if resident is not None:
            resident.parallel = parallel

    def reconcile(self, backend: str, listed: Iterable[str], asked_at: float) -> list[str]:
        """Align residency with what the server lists now (Ollama's /api/ps, the router's /models).

        A model loaded before ``asked_at`` that the server no longer lists was dropped
        by it (keep_alive expiry, memory, another client, a restart): it is no longer
        counted resident once idle. A listed model ihld did not load is someone
        else's: it takes room, and it serves our work if the names match. Returns
        the models dropped.
        """
        state = self.backends[backend]
        names = list(listed)
        dropped = []
        for key, resident in list(state.resident.items()):
            gone = not any(same_model(resident.model, name) for name in names)
            loaded_before = resident.state is ModelState.LOADED and resident.since <= asked_at
            if gone and loaded_before and (resident.idle or resident.foreign):
                del state.resident[key]
                dropped.append(resident.model)
        for name in names:
            if any(same_model(r.model, name) for r in state.resident.values()):
                continue
            if any(
                same_model(m, name) and asked_at - at < UNLOAD_GRACE_S
                for m, at in state.unloaded_at.items()
            ):
                continue  # ours, still unloading
            # Someone else's model serves our stages of it (same name, no runner options).
            key = next(
                (k for k, m in self.model_names.items() if k == m and same_model(m, name)), name
            )
            model = self.model_names.get(key, name)
            state.resident[key] = Resident(
                key, model, ModelState.LOADED, since=asked_at, foreign=True
            )
        return dropped

    def backend_down(self, backend: str) -> None:
        """The backend is unreachable: forget what it holds; nothing is sent until it is up."""
        state = self.backends[backend]
        state.up = False
        state.resident.clear()

    def backend_up(self, backend: str) -> None:
        self.backends[backend].up = True

    # -- views ------------------------------------------------------------------

    def ready_count(self) -> int:
        return sum(len(q) for q in self.queues.values()) + len(self._delayed)

    def queue_depths(self) -> dict[str, int]:
        return {key: len(q) for key, q in self.queues.items() if len(q)}

    def next_wakeup(self, now: float) -> float | None:
        """When to ask again even if nothing happens (backoff ends, a wait bound expires)."""
        times = [self._delayed[0][0]] if self._delayed else []
        for backend in self.backends.values():
            times.extend(backend.load_retry_at.values())
            times.extend(
                r.since + self._stall_after(r.key)
                for r in backend.resident.values()
                if r.state is ModelState.LOADING
            )
        if self.policy == "affinity":
            for key, queue in self.queues.items():
                head = queue.peek()  # in affinity order the head is the oldest of its priority
                if head is not None:
                    lead = max(
                        (self._switch_lead(b, key) for b in self.backends.values()), default=0.0
                    )
                    times.append(head.waiting_since + self.max_wait_s - lead)
                    if self.fair_wait_s is not None:
                        times.append(head.ready_at + self.fair_wait_s)
        future = [t for t in times if t > now]
        return min(future) if future else None

    # -- decisions ----------------------------------------------------------------

    def next_actions(self, now: float) -> list[Action]:
        """What to do now; the scheduler's state already reflects the answer."""
        while self._delayed and self._delayed[0][0] <= now:
            self._enqueue(heapq.heappop(self._delayed)[2])
        actions: list[Action] = []
        self._drop_unservable(actions)
        for backend in self.backends.values():
            if not backend.up:
                continue
            if self.policy == "fifo":
                self._fifo(backend, actions)
            else:
                self._affinity(backend, now, actions)
        return actions

    def _drop_unservable(self, actions: list[Action]) -> None:
        """Answer every queued task of a model no backend can serve with ``Drop``."""
        for key in list(self.queues):
            model = self.model_names[key]
            if any(b.serves(model) for b in self.backends.values()):
                continue
            reasons = [b.missing[model] for b in self.backends.values() if model in b.missing]
            if reasons:
                why = (reasons[0][0], "; ".join(message for _, message in reasons))
            else:
                allowed = {b.name: sorted(b.models or ()) for b in self.backends.values()}
                why = ("model_not_allowed", f"no backend serves {model!r} (models: {allowed})")
            queue = self.queues.pop(key)
            while len(queue):
                actions.append(Drop(queue.pop(), why))

    def _stall_after(self, key: str) -> float:
        """A load taking longer than this waits for the server to evict something.

        Ollama then blocks until the victim's in-flight requests finish, and each
        new request for the victim resets its timer (ollama #14578, #17408).
        """
        return 2 * self.costs.load_s(key) + 5.0

    def _dispatch(self, backend: BackendSlots, queue: ModelQueue, actions: list[Action]) -> None:
        task = queue.pop()
        task.backend = backend.name
        self.inflight[task.key] = task
        backend.inflight += 1
        resident = backend.resident.get(task.model_key)
        if resident is not None:
            resident.inflight += 1
            task.demand = resident.inflight
        self.stats.dispatched += 1
        actions.append(Dispatch(task, backend.name))

    def _fifo(self, backend: BackendSlots, actions: list[Action]) -> None:
        while backend.inflight < self.fifo_workers:
            best: tuple[int, float, str] | None = None
            for key, queue in self.queues.items():
                head = queue.peek()
                if head is None or not backend.serves(head.model):
                    continue
                candidate = (-head.priority, float(head.job_seq), key)
                if best is None or candidate < best:
                    best = candidate
            if best is None:
                return
            self._dispatch(backend, self.queues[best[2]], actions)

    def _affinity(self, backend: BackendSlots, now: float, actions: list[Action]) -> None:
        for resident in list(backend.resident.values()):
            if resident.state is ModelState.DRAINING and resident.inflight == 0:
                resident.state = ModelState.UNLOADING
                self.stats.unloads += 1
                actions.append(Unload(backend.name, resident.key, resident.model))
        self._plan_switch(backend, now, actions)
        # A load that outlasts its expected time is waiting for the server to evict a
        # resident model: feeding that model would keep the server from ever evicting it.
        stalled = any(
            r.state is ModelState.LOADING and now - r.since >= self._stall_after(r.key)
            for r in backend.resident.values()
        )
        for resident in backend.resident.values():
            if resident.state is not ModelState.LOADED or stalled:
                continue
            queue = self.queues.get(resident.key)
            slots = backend.slots_for(resident)
            while queue is not None and len(queue) and resident.inflight < slots:
                self._dispatch(backend, queue, actions)
            # Prefetch only work at least as urgent as what runs: an urgent job's next
            # stage (elsewhere) must not wait behind a prefetched batch request.
            depth = slots + self.prefetch
            while queue is not None and len(queue) and resident.inflight < depth:
                head = queue.peek()
                if head is None or head.priority < self._top_inflight(backend, resident.key):
                    break
                self._dispatch(backend, queue, actions)

    def _top_inflight(self, backend: BackendSlots, key: str) -> int:
        top = -(2**62)
        for task in self.inflight.values():
            if task.backend == backend.name and task.model_key == key and not task.released:
                top = max(top, task.priority)
        return top

    def _served_priority(self, backend: BackendSlots) -> int | None:
        """The best priority the backend's resident models have ready or in flight."""
        best: int | None = None
        for resident in backend.resident.values():
            head = self.queues.get(resident.key)
            top = head.peek() if head is not None else None
            if top is not None:
                best = top.priority if best is None else max(best, top.priority)
        for task in self.inflight.values():
            if task.backend == backend.name:
                best = task.priority if best is None else max(best, task.priority)
        return best

    def _overdue(self, key: str, backend: BackendSlots, served: int | None, now: float) -> bool:
        """Must the backend switch to ``key`` now to keep its wait bound?

        Work of higher priority than what the backend serves may wait
        ``max_wait_s`` from its job's arrival, *including* the switch itself
        (draining what the backend has outstanding, then the load), so the
        switch starts that much earlier.
        """
        head = self.queues[key].peek()
        if head is None:
            return False
        if served is not None and head.priority > served:
            waited = now - head.waiting_since
            if waited + self._switch_lead(backend, key) >= self.max_wait_s:
                return True
        return self.fair_wait_s is not None and now - head.ready_at >= self.fair_wait_s

    def _switch_lead(self, backend: BackendSlots, key: str) -> float:
        """How long a switch to ``key`` takes on ``backend``: drain the busiest resident, load."""
        drain = 0.0
        for resident in backend.resident.values():
            if resident.key == key:
                return 0.0
            rounds = -(-(resident.inflight + resident.finishing) // backend.slots)
            drain = max(drain, rounds * self.costs.service_s(resident.key))
        return drain + self.costs.load_s(key)

    def _candidates(self, backend: BackendSlots, now: float) -> list[str]:
        """Models with ready work that this backend could load."""
        out = []
        for key, queue in self.queues.items():
            if not len(queue) or key in backend.resident:
                continue
            if not backend.serves(self.model_names[key]):
                continue
            if backend.load_retry_at.get(key, 0.0) > now:
                continue  # a failed load backs off
            if self._held_elsewhere(key, backend, len(queue)):
                continue
            out.append(key)
        return out

    def _held_elsewhere(self, key: str, backend: BackendSlots, depth: int) -> bool:
        """True if another backend serves this model and splitting its queue would not pay.

        Loading the model here too pays when the queue would keep the other
        backend busy for longer than a load takes here (twice, for margin).
        """
        for other in self.backends.values():
            if other is backend or not other.up:
                continue
            resident = other.resident.get(key)
            if resident is not None and resident.state in (ModelState.LOADING, ModelState.LOADED):
                drain_s = depth * self.costs.service_s(key) / other.slots
                return drain_s <= 2 * self.costs.load_s(key)
        return False

    def _plan_switch(self, backend: BackendSlots, now: float, actions: list[Action]) -> None:
        candidates = self._candidates(backend, now)
        if not candidates:
            return
        if (
            any(
                r.state in (ModelState.DRAINING, ModelState.UNLOADING, ModelState.LOADING)
                for r in backend.resident.values()
            )
            and len(backend.resident) >= backend.max_loaded
        ):
            return  # a switch is already under way
        served = self._served_priority(backend)
        overdue = {k for k in candidates if self._overdue(k, backend, served, now)}

        def pressing(key: str) -> tuple[bool, int, float]:
            """Overdue first, then priority, then waiting plus ready work, in seconds.

            Ready work amortises the load; the oldest task's wait keeps a
            small queue from being passed over for ever by a growing one.
            """
            queue = self.queues[key]
            head = queue.peek()
            assert head is not None
            work = len(queue) * self.costs.service_s(key) / backend.slots
            return (key in overdue, head.priority, work + (now - head.waiting_since))

        target = max(candidates, key=pressing)
        # One runner per model (Ollama's scheduler): another option set of the same model
        # must go before this one loads, whatever max_loaded says.
        sibling = next(
            (r for r in backend.resident.values() if r.model == self.model_names[target]), None
        )
        if sibling is None and len(backend.resident) < backend.max_loaded:
            self._load(backend, target, now, actions)
            return
        victim = self._victim(backend, target in overdue, only=sibling)
        if victim is None:
            return
        if target in overdue:
            self.stats.switches_forced += 1
        if victim.inflight == 0:
            victim.state = ModelState.UNLOADING
            self.stats.unloads += 1
            actions.append(Unload(backend.name, victim.key, victim.model))
        else:
            victim.state = ModelState.DRAINING

    def _victim(
        self, backend: BackendSlots, forced: bool, only: Resident | None = None
    ) -> Resident | None:
        """The resident model to give up: an idle one, or (forced) the least pressing."""
        loaded = [r for r in backend.resident.values() if r.state is ModelState.LOADED]
        if only is not None:
            loaded = [r for r in loaded if r is only]
        idle = [r for r in loaded if r.idle and not len(self.queues.get(r.key) or ())]
        if idle:
            return min(idle, key=lambda r: r.since)
        if not forced or not loaded:
            return None

        def pressure(r: Resident) -> tuple[int, int]:
            queue = self.queues.get(r.key)
            head = queue.peek() if queue is not None else None
            return (head.priority if head else -(2**62), len(queue) if queue else 0)

        return min(loaded, key=pressure)

    def _load(self, backend: BackendSlots, key: str, now: float, actions: list[Action]) -> None:
        model = self.model_names[key]
        backend.resident[key] = Resident(key, model, ModelState.LOADING, since=now)
        backend.load_retry_at.pop(key, None)
        self.stats.loads += 1
        actions.append(Load(backend.name, key, model, dict(self.model_options.get(key, {}))))
