"""The inbox watcher: which inbox entries are ready to be claimed.

Scans decide what exists; filesystem events only make the next scan come
sooner. That is deliberate: watchfiles can lose events (an inotify overflow,
an inbox deleted and re-created, a non-UTF-8 name that breaks ``awatch``),
and files already present produce no event at all. So the event watcher is
supervised and recreated, and a periodic scan runs regardless.

A file is *complete* when its size and mtime have not changed for
``settle_s``. A plain ``cp`` announces the file long before it is written,
and there is no close event, so nothing is claimed before it settles. Small
``.json`` files that already parse as a whole document are taken at once
(a truncated JSON object never parses), which is what makes ``ihld submit``
and ``mv`` drops fast.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import structlog
from watchfiles import awatch

from ihld.common import failpoints, jsonsafe
from ihld.core.inbox import InboxFile, is_candidate
from ihld.core.spool import Spool

log = structlog.get_logger("ihld.core.watcher")

FAST_PATH_BYTES = 64 * 1024


@dataclass
class _Seen:
    size: int
    mtime_ns: int
    since: float  # monotonic time this size/mtime was first seen


@dataclass(frozen=True)
class Ready:
    """Entries to act on: complete job files, and entries to reject unopened."""

    files: list[InboxFile]
    rejects: list[InboxFile]


def _parses_whole(spool: Spool, entry: InboxFile) -> bool:
    """True if a small .json file already holds one complete JSON document."""
    if entry.suffix != ".json" or entry.size == 0 or entry.size > FAST_PATH_BYTES:
        return False
    try:
        fd = os.open(spool.inbox / entry.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        data = os.read(fd, FAST_PATH_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) != entry.size:
        return False
    try:
        jsonsafe.loads(jsonsafe.decode_text(data))
    except (jsonsafe.StrictJSONError, ValueError):
        return False
    return True


class InboxWatcher:
    """Yields batches of inbox entries that are ready to be claimed or rejected."""

    def __init__(self, spool: Spool, *, settle_s: float, rescan_s: float) -> None:
        self.spool = spool
        self.settle_s = settle_s
        self.rescan_s = rescan_s
        self._seen: dict[str, _Seen] = {}
        self._ignored: set[str] = set()
        self._wake = asyncio.Event()
        self.events_seen = 0
        self.scans = 0
        self.scanned = asyncio.Event()  # set after every scan (``--once`` waits on it)

    def poke(self) -> None:
        """Scan soon (called by the event watcher and by ``ihld submit`` via the control socket)."""
        self._wake.set()

    def settling(self) -> bool:
        """Files seen in the inbox that are not claimed yet (jobs on their way in)."""
        return bool(self._seen)

    def classify(self, entries: list[InboxFile], now: float) -> Ready:
        """Split a scan into ready files, rejects, and files still settling (kept in ``_seen``)."""
        files: list[InboxFile] = []
        rejects: list[InboxFile] = []
        present = set()
        wall_now_ns = time.time_ns()
        for entry in entries:
            present.add(entry.name)
            if entry.kind != "file":
                if entry.suffix in (".json", ".jsonl") or entry.kind == "symlink":
                    rejects.append(entry)
                continue
            if not is_candidate(entry.name):
                if entry.name not in self._ignored:
                    self._ignored.add(entry.name)
                    log.info("inbox_file_ignored", file=entry.name, reason="not *.json or *.jsonl")
                continue
            seen = self._seen.get(entry.name)
            if seen is None or (seen.size, seen.mtime_ns) != (entry.size, entry.mtime_ns):
                old = (wall_now_ns - entry.mtime_ns) / 1e9 >= self.settle_s
                self._seen[entry.name] = _Seen(entry.size, entry.mtime_ns, now)
                if (old and seen is None) or _parses_whole(self.spool, entry):
                    files.append(entry)
                continue
            if now - seen.since >= self.settle_s:
                files.append(entry)
        for name in list(self._seen):
            if name not in present:
                del self._seen[name]
        self._ignored &= present
        for entry in files:
            self._seen.pop(entry.name, None)
        return Ready(files, rejects)

    def _scan(self) -> Ready:
        return self.classify(self.spool.scan_inbox(), time.monotonic())

    def _next_settle(self, now: float) -> float:
        if not self._seen:
            return self.rescan_s
        soonest = min(s.since for s in self._seen.values()) + self.settle_s
        return max(0.005, min(self.rescan_s, soonest - now))

    async def batches(self, stop: asyncio.Event) -> AsyncIterator[Ready]:
        """Scan at start, on events and every ``rescan_s``; yield what is ready."""
        events = asyncio.create_task(self._watch_events(stop), name="inbox-events")
        try:
            while not stop.is_set():
                self._wake.clear()
                ready = await asyncio.to_thread(self._scan)  # blocking reads off the loop
                self.scans += 1
                self.scanned.set()
                failpoints.hit("watcher.scan")  # on the event loop: `hang` here hangs the daemon
                if ready.files or ready.rejects:
                    yield ready
                timeout = self._next_settle(time.monotonic())
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await self._wake.wait()
        finally:
            events.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await events

    async def _watch_events(self, stop: asyncio.Event) -> None:
        """Run ``awatch`` on the inbox, recreating it whenever it fails or the inbox is replaced."""
        while not stop.is_set():
            try:
                inode = os.stat(self.spool.inbox).st_ino
            except FileNotFoundError:
                await asyncio.sleep(self.rescan_s)
                continue
            watch_stop = asyncio.Event()
            replaced = asyncio.create_task(self._watch_inode(inode, stop, watch_stop))
            try:
                async for _changes in awatch(
                    self.spool.inbox,
                    stop_event=watch_stop,
                    debounce=20,
                    step=10,
                    recursive=False,
                    ignore_permission_denied=True,
                ):
                    self.events_seen += 1
                    self._wake.set()
            except Exception as exc:  # watchfiles raises on odd names; never let it stop intake
                log.warning("watcher_failed", error=repr(exc), action="recreating")
                await asyncio.sleep(0.5)
            finally:
                replaced.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await replaced
            self._wake.set()

    async def _watch_inode(
        self, inode: int, stop: asyncio.Event, watch_stop: asyncio.Event
    ) -> None:
        """Stop the current ``awatch`` when the daemon stops or the inbox directory is replaced."""
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.rescan_s):
                    await stop.wait()
            try:
                if os.stat(self.spool.inbox).st_ino != inode:
                    log.warning("inbox_replaced", action="rewatching")
                    break
            except FileNotFoundError:
                log.warning("inbox_missing", action="recreating")
                break
        watch_stop.set()
