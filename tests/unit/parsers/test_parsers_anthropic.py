"""Anthropic Messages: SSE and JSON replies, errors, count_tokens, batches, request fields."""

from __future__ import annotations

import gzip
import hashlib
import json
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from llmtap.parsers import parse_request, response_parser
from llmtap.parsers.base import Limits
from parser_helpers import T0, body, cuts_for, run, split, stable, usage
from streams import load

STREAM = "anthropic_messages_stream.sse"


def test_stream_record_fields() -> None:
    result = run(STREAM)
    assert result["provider"] == "anthropic" and result["api"] == "messages"
    assert result["model"] == "claude-sonnet-4-5-20250929"
    assert result["stream"] is True
    # message_delta's cumulative totals win; the 5m/1h split comes from message_start.
    assert result["usage"] == usage(
        input_tokens=472,
        output_tokens=189,
        cache_read_tokens=10240,
        cache_write_5m_tokens=1536,
        cache_write_1h_tokens=512,
        reasoning_tokens=None,
    )
    assert result["stop_reason"] == "tool_use"
    assert result["tool_calls"] == ["get_weather"]
    assert result["events"] == 18
    assert result["error"] is None
    assert result["response_id"] == "msg_01XFDUDYJgAACzvnptvVoYEL"
    assert result["service_tier"] == "standard"


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_any_rechunking_gives_the_same_result(data: st.DataObject) -> None:
    for name in (STREAM, "anthropic_overloaded_stream.sse"):
        raw = load(name)
        chunks = split(raw, data.draw(cuts_for(raw)))
        assert stable(run(name, chunks)) == stable(run(name))


def test_crlf_stream_gives_the_same_result() -> None:
    raw = load(STREAM).replace(b"\n", b"\r\n")
    assert stable(run(STREAM, [raw])) == stable(run(STREAM))


def test_ttft_is_the_first_content_delta() -> None:
    raw = load(STREAM)
    first_delta = raw.index(b"event: content_block_delta")
    info = parse_request("api.anthropic.com", "POST", "/v1/messages", b"")
    parser = response_parser(info, started=T0, headers={"content-type": "text/event-stream"})
    parser.feed(raw[:first_delta], T0 + 0.2)  # message_start, block start, ping
    parser.feed(raw[first_delta:], T0 + 0.5)
    parser.feed(b"", T0 + 0.6)
    assert parser.result()["ttft_ms"] == 500.0
    assert parser.result()["first_byte_ms"] == 200.0


def test_usage_without_delta_totals_or_split() -> None:
    events = [
        {"type": "message_start", "message": {"model": "claude-3-5-haiku-20241022", "usage": {
            "input_tokens": 10, "cache_creation_input_tokens": 300,
            "cache_read_input_tokens": 0, "output_tokens": 1}}},
        {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 42}},
        {"type": "message_stop"},
    ]  # fmt: skip
    raw = "".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n" for e in events).encode()
    result = run(STREAM, [raw])
    # With no cache_creation split, all cache writes are the default 5-minute TTL.
    assert result["usage"] == usage(
        input_tokens=10, output_tokens=42, cache_write_5m_tokens=300, reasoning_tokens=None
    )
    assert result["stop_reason"] == "end_turn"


def test_overloaded_error_event() -> None:
    result = run("anthropic_overloaded_stream.sse")
    assert result["error"] == "overloaded_error: Overloaded"
    assert result["model"] == "claude-opus-4-1-20250805"
    assert result["usage"]["input_tokens"] == 25


def test_json_message() -> None:
    result = run("anthropic_message.json")
    assert result["stream"] is False
    assert result["model"] == "claude-haiku-4-5-20251001"
    assert result["usage"] == usage(
        input_tokens=2095,
        output_tokens=503,
        cache_read_tokens=3000,
        cache_write_1h_tokens=1000,
        reasoning_tokens=None,
    )
    assert result["stop_reason"] == "tool_use"
    assert result["tool_calls"] == ["get_weather"]
    assert result["ttft_ms"] == result["first_byte_ms"]


def test_http_error_body() -> None:
    result = run("anthropic_error_529.json")
    assert result["error"] == "overloaded_error: Overloaded"
    assert result["usage"]["input_tokens"] is None
    assert result["ttft_ms"] is None


