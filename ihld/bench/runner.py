"""One bench run: a fresh simulator and a fresh spool, one workload, one policy.

The simulator and the daemon run as subprocesses (``python -m ihld sim``,
``python -m ihld run``) with a generated config on a temp spool; this
process only drops files and waits. Batch workloads are dropped before the
daemon starts and run with ``--once``; timed ones start the daemon, wait
for ``daemon_ready`` in its event log, then drop each file on schedule
(simulated time / speed) the way ``ihld submit`` does: ``submit_file``
plus a poke on the control socket.

Times in the config are real seconds while the simulator runs ``speed``
times faster, so ``max_wait_s`` is written as ``max_wait_s / speed``.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tempfile
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ihld.bench.bound import Bound, Server, critical_path_s, lower_bound, ratio
from ihld.bench.costs import JobCost, job_costs
from ihld.bench.metrics import (
    Measured,
    cost_check,
    measure,
    sim_slowdown,
    speed_free_makespan,
    tail_idle,
)
from ihld.bench.procs import BenchError, DaemonProcess, SimProcess, wait_for
from ihld.bench.workloads import Workload
from ihld.client.submit import control_request, submit_file
from ihld.core.config import Config, parse_config
from ihld.core.spool import Spool
from ihld.observe.logs import read_events
from ihld.sim.profiles import Profile, get_profile

POLICIES = ("fifo", "affinity", "affinity-plain", "affinity-no-tails", "affinity-eager")
# Variants: a registered policy with one setting changed (compared side by side).
VARIANTS = {
    "affinity-plain": ("affinity", "prompt_cache = false"),
    "affinity-no-tails": ("affinity", "longest_first = false"),  # a wave's tail in age order
    "affinity-eager": ("affinity", "hold_dry = false"),  # a dry model is given up at once
}
Progress = Callable[[str], None]


@dataclass(frozen=True)
class BenchOptions:
    speed: float = 200.0
    seed: int = 0
    timeout_s: float = 3600.0  # per run, real seconds
    keep: bool = False  # keep each run's directory (spool, logs, config)
    workdir: Path | None = None  # where run directories go (default: the system temp dir)
    cprofile: bool = False  # run the daemon under cProfile (daemon.prof in the kept run dir)


def config_text(workload: Workload, policy: str, spool: Path, url: str, speed: float) -> str:
    """The daemon's config for one run (times in real seconds)."""
    lines = [
        "[spool]",
        f"dir = {json.dumps(str(spool))}",
        "settle_s = 0.05",
        "rescan_s = 0.5",
        "",
        "[[backends]]",
        'name = "sim"',
        f"url = {json.dumps(url)}",
        f"slots = {workload.slots}",
        f"max_loaded = {workload.max_loaded}",
        "",
        "[scheduler]",
        f"policy = {json.dumps(VARIANTS.get(policy, (policy, ''))[0])}",
    ]
    if policy in VARIANTS:
        lines.append(VARIANTS[policy][1])
    if workload.max_wait_s is not None:
        lines.append(f"max_wait_s = {workload.max_wait_s / speed!r}")
    lines += ["", "[log]", "stderr = false", "", "[control]", "grace_s = 5", ""]
    return "\n".join(lines) + workload.config_extra


def server_profile(workload: Workload) -> Profile:
    """The simulator's profile with the workload's slots and max_loaded (as the sim is run)."""
    return get_profile(workload.profile).with_overrides(
        slots=workload.slots, max_loaded=workload.max_loaded
    )


def parsed_config(workload: Workload, policy: str = "affinity") -> Config:
    text = config_text(workload, policy, Path("/nonexistent"), "http://127.0.0.1:1", 1.0)
    return parse_config(tomllib.loads(text), Path("/nonexistent/ihld.toml"))


@dataclass(frozen=True)
class Plan:
    """What is known before running: every job's stage costs and the lower bound."""

    workload: Workload
    costs: list[JobCost]
    bound: Bound
    server: Server


