"""Draw a reconstructed run (``ihld.observe.report_model.Run``) as one self-contained HTML page.

No network and no scripts: inline CSS and inline SVG only, so the file can
be mailed, archived or opened from a hardened host. Hover titles (SVG
``<title>``) give the details of a stage, a band or a column.

The drawing is bounded whatever the run's size: per lane, stages narrower
than a pixel are merged with their neighbours of the same model, and the
utilization row and queue chart are binned per pixel column.
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable
from datetime import UTC, datetime

from ihld import __version__
from ihld.observe.report_model import BackendTotals, ModelTotals, Run, StageRun

# Model colours (Tableau 10 without its red and green, kept for states).
PALETTE = (
    "#4e79a7",
    "#f28e2b",
    "#76b7b2",
    "#b07aa1",
    "#edc948",
    "#9c755f",
    "#ff9da7",
    "#1f77b4",
    "#bab0ac",
    "#8c564b",
)
STATE_COLOURS = {
    "serving": "#2e9e5b",
    "loading": "#f0a202",
    "waiting": "#d62728",
    "down": "#7f1d1d",
    "idle": "#e3e6ea",
}
STATE_LABELS = {
    "serving": "serving (darker = more slots busy)",
    "loading": "loading a model",
    "waiting": "idle while work was ready",
    "down": "backend down",
    "idle": "idle, nothing to do",
}

DASH = "\u2013"  # en dash: no value
WIDTH = 1320  # SVG user units (CSS px at 100 %)
LEFT = 132  # label column
RIGHT = 44  # room for the queue chart's right-hand scale
PLOT = WIDTH - LEFT - RIGHT
LANE_H = 15
LANE_GAP = 3
MODELS_H = 22
UTIL_H = 18


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def fmt_s(seconds: float | None) -> str:
    """A duration for humans: ``0.42 s``, ``12.3 s``, ``4m 05s``, ``2h 10m``."""
    if seconds is None or math.isnan(seconds):
        return DASH
    if seconds < 10:
        return f"{seconds:.2f} s"
    if seconds < 90:
        return f"{seconds:.1f} s"
    if seconds < 5400:
        return f"{int(seconds // 60)}m {int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h {int(seconds % 3600 // 60):02d}m"


def fmt_pct(part: float, whole: float) -> str:
    return f"{100 * part / whole:.0f} %" if whole > 0 else DASH


def fmt_num(value: float | None, digits: int = 1) -> str:
    if value is None:
        return DASH
    return f"{value:,.{digits}f}"


def clock(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _tick_step(span: float, target: int = 10) -> float:
    for step in (
        0.05, 0.1, 0.2, 0.25, 0.5, 1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800,
        3600, 7200, 10800, 21600, 43200, 86400,
    ):  # fmt: skip
        if span / step <= target:
            return step
    return 86400 * math.ceil(span / 86400 / target)


def _tick_label(t: float, step: float) -> str:
    if step < 1:
        return f"{t:.2f}".rstrip("0").rstrip(".") + "s"
    if step < 60:
        return f"{t:.0f}s"
    if step < 3600:
        m, sec = divmod(round(t), 60)
        return f"{m}m" if not sec else f"{m}m{sec:02d}s"
    h, rest = divmod(round(t), 3600)
    return f"{h}h" if not rest else f"{h}h{rest // 60:02d}m"


class Scale:
    def __init__(self, t0: float, t1: float) -> None:
        self.t0 = t0
        self.span = max(t1 - t0, 1e-9)

    def x(self, t: float) -> float:
        return LEFT + min(max((t - self.t0) / self.span, 0.0), 1.0) * PLOT

    def px_s(self) -> float:
        """Seconds per pixel."""
        return self.span / PLOT


# -- the timeline ---------------------------------------------------------------------


def _colours(run: Run) -> dict[str, str]:
    return {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(run.models)}


def _merge_bars(
    bars: list[StageRun], scale: Scale
) -> list[tuple[float, float, str, list[StageRun]]]:
    """Per lane: bars as (x0, x1, model, stages); sub-pixel neighbours of one model merged."""
    out: list[tuple[float, float, str, list[StageRun]]] = []
    for s in sorted(bars, key=lambda b: b.start):
        x0, x1 = scale.x(s.start), scale.x(s.end)
        if out:
            px0, px1, model, group = out[-1]
            if model == s.model and x0 - px1 < 1.0 and (x1 - x0 < 3 or px1 - px0 < 3):
                group.append(s)
                out[-1] = (px0, max(px1, x1), model, group)
                continue
        out.append((x0, x1, s.model, [s]))
    return out


def _stage_title(group: list[StageRun]) -> str:
    if len(group) == 1:
        s = group[0]
        tps = ""
        if s.eval_count and s.eval_duration_ns:
            tps = f", {s.eval_count} tokens at {s.eval_count / s.eval_duration_ns * 1e9:.0f}/s"
        return (
            f"{s.job_id} · {s.stage} · {s.model}\n{fmt_s(s.wall_s)} running, "
            f"{fmt_s(s.queue_s)} queued{tps}\n{clock(s.start)}Z"
        )
    return f"{len(group)} stages on {group[0].model} (merged: narrower than a pixel)"


def _utilization(
    run: Run, backend: str, totals: BackendTotals, scale: Scale
) -> list[tuple[float, float, str, float, str]]:
    """Pixel-binned activity: (x0, x1, state, opacity, title) runs of equal look."""
    columns: dict[int, dict[str, float]] = {}
    for a, b, state, n in run.activity(backend):
        xa, xb = scale.x(a) - LEFT, scale.x(b) - LEFT
        col = int(xa)
        while col < xb and col < PLOT:
            lo, hi = max(xa, col), min(xb, col + 1)
            if hi > lo:
                bucket = columns.setdefault(col, {})
                bucket[state] = bucket.get(state, 0.0) + (hi - lo)
                if state == "serving":
                    bucket["busy"] = bucket.get("busy", 0.0) + (hi - lo) * n
            col += 1
    runs: list[tuple[float, float, str, float, str]] = []
    slots = max(totals.slots, 1)
    for col in range(PLOT):
        found = columns.get(col)
        if not found:
            continue
        bucket = found
        states = {k: v for k, v in bucket.items() if k != "busy"}
        state = max(states, key=lambda k: states[k])
        if state == "serving":
            busy = bucket.get("busy", 0.0) / max(states["serving"], 1e-9)
            # 4 steps of shade so neighbouring columns merge into runs
            level = min(4, max(1, math.ceil(busy / slots * 4 - 1e-9)))
            opacity = 0.25 + 0.75 * level / 4
            title = f"serving, ~{level * 25} % of {slots} slot(s) busy"
        else:
            opacity = 1.0
            title = STATE_LABELS[state]
        x0 = LEFT + col
        if runs and runs[-1][2] == state and runs[-1][3] == opacity and runs[-1][1] == x0:
            runs[-1] = (runs[-1][0], x0 + 1, state, opacity, title)
        else:
            runs.append((x0, x0 + 1, state, opacity, title))
    return runs


def _axis(scale: Scale, y: float, height: float) -> list[str]:
    parts = []
    step = _tick_step(scale.span)
    n = 0
    while n * step <= scale.span + 1e-9:
        t = n * step
        x = LEFT + t / scale.span * PLOT
        parts.append(
            f'<line class="grid" x1="{x:.1f}" y1="{y + 6:.1f}" x2="{x:.1f}" y2="{y + height:.1f}"/>'
        )
        anchor = "start" if n == 0 else "middle"
        parts.append(
            f'<text class="tick" x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}">'
            f"{esc(_tick_label(t, step))}</text>"
        )
        n += 1
    return parts


def timeline_svg(run: Run, totals: dict[str, BackendTotals]) -> str:
    scale = Scale(run.t0, run.t1)
    colours = _colours(run)
    server_loads = run.server_loads()
    body: list[str] = []
    y = 30.0
    lanes_top = y
    for backend in run.backends:
        slots = run.slots[backend]
        top = y
        body.append(
            f'<text class="backend" x="0" y="{y + 12:.1f}">{esc(backend)}</text>'
            f'<text class="sub" x="{LEFT}" y="{y + 12:.1f}">'
            f"{slots} slot{'s' if slots != 1 else ''} · "
            f"busy {fmt_pct(totals[backend].serving_s, run.span_s)} of the window</text>"
        )
        y += 20
        # models lane: resident bands, load bands hatched
        body.append(f'<g class="lane models" data-backend="{esc(backend)}">')
        body.append(f'<text class="lane-label" x="{LEFT - 8}" y="{y + 15:.1f}">models</text>')
        body.append(
            f'<rect class="lane-bg" x="{LEFT}" y="{y:.1f}" width="{PLOT}" height="{MODELS_H}"/>'
        )
        for band in sorted(
            (b for b in run.bands if b.backend == backend), key=lambda b: b.kind != "resident"
        ):
            x0, x1 = scale.x(band.start), scale.x(band.end)
            width = max(x1 - x0, 1.0)
            colour = colours.get(band.model, "#999")
            title = (
                f"{band.model}: {'loading' if band.kind == 'loading' else 'resident'} "
                f"{fmt_s(band.end - band.start)}{' (still going)' if band.open else ''}"
            )
            if band.kind == "loading":
                body.append(
                    f'<g class="band loading" data-model="{esc(band.model)}">'
                    f'<rect x="{x0:.2f}" y="{y:.1f}" width="{width:.2f}" height="{MODELS_H}" '
                    f'fill="{colour}"/><rect x="{x0:.2f}" y="{y:.1f}" width="{width:.2f}" '
                    f'height="{MODELS_H}" fill="url(#hatch)"/><title>{esc(title)}</title></g>'
                )
            else:
                body.append(
                    f'<g class="band resident" data-model="{esc(band.model)}">'
                    f'<rect x="{x0:.2f}" y="{y + 2:.1f}" width="{width:.2f}" '
                    f'height="{MODELS_H - 4}" rx="3" fill="{colour}" fill-opacity="0.28" '
                    f'stroke="{colour}" stroke-width="1"/><title>{esc(title)}</title>'
                )
                label = band.model
                if width > 7 * len(label) + 12:
                    body.append(
                        f'<text class="band-label" x="{x0 + 6:.1f}" y="{y + 15:.1f}">'
                        f"{esc(label)}</text>"
                    )
                body.append("</g>")
        for band in (b for b in server_loads if b.backend == backend):
            x0, x1 = scale.x(band.start), scale.x(band.end)
            colour = colours.get(band.model, "#999")
            body.append(
                f'<g class="band server-load" data-model="{esc(band.model)}">'
                f'<rect x="{x0:.2f}" y="{y + MODELS_H / 2:.1f}" width="{max(x1 - x0, 1.0):.2f}" '
                f'height="{MODELS_H / 2:.1f}" fill="{colour}"/><rect x="{x0:.2f}" '
                f'y="{y + MODELS_H / 2:.1f}" width="{max(x1 - x0, 1.0):.2f}" '
                f'height="{MODELS_H / 2:.1f}" fill="url(#hatch)"/><title>{esc(band.model)}: '
                f"loaded by the server inside a request (load_duration), "
                f"{fmt_s(band.end - band.start)}</title></g>"
            )
        body.append("</g>")
        y += MODELS_H + 6
        # slot lanes
        for lane in range(slots):
            bars = [s for s in run.stages if s.backend == backend and s.lane == lane]
            body.append(f'<g class="lane slot" data-backend="{esc(backend)}" data-lane="{lane}">')
            body.append(
                f'<text class="lane-label" x="{LEFT - 8}" y="{y + 11.5:.1f}">slot {lane + 1}</text>'
                f'<rect class="lane-bg" x="{LEFT}" y="{y:.1f}" width="{PLOT}" height="{LANE_H}"/>'
            )
            for x0, x1, model, group in _merge_bars(bars, scale):
                width = x1 - x0
                if width <= 0:
                    continue
                inset = 0.8 if width > 6 else 0.0  # a hairline between stages
                colour = colours.get(model, "#999")
                parts = [
                    f'<g class="stage" data-model="{esc(model)}" data-n="{len(group)}">'
                    f'<rect x="{x0 + inset / 2:.2f}" y="{y:.1f}" '
                    f'width="{max(width - inset, 0.6):.2f}" height="{LANE_H}" '
                    f'rx="{1.5 if width > 6 else 0}" '
                    f'fill="{colour}"/>'
                ]
                first = group[0]
                if len(group) == 1 and first.load_duration_ns:
                    load_px = min(first.load_duration_ns / 1e9 / scale.px_s(), width)
                    if load_px >= 1.5:
                        parts.append(
                            f'<rect x="{x0:.2f}" y="{y:.1f}" width="{load_px:.2f}" '
                            f'height="{LANE_H}" fill="url(#hatch)"/>'
                        )
                parts.append(f"<title>{esc(_stage_title(group))}</title></g>")
                body.append("".join(parts))
            body.append("</g>")
            y += LANE_H + LANE_GAP
        # utilization row
        y += 3
        body.append(
            f'<g class="lane util" data-backend="{esc(backend)}">'
            f'<text class="lane-label strong" x="{LEFT - 8}" y="{y + 13:.1f}">utilization</text>'
            f'<rect x="{LEFT}" y="{y:.1f}" width="{PLOT}" height="{UTIL_H}" '
            f'fill="{STATE_COLOURS["idle"]}"/>'
        )
        for x0, x1, state, opacity, title in _utilization(run, backend, totals[backend], scale):
            if state == "idle":
                continue
            body.append(
                f'<rect class="u-{state}" x="{x0:.1f}" y="{y:.1f}" width="{x1 - x0:.1f}" '
                f'height="{UTIL_H}" fill="{STATE_COLOURS[state]}" fill-opacity="{opacity:.2f}">'
                f"<title>{esc(title)}</title></rect>"
            )
        body.append("</g>")
        y += UTIL_H
        for outage in (o for o in run.outages if o.backend == backend):
            x0, x1 = scale.x(outage.start), scale.x(outage.end)
            body.append(
                f'<g class="outage"><rect x="{x0:.1f}" y="{top + 18:.1f}" '
                f'width="{max(x1 - x0, 1):.1f}" height="{y - top - 18:.1f}" fill="url(#down)"/>'
                f"<title>{esc(backend)} down {fmt_s(outage.end - outage.start)}: "
                f"{esc(outage.reason)}</title></g>"
            )
        y += 22
    for t, job_id, kind in run.failures:
        x = scale.x(t)
        body.append(
            f'<g class="failure"><path d="M{x - 4:.1f},{lanes_top - 2:.1f} h8 l-4,6 z" '
            f'fill="{STATE_COLOURS["waiting"]}"/><title>job {esc(job_id)} failed: {esc(kind)}'
            f"</title></g>"
        )
    height = y
    axis = _axis(scale, 14, height - 22)
    defs = (
        "<defs>"
        '<pattern id="hatch" patternUnits="userSpaceOnUse" width="5" height="5" '
        'patternTransform="rotate(45)"><rect width="2.2" height="5" fill="#fff" '
        'fill-opacity="0.6"/></pattern>'
        '<pattern id="down" patternUnits="userSpaceOnUse" width="8" height="8" '
        'patternTransform="rotate(-45)"><rect width="8" height="8" fill="#7f1d1d" '
        'fill-opacity="0.10"/><rect width="3" height="8" fill="#7f1d1d" fill-opacity="0.35"/>'
        "</pattern></defs>"
    )
    return (
        f'<svg class="timeline" viewBox="0 0 {WIDTH} {height:.0f}" width="{WIDTH}" '
        f'height="{height:.0f}" xmlns="http://www.w3.org/2000/svg" role="img" '
        f'aria-label="timeline">{defs}{"".join(axis)}{"".join(body)}</svg>'
    )


# -- queue depth ----------------------------------------------------------------------


def queue_svg(run: Run) -> str:
    scale = Scale(run.t0, run.t1)
    colours = _colours(run)
    series = run.queue_depth()
    height, top, bottom = 190.0, 26.0, 22.0
    plot_h = height - top - bottom
    peak = max((d for steps in series.values() for _t, d in steps), default=0)
    step = max(1, _nice_int(max(peak, 1) / 4))
    ymax = step * max(1, math.ceil(peak / step))
    done_max = max(run.jobs_done, 1)

    def y_of(depth: float) -> float:
        return top + plot_h - depth / ymax * plot_h

    parts = _axis(scale, 14, height - bottom - 8)
    # y ticks (left: ready stages)
    value = 0
    while value <= ymax:
        yy = y_of(value)
        parts.append(
            f'<line class="grid h" x1="{LEFT}" y1="{yy:.1f}" x2="{LEFT + PLOT}" y2="{yy:.1f}"/>'
            f'<text class="tick" x="{LEFT - 8}" y="{yy + 4:.1f}" text-anchor="end">{value}</text>'
        )
        value += step
    parts.append(f'<text class="axis-title" x="0" y="{top + plot_h / 2:.1f}">ready stages</text>')
    for model, steps in series.items():
        points = _step_points(steps, scale, run.t1)
        if len(points) < 2:
            continue
        line = " ".join(f"{x:.1f},{y_of(d):.1f}" for x, d in points)
        area = f"{LEFT:.1f},{y_of(0):.1f} {line} {points[-1][0]:.1f},{y_of(0):.1f}"
        colour = colours.get(model, "#999")
        parts.append(
            f'<g class="queue" data-model="{esc(model)}" data-peak="'
            f'{max(d for _t, d in steps)}">'
            f'<polygon points="{area}" fill="{colour}" fill-opacity="0.16"/>'
            f'<polyline points="{line}" fill="none" stroke="{colour}" stroke-width="1.6"/>'
            f"<title>{esc(model)}: up to {max(d for _t, d in steps)} ready stages</title></g>"
        )
    # cumulative jobs done, on its own (right) scale
    if run.done_times:
        pts: list[tuple[float, float]] = [(float(LEFT), top + plot_h)]
        for n, t in enumerate(sorted(run.done_times), start=1):
            x = scale.x(t)
            yy = top + plot_h - n / done_max * plot_h
            pts.append((x, pts[-1][1]))
            pts.append((x, yy))
        pts.append((LEFT + PLOT, pts[-1][1]))
        line = " ".join(f"{x:.1f},{yy:.1f}" for x, yy in _thin(pts))
        parts.append(
            f'<g class="done-line"><polyline points="{line}" fill="none" stroke="#333" '
            f'stroke-width="1.2" stroke-dasharray="4 3"/>'
            f"<title>jobs finished (cumulative, right scale: {run.jobs_done})</title></g>"
            f'<text class="tick" x="{LEFT + PLOT + 6}" y="{top + 4:.1f}">{run.jobs_done}</text>'
            f'<text class="tick" x="{LEFT + PLOT + 6}" y="{top + plot_h + 4:.1f}">0</text>'
            f'<text class="tick" x="{LEFT + PLOT + 6}" y="{top + plot_h / 2 + 4:.1f}">jobs</text>'
        )
    return (
        f'<svg class="queue-chart" viewBox="0 0 {WIDTH} {height:.0f}" width="{WIDTH}" '
        f'height="{height:.0f}" xmlns="http://www.w3.org/2000/svg" role="img" '
        f'aria-label="queue depth per model">{"".join(parts)}</svg>'
    )


def _nice_int(value: float) -> int:
    for step in (1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 2000, 5000, 10000):
        if step >= value:
            return step
    return int(10 ** math.ceil(math.log10(value)))


def _step_points(
    steps: list[tuple[float, int]], scale: Scale, t_end: float
) -> list[tuple[float, float]]:
    """Step function → polyline points, at most a few per pixel column (max kept)."""
    raw: list[tuple[float, float]] = []
    for i, (t, depth) in enumerate(steps):
        x = scale.x(t)
        if i:
            raw.append((x, raw[-1][1]))
        raw.append((x, float(depth)))
    raw.append((scale.x(t_end), raw[-1][1] if raw else 0.0))
    if len(raw) <= 2 * PLOT:
        return raw
    # per column: enter value, max, exit value
    out: list[tuple[float, float]] = []
    col_of = [int(x) for x, _ in raw]
    i = 0
    while i < len(raw):
        j = i
        while j + 1 < len(raw) and col_of[j + 1] == col_of[i]:
            j += 1
        chunk = raw[i : j + 1]
        x = float(col_of[i])
        out.append((x, chunk[0][1]))
        out.append((x + 0.5, max(d for _x, d in chunk)))
        out.append((x + 1.0, chunk[-1][1]))
        i = j + 1
    return out


def _thin(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Drop points that change nothing (same x and y as the previous one)."""
    out: list[tuple[float, float]] = []
    for p in points:
        if out and abs(out[-1][0] - p[0]) < 0.05 and abs(out[-1][1] - p[1]) < 0.05:
            continue
        out.append(p)
    return out


