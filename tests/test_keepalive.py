"""keep_alive as Ollama reads it: numbers are seconds, strings are Go durations."""

from __future__ import annotations

import math

import pytest

from ihld.backends.keepalive import (
    FOREVER,
    format_keep_alive,
    parse_go_duration,
    parse_keep_alive,
)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (0, 0.0),
        (300, 300.0),
        (0.5, 0.5),  # Ollama: t * float64(time.Second), fractions kept
        (1800.0, 1800.0),
        (-1, FOREVER),
        (-0.001, FOREVER),
        ("0", 0.0),  # Go's one unit-less string
        ("-0", 0.0),
        ("10m", 600.0),
        ("1h30m", 5400.0),
        ("24h", 86400.0),
        ("-1m", FOREVER),
        ("500ms", 0.5),
        ("5ms", 0.005),
        ("1.5h", 5400.0),
        (".5s", 0.5),
        ("1.s", 1.0),
        ("+10s", 10.0),
        ("1h0m0.25s", 3600.25),
        ("300us", 0.0003),
        ("300µs", 0.0003),  # MICRO SIGN
        ("300μs", 0.0003),  # GREEK SMALL LETTER MU
        ("1000000ns", 0.001),
        ("2562047h", 2562047 * 3600.0),  # within Go's ~292 years
    ],
)
def test_parse_accepts_what_ollama_accepts(value: float | int | str, seconds: float) -> None:
    assert parse_keep_alive(value) == pytest.approx(seconds)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("3600", "has no unit"),
        ("-1", "has no unit"),  # a string -1 is a 400; the number -1 is "forever"
        ("1.5", "has no unit"),
        ("10m5", "has no unit"),
        ("", "empty"),
        ("-", "empty"),
        ("1d", "unknown unit"),
        ("10M", "unknown unit"),  # units are case-sensitive in Go
        ("1H", "unknown unit"),
        ("10 m", "unknown unit"),
        (" 10m", "expected a number"),
        ("10m ", "unknown unit"),
        ("m", "expected a number"),
        (".s", "without digits"),
        ("forever", "expected a number"),
        ("2562048h", "overflows"),
        ("99999999999999999999ns", "overflows"),
    ],
)
def test_parse_rejects_what_ollama_rejects(value: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment) as info:
        parse_keep_alive(value)
    assert repr(value) in str(info.value)  # the message quotes the bad value


def test_unitless_string_message_says_what_to_write() -> None:
    with pytest.raises(ValueError) as info:
        parse_keep_alive("3600")
    text = str(info.value)
    assert "400" in text
    assert "30m" in text and "1800" in text


@pytest.mark.parametrize("value", [True, False, math.nan, math.inf, -math.inf, 1e12])
def test_parse_rejects_bad_numbers(value: float) -> None:
    with pytest.raises(ValueError):
        parse_keep_alive(value)


def test_parse_rejects_other_types() -> None:
    with pytest.raises(ValueError, match="number or a duration string"):
        parse_keep_alive(None)  # type: ignore[arg-type]


def test_go_duration_in_nanoseconds() -> None:
    assert parse_go_duration("1h2m3.5s") == 3_723_500_000_000
    assert parse_go_duration("-1.5m") == -90_000_000_000
    assert parse_go_duration("1.0000000009s") == 1_000_000_000  # sub-ns truncated, as Go
    assert parse_go_duration("-2562047h47m16.854775808s") == -(1 << 63)  # Go's minimum


@pytest.mark.parametrize(
    ("value", "wire"),
    [
        (300, 300),
        (0, 0),
        (0.5, 0.5),
        (1800.0, 1800),  # whole floats go out as ints
        (-1, -1),
        (-5.5, -1),  # every negative is "forever"; Ollama's client sends -1
        ("10m", "10m"),  # strings go out as written
        ("-1m", "-1m"),
        ("0", "0"),
    ],
)
def test_format_keep_alive(value: float | int | str, wire: float | int | str) -> None:
    out = format_keep_alive(value)
    assert out == wire
    assert type(out) is type(wire)


@pytest.mark.parametrize("value", ["3600", "-1", "1d", True])
def test_format_rejects_invalid(value: str | bool) -> None:
    with pytest.raises(ValueError):
        format_keep_alive(value)
