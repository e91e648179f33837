"""Gemini: streamGenerateContent (SSE with CRLF, and the JSON array), generateContent,
countTokens, errors and request fields."""

from __future__ import annotations

import hashlib
import json

from hypothesis import given, settings
from hypothesis import strategies as st
from llmtap.parsers import parse_request
from llmtap.parsers.gemini import model_from_path
from parser_helpers import body, cuts_for, run, split, stable, usage
from streams import load

SSE = "gemini_stream.sse"
ARRAY = "gemini_stream.json"
EXPECTED_USAGE = usage(
    # promptTokenCount 4210 includes 4096 cached; thoughts (320) are billed as output.
    input_tokens=114,
    output_tokens=368,
    cache_read_tokens=4096,
    reasoning_tokens=320,
)


def test_sse_stream() -> None:
    result = run(SSE)
    assert (result["provider"], result["api"], result["stream"]) == (
        "google",
        "streamGenerateContent",
        True,
    )
    assert result["model"] == "gemini-2.5-flash"
    assert result["usage"] == EXPECTED_USAGE
    assert result["stop_reason"] == "STOP"
    assert result["events"] == 2
    assert result["error"] is None
    assert result["response_id"] == "mB2taKXzAbWm1dkP2fvJ6Qk"


def test_json_array_stream_gives_the_same_record() -> None:
    assert stable(run(ARRAY)) == stable(run(SSE))


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_any_rechunking_gives_the_same_result(data: st.DataObject) -> None:
    for name in (SSE, ARRAY):
        raw = load(name)
        chunks = split(raw, data.draw(cuts_for(raw)))
        assert stable(run(name, chunks)) == stable(run(name))


def test_generate_content_with_function_call() -> None:
    result = run("gemini_generate.json")
    assert result["model"] == "gemini-2.5-pro"
    assert result["usage"] == usage(input_tokens=1500, output_tokens=120, reasoning_tokens=100)
    assert result["tool_calls"] == ["get_current_weather"]
    assert result["stop_reason"] == "STOP"


def test_model_from_the_path_when_the_reply_does_not_say() -> None:
    raw = body({"candidates": [{"content": {"parts": [{"text": "hi"}]}, "finishReason": "STOP"}],
                "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 1}})  # fmt: skip
    result = run("gemini_generate.json", [raw])
    assert result["model"] == "gemini-2.5-pro"
    assert result["usage"] == usage(input_tokens=3, output_tokens=1)


def test_errors() -> None:
    result = run("gemini_error_429.json")
    assert result["error"].startswith("RESOURCE_EXHAUSTED: You exceeded your current quota")
    # A streamed request's error can come as a one-element array.
    array_error = b"[" + load("gemini_error_429.json") + b"]"
    assert run(ARRAY, [array_error], status=429)["error"] == result["error"]
    # ... or inside a 200 stream.
    raw = load(ARRAY)
    cut = raw.index(b"\n,\r\n")
    err = b'\n,\r\n{"error": {"code": 503, "message": "overloaded", "status": "UNAVAILABLE"}}\n]'
    assert run(ARRAY, [raw[:cut] + err])["error"] == "UNAVAILABLE: overloaded"


def test_blocked_prompt() -> None:
    raw = body({"promptFeedback": {"blockReason": "SAFETY"},
                "usageMetadata": {"promptTokenCount": 8, "totalTokenCount": 8}})  # fmt: skip
    result = run(SSE, [b"data: " + raw + b"\r\n\r\n"])
    assert result["stop_reason"] == "SAFETY"
    assert result["error"] is None


def test_count_tokens() -> None:
    result = run("gemini_count_tokens.json")
    assert result["counted_input_tokens"] == 31
    assert result["usage"] == usage()


def test_truncated_streams() -> None:
    raw = load(ARRAY)
    cut = "llmtap: JSON stream ended before its closing bracket"
    assert run(ARRAY, [raw[:-3]])["error"] == cut
    comma = raw.index(b"\n,") + 2  # the first element and its comma: another was to come
    assert run(ARRAY, [raw[:comma]])["error"] == cut
    # Only the closing bracket missing, after the final element (a client that hung up once it
    # had it): complete, with a note.
    whole = run(ARRAY, [raw[:-1]])
    assert whole["error"] is None and whole["usage"] == EXPECTED_USAGE
    # One whole element, but not the final one (no finishReason): still cut short.
    assert run(ARRAY, [raw[:comma - 2]])["error"] == cut
    first_event = load(SSE).split(b"\r\n\r\n")[0] + b"\r\n\r\n"
    assert run(SSE, [first_event])["error"] == "llmtap: stream ended before a finishReason"


def test_invalid_json_in_array() -> None:
    result = run(ARRAY, [b'[{"candidates": [}\n]'])
    assert result["error"].startswith("llmtap: JSONDecodeError")


def test_request_fields() -> None:
    request = {
        "systemInstruction": {"parts": [{"text": "You are a cat."}, {"text": "Meow."}]},
        "contents": [{"role": "user", "parts": [{"text": "hi"}]}],
        "generationConfig": {"temperature": 0.9, "maxOutputTokens": 800,
                             "thinkingConfig": {"thinkingBudget": 1024}},
        "tools": [{"functionDeclarations": [{"name": "find_theaters"}, {"name": "get_times"}]},
                  {"googleSearch": {}}],
    }  # fmt: skip
    path = "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
    info = parse_request("generativelanguage.googleapis.com", "POST", path, body(request))
    assert (info.model, info.stream, info.temperature, info.max_tokens) == (
        "gemini-2.5-flash",
        True,
        0.9,
        800,
    )
    assert info.system_sha256 == hashlib.sha256(b"You are a cat.\n\nMeow.").hexdigest()
    assert info.tools == ["find_theaters", "get_times", "googleSearch"]
    assert info.record()["thinking_budget"] == 1024


def test_request_snake_case_and_empty_body() -> None:
    request = {"system_instruction": {"parts": [{"text": "S"}]},
               "generation_config": {"max_output_tokens": 5}}  # fmt: skip
    path = "/v1beta/models/gemini-2.5-pro:generateContent"
    info = parse_request("generativelanguage.googleapis.com", "POST", path, json.dumps(request).encode())
    assert (info.model, info.stream, info.max_tokens) == ("gemini-2.5-pro", False, 5)
    empty = parse_request("generativelanguage.googleapis.com", "POST", path, b"")
    assert empty.model == "gemini-2.5-pro"


def test_model_from_path() -> None:
    assert model_from_path("/v1beta/models/gemini-2.5-pro:streamGenerateContent") == "gemini-2.5-pro"
    vertex = "/v1/projects/p/locations/l/publishers/google/models/gemini-2.5-flash:generateContent"
    assert model_from_path(vertex) == "gemini-2.5-flash"
    assert model_from_path("/v1beta/files") is None
