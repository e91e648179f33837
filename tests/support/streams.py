"""The recorded-shape provider replies under tests/fixtures/streams/, for parser tests and for a
fake upstream server: each function returns a fixture's raw bytes, exactly as sent on the wire.

`FIXTURES` tells, per file, the request it answers and the reply's status and content type, so a
fake upstream can serve any of them: `FIXTURES["openai_chat_stream.sse"].content_type`.
"""

from __future__ import annotations

from dataclasses import dataclass

import paths

DIR = paths.STREAMS

SSE = "text/event-stream"
JSON = "application/json"
EVENTSTREAM = "application/vnd.amazon.eventstream"  # AWS's binary framing (Bedrock streams)


@dataclass(frozen=True)
class Fixture:
    name: str
    host: str
    path: str
    status: int = 200
    content_type: str = JSON

    @property
    def body(self) -> bytes:
        return load(self.name)


_ANTHROPIC = "api.anthropic.com"
_OPENAI = "api.openai.com"
_GOOGLE = "generativelanguage.googleapis.com"
_GEMINI_STREAM = "/v1beta/models/gemini-2.5-flash:streamGenerateContent"
# OpenAI-compatible Chat Completions on other providers' hosts, and Vertex AI.
_COMPAT = {
    "gemini": (_GOOGLE, "/v1beta/openai/chat/completions"),
    "anthropic": (_ANTHROPIC, "/v1/chat/completions"),
    "groq": ("api.groq.com", "/openai/v1/chat/completions"),
    "openrouter": ("openrouter.ai", "/api/v1/chat/completions"),
    "deepseek": ("api.deepseek.com", "/chat/completions"),
    "xai": ("api.x.ai", "/v1/chat/completions"),
    "mistral": ("api.mistral.ai", "/v1/chat/completions"),
}
VERTEX_HOST = "us-central1-aiplatform.googleapis.com"
_AZURE = "myres.openai.azure.com"
_AZURE_CHAT = "/openai/deployments/gpt4o-prod/chat/completions?api-version=2024-10-21"
VERTEX_MODELS = "/v1beta1/projects/llmtap-test/locations/us-central1/publishers/google/models"
BEDROCK = "bedrock-runtime.us-east-1.amazonaws.com"
BEDROCK_SONNET = "/model/us.anthropic.claude-sonnet-4-5-20250929-v1:0"
BEDROCK_HAIKU = "/model/us.anthropic.claude-haiku-4-5-20251001-v1:0"

