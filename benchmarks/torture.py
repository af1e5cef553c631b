"""Crash torture: ``kill -9`` the daemon again and again, then check every promise.

A batch of debate jobs (3 stages, 2 models that do not fit together, so the
scheduler switches models) runs against the built-in simulator while the
daemon is killed with SIGKILL over and over and restarted each time:

* **fail point kills**: ``IHLD_FAILPOINTS=<name>:sigkill@N`` makes the daemon
  kill itself at an exact step (claim, checkpoint, result, intake);
* **event kills**: the harness tails the event log and kills the daemon the
  moment it logs ``model_loading`` (a model switch), ``job_claimed``,
  ``stage_finished`` (the checkpoint write that follows it) or
  ``job_finished``;
* **random kills**: at a random moment after the start (start-up and spool
  recovery included).

Some lives also switch the scheduling policy (``fifo`` swaps models on
every stage), and job files keep arriving while the daemon is killed, some
dropped atomically, some written in place like a plain ``cp``.

Afterwards (one last daemon without fail points finishes the batch and is
stopped with SIGTERM) the harness checks:

1. every job id is in exactly one of ``outbox/`` and ``failed/``; none lost;
2. every result and error file parses as strict JSON, names its own id, and
   no record was written twice (no ``<id>~2.json``);
3. no finished stage was sent again: at every kill the harness notes which
   stages were finished on disk (``outputs`` of ``work/jobs/<id>.json``, or in
   the result) and how long the simulator's request log was; no request
   after that point may carry one of those stages in its ``X-Ihld-Task``
   header. (A stage that was *in flight* at a kill is sent again after the
   restart: it was never checkpointed. Those are counted, not failed.)
4. nothing is left in ``inbox/``, ``work/claimed/`` or ``work/jobs/``, and no
   temp file is visible.

``[spool] max_recoveries`` is raised for the run (the poison rule would
otherwise quarantine a job that was running at three of the ~100 kills); the
report says how many jobs *would* have been poisoned at the default of 3.

Run it::

    .venv/bin/python -m benchmarks.torture                 # 400 jobs, 120 kills
    .venv/bin/python -m benchmarks.torture --jobs 60 --kills 10 --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ihld.core.storeview import count_jobs, read_ids, read_progress

REPO = Path(__file__).resolve().parent.parent
IHLD = [sys.executable, "-m", "ihld"]

# Every fail point in ihld's file code (ihld/common/failpoints.py lists them).
CLAIM_POINTS = ("claim.before_rename", "claim.after_rename")
INTAKE_POINTS = ("store.intake_before_commit", "intake.after_job_saved", "intake.before_release")
WORK_POINTS = (
    "store.progress_mid_write",
    "checkpoint.before_publish",
    "checkpoint.before_remove",
    "checkpoint.after_publish",
    "checkpoint.after_remove",
    "result.before_publish",
    "result.after_publish",
)
FAILPOINTS = CLAIM_POINTS + INTAKE_POINTS + WORK_POINTS
KILL_EVENTS = ("model_loading", "job_claimed", "stage_finished", "job_finished")
STAGES = ("proposer", "critic", "judge")


# -- processes ------------------------------------------------------------------------


@dataclass
class Sim:
    """The simulator as a subprocess (``ihld sim``)."""

    proc: subprocess.Popen[str]
    url: str

    @classmethod
    def start(cls, profile: str, speed: float, *args: str, port: int = 0, cwd: Path = REPO) -> Sim:
        proc = subprocess.Popen(
            [*IHLD, "sim", "--port", str(port), "--profile", profile, "--speed", str(speed), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            cwd=cwd,
        )
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.search(r"listening on (http://\S+)", line)
        if not match:
            proc.kill()
            proc.wait()
            raise RuntimeError(f"simulator did not start: {line!r}")
        return cls(proc, match.group(1))

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"{self.url}{path}", timeout=30) as resp:
            return json.loads(resp.read())

    def post(self, path: str, body: dict[str, Any]) -> Any:
        request = urllib.request.Request(
            f"{self.url}{path}",
            data=json.dumps(body).encode(),
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as resp:
            return json.loads(resp.read() or b"null")

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = self.get("/sim/stats")
        return result

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def write_config(
    path: Path,
    spool: Path,
    url: str,
    *,
    policy: str = "affinity",
    slots: int = 4,
    max_recoveries: int = 1000,
    extra: str = "",
) -> None:
    path.write_text(
        f'[spool]\ndir = "{spool}"\nsettle_s = 0.2\nrescan_s = 0.3\n'
        f"max_recoveries = {max_recoveries}\n\n"
        f'[[backends]]\nname = "sim"\nurl = "{url}"\nslots = {slots}\nmax_loaded = 1\n'
        "connect_timeout_s = 2\nread_timeout_s = 10\n\n"
        f'[scheduler]\npolicy = "{policy}"\nfifo_workers = {slots}\n\n'
        "[limits]\nretry_backoff_s = 0.05\nstage_timeout_s = 30\n\n"
        '[log]\nstderr = true\nlevel = "info"\n\n[control]\ngrace_s = 5\n\n'
        f"{extra}"
    )


def control(spool: Path, method: str = "GET", path: str = "/status") -> dict[str, Any] | None:
    """One request to the daemon's control socket; None when nothing answers."""
    import asyncio

    from ihld.client.submit import control_request

    return asyncio.run(control_request(spool / "run" / "ihld.sock", method, path))