def test_non_json_error_page() -> None:
    result = run("anthropic_message.json", [b"<html>502 Bad Gateway</html>"], status=502)
    assert result["error"] == "http 502: <html>502 Bad Gateway</html>"


def test_count_tokens_is_free() -> None:
    result = run("anthropic_count_tokens.json")
    assert result["api"] == "messages.count_tokens"
    assert result["counted_input_tokens"] == 2095
    assert result["usage"] == usage(reasoning_tokens=None)


def test_batch_create_and_results() -> None:
    created = run("anthropic_batch.json")
    assert created["batch"]["id"] == "msgbatch_01HkcTjaV5uDC8jWR4ZsDV8d"
    assert created["batch"]["processing_status"] == "in_progress"
    results = run("anthropic_batch_results.jsonl")
    assert results["api"] == "messages.batches.results"
    assert results["usage"] == usage(input_tokens=18, output_tokens=46, reasoning_tokens=None)
    assert results["batch"] == {"results": {"succeeded": 2, "errored": 1}}
    assert results["batch_pricing"] is True
    assert results["error"] is None


# -- bad input -----------------------------------------------------------------------------------


def test_truncated_stream() -> None:
    raw = load(STREAM)
    result = run(STREAM, [raw[: raw.index(b"event: message_delta")]])
    assert result["error"] == "llmtap: stream ended before message_stop"
    assert result["usage"]["output_tokens"] == 2  # what message_start said


def test_truncated_mid_event() -> None:
    raw = load(STREAM)
    result = run(STREAM, [raw[: raw.index(b"event: message_stop") + 30]])
    assert result["error"] == "llmtap: stream ended inside an SSE event"


def test_invalid_json_line_stops_parsing_but_not_the_caller() -> None:
    raw = load(STREAM)
    at = raw.index(b"event: content_block_stop")
    bad = raw[:at] + b"event: content_block_delta\ndata: {not json\n\n" + raw[at:]
    result = run(STREAM, [bad])
    assert result["error"].startswith("llmtap: invalid JSON in SSE event 'content_block_delta'")
    assert result["chunks"] == 1
    assert result["stop_reason"] is None  # parsing stopped before message_delta


def test_gzip_stream() -> None:
    raw = gzip.compress(load(STREAM))
    headers = {"content-type": "text/event-stream", "content-encoding": "gzip"}
    chunks = [raw[i : i + 50] for i in range(0, len(raw), 50)]
    assert stable(run(STREAM, chunks, headers=headers)) == stable(run(STREAM))


def test_wrong_content_encoding() -> None:
    headers = {"content-type": "text/event-stream", "content-encoding": "gzip"}
    result = run(STREAM, headers=headers)
    assert result["error"].startswith("llmtap: corrupt gzip body")


def test_decompression_bomb() -> None:
    bomb = gzip.compress(b" " * (50 * 1024 * 1024))
    headers = {"content-type": "application/json", "content-encoding": "gzip"}
    limits = Limits(max_decoded_bytes=4 * 1024 * 1024)
    result = run("anthropic_message.json", [bomb], headers=headers, limits=limits)
    assert "decompression bomb" in result["error"]


def test_oversized_json_body_is_parsed_best_effort() -> None:
    message = json.loads(load("anthropic_message.json"))
    message["content"][0]["text"] = "x" * (3 * 1024 * 1024)
    raw = json.dumps(message).encode()
    limits = Limits(max_json_body_bytes=1024 * 1024)
    chunks = [raw[i : i + 65536] for i in range(0, len(raw), 65536)]
    result = run("anthropic_message.json", chunks, limits=limits)
    assert result["model"] == "claude-haiku-4-5-20251001"
    assert result["usage"]["output_tokens"] == 503
    assert "parsed best-effort" in result["error"]


# -- request side -----------------------------------------------------------------------------


