"""The Markdown twin of a record: a summary for people, headers (auth masked), pretty bodies."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from llmtap.jsontext import pretty
from llmtap.parsers.encoding import decode_all
from llmtap.parsers.eventstream import CONTENT_TYPE as EVENTSTREAM
from llmtap.parsers.eventstream import EventStreamDecoder, Message
from llmtap.parsers.sse import JSONStreamDecoder, SSEDecoder
from llmtap.records.capture import Body, Exchange, mask_secrets

MAX_DECODED = 8 * 1024 * 1024
SUMMARY_KEYS = ("host", "method", "path", "status", "provider", "api", "model", "stream",
                "stop_reason", "cost_usd", "ttft_ms", "duration_ms", "chunks", "credential", "error",
                "counted", "repeat_of")


def render(record: dict[str, Any], exchange: Exchange) -> str:
    lines = [f"# {record.get('model') or 'unknown model'} · {record['id']}", "",
             f"{record.get('started_at')} → {record.get('ended_at')}", ""]
    lines += ["| field | value |", "|---|---|"]
    lines += [f"| {key} | {_cell(record.get(key))} |" for key in SUMMARY_KEYS]
    lines += _usage(record.get("usage")) + _process(record.get("process"))
    if record.get("system_prompt"):
        lines += ["", f"System prompt: [{record['system_prompt']}]({record['system_prompt']})"]
    lines += ["", "## Request", "", *_headers(exchange.request_headers), "",
              *_body(exchange.request_body, None)]
    lines += ["", "## Response", "", *_headers(exchange.response_headers), "",
              *_body(exchange.response_body, exchange.response_text)]
    return mask_secrets("\n".join(lines)) + "\n"


def _cell(value: Any) -> str:
    text = "—" if value is None else json.dumps(value) if isinstance(value, bool | list | dict) \
        else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _usage(usage: Any) -> list[str]:
    if not isinstance(usage, dict):
        return []
    return [f"| usage.{key} | {_cell(value)} |" for key, value in usage.items()]


def _process(process: Any) -> list[str]:
    if not isinstance(process, dict):
        return []
    rows = [f"| process.{key} | {_cell(process.get(key))} |"
            for key in ("pid", "name", "tool", "user", "exe", "cmdline")]
    chain = " ← ".join(f"{p.get('name')}({p.get('pid')})" for p in process.get("parents") or [])
    return [*rows, f"| process.parents | {_cell(chain or None)} |"]


def _headers(headers: list[tuple[str, str]]) -> list[str]:
    if not headers:
        return ["_no headers_"]
    return ["```http", *(f"{name}: {value}" for name, value in headers), "```"]


def fence(text: str, language: str = "") -> list[str]:
    ticks = "```"
    while ticks in text:
        ticks += "`"
    return [f"{ticks}{language}", text, ticks]


def _body(body: Body, stream_text: str | None) -> list[str]:
    if body.data is None:
        return ["_body not captured (streamed to the upstream)_"] if body.size else ["_no body_"]
    note = [f"_first {len(body.data)} of {body.size} bytes_", ""] if body.truncated else []
    try:
        raw = decode_all(body.data, body.encoding, MAX_DECODED)
    except Exception:
        if body.truncated:
            return [*note, f"_{body.encoding}-encoded body, cut short: not shown_"]
        return [f"_{body.size} bytes in an encoding llmtap could not decode ({body.encoding})_"]
    if not raw:
        return ["_empty body_"]
    if body.content_type.split(";")[0].strip().lower() == EVENTSTREAM:
        return [*note, *_eventstream(raw)]
    text = raw.decode("utf-8", "replace")
    if "event-stream" in body.content_type or _looks_like_sse(text):
        assembled = stream_text if stream_text is not None else sse_text(raw)
        out = [*note]
        if assembled:
            out += ["Text assembled from the stream:", "", *fence(assembled), ""]
        else:
            out += ["_no text could be assembled from this stream_", ""]
        return [*out, "<details><summary>raw stream</summary>", "", *fence(text), "", "</details>"]
    pretty = _pretty_json(text)
    if pretty is not None:
        return [*note, *fence(pretty, "json")]
    if "\ufffd" in text and text.count("\ufffd") > len(text) // 10:
        return [f"_{body.size} bytes of binary data ({body.content_type or 'unknown type'})_"]
    return [*note, *fence(text)]


def _eventstream(raw: bytes) -> list[str]:
    """AWS's binary event stream (Bedrock): each message's type and JSON, chunks' bytes decoded."""
    messages: list[Message] = []
    try:
        for message in EventStreamDecoder(MAX_DECODED).feed(raw):
            messages.append(message)
    except ValueError:  # a corrupt frame: what came before it is still shown
        pass
    lines, parts = [], []
    for message in messages:
        kind = message.text(":event-type") or message.text(":exception-type") or "?"
        payload = _chunk_payload(message.payload) if kind == "chunk" else message.payload
        text = payload.decode("utf-8", "replace")
        lines.append(f"{kind}: {text}")
        try:
            obj = json.loads(text)
        except ValueError:
            continue
        if isinstance(obj, dict):
            parts += _bedrock_text(obj)
    out = ["Text assembled from the stream:", "", *fence("".join(parts)), ""] if parts else []
    return [*out, "<details><summary>event-stream messages</summary>", "", *fence("\n".join(lines)),
            "", "</details>"]


