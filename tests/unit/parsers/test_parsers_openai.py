"""OpenAI Chat Completions: SSE and JSON replies, errors, request fields, and the include_usage
rewrite with its usage-chunk stripper."""

from __future__ import annotations

import hashlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from llmtap.parsers import RequestInfo, UsageChunkStripper, parse_request, usage_rewrite
from parser_helpers import body, cuts_for, run, split, stable, usage
from streams import load, openai_chat_stream, openai_chat_stream_stripped

STREAM = "openai_chat_stream.sse"
CHAT = ("api.openai.com", "POST", "/v1/chat/completions")


def test_stream_with_usage_chunk() -> None:
    result = run(STREAM)
    assert (result["provider"], result["api"], result["stream"]) == (
        "openai",
        "chat.completions",
        True,
    )
    assert result["model"] == "gpt-4o-2024-08-06"
    # prompt_tokens 1234 includes 1024 cached: input_tokens counts only the uncached 210.
    assert result["usage"] == usage(input_tokens=210, output_tokens=56, cache_read_tokens=1024)
    assert result["stop_reason"] == "stop"
    assert result["events"] == 7
    assert result["error"] is None
    assert result["system_fingerprint"] == "fp_eb9dce56a8"


def test_tool_call_stream_with_reasoning_tokens() -> None:
    result = run("openai_chat_stream_tools.sse")
    assert result["model"] == "o4-mini-2025-04-16"
    assert result["usage"] == usage(input_tokens=320, output_tokens=250, reasoning_tokens=192)
    assert result["stop_reason"] == "tool_calls"
    assert result["tool_calls"] == ["get_weather"]


def test_stream_without_usage_has_unknown_usage() -> None:
    result = run(STREAM, [openai_chat_stream_stripped()])
    assert result["usage"]["input_tokens"] is None
    assert result["error"] is None


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_any_rechunking_gives_the_same_result(data: st.DataObject) -> None:
    for name in (STREAM, "openai_chat_stream_tools.sse"):
        raw = load(name)
        chunks = split(raw, data.draw(cuts_for(raw)))
        assert stable(run(name, chunks)) == stable(run(name))


def test_json_reply() -> None:
    result = run("openai_chat.json")
    assert result["stream"] is False
    assert result["model"] == "gpt-4.1-2025-04-14"
    assert result["usage"] == usage(input_tokens=19, output_tokens=10)
    assert result["stop_reason"] == "stop"


def test_rate_limit_error() -> None:
    headers = {
        "content-type": "application/json",
        "retry-after": "2",
        "x-ratelimit-remaining-tokens": "0",
    }
    result = run("openai_error_429.json", headers=headers)
    assert result["error"].startswith("tokens: Rate limit reached for gpt-4o")
    assert result["rate_limit"] == {"retry-after": "2", "x-ratelimit-remaining-tokens": "0"}


def test_error_in_the_middle_of_a_stream() -> None:
    raw = load(STREAM)
    cut = raw.index(b"data: ", 10)
    error = {"error": {"message": "The server had an error", "type": "server_error"}}
    result = run(STREAM, [raw[:cut] + f"data: {json.dumps(error)}\n\n".encode()])
    assert result["error"] == "server_error: The server had an error"


def test_truncated_stream() -> None:
    raw = load(STREAM)
    result = run(STREAM, [raw[: raw.index(b"data: [DONE]")]])
    assert result["error"] == "llmtap: stream ended before data: [DONE]"
    assert result["usage"]["output_tokens"] == 56


def test_invalid_json_line() -> None:
    result = run(STREAM, [b'data: {"id": "x", "choices": [\n\ndata: [DONE]\n\n'])
    assert result["error"].startswith("llmtap: invalid JSON in SSE event 'message'")


# -- request side -----------------------------------------------------------------------------


def test_request_fields() -> None:
    request = {
        "model": "gpt-4o",
        "stream": True,
        "temperature": 0.7,
        "max_completion_tokens": 300,
        "max_tokens": 100,
        "reasoning_effort": "low",
        "messages": [
            {"role": "developer", "content": "Be brief."},
            {"role": "system", "content": [{"type": "text", "text": "No emojis."}]},
            {"role": "user", "content": "hi"},
        ],
        "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}],
    }
    info = parse_request(*CHAT, body(request))
    assert (info.model, info.stream, info.temperature, info.max_tokens) == ("gpt-4o", True, 0.7, 300)
    assert info.system_sha256 == hashlib.sha256(b"Be brief.\n\nNo emojis.").hexdigest()
    assert info.tools == ["get_weather"]
    assert info.record()["reasoning_effort"] == "low"
    assert info.record()["include_usage"] is False


