"""AWS Bedrock runtime: classification, request fields, InvokeModel and Converse replies (JSON and
event-stream), errors, CountTokens."""

from __future__ import annotations

from collections.abc import Callable

import aws_eventstream as aws
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from llmtap.parsers import classify, parse_request, response_parser
from llmtap.parsers.base import Limits
from parser_helpers import T0, body, cuts_for, run, split, stable, usage
from streams import BEDROCK, BEDROCK_SONNET, EVENTSTREAM, FIXTURES, load

SONNET = "us.anthropic.claude-sonnet-4-5-20250929-v1:0"
STREAMS = [n for n, f in FIXTURES.items() if f.content_type == EVENTSTREAM]


@pytest.mark.parametrize(("host", "path", "expected"), [
    (BEDROCK, BEDROCK_SONNET + "/invoke", ("bedrock", "invoke")),
    ("Bedrock-Runtime.EU-West-3.amazonaws.com:443", "/model/m/converse-stream?x=1",
     ("bedrock", "converse-stream")),
    ("bedrock-runtime-fips.us-gov-west-1.amazonaws.com", "/model/m/converse", ("bedrock", "converse")),
    ("bedrock-runtime.cn-north-1.amazonaws.com.cn", "/model/m/invoke-with-response-stream",
     ("bedrock", "invoke-with-response-stream")),
    (BEDROCK, "/model/m/count-tokens", ("bedrock", "count-tokens")),
    (BEDROCK, "/async-invoke", ("bedrock", "unknown")),
    (BEDROCK, "/model/a/b/converse", ("bedrock", "unknown")),  # an unencoded slash: not a modelId
    ("bedrock.us-east-1.amazonaws.com", "/foundation-models", ("unknown", "unknown")),  # control plane
    ("bedrock-runtime.us-east-1.amazonaws.com.evil.example", "/model/m/converse",
     ("bedrock", "converse")),  # any other target host is read by its path, billed by nobody known
])
def test_classify(host: str, path: str, expected: tuple[str, str]) -> None:
    assert classify(host, "POST", path) == expected


@pytest.mark.parametrize(("path", "model"), [
    ("/model/us.anthropic.claude-sonnet-4-5-20250929-v1:0/invoke", SONNET),  # AnthropicBedrock's
    ("/model/us.anthropic.claude-sonnet-4-5-20250929-v1%3A0/converse", SONNET),  # boto3's
    ("/model/arn%3Aaws%3Abedrock%3Aus-east-1%3A123456789012%3Aapplication-inference-profile%2F"
     "a1b2c3d4e5f6/converse-stream",
     "arn:aws:bedrock:us-east-1:123456789012:application-inference-profile/a1b2c3d4e5f6"),
])
def test_the_model_is_the_decoded_model_id(path: str, model: str) -> None:
    info = parse_request(BEDROCK, "POST", path + "?t=1", b"{}")
    assert info.model == model and info.provider == "bedrock"
    assert info.stream == path.endswith(("-stream", "-response-stream"))


def test_converse_request_fields() -> None:
    request = {
        "messages": [{"role": "user", "content": [{"text": "Weather in Paris?"}]}],
        "system": [{"text": "Be brief."}, {"cachePoint": {"type": "default"}}, {"text": "Use tools."}],
        "inferenceConfig": {"maxTokens": 512, "temperature": 0.2},
        "toolConfig": {"tools": [{"toolSpec": {"name": "get_weather", "inputSchema": {"json": {}}}},
                                 {"cachePoint": {"type": "default"}}]},
        "additionalModelRequestFields": {"thinking": {"type": "enabled", "budget_tokens": 2048}},
        "modelId": "ignored: it is in the path",
    }
    info = parse_request(BEDROCK, "POST", BEDROCK_SONNET + "/converse-stream", body(request))
    assert (info.model, info.stream, info.max_tokens, info.temperature) == (SONNET, True, 512, 0.2)
    assert info.system_text == "Be brief.\n\nUse tools." and info.tools == ["get_weather"]
    assert info.record()["thinking_budget"] == 2048 and info.error is None


def test_invoke_request_fields_are_anthropic_messages_ones() -> None:
    request = {"anthropic_version": "bedrock-2023-05-31", "max_tokens": 1024, "system": "Be brief.",
               "messages": [{"role": "user", "content": "Hi"}], "tools": [{"name": "get_weather"}]}
    info = parse_request(BEDROCK, "POST", BEDROCK_SONNET + "/invoke", body(request))
    assert (info.model, info.stream, info.max_tokens, info.tools) == (SONNET, False, 1024, ["get_weather"])
    assert info.system_text == "Be brief."
    llama = parse_request(BEDROCK, "POST", "/model/meta.llama3-3-70b-instruct-v1:0/invoke",
                          body({"prompt": "Hi", "max_gen_len": 128, "temperature": 0.5}))
    assert (llama.model, llama.max_tokens, llama.temperature) == (
        "meta.llama3-3-70b-instruct-v1:0", 128, 0.5)


