"""Strict JSON: the traps Python's json lets through are rejected with a reason."""

from __future__ import annotations

import pytest

from ihld.common import jsonsafe


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('{"a": NaN}', "NaN"),
        ('{"a": Infinity}', "Infinity"),
        ('{"a": 1, "a": 2}', "duplicate key 'a'"),
        ("[" * 200 + "]" * 200, "nesting deeper"),
        ('{"a": "\\ud800"}', "lone surrogate"),
        ('{"a": ', "malformed JSON"),
        ("   ", "empty"),
    ],
)
def test_rejects(text: str, needle: str) -> None:
    with pytest.raises(jsonsafe.StrictJSONError) as info:
        jsonsafe.loads(text)
    assert needle in str(info.value)


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"\xef\xbb\xbf{}", "byte-order mark"),
        ('{"a": 1}'.encode("utf-16"), "UTF-16"),
        (b"{\x00}", "NUL"),
        (b'{"a": "\xff"}', "invalid byte 0xff at offset 7"),
    ],
)
def test_decode_rejects(data: bytes, needle: str) -> None:
    with pytest.raises(jsonsafe.StrictJSONError) as info:
        jsonsafe.decode_text(data)
    assert needle in str(info.value)


def test_accepts_ordinary_json_with_escaped_pairs() -> None:
    value = jsonsafe.loads('{"emoji": "\\ud83d\\ude00", "n": [1, 2.5, null, true]}')
    assert value == {"emoji": "😀", "n": [1, 2.5, None, True]}


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    assert jsonsafe.loads('{"a": "' + "[" * 500 + '"}')["a"] == "[" * 500
