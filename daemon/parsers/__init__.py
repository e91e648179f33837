"""Wire-accurate parsers for the LLM APIs llmtap records, and the usage rewrite for OpenAI.

From a mitmproxy addon (every call below is pure and never raises):

    info = parse_request(host, method, path, raw_body, content_encoding)     # `request` hook
    rewrite = usage_rewrite(info, body)           # streamed Chat Completions without usage:
    if rewrite.strip_usage_chunk:                 # send rewrite.body + rewrite.headers upstream
        ...
    parser = response_parser(info, started=t0, status=code, headers=response_headers)
    parser.feed(raw_chunk, now)   # each wire chunk, still content-encoded (`responseheaders`
    parser.feed(b"", now)         # stream callable), then b"" at the end
    record.update(parser.result()); record["request"] = info.record()

`started` and every `now` share one clock (e.g. time.time(), as mitmproxy's timestamps).
The token-usage convention (input_tokens excludes cached tokens, output_tokens includes
reasoning) is documented in llmtap.parsers.base; llmtap.pricing prices it.
"""

from llmtap.parsers.base import DEFAULT_LIMITS, Limits, ResponseParser, Usage
from llmtap.parsers.classify import classify
from llmtap.parsers.factory import response_parser
from llmtap.parsers.openai_responses import ResponsesWebSocket, WebSocketExchange
from llmtap.parsers.request import RequestInfo, parse_request
from llmtap.parsers.rewrite import UsageChunkStripper, UsageRewrite, usage_rewrite
from llmtap.parsers.sse import Event, JSONStreamDecoder, SSEDecoder

__all__ = [
    "DEFAULT_LIMITS",
    "Event",
    "JSONStreamDecoder",
    "Limits",
    "RequestInfo",
    "ResponseParser",
    "ResponsesWebSocket",
    "SSEDecoder",
    "Usage",
    "UsageChunkStripper",
    "UsageRewrite",
    "WebSocketExchange",
    "classify",
    "parse_request",
    "response_parser",
    "usage_rewrite",
]
