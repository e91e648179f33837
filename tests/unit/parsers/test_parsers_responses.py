"""OpenAI Responses: SSE and JSON replies, failed/incomplete, the WebSocket transport."""

from __future__ import annotations

import hashlib
import json

from hypothesis import given, settings
from hypothesis import strategies as st
from llmtap.parsers import ResponsesWebSocket, parse_request
from parser_helpers import T0, body, cuts_for, run, split, stable, usage
from streams import load, openai_responses_ws_create, openai_responses_ws_messages

STREAM = "openai_responses_stream.sse"


def test_stream_record_fields() -> None:
    result = run(STREAM)
    assert (result["provider"], result["api"], result["stream"]) == ("openai", "responses", True)
    assert result["model"] == "gpt-5-2025-08-07"
    # input_tokens 2345 includes 1920 cached; output 612 includes 448 reasoning.
    assert result["usage"] == usage(
        input_tokens=425, output_tokens=612, cache_read_tokens=1920, reasoning_tokens=448
    )
    assert result["stop_reason"] == "completed"
    assert result["events"] == 12
    assert result["error"] is None
    assert result["service_tier"] == "default"


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_any_rechunking_gives_the_same_result(data: st.DataObject) -> None:
    for name in (
        STREAM,
        "openai_responses_stream_incomplete.sse",
        "openai_responses_stream_failed.sse",
    ):
        raw = load(name)
        chunks = split(raw, data.draw(cuts_for(raw)))
        assert stable(run(name, chunks)) == stable(run(name))


def test_incomplete_with_tool_call() -> None:
    result = run("openai_responses_stream_incomplete.sse")
    assert result["model"] == "gpt-5-codex"
    assert result["stop_reason"] == "max_output_tokens"
    assert result["tool_calls"] == ["get_weather"]
    assert result["usage"] == usage(input_tokens=812, output_tokens=64, reasoning_tokens=50)
    assert result["error"] is None


def test_failed() -> None:
    result = run("openai_responses_stream_failed.sse")
    assert result["stop_reason"] == "failed"
    assert result["error"] == "server_error: The model failed to generate a response."
    assert result["usage"]["input_tokens"] is None


def test_error_event() -> None:
    raw = load(STREAM)
    cut = raw.index(b"event: response.output_item.added")
    error = {"type": "error", "code": "rate_limit_exceeded", "message": "Slow down", "param": None,
             "sequence_number": 2}  # fmt: skip
    result = run(STREAM, [raw[:cut] + f"event: error\ndata: {json.dumps(error)}\n\n".encode()])
    assert result["error"] == "rate_limit_exceeded: Slow down"


def test_truncated_stream() -> None:
    raw = load(STREAM)
    result = run(STREAM, [raw[: raw.index(b"event: response.completed")]])
    assert result["error"] == "llmtap: stream ended before response.completed"
    assert result["model"] == "gpt-5-2025-08-07"


def test_json_reply() -> None:
    result = run("openai_responses.json")
    assert result["stream"] is False
    assert result["model"] == "gpt-4.1-mini-2025-04-14"
    assert result["usage"] == usage(input_tokens=36, output_tokens=87)
    assert result["stop_reason"] == "completed"


def test_request_fields() -> None:
    request = {
        "model": "gpt-5",
        "stream": True,
        "instructions": "You are a terse assistant.",
        "max_output_tokens": 2048,
        "reasoning": {"effort": "high"},
        "tools": [
            {"type": "function", "name": "shell", "parameters": {}},
            {"type": "web_search"},
        ],
        "input": "hi",
    }
    info = parse_request("api.openai.com", "POST", "/v1/responses", body(request))
    assert (info.api, info.model, info.stream, info.max_tokens) == ("responses", "gpt-5", True, 2048)
    assert info.system_sha256 == hashlib.sha256(b"You are a terse assistant.").hexdigest()
    assert info.tools == ["shell", "web_search"]
    assert info.record()["reasoning_effort"] == "high"


def test_request_system_from_input_items() -> None:
    request = {"model": "gpt-5", "input": [
        {"role": "developer", "content": [{"type": "input_text", "text": "Rules."}]},
        {"role": "user", "content": "hi"}]}  # fmt: skip
    info = parse_request("api.openai.com", "POST", "/v1/responses", body(request))
    assert info.system_sha256 == hashlib.sha256(b"Rules.").hexdigest()


# -- WebSocket -------------------------------------------------------------------------------------


def test_websocket_exchange_matches_the_sse_result() -> None:
    socket = ResponsesWebSocket()
    assert socket.client_message(openai_responses_ws_create(), T0) == []
    ended = []
    for i, message in enumerate(openai_responses_ws_messages()):
        ended += socket.server_message(message.decode(), T0 + 0.1 * (i + 1))
    assert len(ended) == 1
    exchange = ended[0]
    assert exchange.request["model"] == "gpt-5" and exchange.request["stream"] is True
    result = exchange.parser.result()
    sse = run(STREAM)
    for key in ("provider", "api", "model", "stream", "usage", "stop_reason", "error", "events"):
        assert result[key] == sse[key], key
    assert result["chunks"] == 12
    assert result["ttft_ms"] == 700.0  # the 7th message is the first output_text.delta


def test_websocket_several_responses_and_a_close() -> None:
    socket = ResponsesWebSocket()
    messages = openai_responses_ws_messages()
    socket.client_message(openai_responses_ws_create(), T0)
    socket.client_message(openai_responses_ws_create(), T0 + 1)
    ended = []
    for message in messages + messages[:3]:
        ended += socket.server_message(message, T0 + 2)
    assert len(ended) == 1 and ended[0].parser.error is None
    closed = socket.close(T0 + 3)
    assert len(closed) == 1
    assert closed[0].parser.result()["error"] == ("llmtap: WebSocket closed before response.completed")


def test_websocket_error_message_ends_the_exchange() -> None:
    socket = ResponsesWebSocket()
    socket.client_message(json.dumps({"type": "response.create", "model": "gpt-5"}), T0)
    error = {"type": "error", "status": 400,
             "error": {"type": "invalid_request_error", "code": "previous_response_not_found",
                       "message": "Previous response not found."}}  # fmt: skip
    ended = socket.server_message(json.dumps(error), T0 + 0.1)
    assert len(ended) == 1
    assert ended[0].parser.result()["error"] == ("previous_response_not_found: Previous response not found.")


def test_websocket_garbage_never_raises() -> None:
    socket = ResponsesWebSocket()
    assert socket.client_message(b"\xff not json", T0) == []
    socket.client_message(json.dumps({"type": "response.create", "model": "gpt-5"}), T0)
    assert socket.server_message(b"{broken", T0) == []
    ended = socket.server_message(json.dumps({"type": "response.completed", "response": {}}), T0)
    assert len(ended) == 1
    assert ended[0].parser.result()["error"].startswith("llmtap: invalid JSON in WebSocket message")
