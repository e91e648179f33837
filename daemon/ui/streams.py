"""The assistant's reply of a call, from the response its Markdown twin kept: a JSON body, or a
raw stream (SSE) rebuilt into its text, thinking and tool calls."""

from __future__ import annotations

import json
from typing import Any

from llmtap.parsers.sse import SSEDecoder
from llmtap.ui.calls import Call

MAX_EVENTS = 20_000


def response_parts(call: Call) -> list[dict[str, str]]:
    body = call.response.body_json
    if isinstance(body, list):  # a Gemini stream as a JSON array
        return _merge([p for element in body for p in _json_parts(element)])
    if isinstance(body, dict):
        return _merge(_json_parts(body))
    if call.response.body_text and call.response.body_text.startswith(("data:", "event:")):
        parts = _merge([p for event in sse_events(call.response.body_text) for p in _event(event)])
        if parts:
            return parts
    if call.response.assembled:
        return [{"kind": "text", "text": call.response.assembled, "name": ""}]
    return []


def sse_events(text: str) -> list[dict[str, Any]]:
    try:
        events = SSEDecoder().feed(text.encode() + b"\n\n")
    except Exception:
        return []
    out = []
    for event in events[:MAX_EVENTS]:
        try:
            obj = json.loads(event.data)
        except ValueError:
            continue
        if isinstance(obj, dict):
            out.append(obj)
    return out


def response_id(call: Call) -> str | None:
    """An OpenAI Responses response's id (what a later `previous_response_id` names)."""
    body = call.response.body_json
    if isinstance(body, dict) and body.get("object") == "response":
        return str(body.get("id"))
    if call.response.body_text:
        for event in sse_events(call.response.body_text[:200_000])[:5]:
            response = event.get("response")
            if isinstance(response, dict) and response.get("id"):
                return str(response["id"])
    return None


def _part(kind: str, text: str, name: str = "") -> dict[str, str]:
    return {"kind": kind, "text": text, "name": name}


def _merge(parts: list[dict[str, str]]) -> list[dict[str, str]]:
    """Consecutive deltas of one kind (and tool) joined into one part."""
    merged: list[dict[str, str]] = []
    for part in parts:
        if merged and part.get("delta") and merged[-1]["kind"] == part["kind"] \
                and (not part["name"] or part["name"] == merged[-1]["name"]):
            merged[-1]["text"] += part["text"]
        else:
            merged.append({k: v for k, v in part.items() if k != "delta"})
    return [p for p in merged if p["text"] or p["kind"] == "tool_call"]


def _delta(kind: str, text: str, name: str = "") -> dict[str, str]:
    return {"kind": kind, "text": text, "name": name, "delta": "1"}


def _json_parts(body: dict[str, Any]) -> list[dict[str, str]]:
    parts: list[dict[str, str]] = []
    for block in body.get("content") or []:  # Anthropic
        if isinstance(block, dict):
            parts += _anthropic_block(block)
    for choice in body.get("choices") or []:  # Chat Completions
        message = choice.get("message") if isinstance(choice, dict) else None
        if isinstance(message, dict):
            if message.get("content"):
                parts.append(_part("text", str(message["content"])))
            for tool in message.get("tool_calls") or []:
                function = tool.get("function") or {}
                parts.append(_part("tool_call", str(function.get("arguments") or ""),
                                   str(function.get("name") or "?")))
    for item in body.get("output") or []:  # Responses
        if isinstance(item, dict):
            parts += _responses_item(item)
    for candidate in body.get("candidates") or []:  # Gemini
        content = (candidate or {}).get("content") or {}
        for part in content.get("parts") or []:
            if isinstance(part, dict) and "text" in part:
                parts.append(_delta("thinking" if part.get("thought") else "text", str(part["text"])))
            elif isinstance(part, dict) and isinstance(part.get("functionCall"), dict):
                call = part["functionCall"]
                parts.append(_part("tool_call", json.dumps(call.get("args")), str(call.get("name"))))
    return parts


def _anthropic_block(block: dict[str, Any]) -> list[dict[str, str]]:
    kind = block.get("type")
    if kind == "text":
        return [_part("text", str(block.get("text") or ""))]
    if kind == "thinking":
        return [_part("thinking", str(block.get("thinking") or ""))]
    if kind in ("tool_use", "server_tool_use"):
        return [_part("tool_call", json.dumps(block.get("input")), str(block.get("name") or "?"))]
    return []


def _responses_item(item: dict[str, Any]) -> list[dict[str, str]]:
    kind = item.get("type")
    if kind == "message":
        return [_part("text", str(c.get("text") or "")) for c in item.get("content") or []
                if isinstance(c, dict) and c.get("type") == "output_text"]
    if kind == "reasoning":
        return [_part("thinking", "\n".join(str(s.get("text") or "") for s in item.get("summary") or []
                                            if isinstance(s, dict)))]
    if kind and kind.endswith("_call"):
        return [_part("tool_call", str(item.get("arguments") or item.get("input") or ""),
                      str(item.get("name") or kind))]
    return []


def _event(event: dict[str, Any]) -> list[dict[str, str]]:
    kind = event.get("type")
    if kind == "content_block_start" and isinstance(event.get("content_block"), dict):  # Anthropic
        block = event["content_block"]
        if block.get("type") in ("tool_use", "server_tool_use"):
            return [_part("tool_call", "", str(block.get("name") or "?"))]
        return [_part(str(block.get("type")), "")] if block.get("type") == "thinking" else []
    if kind == "content_block_delta" and isinstance(event.get("delta"), dict):
        delta = event["delta"]
        for key, part_kind in (("text", "text"), ("thinking", "thinking"), ("partial_json", "tool_call")):
            if isinstance(delta.get(key), str):
                return [_delta(part_kind, delta[key])]
        return []
    if kind == "response.completed" and isinstance(event.get("response"), dict):  # Responses
        return [p for item in event["response"].get("output") or [] if isinstance(item, dict)
                for p in _responses_item(item)]
    if "choices" in event:  # Chat Completions chunks
        return _chat_chunk(event)
    if "candidates" in event:
        return _json_parts(event)
    return []


def _chat_chunk(event: dict[str, Any]) -> list[dict[str, str]]:
    parts: list[dict[str, str]] = []
    for choice in event.get("choices") or []:
        delta = choice.get("delta") if isinstance(choice, dict) else None
        if not isinstance(delta, dict):
            continue
        if isinstance(delta.get("reasoning_content"), str):
            parts.append(_delta("thinking", delta["reasoning_content"]))
        if isinstance(delta.get("content"), str):
            parts.append(_delta("text", delta["content"]))
        for tool in delta.get("tool_calls") or []:
            function = tool.get("function") or {}
            if function.get("name"):
                parts.append(_part("tool_call", str(function.get("arguments") or ""), function["name"]))
            elif function.get("arguments"):
                parts.append(_delta("tool_call", str(function["arguments"])))
    return parts
