"""``ihld report``: the structured event log of a run → one self-contained HTML page.

The page shows a timeline (per backend: the resident and loading models, one
lane per slot with each stage coloured by model, and a utilization row that
turns red when the GPU sat idle while work was ready), the queue depth per
model over time, and a summary (jobs/min, loads, time serving vs loading vs
idle, tokens/s per model). See ``docs/observability.md``.

Split in three: this module reads the log and the window, ``report_model``
reconstructs the run from events, ``report_html`` draws it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from ihld.observe.logs import read_events
from ihld.observe.report_html import fmt_pct, fmt_s, render_html
from ihld.observe.report_model import Run, build_run

__all__ = ["build_run", "parse_when", "render_html", "summary", "write_report"]

_RELATIVE = re.compile(r"^-?(\d+(?:\.\d+)?)\s*(s|m|h|d)$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_when(value: str, now: float | None = None) -> float:
    """A time for ``--since``/``--until``: ISO 8601, epoch seconds, or ``30m``/``2h`` ago.

    ISO times without a zone are UTC, like the log's timestamps.
    """
    text = value.strip()
    now = time.time() if now is None else now
    match = _RELATIVE.match(text)
    if match:
        return now - float(match.group(1)) * _UNITS[match.group(2)]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"not a time: {value!r} (use ISO 8601 like 2026-05-09T07:35:00Z, "
            "epoch seconds, or an age like 30m, 2h, 1d)"
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def load_run(log: Path, since: float | None = None, until: float | None = None) -> Run:
    """Read the log (all of it: a model loaded before the window is still resident in it)."""
    return build_run(read_events(log), since=since, until=until)


def write_report(
    log: Path, output: Path, *, since: float | None = None, until: float | None = None
) -> Run:
    """Render the report of ``log`` into ``output`` (atomically); return the run."""
    run = load_run(log, since, until)
    page = render_html(run, source=str(log))
    tmp = output.with_name(f".{output.name}.tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(output)
    return run


def summary(run: Run) -> Iterator[str]:
    """A few lines for the terminal after writing the page."""
    totals = run.backend_totals()
    models = run.model_totals()
    rate = f"{run.jobs_per_min:.1f} jobs/min" if run.jobs_per_min else "no jobs finished"
    yield (
        f"{run.jobs_done} done, {run.jobs_failed} failed, {run.jobs_rejected} rejected; {rate}; "
        f"{sum(m.loads for m in models.values())} model loads "
        f"({fmt_s(sum(t.loading_s for t in totals.values()))} loading) over {fmt_s(run.span_s)}"
    )
    for name, t in totals.items():
        yield (
            f"  {name}: serving {fmt_pct(t.serving_s, run.span_s)}, "
            f"loading {fmt_pct(t.loading_s, run.span_s)}, "
            f"idle with work ready {fmt_pct(t.idle_waiting_s, run.span_s)}, "
            f"idle {fmt_pct(t.idle_s, run.span_s)}"
        )