# -- the page -------------------------------------------------------------------------


def _legend(run: Run) -> str:
    colours = _colours(run)
    items = [
        f'<span class="key"><i style="background:{c}"></i>{esc(m)}</span>'
        for m, c in colours.items()
    ]
    items.append('<span class="key"><i class="hatched"></i>model loading</span>')
    for state in ("serving", "loading", "waiting", "down"):
        items.append(
            f'<span class="key"><i style="background:{STATE_COLOURS[state]}"></i>'
            f"{esc(STATE_LABELS[state])}</span>"
        )
    items.append(f'<span class="key"><i style="background:{STATE_COLOURS["idle"]}"></i>idle</span>')
    return f'<div class="legend">{"".join(items)}</div>'


def _cards(run: Run, totals: dict[str, BackendTotals], models: dict[str, ModelTotals]) -> str:
    span = run.span_s
    serving = sum(t.serving_s for t in totals.values())
    loading = sum(t.loading_s for t in totals.values())
    waiting = sum(t.idle_waiting_s for t in totals.values())
    down = sum(t.down_s for t in totals.values())
    whole = span * max(len(totals), 1)
    loads = sum(m.loads for m in models.values())
    server_loads = sum(m.server_loads for m in models.values())
    tokens = sum(m.tokens for m in models.values())
    failed = run.jobs_failed + run.jobs_rejected
    cards = [
        ("jobs_done", "jobs done", f"{run.jobs_done}",
         f"{run.jobs_failed} failed · {run.jobs_rejected} rejected" if failed else "none failed"),
        ("jobs_per_min", "jobs / min", fmt_num(run.jobs_per_min),
         "first claim → last finish"),
        ("loads", "model loads", f"{loads}",
         f"{fmt_s(loading)} loading" + (f" · {server_loads} by the server" * bool(server_loads))),
        ("busy", "GPU busy", fmt_pct(serving, whole), f"{fmt_s(serving)} serving stages"),
        ("waiting", "idle with work ready", fmt_pct(waiting, whole),
         f"{fmt_s(waiting)}" + (f" · backend down {fmt_pct(down, whole)}" if down else "")),
        ("stages", "stages", f"{len(run.stages)}", f"{tokens:,} tokens generated"),
    ]  # fmt: skip
    out = []
    for key, label, value, sub in cards:
        warn = " warn" if key == "waiting" and whole and waiting / whole > 0.05 else ""
        out.append(
            f'<div class="card{warn}" data-k="{key}"><div class="label">{esc(label)}</div>'
            f'<div class="value">{esc(value)}</div><div class="sub">{esc(sub)}</div></div>'
        )
    return f'<div class="cards">{"".join(out)}</div>'


