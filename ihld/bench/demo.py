"""``ihld demo``: the story of DESIGN.md on the built-in simulator, in a minute.

Runs the same batch of debate jobs twice on the ``laptop-6gb`` profile (two
7B models that do not fit in VRAM together), once with ``fifo`` (job by job,
as the seed script did) and once with ``affinity``, each with a fresh
simulator and spool, and prints makespan and model loads side by side.
Times are shown in simulated seconds (wall time x speed).
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from ihld.client.submit import submit_file
from ihld.service.daemon import Daemon

TOPICS = [
    "tabs versus spaces",
    "monorepos",
    "static typing in Python",
    "four-day work weeks",
    "remote work",
    "nuclear power",
    "open-plan offices",
    "microservices",
    "code review",
    "pair programming",
    "daylight saving time",
    "electric scooters",
    "unit test coverage",
    "dark mode",
    "public transport fares",
    "standing desks",
]


@dataclass
class RunResult:
    policy: str
    jobs: int
    done: int
    failed: int
    makespan_s: float  # simulated seconds
    loads: int
    spool: Path


def write_jobs(path: Path, count: int) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for n in range(count):
            topic = TOPICS[n % len(TOPICS)]
            job = {
                "id": f"debate-{n:04d}",
                "pipeline": "debate",
                "input": {"topic": f"{topic} (round {n // len(TOPICS) + 1})"},
            }
            fh.write(json.dumps(job) + "\n")


def write_config(path: Path, spool: Path, url: str, policy: str, **backend: Any) -> None:
    extra = "".join(f"{key} = {json.dumps(value)}\n" for key, value in backend.items())
    path.write_text(
        f'[spool]\ndir = "{spool}"\nsettle_s = 0.05\nrescan_s = 0.5\n\n'
        f'[[backends]]\nname = "sim"\nurl = "{url}"\n{extra}\n'
        f'[scheduler]\npolicy = "{policy}"\n\n'
        f"[log]\nstderr = false\n\n[control]\ngrace_s = 5\n"
    )


async def run_policy(
    policy: str, jobs: int, speed: float, workdir: Path, progress: Progress | None
) -> RunResult:
    from ihld.sim import get_profile, start_sim

    spool = workdir / policy
    config = workdir / f"{policy}.toml"
    async with await start_sim(profile=get_profile("laptop-6gb"), speed=speed) as sim:
        write_config(config, spool, sim.url, policy)
        batch = workdir / f"batch-{policy}.jsonl"
        write_jobs(batch, jobs)
        (spool / "inbox").mkdir(parents=True, exist_ok=True)
        daemon = Daemon(str(config), once=True)
        started = time.monotonic()
        submit_file(batch, spool / "inbox", name="debates.jsonl")
        run = asyncio.create_task(daemon.run())
        task_id = progress.add_task(policy, total=jobs) if progress else None
        while not run.done():
            await asyncio.sleep(0.1)
            engine = getattr(daemon, "engine", None)
            if progress is not None and task_id is not None and engine is not None:
                c = engine.counters
                progress.update(task_id, completed=c.jobs_done + c.jobs_failed)
        await run
        elapsed = time.monotonic() - started
        async with sim_session() as session, session.get(f"{sim.url}/sim/stats") as resp:
            stats = await resp.json()
    counters = daemon.engine.counters
    return RunResult(
        policy,
        jobs,
        counters.jobs_done,
        counters.jobs_failed,
        elapsed * speed,
        sum(stats["loads"].values()),
        spool,
    )


def sim_session() -> Any:
    import aiohttp

    return aiohttp.ClientSession()


async def run_demo(jobs: int = 40, speed: float = 100.0) -> int:
    console = Console(stderr=False)
    console.print(
        f"[bold]ihld demo[/]: {jobs} debate jobs (proposer → critic → judge) on the "
        f"simulated 6 GB laptop GPU (qwen2.5:7b + gemma2:9b, one fits), speed x{speed:g}"
    )
    workdir = Path(tempfile.mkdtemp(prefix="ihld-demo-"))
    results = []
    with Progress(
        TextColumn("{task.description:>9}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
        disable=not sys.stdout.isatty(),
    ) as progress:
        for policy in ("fifo", "affinity"):
            results.append(await run_policy(policy, jobs, speed, workdir, progress))
    table = Table(title="fifo (job by job) vs affinity (batched across jobs)")
    for column in ("policy", "done", "failed", "makespan (sim s)", "s/job", "model loads"):
        table.add_column(column, justify="right")
    for r in results:
        table.add_row(
            r.policy,
            str(r.done),
            str(r.failed),
            f"{r.makespan_s:.1f}",
            f"{r.makespan_s / max(r.jobs, 1):.2f}",
            str(r.loads),
        )
    console.print(table)
    fifo, affinity = results
    if affinity.makespan_s > 0:
        console.print(
            f"affinity: {fifo.makespan_s / affinity.makespan_s:.2f}x faster, "
            f"{affinity.loads} model loads where fifo needed {fifo.loads}."
        )
    console.print(f"results: {affinity.spool / 'outbox'}  (one JSON file per job)")
    console.print(f"event log: {affinity.spool / 'log' / 'ihld.jsonl'}")
    ok = all(r.done == r.jobs for r in results)
    return 0 if ok else 1
