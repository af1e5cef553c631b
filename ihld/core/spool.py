"""The spool: directories, claims, checkpoints and results on disk.

Layout under ``[spool] dir``::

    inbox/            users drop job files here (group-writable)
    work/claimed/     claimed job files, renamed out of the inbox: the claim *is* the lock
    work/queue.db     the job store: every accepted job until it ends (ihld.core.store)
    work/inflight.log stages started and finished by the running daemon (poison detection)
    outbox/           one result per finished job
    failed/           one error record per failed job or rejected file
    failed/inputs/    the bytes of rejected files, kept so no job is ever lost
    log/ihld.jsonl    the structured event log
    run/              lock file, control socket, clean-shutdown marker

Every write that a reader may see is atomic: a dotted temp file in the same
directory, fsync, then link (results, which must never overwrite), then
fsync of the directory. Readers only look at final names; the job store is
SQLite's to keep consistent. Nothing here follows a symlink or opens a file
outside the spool.
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ihld.common import failpoints, jsonsafe
from ihld.common.errors import SpoolError
from ihld.common.fsio import fsync_dir, link_free, replace_durably, write_temp
from ihld.core.inbox import (
    InboxFile,
    _kind,
    read_job_file,
)
from ihld.core.inflight import read_inflight
from ihld.core.storeview import count_jobs

_seq = itertools.count()


def encode_record(record: dict[str, Any], *, compact: bool = False) -> bytes:
    """Results are indented for people; checkpoints, rewritten after every stage, are
    compact (the indenting encoder is three times slower)."""
    return (jsonsafe.dumps(record, compact=compact) + "\n").encode("utf-8")


class Spool:
    """All file operations on one spool directory."""

    def __init__(self, root: Path, node: str | None = None) -> None:
        self.root = root
        self.node = node
        self.inbox = root / "inbox"
        # With a node name (several daemons sharing one spool, e.g. over NFS), each
        # daemon keeps its claims, checkpoints and run files apart; the inbox,
        # outbox and failed/ are shared, and claiming by rename decides who runs what.
        self.work = root / "work" / node if node else root / "work"
        self.claimed = self.work / "claimed"
        self.jobs = self.work / "jobs"  # checkpoint files of ihld before the job store
        self.store_path = self.work / "queue.db"
        self.outbox = root / "outbox"
        self.failed = root / "failed"
        self.failed_inputs = self.failed / "inputs"
        self.log_dir = root / "log"
        self.run_dir = root / "run" / node if node else root / "run"
        self.log_file = self.log_dir / (f"ihld-{node}.jsonl" if node else "ihld.jsonl")
        self.inflight_log = self.work / "inflight.log"
        self.clean_marker = self.run_dir / "clean-shutdown"
        self._lock_fd: int | None = None

    # -- set-up -------------------------------------------------------------

    def prepare(self) -> None:
        """Create the directories; fail with a message that says what to fix."""
        dirs = (
            self.root,
            self.inbox,
            self.work.parent,
            self.work,
            self.claimed,
            self.outbox,
            self.failed,
            self.failed_inputs,
            self.log_dir,
            self.run_dir.parent,
            self.run_dir,
        )
        for directory in dirs:
            try:
                directory.mkdir(mode=0o750)
                if directory == self.inbox:
                    _make_group_inbox(directory)
            except FileExistsError:
                pass  # there already, or another node sharing the spool made it just now
            except OSError as exc:
                raise SpoolError(
                    f"cannot create spool directory {directory}: {exc.strerror}; "
                    f"check that the daemon's user owns {self.root}"
                ) from None
            if not os.access(directory, os.R_OK | os.W_OK | os.X_OK):
                raise SpoolError(
                    f"spool directory {directory} is not readable and writable by uid "
                    f"{os.getuid()}; fix its owner or mode (see README: Spool permissions)"
                )

    def lock(self) -> None:
        """Take the spool lock so a second daemon on the same spool refuses to start."""
        path = self.run_dir / "ihld.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise SpoolError(
                f"another ihld daemon (pid {holder}) is running on spool {self.root}"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def was_clean_shutdown(self) -> bool:
        """True if the previous daemon left the spool after a graceful stop."""
        return self.clean_marker.exists()

    def mark_running(self) -> None:
        self.clean_marker.unlink(missing_ok=True)
        fsync_dir(self.run_dir)

    def mark_clean_shutdown(self) -> None:
        self.clean_marker.write_text(f"{time.time()}\n")
        fsync_dir(self.run_dir)

    # -- inbox --------------------------------------------------------------

    def scan_inbox(self) -> list[InboxFile]:
        """Everything in the inbox that is not a dotfile or temp file, oldest name first."""
        found = []
        try:
            entries = list(os.scandir(self.inbox))
        except FileNotFoundError:  # deleted under us: re-create it, rescans will see new files
            self.inbox.mkdir(mode=0o750, exist_ok=True)
            _make_group_inbox(self.inbox)
            return []
        for entry in entries:
            name = entry.name
            if name.startswith(".") or name.endswith(".tmp"):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            found.append(InboxFile(name, st.st_size, st.st_mtime_ns, _kind(st.st_mode)))
        found.sort(key=lambda f: (f.mtime_ns, f.name))
        return found

    def claim(self, name: str, default_id: str) -> Path | None:
        """Move an inbox file into ``work/claimed``; None if it vanished meanwhile.

        The claimed name sorts in claim order and carries the default id, so a
        recovered claim still knows the id its jobs default to.
        """
        suffix = os.path.splitext(name)[1]
        target = (
            self.claimed / f"{time.time_ns():020d}.{os.getpid()}.{next(_seq)}--{default_id}{suffix}"
        )
        failpoints.hit("claim.before_rename")
        try:
            os.rename(self.inbox / name, target)
        except FileNotFoundError:
            return None
        failpoints.hit("claim.after_rename")
        fsync_dir(self.claimed)
        return target

    def claimed_files(self) -> list[Path]:
        return sorted(p for p in self.claimed.iterdir() if not p.name.startswith("."))

    @staticmethod
    def claimed_default_id(path: Path) -> str:
        return path.name.split("--", 1)[1].rsplit(".", 1)[0]

    def read_claimed(self, path: Path, max_bytes: int) -> bytes:
        """Read a claimed file safely: no symlinks, no FIFOs, no hard links, bounded size."""
        return read_job_file(path, max_bytes)

    def reject_claimed(self, path: Path) -> Path | None:
        """Keep a rejected file's bytes under ``failed/inputs`` (never lose a job)."""
        target = self.failed_inputs / path.name
        try:
            os.rename(path, target)
        except FileNotFoundError:
            return None
        fsync_dir(self.failed_inputs)
        return target

    def reject_target(self, name: str) -> Path:
        """A fresh name under ``failed/inputs`` for an inbox entry that is not a job file."""
        return self.failed_inputs / f"{time.time_ns():020d}.{next(_seq)}--{_safe(name)}"

    def reject_inbox_entry(self, name: str, target: Path | None = None) -> Path | None:
        """Move a non-file (dir, FIFO, socket, symlink) out of the inbox without opening it."""
        target = target or self.reject_target(name)
        try:
            os.rename(self.inbox / name, target)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno in (errno.EXDEV, errno.EISDIR, errno.ENOTEMPTY):
                return None
            raise
        fsync_dir(self.failed_inputs)
        return target

    def done_with_claimed(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        fsync_dir(self.claimed)

    # -- checkpoints of ihld before the job store ---------------------------------------

    def legacy_checkpoints(self) -> list[Path]:
        """``work/jobs/<id>.json`` files an older ihld left (the store adopts them)."""
        if not self.jobs.is_dir():
            return []
        return sorted(
            p
            for p in self.jobs.iterdir()
            if p.name.endswith(".json") and not p.name.startswith(".")
        )

    # -- results ------------------------------------------------------------

    def publish(self, directory: Path, name: str, record: dict[str, Any]) -> Path | None:
        """Publish ``record`` as ``directory/name.json`` without ever overwriting.

        Returns the path, or None when that name already exists (the record
        was published before a crash, or the name is taken).
        """
        data = encode_record(record)
        tmp = write_temp(directory, name, data)
        target = directory / f"{name}.json"
        point = "failure" if directory == self.failed else "result"  # as the committer names them
        try:
            failpoints.hit(f"{point}.before_publish")
            os.link(tmp, target)
        except FileExistsError:
            return None
        finally:
            tmp.unlink(missing_ok=True)
        failpoints.hit(f"{point}.after_publish")
        fsync_dir(directory)
        return target

    def save_json(self, directory: Path, name: str, record: dict[str, Any]) -> None:
        """Durably write ``directory/name.json`` (replacing it): small internal records."""
        replace_durably(directory, f"{name}.json", encode_record(record))

    def publish_text(self, name: str, data: bytes) -> Path | None:
        """Publish ``outbox/name`` atomically, never overwriting; ``name~N`` if taken."""
        stem, dot, suffix = name.partition(".")
        tmp = write_temp(self.outbox, stem, data)
        try:
            target = link_free(tmp, self.outbox, stem, dot + suffix)
        finally:
            tmp.unlink(missing_ok=True)
        if target is not None:
            fsync_dir(self.outbox)
        return target

    def publish_failure(self, name: str, record: dict[str, Any], *, first: int = 1) -> Path:
        """Publish an error record; a taken name gets ``~2``, ``~3`` … (never clobbered).

        ``first=2``: the bare name belongs to another job (a duplicate id), start at ``~2``.
        """
        tmp = write_temp(self.failed, name, encode_record(record))
        try:
            failpoints.hit("failure.before_publish")
            target = link_free(tmp, self.failed, name, first=first)
        finally:
            tmp.unlink(missing_ok=True)
        if target is None:
            raise SpoolError(f"cannot find a free name for failure record {name}")
        failpoints.hit("failure.after_publish")
        fsync_dir(self.failed)
        return target

    def is_finished(self, job_id: str) -> bool:
        """True if this job's own result or failure record is published.

        A *rejection* record (``status: rejected``) under the same name is not
        the job's: it was written for a bad or duplicate submission, and
        treating it as the job's end would drop a running job's checkpoint.
        """
        if (self.outbox / f"{job_id}.json").exists():
            return True
        try:
            data = (self.failed / f"{job_id}.json").read_bytes()
        except FileNotFoundError:
            return False
        try:
            record = jsonsafe.loads(data.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            return True  # not ours to judge; never run a job twice
        return not (isinstance(record, dict) and record.get("status") == "rejected")

    def known_ids(self) -> set[str]:
        """Ids of jobs that ended, in outbox/ or failed/ (the job store knows queued ones)."""
        ids: set[str] = set()
        for directory in (self.outbox, self.failed):
            for name in os.listdir(directory):
                if name.endswith(".json") and not name.startswith("."):
                    ids.add(name[:-5])
        return ids

    def counts(self, *, store: bool = True) -> dict[str, int]:
        """Files per spool directory (``ihld status`` when the daemon is down).

        ``in_progress`` is what the job store holds (``store=False``: not counted,
        the running daemon knows it).
        """

        def count(directory: Path) -> int:
            try:
                return sum(1 for n in os.listdir(directory) if not n.startswith("."))
            except FileNotFoundError:
                return 0

        return {
            "inbox": count(self.inbox),
            "claimed": count(self.claimed),
            "in_progress": count_jobs(self.store_path) if store else 0,
            "outbox": count(self.outbox),
            "failed": max(0, count(self.failed) - (1 if self.failed_inputs.exists() else 0)),
        }

    def read_inflight(self) -> dict[str, int]:
        """Jobs with a stage started but not finished when the last daemon died."""
        return read_inflight(self.inflight_log)

    def iter_tmp_files(self) -> Iterator[Path]:
        """Temp files a crash left behind (never visible to readers; safe to delete)."""
        for directory in (self.outbox, self.failed, self.claimed):
            for path in directory.iterdir():
                if path.name.startswith(".") and path.name.endswith(".tmp"):
                    yield path


def _make_group_inbox(path: Path) -> None:
    """Group members may drop jobs: 2770 (setgid keeps the group on new files).

    Under systemd's ``RestrictSUIDSGID=yes`` setting the setgid bit is refused
    (EPERM); the unit creates the inbox with ``install -m 2770`` before start,
    so falling back to 0770 here only happens outside that unit.
    """
    try:
        path.chmod(0o2770)
    except PermissionError:
        path.chmod(0o770)


def _safe(name: str) -> str:
    out = "".join(c if c.isalnum() or c in "._-" else "_" for c in name)[:100]
    return out.lstrip(".-") or "entry"
