"""The job store: every accepted job until it ends, in one SQLite database.

``work/queue.db`` (WAL mode, ``synchronous=FULL``: a commit is on disk when
it returns) holds, per accepted job, one compact row: its id, its batch and
line, its priority, a reference to its resolved stages (stored once per
distinct pipeline, not per job), its input as compact JSON and, once a stage
has finished, its progress (outputs, stage records, timeline). A job nobody
has started costs that row and nothing in memory; the daemon *materialises*
jobs (``take``) while the engine has room, started ones first, then by
priority and arrival.

Why SQLite rather than files: a million waiting jobs must cost neither a
file each nor an object each. The queue index answers "the next N jobs by
priority, then age" without reading the rest; the unique index on ``id``
catches duplicate submissions; a transaction makes a whole intake chunk, or
a whole group of finished stages, durable at once (one WAL fsync), and a
kill in the middle of one leaves the last committed state. A restart reads
only the jobs that had started, so it takes the same time whatever the queue.

One connection, guarded by a lock: intake, the committer and the feeder all
call in from worker threads. Nothing here blocks the event loop.
"""

from __future__ import annotations

import errno
import json
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ihld.common import failpoints
from ihld.core.jobs import Job, StageSpec
from ihld.core.storerows import COLUMNS, SCHEMA, Batch, NewJob, StoredJob, Waiting, stages_text