def _table(headers: Iterable[str], rows: Iterable[Iterable[tuple[str, str]]], cls: str) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f'<td data-k="{esc(k)}">{esc(v)}</td>' for k, v in row) + "</tr>"
        for row in rows
    )
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _backend_table(run: Run, totals: dict[str, BackendTotals]) -> str:
    span = run.span_s
    rows = []
    for name, t in totals.items():
        rows.append(
            [
                ("backend", name),
                ("slots", str(t.slots)),
                ("serving", f"{fmt_s(t.serving_s)} ({fmt_pct(t.serving_s, span)})"),
                ("loading", f"{fmt_s(t.loading_s)} ({fmt_pct(t.loading_s, span)})"),
                ("idle_waiting", f"{fmt_s(t.idle_waiting_s)} ({fmt_pct(t.idle_waiting_s, span)})"),
                ("down", f"{fmt_s(t.down_s)} ({fmt_pct(t.down_s, span)})" if t.down_s else DASH),
                ("idle", f"{fmt_s(t.idle_s)} ({fmt_pct(t.idle_s, span)})"),
                ("busy_slots", f"{t.busy_slots:.2f} of {t.slots}"),
                ("slot_util", fmt_pct(t.slot_s, span * t.slots)),
            ]
        )
    return _table(
        [
            "backend", "slots", "serving", "loading", "idle, work ready", "down",
            "idle", "slots busy while serving", "slot utilization",
        ],
        rows,
        "backends",
    )  # fmt: skip


