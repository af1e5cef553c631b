"""Intake: a claimed job file becomes accepted jobs (checkpointed) and error records.

Blocking file work, run in a worker thread by the daemon. Every entry of a
file ends as exactly one of: a checkpoint in ``work/jobs`` (accepted) or a
record in ``failed/`` (rejected, with the field path or line that is wrong).
Re-running intake on the same claimed file after a crash is safe: entries
whose checkpoint or record already came from this claim are skipped, not
reported as duplicates.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ihld import failpoints, jsonsafe
from ihld.errors import JobError
from ihld.jobs import Entry, Job, JobSpec, read_entries
from ihld.progress import JobProgress
from ihld.spool import InboxFile, Spool

Resolver = Callable[[JobSpec, str, dict[str, Any]], Job]


@dataclass
class IntakeResult:
    accepted: list[JobProgress] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)  # the error records


def rejection(
    job_id: str, kind: str, message: str, source: dict[str, Any], **extra: Any
) -> dict[str, Any]:
    return {
        "id": job_id,
        "status": "rejected",
        "error": {"stage": None, "kind": kind, "message": message, **extra},
        "source": source,
        "failed_at": round(time.time(), 6),
    }


class Intake:
    """Claims inbox files and splits them into jobs. Owns the set of known ids."""

    def __init__(
        self,
        spool: Spool,
        resolver: Resolver,
        *,
        max_bytes: int,
        deadline_s: float | None = None,
        next_seq: Callable[[], int],
    ) -> None:
        self.spool = spool
        self.resolver = resolver
        self.max_bytes = max_bytes
        self.deadline_s = deadline_s
        self.next_seq = next_seq
        self.known_ids = spool.known_ids()

    def reject_entry(self, entry: InboxFile) -> dict[str, Any] | None:
        """A symlink, directory, FIFO or socket in the inbox: moved aside unopened."""
        reasons = {
            "symlink": "a symlink is not a job file; ihld never follows links",
            "dir": "a directory is not a job file",
            "fifo": "a FIFO is not a job file",
            "socket": "a socket is not a job file",
        }
        moved = self.spool.reject_inbox_entry(entry.name)
        if moved is None:
            return None
        job_id = _stem_id(entry.name)
        record = rejection(
            job_id,
            entry.kind if entry.kind != "file" else "not_regular",
            reasons.get(entry.kind, "not a regular file"),
            {"file": entry.name, "kept_as": str(moved.relative_to(self.spool.root))},
        )
        self.spool.publish_failure(job_id, record)
        return record

    def claim_and_read(self, entry: InboxFile) -> IntakeResult | None:
        """Claim one inbox file and process it; None if it vanished first."""
        path = self.spool.claim(entry.name, _stem_id(entry.name))
        if path is None:
            return None
        return self.process(path, original=entry.name)

    def process(self, path: Path, *, original: str | None = None) -> IntakeResult:
        """Split a claimed file into accepted jobs and rejections, then drop the claim."""
        result = IntakeResult()
        default_id = Spool.claimed_default_id(path)
        source: dict[str, Any] = {
            "file": original if original is not None else default_id,
            "claim": path.name,
        }
        try:
            data = self.spool.read_claimed(path, self.max_bytes)
        except JobError as exc:
            self._reject_file(path, default_id, exc.kind, str(exc), source, result)
            return result
        entries = list(read_entries(default_id, os.path.splitext(path.name)[1], data))
        if len(entries) == 1 and entries[0].error is not None and entries[0].line is None:
            err = entries[0].error
            self._reject_file(path, default_id, err.kind, str(err), source, result)
            return result
        in_file: set[str] = set()
        for entry in entries:
            self._one(entry, path, source, in_file, result)
        created = self.spool.create_checkpoints(
            [(p.job.id, p.checkpoint()) for p in result.accepted]
        )
        # a checkpoint that already existed was written before a crash: recovery loads it
        result.accepted = [p for p, new in zip(result.accepted, created, strict=True) if new]
        failpoints.hit("intake.after_job_saved")
        failpoints.hit("intake.before_release")
        self.spool.done_with_claimed(path)
        return result

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
            self.spool.publish_failure(job_id, record)
            self.known_ids.add(job_id)
            result.rejected.append(record)
        self.spool.reject_claimed(path)

    def _one(
        self,
        entry: Entry,
        path: Path,
        source: dict[str, Any],
        in_file: set[str],
        result: IntakeResult,
    ) -> None:
        job_id = entry.job_id
        where = {**source, "line": entry.line} if entry.line is not None else dict(source)
        error: JobError | None = entry.error
        if error is None and job_id in in_file:
            error = JobError(
                f"duplicate id {job_id!r} in this file", kind="duplicate_id", path="id"
            )
        if error is None and job_id in self.known_ids:
            if self._already_recorded(job_id, path.name, entry.line):
                in_file.add(job_id)
                return
            error = JobError(
                f"duplicate id {job_id!r}: a job with this id was already submitted",
                kind="duplicate_id",
                path="id",
            )
        job: Job | None = None
        if error is None:
            assert entry.spec is not None
            try:
                job = self.resolver(entry.spec, job_id, where)
            except JobError as exc:
                error = exc
        in_file.add(job_id)
        if error is not None or job is None:
            assert error is not None
            record = rejection(
                job_id,
                error.kind,
                str(error),
                where,
                field=error.path or None,
                raw=entry.raw or None,
            )
            if self._already_recorded(job_id, path.name, entry.line):
                return
            self.spool.publish_failure(job_id, record)
            self.known_ids.add(job_id)
            result.rejected.append(record)
            return
        progress = JobProgress(job, self.next_seq())
        deadline = job.deadline_s or self.deadline_s
        if deadline is not None:
            progress.deadline_at = progress.claimed_at + deadline
        progress.event("job_claimed", file=source["file"], line=entry.line)
        self.known_ids.add(job_id)
        result.accepted.append(progress)  # checkpointed in one batch at the end of the file

    def _already_recorded(self, job_id: str, claim: str, line: int | None) -> bool:
        """True if a record for ``job_id`` came from this very claim and line (crash replay)."""
        for directory in (self.spool.jobs, self.spool.failed, self.spool.outbox):
            path = directory / f"{job_id}.json"
            try:
                record = jsonsafe.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            src = record.get("source") or (record.get("job") or {}).get("source") or {}
            if src.get("claim") == claim and src.get("line") == line:
                return True
        return False


def _stem_id(name: str) -> str:
    from ihld.jobs import default_id_for

    return default_id_for(os.path.splitext(name)[0])
