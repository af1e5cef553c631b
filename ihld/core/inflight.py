"""The in-flight log: which stages the running daemon started and finished.

After a crash, the jobs with a stage started and not finished are the ones
that were running; a job that is running at every crash becomes poison
(``[spool] max_recoveries``).
"""

from __future__ import annotations

import os
from pathlib import Path


class InflightLog:
    """Append-only ``S job stage`` / ``F job stage`` lines, unsynced on purpose.

    It only has to survive the death of the process (the page cache does),
    not a power cut: its use is to find the jobs that were running when the
    daemon crashed, so a job that crashes it again and again becomes poison.
    """

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o640)
        self.write_errors = 0

    def started(self, job_id: str, stage: str) -> None:
        self._write(f"S {job_id} {stage}\n".encode())

    def finished(self, job_id: str, stage: str) -> None:
        self._write(f"F {job_id} {stage}\n".encode())

    def _write(self, line: bytes) -> None:
        """Never raise: a full disk must not stop a stage (this log is advice for poison checks)."""
        try:
            os.write(self._fd, line)
        except OSError:
            self.write_errors += 1

    def close(self) -> None:
        os.close(self._fd)


def read_inflight(path: Path) -> dict[str, int]:
    """Jobs with a stage started but not finished when the last daemon died, with counts."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return {}
    open_stages: dict[tuple[str, str], int] = {}
    for line in text.splitlines():
        parts = line.split(" ")
        if len(parts) != 3:
            continue
        mark, job_id, stage = parts
        key = (job_id, stage)
        if mark == "S":
            open_stages[key] = open_stages.get(key, 0) + 1
        elif mark == "F":
            open_stages.pop(key, None)
    crashed: dict[str, int] = {}
    for job_id, _stage in open_stages:
        crashed[job_id] = 1
    return crashed
