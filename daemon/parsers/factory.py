"""Picks the response parser for a classified request."""

from __future__ import annotations

from collections.abc import Mapping

from llmtap.parsers.anthropic import AnthropicParser
from llmtap.parsers.base import DEFAULT_LIMITS, Limits, ResponseParser, UnknownParser
from llmtap.parsers.bedrock import ConverseParser, InvokeParser
from llmtap.parsers.gemini import GeminiParser
from llmtap.parsers.openai_chat import ChatCompletionsParser
from llmtap.parsers.openai_responses import ResponsesParser
from llmtap.parsers.request import RequestInfo

# Keyed by api, the wire shape: the same parser reads it on every host that speaks it.
_PARSERS: dict[str, type[ResponseParser]] = {
    "messages": AnthropicParser,
    "messages.count_tokens": AnthropicParser,
    "messages.batches": AnthropicParser,
    "messages.batches.results": AnthropicParser,
    "chat.completions": ChatCompletionsParser,
    "completions": ChatCompletionsParser,
    "embeddings": ChatCompletionsParser,
    "responses": ResponsesParser,
    "responses.input_tokens": ResponsesParser,
    "generateContent": GeminiParser,
    "streamGenerateContent": GeminiParser,
    "countTokens": GeminiParser,
    "embedContent": GeminiParser,
    "invoke": InvokeParser,
    "invoke-with-response-stream": InvokeParser,
    "converse": ConverseParser,
    "converse-stream": ConverseParser,
    "count-tokens": ConverseParser,
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
    cls = _PARSERS.get(info.api, UnknownParser)
    parser = cls(
        info.api,
        started=started,
        model=info.model,
        stream=info.stream,
        status=status,
        headers=headers,
        limits=limits,
    )
    parser.provider = info.provider  # the host's: who bills it, whatever wire shape it speaks
    return parser
