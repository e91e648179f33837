"""OpenAI Chat Completions: `POST /v1/chat/completions`, JSON and SSE (`data:` lines, `[DONE]`).

Also reads the legacy completions and embeddings replies, which share the usage shape.
Usage normalisation (see llmtap.parsers.base): prompt_tokens includes the cached tokens, so
input_tokens = prompt_tokens - prompt_tokens_details.cached_tokens and cache_read_tokens = cached;
output_tokens = completion_tokens (reasoning included), reasoning_tokens =
completion_tokens_details.reasoning_tokens. OpenAI caching has no write charge: writes are 0.
A stream carries usage only when the request set `stream_options.include_usage` (see
llmtap.parsers.rewrite): then a last chunk has `choices: []` and the usage. The compatible APIs on
other hosts speak the same wire shape, with the usage dialects `usage_from` reads; some send the
usage on the last chunk that still has choices, or always (OpenRouter; Groq in `x_groq`).
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
    """OpenAI's usage object; the Responses API names the same counters input/output_tokens.

    The compatible APIs' dialects: DeepSeek counts cache hits as `prompt_cache_hit_tokens`
    (part of prompt_tokens, like cached_tokens); OpenRouter adds the cache writes a provider
    billed as `prompt_tokens_details.cache_write_tokens` (also part of prompt_tokens); xAI's
    completion_tokens and Gemini's on its compatible endpoint leave the reasoning out, which
    total_tokens still counts: what total_tokens has beyond prompt + completion is billed output.
    """
    prompt = as_int(raw.get(prompt_key))
    details = as_dict(raw.get(f"{prompt_key}_details"))
    cached = as_int(details.get("cached_tokens")) or as_int(raw.get("prompt_cache_hit_tokens"))
    written = as_int(details.get("cache_write_tokens"))
    completion = as_int(raw.get(completion_key))
    reasoning = as_int(as_dict(raw.get(f"{completion_key}_details")).get("reasoning_tokens"))
    hidden = max(0, as_int(raw.get("total_tokens")) - prompt - completion)
    return Usage(
        input_tokens=max(0, prompt - cached - written),
        output_tokens=completion + hidden,
        cache_read_tokens=cached,
        cache_write_5m_tokens=written,
        cache_write_1h_tokens=0,
        reasoning_tokens=max(reasoning, hidden),
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
        self._usage(obj)
        self._content_filter(obj)

    def _content_filter(self, obj: dict[str, Any]) -> None:
        """Azure's filter verdicts (a first chunk with empty choices holds the prompt's): the
        categories marked `filtered: true` go to `content_filter`."""
        results = [as_dict(r).get("content_filter_results") for r in obj.get("prompt_filter_results") or []]
        results += [as_dict(c).get("content_filter_results") for c in obj.get("choices") or []]
        for result in results:
            for category, verdict in as_dict(result).items():
                if as_dict(verdict).get("filtered") is True:
                    hits = self.extra.setdefault("content_filter", [])
                    if category not in hits:
                        hits.append(str(category))

    def _usage(self, obj: dict[str, Any]) -> None:
        # Groq streams its usage in `x_groq.usage` on the last chunk, asked for or not.
        raw = obj.get("usage")
        raw = raw if isinstance(raw, dict) else as_dict(obj.get("x_groq")).get("usage")
        if not isinstance(raw, dict):
            return
        self.usage = usage_from(raw)
        cost = raw.get("cost")  # OpenRouter: what it charged, in USD credits
        if isinstance(cost, int | float) and not isinstance(cost, bool):
            self.extra["provider_cost_usd"] = cost

    def _identity(self, obj: dict[str, Any]) -> None:
        if obj.get("id") and "response_id" not in self.extra:
            self.extra["response_id"] = str(obj["id"])
        for key in ("service_tier", "system_fingerprint"):
            if obj.get(key):
                self.extra[key] = str(obj[key])
        if isinstance(obj.get("provider"), str) and obj["provider"]:
            self.extra["served_by"] = obj["provider"]  # OpenRouter: the provider it routed to

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
