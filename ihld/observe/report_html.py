"""Draw a reconstructed run (``ihld.observe.report_model.Run``) as one self-contained HTML page.

No network and no scripts: inline CSS and inline SVG only, so the file can
be mailed, archived or opened from a hardened host. Hover titles (SVG
``<title>``) give the details of a stage, a band or a column.

The drawing is bounded whatever the run's size: per lane, stages narrower
than a pixel are merged with their neighbours of the same model, and the
utilization row and queue chart are binned per pixel column.

This module assembles the page (legend, CSS, layout); the pictures are in
``report_svg``, the tables in ``report_tables`` and the shared colours,
geometry and number formats in ``report_format``. The names that used to
be defined here are re-exported.
"""

from __future__ import annotations

from datetime import UTC, datetime

from ihld import __version__
from ihld.observe.report_format import DASH as DASH
from ihld.observe.report_format import LANE_GAP as LANE_GAP
from ihld.observe.report_format import LANE_H as LANE_H
from ihld.observe.report_format import LEFT as LEFT
from ihld.observe.report_format import MODELS_H as MODELS_H
from ihld.observe.report_format import PALETTE as PALETTE
from ihld.observe.report_format import PLOT as PLOT
from ihld.observe.report_format import RIGHT as RIGHT
from ihld.observe.report_format import STATE_COLOURS as STATE_COLOURS
from ihld.observe.report_format import STATE_LABELS as STATE_LABELS
from ihld.observe.report_format import UTIL_H as UTIL_H
from ihld.observe.report_format import WIDTH as WIDTH
from ihld.observe.report_format import Scale as Scale
from ihld.observe.report_format import _colours
from ihld.observe.report_format import clock as clock
from ihld.observe.report_format import esc as esc
from ihld.observe.report_format import fmt_num as fmt_num
from ihld.observe.report_format import fmt_pct as fmt_pct
from ihld.observe.report_format import fmt_s as fmt_s
from ihld.observe.report_run import BackendTotals as BackendTotals
from ihld.observe.report_run import ModelTotals as ModelTotals
from ihld.observe.report_run import Run as Run
from ihld.observe.report_run import StageRun as StageRun
from ihld.observe.report_svg import (
    queue_svg,
    timeline_svg,
)
from ihld.observe.report_tables import (
    _backend_table,
    _cards,
    _model_table,
)


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
