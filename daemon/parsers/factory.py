"""Picks the response parser for a classified request."""

from __future__ import annotations

from collections.abc import Mapping

from llmtap.parsers.anthropic import AnthropicParser
from llmtap.parsers.base import DEFAULT_LIMITS, Limits, ResponseParser, UnknownParser
from llmtap.parsers.gemini import GeminiParser
from llmtap.parsers.openai_chat import ChatCompletionsParser
from llmtap.parsers.openai_responses import ResponsesParser
from llmtap.parsers.request import RequestInfo

_PARSERS: dict[tuple[str, str], type[ResponseParser]] = {
    ("anthropic", "messages"): AnthropicParser,
    ("anthropic", "messages.count_tokens"): AnthropicParser,
    ("anthropic", "messages.batches"): AnthropicParser,
    ("anthropic", "messages.batches.results"): AnthropicParser,
    ("openai", "chat.completions"): ChatCompletionsParser,
    ("openai", "completions"): ChatCompletionsParser,
    ("openai", "embeddings"): ChatCompletionsParser,
    ("openai", "responses"): ResponsesParser,
    ("openai", "responses.input_tokens"): ResponsesParser,
    ("google", "generateContent"): GeminiParser,
    ("google", "streamGenerateContent"): GeminiParser,
    ("google", "countTokens"): GeminiParser,
    ("google", "embedContent"): GeminiParser,
}


def response_parser(
    info: RequestInfo,
    *,
    started: float,
    status: int = 200,
    headers: Mapping[str, str] | None = None,
    limits: Limits = DEFAULT_LIMITS,
) -> ResponseParser:
    """The parser for `info`'s response; an unknown API gets one that only times the bytes.

    `started` and every later `now` must come from the same clock (e.g. time.time(), as
    mitmproxy's timestamps do); offsets are measured from `started`.
    """
    cls = _PARSERS.get((info.provider, info.api), UnknownParser)
    parser = cls(
        info.api,
        started=started,
        model=info.model,
        stream=info.stream,
        status=status,
        headers=headers,
        limits=limits,
    )
    if cls is UnknownParser:
        parser.provider = info.provider
    return parser
