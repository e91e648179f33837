"""Incremental, bomb-safe decoding of HTTP content-encodings (gzip, deflate, br, zstd).

Every codec produces output in bounded pieces (zlib's max_length, brotli's output_buffer_limit,
zstandard's stream_writer with a small write size), gzip, deflate and br lazily (each piece is made
when the caller takes it, so memory holds one piece at a time), and the total a compressed body
inflates to is capped: a bomb raises DecodeError long before memory runs out. A truncated body is
a DecodeError at `finish()` for every codec (zstd's framing is followed to tell). Identity bodies
are not capped here (they cannot inflate); the parsers bound what they hold themselves.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Iterator
from typing import Protocol

PIECE = 256 * 1024  # the most any codec hands over at once


class DecodeError(ValueError):
    """The body cannot be decoded: unsupported or corrupt encoding, truncated, or over the cap."""


class Budget:
    """The decoded-size cap shared by a chain of codecs."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.used = 0

    def take(self, piece: bytes) -> bytes:
        self.used += len(piece)
        if self.used > self.max_bytes:
            raise DecodeError(f"decoded body over {self.max_bytes} bytes (decompression bomb?)")
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
        import brotli  # shipped with mitmproxy

        self._error = brotli.error
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
            if self._can_accept():
                return
            piece = self._process(b"")

    def _process(self, data: bytes) -> bytes:
        try:
            return self._process_limited(data)
        except self._error as exc:
            raise DecodeError(f"corrupt br body: {exc}") from None

    def _can_accept(self) -> bool:
        can_accept = getattr(self._obj, "can_accept_more_data", None)  # brotli >= 1.2
        return True if can_accept is None else bool(can_accept())

    def _process_limited(self, data: bytes) -> bytes:
        try:
            return bytes(self._obj.process(data, output_buffer_limit=PIECE))
        except TypeError:  # brotli < 1.2 has no output limit; the budget still applies after
            return bytes(self._obj.process(data))

    def finish(self) -> list[bytes]:
        if self._seen and not self._obj.is_finished():
            raise DecodeError("truncated br body")
        return []


class Zstd:
    """zstandard's stream_writer pushes bounded pieces into a sink that enforces the budget."""

    def __init__(self, budget: Budget) -> None:
        import zstandard  # shipped with mitmproxy

        self._sink = _Sink(budget)
        self._frames = ZstdFrames()
        self._error = zstandard.ZstdError
        self._writer = zstandard.ZstdDecompressor().stream_writer(
            self._sink,  # type: ignore[arg-type]  # any object with write() will do
            write_size=PIECE,
            write_return_read=True,
        )

    def decode(self, data: bytes) -> list[bytes]:
        self._frames.feed(data)
        try:
            self._writer.write(data)
        except self._error as exc:
            raise DecodeError(f"corrupt zstd body: {exc}") from None
        return self._sink.drain()

    def finish(self) -> list[bytes]:
        if not self._frames.complete:
            raise DecodeError("truncated zstd body")
        return []


class ZstdFrames:
    """Follows zstd's framing (RFC 8878: frame headers and block headers, not their content),
    to tell a body that ended between frames from one cut inside a frame."""

    MAGIC = 0xFD2FB528
    SKIPPABLE = 0x184D2A50  # to 0x184D2A5F
    _DID = (0, 1, 2, 4)

    def __init__(self) -> None:
        self._buf = bytearray()
        self._skip = 0  # bytes to pass over before the next header
        self._state = "magic"
        self._checksum = False
        self._frames = 0

    @property
    def complete(self) -> bool:
        return self._state == "magic" and self._skip == 0 and not self._buf

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._skip:
                step = min(self._skip, len(view))
                self._skip -= step
                view = view[step:]
                continue
            need = {"magic": 4, "size": 4, "fhd": 1, "block": 3}[self._state]
            take = min(need - len(self._buf), len(view))
            self._buf += view[:take]
            view = view[take:]
            if len(self._buf) == need:
                header = int.from_bytes(self._buf, "little")
                self._buf.clear()
                self._header(header)

    def _header(self, value: int) -> None:
        if self._state == "magic":
            skippable = value & 0xFFFFFFF0 == self.SKIPPABLE
            self._state = "size" if skippable else "fhd"  # a bad magic is the decoder's to report
        elif self._state == "size":
            self._skip, self._state = value, "magic"
        elif self._state == "fhd":
            single_segment = bool(value & 0x20)
            fcs = (1 if single_segment else 0, 2, 4, 8)[value >> 6]
            self._skip = (0 if single_segment else 1) + self._DID[value & 3] + fcs
            self._checksum = bool(value & 0x04)
            self._state = "block"
        else:
            last, kind, size = value & 1, (value >> 1) & 3, value >> 3
            self._skip = 1 if kind == 1 else size  # RLE blocks carry one byte
            if last:
                self._skip += 4 if self._checksum else 0
                self._state = "magic"
                self._frames += 1


class _Sink:
    def __init__(self, budget: Budget) -> None:
        self._budget = budget
        self._pieces: list[bytes] = []

    def write(self, data: bytes) -> int:
        self._pieces.append(self._budget.take(bytes(data)))
        return len(data)

    def drain(self) -> list[bytes]:
        pieces, self._pieces = self._pieces, []
        return pieces


class BodyDecoder:
    """Decodes a body given its Content-Encoding header, incrementally, under a size cap."""

    def __init__(self, content_encoding: str | None, max_bytes: int) -> None:
        self.budget = Budget(max_bytes)
        names = [n.strip().lower() for n in (content_encoding or "").split(",") if n.strip()]
        # Encodings are listed in the order applied, so they are undone in reverse.
        self._chain: list[Codec] = [self._codec(n) for n in reversed(names) if n != "identity"]
        if not self._chain:
            self._chain = [Identity(self.budget)]

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
    """A whole body at once (request bodies), with the same cap and errors."""
    decoder = BodyDecoder(content_encoding, max_bytes)
    return b"".join([*decoder.decode(data), *decoder.finish()])
