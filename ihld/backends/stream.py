"""Reading a response body: NDJSON/SSE lines with a size cap, idle and first-byte timeouts."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp

from ihld.backends.base import BackendError, Effect


class ProtocolError(BackendError):
    """The server answered, but not as its API does (wrong shape, wrong done_reason).

    Fails the stage: asking the same server again gets the same answer. Usually the
    URL points at something that speaks another API, or a server too old for ihld.
    """

    effect: Effect = "stage"
    kind = "protocol_error"


class ReadTimeout(BackendError):
    """The server accepted the request but sent nothing within the allowed time.

    Counts an attempt: a server that answers its health probe but never this
    request (a wedged runner) must not hold the stage for ever.
    """

    kind = "read_timeout"


# A streamed chunk is one token or so; a line this long means something is wrong.
DEFAULT_MAX_LINE_BYTES = 16 * 1024 * 1024


class NdjsonLines:
    """Split a byte stream into lines, whatever the chunking (NDJSON, or SSE's lines).

    aiohttp's ``readline`` raises on lines over twice its read buffer (128 KiB
    by default); a final chunk or a long thinking trace may be longer, so the
    buffering is done here with an explicit, generous limit. Only bytes not yet
    searched are scanned for a newline, so a long line costs linear time.
    """

    def __init__(self, max_line_bytes: int = DEFAULT_MAX_LINE_BYTES) -> None:
        self._buf = bytearray()
        self._scanned = 0  # bytes at the start of _buf known to hold no newline
        self._max = max_line_bytes

    def feed(self, data: bytes) -> list[bytes]:
        """Add ``data``; return the lines it completed, without ``\\n``/``\\r``, blanks dropped."""
        self._buf += data
        lines: list[bytes] = []
        start = 0
        search_from = self._scanned
        while (nl := self._buf.find(b"\n", search_from)) >= 0:
            if nl - start > self._max:
                raise ValueError(f"a line exceeds {self._max} bytes")
            line = bytes(self._buf[start:nl]).rstrip(b"\r")
            if line.strip():
                lines.append(line)
            start = search_from = nl + 1
        if start:
            del self._buf[:start]
        self._scanned = len(self._buf)
        if self._scanned > self._max:
            raise ValueError(f"a line exceeds {self._max} bytes without a newline")
        return lines

    def finish(self) -> list[bytes]:
        """The last line, if the stream ended without a newline (gin's ``c.JSON`` adds none)."""
        rest = bytes(self._buf).strip()
        self._buf.clear()
        self._scanned = 0
        return [rest] if rest else []


async def read_capped(content: aiohttp.StreamReader, limit: int) -> bytes:
    """Read up to ``limit`` bytes or to EOF (``read(n)`` may return after the first chunk)."""
    buf = bytearray()
    while len(buf) < limit:
        chunk = await content.read(limit - len(buf))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


@dataclass
class Streamed:
    """What one successful chat attempt produced."""

    content: str
    done_reason: str
    metrics: dict[str, int]
    first_byte_s: float
    thinking: str = ""


class BodyReader:
    """One attempt's response body, read as it arrives, and when its first byte came.

    Made before the request is sent (``t0``), so that a failure can say
    whether output had started: before, it is an outage; after, a broken
    stream. Read a body once, with ``lines`` or ``whole``.
    """

    def __init__(
        self, who: str, max_line_bytes: int, *, idle_s: float, first_byte_s: float | None = None
    ) -> None:
        """``idle_s``: the longest silence between chunks; ``first_byte_s``: how long the
        server may take to its first chunk (a request waiting at the server for a slot or
        a load), from now; None: ``idle_s`` applies to the first chunk too."""
        self.t0 = time.monotonic()
        self.first_byte_s: float | None = None
        self.first_deadline = self.t0 + max(idle_s, first_byte_s or 0.0)
        self._idle_s = idle_s
        self._who = who
        self._splitter = NdjsonLines(max_line_bytes)
        self._pending: deque[bytes] = deque()
        self._chunks: AsyncIterator[bytes] | None = None

    @property
    def started(self) -> bool:
        """Whether any of the body has arrived."""
        return self.first_byte_s is not None

    def lines(self, content: aiohttp.StreamReader) -> AsyncIterator[bytes]:
        """The body's non-blank lines, each as soon as the chunk completing it arrives.

        A line over ``max_line_bytes`` raises ``ProtocolError``; the last line
        needs no newline. (An iterator object, not a generator: leaving the
        loop early leaves nothing to finalise.)
        """
        self._chunks = content.iter_any()
        return self

    async def whole(self, content: aiohttp.StreamReader, limit: int) -> bytes:
        """The body at once, up to ``limit`` bytes (a reply that is not streamed)."""
        raw = await read_capped(content, limit)
        if raw:
            self._arrived()
        return raw

    def __aiter__(self) -> BodyReader:
        return self

    async def __anext__(self) -> bytes:
        while not self._pending:
            if self._chunks is None:
                raise StopAsyncIteration
            try:
                async with asyncio.timeout(self._silence_allowed()):
                    chunk = await anext(self._chunks)
            except StopAsyncIteration:
                self._chunks = None
                self._pending.extend(self._splitter.finish())
                continue
            self._arrived()
            try:
                self._pending.extend(self._splitter.feed(chunk))
            except ValueError as exc:
                raise ProtocolError(f"{self._who}: {exc}") from None
        return self._pending.popleft()

    def _silence_allowed(self) -> float:
        """Until the first byte, what is left of the first-byte allowance; then ``idle_s``."""
        if self.first_byte_s is None:
            return max(self._idle_s, self.first_deadline - time.monotonic())
        return self._idle_s

    def _arrived(self) -> None:
        if self.first_byte_s is None:
            self.first_byte_s = time.monotonic() - self.t0
