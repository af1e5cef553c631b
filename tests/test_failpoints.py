"""Power-loss points: kill -9 the daemon at every named step of the spool, restart, check.

Each case drops the same mix of job files (good jobs, a bad line, duplicate
ids in one file and across files, malformed JSON, a symlink, a job whose
model the server does not have), starts the daemon with
``IHLD_FAILPOINTS=<point>:sigkill@N`` so it kills itself at that exact step,
checks what is on disk at the moment of death, restarts it without the fail
point and checks the promises: every job in exactly one of ``outbox/`` and
``failed/`` with the right outcome, every record written once and whole, no
stage that was finished on disk at the kill sent to the server again, and
nothing left behind.

SIGKILL is the process half of a power cut. The other half (the page cache
is lost) is what the fsyncs are for: a name is only ever linked or renamed
to data that was flushed first; ``tests/test_spool.py`` and the code review
in ``benchmarks/RELIABILITY.md`` cover that ordering.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from benchmarks.torture import Sim, audit, finished_stages, resent_after
from ihld.common import failpoints
from tests.conftest import DaemonRig

GOOD = ["fpa0", "fpa1", "fpa2", "fpb"]
EXPECTED_FAILED = {
    "fa.4": "invalid_schema",  # a bad line among good ones (its id is not trusted)
    "fpa0~2": "duplicate_id",  # the same id twice in one file
    "fpa1~2": "duplicate_id",  # an id already submitted in another file
    "fc": "invalid_json",
    "fpd": "model_not_found",  # validates, the server answers 404
    "link": "symlink",
}


def debate(job_id: str) -> str:
    return json.dumps({"id": job_id, "pipeline": "debate", "input": {"topic": job_id}})


def scenario() -> list[tuple[str, str | None]]:
    """(file name, content) in claim order; None: a symlink to a file outside the spool."""
    return [
        ("link.json", None),
        ("fa.jsonl", "\n".join([
            debate("fpa0"), debate("fpa1"), debate("fpa2"),
            json.dumps({"id": "fpbad", "pipeline": "debate", "priority": "high"}),
            debate("fpa0"),
        ]) + "\n"),
        ("fb.json", debate("fpb")),
        ("fc.json", '{"pipeline": "debate", '),
        ("fd.json", json.dumps({"id": "fpd", "stages": [
            {"name": "only", "model": "nope:1b", "prompt": "hello"}]})),
        ("fe.json", debate("fpa1")),
    ]


def drop_all(inbox: Path, outside: Path, files: list[tuple[str, str | None]]) -> None:
    """Write the files with increasing, old mtimes: claimed at once, in this order."""
    inbox.mkdir(parents=True, exist_ok=True)
    base = time.time() - 100
    for index, (name, text) in enumerate(files):
        path = inbox / name
        if text is None:
            path.symlink_to(outside)
            os.utime(path, (base + index, base + index), follow_symlinks=False)
            continue
        path.write_text(text)
        os.utime(path, (base + index, base + index))


@pytest.fixture(scope="module")
def sim() -> Iterator[Sim]:
    sim = Sim.start("laptop-6gb", 200.0)
    try:
        yield sim
    finally:
        sim.stop()


CASES = [
    ("claim.before_rename", 1),
    ("claim.after_rename", 1),
    ("claim.after_rename", 3),
    ("store.intake_before_commit", 1),
    ("intake.after_job_saved", 1),
    ("intake.before_release", 2),
    ("reject.before_move", 1),
    ("failure.before_publish", 1),
    ("failure.after_publish", 2),
    ("checkpoint.before_publish", 1),
    ("checkpoint.before_publish", 3),
    ("checkpoint.after_publish", 4),
    ("store.progress_mid_write", 2),
    ("checkpoint.before_remove", 1),
    ("checkpoint.after_remove", 1),
    ("result.before_publish", 1),
    ("result.after_publish", 1),
]
SLOW_CASES = [
    ("claim.before_rename", 4),
    ("store.intake_before_commit", 3),
    ("store.progress_mid_write", 5),
    ("checkpoint.before_remove", 4),
    ("intake.after_job_saved", 3),
    ("intake.before_release", 1),
    ("failure.before_publish", 3),
    ("failure.after_publish", 4),
    ("checkpoint.after_publish", 1),
    ("checkpoint.after_publish", 7),
    ("checkpoint.before_publish", 6),
    ("checkpoint.after_remove", 3),
    ("result.before_publish", 3),
    ("result.after_publish", 3),
]


def crash_and_recover(
    sim: Sim, rig: DaemonRig, point: str, nth: int, outside: Path
) -> tuple[list[str], set[tuple[str, str]]]:
    """Run with the fail point until the daemon kills itself, restart, finish. Problems found."""
    drop_all(rig.inbox, outside, scenario())
    proc = rig.start(env={"IHLD_FAILPOINTS": f"{point}:sigkill@{nth}"})
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"{point}@{nth} never fired; stderr: {rig.stderr()[-2000:]}")
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, rig.stderr()[-2000:])
    # at the moment of death: every visible record whole
    finished, corrupt = finished_stages(rig.spool)
    assert not corrupt, corrupt
    since = len(sim.get("/sim/requests"))
    restarted = rig.start()
    rig.wait_ready(timeout=60)
    rig.wait_finished(len(GOOD) + len(EXPECTED_FAILED), timeout=90)
    time.sleep(0.3)  # let the last checkpoint removal land before looking
    restarted.send_signal(signal.SIGTERM)
    assert restarted.wait(30) == 0, rig.stderr()[-2000:]
    problems = audit(rig.spool, set(GOOD), EXPECTED_FAILED)
    problems += [
        f"finished stage sent again: {r}"
        for r in resent_after(sim.get("/sim/requests"), since, finished)
    ]
    return problems, finished


def _check(sim: Sim, rig_factory: Callable[..., DaemonRig], tmp_path: Path,
           point: str, nth: int) -> None:
    outside = tmp_path / "outside.json"
    outside.write_text(debate("secret"))
    before = outside.stat()
    rig = rig_factory(sim.url, name="r", slots=2)
    problems, _finished = crash_and_recover(sim, rig, point, nth, outside)
    assert not problems, problems
    # the outcomes say what went wrong, where
    failures = rig.failures()
    assert "nope:1b" in failures["fpd"]["error"]["message"]
    assert failures["fa.4"]["source"]["line"] == 4
    assert failures["fpa1~2"]["source"]["file"] == "fe.json"
    assert failures["link"]["source"]["kept_as"].startswith("failed/inputs/")
    # nothing outside the spool was touched on the symlink's behalf
    after = outside.stat()
    assert (after.st_mtime_ns, after.st_size) == (before.st_mtime_ns, before.st_size)
    assert json.loads(outside.read_text())["id"] == "secret"


@pytest.mark.parametrize(("point", "nth"), CASES, ids=[f"{p}@{n}" for p, n in CASES])
def test_kill_at_failpoint_then_recover(
    sim: Sim, rig_factory: Callable[..., DaemonRig], tmp_path: Path, point: str, nth: int
) -> None:
    _check(sim, rig_factory, tmp_path, point, nth)


@pytest.mark.slow
@pytest.mark.parametrize(("point", "nth"), SLOW_CASES, ids=[f"{p}@{n}" for p, n in SLOW_CASES])
def test_kill_at_more_hits_then_recover(
    sim: Sim, rig_factory: Callable[..., DaemonRig], tmp_path: Path, point: str, nth: int
) -> None:
    _check(sim, rig_factory, tmp_path, point, nth)


def test_every_failpoint_in_the_code_is_tested() -> None:
    """A new fail point added to the code must get a kill test here."""
    import re

    root = Path(__file__).resolve().parent.parent / "ihld"
    found = set()
    for path in root.rglob("*.py"):
        text = path.read_text()
        found |= set(re.findall(r'failpoints\.hit\("([a-z_.]+)"\)', text))
        if 'failpoints.hit(f"{kind}.' in text or 'failpoints.hit(f"{point}.' in text:
            found |= {"checkpoint.before_publish", "checkpoint.after_publish",
                      "result.before_publish", "result.after_publish",
                      "failure.before_publish", "failure.after_publish"}
    tested = {point for point, _ in CASES} | {"watcher.scan"}  # hang: tests/test_systemd_box.py
    assert found <= tested, f"untested fail points: {sorted(found - tested)}"


def test_failpoint_actions_parse_and_fire(tmp_path: Path) -> None:
    failpoints.configure("a.b:raise@2,c.d:enospc")
    try:
        failpoints.hit("a.b")  # first hit: nothing
        with pytest.raises(OSError, match="Input/output error"):
            failpoints.hit("a.b")
        failpoints.hit("a.b")  # only the second hit fires
        with pytest.raises(OSError, match="No space left"):
            failpoints.hit("c.d")
        with pytest.raises(ValueError, match="unknown action"):
            failpoints.configure("x:explode")
    finally:
        failpoints.configure("")


def test_hang_action_blocks_the_calling_thread() -> None:
    """``hang`` is how the systemd test freezes the event loop for the watchdog."""
    import sys

    code = (
        "from ihld.common import failpoints\n"
        "failpoints.configure('watcher.scan:hang@2')\n"
        "failpoints.hit('watcher.scan'); print('first', flush=True)\n"
        "failpoints.hit('watcher.scan'); print('never', flush=True)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "first"
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(1.5)
    proc.send_signal(signal.SIGABRT)  # what the watchdog sends
    assert proc.wait(10) == -signal.SIGABRT
    assert proc.stdout.read() == ""
