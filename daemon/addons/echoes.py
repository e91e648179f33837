"""Real keys an upstream echoes back (in headers, whole bodies, streams), turned back into their
placeholders before the client sees them, or, where the bytes cannot be rewritten (a compressed
stream), cut before the key leaves. A whole body that cannot be checked (it does not decode
within llmtap.addons.bodies' cap) is withheld: the client gets a provider-shaped 502 instead."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

from llmtap.addons.bodies import LIMIT, decoded_response
from llmtap.addons.replies import refusal
from llmtap.flow import fields
from llmtap.parsers.classify import classify
from llmtap.parsers.encoding import BodyDecoder, DecodeError, TooLarge
from llmtap.records.capture import StreamFn
from mitmproxy import http

log = logging.getLogger(__name__)

UNCHECKED_CODE = "llmtap_response_unchecked"


def pass_on(inner: StreamFn | bool, out: bytes, end: bool) -> Iterable[bytes] | bytes:
    """`out` through the inner stream callable (another addon's), if any; at the end of the
    stream the inner one gets its own end signal (an empty chunk) once."""
    if not callable(inner):
        return out
    chunks: list[bytes] = []
    for piece in ([out] if out else []) + ([b""] if end else []):
        result = inner(piece)
        chunks += [result] if isinstance(result, bytes) else list(result)
    return chunks


def scrub(data: bytes, pairs: Iterable[tuple[bytes, bytes]]) -> bytes:
    for value, placeholder in pairs:
        if value in data:
            data = data.replace(value, placeholder)
    return data


def scrub_held(flow: http.HTTPFlow, pairs: tuple[tuple[bytes, bytes], ...]) -> None:
    """Scrubs a held response body of echoed keys, in its bounded decoded view (written back
    re-encoded); a body that cannot be checked so is withheld (fail closed)."""
    decoded = decoded_response(flow)
    if decoded.error is not None:
        withhold(flow, decoded.error)
        return
    scrubbed = scrub(decoded.data, pairs)
    if scrubbed is not decoded.data and flow.response is not None:
        flow.response.content = scrubbed


def withhold(flow: http.HTTPFlow, why: str) -> None:
    """Replaces the upstream's response by a 502 in the provider's shape, saying why."""
    request = flow.request
    message = (f"llmtap withheld the upstream's response to a request that carried a key: {why}, "
               f"so it cannot be checked for an echoed key; the limit is {LIMIT}")
    provider, _ = classify(request.pretty_host, request.method, request.path)
    flow.response = refusal(provider, 502, message, UNCHECKED_CODE, "credentials")
    fields(flow)["error"] = message
    log.warning("%s: %s %s", message.removeprefix("llmtap "), request.method, request.pretty_host)


def held_suffix(data: bytes, pairs: Iterable[tuple[bytes, bytes]]) -> int:
    """How many bytes at the end of `data` could be the start of a key split across chunks."""
    best = 0
    for value, _ in pairs:
        i = data.find(value[:1], max(0, len(data) - len(value) + 1))
        while i != -1:
            if value.startswith(data[i:]):
                best = max(best, len(data) - i)
                break
            i = data.find(value[:1], i + 1)
    return best


class StreamScrubber:
    """A response `stream` callable that replaces keys chunk by chunk, never buffering the stream.

    Only a chunk's tail that could begin a key is held back, until the next chunk shows whether
    it does; everything else passes at once, to the inner callable (another addon's) if any.
    """

    def __init__(self, pairs: tuple[tuple[bytes, bytes], ...], inner: StreamFn | bool) -> None:
        self.pairs = pairs
        self.inner = inner
        self.pending = b""

    def __call__(self, data: bytes) -> Iterable[bytes] | bytes:
        if not data:  # the end of the stream
            out, self.pending = self.pending, b""
            return self._pass(out, end=True)
        data = scrub(self.pending + data, self.pairs)
        hold = held_suffix(data, self.pairs)
        self.pending = data[len(data) - hold:] if hold else b""
        return self._pass(data[: len(data) - hold], end=False)

    def _pass(self, out: bytes, end: bool) -> Iterable[bytes] | bytes:
        return pass_on(self.inner, out, end)


class EncodedEchoGuard:
    """A compressed response `stream` of a key-bearing flow, whose bytes cannot be rewritten:
    each chunk is decoded on the side, one decoder piece at a time, and passed on unchanged
    unless the text so far holds a key. Chunks whose decoded end could begin a key wait for the
    next one; a key found cuts the stream there, so no byte that completes it leaves. So does
    decoding past MAX_DECODED: what follows could not be checked."""

    MAX_HELD = 1 << 20  # compressed bytes held at most while a key prefix is pending
    MAX_DECODED = 256 << 20  # watched this far (it bounds the work, not the memory)
    ECHOED = "the upstream echoed a real key"
    UNCHECKED = f"more than {MAX_DECODED >> 20} MiB decoded, too much to check for an echoed key"

    def __init__(self, pairs: tuple[tuple[bytes, bytes], ...], encoding: str,
                 inner: StreamFn | bool, on_cut: Callable[[str], None]) -> None:
        self.pairs = pairs
        self.inner = inner
        self.on_cut = on_cut  # called once with why, ECHOED or UNCHECKED
        self.longest = max(len(value) for value, _ in pairs)
        self.decoder: BodyDecoder | None = BodyDecoder(encoding, self.MAX_DECODED)
        self.tail = b""  # the decoded text's last bytes, to find a key across pieces
        self.held: list[bytes] = []
        self.cut = False

    def __call__(self, data: bytes) -> Iterable[bytes] | bytes:
        if self.cut:
            return b""
        why = self._watch(data)
        if why is not None:
            self.cut, self.held = True, []
            self.on_cut(why)
            return b""
        self.held.append(data)
        held = sum(map(len, self.held))
        if data and held_suffix(self.tail, self.pairs) and held < self.MAX_HELD:
            return b""
        out, self.held = b"".join(self.held), []
        return self._pass(out, end=not data)

    def _watch(self, data: bytes) -> str | None:
        """Why the stream must be cut at `data` (b"": its end), or None."""
        if self.decoder is None:
            return None
        try:
            for piece in self.decoder.decode(data) if data else self.decoder.finish():
                window = self.tail + piece
                if any(value in window for value, _ in self.pairs):
                    return self.ECHOED
                self.tail = window[-self.longest:]
        except TooLarge:
            return self.UNCHECKED
        except DecodeError:  # undecodable here is undecodable for the client too
            self.decoder = None
        return None

    def _pass(self, out: bytes, end: bool) -> Iterable[bytes] | bytes:
        return pass_on(self.inner, out, end)
