"""Incremental framing decoders: Server-Sent Events, a streamed JSON array, JSON lines.

Each decoder takes bytes in arbitrary pieces and returns what completed. Lines are split on raw
bytes (CR and LF never occur inside a UTF-8 multibyte sequence), and only complete lines are
decoded, so a chunk boundary inside a character or between CR and LF changes nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from llmtap import jsontext

DEFAULT_MAX_EVENT_BYTES = 16 * 1024 * 1024
_BOM = b"\xef\xbb\xbf"
_EOL = re.compile(rb"\r\n|\r|\n")


class FramingError(ValueError):
    """The bytes cannot be framed: an oversized event, or a malformed JSON stream."""


@dataclass(frozen=True, slots=True)
class Event:
    """One dispatched SSE event (WHATWG HTML "server-sent events" semantics)."""

    event: str
    data: str
    id: str | None = None
    retry: int | None = None


def next_line(buf: bytearray | bytes, pos: int) -> tuple[int, int, bool] | None:
    """(end of the line's text, start of the next line, ends in a lone CR at the buffer's end).

    None when no complete line is buffered from `pos`. A CR as the last buffered byte ends a line;
    the caller must then skip an LF that may start the next chunk (the CRLF was split).
    """
    match = _EOL.search(buf, pos)
    if match is None:
        return None
    dangling_cr = match.group() == b"\r" and match.end() == len(buf)
    return match.start(), match.end(), dangling_cr


class LineSplitter:
    """Complete lines (without their ends) out of arbitrary chunks, CR/LF/CRLF alike."""

    def __init__(self, max_line_bytes: int) -> None:
        self.max_line_bytes = max_line_bytes
        self._buf = bytearray()
        self._skip_lf = False
        self._searched = 0  # the buffered bytes before this hold no line end

    @property
    def pending(self) -> bool:
        return bool(self._buf)

    def feed(self, chunk: bytes) -> list[bytes]:
        if self._skip_lf and chunk:
            self._skip_lf = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        self._buf += chunk
        if self._buf.find(b"\r", self._searched) == -1:  # LF only, as providers send: one split
            return self._split_lf()
        lines: list[bytes] = []
        start, search_from = 0, self._searched
        while (found := next_line(self._buf, search_from)) is not None:
            end, next_start, self._skip_lf = found
            lines.append(bytes(self._buf[start:end]))
            start = search_from = next_start
        del self._buf[:start]
        self._searched = len(self._buf)  # a long line in many chunks is scanned once
        self._check_size()
        return lines

    def _split_lf(self) -> list[bytes]:
        if self._buf.find(b"\n", self._searched) == -1:
            self._searched = len(self._buf)
            self._check_size()
            return []
        *lines, rest = self._buf.split(b"\n")
        self._buf = rest
        self._searched = len(rest)
        self._check_size()
        return [bytes(line) for line in lines]

    def _check_size(self) -> None:
        if len(self._buf) > self.max_line_bytes:
            raise FramingError(f"line over {self.max_line_bytes} bytes")


class SSEDecoder:
    """`feed(bytes) -> list[Event]`: CRLF/LF/CR line ends, multi-line data, comments, BOM."""

    def __init__(self, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        self.max_event_bytes = max_event_bytes
        self.comments = 0
        self._lines = LineSplitter(max_event_bytes)
        self._head = bytearray()  # the stream's first bytes, until a BOM can be ruled out
        self._started = False
        self._event_type = ""
        self._data: list[str] = []
        self._event_size = 0
        self._last_id: str | None = None
        self._retry: int | None = None

    @property
    def pending(self) -> bool:
        """Whether a partial line or an undispatched event is buffered (a truncated stream)."""
        return self._lines.pending or bool(self._data) or bool(self._event_type)

    def feed(self, chunk: bytes) -> list[Event]:
        chunk = self._strip_bom(chunk)
        events: list[Event] = []
        for line in self._lines.feed(chunk):
            event = self._line(line)
            if event is not None:
                events.append(event)
        return events

    def _strip_bom(self, chunk: bytes) -> bytes:
        """Drops a leading UTF-8 BOM, even one split across chunks."""
        if self._started:
            return chunk
        self._head += chunk
        if len(self._head) < len(_BOM) and _BOM.startswith(self._head):
            return b""
        self._started = True
        head = bytes(self._head)
        self._head.clear()
        return head[len(_BOM) :] if head.startswith(_BOM) else head

    def _line(self, raw: bytes) -> Event | None:
        if not raw:
            return self._dispatch()
        self._event_size += len(raw)
        if self._event_size > self.max_event_bytes:
            raise FramingError(f"SSE event over {self.max_event_bytes} bytes")
        line = raw.decode("utf-8", errors="replace")
        if line.startswith(":"):
            self.comments += 1
            return None
        name, _, value = line.partition(":")
        self._field(name, value[1:] if value.startswith(" ") else value)
        return None

    def _field(self, name: str, value: str) -> None:
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event_type = value
        elif name == "id" and "\0" not in value:
            self._last_id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self._retry = int(value)
        # Any other field is ignored, as the standard says.

    def _dispatch(self) -> Event | None:
        data, event_type = self._data, self._event_type
        self._data, self._event_type, self._event_size = [], "", 0
        if not data:  # an event with no data field is not dispatched
            return None
        return Event(event_type or "message", "\n".join(data), self._last_id, self._retry)


class JSONStreamDecoder:
    """Elements of a top-level JSON array arriving in pieces, e.g. Gemini's non-SSE stream.

    `[{...},\\r\\n{...}]` yields each object as soon as its closing brace arrives. A body that is a
    single object instead of an array (an error reply) yields that object. Elements must be objects
    or arrays, which is all Gemini sends; they are delimited by scanning braces outside strings.
    """

    _OUTSIDE = re.compile(rb'[{}\[\]"]')
    _INSIDE = re.compile(rb'["\\]')

    def __init__(self, max_element_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        self.max_element_bytes = max_element_bytes
        self.complete = False  # the closing bracket (or the single object's end) was seen
        self._buf = bytearray()
        self._pos = 0
        self._depth = 0
        self._base = -1  # depth at which elements sit: 1 inside an array, 0 for a lone object
        self._in_string = False
        self._elem_start = -1
        self._expect_comma = False  # an element just ended: a comma or the closing bracket next

    @property
    def pending(self) -> bool:
        """Whether the stream stopped before the array (or object) was closed."""
        return not self.complete and (self._base >= 0 or bool(self._buf.strip()))

    @property
    def only_end_missing(self) -> bool:
        """Every element that began has ended: only the array's closing bracket did not come."""
        return (not self.complete and self._base == 1 and self._depth == 1
                and self._expect_comma and not self._in_string)

    def feed(self, chunk: bytes) -> list[Any]:
        self._buf += chunk
        values: list[Any] = []
        while self._pos < len(self._buf):
            if not self._step(values):
                break
        self._compact()
        return values

    def _step(self, values: list[Any]) -> bool:
        """Advances over one token; False when more bytes are needed."""
        if self._in_string:
            return self._string()
        if self.complete or self._base < 0 or self._depth == self._base:
            return self._between(values)
        match = self._OUTSIDE.search(self._buf, self._pos)
        if match is None:
            self._pos = len(self._buf)
            return False
        self._pos = match.end()
        self._token(match.group(), values)
        return True

    def _string(self) -> bool:
        match = self._INSIDE.search(self._buf, self._pos)
        if match is None:
            self._pos = len(self._buf)
            return False
        if match.group() == b"\\":
            if match.end() >= len(self._buf):  # the escaped byte has not arrived yet
                self._pos = match.start()
                return False
            self._pos = match.end() + 1
            return True
        self._pos = match.end()
        self._in_string = False
        return True

    def _token(self, token: bytes, values: list[Any]) -> None:
        if token == b'"':
            self._in_string = True
        elif token in (b"{", b"["):
            self._depth += 1
        else:
            self._depth -= 1
            if self._depth == self._base:
                values.append(self._element())

    def _between(self, values: list[Any]) -> bool:
        """Outside any element: the opening bracket, commas, whitespace, an element's start."""
        byte = bytes(self._buf[self._pos : self._pos + 1])
        if byte in (b" ", b"\t", b"\r", b"\n"):
            self._pos += 1
        elif self.complete:
            raise FramingError("data after the end of the JSON stream")
        elif byte == b"," and self._base == 1 and self._expect_comma:
            self._pos += 1
            self._expect_comma = False
        elif self._base < 0:
            self._open(byte)
        elif byte == b"]" and self._base == 1:
            self._pos += 1
            self._depth = 0
            self.complete = True
        elif byte in (b"{", b"[") and not self._expect_comma:
            self._elem_start = self._pos
            self._pos += 1
            self._depth += 1
        else:
            raise FramingError(f"unexpected {byte!r} in JSON stream")
        return True

    def _open(self, byte: bytes) -> None:
        if byte == b"[":
            self._base = self._depth = 1
            self._pos += 1
        elif byte == b"{":
            self._base = 0
        else:
            raise FramingError(f"JSON stream starts with {byte!r}")

    def _element(self) -> Any:
        raw = bytes(self._buf[self._elem_start : self._pos])
        self._elem_start = -1
        self._expect_comma = True
        if self._base == 0:
            self.complete = True
        return jsontext.parse(raw)

    def _compact(self) -> None:
        """Drops consumed bytes so memory stays bounded by one element."""
        keep_from = self._elem_start if self._elem_start >= 0 else self._pos
        if keep_from:
            del self._buf[:keep_from]
            self._pos -= keep_from
            if self._elem_start >= 0:
                self._elem_start = 0
        if len(self._buf) > self.max_element_bytes:
            raise FramingError(f"JSON stream element over {self.max_element_bytes} bytes")


class JSONLinesDecoder:
    """One JSON value per non-blank line (JSONL), e.g. Anthropic's message batch results."""

    def __init__(self, max_line_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        self._lines = LineSplitter(max_line_bytes)

    @property
    def pending(self) -> bool:
        return self._lines.pending

    def feed(self, chunk: bytes) -> list[Any]:
        return [jsontext.parse(line) for line in self._lines.feed(chunk) if line.strip()]

    def close(self) -> list[Any]:
        """The last line, when the body does not end with a newline."""
        return self.feed(b"\n")
