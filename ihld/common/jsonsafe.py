"""Strict JSON decoding for untrusted job files.

Python's ``json`` accepts NaN/Infinity and duplicate keys silently, raises
``RecursionError`` on deep nesting and lets lone surrogates through (which
later crash a UTF-8 write of the result or the log). Job files come from
anyone who can write to the inbox, so all of that is rejected here, with a
message that says what and where.
"""

from __future__ import annotations

import json
import math
from typing import Any

MAX_DEPTH = 64
MAX_INT_DIGITS = 4300  # CPython's own int/str conversion limit


class StrictJSONError(ValueError):
    """The text is not strict JSON; ``kind`` classifies why (for error files and tests)."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


def _reject_constant(name: str) -> Any:
    raise StrictJSONError(f"{name} is not valid JSON (numbers must be finite)", "invalid_json")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):  # 1e999 overflows to inf, which no result file may hold
        raise StrictJSONError(f"number {text[:40]} is out of range (not finite)", "invalid_json")
    return value


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise StrictJSONError(
            f"integer of {len(text.lstrip('-'))} digits is longer than {MAX_INT_DIGITS}",
            "invalid_json",
        )
    return int(text)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise StrictJSONError(f"duplicate key {key!r}", "invalid_json")
        out[key] = value
    return out


def _check(value: Any, depth: int, where: str) -> None:
    if depth > MAX_DEPTH:
        raise StrictJSONError(f"nesting deeper than {MAX_DEPTH} levels at {where}", "invalid_json")
    if isinstance(value, str):
        _check_text(value, where)
    elif isinstance(value, dict):
        for key, item in value.items():
            _check_text(key, where)
            _check(item, depth + 1, f"{where}.{key}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check(item, depth + 1, f"{where}[{index}]")


def _check_text(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise StrictJSONError(
            f"lone surrogate escape in a string at {where} (not encodable as UTF-8)",
            "invalid_json",
        ) from None


def _quick_depth(text: str) -> int:
    """Bracket depth, ignoring strings: rejects deep nesting before the parser recurses.

    Fewer opening brackets than the limit cannot nest deeper: counted in C, that
    spares the character loop for nearly every job line.
    """
    opening = text.count("[") + text.count("{")
    if opening <= MAX_DEPTH:
        return opening
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in "]}":
            depth -= 1
    return deepest


def decode_text(data: bytes) -> str:
    """Bytes to text: UTF-8 only; a BOM or UTF-16 gets a message saying so."""
    if data.startswith(b"\xef\xbb\xbf"):
        raise StrictJSONError(
            "file starts with a UTF-8 byte-order mark; save it without BOM", "encoding"
        )
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise StrictJSONError("file is UTF-16; job files must be UTF-8", "encoding")
    if b"\x00" in data:
        raise StrictJSONError("file contains NUL bytes (binary, not JSON text)", "encoding")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise StrictJSONError(
            f"not UTF-8: invalid byte 0x{data[exc.start]:02x} at offset {exc.start}", "encoding"
        ) from None


def loads(text: str) -> Any:
    """Parse one strict JSON document."""
    if not text.strip():
        raise StrictJSONError("empty document", "empty")
    if _quick_depth(text) > MAX_DEPTH:
        raise StrictJSONError(f"nesting deeper than {MAX_DEPTH} levels", "invalid_json")
    try:
        value = json.loads(
            text,
            parse_constant=_reject_constant,
            parse_float=_finite_float,
            parse_int=_bounded_int,
            object_pairs_hook=_no_duplicates,
        )
    except StrictJSONError:
        raise
    except json.JSONDecodeError as exc:
        raise StrictJSONError(
            f"malformed JSON: {exc.msg} at line {exc.lineno} column {exc.colno}", "invalid_json"
        ) from None
    except RecursionError:
        raise StrictJSONError("nesting too deep", "invalid_json") from None
    except ValueError as exc:  # anything else the parser refuses is malformed input, not a bug
        raise StrictJSONError(f"malformed JSON: {exc}", "invalid_json") from None
    _check(value, 0, "$")
    return value


def dumps(value: Any, *, compact: bool = False) -> str:
    """Serialise strictly (no NaN); indented for people unless ``compact``."""
    if compact:
        return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return json.dumps(value, ensure_ascii=False, allow_nan=False, indent=2)
