"""``affinity`` (the default): keep the loaded model busy, switch as rarely as the bounds allow.

Keep each resident model's slots full while it has ready work. When a
backend has room (``max_loaded``), preload the model with the most pressing
work. When it is full, switch only when a resident model is idle (no ready
and no in-flight work), or when a task whose priority is above everything
the backend serves has waited ``max_wait_s`` (or any task has waited
``fair_wait_s``, if set): then the victim drains (its in-flight requests
finish), is unloaded, and the next model is loaded on its own so its load
time is measured.

A model that runs dry while work for it is on its way (a stage in flight
whose successor needs it, a retry in backoff, jobs being read from the inbox
or taken from the job store) is not idle yet: it keeps its slots for up to its
own load time (``hold_dry``). Switching away and back would cost two loads;
waiting costs at most one, which is the rent-or-buy rule.

``prefetch`` requests beyond the slots are kept waiting *at the server*
(Ollama queues them on the model's own semaphore, uncapped and outside
``OLLAMA_MAX_QUEUE``), so a slot that frees starts the next request at once
instead of after ihld's round trip; the server still runs at most ``slots``
at a time.
"""

from __future__ import annotations

from ihld.core.scheduler import Scheduler
from ihld.core.tasks import Action, BackendSlots, ModelState, Resident, Task, Unload