FIXTURES: dict[str, Fixture] = {
    f.name: f
    for f in (
        Fixture("anthropic_messages_stream.sse", _ANTHROPIC, "/v1/messages", content_type=SSE),
        Fixture("anthropic_overloaded_stream.sse", _ANTHROPIC, "/v1/messages", content_type=SSE),
        Fixture("anthropic_message.json", _ANTHROPIC, "/v1/messages"),
        Fixture("anthropic_error_529.json", _ANTHROPIC, "/v1/messages", status=529),
        Fixture("anthropic_count_tokens.json", _ANTHROPIC, "/v1/messages/count_tokens"),
        Fixture("anthropic_batch.json", _ANTHROPIC, "/v1/messages/batches"),
        Fixture(
            "anthropic_batch_results.jsonl",
            _ANTHROPIC,
            "/v1/messages/batches/msgbatch_01HkcTjaV5uDC8jWR4ZsDV8d/results",
            content_type="application/binary",
        ),
        Fixture("openai_chat_stream.sse", _OPENAI, "/v1/chat/completions", content_type=SSE),
        Fixture("openai_chat_stream_stripped.sse", _OPENAI, "/v1/chat/completions", content_type=SSE),
        Fixture("openai_chat_stream_tools.sse", _OPENAI, "/v1/chat/completions", content_type=SSE),
        Fixture("openai_chat.json", _OPENAI, "/v1/chat/completions"),
        Fixture("openai_error_429.json", _OPENAI, "/v1/chat/completions", status=429),
        Fixture("openai_responses_stream.sse", _OPENAI, "/v1/responses", content_type=SSE),
        Fixture("openai_responses_stream_incomplete.sse", _OPENAI, "/v1/responses", content_type=SSE),
        Fixture("openai_responses_stream_failed.sse", _OPENAI, "/v1/responses", content_type=SSE),
        Fixture("openai_responses.json", _OPENAI, "/v1/responses"),
        Fixture("gemini_stream.sse", _GOOGLE, _GEMINI_STREAM + "?alt=sse", content_type=SSE),
        Fixture("gemini_stream.json", _GOOGLE, _GEMINI_STREAM),
        Fixture("gemini_generate.json", _GOOGLE, "/v1beta/models/gemini-2.5-pro:generateContent"),
        Fixture(
            "gemini_error_429.json",
            _GOOGLE,
            "/v1beta/models/gemini-2.5-pro:generateContent",
            status=429,
        ),
        Fixture("gemini_count_tokens.json", _GOOGLE, "/v1beta/models/gemini-2.5-pro:countTokens"),
        Fixture("gemini_compat_chat_stream.sse", *_COMPAT["gemini"], content_type=SSE),
        Fixture("gemini_compat_chat.json", *_COMPAT["gemini"]),
        Fixture("anthropic_compat_chat_stream.sse", *_COMPAT["anthropic"], content_type=SSE),
        Fixture("anthropic_compat_chat.json", *_COMPAT["anthropic"]),
        Fixture("groq_chat_stream.sse", *_COMPAT["groq"], content_type=SSE),
        Fixture("openrouter_chat_stream.sse", *_COMPAT["openrouter"], content_type=SSE),
        Fixture("deepseek_chat_stream.sse", *_COMPAT["deepseek"], content_type=SSE),
        Fixture("xai_chat.json", *_COMPAT["xai"]),
        Fixture("mistral_chat_stream.sse", *_COMPAT["mistral"], content_type=SSE),
        Fixture("vertex_gemini_stream.sse", VERTEX_HOST,
                VERTEX_MODELS + "/gemini-2.5-flash:streamGenerateContent?alt=sse", content_type=SSE),
        Fixture("vertex_gemini_generate.json", VERTEX_HOST,
                VERTEX_MODELS + "/gemini-2.5-flash:generateContent"),
        Fixture("bedrock_invoke.json", BEDROCK, BEDROCK_HAIKU + "/invoke"),
        Fixture("bedrock_invoke_stream.eventstream", BEDROCK,
                BEDROCK_SONNET + "/invoke-with-response-stream", content_type=EVENTSTREAM),
        Fixture("bedrock_invoke_stream_llama.eventstream", BEDROCK,
                "/model/meta.llama3-3-70b-instruct-v1%3A0/invoke-with-response-stream",
                content_type=EVENTSTREAM),
        Fixture("bedrock_converse.json", BEDROCK, BEDROCK_HAIKU + "/converse"),
        Fixture("bedrock_converse_stream.eventstream", BEDROCK, BEDROCK_SONNET + "/converse-stream",
                content_type=EVENTSTREAM),
        Fixture("bedrock_converse_stream_throttled.eventstream", BEDROCK,
                BEDROCK_SONNET + "/converse-stream", content_type=EVENTSTREAM),
        Fixture("bedrock_error_429.json", BEDROCK, BEDROCK_SONNET + "/converse", status=429),
        Fixture("bedrock_count_tokens.json", BEDROCK, BEDROCK_SONNET + "/count-tokens"),
        # Azure OpenAI (api-version 2024-10-21): a first chunk with empty choices and the
        # prompt_filter_results, content_filter_results on every choice, sorted keys; _stripped
        # is what a client gets once llmtap removed the usage chunk it asked for
        Fixture("azure_chat_stream.sse", _AZURE, _AZURE_CHAT, content_type=SSE),
        Fixture("azure_chat_stream_stripped.sse", _AZURE, _AZURE_CHAT, content_type=SSE),
        Fixture("azure_chat.json", _AZURE, _AZURE_CHAT),
        Fixture("azure_error_content_filter.json", _AZURE, _AZURE_CHAT, status=400),
    )
}

# Whole-stream fixtures whose re-chunking must not change the parse (the property tests).
STREAMED = (*(n for n, f in FIXTURES.items() if f.content_type in (SSE, EVENTSTREAM)),
            "gemini_stream.json")


def load(name: str) -> bytes:
    return (DIR / name).read_bytes()


def anthropic_messages_stream() -> bytes:
    """Thinking + signature, text (multibyte), tool_use with input_json deltas, ping, cache usage."""
    return load("anthropic_messages_stream.sse")


def anthropic_overloaded_stream() -> bytes:
    """A stream that ends with an `event: error` overloaded_error."""
    return load("anthropic_overloaded_stream.sse")


def anthropic_message() -> bytes:
    return load("anthropic_message.json")


def openai_chat_stream() -> bytes:
    """With `stream_options.include_usage`: the usage-only chunk (`choices: []`) before [DONE]."""
    return load("openai_chat_stream.sse")


def openai_chat_stream_stripped() -> bytes:
    """openai_chat_stream minus its usage-only event: what a client that did not ask receives."""
    return load("openai_chat_stream_stripped.sse")


def openai_chat_stream_tools() -> bytes:
    return load("openai_chat_stream_tools.sse")


def openai_chat() -> bytes:
    return load("openai_chat.json")


def openai_responses_stream() -> bytes:
    return load("openai_responses_stream.sse")


def openai_responses_ws_messages() -> list[bytes]:
    """The server's WebSocket text messages for openai_responses_stream, one per element."""
    return load("openai_responses_ws_server.jsonl").splitlines()


def openai_responses_ws_create() -> bytes:
    """The client's `response.create` WebSocket message."""
    return load("openai_responses_ws_client.json").strip()


def openai_responses() -> bytes:
    return load("openai_responses.json")


def gemini_stream_sse() -> bytes:
    """`alt=sse`: `data:` lines with CRLF line ends."""
    return load("gemini_stream.sse")


def gemini_stream_json() -> bytes:
    """Without alt=sse: one JSON array whose elements arrive as they are generated."""
    return load("gemini_stream.json")


def gemini_generate() -> bytes:
    return load("gemini_generate.json")