def plan(workload: Workload) -> Plan:
    profile = server_profile(workload)
    costs = job_costs(workload.jobs(), parsed_config(workload), profile)
    server = Server.from_profile(profile)
    return Plan(workload, costs, lower_bound(costs, server), server)


# --- running -------------------------------------------------------------------------


def _count_done(spool: Path) -> int:
    """Result and failure records published so far (the daemon's own directories)."""
    layout = Spool(spool)
    total = 0
    for where in (layout.outbox, layout.failed):
        with os.scandir(where) as it:
            total += sum(1 for e in it if e.name.endswith(".json") and not e.name.startswith("."))
    return total


def _log_has(path: Path, event: str) -> bool:
    try:
        with open(path, "rb") as fh:
            return f'"event":"{event}"'.encode() in fh.read()
    except FileNotFoundError:
        return False


def _poke(spool: Path) -> None:
    """Wake the daemon's watcher, as ``ihld submit`` does."""
    sock = Spool(spool).run_dir / "ihld.sock"
    asyncio.run(control_request(sock, "POST", "/poke", timeout_s=1.0))


def _write_sources(workload: Workload, root: Path) -> dict[str, Path]:
    src = root / "files"
    src.mkdir()
    paths = {}
    for drop in workload.drops:
        path = src / drop.name
        path.write_text(drop.text(), encoding="utf-8")
        paths[drop.name] = path
    return paths


def drop_on_schedule(
    workload: Workload, sources: dict[str, Path], spool: Path, speed: float
) -> dict[str, float]:
    """Drop each file at its simulated time / speed; the epoch each job was dropped."""
    arrivals: dict[str, float] = {}
    start = time.monotonic()
    for drop in sorted(workload.drops, key=lambda d: d.at_s):
        delay = start + drop.at_s / speed - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        dropped = time.time()
        submit_file(sources[drop.name], spool / "inbox")
        _poke(spool)
        for job in drop.jobs:
            arrivals[str(job["id"])] = dropped
    return arrivals


@dataclass
class RunRecord:
    """Raw material of one run, before it is turned into figures."""

    root: Path
    events: list[dict[str, Any]]
    results: list[dict[str, Any]]
    stats: dict[str, Any]
    arrivals: dict[str, float] | None
    wall_s: float
    daemon_cpu_s: float | None
    sim_cpu_s: float | None


def execute(workload: Workload, policy: str, opts: BenchOptions) -> RunRecord:
    """Run ``workload`` under ``policy`` on a fresh simulator and spool; collect the records."""
    root = Path(tempfile.mkdtemp(prefix=f"ihld-bench-{workload.name}-{policy}-", dir=opts.workdir))
    spool = root / "spool"
    Spool(spool).prepare()  # the daemon's own layout, so files can be dropped before it starts
    sources = _write_sources(workload, root)
    sim = SimProcess(
        workload.profile,
        opts.speed,
        slots=workload.slots,
        max_loaded=workload.max_loaded,
        seed=opts.seed,
        log=root / "sim.stderr",
    )
    daemon: DaemonProcess | None = None
    arrivals: dict[str, float] | None = None
    daemon_cpu = sim_cpu = None
    try:
        config = root / "ihld.toml"
        config.write_text(config_text(workload, policy, spool, sim.url, opts.speed))
        began = time.monotonic()
        if workload.kind == "batch":
            for drop in workload.drops:
                submit_file(sources[drop.name], spool / "inbox")
            daemon = DaemonProcess(
                config, once=True, log=root / "daemon.stderr", cprofile=opts.cprofile
            )
            daemon_cpu = daemon.wait(opts.timeout_s)
        else:
            daemon = DaemonProcess(
                config, once=False, log=root / "daemon.stderr", cprofile=opts.cprofile
            )
            arrivals = _run_timed(workload, daemon, sources, spool, opts)
            daemon_cpu = daemon.stop()
        wall = time.monotonic() - began
        stats = sim.get("/sim/stats")
    finally:
        if daemon is not None and daemon.running():
            daemon.stop()
        sim_cpu = sim.stop()
    events, results = collect(spool)
    return RunRecord(root, events, results, stats, arrivals, wall, daemon_cpu, sim_cpu)


