"""The shipped, hardened unit under a real systemd 252 (``make test-systemd``).

A container boots systemd as PID 1 (``tests/systemd_box.py``), ihld is
installed in it as ``systemd/README.md`` says, and the simulator runs on the
host's 127.0.0.1 (the box shares the host's network). Everything is checked
through real ``systemctl`` and ``journalctl``:

* ``start`` returns only after READY=1, with the spool already recovered;
* ``status`` shows the live STATUS= line;
* ``reload`` with a good and with a broken config: the unit stays active,
  the broken one is reported and the old one stays in force;
* ``stop`` drains in-flight stages and exits 0;
* ``kill -9`` and a hung event loop (the watchdog's SIGABRT) are restarted
  by systemd, and the restarted daemon resumes the batch;
* jobs dropped into the inbox from the host finish throughout.

Skipped, with the reason, where the box cannot start (not root, no
systemd-nspawn, no package registry for pip). Only runs when asked:
``IHLD_SYSTEMD_TEST=1`` (``make test-systemd`` sets it).
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator

import pytest

from benchmarks.torture import Sim
from tests.systemd_box import Box, BoxUnavailable

pytestmark = [
    pytest.mark.systemd,
    pytest.mark.skipif(
        os.environ.get("IHLD_SYSTEMD_TEST") != "1",
        reason="boots a systemd container: run `make test-systemd` (IHLD_SYSTEMD_TEST=1)",
    ),
]


def debates(prefix: str, count: int) -> str:
    return "".join(
        json.dumps({"id": f"{prefix}{n:03d}", "pipeline": "debate",
                    "input": {"topic": f"{prefix} {n}"}}) + "\n"
        for n in range(count)
    )


@pytest.fixture(scope="module")
def sim() -> Iterator[Sim]:
    sim = Sim.start("laptop-6gb", 40.0)
    try:
        yield sim
    finally:
        sim.stop()


@pytest.fixture(scope="module")
def box(sim: Sim) -> Iterator[Box]:
    booted: Box | None = None
    try:
        booted = Box.boot()
        booted.install(int(sim.url.rsplit(":", 1)[1]))
    except BoxUnavailable as exc:
        if booted is not None:
            booted.down()
        pytest.skip(f"systemd box unavailable: {exc}")
    box = booted
    box.reset()
    try:
        yield box
    finally:
        box.systemctl("stop", "ihld", check=False)
        if os.environ.get("IHLD_SYSBOX_KEEP") != "1":
            box.down()


def port(sim: Sim) -> int:
    return int(sim.url.rsplit(":", 1)[1])


def wait_until(check: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def test_start_returns_after_ready_with_the_spool_recovered(box: Box) -> None:
    box.systemctl("start", "ihld")
    assert box.show("ActiveState")["ActiveState"] == "active"
    box.drop("first.jsonl", debates("a", 16))
    box.wait_outcomes(3)
    box.systemctl("stop", "ihld")  # graceful: what is not finished stays checkpointed
    left = box.checkpoints()
    assert left > 0, "the stop should leave unfinished jobs in work/jobs"
    cursor = box.cursor()
    box.systemctl("start", "ihld")  # Type=notify: returns once READY=1 was sent
    props = box.show("ActiveState", "SubState", "StatusText", "Type", "NotifyAccess")
    assert (props["ActiveState"], props["SubState"]) == ("active", "running"), props
    assert props["Type"] == "notify"
    events = box.events(cursor)
    names = [e["event"] for e in events]
    assert "daemon_ready" in names, names  # already in the journal when start returned
    ready = next(e for e in events if e["event"] == "daemon_ready")
    assert ready["recovered"] == left
    assert names.index("spool_recovered") < names.index("daemon_ready")
    done, failed = box.wait_outcomes(16)
    assert len(done) == 16 and not failed


def test_status_shows_the_live_status_line(box: Box) -> None:
    before = box.show("StatusText")["StatusText"]
    box.drop("status.jsonl", debates("st", 6))
    box.wait_outcomes(22)

    def counts() -> tuple[int, int] | None:
        found = re.search(r"(\d+)/(\d+) done", box.show("StatusText")["StatusText"])
        return (int(found[1]), int(found[2])) if found else None

    # jobs done by this daemon / jobs it has seen (the counts start again at each start)
    wait_until(lambda: (c := counts()) is not None and c[0] == c[1] >= 6, 30,
               f"STATUS= to count the finished jobs (was {before!r})")
    status = box.systemctl("status", "ihld", "--no-pager", check=False)
    assert re.search(r'Status: "\d+/\d+ done, \d+ jobs/min', status), status
    assert "active (running)" in status
    # ihld status --json through the control socket, inside the box
    snap = json.loads(box.run("/opt/ihld/.venv/bin/ihld", "status", "--json",
                              "--config", "/etc/ihld/ihld.toml").stdout)
    assert snap["jobs"]["done"] >= 6 and snap["backends"]["sim"]["up"] is True


def test_reload_good_and_broken_config(box: Box, sim: Sim) -> None:
    cursor = box.cursor()
    box.write_config(port(sim), '[pipelines.shout]\nstages = [{ name = "s", '
                     'model = "gemma2:9b", prompt = "SHOUT {input[w]}" }]\n')
    box.systemctl("reload", "ihld")
    box.wait_journal('"config_reloaded"', cursor)
    assert box.show("ActiveState")["ActiveState"] == "active"
    box.drop("shout.json", json.dumps({"id": "shout1", "pipeline": "shout",
                                       "input": {"w": "hi"}}))
    box.wait_outcomes(23)
    assert "shout1" in box.outcomes()[0]

    cursor = box.cursor()
    good = (box.root / "etc" / "ihld" / "ihld.toml").read_text()
    box.write_config(port(sim), text=good.replace("[limits]\n", "[limits]\nmax_attempts = 0\n"))
    box.systemctl("reload", "ihld")
    lines = box.wait_journal('"reload_failed"', cursor)
    assert any("limits.max_attempts" in line for line in lines)
    wait_until(lambda: "reload failed" in box.show("StatusText")["StatusText"], 20,
               "STATUS= to report the failed reload")
    props = box.show("ActiveState", "SubState", "MainPID")
    assert (props["ActiveState"], props["SubState"]) == ("active", "running"), props
    # the old config (with its shout pipeline) is still in force
    box.drop("shout2.json", json.dumps({"id": "shout2", "pipeline": "shout",
                                        "input": {"w": "again"}}))
    done, _failed = box.wait_outcomes(24)
    assert "shout2" in done
    box.write_config(port(sim), text=good)
    box.systemctl("reload", "ihld")


def test_stop_drains_in_flight_stages_and_exits_cleanly(box: Box) -> None:
    box.drop("drain.jsonl", debates("dr", 8))
    wait_until(lambda: any('"stage_finished"' in line for line in box.journal()[-50:]), 30,
               "a stage to finish")
    cursor = box.cursor()
    box.systemctl("stop", "ihld")
    props = box.show("ActiveState", "Result", "ExecMainStatus", "ExecMainCode")
    assert props["ActiveState"] == "inactive"
    assert props["Result"] == "success" and props["ExecMainStatus"] == "0", props
    events = {e["event"]: e for e in box.events(cursor)}
    assert "daemon_stopping" in events
    assert events["daemon_stopped"]["cancelled_stages"] == 0
    assert (box.spool / "run" / "clean-shutdown").exists()
    box.systemctl("start", "ihld")
    _done, failed = box.wait_outcomes(32)
    assert not failed


def test_kill_9_is_restarted_and_the_batch_resumes(box: Box) -> None:
    restarts = int(box.show("NRestarts")["NRestarts"])
    box.drop("crash.jsonl", debates("cr", 10))
    box.wait_outcomes(34)
    box.systemctl("kill", "--signal=SIGKILL", "ihld")
    wait_until(lambda: int(box.show("NRestarts")["NRestarts"]) > restarts, 60,
               "systemd to restart the killed daemon (RestartSec=5s)")
    wait_until(lambda: box.show("ActiveState")["ActiveState"] == "active", 60, "active")
    done, failed = box.wait_outcomes(42)
    assert not failed and {f"cr{n:03d}" for n in range(10)} <= done


def test_watchdog_kills_a_hung_event_loop_and_systemd_restarts_it(box: Box) -> None:
    box.systemctl("stop", "ihld")
    # the 6th inbox scan blocks the event loop for ever (a test-only fail point)
    box.drop_in("test", "[Service]\nEnvironment=IHLD_FAILPOINTS=watcher.scan:hang@6\n"
                        "WatchdogSec=4\n")
    try:
        cursor = box.cursor()
        box.systemctl("start", "ihld")
        restarts = int(box.show("NRestarts")["NRestarts"])
        box.wait_journal("Watchdog timeout", cursor, timeout=90)
        wait_until(lambda: int(box.show("NRestarts")["NRestarts"]) > restarts, 60,
                   "the restart after the watchdog kill")
        text = "\n".join(box.journal(cursor))
        assert "SIGABRT" in text or "ABRT" in text, text[-3000:]
        assert "failpoints.py" in text, "PYTHONFAULTHANDLER shows where the loop hung"
    finally:
        box.drop_in("test", None)
    # without the fail point it runs again, and jobs dropped meanwhile finish
    box.systemctl("reset-failed", "ihld", check=False)
    box.systemctl("restart", "ihld")
    box.drop("after-watchdog.json", json.dumps({"id": "wd1", "pipeline": "debate",
                                                "input": {"topic": "t"}}))
    done, failed = box.wait_outcomes(43)
    assert "wd1" in done and not failed
    assert box.show("ActiveState")["ActiveState"] == "active"


def test_the_unit_that_ran_is_the_shipped_hardened_one(box: Box) -> None:
    from pathlib import Path

    shipped = (Path(__file__).resolve().parent.parent / "systemd" / "ihld.service").read_text()
    installed = (box.root / "etc" / "systemd" / "system" / "ihld.service").read_text()
    assert installed == shipped
    props = box.show("User", "ProtectSystem", "PrivateUsers", "NoNewPrivileges",
                     "SystemCallFilter", "MemoryDenyWriteExecute", "DropInPaths")
    assert props["User"] == "ihld" and props["ProtectSystem"] == "strict"
    assert props["NoNewPrivileges"] == "yes" and props["MemoryDenyWriteExecute"] == "yes"
    assert props["DropInPaths"] == ""
    score = box.run("systemd-analyze", "security", "ihld", "--no-pager", check=False).stdout
    assert "Overall exposure level for ihld.service" in score, score[-500:]


def _start_took_s(box: Box, cursor: str) -> float:
    """From systemd's own "Starting" to its "Started" (READY=1) in the journal, seconds."""
    stamps: dict[str, int] = {}
    for line in box.journal(cursor, output="json"):
        entry = json.loads(line)
        message = str(entry.get("MESSAGE", ""))
        for word in ("Starting", "Started"):
            if message.startswith(word) and word not in stamps:
                stamps[word] = int(entry["__REALTIME_TIMESTAMP"])
    return (stamps["Started"] - stamps["Starting"]) / 1e6


