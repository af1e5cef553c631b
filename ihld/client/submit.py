"""``ihld submit``: the safe way into the inbox, and the client side of the control socket.

A job file is copied to a dotted temp name inside the inbox (the watcher
ignores it), fsynced, then hard-linked to its final name, which fails
rather than overwrite a file of the same name. The daemon sees either
nothing or the whole file.

``ihld submit --wait`` then follows the submitted jobs to their end. The
ids are computed the way intake computes them (the ``id`` field, else the
file stem, or stem + ``.`` + line number for JSON Lines), and each job ends
as exactly one new record in ``outbox/`` or ``failed/`` — watching the
directories works whether or not the daemon's control socket is reachable.
A job whose id was already taken is rejected as a duplicate into
``failed/<id>~N.json``; the watcher expects that too.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from ihld.common.fsio import fsync_dir, link_new, write_temp
from ihld.core.entries import read_entries
from ihld.core.inbox import JOB_SUFFIXES
from ihld.core.jobs import default_id_for


class SubmitError(Exception):
    pass


def submit_file(source: Path, inbox: Path, name: str | None = None) -> Path:
    """Copy ``source`` into ``inbox`` atomically; return the final path."""
    name = name or source.name
    if not name.endswith(JOB_SUFFIXES) or name.startswith("."):
        raise SubmitError(f"{source}: job files must be named *.json or *.jsonl (not dotfiles)")
    if not source.is_file():
        raise SubmitError(f"{source}: not a regular file")
    if not inbox.is_dir():
        raise SubmitError(f"inbox {inbox} does not exist: is the spool right (--config)?")
    with open(source, "rb") as src:
        tmp = write_temp(inbox, name, iter(lambda: src.read(1 << 20), b""))
    target = inbox / name
    if not link_new(tmp, target):
        raise SubmitError(
            f"{target} already exists in the inbox (not yet claimed); rename your file"
        )
    fsync_dir(inbox)
    return target


async def control_request(
    socket_path: Path, method: str, path: str, timeout_s: float = 3.0
) -> dict[str, Any] | None:
    """Call the daemon's control socket; None when no daemon answers."""
    if not socket_path.exists():  # noqa: ASYNC240 - a stat, before any I/O
        return None
    connector = aiohttp.UnixConnector(path=str(socket_path))
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    try:
        async with (
            aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
            session.request(method, f"http://ihld{path}") as resp,
        ):
            body: dict[str, Any] = json.loads(await resp.text())
            return body
    except (aiohttp.ClientError, OSError, TimeoutError, ValueError):
        return None


# -- waiting for submitted jobs ----------------------------------------------------------


def expected_ids(data: bytes, name: str, max_bytes: int | None = None) -> list[str]:
    """The ids intake will give the jobs of a file called ``name`` with these bytes.

    A file intake rejects as a whole (too large, not UTF-8, not JSON for a
    ``.json``) yields one record under the file's default id.
    """
    stem, suffix = os.path.splitext(name)
    if max_bytes is not None and len(data) > max_bytes:
        return [default_id_for(stem)]
    return [entry.job_id for entry in read_entries(stem, suffix, data)]


def _records_of(failed: Path, outbox: Path, job_id: str, *, renamed: bool = True) -> set[str]:
    """Records that exist for ``job_id``: ``outbox/x``, ``failed/x``, and ``failed/x~2``…"""
    names: set[str] = set()
    if (outbox / f"{job_id}.json").exists():
        names.add(f"outbox/{job_id}")
    if (failed / f"{job_id}.json").exists():
        names.add(f"failed/{job_id}")
    if renamed:
        names.update(f"failed/{p.stem}" for p in failed.glob(f"{_glob_escape(job_id)}~*.json"))
    return names


def _glob_escape(text: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)


