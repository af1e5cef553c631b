"""Named fail points in the file code, for deterministic crash tests.

``IHLD_FAILPOINTS=checkpoint.before_publish:sigkill`` kills the daemon at
that exact step, so a test can prove recovery at every step of claim,
checkpoint and publish. Actions: ``sigkill`` (the process dies as in a power
cut of the process), ``raise`` (an OSError, as a failing disk would),
``enospc`` (OSError ENOSPC), ``hang`` (the calling thread blocks for ever: at
``watcher.scan`` that is the event loop, which is how the systemd watchdog is
tested). ``name:sigkill@3`` fires on the third hit only.
Unset, a fail point costs one dict lookup.

The points, in the order a job meets them:

==========================  ==============================================================
``claim.before_rename``     an inbox file is about to be renamed into ``work/claimed``
``claim.after_rename``      ... renamed, the directory not yet fsynced
``store.intake_before_commit``  a chunk of a claimed file's jobs is written into the job
                            store's transaction, not yet committed (a kill mid-journal)
``intake.after_job_saved``  the claimed file's jobs are all committed to the job store
``intake.before_release``   ... and the claimed file is about to be deleted
``reject.before_move``      a symlink/dir/FIFO/socket's error record is written, the entry
                            not yet moved to ``failed/inputs``
``store.progress_mid_write``   half of a group of jobs' progress is written into the
                            store's transaction, not yet committed
``checkpoint.before_publish``  ... all of it written, the transaction not yet committed
``checkpoint.after_publish``   ... committed (on disk)
``checkpoint.before_remove``   ended jobs' removal from the store, not yet committed
``checkpoint.after_remove``    ... committed
``result.before_publish``   a result's data is on disk, not yet linked into ``outbox/``
``result.after_publish``    ... linked; the job is still in the store
``failure.before_publish``  the same for an error record in ``failed/`` (a failed job or a
``failure.after_publish``   rejected file or line)
``watcher.scan``            the event loop, after each inbox scan (for ``hang``)
==========================  ==============================================================
"""

from __future__ import annotations

import errno
import os
import signal
import time

ACTIONS = ("sigkill", "raise", "enospc", "hang")

_points: dict[str, tuple[str, int]] = {}
_hits: dict[str, int] = {}


def configure(spec: str | None = None) -> None:
    """Parse ``IHLD_FAILPOINTS`` (or ``spec``): ``name:action[@n],...``."""
    _points.clear()
    _hits.clear()
    text = os.environ.get("IHLD_FAILPOINTS", "") if spec is None else spec
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, action = item.partition(":")
        action, _, nth = action.partition("@")
        if action not in ACTIONS:
            raise ValueError(f"IHLD_FAILPOINTS: unknown action {action!r} for {name!r}")
        _points[name] = (action, int(nth or 1))


def hit(name: str) -> None:
    """Mark reaching ``name``; fire its action if configured."""
    if not _points or name not in _points:
        return
    action, nth = _points[name]
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] != nth:
        return
    if action == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    if action == "hang":
        while True:  # no way out: only a signal (the watchdog's SIGABRT) ends it
            time.sleep(3600)
    if action == "enospc":
        raise OSError(errno.ENOSPC, f"No space left on device (failpoint {name})")
    raise OSError(errno.EIO, f"Input/output error (failpoint {name})")


configure()
