"""The report's shared pieces: colours, geometry, number formats and the time scale."""

from __future__ import annotations

import html
import math
from datetime import UTC, datetime

from ihld.observe.report_run import Run

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


def _colours(run: Run) -> dict[str, str]:
    return {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(run.models)}
