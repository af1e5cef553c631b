"""Print the ``ihld bench`` table from saved ``ihld bench --json`` output.

    ihld bench --workload seed --json > seed.json
    python benchmarks/render.py seed.json [more.json ...]

Lets one long run be saved once as JSON (every figure) and shown as the same
Markdown table ``ihld bench`` prints, or several runs combined into one table.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from ihld.bench.report import render


def main(paths: list[str]) -> int:
    rows: list[dict[str, Any]] = []
    for path in paths:
        rows += json.loads(Path(path).read_text())
    if not rows:
        print("usage: python benchmarks/render.py RESULTS.json...", file=sys.stderr)
        return 2
    print(render(rows, rows[0]["machine"]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