def _bedrock_text(obj: dict[str, Any]) -> list[str]:
    if "type" in obj:  # Claude's own events (InvokeModel)
        return _event_text(obj)
    delta = obj.get("delta")
    if isinstance(delta, dict) and isinstance(delta.get("text"), str):  # ConverseStream
        return [delta["text"]]
    generation = obj.get("generation")  # Llama (InvokeModel)
    return [generation] if isinstance(generation, str) and generation else []


def _chunk_payload(payload: bytes) -> bytes:
    """InvokeModelWithResponseStream's `{"bytes": base64}`: the model's own event inside."""
    try:
        return base64.b64decode(json.loads(payload)["bytes"], validate=True)
    except (ValueError, KeyError, TypeError, binascii.Error):
        return payload


def _looks_like_sse(text: str) -> bool:
    return text.startswith(("data:", "event:"))


def _pretty_json(text: str) -> str | None:
    try:
        return pretty(json.loads(text))  # exact: a 64-bit overflow must not show as a float
    except ValueError:
        pass
    if text.lstrip().startswith("["):  # a cut-short JSON-array stream (Gemini): its elements
        elements = JSONStreamDecoder().feed(text.encode())
        if elements:
            return "\n".join(pretty(e) for e in elements)
    return None


def sse_text(raw: bytes) -> str:
    """The text (and thinking) an SSE stream carried, for the supported providers."""
    try:
        events = SSEDecoder().feed(raw + b"\n\n")
    except Exception:
        return ""
    parts: list[str] = []
    for event in events:
        try:
            obj = json.loads(event.data)
        except ValueError:
            continue
        parts += _event_text(obj) if isinstance(obj, dict) else []
    return "".join(parts)


def _event_text(obj: dict[str, Any]) -> list[str]:
    kind = obj.get("type")
    delta = obj.get("delta")
    if kind == "content_block_delta" and isinstance(delta, dict):  # Anthropic
        return [str(delta.get(k)) for k in ("text", "thinking", "partial_json") if delta.get(k)]
    if kind == "response.output_text.delta" and isinstance(delta, str):  # OpenAI Responses
        return [delta]
    found: list[str] = []
    for choice in obj.get("choices") or []:  # OpenAI Chat Completions
        content = (choice.get("delta") or {}).get("content") if isinstance(choice, dict) else None
        if isinstance(content, str):
            found.append(content)
    for candidate in obj.get("candidates") or []:  # Gemini
        parts = ((candidate or {}).get("content") or {}).get("parts") or []
        found += [str(p["text"]) for p in parts if isinstance(p, dict) and p.get("text")]
    return found
