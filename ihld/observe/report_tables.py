"""The report's figures as HTML: the summary cards and the per-backend and per-model tables."""

from __future__ import annotations

from collections.abc import Iterable

from ihld.observe.report_format import (
    DASH,
    _colours,
    esc,
    fmt_num,
    fmt_pct,
    fmt_s,
)
from ihld.observe.report_run import BackendTotals, ModelTotals, Run


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
