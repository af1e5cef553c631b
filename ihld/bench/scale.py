"""Queue size: what a million waiting jobs cost in memory, on disk and at restart.

    ihld bench --workload scale                 # 10k, 100k and 1M queued jobs, side by side
    ihld bench --workload scale-100k --json

For each size N, one JSONL file of N debate jobs goes into the inbox of a
daemon whose backend (the ``instant`` simulator profile, 4 slots) is not up
yet, so the queue is measured alone:

* **claim rate**: N / (file accepted - file dropped), from the event log;
* **memory**: the daemon's resident set (``VmRSS``) once the file is in and
  the engine's window is full, and its peak (``VmHWM``);
* **disk**: the job store's bytes (``work/queue.db`` and its WAL) per queued job.

Then the simulator starts and jobs run; once 1,000 stages are done:

* **busy claim rate**: a second file of N/10 jobs while the slots are busy
  (intake shares the daemon's interpreter with the engine);
* **restart**: the daemon is killed (``SIGKILL``) and started again; the time
  from ``exec`` to ``daemon_ready`` (``READY=1`` follows it), and memory again;
* **10 % half done**: killed again, 10 % of the waiting jobs are given the
  progress of a job that finished its first stage (a real one from this run,
  written into the store: a run would take hours to get there), restarted.

The window of jobs in memory (``[limits] max_jobs_in_memory``) is the same
at every size.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ihld.bench.metrics import epoch
from ihld.bench.procs import DaemonProcess, SimProcess, wait_for
from ihld.bench.workloads import debate_job
from ihld.client.submit import submit_file

SIZES = {"scale-10k": 10_000, "scale-100k": 100_000, "scale-1m": 1_000_000}


@dataclass
class ScaleResult:
    jobs: int
    claim_s: float
    claim_rate: float  # jobs/s, nothing running yet
    busy_claim_rate: float  # jobs/s of a second file (N/10) while the simulator's slots are busy
    rss_mb: float  # after intake, the window full
    peak_mb: float  # VmHWM during intake
    disk_bytes_per_job: float
    restart_ready_s: float
    restart_rss_mb: float
    half_done_ready_s: float
    half_done_rss_mb: float
    half_done_disk_bytes_per_job: float
    source_bytes_per_job: float  # the JSONL itself, for comparison


def _memory(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) in MB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields["VmRSS"], fields["VmHWM"]


def _store_bytes(spool: Path) -> int:
    return sum(p.stat().st_size for p in (spool / "work").glob("queue.db*"))


class _Log:
    """The daemon's event log, read as it grows (a 1M-job run writes millions of lines)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.found: dict[str, list[dict[str, Any]]] = {}
        self.stages_finished = 0

    def poll(self) -> int:
        """Read what is new; the stages finished so far."""
        self.events("")
        return self.stages_finished

    def events(self, name: str) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
        except FileNotFoundError:
            return self.found.get(name, [])
        end = data.rfind(b"\n") + 1
        self.offset += end
        self.stages_finished += data.count(b'"event":"stage_finished"', 0, end)
        for line in data[:end].splitlines():
            if b'"event":"daemon_ready"' in line or b'"event":"file_accepted"' in line:
                event = json.loads(line)
                self.found.setdefault(event["event"], []).append(event)
        return self.found.get(name, [])


def _config(root: Path, url: str) -> Path:
    path = root / "ihld.toml"
    path.write_text(
        f'[spool]\ndir = "{root / "spool"}"\nsettle_s = 0.05\n\n'
        f'[[backends]]\nname = "sim"\nurl = "{url}"\nslots = 4\nmax_loaded = 3\n\n'
        f"[limits]\nmax_job_bytes = {1 << 30}\n\n"
        "[log]\nstderr = false\n\n[control]\ngrace_s = 5\n"
    )
    return path


def _start(config: Path, root: Path, log: _Log, runs: int) -> tuple[DaemonProcess, float]:
    """Start the daemon; (process, seconds from exec to its ``daemon_ready``)."""
    started = time.time()
    daemon = DaemonProcess(config, once=False, log=root / f"daemon-{runs}.log")
    wait_for(lambda: len(log.events("daemon_ready")) > runs, 300, "daemon_ready", 0.02)
    ready = epoch(log.events("daemon_ready")[runs]["timestamp"])
    return daemon, ready - started


def _settled_memory(daemon: DaemonProcess) -> float:
    """RSS once the feeder has filled the engine's window (the taking stops growing)."""
    time.sleep(2.0)
    return _memory(daemon.proc.pid)[0]


def _half_done(spool: Path, share: float = 0.1) -> None:
    """Give ``share`` of the waiting jobs the progress of a job past its first stage."""
    db = sqlite3.connect(spool / "work" / "queue.db", timeout=60)
    try:
        row = db.execute(
            "SELECT progress FROM jobs WHERE progress LIKE '%\"proposer\"%' LIMIT 1"
        ).fetchone()
        if row is None:
            raise RuntimeError("no job finished its first stage: run longer before --half-done")
        every = round(1 / share)
        with db:
            db.execute(
                "UPDATE jobs SET progress = ? WHERE progress IS NULL AND seq % ? = 0",
                (row[0], every),
            )
    finally:
        db.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _write_jobs(path: Path, jobs: int, prefix: str) -> int:
    with open(path, "w", encoding="utf-8") as fh:
        for n in range(jobs):
            fh.write(json.dumps(debate_job(n, prefix=prefix), separators=(",", ":")) + "\n")
    return path.stat().st_size


