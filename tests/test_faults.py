"""Backend and resource faults: a flaky server, a server that goes away, a full disk.

* 10 % of the requests fail (500, 503 busy, dropped connections, errors in
  the middle of a stream, hangs past the idle timeout): every job finishes,
  and no stage is completed twice by the server.
* The server is stopped for several seconds, then started again on the
  same port: jobs are delayed, not failed; ``ihld status --json`` and the
  event log say ``backend_down`` / ``backend_up``. A deadline (the job's
  ``deadline_s`` or ``[limits] job_deadline_s``) is the only way an outage
  fails a job.
* The spool's filesystem fills up (a real 4 MiB tmpfs): claiming pauses,
  checkpoints and results wait, nothing visible is ever partial, and work
  resumes when space returns.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks.torture import Sim, audit, finished_stages
from tests.conftest import IHLD, REPO, DaemonRig, debate_lines, drop


def completed_per_stage(sim: Sim) -> Counter[tuple[str, str]]:
    return Counter(
        (e["task"].split("/")[0], e["task"].split("/")[1])
        for e in sim.get("/sim/requests")
        if e["task"] and e["completed"]
    )


def test_ten_percent_errors_of_every_kind_all_jobs_finish(
    rig_factory: Callable[..., DaemonRig],
) -> None:
    sim = Sim.start("laptop-6gb", 200.0, "--error-rate", "0.1", "--seed", "11")
    try:
        rig = rig_factory(sim.url, slots=2, backend_extra="")
        # a hang lasts until the client gives up: the idle timeout between chunks
        rig.config.write_text(rig.config.read_text().replace(
            "read_timeout_s = 10", "read_timeout_s = 2"))
        drop(rig.inbox, "batch.jsonl", debate_lines(40, prefix="flaky"))
        rig.start()
        rig.wait_ready()
        rig.wait_finished(40, timeout=240)
        rig.stop_all()
        assert not audit(rig.spool, {f"flaky{n:04d}" for n in range(40)}, {})
        stats = sim.stats()
        injected = stats["faults_injected"]
        assert sum(injected.values()) >= 6, injected
        assert len(injected) >= 3, f"several kinds of fault: {injected}"
        # retried, not duplicated: the server completed each stage exactly once
        completed = completed_per_stage(sim)
        assert len(completed) == 120 and set(completed.values()) == {1}
        events = Counter(e["event"] for e in rig.events())
        assert events["backend_call_retried"] >= 1
        assert events["job_failed"] == 0
    finally:
        sim.stop()


def status_json(rig: DaemonRig) -> dict[str, Any]:
    proc = subprocess.run(
        [*IHLD, "status", "--json", "--config", str(rig.config)],
        capture_output=True, timeout=30, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise TimeoutError(what)


def test_backend_outage_delays_jobs_and_only_deadlines_fail_them(
    rig_factory: Callable[..., DaemonRig],
) -> None:
    sim = Sim.start("laptop-6gb", 20.0)
    port = int(sim.url.rsplit(":", 1)[1])
    patient = rig_factory(sim.url, name="patient", slots=1)
    strict = rig_factory(sim.url, name="strict", slots=1,
                         extra="")
    strict.config.write_text(strict.config.read_text().replace(
        "[limits]\n", "[limits]\njob_deadline_s = 3\n"))
    try:
        drop(patient.inbox, "batch.jsonl", debate_lines(12, prefix="pat"))
        patient.start()
        strict.start()
        patient.wait_ready()
        strict.wait_ready()
        wait_for(lambda: len(finished_stages(patient.spool)[0]) > 0, 30, "a first stage")
        # the server goes away in the middle of the batch
        sim.stop()
        down_at = time.monotonic()
        drop(patient.inbox, "hasty.json", json.dumps(
            {"id": "hasty", "pipeline": "debate", "input": {"topic": "t"}, "deadline_s": 2}))
        drop(strict.inbox, "cfg_default.json", json.dumps(
            {"id": "cfg_default", "pipeline": "debate", "input": {"topic": "t"}}))
        drop(strict.inbox, "cfg_patient.json", json.dumps(
            {"id": "cfg_patient", "pipeline": "debate", "input": {"topic": "t"},
             "deadline_s": 600}))
        wait_for(lambda: not status_json(patient)["backends"]["sim"]["up"], 30,
                 "status to say the backend is down")
        status = status_json(patient)["backends"]["sim"]
        assert status["down_reason"], status
        wait_for(lambda: "hasty" in patient.failures(), 30, "the deadline of 'hasty'")
        wait_for(lambda: "cfg_default" in strict.failures(), 30, "the config deadline")
        # everything else waits: no failure while the server is away
        time.sleep(max(0.0, 7.0 - (time.monotonic() - down_at)))
        assert set(patient.failures()) == {"hasty"}
        assert set(strict.failures()) == {"cfg_default"}
        # back on the same port
        sim = Sim.start("laptop-6gb", 20.0, port=port)
        patient.wait_finished(13, timeout=120)
        strict.wait_finished(2, timeout=120)
        wait_for(lambda: status_json(patient)["backends"]["sim"]["up"], 30, "backend up")
    finally:
        sim.stop()
    for rig in (patient, strict):
        rig.stop_all()
    assert not audit(patient.spool, {f"pat{n:04d}" for n in range(12)}, {"hasty": "deadline"})
    assert not audit(strict.spool, {"cfg_patient"}, {"cfg_default": "deadline"})
    error = patient.failures()["hasty"]["error"]
    assert error["backends_down"] and "sim" in error["backends_down"]
    assert "deadline" in error["message"]
    events = [e["event"] for e in patient.events()]
    assert "backend_down" in events and "backend_up" in events
    assert events.index("backend_down") < events.index("backend_up")


# -- a full disk -----------------------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
        capture_output=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(directory: Path) -> Path:
    """Write zeros until the filesystem is full; the file that holds them."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        for size in (1 << 16, 1 << 10, 1):  # big blocks, then the last bytes
            while True:
                try:
                    os.write(fd, b"\0" * size)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                    break
    finally:
        os.close(fd)
    return filler


