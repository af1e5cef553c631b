"""The scheduler's vocabulary: tasks, the actions it answers with, per-backend slots and residency.

Plain data with no behaviour beyond bookkeeping; ``ihld.core.scheduler`` owns
the state machine that uses them.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
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
    prefix: str | None = None  # its prompt's long leading part, as a key (prompt-cache order)
    successors: frozenset[str] = frozenset()  # model keys of the stages that need this one

    @property
    def key(self) -> tuple[str, str]:
        return (self.job_id, self.stage)

    def again(self, now: float, *, attempt: int, not_before: float, setbacks: int) -> Task:
        """The same stage queued again (a retry or a setback), not yet dispatched."""
        return dataclasses.replace(
            self, ready_at=now, attempt=attempt, not_before=not_before, setbacks=setbacks,
            backend=None, released=False, demand=0,
        )  # fmt: skip

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
    dry_since: float | None = None  # loaded, idle and nothing queued since (the policy's mark)
    held: bool = False  # this dry spell kept the model from a switch (counted once)

    @property
    def idle(self) -> bool:
        return self.inflight == 0 and self.finishing == 0


class SlotPrompts:
    """What ihld believes a backend's slots hold: the prompt prefixes sent last.

    llama.cpp's server (and Ollama's runner, built on it) keeps each slot's KV
    cache and gives a request the idle slot whose cached prompt shares the
    longest prefix with it (llama.cpp ``server``: ``get_available_slot`` with
    ``--slot-prompt-similarity``; Ollama ``runner``: ``LoadCacheSlot``), so
    only the rest of the prompt is evaluated. Which slot holds what is not
    visible; ihld keeps the last ``slots`` distinct prefixes it dispatched per
    model (an LRU, one per slot) and how many of each are in flight.
    """

    def __init__(self) -> None:
        self.warm: OrderedDict[tuple[str, str], None] = OrderedDict()
        self.inflight: Counter[tuple[str, str]] = Counter()

    def score(self, task: Task) -> int:
        """Lower dispatches first: 0 a warm prefix no slot is working on (its slot is
        idle and holds it), 1 no shared prefix, 2 a cold prefix, 3 a prefix in flight
        (a second slot would evaluate it again)."""
        if task.prefix is None:
            return 1
        key = (task.model_key, task.prefix)
        if self.inflight[key]:
            return 3
        return 0 if key in self.warm else 2

    def dispatched(self, task: Task, slots: int) -> None:
        if task.prefix is None:
            return
        key = (task.model_key, task.prefix)
        self.inflight[key] += 1
        self.warm[key] = None
        self.warm.move_to_end(key)
        while len(self.warm) > max(1, slots):
            self.warm.popitem(last=False)

    def ended(self, task: Task) -> None:
        if task.prefix is None:
            return
        key = (task.model_key, task.prefix)
        self.inflight[key] -= 1
        if self.inflight[key] <= 0:
            del self.inflight[key]

    def forget(self, model_key: str) -> None:
        """The model left the server: its slots' caches went with it."""
        for key in [k for k in self.warm if k[0] == model_key]:
            del self.warm[key]


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
    prompts: SlotPrompts = field(default_factory=SlotPrompts)  # prompt prefixes its slots hold

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

    def stage_s(self, model_key: str, stage: str) -> float: ...


@dataclass(frozen=True)
class FixedCosts:
    load: float = 5.0
    service: float = 5.0

    def load_s(self, model_key: str) -> float:
        return self.load

    def service_s(self, model_key: str) -> float:
        return self.service

    def stage_s(self, model_key: str, stage: str) -> float:
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

    def pop_best(self, score: Callable[[Task], Any], window: int = 32) -> Task:
        """Of the first ``window`` tasks at the head's priority, the one ``score`` ranks
        lowest (oldest first among equals). The rest keep their places."""
        taken: list[tuple[int, float, int, Task]] = []
        while self._heap and len(taken) < window:
            entry = heapq.heappop(self._heap)
            if entry[2] in self._removed:
                self._removed.discard(entry[2])
                continue
            taken.append(entry)
        top = taken[0][0]
        best = min(range(len(taken)), key=lambda i: (taken[i][0] != top, score(taken[i][3]), i))
        chosen = taken.pop(best)
        for entry in taken:
            heapq.heappush(self._heap, entry)
        self._ids.pop(chosen[3].key, None)
        return chosen[3]

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
    holds: int = 0  # times a dry model kept its slots for work on its way (hold_dry)
