"""The report's pictures as inline SVG: the timeline and the queue chart."""

from __future__ import annotations

import math

from ihld.observe.report_format import (
    LANE_GAP,
    LANE_H,
    LEFT,
    MODELS_H,
    PLOT,
    STATE_COLOURS,
    STATE_LABELS,
    UTIL_H,
    WIDTH,
    Scale,
    _colours,
    _tick_label,
    _tick_step,
    clock,
    esc,
    fmt_pct,
    fmt_s,
)
from ihld.observe.report_run import BackendTotals, Run, StageRun


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