def test_request_fields() -> None:
    request = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 1024,
        "temperature": 0.2,
        "stream": True,
        "system": [
            {"type": "text", "text": "You are terse."},
            {"type": "text", "text": "Cite sources.", "cache_control": {"type": "ephemeral"}},
        ],
        "thinking": {"type": "enabled", "budget_tokens": 2048},
        "tools": [
            {"name": "get_weather", "input_schema": {"type": "object"}},
            {"type": "web_search_20250305", "name": "web_search"},
        ],
        "messages": [{"role": "user", "content": "hi"}],
    }
    info = parse_request("api.anthropic.com", "POST", "/v1/messages", body(request))
    assert (info.provider, info.api, info.model, info.stream) == (
        "anthropic",
        "messages",
        "claude-sonnet-4-5",
        True,
    )
    assert info.record() == {
        "temperature": 0.2,
        "max_tokens": 1024,
        "system_sha256": hashlib.sha256(b"You are terse.\n\nCite sources.").hexdigest(),
        "tools": ["get_weather", "web_search"],
        "thinking_budget": 2048,
    }


def test_request_string_system_and_batch() -> None:
    info = parse_request("api.anthropic.com", "POST", "/v1/messages", body({"model": "m", "system": "S"}))
    assert info.system_sha256 == hashlib.sha256(b"S").hexdigest()
    assert info.stream is False
    batch = {"requests": [{"custom_id": "a", "params": {"model": "claude-haiku-4-5"}}] * 3}
    info = parse_request("api.anthropic.com", "POST", "/v1/messages/batches", body(batch))
    assert info.model == "claude-haiku-4-5"
    assert info.record()["batch_size"] == 3


@pytest.mark.parametrize("raw", [b"{not json", b"\xff\xfe", b"[1, 2]", b"null"])
def test_bad_request_body_never_raises(raw: bytes) -> None:
    info = parse_request("api.anthropic.com", "POST", "/v1/messages", raw)
    assert info.api == "messages"
    assert info.model is None


def test_gzip_request_body() -> None:
    raw = gzip.compress(body({"model": "claude-opus-4-1", "max_tokens": 5}))
    info = parse_request("api.anthropic.com", "POST", "/v1/messages", raw, "gzip")
    assert (info.model, info.max_tokens, info.error) == ("claude-opus-4-1", 5, None)


def test_a_50_mb_body_is_not_held_and_still_gives_usage() -> None:
    message = json.loads(load("anthropic_message.json"))
    message["content"][0]["text"] = "y" * (50 * 1024 * 1024)
    raw = json.dumps(message).encode()
    chunks = [raw[i : i + 1024 * 1024] for i in range(0, len(raw), 1024 * 1024)]
    result = run("anthropic_message.json", chunks)  # default limits: 32 MiB held at most
    assert result["usage"]["input_tokens"] == 2095
    assert result["stop_reason"] is None  # only usage and identity are salvaged
    assert result["error"] == "llmtap: body over 33554432 bytes: parsed best-effort"


def gzip_stream_without_trailer(data: bytes, cut_events: int = 0) -> list[bytes]:
    """As a server flushes a gzip SSE stream event by event; the trailer (and the last
    `cut_events` events) never arrive: the client hung up."""
    packer = zlib.compressobj(6, zlib.DEFLATED, 31)
    events = data.split(b"\n\n")
    kept = events[: len(events) - cut_events] if cut_events else events
    return [packer.compress(event + b"\n\n") + packer.flush(zlib.Z_SYNC_FLUSH) for event in kept]


def parse_chunks(chunks: list[bytes]) -> tuple[dict[str, object], list[str]]:
    info = parse_request("api.anthropic.com", "POST", "/v1/messages", b"")
    parser = response_parser(info, started=T0, status=200, headers={
        "content-type": "text/event-stream", "content-encoding": "gzip"})
    for chunk in chunks:
        parser.feed(chunk, T0 + 0.2)
    parser.feed(b"", T0 + 0.3)
    return parser.result(), parser.notes


def test_a_client_that_hangs_up_after_the_last_event_leaves_a_complete_record() -> None:
    result, notes = parse_chunks(gzip_stream_without_trailer(load(STREAM)))
    assert result["error"] is None and result["stop_reason"] == "tool_use"
    assert notes == ["truncated gzip body after the stream's last event (the client hung up once "
                     "it had it)"]
    cut, _ = parse_chunks(gzip_stream_without_trailer(load(STREAM), cut_events=3))
    assert cut["error"] is not None  # a stream cut before its end is still an error