# -- the include_usage rewrite --------------------------------------------------------------------


def test_rewrite_adds_the_option_keeping_every_other_byte() -> None:
    raw = b'{"model": "gpt-4o", "stream": true, "messages": [{"role": "user", "content": "\\u00e9"}]}\n'
    info = parse_request(*CHAT, raw)
    rewrite = usage_rewrite(info, raw)
    assert rewrite.strip_usage_chunk is True
    assert rewrite.body == (
        b'{"model": "gpt-4o", "stream": true, "messages": [{"role": "user", "content": "\\u00e9"}]'
        b',"stream_options":{"include_usage":true}}\n'
    )
    assert json.loads(rewrite.body)["stream_options"] == {"include_usage": True}
    assert rewrite.headers == {"accept-encoding": "identity"}


def test_rewrite_turns_an_explicit_false_on() -> None:
    raw = body({"model": "gpt-4o", "stream": True, "stream_options": {"include_usage": False}})
    rewrite = usage_rewrite(parse_request(*CHAT, raw), raw)
    assert rewrite.strip_usage_chunk
    assert json.loads(rewrite.body)["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize(
    "request_body",
    [
        {"model": "gpt-4o", "stream": True, "stream_options": {"include_usage": True}},
        {"model": "gpt-4o", "stream": False},
        {"model": "gpt-4o"},
    ],
)
def test_no_rewrite_needed(request_body: dict[str, object]) -> None:
    raw = body(request_body)
    rewrite = usage_rewrite(parse_request(*CHAT, raw), raw)
    assert (rewrite.body, rewrite.strip_usage_chunk, rewrite.headers) == (raw, False, {})


def test_no_rewrite_for_other_apis_or_encoded_bodies() -> None:
    raw = body({"model": "gpt-5", "stream": True})
    responses = parse_request("api.openai.com", "POST", "/v1/responses", raw)
    assert usage_rewrite(responses, raw).strip_usage_chunk is False
    assert usage_rewrite(parse_request(*CHAT, raw), raw, "gzip").strip_usage_chunk is False
    broken = RequestInfo("openai", "chat.completions", stream=True)
    assert usage_rewrite(broken, b"{oops").body == b"{oops"


# -- the usage-chunk stripper -----------------------------------------------------------------------


def strip(chunks: list[bytes]) -> bytes:
    stripper = UsageChunkStripper()
    return b"".join(stripper.feed(chunk) for chunk in chunks) + stripper.feed(b"")


def test_stripper_removes_exactly_the_usage_event() -> None:
    assert strip([openai_chat_stream()]) == openai_chat_stream_stripped()


@settings(max_examples=300, deadline=None)
@given(data=st.data(), eol=st.sampled_from([b"\n", b"\r\n", b"\r"]))
def test_stripper_any_chunking_any_line_ending(data: st.DataObject, eol: bytes) -> None:
    raw = openai_chat_stream().replace(b"\n", eol)
    expected = openai_chat_stream_stripped().replace(b"\n", eol)
    assert strip(split(raw, data.draw(cuts_for(raw, 60)))) == expected


def test_stripper_passes_complete_events_at_once() -> None:
    stripper = UsageChunkStripper()
    first = b'data: {"choices":[{"index":0,"delta":{"content":"a"}}]}\n\n'
    assert stripper.feed(first + b"data: {") == first  # the unfinished event waits for its end
    assert stripper.feed(b'"choices":[]}\n\n') == b'data: {"choices":[]}\n\n'  # no usage: kept


def test_stripper_passes_through_after_the_usage_chunk() -> None:
    stripper = UsageChunkStripper()
    usage_event = b'data: {"choices":[],"usage":{"prompt_tokens":1}}\r\n\r'
    assert stripper.feed(usage_event) == b""
    assert stripper.stripped
    assert stripper.feed(b"\ndata: [DONE]") == b"data: [DONE]"
    assert stripper.feed(b"\n\n") == b"\n\n"
    assert stripper.feed(b"") == b""


def test_stripper_without_a_usage_chunk_changes_nothing() -> None:
    raw = openai_chat_stream_stripped() + b"data: {trunc"
    assert strip(split(raw, range(3, len(raw), 11))) == raw


def test_a_streamed_request_answered_with_a_json_error_is_still_a_stream() -> None:
    request = body({"model": "gpt-4o", "stream": True})
    result = run("openai_error_429.json", request_body=request)
    assert result["stream"] is True
    assert result["error"].startswith("tokens: Rate limit reached")
