"""``ihld status`` for people: the status document as rich tables and bars.

:func:`status_view` renders ``GET /status`` (``--watch`` refreshes it in place),
:func:`fallback_view` the spool's counts when the daemon does not answer, and
:func:`render_text` any of them as plain text for pipes, logs and tests.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

from ihld.observe.status import format_duration, rate_text, summary_line


def _size(nbytes: Any) -> str:
    if not isinstance(nbytes, int | float) or nbytes <= 0:
        return "-"
    return f"{nbytes / 1024**3:.1f} GiB"


def _expires(value: Any, now: float) -> str:
    if not isinstance(value, str):
        return ""
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return ""
    left = when - now
    if left > 10 * 365 * 86400:
        return "held for ever"
    return f"expires in {format_duration(max(left, 0.0))}" if left > 0 else "expiring"


def _bar(done: int, total: int, width: int) -> Any:
    """A progress bar as text, so it reads the same in a terminal, a pipe and an SVG."""
    from rich.text import Text

    filled = round(width * done / total) if total else 0
    return Text.assemble(("━" * filled, "green"), ("─" * (width - filled), "grey42"))


def status_view(snap: dict[str, Any]) -> Any:
    """A compact rich renderable of a ``/status`` snapshot (one screen)."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    jobs = snap["jobs"]
    waiting = jobs.get("waiting", 0)  # in the job store, not yet in memory
    total = jobs["done"] + jobs["failed"] + jobs["in_progress"] + waiting
    finished = jobs["done"] + jobs["failed"]
    header = Text.assemble(("ihld ", "bold cyan"), (summary_line(snap), "bold"))
    rates = snap["jobs_per_min"]
    eta = snap.get("eta_s")
    facts = Text(
        f"policy {snap['policy']} · up {format_duration(snap.get('pid_uptime_s', 0.0))} · "
        f"jobs/min {rate_text(rates['1m'])} (1m) {rate_text(rates['15m'])} (15m) · "
        f"ETA {format_duration(eta) if eta else '-' if eta is None else 'done'} · "
        f"loads {snap['loads']} ({snap.get('load_s_total', 0.0):.1f} s loading) · "
        f"retries {snap['stages']['retries']}",
        style="dim",
    )
    bar = Text.assemble(
        _bar(finished, total, 32),
        f" {100 * finished / total if total else 0:3.0f} %  ",
        (f"{jobs['done']} done", "green"),
        " · ",
        (f"{jobs['failed']} failed", "bold red" if jobs["failed"] else "dim"),
        f" · {jobs['in_progress']} in progress · {waiting:,} waiting · {jobs['rejected']} rejected",
    )
    models = Table(box=None, pad_edge=False, header_style="bold", padding=(0, 1))
    columns = ("model", "ready", "in flight", "done", "stage s", "tok/s", "prompt eval", "loads",
               "loading")  # fmt: skip
    for column in columns:
        models.add_column(column, justify="left" if column == "model" else "right")
    for name, row in sorted(snap["models"].items()):
        models.add_row(
            name,
            str(row["ready"]),
            str(row["in_flight"]),
            str(row["done"]),
            f"{row['stage_s']:.2f}" if "stage_s" in row else "-",
            f"{row['tokens_per_s']:.0f}" if "tokens_per_s" in row else "-",
            f"{row['prompt_evaluated']:,}" if row.get("prompt_evaluated") else "-",
            str(row.get("loads", 0)),
            f"{row.get('load_s_total', 0.0):.1f} s",
        )
    backends = Table(box=None, pad_edge=False, header_style="bold", padding=(0, 1))
    for column in ("backend", "state", "in flight", "resident (ihld)", "Ollama /api/ps"):
        backends.add_column(column)
    now = float(snap.get("time") or time.time())
    for name, b in snap["backends"].items():
        state = Text("up", "green") if b["up"] else Text(f"DOWN: {b['down_reason']}", "bold red")
        slots = b.get("slots")
        resident = ", ".join(f"{m} ({st})" for m, st in b["resident"].items()) or "none"
        backends.add_row(
            name, state, f"{b['in_flight']}/{slots}" if slots else str(b["in_flight"]),
            resident, _ps_text(b.get("ollama_ps"), now),
        )  # fmt: skip
    parts: list[Any] = [header, facts, bar, Text(""), models, Text(""), backends]
    by_model = snap.get("waiting_by_model") or {}
    if by_model:
        shown = ", ".join(f"{m} {n:,}" for m, n in sorted(by_model.items()))
        parts.append(Text(f"waiting in the store, by first model: {shown}", "dim"))
    spool = snap.get("spool") or {}
    if spool:
        parts.append(Text("spool: " + ", ".join(f"{k} {v}" for k, v in spool.items()), "dim"))
    if snap.get("intake_paused"):
        parts.append(Text("intake paused: the spool's disk failed (see the log)", "bold red"))
    return Group(*parts)


def _ps_text(ps: dict[str, Any] | None, now: float) -> Any:
    from rich.text import Text

    if ps is None:
        return Text("not polled yet", "dim")
    models = ps.get("models")
    if models is None:
        return Text(ps.get("error") or "no answer", "yellow")
    shown = []
    for m in models:
        words = [m.get("name", "?"), _size(m.get("size_vram")) + " VRAM"]
        words.append(_expires(m.get("expires_at"), now))
        shown.append(" ".join(w for w in words if w))
    text = Text("; ".join(shown) or "nothing loaded")
    age = ps.get("age_s")
    if age is not None and age >= 1:
        text.append(f" ({format_duration(age)} ago)", "dim")
    if ps.get("error"):
        text.append(f" [{ps['error']}]", "yellow")
    return text


def fallback_view(socket: str, counts: dict[str, int]) -> Any:
    """What ``ihld status`` shows when no daemon answers: the spool directories' counts."""
    from rich.console import Group
    from rich.padding import Padding
    from rich.table import Table
    from rich.text import Text

    table = Table(box=None, pad_edge=False, show_header=False, padding=(0, 1))
    table.add_column(justify="left")
    table.add_column(justify="right")
    for key, value in counts.items():
        table.add_row(key, str(value))
    return Group(
        Text.assemble(
            ("ihld daemon is not running", "bold yellow"),
            f" (no answer on {socket}); counts from the spool directories:",
        ),
        Padding(table, (0, 0, 0, 2)),
    )


def render_text(renderable: Any, width: int = 110) -> str:
    """A rich renderable as plain text (no colours), for pipes, logs and tests."""
    import io

    from rich.console import Console

    buffer = io.StringIO()
    console = Console(file=buffer, width=width, color_system=None, force_terminal=False)
    console.print(renderable)
    return "\n".join(line.rstrip() for line in buffer.getvalue().splitlines())


def render_status(snap: dict[str, Any]) -> str:
    """The human view of a ``/status`` document as plain text."""
    return render_text(status_view(snap))
