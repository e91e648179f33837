"""AWS event-stream frames built byte for byte from the spec, and the Bedrock fixtures made of them.

    frame([(":event-type", 7, "chunk"), ...], payload)   # (name, type byte, value) headers

`python tests/support/aws_eventstream.py` rewrites the binary Bedrock fixtures under
tests/fixtures/streams/ from the event lists below (test_bedrock_eventstream checks that the
committed files are exactly what this makes, and that botocore's own decoder reads them).
Bedrock pads each event's JSON with a `p` field of random letters (against length side channels);
the fixtures carry it too, with fixed lengths so the bytes are reproducible.
"""

from __future__ import annotations

import base64
import json
import string
import struct
import zlib
from typing import Any

import paths

DIR = paths.STREAMS
Header = tuple[str, int, Any]
_FIXED = {2: ">b", 3: ">h", 4: ">i", 5: ">q", 8: ">q"}


def header(name: str, kind: int, value: Any) -> bytes:
    raw = name.encode()
    out = struct.pack(">B", len(raw)) + raw + struct.pack(">B", kind)
    if kind in (0, 1):
        return out
    if kind in (6, 7):
        data = value.encode() if isinstance(value, str) else bytes(value)
        return out + struct.pack(">H", len(data)) + data
    if kind == 9:
        return out + bytes(value)
    return out + struct.pack(_FIXED[kind], value)


def frame(headers: list[Header], payload: bytes) -> bytes:
    head = b"".join(header(*h) for h in headers)
    total = 12 + len(head) + len(payload) + 4
    prelude = struct.pack(">II", total, len(head))
    prelude += struct.pack(">I", zlib.crc32(prelude))
    body = prelude + head + payload
    return body + struct.pack(">I", zlib.crc32(body))


def pad(n: int) -> str:
    return (string.ascii_letters + string.digits)[: n % 62 + 1]


def event(event_type: str, payload: dict[str, Any], padding: int = 0) -> bytes:
    if padding:
        payload = {**payload, "p": pad(padding)}
    return frame([(":event-type", 7, event_type), (":content-type", 7, "application/json"),
                  (":message-type", 7, "event")], json.dumps(payload, separators=(",", ":")).encode())


def exception(exception_type: str, message: str) -> bytes:
    return frame([(":exception-type", 7, exception_type), (":content-type", 7, "application/json"),
                  (":message-type", 7, "exception")], json.dumps({"message": message}).encode())


def chunk(inner: dict[str, Any], padding: int) -> bytes:
    """InvokeModelWithResponseStream: one model event, base64 in a `chunk` event's `bytes`."""
    raw = json.dumps(inner, separators=(",", ":")).encode()
    return event("chunk", {"bytes": base64.b64encode(raw).decode()}, padding)


# -- the fixtures -------------------------------------------------------------------------------

SONNET = "claude-sonnet-4-5-20250929"
METRICS = {"inputTokenCount": 472, "outputTokenCount": 189, "invocationLatency": 2917,
           "firstByteLatency": 611, "cacheReadInputTokenCount": 10240,
           "cacheWriteInputTokenCount": 2048}


def invoke_stream_events() -> list[dict[str, Any]]:
    """Claude's Messages events as Bedrock relays them: tool use, cache usage, invocationMetrics."""
    return [
        {"type": "message_start", "message": {
            "id": "msg_bdrk_01XFDUDYJgAACzvnptvVoYEL", "type": "message", "role": "assistant",
            "model": SONNET, "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": 472, "cache_creation_input_tokens": 2048,
                      "cache_read_input_tokens": 10240, "output_tokens": 3,
                      "cache_creation": {"ephemeral_5m_input_tokens": 1536,
                                         "ephemeral_1h_input_tokens": 512}}}},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0,
         "delta": {"type": "text_delta", "text": "Je vérifie la météo à Paris. "}},
        {"type": "content_block_delta", "index": 0,
         "delta": {"type": "text_delta", "text": "Un instant… ☀️"}},
        {"type": "content_block_stop", "index": 0},
        {"type": "content_block_start", "index": 1, "content_block": {
            "type": "tool_use", "id": "toolu_bdrk_01T1x1fJ34qAmk2tNTrN7Up6", "name": "get_weather",
            "input": {}}},
        {"type": "content_block_delta", "index": 1,
         "delta": {"type": "input_json_delta", "partial_json": "{\"city\": \"Pa"}},
        {"type": "content_block_delta", "index": 1,
         "delta": {"type": "input_json_delta", "partial_json": "ris\"}"}},
        {"type": "content_block_stop", "index": 1},
        {"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": None},
         "usage": {"output_tokens": 189}},
        {"type": "message_stop", "amazon-bedrock-invocationMetrics": METRICS},
    ]


