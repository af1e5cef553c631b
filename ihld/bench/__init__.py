"""``ihld bench``: named workloads on the simulator, each policy, against a lower bound.

Module map: ``workloads`` (what runs), ``costs`` (each stage's exact cost on
the simulator), ``bound`` (a makespan no schedule can beat), ``procs`` (the
simulator and the daemon as subprocesses), ``runner`` (one run: drop, wait,
collect), ``metrics`` (figures from the event log and result files),
``overhead`` (ihld's own cost on the free profile), ``report`` (table, JSON).
The formulas and measured results are in ``benchmarks/README.md``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from ihld.bench.runner import POLICIES, BenchOptions

__all__ = ["POLICIES", "BenchOptions", "run_bench"]


def run_bench(
    workloads: Sequence[str],
    policies: Sequence[str],
    opts: BenchOptions,
    *,
    jobs: int | None = None,
    as_json: bool = False,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> int:
    """Run every (workload, policy); print the table (or JSON). Exit status 1 if jobs failed."""
    from ihld.bench import overhead, report, runner
    from ihld.bench.workloads import workload

    def say(message: str) -> None:
        print(f"ihld bench: {message}", file=err, flush=True)

    info = report.machine()
    rows: list[dict[str, Any]] = []
    for name in workloads:
        load = workload(name, jobs, opts.seed)
        if load.kind == "overhead":
            for policy in policies:
                say(f"overhead/{policy}: {load.description}")
                rows.append(overhead.run_overhead(load, policy, opts, say))
        else:
            rows += runner.run(load, list(policies), opts, say)
    for row in rows:
        row["machine"] = info
    if as_json:
        json.dump(rows, out, indent=2)
        out.write("\n")
    else:
        out.write(report.render(rows, info) + "\n")
    return 1 if any(r["failed"] or r["done"] < r["jobs"] for r in rows) else 0
