"""A minimal JSON-schema validator for structured model replies.

Ollama's ``format`` constrains generation to a schema, but a model can still
stop early (``done_reason: length``), and not every server enforces every
keyword. So ihld checks the parsed reply itself before calling it a stage's
output. Only the keywords that the ``format`` schemas people write for LLM
replies use are supported; unknown keywords are ignored rather than rejected,
so a richer schema still works as a constraint for the server.

Supported: ``type`` (a name or a list of names), ``enum``, ``const``,
``properties``, ``required``, ``additionalProperties`` (bool or schema),
``items`` (one schema), ``minItems``/``maxItems``, ``minLength``/``maxLength``,
``minimum``/``maximum``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

_IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MAX_PROBLEMS = 50  # a hopeless reply should not produce a megabyte of errors


def validate_schema(value: Any, schema: Mapping[str, Any], path: str = "$") -> list[str]:
    """Check ``value`` against ``schema``; return ``"<path>: <problem>"`` lines, empty if valid.

    Paths are JSONPath-like (``$.verdict.score``, ``$.items[2]``) so a retry
    log says exactly which part of the reply was wrong.
    """
    problems: list[str] = []
    _validate(value, schema, path, problems)
    return problems[:MAX_PROBLEMS]


def json_type(value: Any) -> str:
    """The JSON type name of a decoded value (``integer`` for whole numbers)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "integer" if value.is_integer() else "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "array"
    if isinstance(value, Mapping):
        return "object"
    return type(value).__name__


def _is_type(value: Any, name: str) -> bool:
    actual = json_type(value)
    if name == "number":
        return actual in ("integer", "number")
    return actual == name


def _json_equal(left: Any, right: Any) -> bool:
    """JSON equality: ``1 == 1.0`` but ``True != 1`` (Python says otherwise)."""
    if isinstance(left, bool) or isinstance(right, bool):
        return isinstance(left, bool) and isinstance(right, bool) and left == right
    if isinstance(left, int | float) and isinstance(right, int | float):
        return left == right
    if isinstance(left, Mapping) and isinstance(right, Mapping):
        return left.keys() == right.keys() and all(_json_equal(left[k], right[k]) for k in left)
    if isinstance(left, list | tuple) and isinstance(right, list | tuple):
        return len(left) == len(right) and all(map(_json_equal, left, right))
    return type(left) is type(right) and bool(left == right)


def _child(path: str, key: str) -> str:
    return f"{path}.{key}" if _IDENT_RE.match(key) else f"{path}[{key!r}]"


def _validate(value: Any, schema: Mapping[str, Any], path: str, problems: list[str]) -> None:
    if len(problems) >= MAX_PROBLEMS or not isinstance(schema, Mapping):
        return
    expected = schema.get("type")
    if expected is not None:
        names = [expected] if isinstance(expected, str) else list(expected)
        if not any(_is_type(value, str(name)) for name in names):
            problems.append(
                f"{path}: expected {' or '.join(map(str, names))}, got {json_type(value)}"
            )
            return  # the other keywords would only repeat the same mistake
    if "enum" in schema and not any(_json_equal(value, option) for option in schema["enum"]):
        allowed = ", ".join(repr(option) for option in schema["enum"])
        problems.append(f"{path}: {value!r} is not one of {allowed}")
    if "const" in schema and not _json_equal(value, schema["const"]):
        problems.append(f"{path}: must be {schema['const']!r}")
    kind = json_type(value)
    if kind == "object":
        _validate_object(value, schema, path, problems)
    elif kind == "array":
        _validate_array(value, schema, path, problems)
    elif kind == "string":
        _check_bounds(len(value), schema, "minLength", "maxLength", "characters", path, problems)
    elif kind in ("integer", "number") and math.isfinite(value):
        if "minimum" in schema and value < schema["minimum"]:
            problems.append(f"{path}: {value} is less than the minimum {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            problems.append(f"{path}: {value} is more than the maximum {schema['maximum']}")


def _validate_object(
    value: Mapping[str, Any], schema: Mapping[str, Any], path: str, problems: list[str]
) -> None:
    for key in schema.get("required", ()):
        if key not in value:
            problems.append(f"{_child(path, str(key))}: required but missing")
    properties = schema.get("properties", {})
    extra = schema.get("additionalProperties", True)
    for key, item in value.items():
        if key in properties:
            _validate(item, properties[key], _child(path, key), problems)
        elif extra is False:
            problems.append(f"{_child(path, key)}: unexpected property")
        elif isinstance(extra, Mapping):
            _validate(item, extra, _child(path, key), problems)


def _validate_array(
    value: list[Any], schema: Mapping[str, Any], path: str, problems: list[str]
) -> None:
    _check_bounds(len(value), schema, "minItems", "maxItems", "items", path, problems)
    items = schema.get("items")
    if isinstance(items, Mapping):
        for index, item in enumerate(value):
            _validate(item, items, f"{path}[{index}]", problems)


def _check_bounds(
    size: int,
    schema: Mapping[str, Any],
    low: str,
    high: str,
    unit: str,
    path: str,
    problems: list[str],
) -> None:
    if low in schema and size < schema[low]:
        problems.append(f"{path}: {size} {unit}, fewer than {low} {schema[low]}")
    if high in schema and size > schema[high]:
        problems.append(f"{path}: {size} {unit}, more than {high} {schema[high]}")
