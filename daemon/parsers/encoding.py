"""Incremental, bomb-safe decoding of HTTP content-encodings (gzip, deflate, br, zstd).

Every codec produces output in bounded pieces (zlib's max_length, brotli's output_buffer_limit,
zstandard's stream_writer with a small write size) and the total a compressed body inflates to
is capped: a bomb raises DecodeError long before memory runs out. Identity bodies are not capped
here (they cannot inflate); the parsers bound what they hold themselves.
"""

from __future__ import annotations

import zlib
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
    def decode(self, data: bytes) -> list[bytes]: ...
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

    def decode(self, data: bytes) -> list[bytes]:
        if self._obj is None:
            data = self._start(data)
            if self._obj is None:
                return []
        out: list[bytes] = []
        while data:
            data = self._inflate(data, out)
        return out

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

    def _inflate(self, data: bytes, out: list[bytes]) -> bytes:
        assert self._obj is not None
        try:
            piece = self._obj.decompress(data, PIECE)
            if piece:
                out.append(self._budget.take(piece))
            while len(piece) == PIECE and not self._obj.unconsumed_tail:
                piece = self._obj.decompress(b"", PIECE)  # drain what the window still holds
                if piece:
                    out.append(self._budget.take(piece))
        except zlib.error as exc:
            raise DecodeError(f"corrupt {self._name} body: {exc}") from None
        if self._obj.eof:
            return self._next_member()
        return self._obj.unconsumed_tail

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

    def decode(self, data: bytes) -> list[bytes]:
        if not data:
            return []
        self._seen = True
        out: list[bytes] = []
        try:
            piece = self._process(data)
            out.append(self._budget.take(piece))
            while not self._can_accept():
                out.append(self._budget.take(self._process(b"")))
        except self._error as exc:
            raise DecodeError(f"corrupt br body: {exc}") from None
        return [piece for piece in out if piece]

    def _can_accept(self) -> bool:
        can_accept = getattr(self._obj, "can_accept_more_data", None)  # brotli >= 1.2
        return True if can_accept is None else bool(can_accept())

    def _process(self, data: bytes) -> bytes:
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
        self._error = zstandard.ZstdError
        self._writer = zstandard.ZstdDecompressor().stream_writer(
            self._sink,  # type: ignore[arg-type]  # any object with write() will do
            write_size=PIECE,
            write_return_read=True,
        )

    def decode(self, data: bytes) -> list[bytes]:
        try:
            self._writer.write(data)
        except self._error as exc:
            raise DecodeError(f"corrupt zstd body: {exc}") from None
        return self._sink.drain()

    def finish(self) -> list[bytes]:
        return []


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

    def decode(self, data: bytes) -> list[bytes]:
        pieces = [data]
        for codec in self._chain:
            pieces = [out for piece in pieces for out in codec.decode(piece)]
        return pieces

    def finish(self) -> list[bytes]:
        pieces: list[bytes] = []
        for codec in self._chain:
            pieces = [out for piece in pieces for out in codec.decode(piece)] + codec.finish()
        return pieces


def decode_all(data: bytes, content_encoding: str | None, max_bytes: int) -> bytes:
    """A whole body at once (request bodies), with the same cap and errors."""
    decoder = BodyDecoder(content_encoding, max_bytes)
    return b"".join(decoder.decode(data) + decoder.finish())
