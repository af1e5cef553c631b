"""``ihld bench --backend URL``: a workload on a real server, ihld against hand-batching.

One invocation runs, one after another on the same server and from the same
state (every model unloaded): ihld with ``fifo``, ihld with ``affinity``, and
a hand-batched reference with no ihld at all (stage by stage across all jobs,
``slots`` requests in flight, the server loading models on demand) — the
careful human ihld has to beat. Loads are counted from the server's side for
all three alike: a poller reads llama.cpp's ``GET /models`` every 100 ms and
counts each model's transitions to ``loaded``.

Workload ``aba``: N jobs of three stages on models A, B, A (each stage needs
the one before), ``tokens`` output tokens each at temperature 0.

Workload ``rubrics``: N single-stage grading jobs whose system prompts are 8
distinct ~1,500-token rubrics, interleaved (``ihld.bench.workloads.rubric``).
Runs: ihld ``affinity`` (prompt-cache-aware order), ``affinity-plain`` (the
same with ``prompt_cache = false``: priority, then age) and ``file-order``
(no ihld: ``slots`` workers taking the jobs in file order). Each reports the
prompt tokens the server evaluated (``timings.prompt_n``) beside the total.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from ihld.bench.runner import VARIANTS
from ihld.bench.serverstate import LoadCounter, unload_all
from ihld.bench.workloads import rubric_job
from ihld.observe.logs import read_events

RUNS = ("fifo", "affinity", "hand-batched")
# variants, on request (--policy)
EXTRA_RUNS = ("affinity-no-tails", "affinity-plain", "affinity-eager")
RUBRIC_RUNS = ("affinity-plain", "affinity", "file-order")


@dataclass
class RealRun:
    run: str
    jobs: int
    done: int
    makespan_s: float
    loads: dict[str, int]
    tokens: int
    per_model: dict[str, dict[str, int]] = field(default_factory=dict)
    prompt_tokens: int = 0  # prompt tokens of all requests
    prompt_evaluated: int = 0  # of which the server evaluated (the rest came from slot caches)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.makespan_s if self.makespan_s else 0.0

    @property
    def jobs_per_min(self) -> float:
        return 60 * self.done / self.makespan_s if self.makespan_s else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "loads_total": sum(self.loads.values()),
            "tokens_per_s": round(self.tokens_per_s, 1),
            "jobs_per_min": round(self.jobs_per_min, 1),
            "makespan_s": round(self.makespan_s, 3),
        }


def aba_jobs(count: int, tokens: int, models: tuple[str, str]) -> list[dict[str, Any]]:
    a, b = models
    options = {"num_predict": tokens, "temperature": 0}
    return [
        {
            "id": f"aba{n:04d}",
            "input": {"n": n},
            "stages": [
                {
                    "name": "a",
                    "model": a,
                    "options": options,
                    "prompt": "Write one sentence about the number {input[n]}.",
                },
                {
                    "name": "b",
                    "model": b,
                    "options": options,
                    "prompt": "Criticise this sentence in one sentence: {stages[a]}",
                },
                {
                    "name": "c",
                    "model": a,
                    "options": options,
                    "prompt": "Reply to this criticism in one sentence: {stages[b]}",
                },
            ],
        }
        for n in range(count)
    ]


def _config(spool: Path, url: str, kind: str, policy: str, slots: int) -> str:
    base, setting = VARIANTS.get(policy, (policy, ""))
    return (
        f'[spool]\ndir = "{spool}"\nsettle_s = 0.0\nrescan_s = 0.5\n\n'
        f'[[backends]]\nname = "real"\nurl = "{url}"\nkind = "{kind}"\nslots = {slots}\n'
        f"max_loaded = 1\nread_timeout_s = 120\n\n"
        f'[scheduler]\npolicy = "{base}"\n{setting}\n\n'
        "[log]\nstderr = false\n\n[control]\nsocket = false\n"
    )


async def run_ihld(
    url: str,
    kind: str,
    policy: str,
    jobs: list[dict[str, Any]],
    slots: int,
    workdir: Path,
    *,
    split: bool = False,
) -> RealRun:
    """``ihld run --once`` on the jobs (one file, or ``split``: one file a job); makespan
    from the first claim to the last result."""
    root = workdir / policy
    inbox = root / "spool" / "inbox"
    inbox.mkdir(parents=True)
    config = root / "ihld.toml"
    config.write_text(_config(root / "spool", url, kind, policy, slots))
    if split:
        for n, job in enumerate(jobs):
            (inbox / f"job-{n:05d}.json").write_text(json.dumps(job) + "\n")
    else:
        (inbox / "batch.jsonl").write_text("".join(json.dumps(job) + "\n" for job in jobs))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ihld",
        "run",
        "--once",
        "--config",
        str(config),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"ihld ({policy}) exited {proc.returncode}: {err.decode()[-2000:]}")
    events = list(read_events(root / "spool" / "log" / "ihld.jsonl"))
    stamps = [
        _epoch(e["timestamp"]) for e in events if e["event"] in ("job_claimed", "job_finished")
    ]
    per_model: dict[str, dict[str, int]] = {}
    tokens = prompt = evaluated = 0
    results = list((root / "spool" / "outbox").glob("*.json"))
    for path in results:
        for stage in json.loads(path.read_text())["stages"]:
            figures = per_model.setdefault(stage["model"], {"stages": 0, "tokens": 0})
            figures["stages"] += 1
            figures["tokens"] += int(stage.get("eval_count") or 0)
            tokens += int(stage.get("eval_count") or 0)
            prompt += int(stage.get("prompt_eval_count") or 0)
            evaluated += int(stage.get("prompt_evaluated") or 0)
    return RealRun(
        policy,
        len(jobs),
        len(results),
        max(stamps) - min(stamps),
        {},
        tokens,
        per_model,
        prompt_tokens=prompt,
        prompt_evaluated=evaluated,
    )


async def run_file_order(
    session: aiohttp.ClientSession, url: str, jobs: list[dict[str, Any]], slots: int
) -> RealRun:
    """No ihld: ``slots`` workers take single-stage jobs in file order (system + user).

    A person writing this loop uses the names the router lists (``gemma3:270M``).
    """
    spelling = {name.lower(): name for name in await LoadCounter(session, url).states()}
    pending = list(jobs)
    run = RealRun("file-order", len(jobs), 0, 0.0, {}, 0)

    async def worker() -> None:
        while pending:
            job = pending.pop(0)
            stage = job["stages"][0]
            user = stage["prompt"].replace("{input[answer]}", job["input"]["answer"])
            body = {
                "model": spelling.get(stage["model"].lower(), stage["model"]),
                "messages": [{"role": "system", "content": stage["system"]},
                             {"role": "user", "content": user}],
                "max_tokens": stage["options"]["num_predict"],
                "temperature": 0,
            }  # fmt: skip
            async with session.post(url + "/v1/chat/completions", json=body) as resp:
                reply = await resp.json()
            if resp.status != 200:
                raise RuntimeError(f"file-order: HTTP {resp.status}: {reply}")
            timings = reply.get("timings") or {}
            run.done += 1
            run.tokens += int(reply.get("usage", {}).get("completion_tokens") or 0)
            run.prompt_tokens += int(reply.get("usage", {}).get("prompt_tokens") or 0)
            run.prompt_evaluated += int(timings.get("prompt_n") or 0)

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(slots)))
    run.makespan_s = time.monotonic() - started
    return run


async def run_hand_batched(
    session: aiohttp.ClientSession,
    url: str,
    jobs: list[dict[str, Any]],
    slots: int,
    kind: str = "llamacpp",
) -> RealRun:
    """Stage by stage across all jobs, ``slots`` in flight, the router loading on demand.

    A person writing this loop uses the names the router lists (``gemma3:270M``).
    """
    listed = await LoadCounter(session, url, kind).states() if kind != "ollama" else {}
    spelling = {name.lower(): name for name in listed}
    outputs: dict[str, dict[str, str]] = {job["id"]: {} for job in jobs}
    per_model: dict[str, dict[str, int]] = {}
    gate = asyncio.Semaphore(slots)
    tokens = 0

    async def one(job: dict[str, Any], stage: dict[str, Any]) -> None:
        nonlocal tokens
        prompt = stage["prompt"].replace("{input[n]}", str(job["input"]["n"]))
        for name, text in outputs[job["id"]].items():
            prompt = prompt.replace("{stages[" + name + "]}", text)
        body = {
            "model": spelling.get(stage["model"].lower(), stage["model"]),
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": stage["options"]["num_predict"],
            "temperature": 0,
        }
        async with gate, session.post(url + "/v1/chat/completions", json=body) as resp:
            reply = await resp.json()
        if resp.status != 200:
            raise RuntimeError(f"hand-batched: HTTP {resp.status}: {reply}")
        outputs[job["id"]][stage["name"]] = reply["choices"][0]["message"]["content"]
        used = int(reply.get("usage", {}).get("completion_tokens") or 0)
        figures = per_model.setdefault(stage["model"], {"stages": 0, "tokens": 0})
        figures["stages"] += 1
        figures["tokens"] += used
        tokens += used

    started = time.monotonic()
    for index in range(3):
        await asyncio.gather(*(one(job, job["stages"][index]) for job in jobs))
    return RealRun(
        "hand-batched", len(jobs), len(jobs), time.monotonic() - started, {}, tokens, per_model
    )


def rubric_jobs(count: int, tokens: int, model: str) -> list[dict[str, Any]]:
    jobs = [rubric_job(n, model=model) for n in range(count)]
    for job in jobs:
        job["stages"][0]["options"]["num_predict"] = tokens
    return jobs


async def bench_real(
    url: str,
    kind: str,
    *,
    jobs: int,
    tokens: int,
    models: tuple[str, ...],
    slots: int,
    runs: tuple[str, ...] = RUNS,
    workload_name: str = "aba",
) -> list[RealRun]:
    if workload_name == "rubrics":
        workload = rubric_jobs(jobs, tokens, models[0])
    else:
        workload = aba_jobs(jobs, tokens, (models[0], models[1]))
    results = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
        with tempfile.TemporaryDirectory(prefix="ihld-bench-real-") as tmp:
            for name in runs:
                await unload_all(session, url, kind)
                async with LoadCounter(session, url, kind) as counter:
                    if name == "hand-batched":
                        run = await run_hand_batched(session, url, workload, slots, kind)
                    elif name == "file-order":
                        run = await run_file_order(session, url, workload, slots)
                    else:
                        run = await run_ihld(
                            url, kind, name, workload, slots, Path(tmp),
                            split=workload_name == "files",
                        )  # fmt: skip
                run.loads = dict(counter.loads)
                results.append(run)
    return results


def table(results: list[RealRun]) -> str:
    reference = next((r for r in results if r.run in ("hand-batched", "file-order")), None)
    lines = [
        f"{'run':<16}{'done':>6}{'makespan s':>12}{'loads':>7}{'tok/s':>8}"
        f"{'jobs/min':>10}{'prompt eval':>18}{'vs ref':>8}"
    ]
    for r in results:
        ratio = f"{r.makespan_s / reference.makespan_s:.3f}" if reference else "-"
        prompt = f"{r.prompt_evaluated}/{r.prompt_tokens}" if r.prompt_tokens else "-"
        lines.append(
            f"{r.run:<16}{r.done:>3}/{r.jobs:<3}{r.makespan_s:>11.2f}"
            f"{sum(r.loads.values()):>7}{r.tokens_per_s:>8.1f}{r.jobs_per_min:>10.1f}"
            f"{prompt:>18}{ratio:>8}"
        )
    return "\n".join(lines)


def _epoch(stamp: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def run_cli(args: argparse.Namespace) -> int:
    """``ihld bench --backend URL``: run the workload's runs and print their table."""
    name = args.workload if args.workload in ("rubrics", "files") else "aba"
    known = RUBRIC_RUNS if name == "rubrics" else RUNS
    models = tuple(m.strip() for m in args.models.split(","))
    runs = tuple(p.strip() for p in args.policy.split(",")) if args.policy else known
    wanted = 1 if name == "rubrics" else 2
    if (
        len(models) != wanted
        or args.workload not in ("seed", "aba", "rubrics", "files")
        or set(runs) - set(known) - set(EXTRA_RUNS)
    ):
        print("ihld bench --backend: workload aba (or files: one file a job) with --models "
              "A,B (runs among "
              f"{', '.join(RUNS + EXTRA_RUNS)}), or rubrics with --models M (runs among "
              f"{', '.join(RUBRIC_RUNS)})", file=sys.stderr)  # fmt: skip
        return 2
    results = asyncio.run(bench_real(
        args.backend.rstrip("/"), args.kind, jobs=args.jobs or (40 if name == "rubrics" else 20),
        tokens=args.tokens, models=models, slots=args.slots, runs=runs, workload_name=name,
    ))  # fmt: skip
    if args.json:
        print(json.dumps([r.as_dict() for r in results], indent=2))
    else:
        print(table(results))
    return 0 if all(r.done == r.jobs for r in results) else 1
