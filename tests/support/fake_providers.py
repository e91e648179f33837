"""Wire-accurate provider replies for tests/support/fake_upstream.py, from the fixture streams.

Any request may steer the reply with headers:
    x-fake-fixture: NAME        serve tests/fixtures/streams/NAME with its status and content type
                                (streams.FIXTURES); openai_chat_stream.sse loses its usage-only
                                event unless the request set stream_options.include_usage
    x-fake-encoding: E          gzip | deflate | br | zstd (a stream is flushed chunk by chunk)
    x-fake-truncate: N          only the first N bytes of the body, then a clean end
    x-fake-abort: N             N bytes of the (encoded) body, then the connection is reset
    x-fake-trailer-delay-ms: N  the body's end comes N ms after the rest: the encoding's end with
                                x-fake-encoding, else the end of the body itself (HTTP/1's last
                                chunk, HTTP/2's END_STREAM)
    x-fake-tail-bytes: N        with x-fake-trailer-delay-ms: the body's last N bytes come late too
                                (a JSON array's closing bracket)
    x-fake-lie-encoding: E      claim content-encoding E while sending the body as it is
    x-fake-body: TEXT           this body (200, application/json) instead of a fixture
    x-fake-big: N               an N-byte Messages reply (its usage at the very end)
    x-fake-bomb: N              a gzip body that inflates to N bytes (whatever accept-encoding says)
    x-fake-unsized: 1           no content-length: a body that is not streamed goes out chunked
    x-fake-pause-ms: N          pause between stream chunks (default 10)
    x-fake-usage: JSON          the usage of fake_upstream's default Messages stream (/v1/messages)
Without them these paths get their fixture: POST /v1/responses, /v1/messages/count_tokens,
Gemini's :generateContent, :streamGenerateContent (alt=sse or the JSON array) and :countTokens
(Vertex AI's own on its hosts), Claude on Vertex AI (:rawPredict, :streamRawPredict, count-tokens),
the OpenAI-compatible chat completions of Gemini, Anthropic, Groq, OpenRouter and DeepSeek, each
in its dialect, and Azure OpenAI's /openai/deployments/{d}/chat/completions and
/openai/v1/chat/completions (azure_chat_stream.sse or azure_chat.json, with Azure's headers) and
/openai/responses, /openai/v1/responses (the Responses fixtures). Those that send usage only when
asked (USAGE_IF_ASKED) leave it out unless the request set stream_options.include_usage, as the
real ones do. Bedrock's /model/{modelId}/invoke, invoke-with-response-stream, converse,
converse-stream and count-tokens get theirs too (tests/support/fake_bedrock.py; a SigV4 signature that
does not verify gets AWS's 403).
Background responses: `POST /v1/responses` with `background: true` answers `queued` (a new id);
`GET /v1/responses/{that id}` answers `in_progress` at the first poll, `completed` with usage
after; with `?stream=true` (and `starting_after=N`) the completed response's events after N.
Message batches: `GET /v1/messages/batches/{id}` has ended, and its `results_url` serves the
batch results fixture (JSON lines, `application/binary`) as often as it is asked.
The Responses WebSocket (GET /v1/responses, upgraded) answers each `response.create` with the
fixture's events, one text message each. Error fixtures come with their rate-limit headers.
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
import uuid
import zlib
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import brotli
import fake_bedrock
import streams
from llmtap.parsers.encoding import zstd

Scope = dict[str, Any]
Send = Callable[[dict[str, Any]], Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Headers = list[tuple[bytes, bytes]]

SIZES = (1, 7, 3, 64, 2, 31, 5, 128)  # cut lines, events and characters apart
BIG_PIECE = 1024 * 1024
RATE_LIMIT_HEADERS: dict[str, Headers] = {
    "api.anthropic.com": [(b"retry-after", b"7"), (b"anthropic-ratelimit-requests-remaining", b"0"),
                          (b"request-id", b"req_011CSHoEeqs5C35K2UUqR7Fy"), (b"x-should-retry", b"true")],
    "api.openai.com": [(b"retry-after-ms", b"2000"), (b"x-ratelimit-remaining-tokens", b"0"),
                       (b"x-ratelimit-reset-tokens", b"2s"), (b"x-request-id", b"req_fake429")],
    "generativelanguage.googleapis.com": [(b"retry-after", b"30")],
}
_GEMINI = re.compile(r"/models/[^/:]+:(generateContent|streamGenerateContent|countTokens)$")
_RESPONSE = re.compile(r"^/v1/responses/(resp_[^/]+)$")
_BATCH = re.compile(r"^/v1/messages/batches/([^/]+)(/results)?$")
BACKGROUND: dict[str, int] = {}  # background response id -> polls answered (the fake's state)
_VERTEX_CLAUDE = re.compile(r"/publishers/anthropic/models/([^/:]+):(rawPredict|streamRawPredict)$")
# (host or None for any, path suffix) -> (streamed fixture, whole fixture or None)
COMPAT_CHAT: dict[tuple[str | None, str], tuple[str, str | None]] = {
    (None, "/v1beta/openai/chat/completions"): ("gemini_compat_chat_stream.sse", "gemini_compat_chat.json"),
    ("api.anthropic.com", "/v1/chat/completions"): ("anthropic_compat_chat_stream.sse",
                                                     "anthropic_compat_chat.json"),
    (None, "/openai/v1/chat/completions"): ("groq_chat_stream.sse", None),
    (None, "/api/v1/chat/completions"): ("openrouter_chat_stream.sse", None),
    ("api.deepseek.com", "/chat/completions"): ("deepseek_chat_stream.sse", None),
    ("api.mistral.ai", "/v1/chat/completions"): ("mistral_chat_stream.sse", None),
}
USAGE_IF_ASKED = ("gemini_compat_chat_stream.sse", "anthropic_compat_chat_stream.sse",
                  "groq_chat_stream.sse", "azure_chat_stream.sse")
_AZURE_CHAT = re.compile(r"^/openai/(deployments/[^/]+|v1)/chat/completions$")
AZURE_HEADERS: Headers = [(b"apim-request-id", b"6f1d3f2e-1a2b-4c3d-9e8f-0a1b2c3d4e5f"),
                          (b"x-ms-region", b"Sweden Central"), (b"x-ratelimit-remaining-requests", b"249"),
                          (b"x-ratelimit-remaining-tokens", b"249000")]


@dataclass
class Reply:
    status: int
    content_type: str
    body: bytes
    streamed: bool  # sent in small pieces with pauses, no content-length
    headers: Headers = field(default_factory=list)


def chunks_of(data: bytes) -> Iterator[bytes]:
    position, i = 0, 0
    while position < len(data):
        yield data[position : position + SIZES[i % len(SIZES)]]
        position += SIZES[i % len(SIZES)]
        i += 1


class Encoder:
    """Incremental content-encoding: each piece is flushed so the client can decode it at once."""

    def __init__(self, name: str) -> None:
        self.name = name
        if name in ("gzip", "deflate"):
            self._zlib = zlib.compressobj(6, zlib.DEFLATED, 31 if name == "gzip" else 15)
        elif name == "br":
            self._br = brotli.Compressor()
        elif name == "zstd":
            self._zstd = zstd.ZstdCompressor()
        else:
            raise ValueError(f"unknown encoding {name}")

    def piece(self, data: bytes) -> bytes:
        if self.name in ("gzip", "deflate"):
            return self._zlib.compress(data) + self._zlib.flush(zlib.Z_SYNC_FLUSH)
        if self.name == "br":
            return bytes(self._br.process(data)) + bytes(self._br.flush())
        return self._zstd.compress(data, zstd.ZstdCompressor.FLUSH_BLOCK)

    def end(self) -> bytes:
        if self.name in ("gzip", "deflate"):
            return self._zlib.flush()
        if self.name == "br":
            return bytes(self._br.finish())
        return self._zstd.flush(zstd.ZstdCompressor.FLUSH_FRAME)


def wire_pieces(reply: Reply, encoding: str | None, tail: int = 0) -> list[bytes]:
    body, late = (reply.body[:-tail], reply.body[-tail:]) if tail else (reply.body, b"")
    pieces = list(chunks_of(body)) if reply.streamed else [body]
    pieces += [late] if late else []
    if not encoding:
        return pieces
    encoder = Encoder(encoding)
    encoded = [encoder.piece(p) for p in pieces] + [encoder.end()]
    return [p for p in encoded if p]


def fixture_reply(name: str, request: dict[str, Any], host: str) -> Reply:
    asked = bool((request.get("stream_options") or {}).get("include_usage"))
    if name == "openai_chat_stream.sse" and not asked:
        name = "openai_chat_stream_stripped.sse"  # what OpenAI sends a client that did not ask
    fixture = streams.FIXTURES[name]
    streamed = fixture.content_type in (streams.SSE, streams.EVENTSTREAM) or name == "gemini_stream.json"
    headers = RATE_LIMIT_HEADERS.get(host, []) if fixture.status in (429, 529) else []
    if name.startswith("bedrock_"):
        headers = fake_bedrock.reply_headers(name)
    headers = [*headers, *AZURE_HEADERS] if name.startswith("azure_") else headers
    body = fixture.body if asked or name not in USAGE_IF_ASKED else without_usage(fixture.body)
    return Reply(fixture.status, fixture.content_type, body, streamed, list(headers))


def without_usage(body: bytes) -> bytes:
    """A chat stream as sent to a client that did not ask for usage: no usage-only event, and no
    `usage` on the other chunks (each event is re-encoded compactly, as these fixtures are)."""
    separator = b"\r\n\r\n" if b"\r\n\r\n" in body else b"\n\n"
    kept = []
    for event in body.split(separator):
        data = event.removeprefix(b"data: ")
        if not event.startswith(b"data: {"):
            kept.append(event)
            continue
        chunk = json.loads(data)
        if chunk.get("choices") == [] and "usage" in chunk:
            continue
        if "usage" in chunk:
            del chunk["usage"]
            event = b"data: " + json.dumps(chunk, separators=(",", ":"), ensure_ascii=False).encode()
        kept.append(event)
    return separator.join(kept)


def default_fixture(method: str, path: str, query: str, request: dict[str, Any],
                    host: str = "") -> str | None:
    """The fixture a path gets without asking; None leaves it to fake_upstream."""
    streamed = bool(request.get("stream"))
    if method == "POST" and (found := vertex_fixture(host, path, query)):
        return found
    if method == "POST" and (found := fake_bedrock.default_fixture(path)):
        return found
    if method == "POST" and host.endswith(".azure.com") and _AZURE_CHAT.match(path):  # Groq has /openai/v1/
        return "azure_chat_stream.sse" if streamed else "azure_chat.json"
    for (want_host, suffix), (stream_name, whole_name) in COMPAT_CHAT.items():
        if method == "POST" and path.endswith(suffix) and want_host in (None, host):
            return stream_name if streamed else whole_name
    if method == "POST" and path in ("/v1/responses", "/openai/responses", "/openai/v1/responses"):
        return "openai_responses_stream.sse" if streamed else "openai_responses.json"
    if method == "POST" and path == "/v1/messages/count_tokens":
        return "anthropic_count_tokens.json"
    if (match := _GEMINI.search(path)) and method == "POST":
        kind = match.group(1)
        if kind == "streamGenerateContent":
            return "gemini_stream.sse" if "alt=sse" in query else "gemini_stream.json"
        return "gemini_count_tokens.json" if kind == "countTokens" else "gemini_generate.json"
    return None


def stored_response(response_id: str, status: str) -> dict[str, Any]:
    """The Responses object as a background response is at `status` (usage once completed)."""
    response = json.loads(streams.load("openai_responses.json"))
    response.update(id=response_id, status=status, background=True)
    if status != "completed":
        response.update(output=[], usage=None)
    return response


def resumed_stream(response_id: str, query: str) -> bytes:
    """The stream of a background response from `starting_after` on (OpenAI's stream resume)."""
    after = int(dict(p.split("=", 1) for p in query.split("&") if "=" in p).get("starting_after", -1))
    fixture = streams.load("openai_responses_stream.sse").replace(
        b"resp_67ccd2bed1ec8190b14f964abc0542670bb6a6b452d3795b", response_id.encode())
    events = [e for e in fixture.split(b"\n\n") if e.strip()]
    kept = [e for e in events if json.loads(e.split(b"data: ", 1)[1])["sequence_number"] > after]
    return b"".join(e + b"\n\n" for e in kept)


def background_reply(method: str, path: str, query: str, request: dict[str, Any]) -> Reply | None:
    if method == "POST" and path == "/v1/responses" and request.get("background") is True:
        response_id = "resp_bg" + uuid.uuid4().hex
        BACKGROUND[response_id] = 0
        return Reply(200, streams.JSON, json.dumps(stored_response(response_id, "queued")).encode(),
                     False)
    match = _RESPONSE.match(path)
    if method != "GET" or match is None or match[1] not in BACKGROUND:
        return None
    BACKGROUND[match[1]] += 1
    status = "in_progress" if BACKGROUND[match[1]] == 1 else "completed"
    if "stream=true" in query and status == "completed":
        return Reply(200, streams.SSE, resumed_stream(match[1], query), True)
    return Reply(200, streams.JSON, json.dumps(stored_response(match[1], status)).encode(), False)


def batch_reply(method: str, path: str) -> Reply | None:
    match = _BATCH.match(path)
    if method != "GET" or match is None:
        return None
    if match[2]:  # the results, JSON lines (as Anthropic serves them: application/binary)
        fixture = streams.FIXTURES["anthropic_batch_results.jsonl"]
        return Reply(200, fixture.content_type, fixture.body, False)
    batch = json.loads(streams.load("anthropic_batch.json"))
    batch.update(id=match[1], processing_status="ended", ended_at="2024-09-24T19:02:11.812Z",
                 request_counts={"processing": 0, "succeeded": 2, "errored": 1, "canceled": 0,
                                 "expired": 0},
                 results_url=f"https://api.anthropic.com/v1/messages/batches/{match[1]}/results")
    return Reply(200, streams.JSON, json.dumps(batch).encode(), False)


def vertex_fixture(host: str, path: str, query: str) -> str | None:
    """Vertex AI: Claude's Messages replies on rawPredict, and Vertex's own Gemini replies."""
    if "aiplatform" not in host:
        return None
    if path.endswith("/count-tokens:rawPredict"):
        return "anthropic_count_tokens.json"
    if match := _VERTEX_CLAUDE.search(path):
        return "anthropic_messages_stream.sse" if match.group(2) == "streamRawPredict" else \
            "anthropic_message.json"
    if path.endswith(":streamGenerateContent"):
        return "vertex_gemini_stream.sse" if "alt=sse" in query else "gemini_stream.json"
    if path.endswith(":generateContent"):
        return "vertex_gemini_generate.json"
    return None


def mistral_extra_forbidden() -> Reply:
    """What Mistral answers a request with a field it does not know, stream_options included."""
    detail = [{"type": "extra_forbidden", "loc": ["body", "stream_options"],
               "msg": "Extra inputs are not permitted", "input": {"include_usage": True}}]
    body = {"object": "error", "message": {"detail": detail}, "type": "invalid_request_error",
            "param": None, "code": None}
    return Reply(422, streams.JSON, json.dumps(body).encode(), False)


def big_reply(size: int) -> Reply:
    head = (b'{"id": "msg_big", "type": "message", "role": "assistant", '
            b'"model": "claude-sonnet-4-5-20250929", "content": [{"type": "text", "text": "')
    tail = (b'"}], "stop_reason": "max_tokens", "stop_sequence": null, "usage": {"input_tokens": 100, '
            b'"cache_creation_input_tokens": 0, "cache_read_input_tokens": 0, "output_tokens": 64000}}')
    return Reply(200, streams.JSON, head + b"a" * (size - len(head) - len(tail)) + tail, False)


@functools.cache
def bomb(size: int) -> bytes:
    encoder = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = b" " * BIG_PIECE
    parts = [encoder.compress(b'{"type": "message", "text": "')]
    parts += [encoder.compress(block) for _ in range(size // BIG_PIECE)]
    return b"".join(parts) + encoder.compress(b'"}') + encoder.flush()


def choose(scope: Scope, request: dict[str, Any], headers: dict[str, str]) -> Reply | None:
    host = headers.get("host", headers.get(":authority", "")).split(":")[0]
    if host == "api.mistral.ai" and "stream_options" in request:
        return mistral_extra_forbidden()
    if "x-fake-body" in headers:
        return Reply(200, streams.JSON, headers["x-fake-body"].encode(), False)
    if "x-fake-big" in headers:
        return big_reply(int(headers["x-fake-big"]))
    if "x-fake-bomb" in headers:
        reply = Reply(200, streams.JSON, bomb(int(headers["x-fake-bomb"])), False)
        reply.headers.append((b"content-encoding", b"gzip"))
        return reply
    method, path, query = scope["method"], scope["path"], scope.get("query_string", b"").decode()
    if "x-fake-fixture" not in headers and (
            made := background_reply(method, path, query, request) or batch_reply(method, path)):
        return made
    name = headers.get("x-fake-fixture") or default_fixture(method, path, query, request, host)
    return fixture_reply(name, request, host) if name else None


async def handle(scope: Scope, body: bytes, send: Send) -> bool:
    """Answers the request if a fixture applies; False leaves it to fake_upstream."""
    headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
    try:
        request = json.loads(body) if body else {}
    except ValueError:
        request = {}
    if problem := fake_bedrock.signature_problem(scope, body):
        await send_reply(send, Reply(403, streams.JSON, json.dumps({"message": problem}).encode(), False,
                                     [(b"x-amzn-errortype", b"InvalidSignatureException")]), {})
        return True
    reply = choose(scope, request if isinstance(request, dict) else {}, headers)
    if reply is None:
        return False
    if "x-fake-truncate" in headers:
        reply.body = reply.body[: int(headers["x-fake-truncate"])]
    await send_reply(send, reply, headers)
    return True


async def send_reply(send: Send, reply: Reply, headers: dict[str, str]) -> None:
    encoding = headers.get("x-fake-encoding")
    tail = int(headers.get("x-fake-tail-bytes", "0"))
    pieces = wire_pieces(reply, encoding, tail)
    out: Headers = [(b"content-type", reply.content_type.encode()), *reply.headers]
    if encoding or "x-fake-lie-encoding" in headers:
        out.append((b"content-encoding", (encoding or headers["x-fake-lie-encoding"]).encode()))
    if not reply.streamed and "x-fake-unsized" not in headers:
        out.append((b"content-length", str(sum(map(len, pieces))).encode()))
    await send({"type": "http.response.start", "status": reply.status, "headers": out})
    abort = int(headers["x-fake-abort"]) if "x-fake-abort" in headers else None
    pause = int(headers.get("x-fake-pause-ms", "10")) / 1000 if reply.streamed else 0
    sent = 0
    trailer_delay = int(headers.get("x-fake-trailer-delay-ms", "0")) / 1000
    for n, piece in enumerate(pieces):
        if trailer_delay and (encoding or tail) and n == len(pieces) - 1:  # the end, late
            await asyncio.sleep(trailer_delay)
        for part in (piece[i : i + BIG_PIECE] for i in range(0, len(piece), BIG_PIECE)):
            if abort is not None and sent + len(part) > abort:
                await send({"type": "http.response.body", "body": part[: abort - sent], "more_body": True})
                raise ConnectionAbortedError("x-fake-abort")  # hypercorn resets the connection
            await send({"type": "http.response.body", "body": part, "more_body": True})
            sent += len(part)
        if pause:
            await asyncio.sleep(pause)
    if trailer_delay and not (encoding or tail):  # the last chunk / END_STREAM, late
        await asyncio.sleep(trailer_delay)
    await send({"type": "http.response.body", "body": b""})


async def websocket(scope: Scope, receive: Receive, send: Send,
                    log: Callable[[Scope, bytes], None]) -> None:
    """The Responses WebSocket: every response.create gets the fixture's server events. An upgrade
    with `x-fake-reject: STATUS` is refused with that status and OpenAI's error body instead."""
    log({**scope, "method": "WEBSOCKET"}, b"")
    reject = dict(scope["headers"]).get(b"x-fake-reject")
    while True:
        message = await receive()
        if message["type"] == "websocket.connect" and reject:
            body = json.dumps({"error": {"message": "Incorrect API key provided.", "code":
                                         "invalid_api_key", "type": "invalid_request_error",
                                         "param": None}}).encode()
            await send({"type": "websocket.http.response.start", "status": int(reject),
                        "headers": [(b"content-type", b"application/json"),
                                    (b"content-length", str(len(body)).encode())]})
            await send({"type": "websocket.http.response.body", "body": body})
            return
        if message["type"] == "websocket.connect":
            await send({"type": "websocket.accept"})
        elif message["type"] == "websocket.disconnect":
            return
        elif message["type"] == "websocket.receive":
            text = message.get("text") or (message.get("bytes") or b"").decode()
            log({**scope, "method": "WEBSOCKET"}, text.encode())
            if json.loads(text).get("type") == "response.create":
                for line in streams.openai_responses_ws_messages():
                    await send({"type": "websocket.send", "text": line.decode()})
                    await asyncio.sleep(0.005)
