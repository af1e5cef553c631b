"""Several backends: the seed workload on 1, 2 and 4 simulated GPUs, each its own process.

    ihld bench --workload multi-2,multi-4 --jobs 400 --speed 50   # + multi-1, for the ratios
    python benchmarks/multi.py --jobs 400 --speed 50 --kill       # multi-2, one backend killed

Each backend is a separate ``ihld sim`` process with the ``laptop-6gb`` profile
(one slot, one model resident), so N backends are N GPUs. The daemon runs
``--once`` on a fresh spool; the makespan is read from its event log (first
``job_claimed`` to last ``job_finished``) and shown in simulated seconds. The
throughput of N backends is makespan(1) / makespan(N). With ``--kill``, the
second backend is killed once a third of the stages are done: every job
must still finish, and none may fail (loads are then counted on the survivor).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ihld.bench.metrics import epoch
from ihld.bench.procs import DaemonProcess, SimProcess, wait_for
from ihld.bench.workloads import debate_job
from ihld.client.submit import submit_file
from ihld.observe.logs import read_events


@dataclass
class Result:
    backends: int
    jobs: int
    done: int
    failed: int
    makespan_s: float
    loads: int
    killed: bool


def config(root: Path, urls: list[str]) -> Path:
    backends = "".join(
        f'[[backends]]\nname = "gpu{n}"\nurl = "{url}"\nslots = 1\nmax_loaded = 1\n'
        f"connect_timeout_s = 2\nread_timeout_s = 30\nretries = 1\n\n"
        for n, url in enumerate(urls)
    )
    path = root / "ihld.toml"
    path.write_text(
        f'[spool]\ndir = "{root / "spool"}"\nsettle_s = 0.05\n\n{backends}'
        "[log]\nstderr = false\n\n[control]\ngrace_s = 5\n"
    )
    return path


def stages_done(root: Path) -> int:
    try:
        text = (root / "spool" / "log" / "ihld.jsonl").read_text(errors="replace")
    except FileNotFoundError:
        return 0
    return text.count('"stage_finished"')


def run(backends: int, jobs: int, speed: float, kill: bool, workdir: Path) -> Result:
    root = workdir / f"multi-{backends}{'-kill' if kill else ''}"
    root.mkdir()
    killed_after = 0
    sims = [
        SimProcess("laptop-6gb", speed, slots=1, max_loaded=1, seed=0, log=root / f"sim{n}.log")
        for n in range(backends)
    ]
    try:
        cfg = config(root, [s.url for s in sims])
        batch = root / "seed.jsonl"
        batch.write_text("".join(json.dumps(debate_job(n)) + "\n" for n in range(jobs)))
        (root / "spool" / "inbox").mkdir(parents=True)
        submit_file(batch, root / "spool" / "inbox")
        daemon = DaemonProcess(cfg, once=True, log=root / "daemon.log")
        if kill:  # a third of the way through (jobs only finish in the last phase)
            wait_for(lambda: stages_done(root) > 0, 600, "the first stage")
            time.sleep(jobs * 3 * 3.8 / backends / speed / 3)
            killed_after = stages_done(root)
            sims[1].proc.kill()
        daemon.wait(7200)
        alive = [s for s in sims if s.proc.poll() is None]
        loads = sum(sum(s.get("/sim/stats")["loads"].values()) for s in alive)
    finally:
        for sim in sims:
            sim.stop()
    events = list(read_events(root / "spool" / "log" / "ihld.jsonl"))
    claimed = [epoch(e["timestamp"]) for e in events if e["event"] == "job_claimed"]
    finished = [epoch(e["timestamp"]) for e in events if e["event"] == "job_finished"]
    done = len(list((root / "spool" / "outbox").glob("*.json")))
    failed = len(list((root / "spool" / "failed").glob("*.json")))
    makespan = (max(finished) - min(claimed)) * speed if finished else 0.0
    if kill:
        print(f"backend gpu1 killed after {killed_after} of {3 * jobs} stages", file=sys.stderr)
    return Result(backends, jobs, done, failed, makespan, loads, kill)


def report(results: list[Result], *, jobs: int, speed: float, wall_s: float, as_json: bool) -> int:
    """Print the table (or JSON); 0 if every job of every run finished."""
    base = next((r.makespan_s for r in results if r.backends == 1), None)
    if as_json:
        print(json.dumps([
            {**r.__dict__, "speedup_vs_1": round(base / r.makespan_s, 3)
             if base and r.makespan_s else None}
            for r in results
        ], indent=2))  # fmt: skip
    else:
        print(
            f"seed workload, {jobs} debate jobs, laptop-6gb per backend, x{speed:g}"
            f" ({wall_s:.0f} s real)"
        )
        print("| backends | done | failed | makespan s | throughput vs 1 | loads | killed |")
        print("|---:|---:|---:|---:|---:|---:|---|")
        for r in results:
            ratio = f"{base / r.makespan_s:.2f}x" if base and r.makespan_s else "-"
            print(
                f"| {r.backends} | {r.done} | {r.failed} | {r.makespan_s:.0f} | {ratio} | "
                f"{r.loads} | {'yes' if r.killed else 'no'} |"
            )
    ok = all(r.done == r.jobs and r.failed == 0 for r in results)
    return 0 if ok else 1


def bench_multi(names: list[str], *, jobs: int, speed: float, as_json: bool) -> int:
    """``ihld bench --workload multi-2,multi-4``: multi-1 too, then each, side by side."""
    counts = sorted({1, *(int(name.removeprefix("multi-")) for name in names)})
    workdir = Path(tempfile.mkdtemp(prefix="ihld-multi-"))
    started = time.monotonic()
    results = [run(n, jobs, speed, False, workdir) for n in counts]
    return report(results, jobs=jobs, speed=speed, wall_s=time.monotonic() - started,
                  as_json=as_json)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=400)
    parser.add_argument("--speed", type=float, default=50.0)
    parser.add_argument("--backends", default="1,2,4")
    parser.add_argument("--kill", action="store_true", help="multi-2 with one backend killed")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="ihld-multi-"))
    counts = [2] if args.kill else [int(n) for n in args.backends.split(",")]
    started = time.monotonic()
    results = [run(n, args.jobs, args.speed, args.kill, workdir) for n in counts]
    return report(results, jobs=args.jobs, speed=args.speed, wall_s=time.monotonic() - started,
                  as_json=args.json)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
