"""Ollama's ``keep_alive``: check it here, so a typo fails at config time and not as a 400.

Ollama decodes ``keep_alive`` with ``api.Duration.UnmarshalJSON``:

* a JSON number is seconds (fractions allowed: ``t * float64(time.Second)``);
* a JSON string goes through Go's ``time.ParseDuration`` (``"10m"``, ``"1h30m"``,
  ``"-1m"``, ``"500ms"``). Go requires a unit on every number, except the bare
  string ``"0"``; so ``"3600"`` and ``"-1"`` are rejected and the whole request
  fails with HTTP 400;
* any negative value means "keep loaded forever" (Ollama saturates it to the
  largest duration), and 0 means "unload as soon as idle".

The parser below is a port of ``time.ParseDuration`` (same grammar, units,
case sensitivity and int64 overflow rule), so what it accepts is exactly what
Ollama accepts.
"""

from __future__ import annotations

import math
from fractions import Fraction

from ihld.backends.base import KeepAlive

__all__ = [
    "FOREVER",
    "format_keep_alive",
    "parse_go_duration",
    "parse_keep_alive",
]

# parse_keep_alive's answer for a negative keep_alive: Ollama never unloads the model.
FOREVER = math.inf

_NS_PER_S = 1_000_000_000
_MAX_NS = (1 << 63) - 1  # Go's time.Duration is an int64 of nanoseconds

# Go's unitMap, case-sensitive: "10M" or "1H" are errors in Go, so they are here.
_UNIT_NS: dict[str, int] = {
    "ns": 1,
    "us": 1_000,
    "\u00b5s": 1_000,  # µ, MICRO SIGN
    "\u03bcs": 1_000,  # μ, GREEK SMALL LETTER MU
    "ms": 1_000_000,
    "s": _NS_PER_S,
    "m": 60 * _NS_PER_S,
    "h": 3600 * _NS_PER_S,
}

_HINT = 'write a number of seconds (1800, -1) or a Go duration with units ("30m", "1h30m", "-1m")'


def _invalid(text: str, why: str) -> ValueError:
    return ValueError(f"keep_alive {text!r} is not a valid Go duration: {why}; {_HINT}")


def _leading_digits(s: str) -> tuple[str, str]:
    """Split ``s`` into its leading ASCII digits and the rest (Go accepts no other digits)."""
    i = 0
    while i < len(s) and "0" <= s[i] <= "9":
        i += 1
    return s[:i], s[i:]


def parse_go_duration(text: str) -> int:
    """Parse ``text`` as Go's ``time.ParseDuration`` does and return nanoseconds.

    Raises ``ValueError`` for anything Go rejects, so Ollama would answer 400:
    a missing unit (``"3600"``, ``"-1"``), an unknown unit (``"1d"``, ``"10M"``),
    spaces, an empty string, or more than about 292 years.
    """
    if not isinstance(text, str):
        raise TypeError(f"expected a str, got {type(text).__name__}")
    s = text
    negative = False
    if s[:1] in ("-", "+"):
        negative = s[0] == "-"
        s = s[1:]
    if s == "0":  # Go's one special case: zero needs no unit
        return 0
    if not s:
        raise _invalid(text, "it is empty")
    total = Fraction(0)
    while s:
        if not (s[0] == "." or "0" <= s[0] <= "9"):
            raise _invalid(text, f"expected a number at {s!r}")
        whole, s = _leading_digits(s)
        frac = ""
        if s[:1] == ".":
            frac, s = _leading_digits(s[1:])
        if not whole and not frac:
            raise _invalid(text, "a '.' without digits")
        i = 0
        while i < len(s) and not (s[i] == "." or "0" <= s[i] <= "9"):
            i += 1
        unit, s = s[:i], s[i:]
        if not unit:
            raise ValueError(
                f"keep_alive {text!r} has no unit: Ollama reads a string as a Go duration "
                f"and rejects a bare number with HTTP 400; {_HINT}"
            )
        if unit not in _UNIT_NS:
            known = ", ".join(u for u in _UNIT_NS if u.isascii())
            raise _invalid(text, f"unknown unit {unit!r} (units: {known}; case matters)")
        value = Fraction(int(whole or "0"))
        if frac:
            value += Fraction(int(frac), 10 ** len(frac))
        total += value * _UNIT_NS[unit]
        if total > 1 << 63:  # Go's overflow check allows exactly 2**63 only when negative
            raise _invalid(text, "it overflows Go's int64 nanoseconds (about 292 years)")
    ns = math.floor(total)
    if negative:
        return -ns
    if ns > _MAX_NS:
        raise _invalid(text, "it overflows Go's int64 nanoseconds (about 292 years)")
    return ns


def _check_number(value: int | float) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"keep_alive {value!r} is not a finite number; {_HINT}")
    # Go converts seconds to int64 nanoseconds; beyond that the conversion is undefined.
    if value > 0 and value * _NS_PER_S > _MAX_NS:
        raise ValueError(
            f"keep_alive {value!r} seconds is too large for Ollama; use -1 for forever"
        )


def parse_keep_alive(value: KeepAlive) -> float:
    """Return ``value`` in seconds as Ollama will read it; ``FOREVER`` for a negative one.

    Raises ``ValueError`` (with what to write instead) for what Ollama would
    reject. The scheduler compares these numbers; the wire form comes from
    :func:`format_keep_alive`.
    """
    if isinstance(value, bool):  # bool is an int in Python, not in Go's JSON decoder
        raise ValueError(f"keep_alive {value!r} is a boolean; {_HINT}")
    if isinstance(value, int | float):
        _check_number(value)
        return FOREVER if value < 0 else float(value)
    if isinstance(value, str):
        ns = parse_go_duration(value)
        return FOREVER if ns < 0 else ns / _NS_PER_S
    raise ValueError(
        f"keep_alive must be a number or a duration string, not {type(value).__name__}"
    )


def format_keep_alive(value: KeepAlive) -> int | float | str:
    """Validate ``value`` and return what to put in the request's ``keep_alive`` field.

    Strings go out as written (Ollama parses them itself; rewriting them would
    only make the request log disagree with the config). Numbers are seconds: a
    whole float is sent as an int, and any negative as ``-1`` (Ollama treats
    every negative alike, and its own Go client sends ``-1``).
    """
    parse_keep_alive(value)  # raises ValueError with a hint
    if isinstance(value, str):
        return value
    if value < 0:
        return -1
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value
