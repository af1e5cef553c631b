"""keep_alive as Ollama reads it: seconds as a number, or a Go duration string.

Ollama's ``api.Duration.UnmarshalJSON`` accepts a JSON number (seconds,
fractions allowed) or a string for Go's ``time.ParseDuration``; anything
negative means "keep forever". A bare number in a string ("3600") is a
``ParseDuration`` error, which Ollama returns as a 400. Clients get these
rules wrong easily, so the simulator reproduces them, error text included.
"""

from __future__ import annotations

import json
import math
from typing import Any

FOREVER = math.inf

_MAX_NS = 2**63 - 1

# Go's time unitMap, in nanoseconds.
_UNITS: dict[str, int] = {
    "ns": 1,
    "us": 1_000,
    "\u00b5s": 1_000,  # U+00B5 micro sign
    "\u03bcs": 1_000,  # U+03BC Greek mu
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60_000_000_000,
    "h": 3_600_000_000_000,
}


class DurationError(ValueError):
    """A keep_alive Ollama would refuse; the message is Ollama's."""


def _quote(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


def parse_go_duration(text: str) -> int:
    """Go's ``time.ParseDuration``: nanoseconds, or DurationError with Go's message."""
    orig = text
    s = text
    neg = False
    if s and s[0] in "+-":
        neg = s[0] == "-"
        s = s[1:]
    if s == "0":
        return 0
    if not s:
        raise DurationError(f"time: invalid duration {_quote(orig)}")
    total = 0
    while s:
        if not (s[0] == "." or (s[0].isascii() and s[0].isdigit())):
            raise DurationError(f"time: invalid duration {_quote(orig)}")
        i = 0
        while i < len(s) and s[i].isascii() and s[i].isdigit():
            i += 1
        whole, s = s[:i], s[i:]
        frac = ""
        if s.startswith("."):
            s = s[1:]
            j = 0
            while j < len(s) and s[j].isascii() and s[j].isdigit():
                j += 1
            frac, s = s[:j], s[j:]
        if not whole and not frac:
            raise DurationError(f"time: invalid duration {_quote(orig)}")
        k = 0
        while k < len(s) and not (s[k] == "." or (s[k].isascii() and s[k].isdigit())):
            k += 1
        if k == 0:
            raise DurationError(f"time: missing unit in duration {_quote(orig)}")
        unit, s = s[:k], s[k:]
        if unit not in _UNITS:
            raise DurationError(f"time: unknown unit {_quote(unit)} in duration {_quote(orig)}")
        scale = _UNITS[unit]
        value = int(whole or "0") * scale
        if frac:
            value += int(frac) * scale // 10 ** len(frac)
        total += value
        if total > _MAX_NS:
            raise DurationError(f"time: invalid duration {_quote(orig)}")
    return -total if neg else total


def parse_keep_alive(raw: Any) -> float | None:
    """Seconds to keep a model after its last request; None if not given.

    Returns ``FOREVER`` (inf) for negative values and 0.0 for "unload when
    idle". Raises DurationError for what Ollama rejects with a 400.
    """
    if raw is None:
        return None
    if isinstance(raw, bool):
        raise DurationError("unsupported duration type: 'bool'")
    if isinstance(raw, int | float):
        seconds = float(raw)
        if math.isnan(seconds):
            raise DurationError("unsupported duration type: 'NaN'")
        return FOREVER if seconds < 0 else seconds
    if isinstance(raw, str):
        ns = parse_go_duration(raw)
        return FOREVER if ns < 0 else ns / 1e9
    if isinstance(raw, dict):
        type_name = "map[string]interface {}"
    elif isinstance(raw, list):
        type_name = "[]interface {}"
    else:
        type_name = type(raw).__name__
    raise DurationError(f"unsupported duration type: '{type_name}'")
