"""Printing bench results: one table for people, one JSON list for scripts.

The table is Markdown, so a run's output can be pasted into
``benchmarks/README.md`` as it is, with the machine it ran on: on a shared
2-core box the absolute times move from run to run, the ratios much less.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Sequence
from typing import Any


def machine() -> dict[str, Any]:
    """What the numbers were measured on: CPUs, CPU model, load, Python."""
    model = "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = []
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "loadavg": load,
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
    }


def _num(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    return format(value, fmt)


def _pct(value: Any) -> str:
    return "-" if value is None else f"{100 * value:.1f} %"


COLUMNS = (
    "workload",
    "policy",
    "jobs",
    "makespan s",
    "lower bound s",
    "makespan/LB",
    "at x1 /LB",
    "s/job",
    "loads",
    "slot occ.",
    "p50 latency s",
    "p99 latency s",
    "jobs/min",
)


def _cells(row: dict[str, Any]) -> list[str]:
    if row["workload"] == "overhead":
        return [
            row["workload"],
            row["policy"],
            str(row["jobs"]),
            _num(row["makespan_s"], ".2f"),
            "-",
            "-",
            "-",
            "-",
            str(row["loads"]),
            _pct(row["slot_occupancy"]),
            _num(row["p50_latency_s"], ".3f"),
            _num(row["p99_latency_s"], ".3f"),
            _num(row["jobs_per_min"], ".0f"),
        ]
    return [
        row["workload"],
        row["policy"],
        f"{row['done']}" + (f" ({row['failed']} failed)" if row["failed"] else ""),
        _num(row["makespan_s"], ".1f"),
        _num(row["lower_bound_s"], ".1f"),
        _num(row["ratio"], ".3f"),
        _num(row.get("ratio_speed_free"), ".3f"),
        _num(row["s_per_job"], ".2f"),
        str(row["loads"]),
        _pct(row["slot_occupancy"]),
        _num(row["p50_latency_s"], ".1f"),
        _num(row["p99_latency_s"], ".1f"),
        _num(row["jobs_per_min"], ".2f"),
    ]


def table(rows: Sequence[dict[str, Any]]) -> str:
    """A Markdown table, one line per (workload, policy), right-aligned numbers."""
    cells = [list(COLUMNS), *(_cells(r) for r in rows)]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]

    def line(values: list[str]) -> str:
        parts = [
            v.ljust(w) if i < 2 else v.rjust(w)
            for i, (v, w) in enumerate(zip(values, widths, strict=True))
        ]
        return "| " + " | ".join(parts) + " |"

    rule = (
        "|"
        + "|".join("-" * (w + 2) if i < 2 else "-" * (w + 1) + ":" for i, w in enumerate(widths))
        + "|"
    )
    return "\n".join([line(cells[0]), rule, *(line(c) for c in cells[1:])])


def notes(rows: Sequence[dict[str, Any]]) -> list[str]:
    """One line per special figure: urgent latency, wait bound, overhead, cost check."""
    out = []
    for row in rows:
        tag = f"{row['workload']}/{row['policy']}"
        urgent = row.get("urgent")
        if urgent:
            latency = _num(urgent["latency_s"], ".1f")
            out.append(
                f"{tag}: urgent job latency {latency} s; target max_wait_s "
                f"{urgent['max_wait_s']:g} + own service {urgent['own_service_s']:.1f} = "
                f"{urgent['target_s']:.1f} s -> {'met' if urgent['met'] else 'NOT met'}"
            )
        wait = row.get("wait_bound")
        if wait:
            out.append(
                f"{tag}: priority-{wait['priority']} tasks waited at most "
                f"{wait['longest_wait_s']:.1f} s (max_wait_s {wait['max_wait_s']:g} + one switch "
                f"{wait['allowance_s']:.1f}) -> {'held' if wait['held'] else 'NOT held'}"
            )
        over = row.get("overhead")
        if over:
            out.append(
                f"{tag}: {over['stages']} stages at {_num(over['stages_per_s'], '.0f')} stages/s "
                f"end to end ({over['daemon_cpu_ms_per_stage']:.2f} ms daemon CPU per stage); "
                f"drop-to-claim p50 {_num(over['drop_to_claim_p50_ms'], '.1f')} ms, "
                f"p99 {_num(over['drop_to_claim_p99_ms'], '.1f')} ms ({over['drops']} files, "
                f"half poked like `ihld submit`); without the poke p50 "
                f"{_num(over['unpoked_p50_ms'], '.1f')} ms, "
                f"p99 {_num(over['unpoked_p99_ms'], '.1f')} ms"
            )
        if row.get("switches"):
            out.append(
                f"{tag}: {row['switches']} switches, {row['tail_idle_slot_s']:.1f} slot-s idle "
                f"in their drains ({row['tail_idle_slot_s'] / row['switches']:.1f} per switch)"
            )
        slow = row.get("sim_slowdown")
        if slow is not None and slow > 0.01:
            out.append(
                f"{tag}: the simulator held slots {100 * slow:.1f} % longer than its cost model "
                f"(timer lateness, a fixed real cost per request, x{row['speed']:g})"
            )
        check = row.get("cost_check")
        if check and check["mismatched"]:
            out.append(
                f"{tag}: WARNING {check['mismatched']} of {check['stages']} stages differ "
                "from the predicted token counts (the bound's costs are off)"
            )
        if row.get("failed"):
            out.append(f"{tag}: {row['failed']} jobs FAILED")
    return out


def render(rows: Sequence[dict[str, Any]], info: dict[str, Any]) -> str:
    """The whole human-readable report."""
    head = (
        f"machine: {info['nproc']} CPUs, {info['cpu']}, load {info['loadavg']}; "
        f"Python {info['python']}"
    )
    speeds = sorted({r["speed"] for r in rows if r["workload"] != "overhead"})
    if speeds:
        head += f"; speed x{', x'.join(f'{s:g}' for s in speeds)}"
    body = [head, "times in simulated seconds (wall x speed)", "", table(rows)]
    extra = notes(rows)
    if extra:
        body += ["", *extra]
    return "\n".join(body)
