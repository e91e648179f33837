"""Gemini API: `models/{model}:generateContent`, `:streamGenerateContent` (a JSON array
stream, or SSE with `alt=sse`), and `:countTokens`.

Usage normalisation (see llmtap.parsers.base): promptTokenCount includes cachedContentTokenCount,
so input_tokens = promptTokenCount - cachedContentTokenCount + toolUsePromptTokenCount and
cache_read_tokens = cachedContentTokenCount; candidatesTokenCount excludes the thinking tokens,
so output_tokens = candidatesTokenCount + thoughtsTokenCount and reasoning_tokens =
thoughtsTokenCount. Each stream chunk repeats the running usageMetadata: the last one wins.
The model comes from the URL path unless the reply names its `modelVersion`.
"""

from __future__ import annotations

import re
from typing import Any

from llmtap.parsers.base import ResponseParser, Usage, as_dict, as_int

# /v1beta/models/gemini-2.5-pro:streamGenerateContent, also tunedModels/... and Vertex AI's
# /v1/projects/p/locations/l/publishers/google/models/gemini-2.5-pro:generateContent.
PATH = re.compile(r"/(?:models|tunedModels)/(?P<model>[^/:?]+):(?P<method>[A-Za-z]+)")


def usage_from(raw: dict[str, Any]) -> Usage:
    prompt = as_int(raw.get("promptTokenCount"))
    cached = as_int(raw.get("cachedContentTokenCount"))
    thoughts = as_int(raw.get("thoughtsTokenCount"))
    return Usage(
        input_tokens=max(0, prompt - cached) + as_int(raw.get("toolUsePromptTokenCount")),
        output_tokens=as_int(raw.get("candidatesTokenCount")) + thoughts,
        cache_read_tokens=cached,
        cache_write_5m_tokens=0,
        cache_write_1h_tokens=0,
        reasoning_tokens=thoughts,
    )


def model_from_path(path: str) -> str | None:
    match = PATH.search(path)
    return match.group("model") if match else None


class GeminiParser(ResponseParser):
    provider = "google"

    def __init__(self, api: str, **kwargs: Any) -> None:
        self._finished_candidate = False  # a finishReason or a blockReason was seen
        super().__init__(api, **kwargs)

    def framing(self) -> str:
        if self.content_type == "text/event-stream":
            return "sse"
        if self.api == "streamGenerateContent" and self.status < 400:
            return "array"
        return "body"

    def on_object(self, obj: Any) -> None:
        if isinstance(obj, list):  # an error reply to a stream request can be a whole array
            for item in obj:
                self.on_object(item)
            return
        obj = as_dict(obj)
        if obj.get("error"):
            error = as_dict(obj["error"])
            self.provider_error(error.get("status") or error.get("code"), error.get("message"))
            return
        self.set_model(obj.get("modelVersion"))
        if obj.get("responseId"):
            self.extra["response_id"] = str(obj["responseId"])
        self._feedback(as_dict(obj.get("promptFeedback")))
        for candidate in obj.get("candidates") or []:
            self._candidate(as_dict(candidate))
        if isinstance(obj.get("usageMetadata"), dict):
            self.usage = usage_from(obj["usageMetadata"])
        if self.api == "countTokens" and "totalTokens" in obj:
            self.extra["counted_input_tokens"] = as_int(obj.get("totalTokens"))
            self.usage = Usage(0, 0, 0, 0, 0, 0)

    def _feedback(self, feedback: dict[str, Any]) -> None:
        if feedback.get("blockReason"):
            self.stop_reason = str(feedback["blockReason"])
            self._finished_candidate = True

    def _candidate(self, candidate: dict[str, Any]) -> None:
        parts = as_dict(candidate.get("content")).get("parts") or []
        if parts:
            self.content()
        for part in parts:
            self.note_tool(as_dict(as_dict(part).get("functionCall")).get("name"))
        if candidate.get("finishReason") and candidate.get("index", 0) == 0:
            self.stop_reason = str(candidate["finishReason"])
            self._finished_candidate = True

    def incomplete(self) -> str | None:
        if self._finished_candidate:
            return None
        return "stream ended before a finishReason"


def _parts_text(content: Any) -> str | None:
    if isinstance(content, str):
        return content or None
    parts = as_dict(content).get("parts") or []
    texts = [str(as_dict(p).get("text", "")) for p in parts]
    return "\n\n".join(texts) or None


def _tool_names(tools: Any) -> list[str]:
    names: list[str] = []
    for tool in tools if isinstance(tools, list) else []:
        for key, value in as_dict(tool).items():
            if key in ("functionDeclarations", "function_declarations"):
                names += [str(as_dict(d).get("name")) for d in value or []]
            else:  # googleSearch, codeExecution, urlContext, ...
                names.append(key)
    return names


def request_fields(body: dict[str, Any], path: str) -> dict[str, Any]:
    # The REST API accepts both camelCase and snake_case field names.
    config = as_dict(body.get("generationConfig") or body.get("generation_config"))
    thinking = as_dict(config.get("thinkingConfig") or config.get("thinking_config"))
    system = body.get("systemInstruction") or body.get("system_instruction")
    match = PATH.search(path)
    return {
        "model": match.group("model") if match else None,
        "stream": match is not None and match.group("method") == "streamGenerateContent",
        "temperature": config.get("temperature"),
        "max_tokens": config.get("maxOutputTokens", config.get("max_output_tokens")),
        "system": _parts_text(system),
        "tools": _tool_names(body.get("tools")),
        "thinking_budget": thinking.get("thinkingBudget", thinking.get("thinking_budget")),
    }
