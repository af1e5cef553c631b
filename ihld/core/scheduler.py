"""The scheduler: which ready stage runs next, where, and when models switch.

A pure state machine with no I/O and no clock of its own, so the daemon,
the benchmarks' discrete-event runs and the property tests all drive the
same code. The daemon feeds it ready tasks and outcomes; ``next_actions``
answers with what to do now (dispatch a task, load or unload a model), and
the scheduler's view is updated as soon as it answers, so two calls never
hand out the same slot.

What runs next is a policy's decision (``ihld.core.policies``: ``affinity``, the
default, and ``fifo``, the baseline; plugins may add more). The scheduler
owns the state every policy reads: per-model ready queues, what is resident
where, what is in flight, retry backoff, and models no backend can serve.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from ihld.core.tasks import (
    Action,
    BackendSlots,
    Costs,
    Dispatch,
    Drop,
    FixedCosts,
    Load,
    ModelQueue,
    ModelState,
    Resident,
    SchedulerStats,
    Task,
    same_model,
)

# How long a model ihld unloaded may still be listed by the server (Ollama unloads once
# the model's in-flight requests end) without being taken for someone else's.
UNLOAD_GRACE_S = 30.0


class Policy(Protocol):
    """Decides, for one backend at a time, what to dispatch, load and unload.

    Made once per scheduler (``PolicyFactory``: the class, called with the
    scheduler); reads the scheduler's queues and residency and answers through
    ``Scheduler.dispatch`` / ``Scheduler.load`` and the actions list. Registered
    with the ``register_policies`` hook; ``ihld.core.policies`` has the built-ins.
    """

    name: str
    pins_models: bool  # loads explicitly and holds models with keep_alive while they have work
    releases_early: bool  # a slot serves the next request while an outcome is being saved

    def queue_order(self, task: Task) -> float:
        """Order within a model's queue, after priority (lower first)."""
        ...

    def plan(self, backend: BackendSlots, now: float, actions: list[Action]) -> None:
        """Append what ``backend`` should do now (the backend is up)."""
        ...

    def wakeups(self, now: float) -> list[float]:
        """Times to be asked again even if nothing happens (wait bounds)."""
        ...


PolicyFactory = Callable[["Scheduler"], Policy]


