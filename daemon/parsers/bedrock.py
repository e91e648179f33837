"""AWS Bedrock runtime (`bedrock-runtime.<region>.amazonaws.com`): `POST /model/{modelId}/` +
`invoke`, `invoke-with-response-stream`, `converse`, `converse-stream` and `count-tokens`; the
record's `api` is that last path segment. Field names follow botocore's service model.

The model is the path's modelId, URL-decoded, as Bedrock bills it: a model id, an inference
profile id (`us.anthropic.claude-sonnet-4-5-20250929-v1:0`) or an ARN. A reply's own model name
(Anthropic's `model`) goes to `response_model`.

Streams arrive in AWS's binary event-stream framing (llmtap.parsers.eventstream): each message is
an event (`:event-type`), or an exception (`:exception-type`, a JSON `message`) that ends it.

Usage (see llmtap.parsers.base): Converse's `inputTokens` excludes cache reads and writes, as
Anthropic's input_tokens does; `cacheWriteInputTokens` is split by its `cacheDetails` TTLs, and
what no TTL accounts for is the default 5m. InvokeModel with an Anthropic model speaks Anthropic's
Messages format (events base64-encoded in `chunk` events), read by AnthropicParser's logic; for
any other model Bedrock's own counts are used: the x-amzn-bedrock-*-token-count headers, or the
`amazon-bedrock-invocationMetrics` of a stream's last chunk.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote

from llmtap import jsontext
from llmtap.parsers import anthropic
from llmtap.parsers.anthropic import AnthropicParser
from llmtap.parsers.base import ParseStop, ResponseParser, Usage, as_dict, as_int
from llmtap.parsers.eventstream import CONTENT_TYPE, EventStreamDecoder, Message
from llmtap.parsers.framers import Framer

OPERATIONS = ("invoke", "invoke-with-response-stream", "converse", "converse-stream", "count-tokens")
STREAMS = ("invoke-with-response-stream", "converse-stream")
PATH = re.compile(r"/model/(?P<model>[^/?#]+)/(?P<op>" + "|".join(OPERATIONS) + r")/?(?:[?#]|$)")
_HEADER_COUNTS = {  # InvokeModel's own counts, for every model
    "input_tokens": "x-amzn-bedrock-input-token-count",
    "output_tokens": "x-amzn-bedrock-output-token-count",
    "cache_read_tokens": "x-amzn-bedrock-cache-read-input-token-count",
    "cache_write_5m_tokens": "x-amzn-bedrock-cache-write-input-token-count",
}


def model_from_path(path: str) -> str | None:
    match = PATH.search(path)
    return unquote(match.group("model")) if match else None


def usage_from(raw: dict[str, Any]) -> Usage:
    """Converse's TokenUsage (also Nova's InvokeModel usage, whose cache keys end in Count)."""
    written = as_int(raw.get("cacheWriteInputTokens", raw.get("cacheWriteInputTokenCount")))
    by_ttl = {str(as_dict(d).get("ttl")): as_int(as_dict(d).get("inputTokens"))
              for d in raw.get("cacheDetails") or []}
    write_1h = by_ttl.get("1h", 0)
    return Usage(
        input_tokens=as_int(raw.get("inputTokens")),
        output_tokens=as_int(raw.get("outputTokens")),
        cache_read_tokens=as_int(raw.get("cacheReadInputTokens", raw.get("cacheReadInputTokenCount"))),
        cache_write_5m_tokens=max(by_ttl.get("5m", 0), written - write_1h),
        cache_write_1h_tokens=write_1h,
        reasoning_tokens=None,  # Bedrock does not report them apart from outputTokens
    )


def metrics_usage(metrics: dict[str, Any]) -> Usage:
    """`amazon-bedrock-invocationMetrics` of a stream's last chunk."""
    return Usage(as_int(metrics.get("inputTokenCount")), as_int(metrics.get("outputTokenCount")),
                 as_int(metrics.get("cacheReadInputTokenCount")),
                 as_int(metrics.get("cacheWriteInputTokenCount")), 0, None)


def header_usage(headers: Mapping[str, str]) -> Usage | None:
    if _HEADER_COUNTS["input_tokens"] not in headers:
        return None
    counts = {k: int(v) if (v := headers.get(name, "0")).isascii() and v.isdigit() else 0
              for k, name in _HEADER_COUNTS.items()}
    return Usage(**counts, cache_write_1h_tokens=0, reasoning_tokens=None)


