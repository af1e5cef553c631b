"""The named benchmark workloads: which jobs arrive when, on which simulated server.

A workload is data, not code: the job documents (exactly what a user would
drop into the inbox), the time each file is dropped (in simulated seconds
after the start), the simulator profile and the backend settings. The
runner, the cost model and the lower bound all read this one description,
so the bound is always computed for the very jobs that were run.

Every workload is deterministic for a given ``seed`` (stream arrivals and
priorities come from ``random.Random(seed)``), so two policies, or two
speed factors, see the same jobs.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from ihld.bench.demo import TOPICS

SEED_JOBS = 1_764  # the user's batch in DESIGN.md
Kind = Literal["batch", "timed", "overhead"]


@dataclass(frozen=True)
class Drop:
    """One file dropped into the inbox ``at_s`` simulated seconds after the start."""

    at_s: float
    name: str  # file name in the inbox (*.json or *.jsonl)
    jobs: tuple[dict[str, Any], ...]

    def text(self) -> str:
        """The file's bytes as text: one JSON document, or JSON Lines for a batch."""
        if self.name.endswith(".json"):
            assert len(self.jobs) == 1, "a .json file holds one job"
            return json.dumps(self.jobs[0]) + "\n"
        return "".join(json.dumps(job) + "\n" for job in self.jobs)


@dataclass(frozen=True)
class Workload:
    """What to run and on what: jobs, drop times, simulator profile, backend settings.

    ``kind``: ``batch`` drops everything before the daemon starts and runs
    it with ``--once``; ``timed`` starts the daemon first and drops files
    on schedule (stream arrivals, a mid-batch urgent job); ``overhead``
    measures ihld itself on the free ``instant`` profile.
    ``max_wait_s`` is in simulated seconds (the runner scales it to real
    seconds for the daemon's config). ``config_extra`` is TOML appended to
    the generated config (pipelines). ``watch`` names a job whose latency is
    reported on its own (the urgent job).
    """

    name: str
    description: str
    profile: str
    slots: int
    max_loaded: int
    drops: tuple[Drop, ...]
    kind: Kind = "batch"
    max_wait_s: float | None = None
    config_extra: str = ""
    watch: str | None = None
    params: dict[str, Any] = field(default_factory=dict)

    def jobs(self) -> list[tuple[float, dict[str, Any]]]:
        """Every job with the simulated time its file is dropped, in drop order."""
        return [(d.at_s, job) for d in sorted(self.drops, key=lambda d: d.at_s) for job in d.jobs]

    @property
    def job_count(self) -> int:
        return sum(len(d.jobs) for d in self.drops)


def debate_job(n: int, prefix: str = "seed", priority: int = 0) -> dict[str, Any]:
    """The user's job: ``{"pipeline": "debate", "input": {"topic": ...}}``."""
    topic = f"{TOPICS[n % len(TOPICS)]} (round {n // len(TOPICS) + 1})"
    job: dict[str, Any] = {
        "id": f"{prefix}-{n:04d}",
        "pipeline": "debate",
        "input": {"topic": topic},
    }
    if priority:
        job["priority"] = priority
    return job


def _seed(jobs: int | None, seed: int) -> Workload:
    n = jobs or SEED_JOBS
    return Workload(
        name="seed",
        description=f"{n} debate jobs on laptop-6gb (1 slot, one model fits)",
        profile="laptop-6gb",
        slots=1,
        max_loaded=1,
        drops=(Drop(0.0, "seed.jsonl", tuple(debate_job(i) for i in range(n))),),
    )


def _seed_4slot(jobs: int | None, seed: int) -> Workload:
    n = jobs or SEED_JOBS
    return Workload(
        name="seed-4slot",
        description=f"{n} debate jobs on laptop-6gb-4slot (OLLAMA_NUM_PARALLEL=4)",
        profile="laptop-6gb-4slot",
        slots=4,
        max_loaded=1,
        drops=(Drop(0.0, "seed.jsonl", tuple(debate_job(i) for i in range(n))),),
    )


