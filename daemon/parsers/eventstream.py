"""Incremental decoder of AWS's binary event-stream framing (`application/vnd.amazon.eventstream`),
which Bedrock's streaming operations (InvokeModelWithResponseStream, ConverseStream) reply in.

One message on the wire, all integers big-endian:

    total length (u32) | headers length (u32) | prelude CRC32 (u32, of the 8 bytes before it)
    headers: name length (u8), name (UTF-8), value type (u8), value (by type, below)
    payload (total - headers - 16 bytes)
    message CRC32 (u32, of every byte before it)

Header value types: 0 true and 1 false (no value), 2 byte, 3 short, 4 integer, 5 long (signed),
6 byte array and 7 string (u16 length, then the bytes), 8 timestamp (i64 ms), 9 UUID (16 bytes).

Both CRCs are checked and a message's size is capped before its bytes are buffered, so memory holds
at most one message (AWS's own limit is 16 MiB). A corrupt or oversized message raises
FramingError: after it no later boundary can be trusted, so the caller stops parsing there.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

from llmtap.parsers.sse import FramingError

CONTENT_TYPE = "application/vnd.amazon.eventstream"
PRELUDE = 12  # total length, headers length, prelude CRC
OVERHEAD = PRELUDE + 4  # and the message CRC
MAX_HEADERS_BYTES = 128 * 1024  # as botocore's decoder: a message's headers are a few names
HeaderValue = bool | int | bytes | str
# type byte -> (struct format of a fixed-size value, its size); 6 and 7 are length-prefixed
_FIXED: dict[int, tuple[str, int]] = {2: (">b", 1), 3: (">h", 2), 4: (">i", 4), 5: (">q", 8),
                                      8: (">q", 8), 9: ("16s", 16)}


@dataclass(frozen=True)
class Message:
    headers: dict[str, HeaderValue] = field(default_factory=dict)
    payload: bytes = b""

    def text(self, name: str) -> str | None:
        """A string header's value (`:message-type`, `:event-type`...), None if absent."""
        value = self.headers.get(name)
        return value if isinstance(value, str) else None


class EventStreamDecoder:
    """`feed(bytes)` gives the messages it completed; the bytes may come in any pieces."""

    def __init__(self, max_message_bytes: int = 16 * 1024 * 1024) -> None:
        self.max_message_bytes = max_message_bytes
        self._buf = bytearray()
        self._pos = 0

    @property
    def pending(self) -> bool:
        """Whether part of a message is buffered (a stream cut inside a message)."""
        return len(self._buf) > self._pos

    def feed(self, chunk: bytes) -> Iterator[Message]:
        """Each message completed by `chunk`, decoded only when the caller takes it (so a bad
        message after good ones in the same chunk fails after those were handled)."""
        self._buf += chunk
        return self._drain()

    def _drain(self) -> Iterator[Message]:
        try:
            while (message := self._next()) is not None:
                yield message
        finally:
            del self._buf[: self._pos]
            self._pos = 0

    def _next(self) -> Message | None:
        available = len(self._buf) - self._pos
        if available < PRELUDE:
            return None
        total = self._prelude()
        if available < total:
            return None
        start, self._pos = self._pos, self._pos + total
        return _message(memoryview(bytes(self._buf[start : start + total])))

    def _prelude(self) -> int:
        """The message's total length, once its prelude is checked (before the rest arrives)."""
        total: int
        total, headers, crc = struct.unpack_from(">III", self._buf, self._pos)
        if zlib.crc32(self._buf[self._pos : self._pos + 8]) != crc:
            raise FramingError("event-stream prelude CRC mismatch")
        if total > self.max_message_bytes:
            raise FramingError(f"event-stream message over {self.max_message_bytes} bytes")
        if total < OVERHEAD or headers > total - OVERHEAD or headers > MAX_HEADERS_BYTES:
            raise FramingError(f"event-stream message lengths are inconsistent ({total}, {headers})")
        return total


def _message(frame: memoryview) -> Message:
    (expected,) = struct.unpack_from(">I", frame, len(frame) - 4)
    if zlib.crc32(frame[:-4]) != expected:
        raise FramingError("event-stream message CRC mismatch")
    (headers_length,) = struct.unpack_from(">I", frame, 4)
    headers_end = PRELUDE + headers_length
    headers = parse_headers(bytes(frame[PRELUDE:headers_end]))
    return Message(headers, bytes(frame[headers_end:-4]))


def parse_headers(data: bytes) -> dict[str, HeaderValue]:
    headers: dict[str, HeaderValue] = {}
    pos = 0
    try:
        while pos < len(data):
            size = data[pos]
            name = data[pos + 1 : pos + 1 + size].decode("utf-8")
            pos += 1 + size
            value, pos = _value(data, data[pos], pos + 1)
            headers[name] = value
    except (IndexError, struct.error, UnicodeDecodeError):
        raise FramingError("event-stream headers are malformed") from None
    return headers


def _value(data: bytes, kind: int, pos: int) -> tuple[HeaderValue, int]:
    """A header value of type `kind` at `pos`, and where the next header starts."""
    if kind in (0, 1):
        return kind == 0, pos
    if kind in (6, 7):
        (size,) = struct.unpack_from(">H", data, pos)
        raw = data[pos + 2 : pos + 2 + size]
        if len(raw) < size:
            raise IndexError
        return (raw.decode("utf-8") if kind == 7 else raw), pos + 2 + size
    if kind not in _FIXED:
        raise FramingError(f"event-stream header of unknown type {kind}")
    fmt, size = _FIXED[kind]
    (value,) = struct.unpack_from(fmt, data, pos)
    return value, pos + size