class EventStreamFramer(Framer):
    parser: BedrockReply

    def __init__(self, parser: BedrockReply) -> None:
        super().__init__(parser)
        self.decoder = EventStreamDecoder(parser.limits.max_event_bytes)

    def feed(self, data: bytes) -> None:
        for message in self.decoder.feed(data):
            self.parser.events += 1
            self.parser.on_message(message)

    def incomplete(self) -> str | None:
        return "stream ended inside an event-stream message" if self.decoder.pending else None


def _json(payload: bytes, what: str) -> dict[str, Any]:
    if not payload.strip():
        return {}
    try:
        return as_dict(jsontext.parse(payload))
    except ValueError as exc:
        raise ParseStop(f"invalid JSON in {what}: {exc}") from None


class BedrockReply(ResponseParser):
    """What every Bedrock reply shares: the event-stream framing, AWS's error shapes, the path's
    model, Bedrock's response headers."""

    provider = "bedrock"

    def __init__(self, api: str, **kwargs: Any) -> None:
        headers = {str(k).lower(): str(v) for k, v in (kwargs.get("headers") or {}).items()}
        self._error_type = headers.get("x-amzn-errortype", "").split(":")[0] or None
        self._header_usage = header_usage(headers)
        super().__init__(api, **kwargs)
        if headers.get("x-amzn-requestid"):
            self.extra.setdefault("request_id", headers["x-amzn-requestid"])
        if headers.get("x-amzn-bedrock-service-tier"):
            self.extra["service_tier"] = headers["x-amzn-bedrock-service-tier"]

    def new_framer(self) -> Framer:
        if self.content_type == CONTENT_TYPE:
            return EventStreamFramer(self)
        return super().new_framer()

    @property
    def streamed(self) -> bool:
        return isinstance(self._framer, EventStreamFramer) or super().streamed

    def set_model(self, model: Any) -> None:
        if self.model is None:
            super().set_model(model)
        elif isinstance(model, str) and model and model != self.model:
            self.extra["response_model"] = model

    def on_message(self, message: Message) -> None:
        kind = message.text(":message-type")
        if kind == "exception":
            text = _json(message.payload, "an exception message").get("message")
            self.provider_error(message.text(":exception-type"), text)
        elif kind == "error":
            self.provider_error(message.text(":error-code"), message.text(":error-message"))
        elif kind == "event":
            event = message.text(":event-type") or ""
            self.on_stream_event(event, _json(message.payload, f"event {event!r}"))

    def on_object(self, obj: Any) -> None:
        obj = as_dict(obj)
        if self.status >= 400 and "type" not in obj:  # AWS's error body: {"message": ...}
            message = obj.get("message", obj.get("Message"))
            self.provider_error(self._error_type or f"http {self.status}", message)
            return
        self.on_body(obj)

    def on_body(self, obj: dict[str, Any]) -> None:
        """A whole reply body."""

    def on_stream_event(self, event: str, obj: dict[str, Any]) -> None:
        """One event-stream event and its JSON payload."""


class InvokeParser(BedrockReply, AnthropicParser):
    """InvokeModel and InvokeModelWithResponseStream: Anthropic's Messages format for Claude,
    Bedrock's own counts for any other model."""

    def __init__(self, api: str, **kwargs: Any) -> None:
        self._anthropic = False  # an Anthropic-shaped body or event was seen
        self._metrics: Usage | None = None
        super().__init__(api, **kwargs)
        if self._header_usage is not None:
            self.usage = self._header_usage  # a body's own usage (TTL split) replaces it

    def on_body(self, obj: dict[str, Any]) -> None:
        if isinstance(obj.get("type"), str):
            self._anthropic = True
            AnthropicParser.on_object(self, obj)
            return
        if isinstance(obj.get("usage"), dict):  # Amazon Nova
            self.usage = usage_from(obj["usage"])
        stop = obj.get("stopReason", obj.get("stop_reason"))
        if isinstance(stop, str) and stop:
            self.stop_reason = stop

    def on_stream_event(self, event: str, obj: dict[str, Any]) -> None:
        if event != "chunk":
            return
        try:
            inner = as_dict(jsontext.parse(base64.b64decode(str(obj.get("bytes", "")), validate=True)))
        except (ValueError, binascii.Error) as exc:
            raise ParseStop(f"invalid chunk payload: {exc}") from None
        metrics = inner.pop("amazon-bedrock-invocationMetrics", None)
        if isinstance(metrics, dict):
            self._metrics = metrics_usage(metrics)
            self.extra["provider_latency_ms"] = metrics.get("invocationLatency")
        if not self._anthropic and not isinstance(inner.get("type"), str):
            self.content()  # another model's chunk: its first is the first token
        self.on_body(inner)
        if self._metrics is not None and not self._raw_usage:  # Anthropic's usage wins
            self.usage = self._metrics

    def incomplete(self) -> str | None:
        if self._anthropic and not self._stopped:
            return "stream ended before message_stop"
        if not self._anthropic and self._metrics is None:
            return "stream ended before its invocation metrics"
        return None