def test_start_with_a_million_jobs_queued(box: Box) -> None:
    """A million waiting jobs in the job store: ``systemctl start`` of the shipped unit
    (TimeoutStartSec=90) returns active, and the daemon is not restarted, after a
    graceful stop and after a ``kill -9`` (restarted once by systemd, then stays up)."""
    count = 1_000_000
    box.reset()
    box.systemctl("start", "ihld")
    cursor = box.cursor()
    box.drop("million.jsonl", "".join(
        f'{{"id":"m{n:07d}","pipeline":"debate","input":{{"topic":"topic {n}"}}}}\n'
        for n in range(count)
    ))
    box.wait_journal('"event":"file_accepted"', cursor, timeout=900)
    box.systemctl("stop", "ihld")
    queued = box.checkpoints()
    assert queued > count - 1000, queued  # a few ran meanwhile; the rest wait in the store
    try:
        cursor = box.cursor()
        box.systemctl("start", "ihld")  # returns once READY=1 came, or fails at the timeout
        props = box.show("ActiveState", "SubState", "NRestarts", "MainPID")
        assert (props["ActiveState"], props["SubState"]) == ("active", "running"), props
        ready = next(e for e in box.events(cursor) if e["event"] == "daemon_ready")
        assert ready["recovered"] == queued
        print(f"systemctl start with {queued:,} jobs queued: {_start_took_s(box, cursor):.2f} s")
        box.wait_journal('"event":"job_claimed"', cursor, timeout=120)  # the feeder runs
        assert box.show("NRestarts", "MainPID") == {
            "NRestarts": props["NRestarts"], "MainPID": props["MainPID"]
        }

        cursor = box.cursor()
        box.systemctl("kill", "--signal=SIGKILL", "ihld")
        wait_until(lambda: int(box.show("NRestarts")["NRestarts"]) == int(props["NRestarts"]) + 1,
                   60, "systemd to restart the killed daemon (RestartSec=5s)")
        wait_until(lambda: box.show("ActiveState")["ActiveState"] == "active", 120, "active")
        box.wait_journal('"event":"job_claimed"', cursor, timeout=120)
        print(f"restart after kill -9 with a million queued: {_start_took_s(box, cursor):.2f} s")
        after = box.show("ActiveState", "NRestarts")
        assert after == {"ActiveState": "active", "NRestarts": str(int(props["NRestarts"]) + 1)}
    finally:
        box.reset()  # a million queued jobs are not for the next test
