"""``ihld submit --wait``: the ids intake will use, following them, exit codes."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from ihld.client.submit import JobWaiter, expected_ids
from ihld.core.jobs import default_id_for
from tests.conftest import IHLD, REPO, DaemonRig, SimProcess, debate_lines


def test_expected_ids_follow_intake() -> None:
    assert expected_ids(b'{"id": "mine", "pipeline": "debate"}', "x.json") == ["mine"]
    assert expected_ids(b'{"pipeline": "debate"}', "report-7.json") == ["report-7"]
    lines = b'{"pipeline": "p"}\n\n{"id": "named", "pipeline": "p"}\nnot json\n{"pipeline": "p"}\n'
    assert expected_ids(lines, "batch.jsonl") == ["batch.1", "named", "batch.4", "batch.5"]
    # rejected as a whole: one record under the file's id
    assert expected_ids(b"\xff\xfe junk", "bin.json") == ["bin"]
    assert expected_ids(b"{not json", "broken.json") == ["broken"]
    assert expected_ids(b"", "empty.jsonl") == ["empty"]
    assert expected_ids(b'{"pipeline": "p"}\n' * 10, "big.jsonl", max_bytes=20) == ["big"]
    # an invalid id field is a schema error: the record takes the default id
    assert expected_ids(b'{"id": "../x", "pipeline": "p"}', "odd.json") == ["odd"]
    assert expected_ids(b"{}", "we ird.json") == [default_id_for("we ird")]


def _write(path: Path, record: dict[str, object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))


def test_waiter_counts_new_records_only(tmp_path: Path) -> None:
    outbox, failed = tmp_path / "outbox", tmp_path / "failed"
    outbox.mkdir()
    failed.mkdir()
    _write(outbox / "old.json", {"status": "done"})  # from an earlier submission
    waiter = JobWaiter(outbox, failed, ["a", "b", "old", "twice", "twice"])
    assert waiter.poll() == 0 and not waiter.finished and waiter.total == 5
    _write(outbox / "a.json", {"status": "done"})
    _write(failed / "b.json", {"error": {"kind": "stage_timeout", "message": "too slow\nmore"}})
    assert waiter.poll() == 2
    assert (waiter.n_done, waiter.n_failed) == (1, 1)
    # "old" was taken: the new job is rejected as a duplicate into failed/old~2.json
    _write(failed / "old~2.json", {"error": {"kind": "duplicate_id", "message": "dup"}})
    _write(outbox / "twice.json", {"status": "done"})
    assert waiter.poll() == 2 and not waiter.finished
    _write(failed / "twice~2.json", {"error": {"kind": "duplicate_id", "message": "dup"}})
    assert waiter.poll() == 1 and waiter.finished
    assert (waiter.n_done, waiter.n_failed) == (2, 3)
    details = list(waiter.failure_details())
    assert details[0].startswith("b: stage_timeout: too slow (")
    assert any(d.startswith("old: duplicate_id: dup") for d in details)
    assert waiter.eta_s() == 0.0


def test_waiter_forgets_files_that_were_not_submitted(tmp_path: Path) -> None:
    waiter = JobWaiter(tmp_path / "outbox", tmp_path / "failed", ["a", "b"])
    waiter.forget(["b"])
    assert waiter.total == 1
    _write(tmp_path / "outbox" / "a.json", {})
    waiter.poll()
    assert waiter.finished


def test_waiter_with_many_jobs_lists_directories(tmp_path: Path) -> None:
    ids = [f"j{n}" for n in range(600)]
    waiter = JobWaiter(tmp_path / "outbox", tmp_path / "failed", ids)
    for job_id in ids[:300]:
        _write(tmp_path / "outbox" / f"{job_id}.json", {})
    assert waiter.poll() == 300
    for job_id in ids[300:]:
        _write(tmp_path / "failed" / f"{job_id}.json", {})
    assert waiter.poll() == 300 and waiter.finished


# -- against a real daemon -----------------------------------------------------------------


def submit(
    rig: DaemonRig, *paths: Path, timeout: float = 120, extra: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*IHLD, "submit", "--config", str(rig.config), "--wait", *extra, *map(str, paths)],
        capture_output=True, text=True, cwd=REPO, timeout=timeout, check=False,
    )  # fmt: skip


def test_submit_wait_exit_codes(
    tmp_path: Path, sim_factory: Callable[..., SimProcess], rig_factory: Callable[..., DaemonRig]
) -> None:
    sim = sim_factory("laptop-6gb-4slot", 200.0)
    rig = rig_factory(sim.url, slots=4, max_loaded=1)
    rig.start()
    rig.wait_ready(timeout=60)

    good = tmp_path / "good.jsonl"
    good.write_text(debate_lines(5, prefix="g"))
    single = tmp_path / "single.json"
    single.write_text(json.dumps({"pipeline": "debate", "input": {"topic": "tabs"}}))
    done = submit(rig, good, single)
    assert done.returncode == 0, done.stderr
    assert "6/6 done, 0 failed" in done.stderr
    assert set(rig.results()) == {"g0000", "g0001", "g0002", "g0003", "g0004", "single"}

    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(
        debate_lines(2, prefix="m")
        + json.dumps({"id": "no-topic", "pipeline": "debate", "input": {}}) + "\n"
        + "this line is not JSON\n"
        + json.dumps({"id": "g0000", "pipeline": "debate", "input": {"topic": "again"}}) + "\n"
    )  # fmt: skip
    failed = submit(rig, mixed)
    assert failed.returncode == 1, failed.stderr
    assert "2/5 done, 3 failed" in failed.stderr
    assert "failed no-topic: invalid_input" in failed.stderr
    assert "failed mixed.4: invalid_json" in failed.stderr
    assert "failed g0000: duplicate_id" in failed.stderr  # the id was taken: failed/g0000~2

    missing = submit(rig, tmp_path / "nope.json")
    assert missing.returncode == 1 and "nope.json" in missing.stderr


def test_submit_wait_times_out_without_a_daemon(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    (spool / "inbox").mkdir(parents=True)
    job = tmp_path / "lonely.json"
    job.write_text(json.dumps({"pipeline": "debate", "input": {"topic": "x"}}))
    started = time.monotonic()
    result = subprocess.run(
        [*IHLD, "submit", "--spool", str(spool), "--wait", "--timeout", "1", str(job)],
        capture_output=True, text=True, cwd=REPO, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 124
    assert "no daemon answers" in result.stderr and "timed out" in result.stderr
    assert time.monotonic() - started < 50
    assert (spool / "inbox" / "lonely.json").exists()  # submitted all the same
