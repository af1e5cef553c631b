"""A makespan no schedule can beat, on the simulator's own cost model.

Why a bound and not a baseline: "affinity is 1.6x faster than fifo" says
nothing about how much is left. A lower bound does: at 1.02 x the bound
there is at most 2 % to gain by any scheduler, however clever.

Every term below is a valid lower bound on its own; the bound is their
maximum (``benchmarks/README.md`` has the formulas with a worked example).
The facts of the simulator they rest on (``ihld/sim``):

* a model serves requests only while resident, after its load; a load of
  ``load_s`` seconds happens each time it becomes resident; the server
  starts empty;
* two models *conflict* when they can never be resident together
  (``max_loaded`` = 1, or their sizes do not fit in VRAM together); the
  resident (or loading) intervals of conflicting models are disjoint;
* models that fit together run side by side at full speed each: the
  simulator does **not** share GPU throughput across resident models, so
  the bound does not either;
* one model with ``k`` requests holding slots: a request in its prompt
  phase progresses at full speed whatever ``k`` (prompt evaluation is not
  slowed by other streams), and each decoding stream at
  ``throughput[k-1] / k`` of its single-stream rate. The set of achievable
  (prompt-seconds, decode-seconds) per second is the convex hull of
  ``(j, (k - j) * throughput[k-1] / k)`` for ``0 <= j <= k <= slots``; the
  least busy time for a model's work is the gauge of that polygon at
  (total prompt seconds, total decode seconds). With one slot this is just
  the sum of the stages' one-slot times; with the llama.cpp curve and 4
  slots it is ``P / 4 + D / 1.79``.
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from ihld.bench.costs import JobCost, StageCost
from ihld.sim.profiles import ModelSpec, Profile

_EPS = 1e-12


@dataclass(frozen=True)
class Server:
    """The backend as the simulator enforces it: model costs, slots, residency limits."""

    specs: Mapping[str, ModelSpec]
    slots: int = 1
    max_loaded: int = 1
    vram_bytes: int = 0

    @classmethod
    def from_profile(cls, profile: Profile) -> Server:
        return cls(
            {m.name: m for m in profile.models},
            slots=profile.slots,
            max_loaded=profile.max_loaded,
            vram_bytes=profile.vram_bytes,
        )

    def spec(self, model: str) -> ModelSpec:
        return self.specs[model]

    def load_s(self, model: str) -> float:
        return self.specs[model].load_s

    def size_vram(self, model: str) -> int:
        size = self.specs[model].size_bytes
        return size if self.vram_bytes <= 0 else min(size, self.vram_bytes)

    def conflict(self, a: str, b: str) -> bool:
        """True if ``a`` and ``b`` can never be resident (or loading) at the same time."""
        if a == b:
            return False
        if self.max_loaded <= 1:
            return True
        return self.vram_bytes > 0 and self.size_vram(a) + self.size_vram(b) > self.vram_bytes


# --- one model's busy time ---------------------------------------------------------


def _hull(points: Iterable[tuple[float, float]]) -> list[tuple[float, float]]:
    """Convex hull, counter-clockwise (Andrew's monotone chain)."""
    pts = sorted(set(points))
    if len(pts) <= 2:
        return pts

    def cross(o: tuple[float, float], a: tuple[float, float], b: tuple[float, float]) -> float:
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower: list[tuple[float, float]] = []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    upper: list[tuple[float, float]] = []
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    return lower[:-1] + upper[:-1]


def rate_facets(spec: ModelSpec, slots: int) -> list[tuple[float, float]]:
    """The outer facets ``a x + b y <= 1`` of the model's achievable-rate polygon.

    x is prompt-seconds of one-slot work done per second, y decode-seconds.
    """
    points: list[tuple[float, float]] = [(0.0, 0.0)]
    for k in range(1, max(1, slots) + 1):
        per_stream = spec.speedup(k) / k
        for j in range(k + 1):
            x, y = float(j), (k - j) * per_stream
            points += [(x, y), (x, 0.0), (0.0, y)]  # doing less is always possible
    hull = _hull(points)
    facets = []
    for p, q in itertools.pairwise([*hull, hull[0]]):
        a, b = q[1] - p[1], p[0] - q[0]  # outward normal of a counter-clockwise edge
        offset = a * p[0] + b * p[1]
        if offset > _EPS and a >= -_EPS and b >= -_EPS:
            facets.append((max(a, 0.0) / offset, max(b, 0.0) / offset))
    return facets


def busy_s(prompt_s: float, decode_s: float, spec: ModelSpec, slots: int) -> float:
    """The least time one resident model needs for this much prompt and decode work."""
    if prompt_s <= 0 and decode_s <= 0:
        return 0.0
    return max(a * prompt_s + b * decode_s for a, b in rate_facets(spec, slots))


def stage_min_s(stage: StageCost, spec: ModelSpec, slots: int) -> float:
    """The least time one stage takes: its prompt, and its decode at the best per-stream speed."""
    best = max(spec.speedup(k) / k for k in range(1, max(1, slots) + 1))
    return stage.prompt_s + stage.decode_s / best


# --- the bound -----------------------------------------------------------------------


@dataclass(frozen=True)
class Bound:
    """The bound, every term that went into it, and which one binds."""

    makespan_s: float
    terms: dict[str, float] = field(default_factory=dict)
    busy_s: dict[str, float] = field(default_factory=dict)  # per model, all work

    @property
    def binding(self) -> str:
        return max(self.terms, key=lambda k: self.terms[k]) if self.terms else ""


def critical_path_s(job: JobCost, server: Server) -> float:
    """Release + the job's longest chain, with a load wherever a stage follows a conflicting one.

    Every model must be loaded once from an empty server, so no stage
    starts before its model's load time either.
    """
    finish: dict[str, float] = {}
    for stage in job.stages:
        start = max(job.arrival_s, server.load_s(stage.model))
        for need in stage.needs:
            prev = next(s for s in job.stages if s.name == need)
            gap = server.load_s(stage.model) if server.conflict(prev.model, stage.model) else 0.0
            start = max(start, finish[need] + gap)
        finish[stage.name] = start + stage_min_s(stage, server.spec(stage.model), server.slots)
    return max(finish.values(), default=job.arrival_s)


def path_loads_s(job: JobCost, clique: frozenset[str], server: Server) -> float:
    """The most load time any one path of the job forces on a clique of conflicting models.

    Along a path, each change between two clique models is a load (the
    earlier one had to leave first), so a model that comes back is loaded
    again: a qwen -> gemma -> qwen chain costs two qwen loads and one gemma load.
    """
    # per stage: {last clique model on the path (or None): most load seconds}
    best: dict[str, dict[str | None, float]] = {}
    top = 0.0
    for stage in job.stages:
        incoming: dict[str | None, float] = {}
        for need in stage.needs or ():
            for last, value in best[need].items():
                incoming[last] = max(incoming.get(last, 0.0), value)
        if not stage.needs:
            incoming = {None: 0.0}
        out: dict[str | None, float] = {}
        for last, value in incoming.items():
            if stage.model in clique:
                extra = 0.0 if last == stage.model else server.load_s(stage.model)
                key: str | None = stage.model
            else:
                extra, key = 0.0, last
            out[key] = max(out.get(key, 0.0), value + extra)
        best[stage.name] = out
        top = max(top, *out.values())
    return top


def _cliques(models: Sequence[str], server: Server) -> list[frozenset[str]]:
    """Maximal sets of pairwise conflicting models (few models: try every subset)."""
    if len(models) > 12:
        return [frozenset([m]) for m in models]
    found: list[frozenset[str]] = []
    for size in range(len(models), 0, -1):
        for combo in itertools.combinations(models, size):
            group = frozenset(combo)
            if any(group <= f for f in found):
                continue
            if all(server.conflict(a, b) for a, b in itertools.combinations(combo, 2)):
                found.append(group)
    return found


def _work(jobs: Iterable[JobCost]) -> dict[str, tuple[float, float]]:
    """Per model: (prompt seconds, decode seconds) at one slot."""
    work: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for job in jobs:
        for stage in job.stages:
            work[stage.model][0] += stage.prompt_s
            work[stage.model][1] += stage.decode_s
    return {m: (p, d) for m, (p, d) in work.items()}


def _label(group: Iterable[str]) -> str:
    return "+".join(sorted(group))


def lower_bound(jobs: Sequence[JobCost], server: Server) -> Bound:
    """The largest of the valid bounds below, in simulated seconds."""
    if not jobs:
        return Bound(0.0)
    work = _work(jobs)
    models = sorted(work)
    busy = {m: busy_s(*work[m], server.spec(m), server.slots) for m in models}
    resident = {m: server.load_s(m) + busy[m] for m in models}  # each model: >= 1 load + its work
    terms: dict[str, float] = {
        "critical_path": max(critical_path_s(job, server) for job in jobs),
        # At most max_loaded models resident at once, and their sizes within VRAM.
        "residency": sum(resident.values()) / max(1, server.max_loaded),
    }
    if server.vram_bytes > 0:
        terms["vram"] = sum(server.size_vram(m) * resident[m] for m in models) / server.vram_bytes
    for clique in _cliques(models, server):
        # Conflicting models are resident one at a time: their loads and work add up.
        loads = max(
            sum(server.load_s(m) for m in clique),
            max(path_loads_s(job, clique, server) for job in jobs),
        )
        label = _label(clique)
        terms[f"serial[{label}]"] = sum(busy[m] for m in clique) + loads
        released = _released_after(jobs, clique, server)
        if released is not None:
            terms[f"released[{label}]"] = released
    return Bound(max(terms.values()), terms, busy)


def _released_after(
    jobs: Sequence[JobCost], clique: frozenset[str], server: Server
) -> float | None:
    """max over release times t > 0 of t + the clique's work released at or after t.

    One clique model may already be resident at t, so all its loads but
    the largest are counted. None when every job is released at 0.
    """
    times = sorted({job.arrival_s for job in jobs if job.arrival_s > 0})
    if not times:
        return None
    ordered = sorted(jobs, key=lambda j: j.arrival_s)
    best = 0.0
    # Walk release times from the last: the suffix of jobs released at or after t grows.
    suffix: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    index = len(ordered)
    for t in reversed(times):
        while index > 0 and ordered[index - 1].arrival_s >= t:
            index -= 1
            for stage in ordered[index].stages:
                if stage.model in clique:
                    suffix[stage.model][0] += stage.prompt_s
                    suffix[stage.model][1] += stage.decode_s
        present = [m for m, (p, d) in suffix.items() if p > 0 or d > 0]
        if not present:
            continue
        loads = [server.load_s(m) for m in present]
        total = sum(busy_s(p, d, server.spec(m), server.slots) for m, (p, d) in suffix.items())
        best = max(best, t + total + sum(loads) - max(loads))
    return best if best > 0 else None


def ratio(makespan_s: float, bound_s: float) -> float | None:
    """makespan / bound, or None when the bound is 0 (the free ``instant`` profile)."""
    if bound_s <= 0 or not math.isfinite(bound_s):
        return None
    return makespan_s / bound_s