def collect(spool: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The daemon's event log and every result file of a finished run."""
    layout = Spool(spool)
    events = list(read_events(layout.log_file))
    results = [json.loads(p.read_text()) for p in layout.outbox.glob("*.json")]
    return events, results


def wait_ready(daemon: DaemonProcess, spool: Path) -> None:
    """Until the daemon logged ``daemon_ready`` (recovery done, control socket up)."""
    log = Spool(spool).log_file
    wait_for(lambda: daemon.exited() or _log_has(log, "daemon_ready"), 60.0, "daemon_ready")
    if daemon.exited():
        raise BenchError(f"daemon exited at start: {daemon.tail()}")


def _run_timed(
    workload: Workload,
    daemon: DaemonProcess,
    sources: dict[str, Path],
    spool: Path,
    opts: BenchOptions,
) -> dict[str, float]:
    """Start-to-finish of a timed workload on a running daemon; the drop epochs."""
    wait_ready(daemon, spool)
    arrivals = drop_on_schedule(workload, sources, spool, opts.speed)
    total = workload.job_count
    wait_for(
        lambda: daemon.exited() or _count_done(spool) >= total,
        opts.timeout_s,
        f"{total} jobs to finish",
        poll_s=0.2,
    )
    if daemon.exited():
        raise BenchError(f"daemon exited early: {daemon.tail()}")
    return arrivals


# --- figures ---------------------------------------------------------------------------


def _urgent(plan: Plan, measured: Measured, speed: float) -> dict[str, Any] | None:
    """The watched job's latency against max_wait_s + its own service (with its loads)."""
    watch = plan.workload.watch
    if watch is None:
        return None
    job = next(j for j in plan.costs if j.id == watch)
    own = critical_path_s(
        JobCost(job.id, 0.0, job.priority, job.stages), plan.server
    )  # alone on an empty server, its loads included
    max_wait = plan.workload.max_wait_s or 0.0
    latency = measured.latencies_s.get(watch)
    return {
        "job": watch,
        "latency_s": latency,
        "own_service_s": own,
        "max_wait_s": max_wait,
        "target_s": max_wait + own,
        "met": latency is not None and latency <= max_wait + own,
    }


def _wait_bound(plan: Plan, measured: Measured) -> dict[str, Any] | None:
    """Did the most urgent tasks wait no longer than max_wait_s plus one switch?

    A forced switch first lets the resident model's in-flight stage finish
    and then loads the next model, so the allowance is the longest stage
    plus the longest load.
    """
    max_wait = plan.workload.max_wait_s
    if max_wait is None or not measured.max_wait_s:
        return None
    top = max(measured.max_wait_s)
    if top <= min(measured.max_wait_s):
        return None  # one priority only: nothing is more urgent than what runs
    stages = [s for job in plan.costs for s in job.stages]
    allowance = max((s.service_s for s in stages), default=0.0) + max(
        (plan.server.load_s(m) for m in plan.server.specs), default=0.0
    )
    waited = measured.max_wait_s[top]
    return {
        "priority": top,
        "max_wait_s": max_wait,
        "allowance_s": allowance,
        "longest_wait_s": waited,
        "held": waited <= max_wait + allowance,
    }


def _prompt_evaluated(results: list[dict[str, Any]]) -> int:
    """Prompt tokens the server evaluated (not reused from a slot's cache), over all stages."""
    return sum(int(s.get("prompt_evaluated") or 0) for r in results for s in r.get("stages", []))


def figures(plan: Plan, policy: str, record: RunRecord, opts: BenchOptions) -> dict[str, Any]:
    """The bench output for one run: the required fields first, then the details."""
    workload = plan.workload
    measured = measure(
        record.events,
        record.results,
        job_ids=[j.id for j in plan.costs],
        speed=opts.speed,
        capacity=workload.slots * workload.max_loaded,
        arrivals=record.arrivals,
    )
    loads = {m: int(n) for m, n in sorted(record.stats.get("loads", {}).items())}
    service = {(j.id, s.name): s.service_s for j in plan.costs for s in j.stages}
    lag = sim_slowdown(record.results, service, opts.speed) if workload.slots == 1 else None
    ids = [j.id for j in plan.costs]
    free = (  # idle time waiting for arrivals is part of a timed workload's schedule
        speed_free_makespan(record.events, ids, record.stats, opts.speed, lag)
        if workload.kind == "batch"
        else None
    )
    predicted = {
        (j.id, s.name): (s.prompt_tokens, s.output_tokens) for j in plan.costs for s in j.stages
    }
    switches, idle = tail_idle(record.events, workload.slots)
    out: dict[str, Any] = {
        "workload": workload.name,
        "policy": policy,
        "makespan_s": measured.makespan_s,
        "lower_bound_s": plan.bound.makespan_s,
        "ratio": ratio(measured.makespan_s, plan.bound.makespan_s),
        "ratio_speed_free": None if free is None else ratio(free, plan.bound.makespan_s),
        "makespan_speed_free_s": free,
        "loads": sum(loads.values()),
        "slot_occupancy": measured.slot_occupancy,
        "switches": switches,
        "tail_idle_slot_s": idle * opts.speed,  # simulated slot-seconds idle in drains
        "p50_latency_s": measured.p50_latency_s,
        "p99_latency_s": measured.p99_latency_s,
        "jobs_per_min": measured.jobs_per_min,
        "s_per_job": measured.makespan_s / measured.done if measured.done else None,
        "jobs": measured.jobs,
        "done": measured.done,
        "failed": measured.failed,
        "speed": opts.speed,
        "seed": opts.seed,
        "profile": workload.profile,
        "slots": workload.slots,
        "max_loaded": workload.max_loaded,
        "loads_by_model": loads,
        "bound_binding": plan.bound.binding,
        "bound_terms": plan.bound.terms,
        "max_queue_wait_s": {str(p): w for p, w in sorted(measured.max_wait_s.items())},
        "cost_check": cost_check(record.results, predicted),
        "sim_slowdown": lag,
        "prompt_evaluated": _prompt_evaluated(record.results),
        "wall_s": record.wall_s,
        "daemon_cpu_s": record.daemon_cpu_s,
        "sim_cpu_s": record.sim_cpu_s,
    }
    if workload.max_wait_s is not None:
        out["max_wait_s"] = workload.max_wait_s
    wait = _wait_bound(plan, measured)
    if wait is not None:
        out["wait_bound"] = wait
    urgent = _urgent(plan, measured, opts.speed)
    if urgent is not None:
        out["urgent"] = urgent
    if opts.keep or opts.cprofile:
        out["run_dir"] = str(record.root)
    return out


def run(
    workload: Workload,
    policies: list[str],
    opts: BenchOptions,
    progress: Progress | None = None,
) -> list[dict[str, Any]]:
    """Run ``workload`` once per policy (same jobs, same seed); one figures dict each."""
    say = progress or (lambda _msg: None)
    the_plan = plan(workload)
    say(
        f"{workload.name}: {workload.job_count} jobs, lower bound "
        f"{the_plan.bound.makespan_s:.1f} s ({the_plan.bound.binding})"
    )
    out = []
    for policy in policies:
        say(f"{workload.name}/{policy}: running at speed {opts.speed:g} ...")
        record = execute(workload, policy, opts)
        row = figures(the_plan, policy, record, opts)
        if not (opts.keep or opts.cprofile):
            shutil.rmtree(record.root, ignore_errors=True)
        say(
            f"{workload.name}/{policy}: makespan {row['makespan_s']:.1f} s, "
            f"{row['loads']} loads, {record.wall_s:.1f} s wall"
        )
        out.append(row)
    return out
