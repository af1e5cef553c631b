"""What the inbox holds (entries as ``lstat`` saw them) and a bounded, link-refusing read."""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from ihld.common.errors import JobError
from ihld.core.inflight import InflightLog as InflightLog

JOB_SUFFIXES = (".json", ".jsonl")


@dataclass(frozen=True)
class InboxFile:
    """A name seen in the inbox and what ``lstat`` said of it."""

    name: str
    size: int
    mtime_ns: int
    kind: str  # "file", "symlink", "dir", "fifo", "socket", "other"

    @property
    def suffix(self) -> str:
        return os.path.splitext(self.name)[1]

    @property
    def stem(self) -> str:
        return os.path.splitext(self.name)[0]


def is_candidate(name: str) -> bool:
    """Names ihld may claim: not dotfiles, not ``*.tmp``, ending in .json or .jsonl."""
    return not name.startswith(".") and not name.endswith(".tmp") and name.endswith(JOB_SUFFIXES)


def _kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISSOCK(mode):
        return "socket"
    return "other"


def read_job_file(path: Path, max_bytes: int) -> bytes:
    """Read a claimed file safely: no symlinks, no FIFOs, no hard links, bounded size."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise JobError(
                "a symlink is not a job file; ihld never follows links", kind="symlink"
            ) from None
        if exc.errno == errno.EACCES:
            raise JobError(
                "file is not readable by the daemon (permission denied)", kind="unreadable"
            ) from None
        if exc.errno == errno.ENXIO:
            raise JobError("not a regular file (socket)", kind="not_regular") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise JobError(f"not a regular file ({_kind(st.st_mode)})", kind="not_regular")
        if st.st_nlink > 1:
            raise JobError(
                "file has other hard links; copy it instead of linking", kind="hard_link"
            )
        if st.st_size > max_bytes:
            raise JobError(
                f"file is {st.st_size} bytes, over the limit of {max_bytes} "
                "([limits] max_job_bytes)",
                kind="too_large",
            )
        chunks = []
        remaining = max_bytes + 1
        while remaining > 0:
            chunk = os.read(fd, min(remaining, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
        data = b"".join(chunks)
        if len(data) > max_bytes:
            raise JobError(f"file grew over the limit of {max_bytes} bytes", kind="too_large")
        return data
    finally:
        os.close(fd)