# outline (3B) -> draft (7B) -> review (9B) -> summary (3B): the 3B fits beside
# either big model, the two big ones never fit together (three-models profile).
BRIEF_PIPELINE = """
[[pipelines.brief.stages]]
name = "outline"
model = "llama3.2:3b"
system = "You plan short technical briefs. Reply with a numbered outline of five points."
prompt = "Outline a one-page brief on: {input[topic]}"

[[pipelines.brief.stages]]
name = "draft"
model = "qwen2.5:7b"
system = "You write clear, concrete technical prose for busy engineers."
prompt = "Write the brief on {input[topic]} from this outline:\\n{stages[outline]}"

[[pipelines.brief.stages]]
name = "review"
model = "gemma2:9b"
system = "You are a demanding reviewer. List the three weakest points and how to fix them."
prompt = "Review this brief on {input[topic]}:\\n{stages[draft]}"

[[pipelines.brief.stages]]
name = "summary"
model = "llama3.2:3b"
system = "You summarise for a changelog."
prompt = '''Summarise the brief and its review in three lines.
Brief: {stages[draft]}
Review: {stages[review]}'''
"""


def _three_models(jobs: int | None, seed: int) -> Workload:
    n = jobs or 400
    batch = tuple(
        {
            "id": f"brief-{i:04d}",
            "pipeline": "brief",
            "input": {"topic": f"{TOPICS[i % len(TOPICS)]} (part {i // len(TOPICS) + 1})"},
        }
        for i in range(n)
    )
    return Workload(
        name="three-models",
        description=f"{n} four-stage jobs over llama3.2:3b, qwen2.5:7b, gemma2:9b (8 GB)",
        profile="three-models",
        slots=1,
        max_loaded=2,
        drops=(Drop(0.0, "briefs.jsonl", batch),),
        config_extra=BRIEF_PIPELINE,
    )


STREAM_MEAN_GAP_S = 16.0  # one debate job every 16 simulated seconds on average (3.75/min)
STREAM_URGENT_SHARE = 0.2  # a fifth of the jobs have priority 5
STREAM_MAX_WAIT_S = 120.0


def _stream(jobs: int | None, seed: int) -> Workload:
    n = jobs or 300
    rng = random.Random(seed)
    drops = []
    t = 0.0
    for i in range(n):
        priority = 5 if rng.random() < STREAM_URGENT_SHARE else 0
        drops.append(Drop(t, f"stream-{i:04d}.json", (debate_job(i, "stream", priority),)))
        t += rng.expovariate(1.0 / STREAM_MEAN_GAP_S)
    return Workload(
        name="stream",
        description=(
            f"{n} debate jobs arriving as a Poisson stream (mean gap {STREAM_MEAN_GAP_S:g} s), "
            f"{STREAM_URGENT_SHARE:.0%} at priority 5, on laptop-6gb"
        ),
        profile="laptop-6gb",
        slots=1,
        max_loaded=1,
        drops=tuple(drops),
        kind="timed",
        max_wait_s=STREAM_MAX_WAIT_S,
        params={"mean_gap_s": STREAM_MEAN_GAP_S, "urgent_share": STREAM_URGENT_SHARE},
    )


URGENT_MAX_WAIT_S = 120.0
URGENT_DROP_FRACTION = 0.4  # of the batch's lower bound: well inside the run


def _urgent(jobs: int | None, seed: int) -> Workload:
    n = jobs or 300
    batch = tuple(debate_job(i) for i in range(n))
    # ~11.8 s of one-slot work per debate job on laptop-6gb: drop it 40 % into the batch.
    at = URGENT_DROP_FRACTION * n * 11.8
    urgent = debate_job(n, "urgent", priority=10)
    return Workload(
        name="urgent",
        description=(
            f"{n} debate jobs on laptop-6gb; one priority-10 job dropped at {at:.0f} s "
            f"(max_wait_s {URGENT_MAX_WAIT_S:g} s)"
        ),
        profile="laptop-6gb",
        slots=1,
        max_loaded=1,
        drops=(Drop(0.0, "batch.jsonl", batch), Drop(at, "urgent.json", (urgent,))),
        kind="timed",
        max_wait_s=URGENT_MAX_WAIT_S,
        watch=urgent["id"],
        params={"urgent_at_s": at},
    )


OVERHEAD_JOBS = 1_667  # x 3 stages = 5,001 stages
OVERHEAD_DROPS = 200  # single .json files dropped one at a time for drop-to-claim latency


