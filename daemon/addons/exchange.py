"""One HTTP exchange in flight for the protocols stage (llmtap.addons.protocols): what is known
about it, the stream layers that feed its parser without holding its bytes (`RequestEnds`,
`BodyStream`), and how its body is read (streamed, held and parsed whole, on a thread or not).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from llmtap.addons import bodies
from llmtap.flow import BLOCKED_HEADER, fields
from llmtap.parsers import (
    Limits,
    RequestInfo,
    ResponseParser,
    ResponsesWebSocket,
    UsageChunkStripper,
    parse_request,
)
from mitmproxy import http
from mitmproxy.net.http.http1.read import expected_http_body_size

log = logging.getLogger(__name__)

MiB = 1024 * 1024
# What the parsers may hold or inflate: a compressed body past 64 MiB is a bomb, not a reply,
# and a whole JSON body past 8 MiB is read best-effort from its head and tail.
LIMITS = Limits(max_decoded_bytes=64 * MiB, max_json_body_bytes=8 * MiB)
REQUEST_ENDS = 64 * 1024  # head and tail kept of a request body too large to hold
# A held body this large (or compressed and this large: it may be a bomb) is parsed on a thread,
# so the event loop keeps relaying other exchanges meanwhile (zlib releases the GIL).
OFFLOAD_BYTES = 1 * MiB
OFFLOAD_ENCODED_BYTES = 64 * 1024
NOT_STRIPPED = "usage chunk not stripped: the upstream sent an encoded or sized stream"
PARSE_POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="llmtap-parse")

Chunks = Iterable[bytes]


@dataclass
class Exchange:
    """What llmtap knows about one HTTP exchange while it is in flight."""

    info: RequestInfo
    strip_usage: bool = False  # include_usage was added: strip the usage-only event
    parser: ResponseParser | None = None
    stream: BodyStream | None = None
    request_ends: RequestEnds | None = None
    websocket: ResponsesWebSocket | None = None
    ws_count: int = 0
    notes: list[str] = field(default_factory=list)  # worth knowing, but not a failed exchange


class RequestEnds:
    """Request stream layer: passes a too-large body on, keeping its head and tail."""

    def __init__(self) -> None:
        self.head = bytearray()
        self.tail = bytearray()

    def __call__(self, chunk: bytes) -> bytes:
        if len(self.head) < REQUEST_ENDS:
            self.head += chunk[: REQUEST_ENDS - len(self.head)]
        self.tail += chunk
        del self.tail[: max(0, len(self.tail) - REQUEST_ENDS)]
        return chunk


class BodyStream:
    """Response stream layer: each wire chunk goes to the parser and back out at once.

    Only the usage-only event llmtap asked for is removed (and, while it may still come, the
    unfinished SSE event at the end of a chunk waits for its blank line). Returns a tuple: an
    empty bytes object would end an HTTP/1 chunked body early.
    """

    def __init__(
        self,
        parser: ResponseParser,
        stripper: UsageChunkStripper | None,
    ) -> None:
        self.parser = parser
        self.stripper = stripper
        self.bytes = 0

    def __call__(self, chunk: bytes) -> Chunks:
        self.bytes += len(chunk)
        self._parse(chunk)
        out = self._strip(chunk) if self.stripper else chunk
        return (out,) if out else ()

    def _parse(self, chunk: bytes) -> None:
        try:
            self.parser.feed(chunk, time.time())
        except Exception as exc:  # the parsers never raise; if one does, the bytes still flow
            self.parser.fail(f"parser crashed: {type(exc).__name__}: {exc}")

    def _strip(self, chunk: bytes) -> bytes:
        stripper = self.stripper
        assert stripper is not None
        try:
            return stripper.feed(chunk)
        except Exception as exc:  # give up stripping, never the bytes
            log.warning("usage chunk stripper failed: %s: %s", type(exc).__name__, exc)
            self.stripper = None
            return stripper.release(chunk)


def is_event_stream(response: http.Response) -> bool:
    content_type = str(response.headers.get("content-type", ""))
    return content_type.split(";")[0].strip().lower() == "text/event-stream"


def body_size(flow: http.HTTPFlow) -> int | None:
    """The response body's announced size; None when it is only known at its end."""
    assert flow.response
    try:
        size = expected_http_body_size(flow.request, flow.response)
    except ValueError:
        return None
    return None if size is None or size < 0 else size


def should_stream(flow: http.HTTPFlow, info: RequestInfo) -> bool:
    """Streams, replies to streamed requests, and bodies that are large or of unknown size."""
    response = flow.response
    assert response
    size = body_size(flow)
    if size == 0:
        return False
    return bool(response.stream) or is_event_stream(response) or info.stream or size is None


def offload(response: http.Response) -> bool:
    size = len(response.raw_content or b"")
    encoded = "content-encoding" in response.headers
    return size >= OFFLOAD_BYTES or (encoded and size >= OFFLOAD_ENCODED_BYTES)


def parse_whole(parser: ResponseParser, response: http.Response) -> None:
    """A body mitmproxy held, parsed from its raw bytes (`.content` would inflate it uncapped)."""
    parser.feed(response.raw_content or b"", response.timestamp_start or time.time())
    parser.feed(b"", response.timestamp_end or time.time())


def complete(parser: ResponseParser, info: RequestInfo) -> bool:
    """Whether the reply was whole by its own protocol (its end marker, or all of its JSON)."""
    return parser.finished and parser.error is None and parser.events > 0 and info.api != "unknown"


def read_request(flow: http.HTTPFlow) -> RequestInfo:
    """A held request, read from the bounded decoded view the earlier stages share."""
    req = flow.request
    decoded = bodies.decoded_request(flow)
    info = parse_request(req.pretty_host, req.method, req.path, decoded.data)
    if decoded.error is not None and info.api != "unknown":
        info.error = f"llmtap: request body not read: {decoded.error}"
    return info


def blocked_reason(flow: http.HTTPFlow) -> str | None:
    """The reason a stage gave for a response llmtap made itself (a block), which the parser
    would only report as "http 403"."""
    response = flow.response
    if response is None or BLOCKED_HEADER not in response.headers:
        return None
    reason = fields(flow).get("error")
    return reason if isinstance(reason, str) else None


def join_errors(*errors: str | None) -> str | None:
    found = [e for e in errors if e]
    return "; ".join(dict.fromkeys(found)) or None
