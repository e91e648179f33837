"""Incremental, bomb-safe decoding of HTTP content-encodings (gzip, deflate, br, zstd).

Every codec produces output in bounded pieces (zlib's and zstd's max_length, brotli's
output_buffer_limit), lazily: each piece is made when the caller takes it, so memory holds one
piece at a time, and the total a compressed body inflates to is capped: a bomb raises DecodeError
long before memory runs out. A truncated body is a DecodeError at `finish()` for every codec.
Identity bodies are not capped here (they cannot inflate); the parsers bound what they hold.
"""

from __future__ import annotations

import io
import sys
import zlib
from collections.abc import Iterable, Iterator
from typing import Protocol

import brotli

if sys.version_info >= (3, 14):
    from compression import zstd
else:  # the backport mitmproxy itself uses before 3.14
    from backports import zstd

PIECE = 256 * 1024  # the most any codec hands over at once


class DecodeError(ValueError):
    """The body cannot be decoded: unsupported or corrupt encoding, truncated, or over the cap."""


class TooLarge(DecodeError):
    """The body decodes to more than the cap (a decompression bomb, or simply too much)."""


class Budget:
    """The decoded-size cap shared by a chain of codecs."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.used = 0

    def take(self, piece: bytes) -> bytes:
        self.used += len(piece)
        if self.used > self.max_bytes:
            raise TooLarge(f"decoded body over {self.max_bytes} bytes (decompression bomb?)")
        return piece


class Codec(Protocol):
    def decode(self, data: bytes) -> Iterable[bytes]: ...
    def finish(self) -> list[bytes]: ...


class Identity:
    """No encoding: nothing can inflate, so the budget does not apply."""

    def __init__(self, budget: Budget) -> None:
        self._budget = budget

    def decode(self, data: bytes) -> list[bytes]:
        return [data] if data else []

    def finish(self) -> list[bytes]:
        return []


class Zlib:
    """gzip (multi-member) and deflate (zlib-wrapped, or raw as some servers send it)."""

    def __init__(self, name: str, budget: Budget) -> None:
        self._name = name
        self._budget = budget
        self._obj: zlib._Decompress | None = None
        self._head = b""
        self._seen = False

    def decode(self, data: bytes) -> Iterator[bytes]:
        if self._obj is None:
            data = self._start(data)
            if self._obj is None:
                return
        while True:
            piece = self._inflate(data)
            if piece:
                yield self._budget.take(piece)
            if self._obj.eof:
                data = self._next_member()
                if not data:
                    return
            else:
                data = self._obj.unconsumed_tail
                if not data and len(piece) < PIECE:
                    return  # all input taken, and the window holds nothing more

    def _start(self, data: bytes) -> bytes:
        """Picks the wbits once two bytes are known (deflate: zlib header or raw)."""
        self._head += data
        if len(self._head) < 2:
            return b""
        self._obj = zlib.decompressobj(self._wbits(self._head))
        self._seen = True
        data, self._head = self._head, b""
        return data

    def _wbits(self, head: bytes) -> int:
        if self._name == "gzip":
            return 16 + zlib.MAX_WBITS
        is_zlib = head[0] & 0x0F == 8 and ((head[0] << 8) | head[1]) % 31 == 0
        return zlib.MAX_WBITS if is_zlib else -zlib.MAX_WBITS

    def _inflate(self, data: bytes) -> bytes:
        """At most one piece; called again with b"" while the window may hold more."""
        assert self._obj is not None
        try:
            return self._obj.decompress(data, PIECE)
        except zlib.error as exc:
            raise DecodeError(f"corrupt {self._name} body: {exc}") from None

    def _next_member(self) -> bytes:
        """gzip may hold several members back to back; anything else after the end is junk."""
        assert self._obj is not None
        rest = self._obj.unused_data
        if self._name == "gzip" and rest.strip(b"\0"):
            self._obj = zlib.decompressobj(16 + zlib.MAX_WBITS)
            return rest
        return b""

    def finish(self) -> list[bytes]:
        if self._head:
            raise DecodeError(f"truncated {self._name} body")
        if self._seen and self._obj is not None and not self._obj.eof:
            raise DecodeError(f"truncated {self._name} body")
        return []


class Brotli:
    def __init__(self, budget: Budget) -> None:
        self._obj = brotli.Decompressor()
        self._budget = budget
        self._seen = False

    def decode(self, data: bytes) -> Iterator[bytes]:
        if not data:
            return
        self._seen = True
        piece = self._process(data)
        while True:
            if piece:
                yield self._budget.take(piece)
            if self._obj.can_accept_more_data():
                return
            piece = self._process(b"")

    def _process(self, data: bytes) -> bytes:
        try:
            return bytes(self._obj.process(data, output_buffer_limit=PIECE))
        except brotli.error as exc:
            raise DecodeError(f"corrupt br body: {exc}") from None

    def finish(self) -> list[bytes]:
        if self._seen and not self._obj.is_finished():
            raise DecodeError("truncated br body")
        return []


class Zstd:
    """zstd frames (skippable ones included) back to back: one decompressor per frame, each piece
    bounded by max_length and made when the caller takes it, as for zlib."""

    def __init__(self, budget: Budget) -> None:
        self._budget = budget
        self._obj = zstd.ZstdDecompressor()
        self._in_frame = False  # the current decompressor holds part of a frame

    def decode(self, data: bytes) -> Iterator[bytes]:
        self._in_frame = self._in_frame or bool(data)
        while True:
            piece = self._inflate(data)
            if piece:
                yield self._budget.take(piece)
            data = b""
            if self._obj.eof:
                data, self._obj = self._obj.unused_data, zstd.ZstdDecompressor()
                self._in_frame = bool(data)
                if not data:
                    return
            elif self._obj.needs_input:
                return

    def _inflate(self, data: bytes) -> bytes:
        try:
            return self._obj.decompress(data, max_length=PIECE)
        except zstd.ZstdError as exc:
            raise DecodeError(f"corrupt zstd body: {exc}") from None

    def finish(self) -> list[bytes]:
        if self._in_frame:
            raise DecodeError("truncated zstd body")
        return []


class BodyDecoder:
    """Decodes a body given its Content-Encoding header, incrementally, under a size cap."""

    def __init__(self, content_encoding: str | None, max_bytes: int) -> None:
        self.budget = Budget(max_bytes)
        names = [n.strip().lower() for n in (content_encoding or "").split(",") if n.strip()]
        # Encodings are listed in the order applied, so they are undone in reverse.
        self._chain: list[Codec] = [self._codec(n) for n in reversed(names) if n != "identity"]
        if not self._chain:
            self._chain = [Identity(self.budget)]

    @property
    def identity(self) -> bool:
        """Whether the body is sent as it is (nothing to decode)."""
        return isinstance(self._chain[0], Identity)

    def _codec(self, name: str) -> Codec:
        # Intermediate stages of a chain share the budget: each stage's output counts.
        if name in ("gzip", "x-gzip"):
            return Zlib("gzip", self.budget)
        if name == "deflate":
            return Zlib("deflate", self.budget)
        if name == "br":
            return Brotli(self.budget)
        if name == "zstd":
            return Zstd(self.budget)
        raise DecodeError(f"unsupported content-encoding {name!r}")

    def decode(self, data: bytes) -> Iterator[bytes]:
        """The decoded pieces of `data`, made one at a time as they are taken."""
        pieces: Iterable[bytes] = (data,)
        for codec in self._chain:
            pieces = _through(codec, pieces)
        return iter(pieces)

    def finish(self) -> list[bytes]:
        pieces: list[bytes] = []
        for codec in self._chain:
            pieces = [out for piece in pieces for out in codec.decode(piece)] + codec.finish()
        return pieces


def _through(codec: Codec, pieces: Iterable[bytes]) -> Iterator[bytes]:
    for piece in pieces:
        yield from codec.decode(piece)


def decode_all(data: bytes, content_encoding: str | None, max_bytes: int) -> bytes:
    """A whole body at once (request bodies), with the same cap and errors. The pieces go into
    one growing buffer whose bytes getvalue() hands over without a copy, so memory holds the
    decoded body once, never a list of pieces and their join besides."""
    decoder = BodyDecoder(content_encoding, max_bytes)
    if decoder.identity:
        return data
    out = io.BytesIO()
    for piece in decoder.decode(data):
        out.write(piece)
    for piece in decoder.finish():
        out.write(piece)
    return out.getvalue()
