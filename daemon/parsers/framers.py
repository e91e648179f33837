"""How a response body is cut into the values a parser reads: SSE events, a JSON array streamed
element by element, JSON lines, or one whole JSON body (held up to a limit, salvaged past it).

Each framer feeds its parser (llmtap.parsers.base.ResponseParser) as values complete; none
buffers a stream beyond the event it is in.
"""

from __future__ import annotations

import contextlib
import json
import re
from typing import TYPE_CHECKING, Any

from llmtap import jsontext
from llmtap.parsers.sse import JSONLinesDecoder, JSONStreamDecoder, SSEDecoder

if TYPE_CHECKING:
    from llmtap.parsers.base import ResponseParser


class Framer:
    def __init__(self, parser: ResponseParser) -> None:
        self.parser = parser

    def feed(self, data: bytes) -> None:
        raise NotImplementedError

    def end(self) -> None:
        """End of body; raise ParseStop if the framing itself was cut short."""

    def incomplete(self) -> str | None:
        return None

    def only_end_missing(self) -> bool:
        """Whether only the framing's own end is missing: every event that began has ended."""
        return False


class SSEFramer(Framer):
    def __init__(self, parser: ResponseParser) -> None:
        super().__init__(parser)
        self.decoder = SSEDecoder(parser.limits.max_event_bytes)

    def feed(self, data: bytes) -> None:
        for event in self.decoder.feed(data):
            self.parser.events += 1
            self.parser.on_event(event)

    def incomplete(self) -> str | None:
        return "stream ended inside an SSE event" if self.decoder.pending else None


class ArrayFramer(Framer):
    def __init__(self, parser: ResponseParser) -> None:
        super().__init__(parser)
        self.decoder = JSONStreamDecoder(parser.limits.max_event_bytes)

    def feed(self, data: bytes) -> None:
        for value in self.decoder.feed(data):
            self.parser.events += 1
            self.parser.on_object(value)

    def incomplete(self) -> str | None:
        if self.decoder.complete:
            return None
        return "JSON stream ended before its closing bracket"

    def only_end_missing(self) -> bool:
        return self.decoder.only_end_missing


class LinesFramer(Framer):
    def __init__(self, parser: ResponseParser) -> None:
        super().__init__(parser)
        self.decoder = JSONLinesDecoder(parser.limits.max_event_bytes)

    def feed(self, data: bytes) -> None:
        for value in self.decoder.feed(data):
            self.parser.events += 1
            self.parser.on_object(value)

    def end(self) -> None:
        self.feed(b"\n")  # a last line without its newline


class BodyFramer(Framer):
    """Holds a whole body up to a limit; past it keeps head and tail to salvage usage from."""

    HEAD = 64 * 1024
    TAIL = 256 * 1024

    def __init__(self, parser: ResponseParser) -> None:
        super().__init__(parser)
        self.buf = bytearray()
        self.head = b""
        self.size = 0

    def feed(self, data: bytes) -> None:
        self.size += len(data)
        self.buf += data
        if self.size <= self.parser.limits.max_json_body_bytes:
            return
        if not self.head:
            self.head = bytes(self.buf[: self.HEAD])
        del self.buf[: max(0, len(self.buf) - self.TAIL)]

    def end(self) -> None:
        if self.head:
            salvage(self.parser, self.head, bytes(self.buf))
            return
        if not self.buf.strip():
            return  # an empty body (204, HEAD) has nothing to parse
        try:
            obj = jsontext.parse(self.buf)
        except ValueError as exc:
            self.parser.on_body_fallback(bytes(self.buf), exc)
            return
        self.parser.events += 1
        self.parser.on_object(obj)


_HEAD_FIELD = re.compile(rb'"(type|object|model|modelVersion|status)"\s*:\s*"([^"\\]{0,200})"')
_TAIL_USAGE = re.compile(rb'"(usage|usageMetadata)"\s*:\s*\{')


def salvage(parser: ResponseParser, head: bytes, tail: bytes) -> None:
    """Best effort on a body too large to hold: identity from its head, usage from its tail."""
    obj: dict[str, Any] = {}
    for match in _HEAD_FIELD.finditer(head):
        obj.setdefault(match.group(1).decode(), match.group(2).decode("utf-8", "replace"))
    usage_at = list(_TAIL_USAGE.finditer(tail))
    if usage_at:
        last = usage_at[-1]
        text = tail[last.end() - 1 :].decode("utf-8", errors="replace")
        with contextlib.suppress(ValueError):
            obj[last.group(1).decode()] = json.JSONDecoder().raw_decode(text)[0]
    parser.on_object(obj)
    parser.fail(f"body over {parser.limits.max_json_body_bytes} bytes: parsed best-effort")


def make_framer(kind: str, parser: ResponseParser) -> Framer:
    framers: dict[str, type[Framer]] = {
        "sse": SSEFramer,
        "array": ArrayFramer,
        "lines": LinesFramer,
        "body": BodyFramer,
    }
    return framers[kind](parser)
