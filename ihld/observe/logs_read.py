"""Reading the event log back: one dict per complete line, a torn last line skipped."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any


def epoch(timestamp: Any) -> float | None:
    if not isinstance(timestamp, str):
        return None
    try:
        return datetime.fromisoformat(timestamp).timestamp()
    except ValueError:
        return None


def read_events(path: Path, since: float | None = None) -> Iterator[dict[str, Any]]:
    """Yield the events of a log file in order, as dicts.

    ``since`` (seconds since the epoch) keeps events at or after that time.
    A last line without its newline is a write torn by a crash (or one still
    being written) and is skipped; so is any line that is not a JSON object,
    which is what a torn line looks like once a restarted daemon has
    appended after it. ``FileNotFoundError`` if there is no log yet.
    """
    with open(path, "rb") as fh:
        for raw in fh:
            if not raw.endswith(b"\n"):
                break
            try:
                event = json.loads(raw)
            except ValueError:
                continue
            if not isinstance(event, dict):
                continue
            if since is not None:
                when = epoch(event.get("timestamp"))
                if when is None or when < since:
                    continue
            yield event
