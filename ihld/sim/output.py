"""What a simulated model "says": deterministic text, JSON and token counts.

Tests and benchmarks need answers they can predict: the same request gives
the same tokens every time, and a different request gives different ones.
Everything here is derived from a sha256 of the request (model, messages or
prompt, format, options.seed), never from a clock or a global random state.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

_VOCABULARY = (
    "the a model argues that evidence suggests however we should consider both "
    "sides of this question carefully because strong claims need support and "
    "weak ones fail under scrutiny so let us weigh each point in turn first "
    "second finally overall proposal critic judge agrees disagrees reason data "
    "cost risk benefit clear unclear likely unlikely plan result answer verdict "
    "test small large fast slow better worse simple complex true false open "
    "closed early late local remote batch queue job stage load token stream"
)
_WORDS: tuple[str, ...] = tuple(_VOCABULARY.split())

_JSON_DEPTH = 6


def prompt_tokens(chars: int) -> int:
    """Ollama-ish prompt size: about four characters a token, at least one."""
    return max(1, math.ceil(chars / 4))


class _Stream:
    """An endless deterministic byte stream: sha256(key || counter)."""

    def __init__(self, key: bytes) -> None:
        self._key = key
        self._counter = 0
        self._buf = b""

    def byte(self) -> int:
        if not self._buf:
            self._buf = hashlib.sha256(self._key + self._counter.to_bytes(8, "big")).digest()
            self._counter += 1
        b = self._buf[0]
        self._buf = self._buf[1:]
        return b

    def unit(self) -> float:
        """A float in [0, 1) from four bytes."""
        n = 0
        for _ in range(4):
            n = (n << 8) | self.byte()
        return n / 2**32

    def word(self) -> str:
        return _WORDS[(self.byte() << 8 | self.byte()) % len(_WORDS)]

    def words(self, n: int) -> str:
        return " ".join(self.word() for _ in range(n))


@dataclass(frozen=True)
class Output:
    """A planned answer: its tokens (their concatenation is the text) and why it stops."""

    tokens: tuple[str, ...]
    done_reason: str

    @property
    def text(self) -> str:
        return "".join(self.tokens)


def request_key(model: str, content: Any, fmt: Any, seed: Any) -> bytes:
    """The hash that fixes a request's answer."""
    blob = json.dumps([model, content, fmt, seed], sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode()).digest()


def plan_output(key: bytes, *, mean_tokens: int, fmt: Any, num_predict: int | None) -> Output:
    """Tokens for a request: prose around ``mean_tokens`` (±20 %), or JSON for ``format``.

    JSON answers are as long as prose ones: the first free-text string field
    carries the words, so a structured reply (a verdict with a reason) costs
    what a real model's would, not a handful of tokens.

    ``num_predict`` > 0 cuts the answer there with done_reason "length", as
    Ollama does (JSON cut this way is left invalid, as it is in Ollama).
    """
    stream = _Stream(key)
    count = max(1, round(mean_tokens * (0.8 + 0.4 * stream.unit())))
    if fmt is None or fmt == "":
        tokens = list(_prose(stream, count))
    else:
        tokens = _json_tokens(_json_text(stream, fmt, count))
    if num_predict is not None and 0 < num_predict < len(tokens):
        return Output(tuple(tokens[:num_predict]), "length")
    return Output(tuple(tokens), "stop")


def _prose(stream: _Stream, count: int) -> Iterator[str]:
    """``count`` word tokens in sentences of 6 to 17 words."""
    left_in_sentence = 0
    for i in range(count):
        if left_in_sentence == 0:
            left_in_sentence = 6 + stream.byte() % 12
            word = stream.word().capitalize()
        else:
            word = stream.word()
        left_in_sentence -= 1
        if left_in_sentence == 0 or i == count - 1:
            word += "."
        yield word if i == 0 else " " + word


def _json_tokens(text: str) -> list[str]:
    """JSON text in four-character pieces, about one token each."""
    return [text[i : i + 4] for i in range(0, len(text), 4)] or [""]


def _json_text(stream: _Stream, fmt: Any, budget: int) -> str:
    if isinstance(fmt, Mapping):
        value = _from_schema(stream, fmt, fmt, _JSON_DEPTH)
        field = _free_text_field(fmt, fmt, value)
    else:
        value = {"response": ""}
        field = "response"
    text = json.dumps(value, ensure_ascii=False)
    if field is not None:
        missing = budget - len(_json_tokens(text))
        if missing > 0:  # a word and its space are about 1.5 four-character tokens
            value[field] = ((value[field] + " ") if value[field] else "") + stream.words(
                max(1, round(missing / 1.5))
            )
            text = json.dumps(value, ensure_ascii=False)
    return text


def _free_text_field(schema: Mapping[str, Any], root: Mapping[str, Any], value: Any) -> str | None:
    """The first top-level string property without enum, pattern, format or maxLength."""
    if not isinstance(value, dict):
        return None
    properties = _resolve(schema, root).get("properties") or {}
    for name, sub in properties.items():
        if not isinstance(sub, Mapping) or name not in value:
            continue
        sub = _resolve(sub, root)
        if _schema_type(sub) != "string" or not isinstance(value[name], str):
            continue
        if any(k in sub for k in ("enum", "const", "pattern", "format", "maxLength")):
            continue
        return str(name)
    return None


