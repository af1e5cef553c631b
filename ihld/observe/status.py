"""Status: the daemon's live figures as one JSON-able snapshot, and its one-line summary.

The snapshot is what ``GET /status`` returns, what ``ihld status`` prints
(:func:`status_view`, a rich renderable; :func:`render_text` for plain text)
and what the systemd ``STATUS=`` line summarises (:func:`summary_line`). It is derived from the
engine's state on demand; nothing here is stored — except Ollama's own view
of what is resident (``/api/ps``), which :class:`PsCache` polls in the
background so that ``/status`` never waits on a backend.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
from collections.abc import Callable, Container, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ihld.backends.base import Backend, BackendError
from ihld.core.engine import Engine
from ihld.core.scheduler import ModelState


def jobs_per_min(engine: Engine, window_s: float, now: float | None = None) -> float:
    now = time.monotonic() if now is None else now
    finished = engine.counters.finished_at
    if not finished:
        return 0.0
    span = min(window_s, max(now - engine.started, 1e-9))
    recent = 0
    for t in reversed(finished):
        if now - t > window_s:
            break
        recent += 1
    return recent / span * 60.0


def eta_s(engine: Engine) -> float | None:
    """Remaining work at the learned per-model stage time and slot count, plus one load each."""
    remaining: dict[str, int] = defaultdict(int)
    for progress in engine.jobs.values():
        for stage in progress.job.stages:
            if stage.name not in progress.outputs:
                remaining[stage.model_key()] += 1
    if not remaining:
        return 0.0 if not engine.jobs else None
    slots = max(b.slots for b in engine.config.backends)
    backends = max(1, len(engine.config.backends) - len(engine.down))
    total = 0.0
    resident = {key for b in engine.scheduler.backends.values() for key in b.resident}
    for key, count in remaining.items():
        figures = engine.figures.get(key)
        if figures is None or figures.service_s_ewma is None:
            return None  # not learned yet
        total += count * figures.service_s_ewma / slots
        if key not in resident:
            total += figures.load_s_ewma or 0.0
    return total / backends


def snapshot(engine: Engine, spool_counts: dict[str, int] | None = None) -> dict[str, Any]:
    now = time.monotonic()
    models: dict[str, dict[str, Any]] = defaultdict(lambda: {"ready": 0, "in_flight": 0, "done": 0})
    for key, depth in engine.scheduler.queue_depths().items():
        models[key]["ready"] = depth
    for task in engine.scheduler.inflight.values():
        models[task.model_key]["in_flight"] += 1
    for key, figures in engine.figures.items():
        models[key]["done"] = figures.stages
        models[key]["loads"] = figures.loads
        models[key]["load_s_total"] = round(figures.load_s_total, 3)
        if figures.service_s_ewma is not None:
            models[key]["stage_s"] = round(figures.service_s_ewma, 3)
        if figures.tokens_per_s_ewma is not None:
            models[key]["tokens_per_s"] = round(figures.tokens_per_s_ewma, 1)
    backends = {}
    for name, state in engine.scheduler.backends.items():
        backends[name] = {
            "up": name not in engine.down,
            "down_reason": engine.down.get(name),
            "slots": state.slots,
            "in_flight": state.inflight,
            "resident": {r.model: r.state.value for r in state.resident.values()},
            # Where the server runs fewer requests at once than the slots (learned or told).
            "parallel": {
                r.model: r.parallel for r in state.resident.values() if r.parallel is not None
            },
        }
    eta = eta_s(engine)
    counters = engine.counters
    return {
        "time": round(time.time(), 3),
        "pid_uptime_s": round(now - engine.started, 3),
        "policy": engine.scheduler.policy.name,
        "jobs": {
            "in_progress": len(engine.jobs),
            "done": counters.jobs_done,
            "failed": counters.jobs_failed,
            "rejected": counters.jobs_rejected,
        },
        "stages": {
            "done": counters.stages_done,
            "retries": counters.stage_retries,
            "ready": engine.scheduler.ready_count(),
            "in_flight": len(engine.scheduler.inflight),
        },
        "jobs_per_min": {
            "1m": round(jobs_per_min(engine, 60, now), 2),
            "15m": round(jobs_per_min(engine, 900, now), 2),
        },
        "eta_s": None if eta is None else round(eta, 1),
        "loads": engine.scheduler.stats.loads,
        "load_s_total": round(sum(f.load_s_total for f in engine.figures.values()), 3),
        "models": dict(models),
        "backends": backends,
        "spool": spool_counts or {},
    }


def format_duration(seconds: float) -> str:
    """``45s``, ``35m``, ``2.5h``: the STATUS= line's durations."""
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _rate(per_min: float) -> str:
    return f"{per_min:.0f}" if per_min >= 10 or per_min == 0 else f"{per_min:.1f}"


def summary_line(snap: dict[str, Any]) -> str:
    """The short human summary for systemd's STATUS= (one line).

    ``312/1764 done, 41 jobs/min, ETA 35m, qwen2.5:7b resident``
    """
    jobs = snap["jobs"]
    total = jobs["done"] + jobs["failed"] + jobs["in_progress"]
    parts = [f"{jobs['done']}/{total} done"]
    if jobs["failed"]:
        parts.append(f"{jobs['failed']} failed")
    parts.append(f"{_rate(snap['jobs_per_min']['1m'])} jobs/min")
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


