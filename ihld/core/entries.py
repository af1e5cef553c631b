"""Reading a job file into entries: one per ``.json`` file, one per ``.jsonl`` line.

Each entry is a job spec or the error that rejects it (with the line number).
A line that an intake format recognises (``ihld.core.formats``) becomes a spec
through that format and keeps the format's name and tag.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from ihld.common import jsonsafe
from ihld.common.errors import JobError
from ihld.core.formats import IntakeFormat
from ihld.core.jobs import JobSpec, default_id_for, parse_document


@dataclass(frozen=True)
class Entry:
    """One job read from a file: either a spec or the error that rejected it."""

    default_id: str
    line: int | None  # 1-based line for JSON Lines, None for a .json file
    spec: JobSpec | None = None
    error: JobError | None = None
    raw: str = ""  # the line's text (JSON Lines) for error records
    format: str | None = None  # the intake format that read the line; None: an ihld job
    tag: dict[str, Any] = field(default_factory=dict)  # what that format keeps of the line

    @property
    def job_id(self) -> str:
        if self.spec is not None and self.spec.id:
            return self.spec.id
        return self.default_id


def read_entries(
    stem: str, suffix: str, data: bytes, formats: Sequence[IntakeFormat] = ()
) -> Iterator[Entry]:
    """Split a job file into entries: one for ``.json``, one per non-blank line for ``.jsonl``."""
    default = default_id_for(stem)
    try:
        text = jsonsafe.decode_text(data)  # the whole file must be UTF-8 (checked in C)
    except jsonsafe.StrictJSONError as exc:
        yield Entry(default, None, error=JobError(str(exc), kind=exc.kind))
        return
    if suffix == ".json":
        yield _entry(default, None, text, ())
        return
    del text  # a million-line file is read line by line: no list of a million strings
    seen_any = False
    for number, raw in enumerate(_lines(data), start=1):
        line = raw.decode("utf-8")
        if not line.strip():
            continue
        seen_any = True
        yield _entry(f"{default}.{number}", number, line, formats)
    if not seen_any:
        yield Entry(default, None, error=JobError("empty file: no job lines", kind="empty"))


def _lines(data: bytes) -> Iterator[bytes]:
    """The lines of ``data``, split at ``\\n`` only (JSON may hold U+2028 in a string)."""
    start, end = 0, len(data)
    while start < end:
        stop = data.find(b"\n", start)
        if stop < 0:
            stop = end
        yield data[start:stop]
        start = stop + 1


def _entry(default_id: str, line: int | None, text: str, formats: Sequence[IntakeFormat]) -> Entry:
    where = f"line {line}" if line is not None else ""
    raw = text[:4096]
    try:
        value = jsonsafe.loads(text)
    except jsonsafe.StrictJSONError as exc:
        msg = f"{where}: {exc}" if where else str(exc)
        return Entry(default_id, line, error=JobError(msg, kind=exc.kind), raw=raw)
    for fmt in formats:
        if not fmt.recognise(value):
            continue
        tag = fmt.tag(value)
        try:
            spec = fmt.to_spec(value)
        except JobError as exc:
            exc.args = (f"{where}: {exc}",)
            return Entry(default_id, line, error=exc, raw=raw, format=fmt.name, tag=tag)
        return Entry(default_id, line, spec=spec, raw=raw, format=fmt.name, tag=tag)
    try:
        spec = parse_document(value, where)
    except JobError as exc:
        return Entry(default_id, line, error=exc, raw=raw)
    return Entry(default_id, line, spec=spec, raw=raw)
