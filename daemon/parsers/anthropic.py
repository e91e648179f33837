"""Anthropic Messages API: `POST /v1/messages` (JSON and SSE), count_tokens, message batches.

Usage maps one to one (see llmtap.parsers.base): input_tokens already excludes cache reads and
writes; cache_creation_input_tokens is split by `cache_creation.ephemeral_5m_input_tokens` /
`ephemeral_1h_input_tokens` when present (any remainder, or no split at all, is the default 5m
TTL). Anthropic does not report thinking tokens apart from output_tokens: reasoning_tokens is None.
In a stream, message_start carries the input side and message_delta the cumulative totals; a
field in message_delta replaces the one from message_start. Claude on Vertex AI speaks the same
wire shape on `publishers/anthropic/models/{model}:rawPredict` (`:streamRawPredict` for SSE).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

from llmtap.parsers.base import ResponseParser, Usage, as_dict, as_int

_USAGE_KEYS = (
    "input_tokens",
    "output_tokens",
    "cache_read_input_tokens",
    "cache_creation_input_tokens",
)


def usage_from(raw: dict[str, Any]) -> Usage:
    split = as_dict(raw.get("cache_creation"))
    written = as_int(raw.get("cache_creation_input_tokens"))
    write_1h = as_int(split.get("ephemeral_1h_input_tokens"))
    write_5m = as_int(split.get("ephemeral_5m_input_tokens"))
    write_5m += max(0, written - write_5m - write_1h)
    return Usage(
        input_tokens=as_int(raw.get("input_tokens")),
        output_tokens=as_int(raw.get("output_tokens")),
        cache_read_tokens=as_int(raw.get("cache_read_input_tokens")),
        cache_write_5m_tokens=write_5m,
        cache_write_1h_tokens=write_1h,
        reasoning_tokens=None,
    )


def merge_usage(into: dict[str, Any], update: dict[str, Any]) -> None:
    """Later non-null counters replace earlier ones (message_delta totals are cumulative)."""
    for key in _USAGE_KEYS:
        if update.get(key) is not None:
            into[key] = update[key]
    split = update.get("cache_creation")
    if isinstance(split, dict):
        into["cache_creation"] = {**as_dict(into.get("cache_creation")), **split}


class AnthropicParser(ResponseParser):
    provider = "anthropic"

    def __init__(self, api: str, **kwargs: Any) -> None:
        self._raw_usage: dict[str, Any] = {}
        self._stopped = False  # message_stop seen
        self._batch_counts: dict[str, int] = {}
        super().__init__(api, **kwargs)

    def framing(self) -> str:
        if self.api == "messages.batches.results" and self.status < 400:
            return "lines"
        return super().framing()

    def on_object(self, obj: Any) -> None:
        obj = as_dict(obj)
        kind = obj.get("type")
        handler = self._HANDLERS.get(kind) if isinstance(kind, str) else None
        if handler is not None:
            handler(self, obj)
        elif "custom_id" in obj:
            self._batch_result(obj)
        elif "error" in obj:  # a non-standard error body
            self._error(obj)
        elif self.api == "messages.count_tokens" and "input_tokens" in obj:
            self.extra["counted_input_tokens"] = as_int(obj.get("input_tokens"))
            self.usage = Usage(0, 0, 0, 0, 0, None)  # counting tokens is free

    # -- stream events ----------------------------------------------------------------------

    def _message_start(self, obj: dict[str, Any]) -> None:
        self._message(as_dict(obj.get("message")))

    def _block_start(self, obj: dict[str, Any]) -> None:
        block = as_dict(obj.get("content_block"))
        if block.get("type") in ("tool_use", "server_tool_use", "mcp_tool_use"):
            self.note_tool(block.get("name"))
            self.content()

    def _block_delta(self, obj: dict[str, Any]) -> None:
        self.content()

    def _message_delta(self, obj: dict[str, Any]) -> None:
        delta = as_dict(obj.get("delta"))
        if delta.get("stop_reason"):
            self.stop_reason = str(delta["stop_reason"])
        self._usage(as_dict(obj.get("usage")))

    def _message_stop(self, obj: dict[str, Any]) -> None:
        self._stopped = True

    def _error(self, obj: dict[str, Any]) -> None:
        error = as_dict(obj.get("error"))
        self.provider_error(error.get("type"), error.get("message"))

    def _ignore(self, obj: dict[str, Any]) -> None:
        """ping, content_block_stop: nothing to record."""

    # -- whole bodies -----------------------------------------------------------------------

    def _message(self, message: dict[str, Any]) -> None:
        self.set_model(message.get("model"))
        if message.get("id"):
            self.extra["response_id"] = str(message["id"])
        if message.get("stop_reason"):
            self.stop_reason = str(message["stop_reason"])
        for block in message.get("content") or []:
            if isinstance(block, dict) and block.get("type") in ("tool_use", "server_tool_use"):
                self.note_tool(block.get("name"))
        self._usage(as_dict(message.get("usage")))

    def _batch(self, obj: dict[str, Any]) -> None:
        self.extra["batch"] = {
            "id": obj.get("id"),
            "processing_status": obj.get("processing_status"),
            "request_counts": obj.get("request_counts"),
        }

    def _batch_result(self, line: dict[str, Any]) -> None:
        """One JSONL line of batch results; succeeded messages' usage adds up."""
        result = as_dict(line.get("result"))
        kind = str(result.get("type") or "unknown")
        self._batch_counts[kind] = self._batch_counts.get(kind, 0) + 1
        self.extra["batch"] = {"results": dict(self._batch_counts)}
        self.extra["batch_pricing"] = True
        message = as_dict(result.get("message"))
        if message:
            self.set_model(message.get("model"))
            self.usage = self.usage + usage_from(as_dict(message.get("usage")))

    def _usage(self, update: dict[str, Any]) -> None:
        if not update:
            return
        merge_usage(self._raw_usage, update)
        self.usage = usage_from(self._raw_usage)
        if update.get("service_tier"):
            self.extra["service_tier"] = str(update["service_tier"])
        if update.get("speed"):  # "fast" mode is billed at its own rates
            self.extra["speed"] = str(update["speed"])
        searches = as_dict(update.get("server_tool_use")).get("web_search_requests")
        if isinstance(searches, int) and not isinstance(searches, bool) and searches > 0:
            self.extra["web_search_requests"] = searches  # billed per search, on top of tokens

    def set_model(self, model: Any) -> None:
        # Vertex AI names its Claude models in the path (claude-sonnet-4-5@20250929) and the
        # reply names them Anthropic's way: the path's name is the one Vertex bills under.
        if self.model and "@" in self.model:
            return
        super().set_model(model)

    def incomplete(self) -> str | None:
        if self.api == "messages" and not self._stopped:
            return "stream ended before message_stop"
        return None

    _HANDLERS: ClassVar[dict[str, Callable[[AnthropicParser, dict[str, Any]], None]]] = {
        "message_start": _message_start,
        "content_block_start": _block_start,
        "content_block_delta": _block_delta,
        "content_block_stop": _ignore,
        "message_delta": _message_delta,
        "message_stop": _message_stop,
        "ping": _ignore,
        "error": _error,
        "message": _message,
        "message_batch": _batch,
    }


def system_text(body: dict[str, Any]) -> str | None:
    """`system` as a string, or the text blocks joined by blank lines."""
    system = body.get("system")
    if isinstance(system, str):
        return system or None
    if isinstance(system, list):
        texts = [str(b.get("text", "")) for b in system if isinstance(b, dict)]
        return "\n\n".join(texts) or None
    return None


def request_fields(body: dict[str, Any]) -> dict[str, Any]:
    """The record's request fields from a Messages (or count_tokens) body."""
    thinking = as_dict(body.get("thinking"))
    return {
        "model": body.get("model"),
        "stream": body.get("stream") is True,
        "temperature": body.get("temperature"),
        "max_tokens": body.get("max_tokens"),
        "system": system_text(body),
        "tools": [str(t.get("name")) for t in body.get("tools") or [] if isinstance(t, dict)],
        "thinking_budget": thinking.get("budget_tokens"),
    }


def batch_request_fields(body: dict[str, Any]) -> dict[str, Any]:
    """A batch create body: the first request's model, and how many requests."""
    requests = [r for r in body.get("requests") or [] if isinstance(r, dict)]
    params = as_dict(requests[0].get("params")) if requests else {}
    return {"model": params.get("model"), "stream": False, "batch_size": len(requests)}