class Affinity:
    name = "affinity"
    pins_models = True  # explicit loads, and keep_alive while a model has work
    releases_early = True  # a slot serves the next request while an outcome is saved

    def __init__(self, scheduler: Scheduler) -> None:
        self.s = scheduler

    def queue_order(self, task: Task) -> float:
        return task.ready_at

    def wakeups(self, now: float) -> list[float]:
        """When a wait bound expires, or a load has taken long enough to be stalled."""
        times: list[float] = []
        for backend in self.s.backends.values():
            times.extend(
                r.since + self._stall_after(r.key)
                for r in backend.resident.values()
                if r.state is ModelState.LOADING
            )
            times.extend(
                r.dry_since + self.s.costs.load_s(r.key)
                for r in backend.resident.values()
                if r.dry_since is not None and self.s.hold_dry
            )
        for key, queue in self.s.queues.items():
            head = queue.peek()  # in affinity order the head is the oldest of its priority
            if head is not None:
                lead = max(
                    (self._switch_lead(b, key) for b in self.s.backends.values()), default=0.0
                )
                times.append(head.waiting_since + self.s.max_wait_s - lead)
                if self.s.fair_wait_s is not None:
                    times.append(head.ready_at + self.s.fair_wait_s)
        return times

    def _stall_after(self, key: str) -> float:
        """A load taking longer than this waits for the server to evict something.

        Ollama then blocks until the victim's in-flight requests finish, and each
        new request for the victim resets its timer (ollama #14578, #17408).
        """
        return 2 * self.s.costs.load_s(key) + 5.0

    def plan(self, backend: BackendSlots, now: float, actions: list[Action]) -> None:
        for resident in list(backend.resident.values()):
            if resident.state is ModelState.DRAINING and resident.inflight == 0:
                resident.state = ModelState.UNLOADING
                self.s.stats.unloads += 1
                actions.append(Unload(backend.name, resident.key, resident.model))
        self._mark_dry(backend, now)
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
            queue = self.s.queues.get(resident.key)
            slots = backend.slots_for(resident)
            while queue is not None and len(queue) and resident.inflight < slots:
                head = queue.peek()
                if head is not None and self._holding_for(backend, head, now):
                    break
                self.s.dispatch(backend, queue, actions)
            # Prefetch only work at least as urgent as what runs: an urgent job's next
            # stage (elsewhere) must not wait behind a prefetched batch request.
            depth = slots + self.s.prefetch
            while queue is not None and len(queue) and resident.inflight < depth:
                head = queue.peek()
                if head is None or head.priority < self._top_inflight(backend, resident.key):
                    break
                if not self.s.prefetch_ok(head) or self._holding_for(backend, head, now):
                    break
                self.s.dispatch(backend, queue, actions)

    def _mark_dry(self, backend: BackendSlots, now: float) -> None:
        """Note when each loaded model ran dry: idle, nothing queued. ``_victim`` gives up only
        dry models (unless forced), and ``_held`` counts from that moment."""
        for resident in backend.resident.values():
            queue = self.s.queues.get(resident.key)
            dry = resident.state is ModelState.LOADED and resident.idle and not queue
            if not dry:
                resident.dry_since = None
                resident.held = False
            elif resident.dry_since is None:
                resident.dry_since = now

    def _held(self, resident: Resident, now: float) -> bool:
        """Does a dry model keep its slots: work for it is on its way, it ran dry less than
        its load time ago, and no other model's work has waited ``max_wait_s``? Each dry
        spell that kept a model from a switch counts once in ``stats.holds``."""
        if not self.s.hold_dry or resident.dry_since is None:
            return False
        if now >= resident.dry_since + self.s.costs.load_s(resident.key):
            return False
        if any(
            (head := queue.peek()) is not None and now - head.waiting_since >= self.s.max_wait_s
            for queue in self.s.queues.values()
        ):
            return False
        if not self.s.work_coming(resident.key):
            return False
        if not resident.held:
            resident.held = True
            self.s.stats.holds += 1
        return True

    def _holding_for(self, backend: BackendSlots, head: Task, now: float) -> bool:
        """Keep slots free for an overdue job: one of its stages runs (or is being saved)
        here and its successor needs a model this backend does not hold. Feeding more
        of ``head``'s lower-priority work would only lengthen the drain before the
        switch that successor forces."""
        for task in self.s.inflight.values():
            if task.backend != backend.name or task.priority <= head.priority:
                continue
            missing = [key for key in task.successors if key not in backend.resident]
            if not missing:
                continue
            lead = min(self._switch_lead(backend, key) for key in missing)
            if now - task.waiting_since + lead >= self.s.max_wait_s:
                return True
        return False

    def _top_inflight(self, backend: BackendSlots, key: str) -> int:
        top = -(2**62)
        for task in self.s.inflight.values():
            if task.backend == backend.name and task.model_key == key and not task.released:
                top = max(top, task.priority)
        return top

    def _served_priority(self, backend: BackendSlots) -> int | None:
        """The best priority the backend's resident models have ready or in flight."""
        best: int | None = None
        for resident in backend.resident.values():
            head = self.s.queues.get(resident.key)
            top = head.peek() if head is not None else None
            if top is not None:
                best = top.priority if best is None else max(best, top.priority)
        for task in self.s.inflight.values():
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
        head = self.s.queues[key].peek()
        if head is None:
            return False
        if served is not None and head.priority > served:
            waited = now - head.waiting_since
            if waited + self._switch_lead(backend, key) >= self.s.max_wait_s:
                return True
        return self.s.fair_wait_s is not None and now - head.ready_at >= self.s.fair_wait_s

    def _switch_lead(self, backend: BackendSlots, key: str) -> float:
        """How long a switch to ``key`` takes on ``backend``: drain the busiest resident, load."""
        drain = 0.0
        for resident in backend.resident.values():
            if resident.key == key:
                return 0.0
            rounds = -(-(resident.inflight + resident.finishing) // backend.slots)
            drain = max(drain, rounds * self.s.costs.service_s(resident.key))
        return drain + self.s.costs.load_s(key)

    def _candidates(self, backend: BackendSlots, now: float) -> list[str]:
        """Models with ready work that this backend could load."""
        out = []
        for key, queue in self.s.queues.items():
            if not len(queue) or key in backend.resident:
                continue
            if not backend.serves(self.s.model_names[key]):
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
        for other in self.s.backends.values():
            if other is backend or not other.up:
                continue
            resident = other.resident.get(key)
            if resident is not None and resident.state in (ModelState.LOADING, ModelState.LOADED):
                drain_s = depth * self.s.costs.service_s(key) / other.slots
                return drain_s <= 2 * self.s.costs.load_s(key)
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
            queue = self.s.queues[key]
            head = queue.peek()
            assert head is not None
            work = len(queue) * self.s.costs.service_s(key) / backend.slots
            return (key in overdue, head.priority, work + (now - head.waiting_since))

        target = max(candidates, key=pressing)
        # One runner per model (Ollama's scheduler): another option set of the same model
        # must go before this one loads, whatever max_loaded says.
        sibling = next(
            (r for r in backend.resident.values() if r.model == self.s.model_names[target]), None
        )
        if sibling is None and len(backend.resident) < backend.max_loaded:
            self.s.load(backend, target, now, actions)
            return
        victim = self._victim(backend, now, target in overdue, only=sibling)
        if victim is None:
            return
        if target in overdue:
            self.s.stats.switches_forced += 1
        if victim.inflight == 0:
            victim.state = ModelState.UNLOADING
            self.s.stats.unloads += 1
            actions.append(Unload(backend.name, victim.key, victim.model))
        else:
            victim.state = ModelState.DRAINING

    def _victim(
        self, backend: BackendSlots, now: float, forced: bool, only: Resident | None = None
    ) -> Resident | None:
        """The resident model to give up: an idle one not held, or (forced) the least
        pressing."""
        loaded = [r for r in backend.resident.values() if r.state is ModelState.LOADED]
        if only is not None:
            loaded = [r for r in loaded if r is only]
        idle = [r for r in loaded if r.dry_since is not None and not self._held(r, now)]
        if idle:
            return min(idle, key=lambda r: r.since)
        if not forced or not loaded:
            return None

        def pressure(r: Resident) -> tuple[int, int]:
            queue = self.s.queues.get(r.key)
            head = queue.peek() if queue is not None else None
            return (head.priority if head else -(2**62), len(queue) if queue else 0)

        return min(loaded, key=pressure)
