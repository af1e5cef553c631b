"""The ``overhead`` mode: ihld's own cost, on a simulator where the model is free.

On the ``instant`` profile loads and tokens take no time, so whatever time
a run takes is the daemon's (and the HTTP round trips'): claiming, parsing,
scheduling, checkpointing, publishing, logging. Two figures:

* **stages/s end to end**: a batch of debate jobs (3 stages each) dropped
  as one ``.jsonl``: stages / (last ``job_finished`` - first ``job_claimed``).
* **drop-to-claim latency**: single ``.json`` jobs dropped one at a time,
  spaced out, with ``ihld.client.submit.submit_file``; each file's drop time
  (right after ``submit_file`` returned, i.e. once the file is linked
  into the inbox and the directory fsynced) against its ``job_claimed``
  timestamp. The first half are dropped bare (the inotify watcher must
  notice them), the second half are followed by a poke on the control
  socket, as ``ihld submit`` does; the headline figure is the poked one.

Times here are real seconds (speed 1).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from ihld.bench.metrics import epoch, measure, percentile
from ihld.bench.procs import DaemonProcess, SimProcess, wait_for
from ihld.bench.runner import (
    BenchOptions,
    Progress,
    _count_done,
    _poke,
    _write_sources,
    collect,
    config_text,
    wait_ready,
)
from ihld.bench.workloads import Workload
from ihld.client.submit import submit_file
from ihld.core.spool import Spool

DROP_SPACING_S = 0.05


def _drop_singles(
    workload: Workload, sources: dict[str, Path], spool: Path
) -> tuple[dict[str, float], set[str]]:
    """Drop the single-job files one at a time; their drop epochs and the poked ids."""
    singles = [d for d in workload.drops if d.name.endswith(".json")]
    dropped: dict[str, float] = {}
    poked: set[str] = set()
    for index, drop in enumerate(singles):
        submit_file(sources[drop.name], spool / "inbox")
        job_id = str(drop.jobs[0]["id"])
        dropped[job_id] = time.time()
        if index >= len(singles) // 2:
            _poke(spool)
            poked.add(job_id)
        time.sleep(DROP_SPACING_S)
    return dropped, poked


def run_overhead(
    workload: Workload, policy: str, opts: BenchOptions, progress: Progress | None = None
) -> dict[str, Any]:
    """One overhead run under ``policy``; the figures dict (times in real seconds)."""
    root = Path(tempfile.mkdtemp(prefix=f"ihld-bench-overhead-{policy}-", dir=opts.workdir))
    spool = root / "spool"
    Spool(spool).prepare()  # the daemon's own layout, so files can be dropped before it starts
    sources = _write_sources(workload, root)
    batch = next(d for d in workload.drops if d.name.endswith(".jsonl"))
    singles = workload.job_count - len(batch.jobs)
    sim = SimProcess(
        workload.profile, 1.0, slots=workload.slots, max_loaded=workload.max_loaded,
        seed=opts.seed, log=root / "sim.stderr",
    )  # fmt: skip
    config = root / "ihld.toml"
    config.write_text(config_text(workload, policy, spool, sim.url, 1.0))
    daemon = DaemonProcess(config, once=False, log=root / "daemon.stderr", cprofile=opts.cprofile)
    try:
        wait_ready(daemon, spool)
        dropped, poked = _drop_singles(workload, sources, spool)
        wait_for(lambda: _count_done(spool) >= singles, 120.0, "the dropped files to finish")
        began = time.monotonic()
        submit_file(sources[batch.name], spool / "inbox")
        _poke(spool)
        wait_for(
            lambda: daemon.exited() or _count_done(spool) >= workload.job_count,
            opts.timeout_s,
            "the overhead batch to finish",
            poll_s=0.1,
        )
        wall = time.monotonic() - began
        stats = sim.get("/sim/stats")
    finally:
        daemon_cpu = daemon.stop()
        sim_cpu = sim.stop()
    events, results = collect(spool)
    ids = [str(job["id"]) for job in batch.jobs]
    measured = measure(
        events, results, job_ids=ids, speed=1.0, capacity=workload.slots * workload.max_loaded
    )
    claims = {
        str(e["job_id"]): epoch(e["timestamp"])
        for e in events
        if e.get("event") == "job_claimed" and e.get("job_id") in dropped
    }
    lag = {k: (claims[k] - t) * 1e3 for k, t in dropped.items() if k in claims}
    with_poke = [v for k, v in lag.items() if k in poked]
    bare = [v for k, v in lag.items() if k not in poked]
    stages = 3 * measured.done
    out: dict[str, Any] = {
        "workload": workload.name,
        "policy": policy,
        "makespan_s": measured.makespan_s,
        "lower_bound_s": 0.0,
        "ratio": None,
        "loads": sum(stats.get("loads", {}).values()),
        "slot_occupancy": measured.slot_occupancy,
        "p50_latency_s": measured.p50_latency_s,
        "p99_latency_s": measured.p99_latency_s,
        "jobs_per_min": measured.jobs_per_min,
        "s_per_job": None,
        "jobs": measured.jobs,
        "done": measured.done,
        "failed": measured.failed,
        "speed": 1.0,
        "seed": opts.seed,
        "profile": workload.profile,
        "slots": workload.slots,
        "max_loaded": workload.max_loaded,
        "wall_s": wall,
        "daemon_cpu_s": daemon_cpu,
        "sim_cpu_s": sim_cpu,
        "overhead": {
            "stages": stages,
            "stages_per_s": stages / measured.makespan_s if measured.makespan_s else None,
            "daemon_cpu_ms_per_stage": (daemon_cpu or 0.0) * 1e3 / max(1, stages),
            "drops": len(dropped),
            "claimed": len(lag),
            "drop_to_claim_p50_ms": percentile(with_poke, 50),
            "drop_to_claim_p99_ms": percentile(with_poke, 99),
            "unpoked_p50_ms": percentile(bare, 50),
            "unpoked_p99_ms": percentile(bare, 99),
        },
    }
    if opts.keep or opts.cprofile:
        out["run_dir"] = str(root)
    else:
        shutil.rmtree(root, ignore_errors=True)
    if progress is not None:
        over = out["overhead"]
        progress(
            f"overhead/{policy}: {over['stages_per_s'] or 0:.0f} stages/s, drop-to-claim p50 "
            f"{over['drop_to_claim_p50_ms'] or 0:.1f} ms"
        )
    return out
