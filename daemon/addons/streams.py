"""The "streams" stage: each streamed body's callable, assembled in one place, in one order.

mitmproxy relays a streamed body through one callable, `flow.request.stream` or
`flow.response.stream`: called with each chunk as it arrives, then once with b"" at the end, and
returning what goes on now. Several stages need to see or change those bytes. Each offers its
part, a Layer, through `request_layer(flow)` / `response_layer(flow)`; this stage, the
pipeline's last (so every stage has decided by then whether and how the body streams), chains
them in the order below: the first layer gets the wire's bytes, each passes on what it returns
to the next, and what the last returns goes to the peer.

    request:  dlp (secrets redacted) -> protocols (head and tail kept for the parser)
    response: credentials (echoed keys out, before anything else sees them) -> live (meter)
              -> recorder (bounded copy) -> protocols (parsed; the usage chunk llmtap asked for
              stripped)

A Layer's contract: it returns at once what it can pass on (bytes, or pieces of it; nothing is
fine); it may hold back only a bounded tail (a key split across chunks, an unfinished SSE event),
which it returns when called with b"" at the end; it never raises. Nothing here buffers a body:
each chunk goes through every layer before the next one is read.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

from mitmproxy import http


class Layer(Protocol):
    def __call__(self, chunk: bytes, /) -> bytes | Iterable[bytes]: ...


class RequestLayers(Protocol):
    def request_layer(self, flow: http.HTTPFlow) -> Layer | None:
        """Its part of this streamed request body (called once, in requestheaders), or None."""


class ResponseLayers(Protocol):
    def response_layer(self, flow: http.HTTPFlow) -> Layer | None:
        """Its part of this streamed response body (called once, in responseheaders), or None."""


class StreamChain:
    """Layers in order, as one stream callable. `layers` says which are there (for a stage
    that wants its own back at the end, e.g. the live meter's counts)."""

    def __init__(self, layers: Sequence[Layer]) -> None:
        self.layers = tuple(layers)

    def __call__(self, chunk: bytes) -> list[bytes]:
        end = not chunk
        pieces = [chunk]
        for layer in self.layers:
            out: list[bytes] = []
            for piece in pieces:
                if piece:  # an empty chunk means the end: a layer gets it only once, at the end
                    out += _pieces(layer(piece))
            if end:
                out += _pieces(layer(b""))
            pieces = out
        return [piece for piece in pieces if piece]  # b"" would end an HTTP/1 chunked body


def _pieces(result: bytes | Iterable[bytes]) -> list[bytes]:
    return [result] if isinstance(result, bytes) else list(result)


def layer_of[L](stream: object, kind: type[L]) -> L | None:
    """The layer of that kind in a body's stream, if it has one."""
    layers = stream.layers if isinstance(stream, StreamChain) else (stream,)
    return next((layer for layer in layers if isinstance(layer, kind)), None)


class Streams:
    """The pipeline's last stage: the stream callables, from the stages' layers (module doc)."""

    def __init__(self, request: Sequence[RequestLayers] = (),
                 response: Sequence[ResponseLayers] = ()) -> None:
        # In the order the bytes go through them. Not `request`/`response`: mitmproxy would take
        # attributes of those names for its hooks.
        self.request_stages = tuple(request)
        self.response_stages = tuple(response)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.request.stream is not True:  # held, or already set by someone else
            return
        layers = [layer for stage in self.request_stages if (layer := stage.request_layer(flow))]
        if layers:
            flow.request.stream = StreamChain(layers)

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        response = flow.response
        if response is None or response.stream is not True:
            return
        layers = [layer for stage in self.response_stages if (layer := stage.response_layer(flow))]
        if layers:
            response.stream = StreamChain(layers)
