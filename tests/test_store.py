"""The job store: compact rows, the order jobs come out in, restarts and upgrades."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ihld.core.jobs import Job, StageSpec
from ihld.core.progress import JobProgress
from ihld.core.spool import Spool
from ihld.core.store import JobStore
from ihld.core.storerows import NewJob
from ihld.core.storeview import count_jobs, read_progress
from ihld.service.wiring import adopt_checkpoints, recover_crashed

A = (StageSpec(name="a", model="qwen", needs=()), StageSpec(name="b", model="gemma", needs=("a",)))
B = (StageSpec(name="a", model="gemma", needs=()),)


def job(job_id: str, priority: int = 0, stages: tuple[StageSpec, ...] = A) -> NewJob:
    return NewJob(job_id, None, priority, stages, "debate", None, None, json.dumps({"n": job_id}))


@pytest.fixture
def store(tmp_path: Path) -> JobStore:
    return JobStore(tmp_path / "queue.db")


def test_take_orders_by_priority_then_arrival_and_never_twice(store: JobStore) -> None:
    batch = store.batch("c1", "f.jsonl")
    store.add(batch, [job("a"), job("b", 5), job("c"), job("d", 5)], recorded=4, done=True)
    view = store.waiting_view()
    assert store.backlog() == view.jobs == 4 and view.by_model == {"qwen": 4}
    assert view.stages == {"qwen": 4, "gemma": 4}
    assert [j.id for j in store.take(3)] == ["b", "d", "a"]
    assert [j.id for j in store.take(3)] == ["c"]
    assert store.take(3) == [] and store.backlog() == 0


def test_stages_are_stored_once_per_pipeline(store: JobStore, tmp_path: Path) -> None:
    batch = store.batch("c1", "f.jsonl")
    store.add(
        batch, [job(f"j{n}") for n in range(100)] + [job("x", stages=B)], recorded=101, done=True
    )
    with store._lock:
        assert store._db.execute("SELECT count(*) FROM stagesets").fetchone() == (2,)
    taken = {j.id: j for j in store.take(200)}
    assert taken["j7"].stages == A and taken["x"].stages == B
    assert taken["j7"].input == {"n": "j7"} and taken["j7"].batch.file == "f.jsonl"


def test_a_restart_takes_started_jobs_first_and_finds_what_was_in_memory(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "queue.db")
    batch = store.batch("c1", "f.jsonl")
    store.add(batch, [job("a", 9), job("b"), job("c")], recorded=3, done=True)
    taken = store.take(3)
    store.commit([("c", json.dumps({"outputs": {"a": "x"}}))], ["a"])  # c started, a ended
    store.close()
    again = JobStore(tmp_path / "queue.db")
    assert again.marked() == {"b", "c"}  # in memory when the daemon stopped
    again.start()
    assert again.marked() == set()
    again.recount()  # after READY: a pass over the queue
    assert again.backlog() == 2 and again.waiting_view().by_model == {"qwen": 1}
    first, second = again.take(5)
    assert (first.id, first.progress) == ("c", {"outputs": {"a": "x"}})
    assert (second.id, second.progress) == ("b", None)
    assert len(taken) == 3 and count_jobs(tmp_path / "queue.db") == 2
    assert read_progress(tmp_path / "queue.db") == {"c": {"outputs": {"a": "x"}}}


def test_rows_of_files_whose_jobs_all_ended_are_forgotten(store: JobStore) -> None:
    done = store.batch("c1", "done.jsonl")
    store.add(done, [job("a")], recorded=1, done=True)
    open_ = store.batch("c2", "open.jsonl")
    store.add(open_, [job("b")], recorded=1, done=True)
    half = store.batch("c3", "half.jsonl")  # a claim cut short: its replay still needs it
    store.commit((), ["a"])
    assert store.forget_ended_batches() == 1
    with store._lock:
        claims = [r[0] for r in store._db.execute("SELECT claim FROM batches ORDER BY id")]
    assert claims == ["c2", "c3"] and half.recorded == 0
    assert [j.batch.file for j in store.take(5)] == ["open.jsonl"]


def test_existing_ids_are_found_for_duplicate_checks(store: JobStore) -> None:
    batch = store.batch("c1", "f.jsonl")
    store.add(batch, [job(f"j{n}") for n in range(1200)], recorded=1200, done=True)
    assert store.existing(["j3", "nope", "j1199"]) == {"j3", "j1199"}


def test_a_replayed_claim_resumes_after_its_last_chunk(store: JobStore) -> None:
    batch = store.batch("c1", "f.jsonl")
    store.add(batch, [job("a")], recorded=1, done=False)
    again = store.batch("c1", "ignored-on-replay.jsonl")
    assert (again.id, again.recorded, again.ingested, again.file) == (batch.id, 1, False, "f.jsonl")


def test_progress_round_trips_through_the_store(store: JobStore) -> None:
    batch = store.batch("c1", "f.jsonl")
    store.add(batch, [job("a")], recorded=1, done=True)
    (stored,) = store.take(1)
    progress = JobProgress.from_stored(stored)
    assert progress.deadline_at is None
    assert progress.events[0]["event"] == "job_claimed"
    progress.finish_stage("a", "text", {"model": "qwen"})
    store.commit([("a", json.dumps(progress.checkpoint()))])
    (loaded,) = store.load(["a"])
    resumed = JobProgress.from_stored(loaded)
    assert resumed.outputs == {"a": "text"} and [s.name for s in resumed.ready_stages()] == ["b"]
    assert resumed.job.source == {"file": "f.jsonl", "claim": "c1"}


def test_adopt_checkpoints_of_an_older_ihld(tmp_path: Path) -> None:
    """An upgrade: work/jobs/<id>.json files move into the store, none lost."""
    spool = Spool(tmp_path / "spool")
    spool.prepare()
    spool.jobs.mkdir()
    old = Job(
        id="old",
        priority=2,
        input={"topic": "t"},
        stages=A,
        pipeline="debate",
        source={"file": "f.jsonl", "claim": "c9", "line": 4},
    )
    record = {
        "version": 1,
        "job": old.to_record(),
        "seq": 3,
        "claimed_at": 1.5,
        "outputs": {"a": "x"},
        "stages": {"a": {"model": "qwen"}},
        "events": [],
    }
    (spool.jobs / "old.json").write_text(json.dumps(record))
    (spool.jobs / "bad.json").write_text("{not json")
    store = JobStore(spool.store_path)
    assert adopt_checkpoints(spool, store) == 1
    assert not list(spool.jobs.glob("*.json"))
    assert json.loads((spool.failed / "bad.json").read_text())["error"]["kind"] == (
        "corrupt_checkpoint"
    )
    store.start()
    (stored,) = store.take(5)
    resumed = JobProgress.from_stored(stored)
    assert resumed.outputs == {"a": "x"} and resumed.job.priority == 2
    assert resumed.job.source == {"file": "f.jsonl", "claim": "c9", "line": 4}


def test_a_published_job_whose_removal_was_lost_is_dropped_even_after_a_second_crash(
    tmp_path: Path,
) -> None:
    """Found by the torture: the removal was lost at one crash (``checkpoint.before_remove``);
    the next daemon died before it took that job again; the one after ran its last stage a
    second time. Recovery now drops it before the in-memory marks are cleared."""
    spool = Spool(tmp_path / "spool")
    spool.prepare()
    store = JobStore(spool.store_path)
    store.add(store.batch("c1", "f.jsonl"), [job("done"), job("queued")], recorded=2, done=True)
    store.take(2)  # both in memory; "done" then ends, and its removal is lost
    spool.publish(spool.outbox, "done", {"id": "done", "status": "ok", "stages": []})
    store.close()

    for _restart in range(2):  # a crash right after recovery, before the feeder took a job
        store = JobStore(spool.store_path)
        recover_crashed(spool, store, crashed=(), limit=3)
        assert store.marked() == set()
        store.close()

    store = JobStore(spool.store_path)
    store.recount()
    assert [stored.id for stored in store.take(5)] == ["queued"]
    assert count_jobs(spool.store_path) == 1


def test_recovery_keeps_the_marks_until_the_ended_jobs_are_dropped(tmp_path: Path) -> None:
    """A crash during recovery itself: the marks are still there for the next one."""
    from ihld.common import failpoints

    spool = Spool(tmp_path / "spool")
    spool.prepare()
    store = JobStore(spool.store_path)
    store.add(store.batch("c1", "f.jsonl"), [job("done"), job("queued")], recorded=2, done=True)
    store.take(2)
    spool.publish(spool.outbox, "done", {"id": "done", "status": "ok", "stages": []})
    failpoints.configure("checkpoint.before_remove:raise")
    try:
        with pytest.raises(OSError):
            recover_crashed(spool, store, crashed=(), limit=3)
    finally:
        failpoints.configure("")
    assert store.marked() == {"done", "queued"}
    recover_crashed(spool, store, crashed=(), limit=3)
    assert store.marked() == set() and store.ids() == ["queued"]


def test_a_store_being_created_reads_as_empty_from_outside(tmp_path: Path) -> None:
    """Seen in CI: a test read the file between its creation and the daemon's schema."""
    import sqlite3

    from ihld.core.storeview import read_ids

    path = tmp_path / "queue.db"
    sqlite3.connect(path).close()  # the file exists, no table yet
    assert read_progress(path) == {} and read_ids(path) == [] and count_jobs(path) == 0
