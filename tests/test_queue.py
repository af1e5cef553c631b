"""A queue larger than memory: the window of jobs in the engine, deadlines of jobs still
waiting in the store, and a claim cut short between two chunks of one file."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ihld.common import failpoints
from ihld.core import intake as intake_module
from ihld.core.intake import Intake
from ihld.core.jobs import StageSpec, resolve
from ihld.core.spool import Spool
from ihld.core.store import JobStore
from ihld.core.storeview import count_jobs
from ihld.observe.logs import read_events
from tests.conftest import IHLD, REPO, DaemonRig, SimProcess, debate_lines, drop


def limits(rig: DaemonRig, text: str) -> None:
    rig.config.write_text(rig.config.read_text().replace("[limits]\n", f"[limits]\n{text}\n"))


def run_once(rig: DaemonRig) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*IHLD, "run", "--once", "--config", str(rig.config)],
                          capture_output=True, timeout=180, cwd=REPO)


def test_a_small_window_runs_every_job_and_never_holds_more(
    sim_factory: Callable[..., SimProcess], rig_factory: Callable[..., DaemonRig]
) -> None:
    sim = sim_factory()
    rig = rig_factory(sim.url, slots=2)
    limits(rig, "max_jobs_in_memory = 3")
    drop(rig.inbox, "batch.jsonl", debate_lines(24))
    proc = run_once(rig)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert len(rig.results()) == 24 and not rig.failures()
    held = most = 0
    for event in read_events(rig.spool / "log" / "ihld.jsonl"):
        if event["event"] == "job_claimed":
            held += 1
        elif event["event"] in ("job_finished", "job_failed"):
            held -= 1
        most = max(most, held)
    assert most == 3  # the window filled, and never overflowed


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port  # nothing listens on it once the socket is closed


def test_waiting_jobs_past_their_deadline_fail_from_the_store(
    rig_factory: Callable[..., DaemonRig],
) -> None:
    """The backend never answers and the window holds one job: the other jobs never enter
    memory, yet each still ends at its deadline (liveness does not depend on the window)."""
    rig = rig_factory(f"http://127.0.0.1:{closed_port()}")
    limits(rig, "max_jobs_in_memory = 1")
    jobs = "".join(
        json.dumps({"id": f"late{n}", "pipeline": "debate", "input": {"topic": "t"},
                    "deadline_s": 1}) + "\n"
        for n in range(6)
    )
    drop(rig.inbox, "late.jsonl", jobs)
    proc = run_once(rig)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    failed = rig.failures()
    assert sorted(failed) == [f"late{n}" for n in range(6)]
    assert {r["error"]["kind"] for r in failed.values()} == {"deadline"}
    assert not rig.results()


def _intake(tmp_path: Path) -> Intake:
    pipes = {"p": (StageSpec(name="a", model="m", prompt="x"),)}

    def resolver(spec: Any, job_id: str, source: dict[str, Any]) -> Any:
        return resolve(spec, job_id, pipelines=pipes, actor_models={"prompt": None},
                       source=source)

    spool = Spool(tmp_path / "spool")
    spool.prepare()
    return Intake(spool, JobStore(spool.store_path), resolver, max_bytes=100_000)


def test_a_claim_cut_short_between_chunks_resumes_after_the_last_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failing disk at the third chunk's commit: the first two chunks are stored, the
    replay stores the rest, and no job or rejection record is written twice."""
    monkeypatch.setattr(intake_module, "CHUNK", 2)
    intake = _intake(tmp_path)
    lines = [json.dumps({"id": f"j{n}", "pipeline": "p"}) for n in range(9)]
    lines[4] = json.dumps({"id": "j4", "pipeline": "nope"})  # rejected in the third chunk
    path = intake.spool.claimed / "00000000000000000001.1.0--big.jsonl"
    path.write_text("\n".join(lines) + "\n")
    failpoints.configure("store.intake_before_commit:raise@3")
    try:
        with pytest.raises(OSError):
            intake.process(path)
    finally:
        failpoints.configure("")
    assert intake.store.ids() == ["j0", "j1", "j2", "j3"]
    assert intake.spool.claimed_files() == [path]  # the claim stays for the replay
    replay = intake.process(path)
    assert replay.accepted == ["j5", "j6", "j7", "j8"] and replay.rejected == []
    assert intake.store.ids() == [f"j{n}" for n in range(9) if n != 4]
    assert sorted(p.name for p in intake.spool.failed.glob("*.json")) == ["j4.json"]
    assert not intake.spool.claimed_files()


