"""Rejection records: what ``failed/`` says of a bad file, line or inbox entry.

An inbox entry that is not a regular file (a symlink, directory, FIFO or
socket) is moved aside unopened, its record written first, so a crash in
between replays to the same name. Records of duplicates never take the bare
``failed/<id>.json``: that name belongs to the job already submitted.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from ihld.common import failpoints, jsonsafe
from ihld.common.fsio import numbered_names
from ihld.core.inbox import InboxFile
from ihld.core.spool import Spool


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


def reject_inbox_entry(
    spool: Spool, entry: InboxFile, known_ids: set[str]
) -> dict[str, Any] | None:
    """A symlink, directory, FIFO or socket in the inbox: moved aside unopened."""
    reasons = {
        "symlink": "a symlink is not a job file; ihld never follows links",
        "dir": "a directory is not a job file",
        "fifo": "a FIFO is not a job file",
        "socket": "a socket is not a job file",
    }
    if not os.path.lexists(spool.inbox / entry.name):
        return None  # gone since the scan
    job_id = stem_id(entry.name)
    shown = display_name(entry.name)
    kind = entry.kind if entry.kind != "file" else "not_regular"
    # Record first, then move: a crash in between leaves the entry in the inbox and
    # its record, which the replay finds (and moves the entry to the name it gives).
    target = _unmoved_rejection(spool, job_id, shown, kind)
    record: dict[str, Any] | None = None
    if target is None:
        target = spool.reject_target(entry.name)
        record = rejection(
            job_id,
            kind,
            reasons.get(entry.kind, "not a regular file"),
            {"file": shown, "kept_as": str(target.relative_to(spool.root))},
        )
        spool.publish_failure(job_id, record, first=2 if job_id in known_ids else 1)
        known_ids.add(job_id)  # the name is taken: a later job with this id is a duplicate
    failpoints.hit("reject.before_move")
    spool.reject_inbox_entry(entry.name, target)
    return record


def _unmoved_rejection(spool: Spool, job_id: str, shown: str, kind: str) -> Path | None:
    """After a crash: the ``kept_as`` of this entry's rejection record, if not moved yet."""
    for path in failure_records(spool, job_id):
        try:
            record = jsonsafe.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        src = record.get("source") or {}
        kept = src.get("kept_as")
        if (
            record.get("status") == "rejected"
            and (record.get("error") or {}).get("kind") == kind
            and src.get("file") == shown
            and "claim" not in src
            and isinstance(kept, str)
            and not (spool.root / kept).exists()
            and not (spool.root / kept).is_symlink()
        ):
            return spool.root / kept
    return None


def failure_records(spool: Spool, job_id: str) -> list[Path]:
    """``failed/<id>.json`` and its ``<id>~N.json`` siblings (duplicates), in order."""
    paths = []
    for n, name in enumerate(numbered_names(job_id), start=1):
        path = spool.failed / name
        if not path.exists():
            if n > 1:
                break
            continue
        paths.append(path)
    return paths


def display_name(name: str) -> str:
    """A file name as records and logs show it: valid UTF-8 whatever its bytes.

    ``os.listdir`` hands out undecodable bytes as lone surrogates, which no
    UTF-8 writer accepts; they are shown as ``\\xff`` escapes instead.
    """
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def stem_id(name: str) -> str:
    from ihld.core.jobs import default_id_for

    return default_id_for(os.path.splitext(name)[0])
