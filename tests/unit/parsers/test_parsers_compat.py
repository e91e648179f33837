"""OpenAI-compatible APIs on other providers' hosts, and Vertex AI: the host decides the provider,
the path's wire shape decides the api and the parser; each compatible dialect's usage is read in
llmtap's convention (input excludes cache reads and writes, output includes reasoning)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from llmtap.parsers import classify, parse_request, response_parser, usage_rewrite
from llmtap.parsers.openai_chat import usage_from
from parser_helpers import T0, cuts_for, run, split, stable, usage
from streams import VERTEX_HOST, load

VERTEX = "/v1/projects/p/locations/us-central1/publishers"


@pytest.mark.parametrize(
    ("host", "method", "path", "expected"),
    [
        ("generativelanguage.googleapis.com", "POST", "/v1beta/openai/chat/completions",
         ("google", "chat.completions")),
        ("generativelanguage.googleapis.com", "POST", "/v1beta/openai/embeddings",
         ("google", "embeddings")),
        ("api.anthropic.com", "POST", "/v1/chat/completions", ("anthropic", "chat.completions")),
        ("api.groq.com", "POST", "/openai/v1/chat/completions", ("groq", "chat.completions")),
        ("api.groq.com", "POST", "/openai/v1/responses", ("groq", "responses")),
        ("openrouter.ai", "POST", "/api/v1/chat/completions", ("openrouter", "chat.completions")),
        ("openrouter.ai", "POST", "/api/v1/responses", ("openrouter", "responses")),
        ("api.deepseek.com", "POST", "/chat/completions", ("deepseek", "chat.completions")),
        ("api.deepseek.com", "POST", "/anthropic/v1/messages", ("deepseek", "messages")),
        ("api.mistral.ai", "POST", "/v1/chat/completions", ("mistral", "chat.completions")),
        ("api.x.ai", "POST", "/v1/responses", ("xai", "responses")),
        ("api.x.ai", "POST", "/v1/messages", ("xai", "messages")),
        ("api.together.xyz", "POST", "/v1/chat/completions", ("together", "chat.completions")),
        ("api.together.ai", "POST", "/v1/completions", ("together", "completions")),
        ("api.fireworks.ai", "POST", "/inference/v1/chat/completions",
         ("fireworks", "chat.completions")),
        ("api.groq.com", "GET", "/openai/v1/models", ("groq", "models")),
        ("chatgpt.com", "POST", "/backend-api/codex/responses", ("openai", "responses")),
        # Vertex AI: Gemini, Claude (rawPredict / streamRawPredict / count-tokens), OpenAI-compatible.
        (VERTEX_HOST, "POST", f"{VERTEX}/google/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
         ("google", "streamGenerateContent")),
        ("aiplatform.googleapis.com", "POST",
         "/v1beta1/projects/p/locations/global/publishers/google/models/gemini-2.5-pro:generateContent",
         ("google", "generateContent")),
        ("aiplatform.us.rep.googleapis.com", "POST",
         "/v1/projects/p/locations/us/publishers/google/models/gemini-2.5-pro:countTokens",
         ("google", "countTokens")),
        ("europe-west1-aiplatform.googleapis.com", "POST",
         f"{VERTEX}/anthropic/models/claude-sonnet-4-5@20250929:rawPredict", ("google", "messages")),
        (VERTEX_HOST, "POST", f"{VERTEX}/anthropic/models/claude-sonnet-4-5@20250929:streamRawPredict",
         ("google", "messages")),
        (VERTEX_HOST, "POST", f"{VERTEX}/anthropic/models/count-tokens:rawPredict",
         ("google", "messages.count_tokens")),
        (VERTEX_HOST, "POST", "/v1/projects/p/locations/us-central1/endpoints/openapi/chat/completions",
         ("google", "chat.completions")),
        (VERTEX_HOST, "POST", f"{VERTEX}/meta/models/llama:rawPredict", ("google", "unknown")),
        (VERTEX_HOST, "POST", "/v1/projects/p/locations/us-central1/endpoints/4567:generateContent",
         ("google", "generateContent")),  # a tuned Gemini model deployed to an endpoint
        ("evil-aiplatform.googleapis.com.example.net", "POST", "/v1/chat/completions",
         ("openai", "chat.completions")),  # not Google's: a gateway, named by its wire shape
    ],
)  # fmt: skip
def test_host_decides_provider_path_decides_api(host: str, method: str, path: str,
                                               expected: tuple[str, str]) -> None:
    assert classify(host, method, path) == expected


def test_gemini_compat_stream_counts_the_thoughts_total_tokens_has() -> None:
    result = run("gemini_compat_chat_stream.sse")
    assert (result["provider"], result["api"], result["model"], result["stream"]) == (
        "google", "chat.completions", "gemini-2.5-flash", True)
    # completion_tokens 14 leaves out the 383 thought tokens total_tokens 2458 still counts.
    assert result["usage"] == usage(input_tokens=13, output_tokens=397, cache_read_tokens=2048,
                                    reasoning_tokens=383)
    assert result["error"] is None and result["stop_reason"] == "stop"
    whole = run("gemini_compat_chat.json")
    assert whole["usage"] == usage(input_tokens=11, output_tokens=397, reasoning_tokens=383)


def test_anthropic_compat_stream() -> None:
    result = run("anthropic_compat_chat_stream.sse")
    assert (result["provider"], result["api"], result["model"]) == (
        "anthropic", "chat.completions", "claude-sonnet-4-5-20250929")
    assert result["usage"] == usage(input_tokens=25, output_tokens=12)
    assert result["error"] is None


def test_groq_usage_comes_from_x_groq_when_not_asked_for() -> None:
    raw = load("groq_chat_stream.sse")
    without_usage_chunk = raw[: raw.rindex(b'data: {"id"')] + b"data: [DONE]\n\n"
    for chunks in ([raw], [without_usage_chunk]):
        result = run("groq_chat_stream.sse", chunks)
        assert result["provider"] == "groq" and result["model"] == "llama-3.3-70b-versatile"
        assert result["usage"] == usage(input_tokens=48, output_tokens=15)
        assert result["service_tier"] == "on_demand" and result["error"] is None


def test_openrouter_usage_cost_and_cache_writes() -> None:
    result = run("openrouter_chat_stream.sse")
    assert (result["provider"], result["model"]) == ("openrouter", "anthropic/claude-sonnet-4.5")
    # prompt_tokens 2541 = 93 uncached + 2048 read + 400 written.
    assert result["usage"] == usage(input_tokens=93, output_tokens=310, cache_read_tokens=2048,
                                    cache_write_5m_tokens=400)
    assert result["provider_cost_usd"] == 0.0070434 and result["served_by"] == "Anthropic"
    assert result["error"] is None and result["stop_reason"] == "stop"


def test_deepseek_cache_hits_and_reasoning() -> None:
    result = run("deepseek_chat_stream.sse")
    assert result["usage"] == usage(input_tokens=76, output_tokens=420, cache_read_tokens=1024,
                                    reasoning_tokens=380)
    # Replies that only have DeepSeek's own cache fields.
    older = {"prompt_tokens": 1100, "completion_tokens": 20, "total_tokens": 1120,
             "prompt_cache_hit_tokens": 1024, "prompt_cache_miss_tokens": 76}
    assert usage_from(older).as_dict() == usage(input_tokens=76, output_tokens=20,
                                                cache_read_tokens=1024)


def test_mistral_usage_on_the_finish_chunk() -> None:
    result = run("mistral_chat_stream.sse")
    assert (result["provider"], result["model"]) == ("mistral", "mistral-large-latest")
    assert result["usage"] == usage(input_tokens=10, output_tokens=9)
    assert result["error"] is None and result["stop_reason"] == "stop"


def test_xai_reasoning_is_output_though_completion_tokens_leaves_it_out() -> None:
    result = run("xai_chat.json")
    assert (result["provider"], result["model"]) == ("xai", "grok-3-mini")
    assert result["usage"] == usage(input_tokens=26, output_tokens=103, cache_read_tokens=6,
                                    reasoning_tokens=94)


def test_openai_usage_is_unchanged_by_the_dialects() -> None:
    openai = {"prompt_tokens": 320, "completion_tokens": 250, "total_tokens": 570,
              "completion_tokens_details": {"reasoning_tokens": 192}}
    assert usage_from(openai).as_dict() == usage(input_tokens=320, output_tokens=250,
                                                 reasoning_tokens=192)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_any_rechunking_of_the_compat_streams_gives_the_same_result(data: st.DataObject) -> None:
    for name in ("gemini_compat_chat_stream.sse", "groq_chat_stream.sse",
                 "openrouter_chat_stream.sse", "vertex_gemini_stream.sse"):
        raw = load(name)
        chunks = split(raw, data.draw(cuts_for(raw)))
        assert stable(run(name, chunks)) == stable(run(name))


@pytest.mark.parametrize(
    ("host", "path", "rewritten"),
    [
        ("generativelanguage.googleapis.com", "/v1beta/openai/chat/completions", True),
        ("api.anthropic.com", "/v1/chat/completions", True),
        ("api.deepseek.com", "/chat/completions", True),
        ("api.groq.com", "/openai/v1/chat/completions", False),  # x_groq.usage always comes
        ("openrouter.ai", "/api/v1/chat/completions", False),  # its usage always comes
        ("api.mistral.ai", "/v1/chat/completions", False),  # always comes; stream_options is a 422
    ],
)
def test_include_usage_is_added_only_where_the_usage_would_be_missing(
        host: str, path: str, rewritten: bool) -> None:
    body = json.dumps({"model": "m", "stream": True, "messages": []}).encode()
    info = parse_request(host, "POST", path, body)
    rewrite = usage_rewrite(info, body)
    assert rewrite.strip_usage_chunk is rewritten
    assert (b"include_usage" in rewrite.body) is rewritten


def test_vertex_gemini_model_and_usage() -> None:
    result = run("vertex_gemini_stream.sse")
    assert (result["provider"], result["api"], result["model"], result["stream"]) == (
        "google", "streamGenerateContent", "gemini-2.5-flash", True)
    # cachedContentTokenCount is part of promptTokenCount; thoughtsTokenCount is not part of
    # candidatesTokenCount.
    assert result["usage"] == usage(input_tokens=13, output_tokens=402, cache_read_tokens=2048,
                                    reasoning_tokens=383)
    whole = run("vertex_gemini_generate.json")
    assert whole["usage"] == usage(input_tokens=9, output_tokens=31, reasoning_tokens=25)


@pytest.mark.parametrize(("specifier", "fixture", "streamed"), [
    ("rawPredict", "anthropic_message.json", False),
    ("streamRawPredict", "anthropic_messages_stream.sse", True),
])
def test_vertex_claude_is_the_messages_wire_shape_named_by_its_path(
        specifier: str, fixture: str, streamed: bool) -> None:
    path = f"{VERTEX}/anthropic/models/claude-sonnet-4-5%4020250929:{specifier}"
    body = json.dumps({"anthropic_version": "vertex-2023-10-16", "max_tokens": 64,
                       "stream": streamed, "messages": [{"role": "user", "content": "Hi"}]})
    info = parse_request(VERTEX_HOST, "POST", path, body.encode())
    assert (info.provider, info.api, info.model, info.stream) == (
        "google", "messages", "claude-sonnet-4-5@20250929", streamed)
    content_type = "text/event-stream" if streamed else "application/json"
    parser = response_parser(info, started=T0, headers={"content-type": content_type})
    parser.feed(load(fixture), T0 + 0.1)
    parser.feed(b"", T0 + 0.2)
    result = parser.result()
    assert result["error"] is None and result["stream"] is streamed
    assert result["model"] == "claude-sonnet-4-5@20250929"  # the path's, which Vertex bills
    assert result["usage"]["input_tokens"] == (472 if streamed else 2095)


def test_vertex_claude_count_tokens() -> None:
    body = b'{"anthropic_version": "vertex-2023-10-16", "model": "claude-sonnet-4-5@20250929", ' \
           b'"messages": [{"role": "user", "content": "Hi"}]}'
    info = parse_request(VERTEX_HOST, "POST", f"{VERTEX}/anthropic/models/count-tokens:rawPredict",
                         body)
    assert (info.api, info.model) == ("messages.count_tokens", "claude-sonnet-4-5@20250929")
    parser = response_parser(info, started=T0, headers={"content-type": "application/json"})
    parser.feed(load("anthropic_count_tokens.json"), T0)
    parser.feed(b"", T0)
    assert parser.result()["usage"]["input_tokens"] == 0 and parser.result()["error"] is None


def test_vertex_openai_compatible_endpoint() -> None:
    path = "/v1/projects/p/locations/us-central1/endpoints/openapi/chat/completions"
    body = b'{"model": "google/gemini-2.5-flash", "stream": true, "messages": []}'
    info = parse_request(VERTEX_HOST, "POST", path, body)
    assert (info.provider, info.api, info.model, info.stream) == (
        "google", "chat.completions", "google/gemini-2.5-flash", True)