@dataclass
class JobWaiter:
    """Follows a set of jobs until each has its new record in ``outbox/`` or ``failed/``."""

    outbox: Path
    failed: Path
    ids: list[str]
    started: float = field(default_factory=time.monotonic)
    done: dict[str, int] = field(default_factory=dict)  # id -> new outbox records
    failures: dict[str, list[str]] = field(default_factory=dict)  # id -> new failed records
    finished_at: deque[float] = field(default_factory=deque)
    _expected: Counter[str] = field(default_factory=Counter)
    _before: dict[str, set[str]] = field(default_factory=dict)
    _pending: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self._expected = Counter(self.ids)
        self._pending = set(self._expected)
        for job_id in self._expected:
            # Only ids seen before (or submitted twice) can end as ~N: glob those.
            self._before[job_id] = _records_of(self.failed, self.outbox, job_id)

    def forget(self, ids: Iterable[str]) -> None:
        """Stop waiting for these (their file could not be submitted)."""
        for job_id in ids:
            self.ids.remove(job_id)
            self._expected[job_id] -= 1
            if self._expected[job_id] <= 0:
                del self._expected[job_id]
                self._pending.discard(job_id)

    @property
    def total(self) -> int:
        return len(self.ids)

    @property
    def n_done(self) -> int:
        return sum(self.done.values())

    @property
    def n_failed(self) -> int:
        return sum(len(v) for v in self.failures.values())

    @property
    def finished(self) -> bool:
        return not self._pending

    def poll(self) -> int:
        """Look for new records; return how many jobs finished since the last poll."""
        new = 0
        listing: tuple[set[str], set[str]] | None = None
        if len(self._pending) > 256:  # one directory listing beats thousands of stats
            listing = (_json_names(self.outbox), _json_names(self.failed))
        now = time.monotonic()
        for job_id in list(self._pending):
            before = self._before[job_id]
            if listing is not None and not self._maybe_new(job_id, listing, before):
                continue
            renamed = bool(before) or self._expected[job_id] > 1
            names = _records_of(self.failed, self.outbox, job_id, renamed=renamed) - before
            ok = sum(1 for n in names if n.startswith("outbox/"))
            bad = sorted(n for n in names if n.startswith("failed/"))
            seen = self.done.get(job_id, 0) + len(self.failures.get(job_id, []))
            if ok + len(bad) > seen:
                new += ok + len(bad) - seen
                self.finished_at.extend([now] * (ok + len(bad) - seen))
                if ok:
                    self.done[job_id] = ok
                if bad:
                    self.failures[job_id] = bad
            if ok + len(bad) >= self._expected[job_id]:
                self._pending.discard(job_id)
        return new

    def _maybe_new(self, job_id: str, listing: tuple[set[str], set[str]], before: set[str]) -> bool:
        outbox, failed = listing
        if job_id in outbox and f"outbox/{job_id}" not in before:
            return True
        if job_id in failed and f"failed/{job_id}" not in before:
            return True
        return bool(before) or self._expected[job_id] > 1

    def rate_per_min(self, window_s: float = 120.0) -> float:
        """Jobs finished per minute, over the last ``window_s`` (or since the start)."""
        now = time.monotonic()
        while self.finished_at and now - self.finished_at[0] > window_s:
            self.finished_at.popleft()
        span = min(window_s, max(now - self.started, 1e-9))
        return len(self.finished_at) / span * 60 if span >= 1 else 0.0

    def eta_s(self) -> float | None:
        rate = self.rate_per_min()
        remaining = self.total - self.n_done - self.n_failed
        if remaining <= 0:
            return 0.0
        return remaining / rate * 60 if rate > 0 else None

    def failure_details(self, limit: int = 10) -> Iterable[str]:
        """``id: kind: message`` for the first failed jobs (from their records)."""
        shown = 0
        for job_id, names in sorted(self.failures.items()):
            for name in names:
                if shown >= limit:
                    return
                shown += 1
                path = self.failed / f"{name.split('/', 1)[1]}.json"
                try:
                    error = json.loads(path.read_text(encoding="utf-8")).get("error") or {}
                except (OSError, ValueError):
                    error = {}
                message = str(error.get("message", "")).splitlines()[0:1]
                kind = error.get("kind", "?")
                yield f"{job_id}: {kind}: {message[0] if message else ''} ({path})"


def _json_names(directory: Path) -> set[str]:
    try:
        return {n[:-5] for n in os.listdir(directory) if n.endswith(".json")}
    except FileNotFoundError:
        return set()


def follow(waiter: JobWaiter, timeout: float | None) -> int:
    """Show progress on stderr until the jobs finish: 0 all done, 1 some failed, 124 timed out.

    A rich progress bar on a terminal; otherwise a line whenever the counts
    changed, at most every 2 s. The failed jobs are listed at the end.
    """
    from ihld.observe.status import format_duration as duration

    deadline = None if timeout is None else time.monotonic() + timeout
    interactive = sys.stderr.isatty()
    timed_out = False

    def line() -> str:
        text = (
            f"{waiter.n_done}/{waiter.total} done, {waiter.n_failed} failed, "
            f"{waiter.rate_per_min():.1f} jobs/min"
        )
        if waiter.finished:
            return text
        eta = waiter.eta_s()
        return f"{text}, ETA {duration(eta) if eta else '-'}"

    if interactive:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        console = Console(stderr=True)
        columns = (
            TextColumn("[bold]waiting"),
            BarColumn(bar_width=40),
            TextColumn("{task.fields[line]}"),
            TimeElapsedColumn(),
        )
        with Progress(*columns, console=console, transient=False) as progress:
            task = progress.add_task("jobs", total=max(waiter.total, 1), line=line())
            while True:
                waiter.poll()
                progress.update(task, completed=waiter.n_done + waiter.n_failed, line=line())
                if waiter.finished:
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    timed_out = True
                    break
                time.sleep(0.25)
    else:
        last_shown = ""
        last_at = 0.0
        while True:
            waiter.poll()
            text = line()
            if waiter.finished:
                break
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                timed_out = True
                break
            if text.split(",")[:2] != last_shown.split(",")[:2] and now - last_at >= 2.0:
                print(f"ihld submit: {text}", file=sys.stderr, flush=True)
                last_shown, last_at = text, now
            time.sleep(0.25)
    print(f"ihld submit: {line()}" + (" (timed out)" if timed_out else ""), file=sys.stderr)
    for detail in waiter.failure_details():
        print(f"  failed {detail}", file=sys.stderr)
    if timed_out:
        return 124
    return 1 if waiter.n_failed else 0