# -- the human view (``ihld status``, ``--watch``) ------------------------------------


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
    total = jobs["done"] + jobs["failed"] + jobs["in_progress"]
    finished = jobs["done"] + jobs["failed"]
    header = Text.assemble(("ihld ", "bold cyan"), (summary_line(snap), "bold"))
    rates = snap["jobs_per_min"]
    eta = snap.get("eta_s")
    facts = Text(
        f"policy {snap['policy']} · up {format_duration(snap.get('pid_uptime_s', 0.0))} · "
        f"jobs/min {_rate(rates['1m'])} (1m) {_rate(rates['15m'])} (15m) · "
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
        f" · {jobs['in_progress']} in progress · {jobs['rejected']} rejected",
    )
    models = Table(box=None, pad_edge=False, header_style="bold", padding=(0, 1))
    for column in ("model", "ready", "in flight", "done", "stage s", "tok/s", "loads", "loading"):
        models.add_column(column, justify="left" if column == "model" else "right")
    for name, row in sorted(snap["models"].items()):
        models.add_row(
            name,
            str(row["ready"]),
            str(row["in_flight"]),
            str(row["done"]),
            f"{row['stage_s']:.2f}" if "stage_s" in row else "-",
            f"{row['tokens_per_s']:.0f}" if "tokens_per_s" in row else "-",
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


# -- Ollama's view: /api/ps, polled in the background --------------------------------


@dataclass
class PsEntry:
    at: float  # monotonic time of the last attempt
    models: list[dict[str, Any]] | None  # the last good answer (kept across errors)
    ok_at: float | None  # monotonic time of the last good answer
    error: str | None = None


_PS_KEYS = ("name", "size", "size_vram", "expires_at")


class PsCache:
    """What each backend says is resident (``/api/ps``), polled in the background.

    ``/status`` shows the scheduler's idea of what is resident *and* the
    server's: they differ when something else uses the server, when Ollama
    evicted a model on its own, or while a keep_alive runs out. Polling runs
    in its own task with a short timeout and skips backends marked down, so a
    slow or dead server never delays ``/status``; each answer carries its age.

    It polls every ``interval_s`` while the daemon has work (``active()``) or
    someone asked for the status in the last ``linger_s``, and not at all
    otherwise: Ollama logs every request, and an idle daemon should not fill
    its journal. A status request after a quiet spell shows the last answer
    (with its age) and wakes the poller.
    """

    def __init__(
        self,
        backends: Mapping[str, Backend],
        down: Callable[[], Container[str]] = frozenset,
        active: Callable[[], bool] = lambda: True,
        *,
        interval_s: float = 3.0,
        timeout_s: float = 2.0,
        linger_s: float = 60.0,
    ) -> None:
        self.backends = backends
        self.down = down
        self.active = active
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.linger_s = linger_s
        self.entries: dict[str, PsEntry] = {}
        self._wanted_at = time.monotonic()  # a first answer at start-up
        self._last_poll = float("-inf")
        self._wake = asyncio.Event()

    async def run(self) -> None:
        """Poll until cancelled."""
        while True:
            if self.active() or time.monotonic() - self._wanted_at < self.linger_s:
                self._last_poll = time.monotonic()
                await self.refresh()
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval_s):
                    await self._wake.wait()

    async def refresh(self) -> None:
        down = self.down()
        await asyncio.gather(
            *(self._refresh_one(name, b, name in down) for name, b in self.backends.items())
        )

    async def _refresh_one(self, name: str, backend: Backend, is_down: bool) -> None:
        old = self.entries.get(name)
        models, ok_at = (old.models, old.ok_at) if old else (None, None)
        if is_down:
            self.entries[name] = PsEntry(time.monotonic(), models, ok_at, "backend down")
            return
        try:
            async with asyncio.timeout(self.timeout_s):
                answer = await backend.ps()
        except (BackendError, TimeoutError) as exc:
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            self.entries[name] = PsEntry(time.monotonic(), models, ok_at, error)
            return
        if answer is None:  # the server does not say what it holds
            self.entries[name] = PsEntry(time.monotonic(), None, None, "not reported")
            return
        trimmed = [{k: m[k] for k in _PS_KEYS if k in m} for m in answer if isinstance(m, dict)]
        now = time.monotonic()
        self.entries[name] = PsEntry(now, trimmed, now)

    def _disagrees(self, snap: dict[str, Any]) -> bool:
        """True when the last answer differs from what the scheduler holds loaded."""
        for name, backend in snap.get("backends", {}).items():
            entry = self.entries.get(name)
            if entry is None or entry.models is None:
                continue
            held = {m for m, state in backend.get("resident", {}).items() if state == "loaded"}
            seen = {str(m.get("name")) for m in entry.models}
            if held and not held <= seen:
                return True
        return False

    def annotate(self, snap: dict[str, Any]) -> dict[str, Any]:
        """Add ``ollama_ps`` to each backend of a snapshot (None until a first answer)."""
        now = time.monotonic()
        self._wanted_at = now
        since = now - self._last_poll
        if since > self.interval_s or (since > 1.0 and self._disagrees(snap)):
            self._wake.set()  # after a quiet spell, or a model switch: ask again now
        for name, backend in snap.get("backends", {}).items():
            entry = self.entries.get(name)
            if entry is None:
                backend["ollama_ps"] = None
                continue
            backend["ollama_ps"] = {
                "models": entry.models,
                "age_s": None if entry.ok_at is None else round(now - entry.ok_at, 1),
                "error": entry.error,
            }
        return snap