def _overhead(jobs: int | None, seed: int) -> Workload:
    n = jobs or OVERHEAD_JOBS
    batch = tuple(debate_job(i, "ovh") for i in range(n))
    drops = max(10, min(OVERHEAD_DROPS, n // 4))
    singles = tuple(Drop(0.0, f"drop-{i:04d}.json", (debate_job(i, "drop"),)) for i in range(drops))
    return Workload(
        name="overhead",
        description=(
            f"ihld's own cost on the free 'instant' profile: {n} debate jobs ({3 * n} stages), "
            f"and {drops} single files dropped one at a time"
        ),
        profile="instant",
        slots=4,
        max_loaded=3,
        drops=(Drop(0.0, "overhead.jsonl", batch), *singles),
        kind="overhead",
    )


RUBRIC_GROUPS = 8
RUBRIC_JOBS = 40
RUBRIC_CRITERIA = (
    "states the claim it is answering in its first sentence",
    "supports every claim with a concrete example or a figure",
    "names the strongest objection and answers it",
    "keeps to the question asked and leaves out the rest",
    "uses plain words where plain words will do",
    "ends with a conclusion that follows from what came before",
    "gets the facts right, including names, dates and units",
    "is no longer than the question needs",
)


def rubric(group: int, chars: int = 6_000) -> str:
    """A long grading rubric (~1,500 tokens), different from the first line for each group."""
    lines = [f"Rubric {group} of {RUBRIC_GROUPS}: you grade answers for panel {group}."]
    n = 0
    while sum(len(line) + 1 for line in lines) < chars:
        criterion = RUBRIC_CRITERIA[(n * (group + 3)) % len(RUBRIC_CRITERIA)]
        lines.append(f"{group}.{n + 1}: award a point if the answer {criterion}.")
        n += 1
    return "\n".join(lines)[:chars]


def rubric_job(n: int, groups: int = RUBRIC_GROUPS, model: str = "qwen2.5:7b") -> dict[str, Any]:
    """One single-stage grading job; job ``n`` uses rubric ``n % groups`` (interleaved)."""
    return {
        "id": f"rubric-{n:04d}",
        "stages": [{
            "name": "grade",
            "actor": "prompt",
            "model": model,
            "system": rubric(n % groups),
            "prompt": "Grade this answer, one line: {input[answer]}",
            "options": {"num_predict": 12, "temperature": 0},
        }],
        "input": {"answer": f"{TOPICS[n % len(TOPICS)]}: it depends (answer {n})."},
    }  # fmt: skip


def _rubrics(jobs: int | None, seed: int) -> Workload:
    n = jobs or RUBRIC_JOBS
    return Workload(
        name="rubrics",
        description=(
            f"{n} single-stage grading jobs, {RUBRIC_GROUPS} distinct ~1,500-token rubrics "
            "(system prompts) interleaved, 4 slots: prompt-cache-aware order pays off"
        ),
        profile="laptop-6gb-4slot",
        slots=4,
        max_loaded=1,
        drops=(Drop(0.0, "rubrics.jsonl", tuple(rubric_job(i) for i in range(n))),),
    )


FILES_JOBS = 50


def _files(jobs: int | None, seed: int) -> Workload:
    n = jobs or FILES_JOBS
    return Workload(
        name="files",
        description=(
            f"{n} debate jobs dropped at once as {n} one-job files, 4 slots: the first ones "
            "run while the rest are still being claimed"
        ),
        profile="laptop-6gb-4slot",
        slots=4,
        max_loaded=1,
        drops=tuple(Drop(0.0, f"files-{i:04d}.json", (debate_job(i, "files"),)) for i in range(n)),
        kind="timed",
    )


BUILDERS: dict[str, Callable[[int | None, int], Workload]] = {
    "seed": _seed,
    "seed-4slot": _seed_4slot,
    "three-models": _three_models,
    "stream": _stream,
    "urgent": _urgent,
    "overhead": _overhead,
    "rubrics": _rubrics,
    "files": _files,
}


def workload(name: str, jobs: int | None = None, seed: int = 0) -> Workload:
    """The workload called ``name``, scaled to ``jobs`` jobs if given."""
    try:
        build = BUILDERS[name]
    except KeyError:
        known = ", ".join(BUILDERS)
        raise KeyError(f"unknown workload {name!r}; known: {known}") from None
    if jobs is not None and jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {jobs}")
    return build(jobs, seed)
