"""OpenAI Chat Completions: `POST /v1/chat/completions`, JSON and SSE (`data:` lines, `[DONE]`).

Also reads the legacy completions and embeddings replies, which share the usage shape.
Usage normalisation (see llmtap.parsers.base): prompt_tokens includes the cached tokens, so
input_tokens = prompt_tokens - prompt_tokens_details.cached_tokens and cache_read_tokens = cached;
output_tokens = completion_tokens (reasoning included), reasoning_tokens =
completion_tokens_details.reasoning_tokens. OpenAI caching has no write charge: writes are 0.
A stream carries usage only when the request set `stream_options.include_usage` (see
llmtap.parsers.rewrite): then a last chunk has `choices: []` and the usage.
"""

from __future__ import annotations

from typing import Any

from llmtap.parsers.base import ResponseParser, Usage, as_dict, as_int

_CONTENT_KEYS = (
    "content",
    "refusal",
    "tool_calls",
    "function_call",
    "reasoning_content",
    "reasoning",
    "audio",
)


def usage_from(raw: dict[str, Any], prompt_key: str = "prompt_tokens",
               completion_key: str = "completion_tokens") -> Usage:
    """OpenAI's usage object; the Responses API names the same counters input/output_tokens."""
    prompt = as_int(raw.get(prompt_key))
    cached = as_int(as_dict(raw.get(f"{prompt_key}_details")).get("cached_tokens"))
    reasoning = as_dict(raw.get(f"{completion_key}_details")).get("reasoning_tokens")
    return Usage(
        input_tokens=max(0, prompt - cached),
        output_tokens=as_int(raw.get(completion_key)),
        cache_read_tokens=cached,
        cache_write_5m_tokens=0,
        cache_write_1h_tokens=0,
        reasoning_tokens=as_int(reasoning),
    )


class ChatCompletionsParser(ResponseParser):
    provider = "openai"

    def __init__(self, api: str, **kwargs: Any) -> None:
        self._done = False
        super().__init__(api, **kwargs)

    def on_done(self) -> None:
        self._done = True

    def on_object(self, obj: Any) -> None:
        obj = as_dict(obj)
        if obj.get("error"):
            error = as_dict(obj["error"])
            self.provider_error(error.get("type") or error.get("code"), error.get("message"))
            return
        self.set_model(obj.get("model"))
        self._identity(obj)
        for choice in obj.get("choices") or []:
            if isinstance(choice, dict):
                self._choice(choice)
        if isinstance(obj.get("usage"), dict):
            self.usage = usage_from(obj["usage"])

    def _identity(self, obj: dict[str, Any]) -> None:
        if obj.get("id") and "response_id" not in self.extra:
            self.extra["response_id"] = str(obj["id"])
        for key in ("service_tier", "system_fingerprint"):
            if obj.get(key):
                self.extra[key] = str(obj[key])

    def _choice(self, choice: dict[str, Any]) -> None:
        # A streamed chunk has `delta`, a whole reply has `message`, legacy completions `text`.
        message = as_dict(choice.get("delta") or choice.get("message"))
        if any(message.get(key) for key in _CONTENT_KEYS) or choice.get("text"):
            self.content()
        for call in message.get("tool_calls") or []:
            self.note_tool(as_dict(as_dict(call).get("function")).get("name"))
        if choice.get("finish_reason") and choice.get("index", 0) == 0:
            self.stop_reason = str(choice["finish_reason"])

    def incomplete(self) -> str | None:
        return None if self._done else "stream ended before data: [DONE]"


def system_text(messages: Any) -> str | None:
    """The system/developer messages' text, joined by blank lines."""
    texts: list[str] = []
    for message in messages if isinstance(messages, list) else []:
        if isinstance(message, dict) and message.get("role") in ("system", "developer"):
            texts.append(content_text(message.get("content")))
    return "\n\n".join(texts) or None


def content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def tool_names(tools: Any) -> list[str]:
    names = []
    for tool in tools if isinstance(tools, list) else []:
        tool = as_dict(tool)
        name = as_dict(tool.get("function")).get("name") or tool.get("name") or tool.get("type")
        if name:
            names.append(str(name))
    return names


def request_fields(body: dict[str, Any]) -> dict[str, Any]:
    max_tokens = body.get("max_completion_tokens")
    return {
        "model": body.get("model"),
        "stream": body.get("stream") is True,
        "temperature": body.get("temperature"),
        "max_tokens": max_tokens if max_tokens is not None else body.get("max_tokens"),
        "system": system_text(body.get("messages")),
        "tools": tool_names(body.get("tools")) + tool_names(body.get("functions")),
        "reasoning_effort": body.get("reasoning_effort"),
        "include_usage": as_dict(body.get("stream_options")).get("include_usage") is True,
    }