def test_invoke_stream_is_anthropic_messages_inside_event_stream_chunks() -> None:
    result = run("bedrock_invoke_stream.eventstream")
    assert (result["provider"], result["api"], result["model"], result["stream"]) == (
        "bedrock", "invoke-with-response-stream", SONNET, True)
    assert result["usage"] == usage(input_tokens=472, output_tokens=189, cache_read_tokens=10240,
                                    cache_write_5m_tokens=1536, cache_write_1h_tokens=512,
                                    reasoning_tokens=None)
    assert (result["stop_reason"], result["tool_calls"], result["events"]) == (
        "tool_use", ["get_weather"], 11)
    assert result["response_model"] == "claude-sonnet-4-5-20250929"
    assert result["provider_latency_ms"] == 2917 and result["error"] is None


def test_invoke_json_is_an_anthropic_message() -> None:
    result = run("bedrock_invoke.json", headers={
        "content-type": "application/json", "x-amzn-requestid": "b1a2c3d4-0000-4000-8000-000000000001",
        "x-amzn-bedrock-input-token-count": "2095", "x-amzn-bedrock-output-token-count": "503"})
    assert (result["api"], result["stream"], result["stop_reason"]) == ("invoke", False, "tool_use")
    # the body's usage (with its 1h cache writes) wins over the headers' flat counts
    assert result["usage"] == usage(input_tokens=2095, output_tokens=503, cache_read_tokens=3000,
                                    cache_write_1h_tokens=1000, reasoning_tokens=None)
    assert result["request_id"] == "b1a2c3d4-0000-4000-8000-000000000001"


def test_invoke_of_another_model_takes_bedrock_s_own_counts() -> None:
    llama = run("bedrock_invoke_stream_llama.eventstream")
    assert (llama["model"], llama["stop_reason"], llama["error"]) == (
        "meta.llama3-3-70b-instruct-v1:0", "stop", None)
    assert llama["usage"] == usage(input_tokens=18, output_tokens=4, reasoning_tokens=None)
    info = parse_request(BEDROCK, "POST", "/model/mistral.mistral-large-2407-v1:0/invoke", b"{}")
    parser = response_parser(info, started=T0, headers={
        "content-type": "application/json", "x-amzn-bedrock-input-token-count": "31",
        "x-amzn-bedrock-output-token-count": "12", "x-amzn-bedrock-service-tier": "flex"})
    parser.feed(body({"outputs": [{"text": "Hi", "stop_reason": "stop"}]}), T0 + 0.1)
    parser.feed(b"", T0 + 0.2)
    result = parser.result()
    assert result["usage"] == usage(input_tokens=31, output_tokens=12, reasoning_tokens=None)
    assert result["service_tier"] == "flex" and result["error"] is None


def test_nova_invoke_usage() -> None:
    info = parse_request(BEDROCK, "POST", "/model/amazon.nova-pro-v1:0/invoke", b"{}")
    parser = response_parser(info, started=T0, headers={"content-type": "application/json"})
    parser.feed(body({"output": {"message": {"role": "assistant", "content": [{"text": "Hi"}]}},
                      "stopReason": "end_turn", "usage": {
                          "inputTokens": 5, "outputTokens": 20, "totalTokens": 225,
                          "cacheReadInputTokenCount": 200, "cacheWriteInputTokenCount": 0}}), T0)
    parser.feed(b"", T0)
    result = parser.result()
    assert result["usage"] == usage(input_tokens=5, output_tokens=20, cache_read_tokens=200,
                                    reasoning_tokens=None)
    assert result["stop_reason"] == "end_turn"


def test_converse_json() -> None:
    result = run("bedrock_converse.json")
    assert (result["api"], result["stream"], result["stop_reason"]) == ("converse", False, "tool_use")
    # no cacheDetails: every cache write is the default 5m TTL
    assert result["usage"] == usage(input_tokens=385, output_tokens=71, cache_read_tokens=2048,
                                    cache_write_5m_tokens=512, reasoning_tokens=None)
    assert result["tool_calls"] == ["get_weather"] and result["service_tier"] == "default"
    assert result["provider_latency_ms"] == 1176


def test_converse_stream() -> None:
    result = run("bedrock_converse_stream.eventstream")
    assert (result["api"], result["stream"], result["stop_reason"]) == ("converse-stream", True, "tool_use")
    # inputTokens excludes the cache, as Anthropic's does; cacheDetails put the writes at 1h
    assert result["usage"] == usage(input_tokens=1210, output_tokens=96, cache_read_tokens=3072,
                                    cache_write_1h_tokens=1024, reasoning_tokens=None)
    assert (result["events"], result["tool_calls"], result["error"]) == (12, ["get_weather"], None)


def test_cache_writes_split_by_ttl_with_a_remainder_at_5m() -> None:
    from llmtap.parsers.bedrock import usage_from

    split_usage = usage_from({"inputTokens": 1, "outputTokens": 2, "cacheWriteInputTokens": 300,
                              "cacheDetails": [{"ttl": "1h", "inputTokens": 100}]})
    assert (split_usage.cache_write_5m_tokens, split_usage.cache_write_1h_tokens) == (200, 100)


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_any_rechunking_gives_the_same_result(data: st.DataObject) -> None:
    for name in STREAMS:
        raw = load(name)
        chunks = split(raw, data.draw(cuts_for(raw)))
        assert stable(run(name, chunks)) == stable(run(name))


