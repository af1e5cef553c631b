"""Intake: a claimed job file becomes jobs in the job store and error records.

Blocking file work, run in a worker thread by the daemon. Every entry of a
file ends as exactly one of: a row in the job store (accepted) or a record in
``failed/`` (rejected, with the field path or line that is wrong). A file is
recorded in chunks of ``CHUNK`` entries, each chunk one transaction that also
moves the file's resume point, so a million-line file streams into the store
without a file or an object per job. Re-running intake on the same claimed
file after a crash is safe: it resumes after the last committed chunk, and
entries of the chunk that was cut short whose record already came from this
claim are skipped, not reported as duplicates.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ihld.common import failpoints, jsonsafe
from ihld.common.errors import JobError
from ihld.core.batches import manifest
from ihld.core.entries import Entry, read_entries
from ihld.core.formats import IntakeFormat
from ihld.core.inbox import InboxFile
from ihld.core.jobs import Job, JobSpec, StageSpec
from ihld.core.rejects import (
    display_name,
    failure_records,
    reject_inbox_entry,
    rejection,
    stem_id,
)
from ihld.core.spool import Spool
from ihld.core.store import JobStore
from ihld.core.storerows import Batch, NewJob

Resolver = Callable[[JobSpec, str, dict[str, Any]], Job]

CHUNK = 5000  # entries per store transaction


@dataclass
class IntakeResult:
    accepted: list[str] = field(default_factory=list)  # ids now in the job store
    rejected: list[dict[str, Any]] = field(default_factory=list)  # the error records
    batch_manifest: dict[str, Any] | None = None  # lines an intake format read (batches)
    keep_input: bool = False  # an entry was rejected: keep the file under failed/inputs
    file: str = ""
    rejected_ids: set[str] = field(default_factory=set)


@dataclass
class _Chunk:
    """Entries read since the last commit."""

    jobs: list[NewJob] = field(default_factory=list)
    where: dict[str, dict[str, Any]] = field(default_factory=dict)  # id -> source, for rejections
    known: set[str] = field(default_factory=set)  # ids of jobs that had ended when read


class Intake:
    """Claims inbox files and splits them into jobs. Owns the set of known ids."""

    def __init__(
        self,
        spool: Spool,
        store: JobStore,
        resolver: Resolver,
        *,
        max_bytes: int,
        deadline_s: float | None = None,
        formats: Sequence[IntakeFormat] = (),
        on_added: Callable[[], object] = lambda: None,
    ) -> None:
        self.spool = spool
        self.store = store
        self.resolver = resolver
        self.max_bytes = max_bytes
        self.deadline_s = deadline_s  # [limits] job_deadline_s: a job's own deadline_s wins
        self.formats = formats  # the plugins' intake formats (a reload swaps them)
        self.on_added = on_added  # a chunk of jobs is in the store (called from the thread)
        self._known_ids: set[str] | None = None
        self._ended: list[str] = []  # jobs that ended before known_ids was read

    @property
    def known_ids(self) -> set[str]:
        """Ids of jobs that ended (outbox/, failed/); the store knows those still queued.

        Read at the first intake (in intake's thread, after READY): a directory
        listing that grows with the jobs done, not with the queue.
        """
        known = self._known_ids
        if known is None:
            known = self.spool.known_ids()
            self._known_ids = known  # from now on ``ended`` adds here; before, to the list
            known.update(self._ended)
        return known

    def ended(self, job_id: str) -> None:
        """A job ended: its id stays taken (called on the event loop, never blocks)."""
        if self._known_ids is None:
            self._ended.append(job_id)
        else:
            self._known_ids.add(job_id)

    @property
    def resolver(self) -> Resolver:
        return self._resolver

    @resolver.setter
    def resolver(self, resolver: Resolver) -> None:
        """A reload swaps the resolver: resolved pipelines are forgotten with it."""
        self._resolver = resolver
        self._resolved: dict[str, tuple[StageSpec, ...]] = {}

    def reject_entry(self, entry: InboxFile) -> dict[str, Any] | None:
        """A symlink, directory, FIFO or socket in the inbox: moved aside unopened."""
        return reject_inbox_entry(self.spool, entry, self.known_ids)

    def claim_and_read(self, entry: InboxFile) -> IntakeResult | None:
        """Claim one inbox file and process it; None if it vanished first."""
        path = self.spool.claim(entry.name, stem_id(entry.name))
        if path is None:
            return None
        return self.process(path, original=entry.name)

    def process(self, path: Path, *, original: str | None = None) -> IntakeResult:
        """Split a claimed file into stored jobs and rejections, then drop the claim."""
        default_id = Spool.claimed_default_id(path)
        source: dict[str, Any] = {
            "file": display_name(original) if original is not None else default_id,
            "claim": path.name,
        }
        result = IntakeResult(file=source["file"])
        try:
            data = self.spool.read_claimed(path, self.max_bytes)
        except JobError as exc:
            self._reject_file(path, default_id, exc.kind, str(exc), source, result)
            return result
        try:
            suffix = os.path.splitext(path.name)[1]
            entries = read_entries(default_id, suffix, data, self.formats)
            del data
            first = next(entries)
            if first.error is not None and first.line is None:
                err = first.error
                self._reject_file(path, default_id, err.kind, str(err), source, result)
                return result
            batch = self.store.batch(path.name, source["file"])
            source["file"] = batch.file  # as first claimed (a replay has only the claim)
            self._read(batch, first, entries, path, source, result)
        except OSError:
            raise  # a full or failing disk: the claim stays, intake pauses and replays it
        except Exception as exc:
            # An input nobody foresaw (or a bug) must neither wedge the claim (it would be
            # replayed, and fail, at every start) nor lose the file: reject it whole.
            if result.accepted:
                raise  # some of its jobs are stored: replay the rest later, never reject them
            self._reject_file(
                path,
                default_id,
                "intake_error",
                f"ihld could not process this file: {type(exc).__name__}: {exc}"[:2000],
                source,
                result,
            )
            return result
        failpoints.hit("intake.after_job_saved")
        failpoints.hit("intake.before_release")
        if result.keep_input:  # some line was rejected: its bytes stay, whatever their size
            self.spool.reject_claimed(path)
        else:
            self.spool.done_with_claimed(path)
        return result

    def _read(
        self,
        batch: Batch,
        first: Entry,
        rest: Iterator[Entry],
        path: Path,
        source: dict[str, Any],
        result: IntakeResult,
    ) -> None:
        """Every entry into a chunk; each full chunk committed with the resume point."""
        in_file: set[str] = set()
        formatted: list[Entry] = []
        chunk = _Chunk()
        number = 0
        for number, entry in enumerate(_chain(first, rest), start=1):
            if entry.format is not None:
                formatted.append(entry)
            if number <= batch.recorded:  # committed before a crash
                in_file.add(entry.job_id)
                if (
                    entry.error is not None
                    or self._already_recorded(entry.job_id, path.name, entry.line) == "failed"
                ):
                    result.keep_input = True
                continue
            self._one(entry, path, source, in_file, chunk, result, batch.claimed_at)
            if len(chunk.jobs) >= CHUNK:
                self._commit(batch, chunk, path, result, recorded=number, done=False)
                chunk = _Chunk()
        if formatted:
            result.batch_manifest = self._batch_manifest(
                path, Spool.claimed_default_id(path), formatted
            )
        self._commit(batch, chunk, path, result, recorded=number, done=True)

    def _commit(
        self,
        batch: Batch,
        chunk: _Chunk,
        path: Path,
        result: IntakeResult,
        *,
        recorded: int,
        done: bool,
    ) -> None:
        """Reject the chunk's ids already queued or ended, store the rest: one transaction."""
        ids = [job.id for job in chunk.jobs]
        # The store before known_ids: a job that ends is known as ended before it leaves
        # the store. A line of this very file rejected as a duplicate is known too: not
        # a reason to reject the line it duplicates.
        taken = self.store.existing(ids) | chunk.known
        taken.update(i for i in ids if i in self.known_ids and i not in result.rejected_ids)
        jobs = chunk.jobs
        if taken:
            jobs = [job for job in chunk.jobs if job.id not in taken]
            for job_id in (i for i in ids if i in taken):
                if self._already_recorded(job_id, path.name, chunk.where[job_id].get("line")):
                    continue  # stored or rejected before a crash cut this chunk short
                error = JobError(
                    f"duplicate id {job_id!r}: a job with this id was already submitted",
                    kind="duplicate_id",
                    path="id",
                )
                self._reject_line(job_id, error, chunk.where[job_id], path, "", result)
        self.store.add(batch, jobs, recorded=recorded, done=done)
        result.accepted.extend(job.id for job in jobs)
        if jobs:
            self.on_added()

    def _batch_manifest(self, path: Path, batch: str, entries: list[Entry]) -> dict[str, Any]:
        """Record which job each line of a format's file became (before the checkpoints)."""
        value = manifest(batch, path.name, entries)
        directory = self.spool.work / "batches"
        directory.mkdir(exist_ok=True)
        self.spool.save_json(directory, path.stem, value)
        return value

    def _reject_file(
        self,
        path: Path,
        job_id: str,
        kind: str,
        message: str,
        source: dict[str, Any],
        result: IntakeResult,
    ) -> None:
        """Record the error first, then keep the bytes: a crash between the two replays safely."""
        kept = self.spool.failed_inputs / path.name
        if not self._already_recorded(job_id, path.name, None):
            source = {**source, "kept_as": str(kept.relative_to(self.spool.root))}
            record = rejection(job_id, kind, message, source)
            taken = job_id in self.known_ids  # the bare name is that job's, not this file's
            self.spool.publish_failure(job_id, record, first=2 if taken else 1)
            self.known_ids.add(job_id)
            result.rejected.append(record)
        self.spool.reject_claimed(path)

    def _one(
        self,
        entry: Entry,
        path: Path,
        source: dict[str, Any],
        in_file: set[str],
        chunk: _Chunk,
        result: IntakeResult,
        claimed_at: float,
    ) -> None:
        job_id = entry.job_id
        where = {**source, "line": entry.line} if entry.line is not None else dict(source)
        error: JobError | None = entry.error
        if error is None and job_id in in_file:
            error = JobError(
                f"duplicate id {job_id!r} in this file", kind="duplicate_id", path="id"
            )
        stages: tuple[StageSpec, ...] | None = None
        if error is None:
            assert entry.spec is not None
            try:
                stages = self._stages(entry.spec, job_id, where)
            except JobError as exc:
                error = exc
        in_file.add(job_id)
        if error is not None or stages is None:
            assert error is not None
            if self._already_recorded(job_id, path.name, entry.line):
                result.keep_input = True
                return
            self._reject_line(job_id, error, where, path, entry.raw, result)
            return
        spec = entry.spec
        assert spec is not None
        chunk.where[job_id] = where
        deadline = spec.deadline_s or self.deadline_s
        if job_id in self.known_ids:
            chunk.known.add(job_id)
        chunk.jobs.append(
            NewJob(
                id=job_id,
                line=entry.line,
                priority=spec.priority,
                stages=stages,
                pipeline=spec.pipeline,
                deadline_s=spec.deadline_s,
                deadline_at=None if deadline is None else claimed_at + deadline,
                input=json.dumps(spec.input, ensure_ascii=False, separators=(",", ":")),
            )
        )

    def _stages(self, spec: JobSpec, job_id: str, where: dict[str, Any]) -> tuple[StageSpec, ...]:
        """The resolved stages; a named pipeline without overrides is resolved once."""
        if spec.stages is not None or spec.overrides or spec.pipeline is None:
            return self.resolver(spec, job_id, where).stages
        found = self._resolved.get(spec.pipeline)
        if found is None:
            found = self.resolver(spec, job_id, where).stages
            self._resolved[spec.pipeline] = found
        return found

    def _reject_line(
        self,
        job_id: str,
        error: JobError,
        where: dict[str, Any],
        path: Path,
        raw: str,
        result: IntakeResult,
    ) -> None:
        result.keep_input = True
        kept = self.spool.failed_inputs / path.name
        record = rejection(
            job_id,
            error.kind,
            str(error),
            {**where, "kept_as": str(kept.relative_to(self.spool.root))},
            field=error.path or None,
            raw=raw or None,
        )
        # A duplicate's record never takes the bare name: that belongs to the job
        # already submitted (recovery reads failed/<id>.json as that job's end).
        taken = error.kind == "duplicate_id" or job_id in self.known_ids
        self.spool.publish_failure(job_id, record, first=2 if taken else 1)
        self.known_ids.add(job_id)
        result.rejected.append(record)
        result.rejected_ids.add(job_id)

    def _already_recorded(self, job_id: str, claim: str, line: int | None) -> str | None:
        """Where a record for ``job_id`` from this very claim and line is (crash replay).

        ``"jobs"``, ``"failed"`` or ``"outbox"``; None if there is none.
        """
        for stored in self.store.load([job_id]):
            if stored.batch.claim == claim and stored.line == line:
                return "jobs"
        paths = [
            *(("failed", p) for p in failure_records(self.spool, job_id)),
            ("outbox", self.spool.outbox / f"{job_id}.json"),
        ]
        for where, path in paths:
            try:
                record = jsonsafe.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            src = record.get("source") or (record.get("job") or {}).get("source") or {}
            if src.get("claim") == claim and src.get("line") == line:
                return where
        return None


def _chain(first: Entry, rest: Iterator[Entry]) -> Iterator[Entry]:
    yield first
    yield from rest
