"""Intake as a long-lived task: the claims a crash left, then the watcher's files.

Blocking file work runs in a worker thread. A full or failing disk pauses
claiming (``paused``) and retries with backoff until the claims go through;
a bug in intake is logged and the claim stays for the next start.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import structlog

from ihld.common.backoff import Backoff
from ihld.core.intake import Intake, IntakeResult
from ihld.core.spool import Spool
from ihld.core.watcher import InboxWatcher

log = structlog.get_logger("ihld")


class Claims:
    def __init__(
        self,
        spool: Spool,
        intake: Intake,
        *,
        admit: Callable[[IntakeResult | None], None],
        rejected: Callable[[dict[str, Any]], None],
    ) -> None:
        self.spool = spool
        self.intake = intake
        self.admit = admit  # a file's outcome: its batch manifest, counts, rejections
        self.rejected = rejected  # an inbox entry moved aside unopened
        self.idle = asyncio.Event()  # no file being read now (``--once``)
        self.idle.set()
        self._paused_until = 0.0

    def paused(self) -> bool:
        return self._paused_until > time.monotonic()

    async def run(self, watcher: InboxWatcher) -> None:
        stop_claiming = asyncio.Event()
        try:
            await self.replay()
            async for ready in watcher.batches(stop_claiming):
                for entry in ready.rejects:
                    record = await asyncio.to_thread(self.intake.reject_entry, entry)
                    if record is not None:
                        self.rejected(record)
                for entry in ready.files:
                    self.idle.clear()
                    try:
                        result = await asyncio.to_thread(self.intake.claim_and_read, entry)
                    except OSError as exc:
                        await self._error(exc)
                        continue
                    except Exception as exc:  # a bug must not stop intake; the claim stays
                        log.error("intake_failed", file=entry.name, error=repr(exc))
                        continue
                    finally:
                        self.idle.set()
                    self.admit(result)
        finally:
            stop_claiming.set()

    async def replay(self) -> None:
        """Files claimed before a crash (or cut short by one), resumed where they stopped."""
        self.idle.clear()
        try:
            for path in self.spool.claimed_files():
                try:
                    self.admit(await asyncio.to_thread(self.intake.process, path))
                except OSError as exc:
                    await self._error(exc)
                    return  # it replayed every claim
        finally:
            self.idle.set()

    async def _error(self, exc: OSError) -> None:
        """A full or failing disk: pause claiming, keep what was claimed, retry until it works.

        (issue 4: it used to retry once and return, leaving the claim stuck until a restart.)
        """
        backoff = Backoff(2.0, 30.0)
        while True:
            pause = backoff.next()
            self._paused_until = time.monotonic() + pause + 1.0
            log.error("intake_paused", error=str(exc), errno=exc.errno, retry_in_s=round(pause, 3))
            await asyncio.sleep(pause)
            try:
                for path in self.spool.claimed_files():
                    self.admit(await asyncio.to_thread(self.intake.process, path))
            except OSError as again:
                exc = again
                continue
            self._paused_until = 0.0
            log.info("intake_resumed")
            return