def _model_table(run: Run, models: dict[str, ModelTotals]) -> str:
    colours = _colours(run)
    rows = []
    for name, m in models.items():
        rows.append(
            [
                ("model", name),
                ("stages", str(m.stages)),
                ("stage_s", fmt_s(m.wall_s / m.stages) if m.stages else DASH),
                ("queue_s", fmt_s(m.queue_s / m.stages) if m.stages else DASH),
                ("tokens", f"{m.tokens:,}"),
                ("tokens_per_s", fmt_num(m.tokens_per_s)),
                ("loads", str(m.loads)),
                ("load_s", fmt_s(m.load_s) if m.loads else DASH),
                ("resident_s", fmt_s(m.resident_s) if m.resident_s else DASH),
            ]
        )
    table = _table(
        [
            "model", "stages", "mean stage", "mean queue wait", "tokens",
            "tokens/s (decode)", "loads", "time loading", "resident",
        ],
        rows,
        "models",
    )  # fmt: skip
    for name, colour in colours.items():  # a colour chip before each model name
        table = table.replace(
            f'<td data-k="model">{esc(name)}</td>',
            f'<td data-k="model"><i class="chip" style="background:{colour}"></i>{esc(name)}</td>',
            1,
        )
    return table


CSS = (
    """
:root { color-scheme: light; --ink:#1d2330; --muted:#667085; --line:#e4e7ec; --bg:#f6f7f9; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--ink);
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; }
main { max-width: 1368px; margin: 0 auto; padding: 20px 24px 40px; }
h1 { font-size: 21px; margin: 0 0 2px; letter-spacing: -0.01em; }
h1 span { color: var(--muted); font-weight: 500; }
h2 { font-size: 15px; margin: 0 0 8px; }
p.meta { color: var(--muted); margin: 0 0 16px; font-size: 13px; }
.cards { display: grid; grid-template-columns: repeat(6, 1fr); gap: 12px; margin-bottom: 16px; }
.card { background: #fff; border: 1px solid var(--line); border-radius: 10px; padding: 10px 14px; }
.card .label { color: var(--muted); font-size: 12px; text-transform: uppercase;
  letter-spacing: .04em; }
.card .value { font-size: 26px; font-weight: 650; margin: 2px 0;
  font-variant-numeric: tabular-nums; }
.card .sub { color: var(--muted); font-size: 12px; }
.card.warn { border-color: #f5b5b5; background: #fff6f6; }
.card.warn .value { color: #b42318; }
section { background: #fff; border: 1px solid var(--line); border-radius: 10px;
  padding: 14px 16px 12px; margin-bottom: 16px; }
section p.note { color: var(--muted); font-size: 12.5px; margin: 6px 0 0; }
svg { display: block; font-family: inherit; width: 100%; height: auto; }
svg .tick { font-size: 11px; fill: #667085; font-variant-numeric: tabular-nums; }
svg .grid { stroke: #eef0f3; stroke-width: 1; }
svg .backend { font-size: 13px; font-weight: 650; fill: #1d2330; }
svg .sub { font-size: 12px; fill: #667085; }
svg .lane-label { font-size: 11.5px; fill: #475467; text-anchor: end; }
svg .lane-label.strong { font-weight: 650; fill: #1d2330; }
svg .lane-bg { fill: #f8f9fb; }
svg .band-label { font-size: 11.5px; fill: #1d2330; font-weight: 600; }
svg .axis-title { font-size: 11.5px; fill: #475467; }
.legend { display: flex; flex-wrap: wrap; gap: 6px 16px; margin: 10px 0 0 """
    + str(LEFT)
    + """px;
  font-size: 12.5px; color: #344054; }
.legend .key { display: inline-flex; align-items: center; gap: 6px; }
.legend i { display: inline-block; width: 14px; height: 10px; border-radius: 2px; }
.legend i.hatched { background: repeating-linear-gradient(45deg, #888 0 2px, #ddd 2px 4px); }
.tables { display: grid; grid-template-columns: 1fr; gap: 16px; }
table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
th, td { text-align: right; padding: 6px 10px; border-bottom: 1px solid var(--line);
  white-space: nowrap; }
th:first-child, td:first-child { text-align: left; }
th { font-size: 12px; color: var(--muted); font-weight: 600; }
tbody tr:last-child td { border-bottom: none; }
i.chip { display: inline-block; width: 10px; height: 10px; border-radius: 2px; margin-right: 7px; }
footer { color: var(--muted); font-size: 12px; margin-top: 8px; }
"""
)