def converse_frames() -> list[bytes]:
    return [aws.event(name, obj, 5 * n + 11) for n, (name, obj) in enumerate(aws.converse_stream_events())]


def invoke_frames() -> list[bytes]:
    return [aws.chunk(e, 7 * n + 3) for n, e in enumerate(aws.invoke_stream_events())]


@pytest.mark.parametrize(("name", "frames", "first_content"), [
    ("bedrock_converse_stream.eventstream", converse_frames, 1),  # the first contentBlockDelta
    ("bedrock_invoke_stream.eventstream", invoke_frames, 2),  # the first content_block_delta
])
def test_ttft_is_the_first_content_event(name: str, frames: Callable[[], list[bytes]],
                                         first_content: int) -> None:
    pieces = frames()
    assert b"".join(pieces) == load(name)
    # frame n arrives at n * 100 ms, each in two pieces split inside its prelude
    fixture = FIXTURES[name]
    info = parse_request(fixture.host, "POST", fixture.path, b"")
    parser = response_parser(info, started=T0, headers={"content-type": EVENTSTREAM})
    for n, frame in enumerate(pieces, start=1):
        parser.feed(frame[:5], T0 + n / 10 - 0.05)
        parser.feed(frame[5:], T0 + n / 10)
    parser.feed(b"", T0 + 5)
    result = parser.result()
    assert result["first_byte_ms"] == 50.0 and result["ttft_ms"] == (first_content + 1) * 100.0
    assert result["chunks"] == 2 * len(pieces) and result["error"] is None


def test_an_exception_message_is_the_error() -> None:
    result = run("bedrock_converse_stream_throttled.eventstream")
    assert result["error"] == "throttlingException: Too many tokens, please wait before trying again."
    assert result["stream"] is True and result["events"] == 6


def test_an_error_body_names_its_aws_error_type() -> None:
    result = run("bedrock_error_429.json", headers={
        "content-type": "application/json",
        "x-amzn-errortype": "ThrottlingException:http://internal.amazon.com/coral/com.amazon.bedrock/"})
    assert result["error"] == "ThrottlingException: Too many requests, please wait before trying again."
    assert result["usage"]["input_tokens"] is None


@pytest.mark.parametrize(("frames", "why"), [
    (12, "stream ended inside an event-stream message"),  # and 10 bytes of the last one
    (11, "stream ended before its metadata event (usage)"),
    (10, "stream ended before messageStop"),
])
def test_a_cut_stream_says_where(frames: int, why: str) -> None:
    pieces = converse_frames()
    cut = b"".join(pieces[:frames]) if frames < len(pieces) else b"".join(pieces)[:-10]
    result = run("bedrock_converse_stream.eventstream", [cut])
    assert result["error"] == "llmtap: " + why


def test_a_corrupt_frame_is_a_one_line_error_and_feeding_goes_on() -> None:
    raw = bytearray(load("bedrock_converse_stream.eventstream"))
    raw[200] ^= 0xFF
    result = run("bedrock_converse_stream.eventstream", [bytes(raw[:150]), bytes(raw[150:]), b"more"])
    assert result["error"] in ("llmtap: event-stream message CRC mismatch",
                               "llmtap: event-stream prelude CRC mismatch")
    assert result["chunks"] == 3  # every chunk was still counted (and relayed by the caller)


def test_an_oversized_frame_is_refused_by_the_event_limit() -> None:
    big = aws.event("contentBlockDelta", {"delta": {"text": "x" * 5000}})
    result = run("bedrock_converse_stream.eventstream", [big], limits=Limits(max_event_bytes=4096))
    assert result["error"] == "llmtap: event-stream message over 4096 bytes"


def test_invalid_chunk_payloads_are_errors() -> None:
    bad = aws.event("chunk", {"bytes": "not base64!"})
    result = run("bedrock_invoke_stream.eventstream", [bad])
    assert result["error"].startswith("llmtap: invalid chunk payload")
    garbage = aws.frame([(":message-type", 7, "event"), (":event-type", 7, "metadata")], b"{nope")
    result = run("bedrock_converse_stream.eventstream", [garbage])
    assert result["error"].startswith("llmtap: invalid JSON in event 'metadata'")


def test_count_tokens_is_free_and_not_counted() -> None:
    result = run("bedrock_count_tokens.json")
    assert (result["api"], result["counted"], result["counted_input_tokens"]) == ("count-tokens", False, 1337)
    assert result["usage"] == usage(reasoning_tokens=None)


def test_an_api_key_in_an_error_message_is_not_recorded() -> None:
    key = "ABSKQmVkcm9ja0FQSUtleS1hYmNkLWF0LTEyMzQ1Njc4OTAxMg"
    frame = aws.exception("validationException", f"The API key {key} is invalid")
    result = run("bedrock_converse_stream.eventstream", [frame])
    assert key not in result["error"] and result["error"].startswith("validationException: The API key")
