"""Provider protocols. For now: streamed responses are relayed as they arrive, never buffered."""

from __future__ import annotations

from mitmproxy import http

STREAM_FLAG = "llmtap.stream"


def is_event_stream(response: http.Response) -> bool:
    content_type = response.headers.get("content-type", "")
    return content_type.split(";")[0].strip().lower() == "text/event-stream"


class Protocols:
    def responseheaders(self, flow: http.HTTPFlow) -> None:
        assert flow.response
        if is_event_stream(flow.response):
            flow.response.stream = True
            flow.metadata[STREAM_FLAG] = True