def invoke_stream() -> bytes:
    return b"".join(chunk(e, 7 * n + 3) for n, e in enumerate(invoke_stream_events()))


def converse_stream_events() -> list[tuple[str, dict[str, Any]]]:
    return [
        ("messageStart", {"role": "assistant"}),
        ("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"reasoningContent": {
            "text": "The user wants the weather; I should call the tool."}}}),
        ("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"reasoningContent": {
            "signature": "EqQBCkgIARABGAIiQL2Ft3h0"}}}),
        ("contentBlockStop", {"contentBlockIndex": 0}),
        ("contentBlockDelta", {"contentBlockIndex": 1, "delta": {"text": "Je regarde "}}),
        ("contentBlockDelta", {"contentBlockIndex": 1, "delta": {"text": "la météo… ☀️"}}),
        ("contentBlockStop", {"contentBlockIndex": 1}),
        ("contentBlockStart", {"contentBlockIndex": 2, "start": {"toolUse": {
            "toolUseId": "tooluse_kZJMlvQmRJ6eAyJE5GIl7Q", "name": "get_weather"}}}),
        ("contentBlockDelta", {"contentBlockIndex": 2, "delta": {"toolUse": {
            "input": "{\"city\": \"Paris\"}"}}}),
        ("contentBlockStop", {"contentBlockIndex": 2}),
        ("messageStop", {"stopReason": "tool_use"}),
        ("metadata", {"usage": {
            "inputTokens": 1210, "outputTokens": 96, "totalTokens": 5402,
            "cacheReadInputTokens": 3072, "cacheWriteInputTokens": 1024,
            "cacheDetails": [{"ttl": "1h", "inputTokens": 1024}]},
            "metrics": {"latencyMs": 1843}}),
    ]


def converse_stream() -> bytes:
    return b"".join(event(name, obj, 5 * n + 11) for n, (name, obj) in enumerate(converse_stream_events()))


def converse_stream_throttled() -> bytes:
    """A stream that fails midway: a throttlingException message ends it."""
    head = converse_stream_events()[:5]
    return b"".join(event(name, obj, 9) for name, obj in head) + exception(
        "throttlingException", "Too many tokens, please wait before trying again.")


def llama_stream() -> bytes:
    """InvokeModelWithResponseStream with Meta Llama: its own chunk format, Bedrock's metrics last."""
    chunks: list[dict[str, Any]] = [
        {"generation": "Hello", "prompt_token_count": 18, "generation_token_count": 1,
         "stop_reason": None},
        {"generation": " there!", "prompt_token_count": None, "generation_token_count": 3,
         "stop_reason": None},
        {"generation": "", "prompt_token_count": None, "generation_token_count": 4,
         "stop_reason": "stop", "amazon-bedrock-invocationMetrics": {
             "inputTokenCount": 18, "outputTokenCount": 4, "invocationLatency": 412,
             "firstByteLatency": 201}},
    ]
    return b"".join(chunk(c, 13 * n + 2) for n, c in enumerate(chunks))


BINARY_FIXTURES = {
    "bedrock_invoke_stream.eventstream": invoke_stream,
    "bedrock_converse_stream.eventstream": converse_stream,
    "bedrock_converse_stream_throttled.eventstream": converse_stream_throttled,
    "bedrock_invoke_stream_llama.eventstream": llama_stream,
}


if __name__ == "__main__":
    for name, make in BINARY_FIXTURES.items():
        (DIR / name).write_bytes(make())
        print("wrote", DIR / name)
