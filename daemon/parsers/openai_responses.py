"""OpenAI Responses API: `POST /v1/responses` as JSON or SSE, and the WebSocket transport.

The SSE events (`event: response.created` ... `response.completed` / `response.failed` /
`response.incomplete`, `error`) arrive over WebSocket as one JSON text message each, with the
same `type` field; `ResponsesWebSocket` splits one connection into one exchange per
`response.create` the client sends.
Usage normalisation (see llmtap.parsers.base): input_tokens here includes the cached tokens, so
input_tokens = input_tokens - input_tokens_details.cached_tokens and cache_read_tokens = cached;
output_tokens includes output_tokens_details.reasoning_tokens, which is also reported apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llmtap import jsontext
from llmtap.parsers.base import ResponseParser, Usage, as_dict, as_int
from llmtap.parsers.openai_chat import content_text, tool_names
from llmtap.parsers.openai_chat import usage_from as chat_usage

TERMINAL = ("response.completed", "response.failed", "response.incomplete")
KEEP_MESSAGE_BYTES = 1024 * 1024  # of each exchange's messages, kept for its record


def usage_from(raw: dict[str, Any]) -> Usage:
    return chat_usage(raw, "input_tokens", "output_tokens")


class ResponsesParser(ResponseParser):
    provider = "openai"

    def __init__(self, api: str, **kwargs: Any) -> None:
        self.terminal = False  # a response.completed/failed/incomplete (or error) was seen
        super().__init__(api, **kwargs)

    def on_object(self, obj: Any) -> None:
        obj = as_dict(obj)
        kind = obj.get("type")
        if not isinstance(kind, str):
            self._whole(obj)
        elif kind == "error":
            self._error_event(obj)
        elif kind.endswith(".delta"):
            self.content()
        elif kind == "response.output_item.added":
            self._item(as_dict(obj.get("item")))
        elif kind.startswith("response.") and isinstance(obj.get("response"), dict):
            self._response(obj["response"], terminal=kind in TERMINAL)

    def _whole(self, obj: dict[str, Any]) -> None:
        """A non-streamed reply: the response object itself, or an error body."""
        if obj.get("object") == "response" or "output" in obj:
            for item in obj.get("output") or []:
                self._item(as_dict(item))
            self._response(obj, terminal=True)
        elif obj.get("error"):
            error = as_dict(obj["error"])
            self.provider_error(error.get("type") or error.get("code"), error.get("message"))
        elif self.api == "responses.input_tokens" and "input_tokens" in obj:
            self.extra["counted_input_tokens"] = as_int(obj.get("input_tokens"))
            self.usage = Usage(0, 0, 0, 0, 0, 0)

    def _item(self, item: dict[str, Any]) -> None:
        kind = str(item.get("type") or "")
        if kind in ("function_call", "custom_tool_call"):
            self.note_tool(item.get("name"))
        elif kind.endswith("_call"):  # built-in tools: web_search_call, local_shell_call, ...
            self.note_tool(kind.removesuffix("_call"))

    def _response(self, response: dict[str, Any], terminal: bool) -> None:
        self.set_model(response.get("model"))
        if response.get("id"):
            self.extra["response_id"] = str(response["id"])
        if response.get("service_tier"):
            self.extra["service_tier"] = str(response["service_tier"])
        if response.get("status"):  # queued/in_progress: a background response not done yet
            self.extra["response_status"] = str(response["status"])
        if isinstance(response.get("usage"), dict):
            self.usage = usage_from(response["usage"])
        if terminal:
            self.terminal = True
            self._outcome(response)

    def _outcome(self, response: dict[str, Any]) -> None:
        status = str(response.get("status") or "completed")
        reason = as_dict(response.get("incomplete_details")).get("reason")
        self.stop_reason = str(reason) if status == "incomplete" and reason else status
        error = as_dict(response.get("error"))
        if error:
            self.provider_error(error.get("code") or error.get("type"), error.get("message"))
        elif status == "failed":
            self.provider_error("failed", None)

    def _error_event(self, obj: dict[str, Any]) -> None:
        # SSE: {"type":"error","code":..,"message":..}; WebSocket: {"type":"error","error":{..}}.
        error = as_dict(obj.get("error")) or obj
        self.provider_error(error.get("code") or error.get("type"), error.get("message"))
        self.terminal = True

    def incomplete(self) -> str | None:
        return None if self.terminal else "stream ended before response.completed"


def instructions_text(body: dict[str, Any]) -> str | None:
    """`instructions`, else the system/developer messages of `input`."""
    if isinstance(body.get("instructions"), str) and body["instructions"]:
        return str(body["instructions"])
    items = body["input"] if isinstance(body.get("input"), list) else []
    texts = [
        content_text(item.get("content"))
        for item in items
        if isinstance(item, dict) and item.get("role") in ("system", "developer")
    ]
    return "\n\n".join(texts) or None


def request_fields(body: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": body.get("model"),
        "stream": body.get("stream") is True,
        "temperature": body.get("temperature"),
        "max_tokens": body.get("max_output_tokens"),
        "system": instructions_text(body),
        "tools": tool_names(body.get("tools")),
        "reasoning_effort": as_dict(body.get("reasoning")).get("effort"),
        "previous_response_id": body.get("previous_response_id"),
        "background": body.get("background") is True or None,
    }


@dataclass
class WebSocketExchange:
    """One response over a Responses WebSocket: what the client asked, the parser, and the
    messages themselves (up to KEEP_MESSAGE_BYTES), so the connection need not keep them."""

    request: dict[str, Any]
    parser: ResponsesParser
    started: float
    done: bool = field(default=False)
    sent: bytes = b""  # the client's response.create
    received: list[bytes] = field(default_factory=list)  # the server's messages

    def keep(self, message: bytes) -> None:
        if len(message) + sum(map(len, self.received)) + len(self.sent) <= KEEP_MESSAGE_BYTES:
            self.received.append(message)


class ResponsesWebSocket:
    """Splits a Responses WebSocket connection into exchanges, one per `response.create`.

    The addon calls `client_message` for each message the client sends and `server_message` for
    each the server sends; both return the exchanges that just ended (to record). `close` ends
    what is still open (with an error) when the connection goes away.
    """

    def __init__(self, api: str = "responses") -> None:
        self.api = api
        self._open: list[WebSocketExchange] = []

    def client_message(self, message: bytes | str, now: float) -> list[WebSocketExchange]:
        try:
            obj = as_dict(jsontext.parse(message))
        except ValueError:
            return []
        if obj.get("type") != "response.create":
            return []
        body = as_dict(obj.get("response")) or {k: v for k, v in obj.items() if k != "type"}
        fields = request_fields(body)
        fields["stream"] = True  # implicit over WebSocket
        parser = ResponsesParser(self.api, started=now, model=fields.get("model"))
        raw = message.encode() if isinstance(message, str) else message
        sent = raw if len(raw) <= KEEP_MESSAGE_BYTES else b""
        self._open.append(WebSocketExchange(fields, parser, now, sent=sent))
        return []

    @property
    def pending(self) -> int:
        """Exchanges begun and not yet ended."""
        return len(self._open)

    def server_message(self, message: bytes | str, now: float) -> list[WebSocketExchange]:
        if not self._open:
            self._open.append(self._orphan(now))
        exchange = self._open[0]
        exchange.parser.feed_message(message, now)
        exchange.keep(message.encode() if isinstance(message, str) else message)
        if not (exchange.parser.terminal or self._ends_failed(exchange.parser, message)):
            return []
        exchange.parser.finish(now)
        exchange.done = True
        return [self._open.pop(0)]

    def close(self, now: float) -> list[WebSocketExchange]:
        ended, self._open = self._open, []
        for exchange in ended:
            exchange.parser.fail("WebSocket closed before response.completed")
            exchange.parser.finish(now)
            exchange.done = True
        return ended

    @staticmethod
    def _ends_failed(parser: ResponsesParser, message: bytes | str) -> bool:
        """A parser that failed no longer sees events: spot the terminal one by its name."""
        text = message if isinstance(message, str) else message.decode("utf-8", "replace")
        return parser.failed and any(f'"{name}"' in text for name in TERMINAL)

    def _orphan(self, now: float) -> WebSocketExchange:
        """Server events with no response.create seen (e.g. an error right after the upgrade)."""
        return WebSocketExchange({"stream": True}, ResponsesParser(self.api, started=now), now)