class ConverseParser(BedrockReply):
    """Converse and ConverseStream, and CountTokens (free: its count is not a call's usage)."""

    def __init__(self, api: str, **kwargs: Any) -> None:
        self._stopped = False  # messageStop seen
        self._metadata = False  # the metadata event (usage) seen
        super().__init__(api, **kwargs)
        if api == "count-tokens":
            self.extra["counted"] = False

    def on_body(self, obj: dict[str, Any]) -> None:
        if self.api == "count-tokens":
            self.extra["counted_input_tokens"] = as_int(obj.get("inputTokens"))
            self.usage = Usage(0, 0, 0, 0, 0, None)
            return
        message = as_dict(as_dict(obj.get("output")).get("message"))
        for block in message.get("content") or []:
            self.note_tool(as_dict(as_dict(block).get("toolUse")).get("name"))
        if obj.get("stopReason"):
            self.stop_reason = str(obj["stopReason"])
        self._metadata_event(obj)

    def on_stream_event(self, event: str, obj: dict[str, Any]) -> None:
        if event == "contentBlockStart":
            tool = as_dict(as_dict(obj.get("start")).get("toolUse"))
            if tool:
                self.note_tool(tool.get("name"))
                self.content()
        elif event == "contentBlockDelta":
            self.content()
        elif event == "messageStop":
            self._stopped = True
            if obj.get("stopReason"):
                self.stop_reason = str(obj["stopReason"])
        elif event == "metadata":
            self._metadata = True
            self._metadata_event(obj)

    def _metadata_event(self, obj: dict[str, Any]) -> None:
        """usage, metrics and serviceTier: a whole reply's, or the stream's metadata event's."""
        if isinstance(obj.get("usage"), dict):
            self.usage = usage_from(obj["usage"])
        latency = as_dict(obj.get("metrics")).get("latencyMs")
        if latency is not None:
            self.extra["provider_latency_ms"] = latency
        tier = as_dict(obj.get("serviceTier")).get("type")
        if isinstance(tier, str) and tier:
            self.extra["service_tier"] = tier

    def incomplete(self) -> str | None:
        if not self._stopped:
            return "stream ended before messageStop"
        if not self._metadata:
            return "stream ended before its metadata event (usage)"
        return None


# -- the request side -----------------------------------------------------------------------


def _converse_fields(body: dict[str, Any]) -> dict[str, Any]:
    config = as_dict(body.get("inferenceConfig"))
    system = [str(b["text"]) for b in body.get("system") or [] if isinstance(b, dict) and "text" in b]
    tools = [as_dict(as_dict(t).get("toolSpec")).get("name")
             for t in as_dict(body.get("toolConfig")).get("tools") or []]
    thinking = as_dict(as_dict(body.get("additionalModelRequestFields")).get("thinking"))
    return {
        "temperature": config.get("temperature"),
        "max_tokens": config.get("maxTokens"),
        "system": "\n\n".join(system) or None,
        "tools": [name for name in tools if isinstance(name, str) and name],
        "thinking_budget": thinking.get("budget_tokens"),
    }


def _invoke_fields(body: dict[str, Any]) -> dict[str, Any]:
    if "anthropic_version" in body or "anthropic_beta" in body:
        return anthropic.request_fields(body)
    # Other models' own formats: Llama's max_gen_len, Mistral's and Cohere's max_tokens.
    return {"temperature": body.get("temperature"),
            "max_tokens": body.get("max_tokens", body.get("max_gen_len"))}


def request_fields(body: dict[str, Any], path: str) -> dict[str, Any]:
    """The record's request fields; the model and the stream flag come from the path."""
    match = PATH.search(path)
    operation = match.group("op") if match else ""
    fields = {}
    if operation in ("converse", "converse-stream"):
        fields = _converse_fields(body)
    elif operation in ("invoke", "invoke-with-response-stream"):
        fields = _invoke_fields(body)
    return {**fields, "model": model_from_path(path), "stream": operation in STREAMS}
