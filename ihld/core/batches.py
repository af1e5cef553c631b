"""Files that came in through an intake format, until all their lines have ended.

Intake writes a manifest, ``work/batches/<claim>.json``, before the jobs'
checkpoints: which job each line became, its format and tag. The daemon
tells the tracker of every job that ends; when a file's last line ends, the
tracker reads each line's record from ``outbox/`` or ``failed/``, asks the
line's format for its output files (``IntakeFormat.finish``), publishes them
and drops the manifest. After a crash the manifests are read again, so a
batch's files are written once all its lines have ended, whenever that is.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ihld.common import jsonsafe
from ihld.core.entries import Entry
from ihld.core.formats import FinishedBatch, IntakeFormat, LineEnd
from ihld.core.spool import Spool

LEGACY_FORMAT = "openai-batch"  # manifests written before formats were plugins


def manifest(batch: str, claim: str, entries: Sequence[Entry]) -> dict[str, Any]:
    """The manifest of a claimed file: its lines that an intake format read."""
    lines = [
        {"job_id": e.job_id, "line": e.line, "format": e.format, "tag": e.tag}
        for e in entries
        if e.format is not None
    ]
    return {"batch": batch, "claim": claim, "lines": lines, "created_at": time.time()}


def _line_format(line: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    if "format" in line:
        return str(line["format"]), dict(line.get("tag") or {})
    return LEGACY_FORMAT, {"custom_id": line.get("custom_id")}


class BatchTracker:
    """Knows which jobs belong to which batch, and writes a batch's files when it ends."""

    def __init__(self, spool: Spool, formats: Mapping[str, IntakeFormat]) -> None:
        self.spool = spool
        self.formats = formats  # by name; the daemon swaps it on reload
        self.directory = spool.work / "batches"
        self.directory.mkdir(exist_ok=True)
        self._batch_of: dict[str, str] = {}  # job id -> manifest name
        self._remaining: dict[str, set[str]] = {}
        self._manifests: dict[str, dict[str, Any]] = {}

    def load_all(self) -> list[str]:
        """Read every manifest (start-up); returns batches already complete."""
        complete = []
        for path in sorted(self.directory.glob("*.json")):
            name = self.register(jsonsafe.loads(path.read_text(encoding="utf-8")), path.stem)
            if name is not None:
                complete.append(name)
        return complete

    def register(self, value: dict[str, Any], name: str | None = None) -> str | None:
        """Track a batch; returns its name if all its lines have already ended."""
        name = name or Path(value["claim"]).stem
        self._manifests[name] = value
        remaining = set()
        for line in value["lines"]:
            job_id = line["job_id"]
            if not self.spool.is_finished(job_id):
                remaining.add(job_id)
                self._batch_of[job_id] = name
        self._remaining[name] = remaining
        return name if not remaining else None

    def job_ended(self, job_id: str) -> str | None:
        """A job finished or failed; returns the batch name if that completed it."""
        name = self._batch_of.pop(job_id, None)
        if name is None:
            return None
        remaining = self._remaining[name]
        remaining.discard(job_id)
        return name if not remaining else None

    def assemble(self, name: str) -> list[Path | None]:
        """Blocking: publish the batch's output files (each format's); drop the manifest."""
        value = self._manifests.pop(name)
        self._remaining.pop(name, None)
        by_format: dict[str, list[LineEnd]] = {}
        for line in value["lines"]:
            fmt, tag = _line_format(line)
            job_id = line["job_id"]
            result = self._read(self.spool.outbox / f"{job_id}.json")
            failure = (
                None
                if result is not None
                else (
                    self._read(self.spool.failed / f"{job_id}.json")
                    or {"error": {"kind": "lost", "message": "no record found for this line"}}
                )
            )
            by_format.setdefault(fmt, []).append(
                LineEnd(job_id, line.get("line"), tag, result, failure)
            )
        published: list[Path | None] = []  # None: a file of that name was already there
        for fmt, lines in by_format.items():
            handler = self.formats.get(fmt)
            if handler is None:
                raise LookupError(f"batch {name}: no intake format {fmt!r} is registered")
            files = handler.finish(FinishedBatch(value["batch"], fmt, tuple(lines)))
            for file_name, data in files.items():
                published.append(self.spool.publish_text(file_name, data))
        (self.directory / f"{name}.json").unlink(missing_ok=True)
        return published

    @staticmethod
    def _read(path: Path) -> dict[str, Any] | None:
        try:
            value: dict[str, Any] = jsonsafe.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return value
