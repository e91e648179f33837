"""Provider protocols: every exchange becomes record fields while its bytes pass through unchanged.

Request: classified and read (llmtap.parsers.parse_request). A streamed Chat Completions request
without `stream_options.include_usage` gets it added, and the one extra usage-only event it causes
is removed from what the client receives (llmtap.parsers.rewrite), so every call has exact usage.

Response: event streams, replies to streamed requests (Gemini's JSON array), bodies of unknown size
and bodies over mitmproxy's `stream_large_bodies` are streamed through `BodyStream`, which feeds
the incremental parser and hands each chunk back at once (its place among the other stages'
stream layers is the streams stage's, llmtap.addons.streams). Other bodies (known size, under the
threshold) are held by mitmproxy as usual and parsed in `response` from their raw bytes, under the
same caps. Nothing the parser does can stop or change the bytes.

WebSocket (`/v1/responses`): each `response.create` ... `response.completed` exchange on the
connection is presented to the rest of the pipeline as a response of its own (a flow built from
the upgrade), so pricing, the recorder and the live view see one exchange per response.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from llmtap.addons import bodies
from llmtap.flow import (
    BLOCKED_HEADER,
    BODIES,
    EXCHANGE,
    LIVE_PARSER,
    RECORD_FIELDS,
    STREAM_FLAG,
    SYSTEM_PROMPT,
    WS_EXCHANGE,
    contribute,
    fields,
)
from llmtap.parsers import (
    Limits,
    RequestInfo,
    ResponseParser,
    ResponsesWebSocket,
    UsageChunkStripper,
    WebSocketExchange,
    parse_request,
    response_parser,
    usage_rewrite,
)
from llmtap.parsers.request import info_from_fields, salvage_request
from mitmproxy import ctx, http
from mitmproxy.net.http.http1.read import expected_http_body_size
from mitmproxy.proxy.layers.http import HttpResponseHook  # type: ignore[attr-defined]  # not in its __all__

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


class Protocols:
    observes_response = True  # its response hook may run after the response is relayed

    # -- request ----------------------------------------------------------------------------

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        req = flow.request
        if req.stream is True:  # mitmproxy streams it (too large): keep its ends
            info = parse_request(req.pretty_host, req.method, req.path, b"")
            flow.metadata[EXCHANGE] = Exchange(info, request_ends=RequestEnds())

    def request_layer(self, flow: http.HTTPFlow) -> RequestEnds | None:
        exchange: Exchange | None = flow.metadata.get(EXCHANGE)
        return exchange.request_ends if exchange else None

    def request(self, flow: http.HTTPFlow) -> None:
        req = flow.request
        known: Exchange | None = flow.metadata.get(EXCHANGE)
        if known is not None and known.request_ends is not None:
            ends = known.request_ends
            known.info = salvage_request(
                req.pretty_host, req.method, req.path, bytes(ends.head), bytes(ends.tail)
            )
            return
        if req.stream and req.raw_content is None:  # mitmproxy began streaming it midway
            info = salvage_request(req.pretty_host, req.method, req.path, b"", b"")
            flow.metadata[EXCHANGE] = Exchange(info)
            return
        info = read_request(flow)
        bodies.forget_request(flow)  # the last stage to read it: the copy need not wait for the reply
        exchange = Exchange(info)
        if info.system_text:  # parsed once here; the recorder archives it
            flow.metadata[SYSTEM_PROMPT] = info.system_text
        flow.metadata[EXCHANGE] = exchange
        rewrite = usage_rewrite(info, req.raw_content or b"", req.headers.get("content-encoding"))
        if rewrite.strip_usage_chunk:
            req.content = rewrite.body  # also sets content-length
            req.headers.update(rewrite.headers)
            exchange.strip_usage = True

    def request_info(self, flow: http.HTTPFlow) -> RequestInfo | None:
        """What the request asks for (provider, model, max tokens), once `request` has read it."""
        exchange: Exchange | None = flow.metadata.get(EXCHANGE)
        return exchange.info if exchange is not None else None

    def _exchange(self, flow: http.HTTPFlow) -> Exchange:
        """The flow's exchange; one from the request line alone if `request` never ran."""
        exchange: Exchange | None = flow.metadata.get(EXCHANGE)
        if exchange is None:
            req = flow.request
            exchange = Exchange(parse_request(req.pretty_host, req.method, req.path, b""))
            flow.metadata[EXCHANGE] = exchange
        return exchange

    # -- response ---------------------------------------------------------------------------

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        response = flow.response
        assert response
        if response.status_code == 101:
            return  # an upgrade: the WebSocket hooks take over
        exchange = self._exchange(flow)
        exchange.parser = self._parser(flow, exchange.info)
        if not should_stream(flow, exchange.info):
            return
        stripper = None
        if exchange.strip_usage and is_event_stream(response):
            if "content-encoding" in response.headers or "content-length" in response.headers:
                exchange.notes.append(NOT_STRIPPED)
            else:
                stripper = UsageChunkStripper()
        exchange.stream = BodyStream(exchange.parser, stripper)
        response.stream = True  # the streams stage puts BodyStream in its place (response_layer)
        flow.metadata[STREAM_FLAG] = True

    def response_layer(self, flow: http.HTTPFlow) -> BodyStream | None:
        exchange: Exchange | None = flow.metadata.get(EXCHANGE)
        return exchange.stream if exchange else None

    def _parser(self, flow: http.HTTPFlow, info: RequestInfo) -> ResponseParser:
        assert flow.response
        parser = response_parser(
            info,
            started=flow.request.timestamp_start,
            status=flow.response.status_code,
            headers=flow.response.headers,
            limits=LIMITS,
        )
        flow.metadata[LIVE_PARSER] = parser  # the live stage reads exact counters from it
        return parser

    def response(self, flow: http.HTTPFlow) -> Awaitable[None] | None:
        """Sync, except for a large held body: then a coroutine mitmproxy awaits."""
        if WS_EXCHANGE in flow.metadata:
            return None  # built by websocket_message with its fields already set
        response = flow.response
        assert response
        exchange = self._exchange(flow)
        if flow.websocket is not None:
            self._websocket_start(flow, exchange)
            return None
        parser = exchange.parser or self._parser(flow, exchange.info)
        exchange.parser = parser
        if exchange.stream is not None:
            parser.feed(b"", response.timestamp_end or time.time())
        elif response.stream:
            parser.fail("body streamed by mitmproxy before llmtap could read it")
            parser.feed(b"", time.time())
        elif offload(response):
            return self._parse_on_thread(flow, exchange)
        else:
            parse_whole(parser, response)
        self._contribute(flow, exchange)
        return None

    async def _parse_on_thread(self, flow: http.HTTPFlow, exchange: Exchange) -> None:
        assert exchange.parser and flow.response
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(PARSE_POOL, parse_whole, exchange.parser, flow.response)
        self._contribute(flow, exchange)

    def error(self, flow: http.HTTPFlow) -> None:
        if WS_EXCHANGE in flow.metadata:
            return
        exchange = self._exchange(flow)
        if flow.response is None:
            exchange.parser = None  # nothing came back
        elif exchange.parser is not None:
            exchange.parser.feed(b"", time.time())
        self._contribute(flow, exchange)

    def _contribute(self, flow: http.HTTPFlow, exchange: Exchange) -> None:
        """The record fields: what the parser found, the request, and every error seen."""
        parser = exchange.parser
        if parser is None:
            parser = response_parser(exchange.info, started=flow.request.timestamp_start, limits=LIMITS)
            parser.feed(b"", flow.request.timestamp_start)
        result = parser.result()
        result["request"] = exchange.info.record()
        flow_error = flow.error.msg if flow.error else None
        notes = [*exchange.notes, *parser.notes]
        if flow_error and complete(parser, exchange.info):
            # SDKs hang up as soon as they see the stream's last event: not a failed exchange.
            notes.append(f"{flow_error} (after the complete response)")
            flow_error = None
        result["error"] = blocked_reason(flow) or join_errors(flow_error, result["error"],
                                                              exchange.info.error)
        if notes:
            result["notes"] = notes
        if exchange.websocket is not None:
            result["transport"] = "websocket"
        contribute(flow, result)
        flow.metadata[STREAM_FLAG] = bool(result["stream"])

    # -- WebSocket: OpenAI Responses ----------------------------------------------------------

    def _websocket_start(self, flow: http.HTTPFlow, exchange: Exchange) -> None:
        """The upgrade is recorded as the connection; each response on it becomes its own."""
        exchange.parser = self._parser(flow, exchange.info)
        exchange.parser.feed(b"", time.time())
        if exchange.info.api == "responses":
            exchange.websocket = ResponsesWebSocket(exchange.info.api)
        self._contribute(flow, exchange)

    async def websocket_message(self, flow: http.HTTPFlow) -> None:
        exchange: Exchange | None = flow.metadata.get(EXCHANGE)
        if exchange is None or exchange.websocket is None or flow.websocket is None:
            return
        message = flow.websocket.messages[-1]
        if not message.is_text:
            return
        socket = exchange.websocket
        try:
            if message.from_client:
                ended = socket.client_message(message.content, message.timestamp)
            else:
                ended = socket.server_message(message.content, message.timestamp)
        except Exception as exc:  # never let a message be held up by the parser
            log.warning("WebSocket parse failed: %s: %s", type(exc).__name__, exc)
            return
        for done in ended:
            await self._emit(flow, exchange, done, message.timestamp)
        if not socket.pending:  # what ended is in its own record: the connection need not keep it
            del flow.websocket.messages[:-1]  # the last is still this hook's, for later addons

    async def websocket_end(self, flow: http.HTTPFlow) -> None:
        exchange: Exchange | None = flow.metadata.get(EXCHANGE)
        if exchange is None or exchange.websocket is None:
            return
        now = time.time()
        for done in exchange.websocket.close(now):
            await self._emit(flow, exchange, done, now)

    async def _emit(
        self, flow: http.HTTPFlow, exchange: Exchange, done: WebSocketExchange, ended: float
    ) -> None:
        """One WebSocket exchange, as a flow of its own, through every addon's `response`."""
        assert flow.response
        exchange.ws_count += 1
        info = info_from_fields(exchange.info.provider, exchange.info.api, done.request)
        sub = http.HTTPFlow(flow.client_conn, flow.server_conn)
        sub.request = flow.request.copy()
        sub.request.timestamp_start = sub.request.timestamp_end = done.started
        sub.request.headers["content-type"] = "application/json"
        sub.request.content = done.sent
        sub.response = flow.response.copy()
        sub.response.headers["content-type"] = "application/x-ndjson"  # one message a line
        sub.response.content = b"\n".join(done.received)
        sub.response.timestamp_start = done.started
        sub.response.timestamp_end = ended
        sub.metadata = {k: v for k, v in flow.metadata.items() if k not in (RECORD_FIELDS, BODIES, EXCHANGE)}
        sub.metadata[WS_EXCHANGE] = flow.id
        result = done.parser.result()
        result["provider"] = info.provider  # the host's, as for every other exchange
        result["request"] = info.record()
        result["error"] = join_errors(result["error"], info.error)
        result["transport"] = "websocket"
        result["websocket"] = {"connection": flow.id, "exchange": exchange.ws_count}
        contribute(sub, dict(fields(flow)))  # what other addons knew of the connection
        contribute(sub, result)
        sub.metadata[STREAM_FLAG] = True
        await ctx.master.addons.trigger_event(HttpResponseHook(sub))
