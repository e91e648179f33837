"""A wire-accurate fake of the providers' APIs, run by the test bed inside the upstream namespace.

    python fake_upstream.py --cert C --key K --log L --bind 10.0.0.2:443 --bind [fd00::2]:443

Served by hypercorn over TLS with ALPN h2 and http/1.1. Every request is appended to the log file
as one JSON line (headers included), so tests can see exactly what reached the "provider".
Streams are sent in awkwardly split chunks with small pauses, as real SSE arrives.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import fake_providers  # wire-accurate fixture replies (tests/support/fake_providers.py)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

LOG: Path | None = None
CHUNK_PAUSE_S = 0.01


def anthropic_sse(model: str, text: str = "Hello from the fake upstream.",
                  usage: dict[str, Any] | None = None) -> bytes:
    """A Messages stream; `usage` (Anthropic's object, e.g. from the x-fake-usage header) replaces
    the default counts: message_start carries it, message_delta its final output_tokens."""
    start_usage = {"input_tokens": 25, "cache_creation_input_tokens": 0,
                   "cache_read_input_tokens": 0, "output_tokens": 1}
    final_output = 12
    if usage:
        start_usage = {**usage, "output_tokens": 1}
        final_output = int(usage.get("output_tokens", final_output))
    events: list[tuple[str, dict[str, Any]]] = [
        ("message_start", {"type": "message_start", "message": {
            "id": "msg_01Fake", "type": "message", "role": "assistant", "model": model,
            "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": start_usage}}),
        ("content_block_start", {"type": "content_block_start", "index": 0,
                                 "content_block": {"type": "text", "text": ""}}),
        ("ping", {"type": "ping"}),
    ]
    for word in text.split(" "):
        events.append(("content_block_delta", {
            "type": "content_block_delta", "index": 0,
            "delta": {"type": "text_delta", "text": word + " "}}))
    events += [
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("message_delta", {"type": "message_delta",
                           "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                           "usage": {"output_tokens": final_output}}),
        ("message_stop", {"type": "message_stop"}),
    ]
    return b"".join(
        f"event: {name}\ndata: {json.dumps(data)}\n\n".encode() for name, data in events
    )


def anthropic_json(model: str) -> dict[str, Any]:
    return {
        "id": "msg_01Fake", "type": "message", "role": "assistant", "model": model,
        "content": [{"type": "text", "text": "Hello from the fake upstream."}],
        "stop_reason": "end_turn", "stop_sequence": None,
        "usage": {"input_tokens": 25, "cache_creation_input_tokens": 0,
                  "cache_read_input_tokens": 0, "output_tokens": 12},
    }


def openai_chat_sse(model: str, include_usage: bool) -> bytes:
    base = {"id": "chatcmpl-Fake", "object": "chat.completion.chunk", "created": 1700000000,
            "model": model, "system_fingerprint": "fp_fake"}
    chunks = [{**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                    "logprobs": None, "finish_reason": None}]}]
    for word in ("Hello", " from", " the", " fake", " upstream."):
        chunks.append({**base, "choices": [{"index": 0, "delta": {"content": word},
                                            "logprobs": None, "finish_reason": None}]})
    chunks.append({**base, "choices": [{"index": 0, "delta": {}, "logprobs": None,
                                        "finish_reason": "stop"}]})
    if include_usage:
        chunks.append({**base, "choices": [], "usage": {
            "prompt_tokens": 19, "completion_tokens": 10, "total_tokens": 29,
            "prompt_tokens_details": {"cached_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0}}})
    body = b"".join(f"data: {json.dumps(c)}\n\n".encode() for c in chunks)
    return body + b"data: [DONE]\n\n"


def openai_chat_json(model: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-Fake", "object": "chat.completion", "created": 1700000000, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant",
                                             "content": "Hello from the fake upstream.",
                                             "refusal": None},
                     "logprobs": None, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 19, "completion_tokens": 10, "total_tokens": 29},
        "system_fingerprint": "fp_fake",
    }


def awkward_chunks(data: bytes) -> Iterator[bytes]:
    """Splits at sizes that cut lines, events and multi-byte characters apart."""
    sizes = (1, 7, 3, 64, 2, 31, 5, 128)
    position, i = 0, 0
    while position < len(data):
        size = sizes[i % len(sizes)]
        yield data[position : position + size]
        position += size
        i += 1


async def read_body(receive: Receive) -> bytes:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body


def log_request(scope: Scope, body: bytes) -> None:
    if LOG is None:
        return
    entry = {
        "time": time.time(),
        "http_version": scope.get("http_version"),
        "method": scope["method"],
        "path": scope["path"],
        "query": scope.get("query_string", b"").decode(),
        "headers": {k.decode().lower(): v.decode() for k, v in scope["headers"]},
        "client": list(scope.get("client") or []),
        "server": list(scope.get("server") or []),
        "body": body.decode("utf-8", "replace"),
    }
    with LOG.open("a") as out:
        out.write(json.dumps(entry) + "\n")


async def respond(send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [*headers, (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def stream(send: Send, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    for chunk in awkward_chunks(body):
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await asyncio.sleep(CHUNK_PAUSE_S)
    await send({"type": "http.response.body", "body": b""})


async def bench(scope: Scope, send: Send) -> None:
    """Anthropic-shaped answers for the benchmarks, so the whole pipeline (parsers, pricing,
    records) does its real work. ?bench=json: a Messages reply at once. ?bench=stream&n=N&gap_ms=G:
    a Messages stream of N text deltas G ms apart, each text the time it was sent, so the client
    can measure each chunk's delay."""
    query = dict(p.split("=", 1) for p in scope.get("query_string", b"").decode().split("&") if "=" in p)
    if query["bench"] == "json":
        await respond(send, 200, json.dumps(anthropic_json("claude-sonnet-4-5")).encode(), JSON_HEADERS)
        return
    events, gap = int(query.get("n", "20")), float(query.get("gap_ms", "10"))
    frames = anthropic_sse("claude-sonnet-4-5", "x").split(b"\n\n")
    head = b"\n\n".join(frames[:3]) + b"\n\n"  # message_start, content_block_start, ping
    tail = b"\n\n".join(frames[4:])  # after the one text delta: block stop, delta, message stop
    await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
    await send({"type": "http.response.body", "body": head, "more_body": True})
    for _ in range(events):
        await asyncio.sleep(gap / 1000)
        delta = {"type": "content_block_delta", "index": 0,
                 "delta": {"type": "text_delta", "text": repr(time.time())}}
        frame = f"event: content_block_delta\ndata: {json.dumps(delta)}\n\n".encode()
        await send({"type": "http.response.body", "body": frame, "more_body": True})
    await send({"type": "http.response.body", "body": tail})


SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8"),
               (b"cache-control", b"no-cache")]