def render_html(run: Run, *, source: str) -> str:
    totals = run.backend_totals()
    models = run.model_totals()
    title = f"ihld run report: {clock(run.t0)} UTC" if run.span_s else "ihld run report"
    if not run.stages and not run.bands:
        body = (
            '<section><h2>Nothing to show</h2><p class="note">No stages, loads or jobs in '
            "this window of the log.</p></section>"
        )
    else:
        body = (
            _cards(run, totals, models)
            + "<section><h2>Timeline</h2>"
            + timeline_svg(run, totals)
            + _legend(run)
            + '<p class="note">One group of lanes per backend. <b>models</b>: what ihld held '
            "resident (hatched: loading; half-height: loaded by the server itself inside a "
            "request, from Ollama's <code>load_duration</code>). <b>slot</b> lanes: one bar per "
            "stage, coloured by model, on the first free lane (hatched start: the server "
            "loading or queueing before it ran). <b>utilization</b>: green while serving "
            "(darker = more slots busy), amber while loading, red when the backend sat idle "
            "although stages were ready. Red triangles: failed jobs. Hover for details.</p>"
            "</section>"
            + "<section><h2>Queue depth per model</h2>"
            + queue_svg(run)
            + '<p class="note">Stages ready and waiting in ihld\'s queue, per model (exact, '
            "from each stage's queue wait); dashed: jobs finished so far.</p></section>"
            + '<section><h2>Where the time went</h2><div class="tables">'
            + _backend_table(run, totals)
            + _model_table(run, models)
            + "</div></section>"
        )
    meta = (
        f"{esc(source)} · {esc(clock(run.t0))} → {esc(clock(run.t1))} UTC "
        f"({esc(fmt_s(run.span_s))}) · "
        f"{run.jobs_claimed} jobs claimed · {len(run.stages)} stages · {run.events} events"
        + (f" · policy {esc(run.policy)}" if run.policy else "")
        + (f" · {len(run.daemon_starts)} daemon starts" if len(run.daemon_starts) > 1 else "")
    )
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S")
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body><main>"
        f"<h1>ihld run report <span>· {esc(clock(run.t0))} UTC</span></h1>"
        f'<p class="meta">{meta}</p>'
        f"{body}"
        f"<footer>Generated by ihld {esc(__version__)} report at {generated} UTC from the "
        "structured event log; self-contained (no scripts, no network).</footer>"
        "</main></body></html>\n"
    )
