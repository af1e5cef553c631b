"""Named fail points in the file code, for deterministic crash tests.

``IHLD_FAILPOINTS=checkpoint.before_publish:sigkill`` kills the daemon at
that exact step, so a test can prove recovery at every step of claim,
checkpoint and publish. Actions: ``sigkill`` (the process dies as in a power
cut of the process), ``raise`` (an OSError, as a failing disk would),
``enospc`` (OSError ENOSPC). ``name:sigkill@3`` fires on the third hit only.
Unset, a fail point costs one dict lookup.
"""

from __future__ import annotations

import errno
import os
import signal

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
        if action not in ("sigkill", "raise", "enospc"):
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
    if action == "enospc":
        raise OSError(errno.ENOSPC, f"No space left on device (failpoint {name})")
    raise OSError(errno.EIO, f"Input/output error (failpoint {name})")


configure()
