"""Status: the daemon's live figures as one JSON document, and its one-line summary.

The status document is the engine's typed snapshot
(``ihld.core.snapshot``) as JSON, with the spool's counts: what ``GET /status``
returns, what ``ihld status`` shows (``ihld.observe.status_view``) and what the
systemd ``STATUS=`` line summarises (:func:`summary_line`). Nothing here is
stored; the servers' own view of what is resident is polled by
``ihld.observe.ps_cache``.
"""

from __future__ import annotations

from typing import Any

from ihld.core.snapshot import EngineSnapshot
from ihld.core.tasks import ModelState


def status_document(
    snap: EngineSnapshot, spool_counts: dict[str, int] | None = None, **extra: Any
) -> dict[str, Any]:
    """What ``GET /status`` returns: the engine's snapshot, the spool's counts, and ``extra``."""
    return {**snap.as_dict(), "spool": spool_counts or {}, **extra}


def format_duration(seconds: float) -> str:
    """``45s``, ``35m``, ``2.5h``: the STATUS= line's durations."""
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def rate_text(per_min: float) -> str:
    return f"{per_min:.0f}" if per_min >= 10 or per_min == 0 else f"{per_min:.1f}"


def summary_line(snap: dict[str, Any]) -> str:
    """The short human summary for systemd's STATUS= (one line).

    ``312/1764 done, 41 jobs/min, ETA 35m, qwen2.5:7b resident``
    """
    jobs = snap["jobs"]
    total = jobs["done"] + jobs["failed"] + jobs["in_progress"] + jobs.get("waiting", 0)
    parts = [f"{jobs['done']}/{total} done"]
    if jobs["failed"]:
        parts.append(f"{jobs['failed']} failed")
    parts.append(f"{rate_text(snap['jobs_per_min']['1m'])} jobs/min")
    if snap["eta_s"] and jobs["in_progress"]:
        parts.append(f"ETA {format_duration(snap['eta_s'])}")
    resident: set[str] = set()
    loading: set[str] = set()
    for backend in snap["backends"].values():
        limited = backend.get("parallel", {})
        for model, state in backend["resident"].items():
            if state == ModelState.LOADED.value and model in limited:
                resident.add(f"{model} (parallel {limited[model]} of {backend['slots']})")
            elif state == ModelState.LOADED.value:
                resident.add(model)
            elif state == ModelState.LOADING.value:
                loading.add(model)
    if resident:
        parts.append(", ".join(sorted(resident)) + " resident")
    if loading:
        parts.append("loading " + ", ".join(sorted(loading)))
    down = [name for name, b in snap["backends"].items() if not b["up"]]
    if down:
        parts.append("backend down: " + ", ".join(down))
    return ", ".join(parts)
