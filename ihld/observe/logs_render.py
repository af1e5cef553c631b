"""One event as one JSON line, context merged, never crashing on the data it carries."""

from __future__ import annotations

import json
import math
import re
from datetime import datetime
from enum import Enum
from pathlib import PurePath
from typing import Any

from structlog.typing import EventDict, WrappedLogger

_CONTEXT_KEYS = ("job_id", "stage", "model", "backend")

_SURROGATE = re.compile("[\ud800-\udfff]")


def _json_default(obj: Any) -> Any:
    """Readable forms for the non-JSON types events commonly carry."""
    if isinstance(obj, PurePath):
        return str(obj)
    if isinstance(obj, datetime):
        return obj.isoformat()
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, set | frozenset):
        return list(obj)
    if isinstance(obj, bytes | bytearray):
        return bytes(obj).decode("utf-8", "backslashreplace")
    if isinstance(obj, BaseException):
        return f"{type(obj).__name__}: {obj}"
    return repr(obj)


def _dumps(obj: dict[str, Any]) -> bytes:
    """Compact JSON as UTF-8 bytes with a trailing newline; lone surrogates escaped.

    ``ensure_ascii=False`` keeps non-ASCII text readable in ``journalctl``, but
    then a lone surrogate passes through ``json.dumps`` and fails only at
    encoding time. Surrogates can only occur inside JSON string literals, so
    replacing each with its ``\\uXXXX`` escape yields the same JSON value.
    """
    text = json.dumps(
        obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"), default=_json_default
    )
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError:
        data = _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text).encode("utf-8")
    return data + b"\n"


def _describe(exc: BaseException) -> str:
    try:
        return f"{type(exc).__name__}: {exc}"
    except Exception:
        return type(exc).__name__


def _safe_repr(value: Any) -> Any:
    if value is None or isinstance(value, str | bool | int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    try:
        return repr(value)
    except Exception:
        return f"<unrepresentable {type(value).__name__}>"


def _render(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> bytes:
    """Final processor: timestamp, level and event first, then the rest, as one line.

    Never raises: anything ``json`` refuses (NaN, cycles, odd keys, a failing
    ``__repr__``) is re-rendered with every value as its repr and the reason
    in ``log_render_error``, so the event is degraded, not lost.
    """
    ordered: dict[str, Any] = {
        "timestamp": event_dict.pop("timestamp", None),
        "level": event_dict.pop("level", method_name),
        "event": event_dict.pop("event", None),
    }
    # The context keys next, so a human scanning journalctl finds them in one place.
    for key in _CONTEXT_KEYS:
        if key in event_dict:
            ordered[key] = event_dict.pop(key)
    ordered.update(event_dict)
    try:
        return _dumps(ordered)
    except Exception as exc:
        try:
            return _dumps(_degrade(ordered, exc))
        except Exception:  # a key whose str() raises, say: keep at least what happened
            return _dumps(
                {k: ordered[k] for k in ("timestamp", "level") if isinstance(ordered[k], str)}
                | {"event": _safe_repr(ordered["event"]), "log_render_error": "unrenderable"}
            )


def _degrade(event: dict[str, Any], exc: Exception) -> dict[str, Any]:
    """Keep every value JSON accepts; replace only the offending ones by their repr."""
    safe: dict[str, Any] = {}
    for key, value in event.items():
        try:
            json.dumps(value, allow_nan=False, default=_json_default)
        except Exception:
            value = _safe_repr(value)
        safe[str(key)] = value
    safe["log_render_error"] = _describe(exc)
    return safe