class Scheduler:
    """Per-model ready queues and the policy that drains them onto backends."""

    def __init__(
        self,
        backends: Iterable[BackendSlots],
        *,
        policy: PolicyFactory,
        max_wait_s: float = 600.0,
        fair_wait_s: float | None = None,
        fifo_workers: int = 1,
        costs: Costs | None = None,
        prefetch: int = 1,
        prompt_cache: bool = True,
        longest_first: bool = True,
        hold_dry: bool = True,
        arrivals: Callable[[], bool] = lambda: False,
    ) -> None:
        self.backends = {b.name: b for b in backends}
        self.costs: Costs = costs or FixedCosts()
        self.max_wait_s = max_wait_s
        self.fair_wait_s = fair_wait_s
        self.fifo_workers = fifo_workers
        self.prefetch = prefetch
        self.prompt_cache = prompt_cache  # order within a model's queue by slot prompt caches
        self.longest_first = longest_first  # a wave's tail: longest expected stages first
        self.hold_dry = hold_dry  # a dry model with work on its way keeps its slots a while
        # Jobs on their way in (files being read, the job store's next take), as the
        # daemon sees them. Their models are not known until they arrive.
        self.arrivals = arrivals
        self.queues: dict[str, ModelQueue] = {}
        self.model_names: dict[str, str] = {}
        self.model_options: dict[str, Mapping[str, Any]] = {}
        self.inflight: dict[tuple[str, str], Task] = {}
        self.stats = SchedulerStats()
        self._delayed: list[tuple[float, int, Task]] = []  # retry backoff
        self._delay_seq = itertools.count()
        self.policy: Policy = policy(self)

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
        queue.push(task, self.policy.queue_order(task))

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
        if task.released or self.inflight.get(task.key) is not task:
            return
        if not self.policy.releases_early:
            return
        task.released = True
        backend = self.backends.get(task.backend or "")
        if backend is None:
            return
        backend.prompts.ended(task)
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
        backend.prompts.ended(task)
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
        state.prompts.forget(model_key)
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
        times.extend(self.policy.wakeups(now))
        future = [t for t in times if t > now]
        return min(future) if future else None

    def work_coming(self, key: str) -> bool:
        """Is work for ``key`` about to become ready, though none is queued or running on it?

        A stage in flight anywhere whose successor needs it, a retry of its own
        waiting out its backoff, or jobs on their way in.
        """
        if any(key in task.successors for task in self.inflight.values()):
            return True
        if any(task.model_key == key for _, _, task in self._delayed):
            return True
        return self.arrivals()

    # -- decisions ----------------------------------------------------------------

    def next_actions(self, now: float) -> list[Action]:
        """What to do now; the scheduler's state already reflects the answer."""
        while self._delayed and self._delayed[0][0] <= now:
            self._enqueue(heapq.heappop(self._delayed)[2])
        actions: list[Action] = []
        self._drop_unservable(actions)
        for backend in self.backends.values():
            if backend.up:
                self.policy.plan(backend, now, actions)
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

    def dispatch(
        self,
        backend: BackendSlots,
        queue: ModelQueue,
        actions: list[Action],
        *,
        in_order: bool = False,
    ) -> None:
        """Send the head of ``queue`` to ``backend`` (a policy's decision).

        With ``prompt_cache``, the head's priority level is searched (a short window)
        for a request whose long prompt prefix a slot already holds and no other
        request of it is running: each slot works through one prefix group while the
        others serve other groups, instead of every slot evaluating every prefix.
        With ``longest_first``, the *tail* of a wave (at most two requests per slot
        left, and another model waiting for the switch that follows) goes longest
        expected stage first (learned per stage), so the slots finish together and the
        switch starts sooner.
        ``in_order``: the head, whatever the caches hold (``fifo``, the job-by-job baseline).
        """
        prompts = backend.prompts
        tail = (
            self.longest_first
            and not in_order
            and len(queue) <= 2 * backend.slots
            and any(len(q) for q in self.queues.values() if q is not queue)
        )
        if tail or (self.prompt_cache and not in_order):
            cache = self.prompt_cache

            def order(t: Task) -> tuple[int, float]:
                warmth = prompts.score(t) if cache else 0
                return warmth, -self.costs.stage_s(t.model_key, t.stage) if tail else 0.0

            task = queue.pop_best(order)
        else:
            task = queue.pop()
        prompts.dispatched(task, backend.slots)
        task.backend = backend.name
        self.inflight[task.key] = task
        backend.inflight += 1
        resident = backend.resident.get(task.model_key)
        if resident is not None:
            resident.inflight += 1
            task.demand = resident.inflight
        self.stats.dispatched += 1
        actions.append(Dispatch(task, backend.name))

    def prefetch_ok(self, task: Task) -> bool:
        """May ``task`` be sent beyond the slots, to wait at the server? Not one with a long
        prompt prefix under ``prompt_cache``: it would take whichever slot frees first and
        evict that slot's prefix, when waiting a moment keeps it on its own group's slot."""
        return not (self.prompt_cache and task.prefix is not None)

    def load(self, backend: BackendSlots, key: str, now: float, actions: list[Action]) -> None:
        """Load ``key`` on ``backend`` (a policy's decision): resident as LOADING from now."""
        model = self.model_names[key]
        backend.resident[key] = Resident(key, model, ModelState.LOADING, since=now)
        backend.load_retry_at.pop(key, None)
        self.stats.loads += 1
        actions.append(Load(backend.name, key, model, dict(self.model_options.get(key, {}))))

    def first_byte_s(self, model_key: str, slots: int, read_timeout_s: float) -> float:
        """How long a server may hold a request of ``model_key`` before its first byte.

        A request sent beyond the slots (prefetch) waits at the server for a slot,
        and a first request may wait for a load: ``read_timeout_s`` (meant for
        gaps between chunks) plus twice the learned load and the service of the
        requests ahead of it.
        """
        rounds = 1 + -(-self.prefetch // max(1, slots))
        ahead = self.costs.load_s(model_key) + rounds * self.costs.service_s(model_key)
        return read_timeout_s + 2 * ahead