def wait_ready(spool: Path, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> bool:
    """Until the control socket answers (recovery done); False if the process died first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if (spool / "run" / "ihld.sock").exists() and control(spool) is not None:
            return True
        time.sleep(0.05)
    return False


def debate_job(job_id: str) -> dict[str, Any]:
    return {"id": job_id, "pipeline": "debate", "input": {"topic": f"topic of {job_id}"}}


# -- what is on disk --------------------------------------------------------------------


def finished_stages(spool: Path) -> tuple[set[tuple[str, str]], list[str]]:
    """Stages finished on disk (progress in the job store, results), and files that did not
    parse (the store is SQLite's: a torn write there is rolled back, never read)."""
    done: set[tuple[str, str]] = set()
    corrupt: list[str] = []
    for job_id, progress in read_progress(spool / "work" / "queue.db").items():
        done |= {(job_id, stage) for stage in progress["outputs"]}
    for path in (spool / "outbox").glob("*.json"):
        try:
            record = json.loads(path.read_bytes())
        except ValueError:
            corrupt.append(str(path.relative_to(spool)))
            continue
        done |= {(record["id"], stage["name"]) for stage in record["stages"]}
    return done, corrupt


def in_progress(spool: Path) -> int:
    """Jobs in the job store (not finished), plus claimed files, right now."""
    jobs = count_jobs(spool / "work" / "queue.db")
    claims = sum(1 for p in (spool / "work" / "claimed").iterdir() if not p.name.startswith("."))
    return jobs + claims


def records(directory: Path) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """``<stem>: record`` for every ``*.json`` of ``directory``, and the files that do not parse."""
    from ihld.common import jsonsafe

    out: dict[str, dict[str, Any]] = {}
    bad: list[str] = []
    for path in sorted(directory.glob("*.json")):
        try:
            value = jsonsafe.loads(path.read_bytes().decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            bad.append(path.name)
            continue
        out[path.stem] = value
    return out, bad


def audit(
    spool: Path,
    done: set[str],
    failed: dict[str, str],
    *,
    stages: tuple[str, ...] | None = STAGES,
) -> list[str]:
    """Everything wrong with a spool that should hold exactly these outcomes, at rest.

    ``done``: ids expected in ``outbox/``; ``failed``: ``failed/`` record name (``id`` or
    ``id~2`` for a duplicate) -> error kind. Checks: nothing missing or extra, every record
    strict JSON naming its id, results complete (``stages``: expected stage names, or None
    to skip), nothing left in the inbox, claims or checkpoints, no temp file visible.
    """
    problems: list[str] = []
    outbox, bad_out = records(spool / "outbox")
    failures, bad_failed = records(spool / "failed")
    problems += [f"outbox/{n} does not parse" for n in bad_out]
    problems += [f"failed/{n} does not parse" for n in bad_failed]
    if set(outbox) != done:
        problems.append(
            f"outbox: missing {sorted(done - set(outbox))}, extra {sorted(set(outbox) - done)}"
        )
    kinds = {name: str((r.get("error") or {}).get("kind")) for name, r in failures.items()}
    if kinds != failed:
        wrong = {n: (kinds.get(n), failed.get(n)) for n in set(kinds) | set(failed)}
        problems.append(
            "failed/ (found, expected): "
            + repr({n: v for n, v in sorted(wrong.items()) if v[0] != v[1]})
        )
    for name, record in [*outbox.items(), *failures.items()]:
        if record.get("id") != name.split("~")[0]:
            problems.append(f"{name}: record names id {record.get('id')!r}")
    both = set(outbox) & {n for n in failures if "~" not in n}
    if both:
        problems.append(f"in both outbox/ and failed/: {sorted(both)}")
    for job_id, record in outbox.items():
        names = tuple(s.get("name") for s in record.get("stages", []))
        if stages is not None and names != stages:
            problems.append(f"outbox/{job_id}: stages {names}")
        if any(s.get("output") is None for s in record.get("stages", [])):
            problems.append(f"outbox/{job_id}: a stage without output")
    for directory in ("inbox", "work/claimed"):
        left = sorted(p.name for p in (spool / directory).iterdir())
        if left:
            problems.append(f"left in {directory}: {left[:10]}")
    if stored := count_jobs(spool / "work" / "queue.db"):
        problems.append(f"left in the job store: {stored} jobs")
    for directory in ("outbox", "failed", "work/claimed", "failed/inputs"):
        temps = [p.name for p in (spool / directory).iterdir() if p.name.endswith(".tmp")]
        if temps:
            problems.append(f"temp files in {directory}: {temps[:10]}")
    return problems


def resent_after(
    requests: list[dict[str, Any]], since: int, finished: set[tuple[str, str]]
) -> list[str]:
    """Requests from index ``since`` on that carry a stage of ``finished`` (job, stage)."""
    out = []
    for index, entry in enumerate(requests[since:], start=since):
        task = entry.get("task")
        if task and tuple(task.split("/")[:2]) in finished:
            out.append(f"#{index} {task}")
    return out


# -- the run --------------------------------------------------------------------------


@dataclass
class Kill:
    life: int
    mode: str  # failpoint | event | random
    detail: str  # the fail point, the event, or the delay
    fired: bool  # the fail point / event happened (else a random kill replaced it)
    policy: str
    at_s: float  # seconds after the daemon was started
    in_progress: int  # checkpoints + claims on disk after the kill
    finished_stages: int
    requests_before: int


@dataclass
class Report:
    jobs: int
    kills: int
    seed: int
    speed: float
    profile: str
    wall_s: float = 0.0
    kill_log: list[Kill] = field(default_factory=list)
    kills_by_mode: dict[str, int] = field(default_factory=dict)
    failpoints_fired: dict[str, int] = field(default_factory=dict)
    events_killed_on: dict[str, int] = field(default_factory=dict)
    in_outbox: int = 0
    in_failed: int = 0
    failed_kinds: dict[str, int] = field(default_factory=dict)
    lost: list[str] = field(default_factory=list)
    in_both: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)
    incomplete_results: list[str] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)
    finished_resent: list[str] = field(default_factory=list)
    finished_unfinished: list[str] = field(default_factory=list)
    kills_with_work: int = 0  # kills that left jobs checkpointed or claimed on disk
    inflight_rerun: int = 0  # stages completed at the simulator more than once
    chat_requests: int = 0
    model_loads: int = 0
    max_recoveries_seen: int = 0
    would_be_poison_at_3: int = 0
    final_exit: int | None = None
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (
            self.lost
            or self.in_both
            or self.unexpected
            or self.duplicates
            or self.corrupt
            or self.incomplete_results
            or self.leftovers
            or self.finished_resent
            or self.finished_unfinished
            or self.errors
            or self.final_exit != 0
        )

    def problems(self) -> dict[str, Any]:
        keys = (
            "lost",
            "in_both",
            "unexpected",
            "duplicates",
            "corrupt",
            "incomplete_results",
            "leftovers",
            "finished_resent",
            "finished_unfinished",
            "errors",
        )
        found: dict[str, Any] = {k: getattr(self, k)[:20] for k in keys if getattr(self, k)}
        if self.final_exit != 0:
            found["final_exit"] = self.final_exit
        return found

    def summary(self) -> str:
        lines = [
            f"torture: {self.jobs} jobs, {len(self.kill_log)} kills, seed {self.seed}, "
            f"profile {self.profile} x{self.speed:g}, {self.wall_s:.0f} s",
            f"  kills by mode: {dict(sorted(self.kills_by_mode.items()))}; "
            f"{self.kills_with_work} left unfinished work on disk",
            f"  fail points fired: {dict(sorted(self.failpoints_fired.items()))}",
            f"  kills on events: {dict(sorted(self.events_killed_on.items()))}",
            f"  outbox {self.in_outbox}, failed {self.in_failed} {self.failed_kinds or ''}",
            f"  lost {len(self.lost)}, in both {len(self.in_both)}, duplicates "
            f"{len(self.duplicates)}, corrupt {len(self.corrupt)}, leftovers {len(self.leftovers)}",
            f"  finished stages re-sent {len(self.finished_resent)}; stages re-run because "
            f"they were in flight at a kill {self.inflight_rerun}",
            f"  chat requests {self.chat_requests}, model loads {self.model_loads}, "
            f"most recoveries of one job {self.max_recoveries_seen}, jobs that the default "
            f"max_recoveries = 3 would have poisoned {self.would_be_poison_at_3}",
            f"  final daemon exit {self.final_exit}; {'OK' if self.ok else 'FAILED'}",
        ]
        if not self.ok:
            lines.append(f"  problems: {json.dumps(self.problems())[:2000]}")
        return "\n".join(lines)


class Torture:
    def __init__(
        self,
        workdir: Path,
        *,
        jobs: int = 400,
        kills: int = 120,
        seed: int = 1,
        speed: float = 10.0,
        profile: str = "laptop-6gb-4slot",
        slots: int = 4,
        files: int | None = None,
        failpoint_share: float = 0.4,
        event_share: float = 0.3,
        fifo_share: float = 0.25,
        life_s: tuple[float, float] = (0.3, 2.5),
        finish_timeout_s: float = 600.0,
        modes: list[str] | None = None,
        wait_s: tuple[float, float] = (5.0, 9.0),
        log: Any = None,
    ) -> None:
        self.workdir = workdir
        self.spool = workdir / "spool"
        self.config = workdir / "ihld.toml"
        self.jobs = jobs
        self.kills = kills
        self.rng = random.Random(seed)
        self.speed = speed
        self.profile = profile
        self.slots = slots
        self.files = files or max(4, jobs // 10)
        self.failpoint_share = failpoint_share
        self.event_share = event_share
        self.fifo_share = fifo_share
        self.life_s = life_s
        self.finish_timeout_s = finish_timeout_s
        self.modes = modes  # a fixed cycle of kill modes instead of random shares
        self.wait_s = wait_s  # how long a life waits for its fail point or event
        self.log = log or (lambda message: None)
        self.report = Report(jobs=jobs, kills=kills, seed=seed, speed=speed, profile=profile)
        self.ids = [f"t{n:05d}" for n in range(jobs)]
        self.batches = self._batches()
        self.sim: Sim | None = None
        self.snapshots: list[tuple[int, set[tuple[str, str]]]] = []
        self.drop_plan: list[int] = []
        self._lives = 0

    # -- set-up ------------------------------------------------------------------------

    def _batches(self) -> list[tuple[str, str]]:
        """The jobs as (file name, text): mostly JSON Lines, every fourth file one job per .json."""
        per_file = max(1, len(self.ids) // self.files)
        out: list[tuple[str, str]] = []
        index = 0
        number = 0
        while index < len(self.ids):
            if number % 4 == 3:
                job_id = self.ids[index]
                out.append((f"{job_id}.json", json.dumps(debate_job(job_id))))
                index += 1
            else:
                chunk = self.ids[index : index + per_file]
                text = "".join(json.dumps(debate_job(j)) + "\n" for j in chunk)
                out.append((f"batch{number:03d}.jsonl", text))
                index += len(chunk)
            number += 1
        return out

    def drop_next(self) -> bool:
        """Drop the next job file into the inbox: atomically, or written in place (a ``cp``)."""
        if not self.batches:
            return False
        name, text = self.batches.pop(0)
        inbox = self.spool / "inbox"
        inbox.mkdir(parents=True, exist_ok=True)
        if self.rng.random() < 0.7:
            tmp = inbox / f".{name}.tmp"
            tmp.write_text(text)
            tmp.rename(inbox / name)
        else:
            with open(inbox / name, "w") as fh:
                half = len(text) // 2
                fh.write(text[:half])
                fh.flush()
                fh.write(text[half:])
        return True

    # -- one life --------------------------------------------------------------------------

    def start_daemon(self, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        self._lives += 1
        stderr = open(self.workdir / "daemon.stderr", "ab")  # noqa: SIM115 - closed below
        try:
            return subprocess.Popen(
                [*IHLD, "run", "--config", str(self.config)],
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                cwd=REPO,
                env={**os.environ, "IHLD_FAILPOINTS": "", **(env or {})},
            )
        finally:
            stderr.close()

    def _log_offset(self) -> int:
        try:
            return (self.spool / "log" / "ihld.jsonl").stat().st_size
        except FileNotFoundError:
            return 0

    def _wait_event(
        self, proc: subprocess.Popen[bytes], offset: int, events: tuple[str, ...], timeout: float
    ) -> str | None:
        """Poll the event log from ``offset`` until one of ``events`` appears."""
        path = self.spool / "log" / "ihld.jsonl"
        deadline = time.monotonic() + timeout
        buffer = b""
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                with open(path, "rb") as fh:
                    fh.seek(offset)
                    chunk = fh.read()
            except FileNotFoundError:
                chunk = b""
            offset += len(chunk)
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                for event in events:
                    if f'"event": "{event}"'.encode() in line or (
                        f'"event":"{event}"'.encode() in line
                    ):
                        return event
            time.sleep(0.002)
        return None

    def one_life(self, life: int) -> None:
        rng = self.rng
        policy = "fifo" if rng.random() < self.fifo_share else "affinity"
        write_config(self.config, self.spool, self._sim().url, policy=policy, slots=self.slots)
        roll = rng.random()
        if self.modes:
            wanted = self.modes[(life - 1) % len(self.modes)]
            roll = {"failpoint": 0.0, "event": self.failpoint_share, "random": 1.0}[wanted]
        remaining_files = bool(self.batches)
        drops = self.drop_plan.count(life)
        env: dict[str, str] = {}
        mode, detail = "random", ""
        if roll < self.failpoint_share:
            names = FAILPOINTS if remaining_files else WORK_POINTS
            detail = rng.choice(names)
            if detail in CLAIM_POINTS + INTAKE_POINTS:
                # the n-th claim of this life: drop at least n files
                nth = rng.randint(1, min(3, len(self.batches)))
                drops = max(drops, nth)
            else:
                nth = rng.randint(1, 4)
            env["IHLD_FAILPOINTS"] = f"{detail}:sigkill@{nth}"
            detail = f"{detail}@{nth}"
            mode = "failpoint"
        elif roll < self.failpoint_share + self.event_share:
            mode = "event"
            events = (
                KILL_EVENTS
                if remaining_files
                else tuple(e for e in KILL_EVENTS if e != "job_claimed")
            )
            detail = rng.choice(events)
            if detail == "job_claimed":
                drops = max(drops, 1)
        offset = self._log_offset()
        started = time.monotonic()
        proc = self.start_daemon(env)
        if drops:
            time.sleep(rng.uniform(0.0, 0.8))
            for _ in range(drops):
                self.drop_next()
        fired = False
        if mode == "failpoint":
            try:
                proc.wait(rng.uniform(*self.wait_s))
                fired = proc.returncode == -signal.SIGKILL
            except subprocess.TimeoutExpired:
                pass
            if not fired and proc.returncode is not None:
                self.report.errors.append(
                    f"life {life}: daemon exited {proc.returncode} under {detail}"
                )
        elif mode == "event":
            seen = self._wait_event(proc, offset, (detail,), rng.uniform(*self.wait_s))
            fired = seen is not None
        else:
            delay = rng.uniform(*self.life_s)
            detail = f"{delay:.2f}s"
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(delay)
            fired = True
            if proc.returncode is not None:
                self.report.errors.append(f"life {life}: daemon exited {proc.returncode} early")
        at_s = time.monotonic() - started
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        self._after_kill(life, mode, detail, fired, policy, at_s)

    def _after_kill(
        self, life: int, mode: str, detail: str, fired: bool, policy: str, at_s: float
    ) -> None:
        finished, corrupt = finished_stages(self.spool)
        self.report.corrupt.extend(f"life {life}: {name}" for name in corrupt)
        requests = len(self._sim().get("/sim/requests"))
        if self.snapshots:
            lost = self.snapshots[-1][1] - finished
            self.report.finished_unfinished.extend(
                f"life {life}: {job}/{stage} no longer finished" for job, stage in sorted(lost)
            )
        self.snapshots.append((requests, finished))
        kill = Kill(
            life=life,
            mode=mode,
            detail=detail,
            fired=fired,
            policy=policy,
            at_s=round(at_s, 3),
            in_progress=in_progress(self.spool),
            finished_stages=len(finished),
            requests_before=requests,
        )
        self.report.kill_log.append(kill)
        self.log(
            f"kill {life:3d}: {mode:9} {detail:32} fired={fired!s:5} {policy:8} "
            f"t={at_s:5.2f}s in_progress={kill.in_progress:4d} finished={len(finished)}"
        )

    def _sim(self) -> Sim:
        assert self.sim is not None
        return self.sim

    # -- the whole run ---------------------------------------------------------------------

    def run(self) -> Report:
        t0 = time.monotonic()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.sim = Sim.start(self.profile, self.speed, "--seed", "7")
        try:
            # half of the files are there before the first start
            for _ in range(len(self.batches) // 2):
                self.drop_next()
            # the other half arrives during the first 70 % of the lives, so claims keep happening
            window = max(1, int(self.kills * 0.7))
            self.drop_plan = [self.rng.randint(1, window) for _ in self.batches]
            for life in range(1, self.kills + 1):
                self.one_life(life)
            while self.drop_next():
                pass
            self._finish()
            self._verify()
        finally:
            self.sim.stop()
        self.report.wall_s = round(time.monotonic() - t0, 1)
        self._tally()
        return self.report

    def _finish(self) -> None:
        write_config(self.config, self.spool, self._sim().url, policy="affinity", slots=self.slots)
        proc = self.start_daemon()
        deadline = time.monotonic() + self.finish_timeout_s
        wanted = set(self.ids)
        try:
            wait_ready(self.spool, proc, timeout=60)
            while time.monotonic() < deadline and proc.poll() is None:
                done = {p.stem for p in (self.spool / "outbox").glob("*.json")}
                failed = {p.stem for p in (self.spool / "failed").glob("*.json")}
                if wanted <= done | failed and not any((self.spool / "inbox").iterdir()):
                    break
                time.sleep(0.2)
            else:
                self.report.errors.append(
                    "the last daemon did not finish the batch "
                    f"(exit {proc.poll()}, {time.monotonic() - deadline:+.0f} s past the deadline)"
                )
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.report.final_exit = proc.returncode

    def _verify(self) -> None:
        report = self.report
        outbox, bad_out = records(self.spool / "outbox")
        failed, bad_failed = records(self.spool / "failed")
        report.corrupt.extend(f"outbox/{n}" for n in bad_out)
        report.corrupt.extend(f"failed/{n}" for n in bad_failed)
        wanted = set(self.ids)
        report.in_outbox = len(outbox)
        report.in_failed = len(failed)
        report.lost = sorted(wanted - set(outbox) - set(failed))
        report.in_both = sorted(set(outbox) & set(failed))
        report.unexpected = sorted((set(outbox) | set(failed)) - wanted)
        report.duplicates = sorted(n for n in [*outbox, *failed] if "~" in n)
        for stem, record in [*outbox.items(), *failed.items()]:
            if record.get("id") != stem and "~" not in stem:
                report.corrupt.append(f"{stem}: names id {record.get('id')!r}")
        kinds = Counter(str(r.get("error", {}).get("kind")) for r in failed.values())
        report.failed_kinds = dict(kinds)
        for job_id, record in outbox.items():
            names = [s.get("name") for s in record.get("stages", [])]
            if names != list(STAGES) or any(s.get("output") is None for s in record["stages"]):
                report.incomplete_results.append(job_id)
        recoveries = [
            sum(1 for e in r.get("events", []) if e.get("event") == "job_recovered")
            for r in [*outbox.values(), *failed.values()]
        ]
        report.max_recoveries_seen = max(recoveries, default=0)
        report.would_be_poison_at_3 = sum(1 for n in recoveries if n >= 3)
        for directory in ("inbox", "work/claimed"):
            for path in (self.spool / directory).iterdir():
                report.leftovers.append(f"{directory}/{path.name}")
        stored = read_ids(self.spool / "work" / "queue.db")
        report.leftovers += [f"work/queue.db: {job_id}" for job_id in stored]
        for directory in ("outbox", "failed", "work/claimed"):
            for path in (self.spool / directory).iterdir():
                if path.name.endswith(".tmp"):
                    report.leftovers.append(f"{directory}/{path.name}")
        self._check_resends()

    def _check_resends(self) -> None:
        """No request after a kill may carry a stage that was finished on disk at that kill."""
        report = self.report
        log = self._sim().get("/sim/requests")
        report.chat_requests = sum(1 for e in log if e.get("kind") == "chat")
        report.model_loads = int(sum(self._sim().stats()["loads"].values()))
        finished_from: dict[tuple[str, str], int] = {}
        for index, finished in self.snapshots:
            for key in finished:
                finished_from.setdefault(key, index)
        completed: Counter[tuple[str, str]] = Counter()
        for index, entry in enumerate(log):
            task = entry.get("task")
            if not task:
                continue
            job, stage, attempt = task.split("/")
            key = (job, stage)
            if entry.get("completed"):
                completed[key] += 1
            since = finished_from.get(key)
            if since is not None and index >= since:
                report.finished_resent.append(
                    f"{job}/{stage} (attempt {attempt}) sent at request #{index}, "
                    f"finished on disk since request #{since}"
                )
        report.inflight_rerun = sum(n - 1 for n in completed.values() if n > 1)

    def _tally(self) -> None:
        report = self.report
        modes: Counter[str] = Counter()
        points: Counter[str] = Counter()
        events: Counter[str] = Counter()
        for kill in report.kill_log:
            modes[kill.mode if kill.fired else f"{kill.mode} (missed, random kill)"] += 1
            if kill.mode == "failpoint" and kill.fired:
                points[kill.detail.split("@")[0]] += 1
            if kill.mode == "event" and kill.fired:
                events[kill.detail] += 1
        report.kills_by_mode = dict(modes)
        report.kills_with_work = sum(1 for kill in report.kill_log if kill.in_progress)
        report.failpoints_fired = dict(points)
        report.events_killed_on = dict(events)


# -- backend faults and outages (the other figures of RELIABILITY.md) -----------------------


def _events(spool: Path) -> list[dict[str, Any]]:
    path = spool / "log" / "ihld.jsonl"
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def _run_batch(
    workdir: Path,
    sim: Sim,
    jobs: int,
    *,
    extra: str = "",
    read_timeout_s: float = 2.0,
    during: Any = None,
    timeout_s: float = 1800.0,
) -> dict[str, Any]:
    """One daemon, one batch of debates, until every job is in outbox/ or failed/."""
    spool = workdir / "spool"
    config = workdir / "ihld.toml"
    write_config(config, spool, sim.url, slots=2, extra=extra)
    config.write_text(
        config.read_text().replace("read_timeout_s = 10", f"read_timeout_s = {read_timeout_s:g}")
    )
    ids = [f"f{n:05d}" for n in range(jobs)]
    inbox = spool / "inbox"
    inbox.mkdir(parents=True, exist_ok=True)
    (inbox / ".batch.jsonl.tmp").write_text("".join(json.dumps(debate_job(i)) + "\n" for i in ids))
    started = time.monotonic()
    proc = subprocess.Popen(
        [*IHLD, "run", "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=open(workdir / "daemon.stderr", "ab"),  # noqa: SIM115
        cwd=REPO,
        env={**os.environ, "IHLD_FAILPOINTS": ""},
    )
    wait_ready(spool, proc)
    (inbox / ".batch.jsonl.tmp").rename(inbox / "batch.jsonl")
    extra_figures: dict[str, Any] = {}
    if during is not None:
        extra_figures = during(spool) or {}
    deadline = time.monotonic() + timeout_s
    done: set[str] = set()
    failed: set[str] = set()
    while time.monotonic() < deadline:
        done = {p.stem for p in (spool / "outbox").glob("*.json")}
        failed = {p.stem for p in (spool / "failed").glob("*.json")}
        if len(done | failed) >= jobs:
            break
        time.sleep(0.25)
    wall = time.monotonic() - started
    proc.send_signal(signal.SIGTERM)
    exit_code = proc.wait(120)
    problems = audit(spool, set(ids), {})  # every job done, none failed
    events = Counter(e.get("event") for e in _events(spool))
    return {
        "jobs": jobs,
        "done": len(done),
        "failed": len(failed),
        "problems": problems,
        "wall_s": round(wall, 1),
        "exit": exit_code,
        "events": {
            k: events[k]
            for k in (
                "backend_call_retried",
                "stage_retried",
                "backend_down",
                "backend_up",
                "job_failed",
                "commit_failed",
            )
            if events[k]
        },
        **extra_figures,
    }


def run_faults(
    workdir: Path, *, jobs: int, error_rate: float, speed: float, seed: int
) -> dict[str, Any]:
    """A batch against a simulator failing ``error_rate`` of its requests, every kind."""
    workdir.mkdir(parents=True, exist_ok=True)
    sim = Sim.start("laptop-6gb", speed, "--error-rate", str(error_rate), "--seed", str(seed))
    try:
        figures = _run_batch(workdir, sim, jobs)
        stats = sim.stats()
        completed: Counter[str] = Counter(
            "/".join(e["task"].split("/")[:2])
            for e in sim.get("/sim/requests")
            if e["task"] and e["completed"]
        )
    finally:
        sim.stop()
    figures.update(
        error_rate=error_rate,
        chat_requests=stats["chat_requests"],
        faults_injected=stats["faults_injected"],
        stages_completed_twice=sum(1 for n in completed.values() if n > 1),
    )
    return figures


def run_outage(workdir: Path, *, jobs: int, down_s: float, speed: float) -> dict[str, Any]:
    """A batch whose server is stopped for ``down_s`` seconds in the middle, then restarted."""
    workdir.mkdir(parents=True, exist_ok=True)
    box: dict[str, Sim] = {"sim": Sim.start("laptop-6gb", speed)}
    port = int(box["sim"].url.rsplit(":", 1)[1])

    def outage(spool: Path) -> dict[str, Any]:
        while len(list((spool / "outbox").glob("*.json"))) < max(1, jobs // 5):
            time.sleep(0.2)
        before = len(list((spool / "outbox").glob("*.json")))
        box["sim"].stop()
        stopped = time.monotonic()
        seen_down = None
        snapshot: dict[str, Any] | None = None
        while time.monotonic() - stopped < down_s:
            snap = control(spool)
            if snap and not snap["backends"]["sim"]["up"] and seen_down is None:
                seen_down = time.monotonic() - stopped
                snapshot = snap["backends"]["sim"]
            time.sleep(0.5)
        during = len(list((spool / "outbox").glob("*.json"))) - before
        box["sim"] = Sim.start("laptop-6gb", speed, port=port)
        return {
            "down_s": down_s,
            "done_before_outage": before,
            "done_during_outage": during,
            "status_down_after_s": None if seen_down is None else round(seen_down, 1),
            "status_during_outage": snapshot,
        }

    try:
        figures = _run_batch(workdir, box["sim"], jobs, during=outage)
    finally:
        box["sim"].stop()
    events = _events(workdir / "spool")
    down = [e for e in events if e.get("event") in ("backend_down", "backend_up")]
    figures["backend_events"] = [
        {k: e.get(k) for k in ("timestamp", "event", "error")} for e in down
    ]
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.torture", description=__doc__)
    parser.add_argument("--mode", choices=("kill", "faults", "outage"), default="kill")
    parser.add_argument("--jobs", type=int, default=400)
    parser.add_argument("--kills", type=int, default=120)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--speed", type=float, default=10.0)
    parser.add_argument("--profile", default="laptop-6gb-4slot")
    parser.add_argument("--slots", type=int, default=4)
    parser.add_argument("--error-rate", type=float, default=0.1, help="--mode faults")
    parser.add_argument("--down-s", type=float, default=60.0, help="--mode outage")
    parser.add_argument("--workdir", type=Path, help="keep the spool here (default: a temp dir)")
    parser.add_argument("--json", type=Path, help="write the full report (every kill) here")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="ihld-torture-"))
    if args.mode != "kill":
        if args.mode == "faults":
            figures = run_faults(
                workdir,
                jobs=args.jobs,
                error_rate=args.error_rate,
                speed=args.speed,
                seed=args.seed,
            )
        else:
            figures = run_outage(workdir, jobs=args.jobs, down_s=args.down_s, speed=args.speed)
        ok = not figures["problems"] and figures["exit"] == 0 and figures["failed"] == 0
        print(json.dumps({**figures, "ok": ok}, indent=2))
        if args.json:
            args.json.write_text(json.dumps({**figures, "ok": ok}, indent=2) + "\n")
        if args.workdir is None and ok:
            shutil.rmtree(workdir, ignore_errors=True)
        return 0 if ok else 1
    torture = Torture(
        workdir,
        jobs=args.jobs,
        kills=args.kills,
        seed=args.seed,
        speed=args.speed,
        profile=args.profile,
        slots=args.slots,
        log=None if args.quiet else (lambda m: print(m, flush=True)),
    )
    report = torture.run()
    print(report.summary())
    if args.json:
        payload = asdict(report)
        payload["ok"] = report.ok
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    if args.workdir is None and report.ok:
        shutil.rmtree(workdir, ignore_errors=True)
    elif not report.ok:
        print(f"  spool kept in {workdir}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