def test_a_stop_during_a_big_intake_keeps_the_claim_and_rejects_nothing(
    rig_factory: Callable[..., DaemonRig],
) -> None:
    """SIGTERM while a 100,000-line file streams into the store: the daemon exits 0, the
    file is neither rejected nor lost, and the next start finishes storing it."""
    count = 100_000
    rig = rig_factory(f"http://127.0.0.1:{closed_port()}")
    rig.inbox.mkdir(parents=True)
    proc = rig.start()
    rig.wait_ready()
    drop(rig.inbox, "big.jsonl", "".join(
        f'{{"id":"b{n:06d}","pipeline":"debate","input":{{"topic":"t"}}}}\n'
        for n in range(count)
    ))
    claimed = rig.spool / "work" / "claimed"
    wait_for(lambda: any(claimed.iterdir()), "intake to claim the file")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, rig.stderr()[-2000:]
    assert not list(rig.spool.joinpath("failed").glob("*.json")), "nothing is rejected"
    stored = count_jobs(rig.spool / "work" / "queue.db")
    assert stored == count or any(claimed.iterdir()), "either stored whole or still claimed"
    rig.start()
    rig.wait_ready()
    wait_for(lambda: count_jobs(rig.spool / "work" / "queue.db") == count
             and not any(claimed.iterdir()), "the replay to store the rest")
    assert not list(rig.spool.joinpath("failed").glob("*.json"))


def wait_for(check: Callable[[], bool], what: str, timeout: float = 120.0) -> None:
    """Poll; the timeout is a safety net against a hang, not a measurement."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def test_intake_into_a_closed_store_keeps_the_claim(tmp_path: Path) -> None:
    """The daemon closes the store at a stop while intake's thread may still be reading a
    file: that is an OSError (the claim stays for the next start), never a rejection."""
    intake = _intake(tmp_path)
    path = intake.spool.claimed / "00000000000000000001.1.0--late.jsonl"
    path.write_text(json.dumps({"id": "x", "pipeline": "p"}) + "\n")
    intake.store.close()
    with pytest.raises(OSError, match="closed"):
        intake.process(path)
    assert intake.spool.claimed_files() == [path]
    assert not list(intake.spool.failed.glob("*.json"))


async def test_the_feeder_waits_out_a_failing_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A take that fails (EIO) is retried after a backoff; the daemon does not stop."""
    import asyncio
    import errno

    from ihld.core.feeder import Feeder
    from ihld.core.progress import JobProgress

    intake = _intake(tmp_path)
    path = intake.spool.claimed / "00000000000000000001.1.0--two.jsonl"
    path.write_text("".join(json.dumps({"id": i, "pipeline": "p"}) + "\n" for i in "ab"))
    intake.process(path)
    admitted: list[JobProgress] = []
    feeder = Feeder(intake.store, in_memory=lambda: len(admitted),
                    limit=lambda: 10, admit=admitted.append)
    real_take, calls = intake.store.take, []

    def failing_once(count: int) -> Any:
        calls.append(count)
        if len(calls) == 1:
            raise OSError(errno.EIO, "Input/output error")
        return real_take(count)

    monkeypatch.setattr(intake.store, "take", failing_once)
    task = asyncio.create_task(feeder.run())
    try:
        for _ in range(600):  # bounded: the backoff's first delay is at most 0.5 s
            if len(admitted) == 2:
                break
            await asyncio.sleep(0.01)
    finally:
        task.cancel()
    assert [p.job.id for p in admitted] == ["a", "b"] and len(calls) == 2


def test_the_feeder_says_when_jobs_are_arriving(tmp_path: Path) -> None:
    """``hold_dry`` reads it: jobs the store holds while the engine has room are on their
    way; none once they are in, and none while the engine is full."""
    from ihld.core.feeder import Feeder

    intake = _intake(tmp_path)
    intake.store.recount()
    admitted: list[object] = []
    limit = [10]
    feeder = Feeder(intake.store, in_memory=lambda: len(admitted),
                    limit=lambda: limit[0], admit=admitted.append)
    assert not feeder.arriving()
    path = intake.spool.claimed / "00000000000000000001.1.0--two.jsonl"
    path.write_text("".join(json.dumps({"id": i, "pipeline": "p"}) + "\n" for i in "ab"))
    intake.process(path)
    assert feeder.arriving()
    limit[0] = 0  # the engine is full: they wait in the store, not on their way
    assert not feeder.arriving()
    limit[0] = 10
    admitted.extend(intake.store.take(2))
    assert not feeder.arriving()