class JobStore:
    """The SQLite job store of one spool (or node)."""

    def __init__(self, path: Path, *, exclusive: bool = False) -> None:
        self.path = path
        self._db = sqlite3.connect(
            path, isolation_level=None, check_same_thread=False, timeout=30.0
        )
        self._lock = threading.Lock()  # the connection: held for whole transactions
        self._counts = threading.Lock()  # the counters: held for a moment (the event loop reads)
        self._closed = False
        if exclusive:  # a spool on NFS: no shared-memory index, which hosts cannot share
            self._db.execute("PRAGMA locking_mode=EXCLUSIVE")
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)
        self._stageset_ids: dict[str, int] = {}
        self._stagesets: dict[int, tuple[tuple[StageSpec, ...], str | None, str]] = {}
        # the tuple itself is kept, so its id is not reused while it is a key
        self._by_identity: dict[int, tuple[tuple[StageSpec, ...], int]] = {}
        self._batches: dict[int, Batch] = {}
        self.waiting: Counter[int] = Counter()  # jobs not started, not in memory, by stageset
        self._started = 0  # jobs started (by an earlier daemon) and not in memory
        self.counted = True  # the counts are known (not right after ``start``)
        for row in self._db.execute("SELECT id, stages, pipeline, model FROM stagesets"):
            self._stageset_ids[row[1]] = row[0]

    def close(self) -> None:
        """Close; a thread still calling in (intake of a big file at a stop) gets an
        ``OSError``, so its claim stays for the next start."""
        with self._lock:
            self._closed = True
            self._db.close()

    @contextmanager
    def _using(self) -> Iterator[sqlite3.Connection]:
        """The connection, alone; an ``OSError`` once the store is closed."""
        with self._lock:
            if self._closed:
                raise OSError(errno.ESHUTDOWN, "job store closed: the daemon is stopping")
            yield self._db

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """All or nothing; a failing disk is an ``OSError``, as for the spool's files."""
        with self._using():
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    if self._db.in_transaction:
                        self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.OperationalError as exc:
                full = "full" in str(exc)
                raise OSError(errno.ENOSPC if full else errno.EIO, f"job store: {exc}") from exc

    # -- start-up -----------------------------------------------------------------------

    def marked(self) -> set[str]:
        """Ids the last daemon had in memory when it stopped (one may have ended just before
        a crash: its result published, its removal lost). The marks stay until ``start``."""
        with self._using() as db:
            return {r[0] for r in db.execute("SELECT id FROM jobs WHERE active = 1")}

    def start(self) -> None:
        """After a restart, once recovery has dropped the ``marked`` jobs that ended: nothing
        is in memory any more. (Clearing the marks any earlier would let a second crash
        hide a published job, which the next daemon would run again.)"""
        with self._transaction() as db:
            db.execute("UPDATE jobs SET active = 0 WHERE active = 1")
        self.counted = False  # until ``recount``: a pass over the queue, done after READY

    def recount(self) -> None:
        """Count the jobs not in memory: not started (by first model), and started."""
        with self._using() as db:
            rows = db.execute(
                "SELECT stageset, count(*) FROM jobs WHERE progress IS NULL AND active = 0 "
                "GROUP BY stageset"
            ).fetchall()
            started = db.execute(
                "SELECT count(*) FROM jobs INDEXED BY started "
                "WHERE progress IS NOT NULL AND active = 0"
            ).fetchone()[0]
            for stageset, _count in rows:
                self._stageset(stageset)  # cached, for ``waiting_view``
            with self._counts:
                self.waiting = Counter(dict(rows))
                self._started = started
                self.counted = True

    def forget_ended_batches(self) -> int:
        """Drop the rows of claimed files whose jobs have all ended (one pass, after READY)."""
        with self._transaction() as db:
            gone = db.execute(
                "DELETE FROM batches WHERE ingested = 1 "
                "AND id NOT IN (SELECT DISTINCT batch FROM jobs)"
            ).rowcount
        self._batches.clear()
        return int(gone)

    def backlog(self) -> int:
        """Jobs stored and not in memory (never waits for a transaction)."""
        with self._counts:
            return sum(self.waiting.values()) + self._started

    def waiting_view(self) -> Waiting:
        """The jobs not in memory: how many, by first model, and their stages by model."""
        with self._counts:
            counts = [(self._stagesets[s], n) for s, n in self.waiting.items()]
            started = self._started
        by_model: Counter[str] = Counter()
        stages: Counter[str] = Counter()
        for (specs, _pipeline, model), count in counts:
            by_model[model] += count
            for stage in specs:
                stages[stage.model_key()] += count
        return Waiting(sum(by_model.values()) + started, dict(by_model), dict(stages))

    # -- intake ---------------------------------------------------------------------------

    def batch(self, claim: str, file: str) -> Batch:
        """The batch of a claimed file: created at its first intake, found at a replay."""
        with self._transaction() as db:
            db.execute(
                "INSERT OR IGNORE INTO batches (claim, file, claimed_at) VALUES (?, ?, ?)",
                (claim, file, round(time.time(), 6)),
            )
            return self._batch_row("claim", claim)

    def existing(self, ids: Iterable[str]) -> set[str]:
        """Which of ``ids`` the store holds (duplicate submissions)."""
        wanted = list(ids)
        found: set[str] = set()
        with self._using():
            for start in range(0, len(wanted), 500):
                chunk = wanted[start : start + 500]
                marks = ",".join("?" * len(chunk))
                found.update(
                    r[0]
                    for r in self._db.execute(f"SELECT id FROM jobs WHERE id IN ({marks})", chunk)
                )
        return found

    def add(self, batch: Batch, jobs: Sequence[NewJob], *, recorded: int, done: bool) -> None:
        """Record a chunk of accepted jobs and the batch's resume point, atomically."""
        rows = []
        counts: Counter[int] = Counter()
        with self._transaction() as db:
            for job in jobs:
                stageset = self._stageset_id(db, job.stages, job.pipeline)
                counts[stageset] += 1
                rows.append(
                    (
                        job.id,
                        batch.id,
                        job.line,
                        job.priority,
                        stageset,
                        job.deadline_s,
                        job.deadline_at,
                        job.input,
                    )
                )
            db.executemany(
                "INSERT INTO jobs (id, batch, line, priority, stageset, deadline_s, deadline_at, "
                "input) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            failpoints.hit("store.intake_before_commit")
            db.execute(
                "UPDATE batches SET recorded = ?, ingested = ? WHERE id = ?",
                (recorded, int(done), batch.id),
            )
            with self._counts:
                self.waiting.update(counts)

    def _stageset_id(
        self, db: sqlite3.Connection, stages: tuple[StageSpec, ...], pipeline: str | None
    ) -> int:
        same = self._by_identity.get(id(stages))  # a named pipeline: one tuple for all its jobs
        if same is not None and same[0] is stages:
            return same[1]
        text = stages_text(stages)
        found = self._stageset_ids.get(text)
        if found is not None:
            self._by_identity[id(stages)] = (stages, found)
            self._stagesets.setdefault(found, (stages, pipeline, stages[0].model_key()))
            return found
        model = stages[0].model_key() if stages else ""
        cur = db.execute(
            "INSERT INTO stagesets (stages, pipeline, model) VALUES (?, ?, ?)",
            (text, pipeline, model),
        )
        assert cur.lastrowid is not None
        self._stageset_ids[text] = cur.lastrowid
        self._stagesets[cur.lastrowid] = (stages, pipeline, model)
        self._by_identity[id(stages)] = (stages, cur.lastrowid)
        return cur.lastrowid

    def _stageset(self, stageset: int) -> tuple[tuple[StageSpec, ...], str | None, str]:
        found = self._stagesets.get(stageset)
        if found is None:
            row = self._db.execute(
                "SELECT stages, pipeline, model FROM stagesets WHERE id = ?", (stageset,)
            ).fetchone()
            stages = tuple(StageSpec.model_validate(s) for s in json.loads(row[0]))
            found = (stages, row[1], row[2])
            self._stagesets[stageset] = found
        return found

    def _batch(self, batch_id: int) -> Batch:
        found = self._batches.get(batch_id)
        return found if found is not None else self._batch_row("id", batch_id)

    def _batch_row(self, column: str, value: int | str) -> Batch:
        row = self._db.execute(
            "SELECT id, claim, file, claimed_at, recorded, ingested FROM batches "
            f"WHERE {column} = ?",
            (value,),
        ).fetchone()
        batch = Batch(row[0], row[1], row[2], row[3], row[4], bool(row[5]))
        self._batches[batch.id] = batch
        return batch

    def adopt(self, job: Job, claimed_at: float, deadline_at: float | None, progress: str) -> bool:
        """A job checkpointed by an ihld before the store (upgrade); False if already here."""
        source = job.source
        claim = str(source.get("claim") or f"checkpoint:{job.id}")
        with self._transaction() as db:
            if db.execute("SELECT 1 FROM jobs WHERE id = ?", (job.id,)).fetchone():
                return False
            db.execute(
                "INSERT OR IGNORE INTO batches (claim, file, claimed_at, ingested) "
                "VALUES (?, ?, ?, 1)",
                (claim, str(source.get("file") or job.id), claimed_at),
            )
            batch = self._batch_row("claim", claim).id
            stageset = self._stageset_id(db, job.stages, job.pipeline)
            db.execute(
                "INSERT INTO jobs (id, batch, line, priority, stageset, deadline_s, deadline_at, "
                "input, progress) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    job.id,
                    batch,
                    source.get("line"),
                    job.priority,
                    stageset,
                    job.deadline_s,
                    deadline_at,
                    json.dumps(job.input, ensure_ascii=False, separators=(",", ":")),
                    progress,
                ),
            )
        return True

    # -- feeding the engine -------------------------------------------------------------

    def take(self, limit: int) -> list[StoredJob]:
        """Up to ``limit`` jobs not in memory: started ones first, then priority, then age.

        They are marked active, so the next call returns others.
        """
        columns = COLUMNS
        with self._transaction() as db:
            rows = []
            if self._started:  # left by an earlier daemon
                rows = db.execute(
                    f"SELECT {columns} FROM jobs INDEXED BY started "
                    "WHERE progress IS NOT NULL AND active = 0 ORDER BY seq LIMIT ?",
                    (limit,),
                ).fetchall()
            if len(rows) < limit:
                more = db.execute(
                    f"SELECT {columns} FROM jobs WHERE active = 0 "
                    "ORDER BY active, priority DESC, seq LIMIT ?",
                    (limit - len(rows),),
                ).fetchall()
                seen = {r[0] for r in rows}  # started ones already taken above
                rows += [r for r in more if r[0] not in seen]
            return self._taken(db, rows)

    def load(self, ids: Iterable[str]) -> list[StoredJob]:
        """These jobs' rows, whether in memory or not (crash recovery of running jobs)."""
        columns = COLUMNS
        out = []
        with self._using():
            for job_id in ids:
                row = self._db.execute(
                    f"SELECT {columns} FROM jobs WHERE id = ?", (job_id,)
                ).fetchone()
                if row is not None:
                    out.append(self._stored(row, taking=False))
        return out

    def expired(self, now: float, limit: int) -> list[StoredJob]:
        """Up to ``limit`` jobs not in memory whose deadline has passed (marked active)."""
        with self._transaction() as db:
            rows = db.execute(
                f"SELECT {COLUMNS} FROM jobs INDEXED BY deadlines "
                "WHERE deadline_at IS NOT NULL AND deadline_at <= ? AND active = 0 LIMIT ?",
                (now, limit),
            ).fetchall()
            return self._taken(db, rows)

    def _taken(self, db: sqlite3.Connection, rows: list[Any]) -> list[StoredJob]:
        """Rows now in memory: marked active, so no later call returns them again."""
        db.executemany("UPDATE jobs SET active = 1 WHERE seq = ?", [(r[0],) for r in rows])
        return [self._stored(row) for row in rows]

    def _stored(self, row: tuple[Any, ...], *, taking: bool = True) -> StoredJob:
        seq, job_id, batch, line, priority, stageset, deadline_s, deadline_at, text, progress = row
        stages, pipeline, _model = self._stageset(stageset)
        if taking:
            with self._counts:
                if progress is not None:
                    self._started = max(0, self._started - 1)
                elif self.waiting[stageset] > 1:
                    self.waiting[stageset] -= 1
                else:
                    self.waiting.pop(stageset, None)
        return StoredJob(
            seq=seq,
            id=job_id,
            batch=self._batch(batch),
            line=line,
            priority=priority,
            stages=stages,
            pipeline=pipeline,
            deadline_s=deadline_s,
            deadline_at=deadline_at,
            input=json.loads(text),
            progress=None if progress is None else json.loads(progress),
        )

    # -- progress -----------------------------------------------------------------------

    def commit(self, saves: Sequence[tuple[str, str]], drops: Sequence[str] = ()) -> None:
        """Durably record jobs' progress (compact JSON) and drop ended jobs, in one go."""
        if not saves and not drops:
            return
        with self._transaction() as db:
            for n, (job_id, progress) in enumerate(saves):
                db.execute("UPDATE jobs SET progress = ? WHERE id = ?", (progress, job_id))
                if n == len(saves) // 2:
                    failpoints.hit("store.progress_mid_write")
            db.executemany("DELETE FROM jobs WHERE id = ?", [(d,) for d in drops])
            if saves:
                failpoints.hit("checkpoint.before_publish")
            if drops:
                failpoints.hit("checkpoint.before_remove")
        if saves:
            failpoints.hit("checkpoint.after_publish")
        if drops:
            failpoints.hit("checkpoint.after_remove")

    def drop(self, job_id: str) -> None:
        """A job that ended outside the engine (poison, an unreadable row)."""
        self.commit((), (job_id,))

    # -- inspection -----------------------------------------------------------------------

    def count(self) -> int:
        with self._using():
            value: int = self._db.execute("SELECT count(*) FROM jobs").fetchone()[0]
        return value

    def ids(self) -> list[str]:
        with self._using():
            return [r[0] for r in self._db.execute("SELECT id FROM jobs ORDER BY seq")]