JSON_HEADERS = [(b"content-type", b"application/json")]


async def echo_headers(scope: Scope, send: Send) -> None:
    """Credentials tests: an upstream that echoes the request's headers (keys included) back, in
    response headers and in the body, streamed in awkward chunks with `?stream=1&pause=S`."""
    headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
    echo = [(f"x-echo-{n}".encode(), headers[n].encode()) for n in ("x-api-key", "authorization", "api-key")
            if n in headers]
    body = json.dumps({"headers": headers}).encode()
    query = dict(p.split("=", 1) for p in scope.get("query_string", b"").decode().split("&") if "=" in p)
    if query.get("stream") != "1":
        await respond(send, 200, body, [*JSON_HEADERS, *echo])
        return
    # x-fake-encoding: E compresses the stream, unless the client asked for identity and the
    # test did not also send x-fake-ignore-accept-encoding (an upstream that ignores it).
    encoding = headers.get("x-fake-encoding")
    if headers.get("accept-encoding") == "identity" and "x-fake-ignore-accept-encoding" not in headers:
        encoding = None
    encoder = fake_providers.Encoder(encoding) if encoding else None
    framing = [(b"content-encoding", encoding.encode())] if encoding else []
    await send({"type": "http.response.start", "status": 200,
                "headers": [*SSE_HEADERS, *echo, *framing]})
    for chunk in awkward_chunks(b"data: " + body + b"\n\nevent: done\ndata: {}\n\n"):
        chunk = encoder.piece(chunk) if encoder else chunk
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await asyncio.sleep(float(query.get("pause", CHUNK_PAUSE_S)))
    await send({"type": "http.response.body", "body": encoder.end() if encoder else b""})


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] == "websocket":
        await fake_providers.websocket(scope, receive, send, log_request)
        return
    body = await read_body(receive)
    if b"bench=" in scope.get("query_string", b""):  # benchmarks: not logged, same for every arm
        await bench(scope, send)
        return
    log_request(scope, body)
    if await fake_providers.handle(scope, body, send):
        return
    path = scope["path"]
    try:
        request = json.loads(body) if body else {}
    except ValueError:
        request = {}
    model = str(request.get("model", "unknown")) if isinstance(request, dict) else "unknown"
    streamed = isinstance(request, dict) and bool(request.get("stream"))
    if path == "/v1/messages":
        if streamed:
            usage = json.loads(dict(scope["headers"]).get(b"x-fake-usage", b"null"))
            await stream(send, anthropic_sse(model, usage=usage), SSE_HEADERS)
        else:
            await respond(send, 200, json.dumps(anthropic_json(model)).encode(), JSON_HEADERS)
    elif path == "/v1/chat/completions":
        if streamed:
            usage = bool((request.get("stream_options") or {}).get("include_usage"))
            await stream(send, openai_chat_sse(model, usage), SSE_HEADERS)
        else:
            await respond(send, 200, json.dumps(openai_chat_json(model)).encode(), JSON_HEADERS)
    elif path == "/gzip":
        await respond(send, 200, gzip.compress(b'{"compressed": true}'),
                      [*JSON_HEADERS, (b"content-encoding", b"gzip")])
    elif path == "/llmtap-test/echo-headers":
        await echo_headers(scope, send)
    elif path.startswith("/bytes/"):
        size = int(path.rsplit("/", 1)[1])
        await respond(send, 200, b"x" * size, [(b"content-type", b"application/octet-stream")])
    else:
        echo = {"path": path, "method": scope["method"], "http_version": scope["http_version"],
                "host": dict(scope["headers"]).get(b"host", b"").decode()}
        await respond(send, 200, json.dumps(echo).encode(), JSON_HEADERS)


def main() -> None:
    global LOG
    parser = argparse.ArgumentParser()
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--bind", action="append", required=True)
    args = parser.parse_args()
    LOG = Path(args.log)

    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    config = Config()
    config.bind = args.bind
    config.certfile = args.cert
    config.keyfile = args.key
    config.alpn_protocols = ["h2", "http/1.1"]
    config.accesslog = None
    config.errorlog = "-"
    config.loglevel = "WARNING"
    asyncio.run(serve(app, config))  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