def test_full_disk_pauses_claiming_and_resumes(
    sim_factory: Callable[..., Any], rig_factory: Callable[..., DaemonRig]
) -> None:
    sim = sim_factory("laptop-6gb", 50.0)
    rig = rig_factory(sim.url, slots=1)
    with tmpfs(rig.spool, "4m"), contextlib.ExitStack() as stack:
        stack.callback(rig.stop_all)  # before the unmount
        proc = rig.start()
        rig.wait_ready()
        drop(rig.inbox, "first.jsonl", debate_lines(8, prefix="first"))
        wait_for(lambda: len(finished_stages(rig.spool)[0]) >= 2, 60, "a few stages")
        # a batch waits under a dotted name (ignored) until the disk is full
        (rig.inbox / ".second.jsonl.tmp").write_text(debate_lines(8, prefix="second"))
        filler = fill(rig.spool / "work")
        (rig.inbox / ".second.jsonl.tmp").rename(rig.inbox / "second.jsonl")
        wait_for(lambda: "intake_paused" in rig.stderr(), 60, "intake to pause")
        wait_for(lambda: "commit_failed" in rig.stderr(), 60, "a checkpoint write to fail")
        snap = rig.status()
        assert snap is not None and snap["intake_paused"] is True
        # the disk stays full for longer than one retry of intake and of the committer
        wait_for(lambda: rig.stderr().count('"intake_paused"') >= 3, 60, "intake retries")
        assert rig.status()["intake_paused"] is True  # type: ignore[index]
        # while full: everything visible is whole, nothing was published half-way
        _finished, corrupt = finished_stages(rig.spool)
        assert not corrupt
        for directory in ("outbox", "failed"):
            for path in (rig.spool / directory).glob("*.json"):
                json.loads(path.read_text())
        assert proc.poll() is None, rig.stderr()[-3000:]
        # space comes back: everything finishes
        filler.unlink()
        rig.wait_finished(16, timeout=180)
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert '"intake_resumed"' in rig.stderr()
        expected = {f"first{n:04d}" for n in range(8)} | {f"second{n:04d}" for n in range(8)}
        problems = audit(rig.spool, expected, {})
        assert not problems, problems