def _claim(spool: Path, batch: Path, log: _Log, files: int) -> float:
    """Drop ``batch`` into the inbox; seconds until the daemon has accepted all of it."""
    dropped = time.time()
    submit_file(batch, spool / "inbox")
    wait_for(lambda: len(log.events("file_accepted")) >= files, 1800, f"{batch.name}", 0.05)
    return epoch(log.events("file_accepted")[files - 1]["timestamp"]) - dropped


def run_size(jobs: int, workdir: Path) -> ScaleResult:
    root = workdir / f"scale-{jobs}"
    root.mkdir(parents=True)
    spool = root / "spool"
    (spool / "inbox").mkdir(parents=True)
    source_bytes = _write_jobs(root / "scale.jsonl", jobs, "scale")
    busy_jobs = max(1000, jobs // 10)
    _write_jobs(root / "busy.jsonl", busy_jobs, "busy")
    port = _free_port()  # the simulator starts once the queue is measured
    config = _config(root, f"http://127.0.0.1:{port}")
    log = _Log(spool / "log" / "ihld.jsonl")
    sim: SimProcess | None = None
    daemon, _ready = _start(config, root, log, 0)
    try:
        claim_s = _claim(spool, root / "scale.jsonl", log, 1)
        disk = _store_bytes(spool)
        rss = _settled_memory(daemon)
        peak = _memory(daemon.proc.pid)[1]

        sim = SimProcess(
            "instant", 1.0, slots=4, max_loaded=3, seed=0, log=root / "sim.log", port=port
        )
        wait_for(lambda: log.poll() >= 1000, 600, "1,000 stages on the simulator")
        busy_s = _claim(spool, root / "busy.jsonl", log, 2)

        daemon.proc.send_signal(signal.SIGKILL)
        daemon.proc.wait()
        daemon, restart_ready = _start(config, root, log, 1)
        restart_rss = _settled_memory(daemon)

        daemon.proc.send_signal(signal.SIGKILL)
        daemon.proc.wait()
        _half_done(spool)
        half_disk = _store_bytes(spool)
        daemon, half_ready = _start(config, root, log, 2)
        half_rss = _settled_memory(daemon)
    finally:
        daemon.stop()
        if sim is not None:
            sim.stop()
    return ScaleResult(
        jobs=jobs,
        claim_s=round(claim_s, 3),
        claim_rate=round(jobs / claim_s),
        busy_claim_rate=round(busy_jobs / busy_s),
        rss_mb=round(rss, 1),
        peak_mb=round(peak, 1),
        disk_bytes_per_job=round(disk / jobs, 1),
        restart_ready_s=round(restart_ready, 3),
        restart_rss_mb=round(restart_rss, 1),
        half_done_ready_s=round(half_ready, 3),
        half_done_rss_mb=round(half_rss, 1),
        half_done_disk_bytes_per_job=round(half_disk / (jobs + busy_jobs), 1),
        source_bytes_per_job=round(source_bytes / jobs, 1),
    )


ROWS = (
    ("claim rate (jobs/s)", "claim_rate"),
    ("claim time (s)", "claim_s"),
    ("claim rate, N/10 more while 4 slots are busy (jobs/s)", "busy_claim_rate"),
    ("resident memory after intake (MB)", "rss_mb"),
    ("peak resident memory (MB)", "peak_mb"),
    ("job store bytes per queued job", "disk_bytes_per_job"),
    ("restart (SIGKILL) to READY (s)", "restart_ready_s"),
    ("resident memory after restart (MB)", "restart_rss_mb"),
    ("10 % half done: restart to READY (s)", "half_done_ready_s"),
    ("10 % half done: resident memory (MB)", "half_done_rss_mb"),
    ("10 % half done: store bytes per job", "half_done_disk_bytes_per_job"),
    ("the JSONL file, bytes per job", "source_bytes_per_job"),
)


def bench_scale(names: list[str], *, jobs: int | None, as_json: bool, keep: bool = False) -> int:
    sizes = [jobs] if jobs else [SIZES[n] for n in names if n in SIZES] or list(SIZES.values())
    workdir = Path(tempfile.mkdtemp(prefix="ihld-scale-"))
    results = []
    try:
        for size in sizes:
            results.append(run_size(size, workdir))
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    if as_json:
        print(json.dumps([asdict(r) for r in results], indent=2))
        return 0
    print(f"scale: {os.cpu_count()} CPUs; instant simulator, 4 slots; one window at every size")
    header = "| | " + " | ".join(f"{r.jobs:,} jobs" for r in results) + " |"
    print(header)
    print("|---|" + "---:|" * len(results))
    for label, key in ROWS:
        print(f"| {label} | " + " | ".join(f"{getattr(r, key):,}" for r in results) + " |")
    if keep:
        print(f"kept: {workdir}")
    return 0
