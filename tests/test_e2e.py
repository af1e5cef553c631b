"""The daemon end to end: a real subprocess, the simulator as its Ollama, real signals."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from ihld.core.storeview import read_progress
from tests.conftest import IHLD, REPO, DaemonRig, SimProcess, debate_lines, drop


def run_once(rig: DaemonRig, timeout: float = 90) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*IHLD, "run", "--once", "--config", str(rig.config)],
                          capture_output=True, timeout=timeout, cwd=REPO)


def test_fifty_debates_affinity_needs_few_loads(sim_factory: Callable[..., SimProcess],
                                               rig_factory: Callable[..., DaemonRig]) -> None:
    sim = sim_factory()
    rig = rig_factory(sim.url)
    drop(rig.inbox, "batch.jsonl", debate_lines(50))
    proc = run_once(rig)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    results = rig.results()
    assert len(results) == 50 and not rig.failures(), proc.stderr.decode()[-3000:]
    for result in results.values():
        assert [s["name"] for s in result["stages"]] == ["proposer", "critic", "judge"]
        assert all(s["eval_count"] > 0 and s["backend"] == "sim" for s in result["stages"])
        verdict = result["stages"][2]["output"]
        assert verdict["winner"] in ("proposer", "critic")
    assert sim.loads() <= 4


def test_fifty_debates_fifo_thrashes(sim_factory: Callable[..., SimProcess],
                                     rig_factory: Callable[..., DaemonRig]) -> None:
    sim = sim_factory()
    rig = rig_factory(sim.url, policy="fifo")
    drop(rig.inbox, "batch.jsonl", debate_lines(50))
    proc = run_once(rig)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert len(rig.results()) == 50
    assert sim.loads() >= 90


def finished_stages(rig: DaemonRig) -> set[tuple[str, str]]:
    """Stages on disk as finished: progress in the job store and results in outbox/."""
    done = set()
    for job_id, progress in read_progress(rig.spool / "work" / "queue.db").items():
        done |= {(job_id, stage) for stage in progress["outputs"]}
    for job_id, result in rig.results().items():
        done |= {(job_id, stage["name"]) for stage in result["stages"]}
    return done


def test_sigkill_mid_batch_resumes_without_resending_finished_stages(
    sim_factory: Callable[..., SimProcess], rig_factory: Callable[..., DaemonRig]
) -> None:
    sim = sim_factory(speed=100.0)
    rig = rig_factory(sim.url)
    # Six kills, each soon after READY (which no longer waits for the queue to be in
    # memory): the job at the head of the queue is running at most of them. That is
    # the poison rule's case, not this test's; as in the torture, it is raised.
    text = rig.config.read_text()
    rig.config.write_text(text.replace("[spool]\n", "[spool]\nmax_recoveries = 100\n"))
    drop(rig.inbox, "batch.jsonl", debate_lines(30))
    for wait in (0.4, 0.7, 0.5):
        proc = rig.start()
        rig.wait_ready()
        time.sleep(wait)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        before = finished_stages(rig)
        assert 0 < len(before) < 90, "the kill should land mid-batch"
        sent_before = len(sim.get("/sim/requests"))  # the request log only grows
        rig.start()
        rig.wait_ready()
        time.sleep(0.3)
        rig.procs[-1].send_signal(signal.SIGKILL)
        rig.procs[-1].wait()
        resent = sim.get("/sim/requests")[sent_before:]
        assert resent, "the restarted daemon should have sent requests"
        for entry in resent:
            if entry["task"]:
                job, stage, _attempt = entry["task"].split("/")
                assert (job, stage) not in before, f"finished stage {job}/{stage} sent again"
    proc = rig.start()
    rig.wait_finished(30)
    rig.stop_all()
    assert len(rig.results()) == 30 and not rig.failures()
    # each job's result exists once; every stage was completed by the simulator
    completed = Counter(
        tuple(e["task"].split("/")[:2]) for e in sim.get("/sim/requests")
        if e["task"] and e["completed"]
    )
    assert len(completed) == 90
    assert proc.returncode == 0


def test_sigterm_drains_and_exits_zero(sim_factory: Callable[..., SimProcess],
                                       rig_factory: Callable[..., DaemonRig]) -> None:
    sim = sim_factory(speed=20.0)
    rig = rig_factory(sim.url)
    drop(rig.inbox, "batch.jsonl", debate_lines(10))
    proc = rig.start()
    rig.wait_ready()
    time.sleep(0.8)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    events = [e["event"] for e in rig.events()]
    assert "daemon_stopping" in events and events[-1] == "daemon_stopped"
    assert (rig.spool / "run" / "clean-shutdown").exists()
    stopped = rig.events()[-1]
    assert stopped["cancelled_stages"] == 0  # in-flight stages finished within the grace
    # restart: everything left is resumed and finishes
    rig.start()
    rig.wait_finished(10)
    assert len(rig.results()) == 10


def test_sighup_reload_keeps_old_config_when_invalid(
    sim_factory: Callable[..., SimProcess], rig_factory: Callable[..., DaemonRig]
) -> None:
    sim = sim_factory()
    rig = rig_factory(sim.url)
    proc = rig.start()
    rig.wait_ready()
    good = rig.config.read_text()
    rig.config.write_text(good.replace("[limits]\n", "[limits]\nmax_attempts = 0\n"))
    proc.send_signal(signal.SIGHUP)
    time.sleep(0.5)
    rig.config.write_text(good.replace('level = "info"', 'level = "debug"'))
    proc.send_signal(signal.SIGHUP)
    time.sleep(0.5)
    assert proc.poll() is None
    drop(rig.inbox, "after.json", json.dumps({"pipeline": "debate", "input": {"topic": "x"}}))
    rig.wait_finished(1)
    events = rig.events()
    failed = [e for e in events if e["event"] == "reload_failed"]
    assert failed and "key limits.max_attempts" in failed[0]["error"]
    assert any(e["event"] == "config_reloaded" for e in events)
    assert any(e["event"] == "stage_started" for e in events)  # debug level is now on
    assert rig.results()["after"]["status"] == "done"


def test_second_daemon_on_same_spool_refuses(sim_factory: Callable[..., SimProcess],
                                             rig_factory: Callable[..., DaemonRig]) -> None:
    sim = sim_factory()
    rig = rig_factory(sim.url)
    rig.start()
    rig.wait_ready()
    second = subprocess.run([*IHLD, "run", "--config", str(rig.config)], capture_output=True,
                            timeout=20, cwd=REPO)
    assert second.returncode == 2
    assert b"another ihld daemon" in second.stderr


def test_bad_inputs_end_in_failed_and_daemon_keeps_running(
    sim_factory: Callable[..., SimProcess], rig_factory: Callable[..., DaemonRig], tmp_path: Any
) -> None:
    sim = sim_factory()
    rig = rig_factory(sim.url, extra="")
    rig.config.write_text(rig.config.read_text().replace(
        "[limits]\n", "[limits]\nmax_job_bytes = 4096\n"))
    proc = rig.start()
    rig.wait_ready()
    outside = tmp_path / "outside.json"
    outside.write_text(json.dumps({"pipeline": "debate", "input": {"topic": "secret"}}))
    drop(rig.inbox, "malformed.json", '{"pipeline": "debate", ')
    drop(rig.inbox, "schema.json", json.dumps({"pipeline": "debate", "priority": "high"}))
    drop(rig.inbox, "unknown.json", json.dumps({"pipeline": "nope"}))
    drop(rig.inbox, "big.json", json.dumps({"pipeline": "debate", "input": {"x": "y" * 5000}}))
    (rig.inbox / "link.json").symlink_to(outside)
    drop(rig.inbox, "good.json", json.dumps({"pipeline": "debate", "input": {"topic": "ok"}}))
    rig.wait_finished(6)
    failures = rig.failures()
    kinds = {job_id: record["error"]["kind"] for job_id, record in failures.items()}
    assert kinds == {"malformed": "invalid_json", "schema": "invalid_schema",
                     "unknown": "unknown_pipeline", "big": "too_large", "link": "symlink"}
    assert "priority" in failures["schema"]["error"]["message"]
    assert rig.results()["good"]["status"] == "done"
    assert outside.exists() and json.loads(outside.read_text())["input"]["topic"] == "secret"
    assert proc.poll() is None


def test_half_written_file_is_left_alone_until_complete(
    sim_factory: Callable[..., SimProcess], rig_factory: Callable[..., DaemonRig]
) -> None:
    """A plain, slow `cp`: the file shows up long before it is whole, with no close event."""
    sim = sim_factory()
    rig = rig_factory(sim.url)
    rig.start()
    rig.wait_ready()
    text = debate_lines(40, prefix="slow").encode()
    assert len(text) > 10 * 256
    path = rig.inbox / "slow.jsonl"
    with open(path, "wb") as fh:
        for offset in range(0, len(text), 256):
            fh.write(text[offset : offset + 256])
            fh.flush()
            time.sleep(0.1)  # half of settle_s between chunks, a second in all
    rig.wait_finished(40)
    assert len(rig.results()) == 40 and not rig.failures()