def _resolve(schema: Mapping[str, Any], root: Mapping[str, Any]) -> Mapping[str, Any]:
    """Follow local ``$ref``s ("#/$defs/X", "#/definitions/X"), a few hops at most."""
    for _ in range(8):
        ref = schema.get("$ref")
        if not isinstance(ref, str) or not ref.startswith("#/"):
            return schema
        target: Any = root
        for part in ref[2:].split("/"):
            target = target.get(part) if isinstance(target, Mapping) else None
        if not isinstance(target, Mapping):
            return {}
        schema = target
    return schema


def _schema_type(schema: Mapping[str, Any]) -> str | None:
    t = schema.get("type")
    if isinstance(t, list):
        t = next((x for x in t if x != "null"), t[0] if t else None)
    if isinstance(t, str):
        return t
    if "properties" in schema:
        return "object"
    if "items" in schema:
        return "array"
    return None


def _from_schema(
    stream: _Stream, schema: Mapping[str, Any], root: Mapping[str, Any], depth: int
) -> Any:
    """A value that validates against ``schema`` (the common subset of JSON Schema)."""
    schema = _resolve(schema, root)
    if "const" in schema:
        return schema["const"]
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[0]
    for combo in ("anyOf", "oneOf", "allOf"):
        options = schema.get(combo)
        if isinstance(options, list) and options and isinstance(options[0], Mapping):
            if combo == "allOf":
                merged: dict[str, Any] = {}
                for part in options:
                    if isinstance(part, Mapping):
                        merged.update(_resolve(part, root))
                return _from_schema(stream, merged, root, depth)
            return _from_schema(stream, options[0], root, depth)
    kind = _schema_type(schema)
    if kind == "object":
        return _object(stream, schema, root, depth)
    if kind == "array":
        return _array(stream, schema, root, depth)
    if kind == "integer":
        return _integer(stream, schema)
    if kind == "number":
        return _number(stream, schema)
    if kind == "boolean":
        return stream.byte() % 2 == 0
    if kind == "null":
        return None
    return _string(stream, schema)


def _object(
    stream: _Stream, schema: Mapping[str, Any], root: Mapping[str, Any], depth: int
) -> dict[str, Any]:
    props = schema.get("properties")
    props = props if isinstance(props, Mapping) else {}
    required = schema.get("required")
    names = list(props)
    if isinstance(required, list):
        names += [r for r in required if isinstance(r, str) and r not in props]
    out: dict[str, Any] = {}
    for name in names:
        sub = props.get(name, {})
        if depth <= 0:
            out[name] = None
        else:
            out[name] = _from_schema(
                stream, sub if isinstance(sub, Mapping) else {}, root, depth - 1
            )
    return out


def _array(
    stream: _Stream, schema: Mapping[str, Any], root: Mapping[str, Any], depth: int
) -> list[Any]:
    items = schema.get("items")
    items = items if isinstance(items, Mapping) else {}
    low = schema.get("minItems")
    high = schema.get("maxItems")
    count = low if isinstance(low, int) and low > 0 else 2
    if isinstance(high, int):
        count = min(count, high)
    if depth <= 0:
        return []
    return [_from_schema(stream, items, root, depth - 1) for _ in range(max(0, count))]


def _num(schema: Mapping[str, Any], key: str) -> float | None:
    value = schema.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _integer(stream: _Stream, schema: Mapping[str, Any]) -> int:
    low, xlow = _num(schema, "minimum"), _num(schema, "exclusiveMinimum")
    high, xhigh = _num(schema, "maximum"), _num(schema, "exclusiveMaximum")
    lo = math.ceil(low) if low is not None else math.floor(xlow) + 1 if xlow is not None else 0
    if high is not None:
        hi = math.floor(high)
    elif xhigh is not None:
        hi = math.ceil(xhigh) - 1
    else:
        hi = lo + 10
    if hi < lo:
        return lo
    return lo + stream.byte() % (hi - lo + 1)


def _number(stream: _Stream, schema: Mapping[str, Any]) -> float:
    low = _num(schema, "minimum")
    low = low if low is not None else _num(schema, "exclusiveMinimum")
    high = _num(schema, "maximum")
    high = high if high is not None else _num(schema, "exclusiveMaximum")
    lo = low if low is not None else 0.0
    hi = high if high is not None else lo + 10.0
    if hi <= lo:
        return lo
    # Strictly inside the range, so exclusive bounds hold too.
    return lo + (hi - lo) * (0.25 + 0.5 * stream.unit())


def _string(stream: _Stream, schema: Mapping[str, Any]) -> str:
    text = stream.words(6)
    low = schema.get("minLength")
    high = schema.get("maxLength")
    if isinstance(low, int) and len(text) < low:
        text = (text + " ") * (low // max(1, len(text)) + 1)
        text = text[:low] if not isinstance(high, int) else text[: max(low, high)]
    if isinstance(high, int) and len(text) > high:
        text = text[:high]
    return text
