"""A call's request (and response) as a conversation: turns of text, thinking, tool calls and
results, and images, whatever the provider's wire shape; and the diff between two calls.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from llmtap.ui.calls import Call
from llmtap.ui.streams import response_parts

IMAGE_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp")
BASE64 = re.compile(r"^[A-Za-z0-9+/]+=*$")


@dataclass
class Part:
    kind: str  # text | thinking | tool_call | tool_result | image | other
    text: str = ""
    name: str = ""  # a tool's name, an image's media type
    image: str | None = None  # a data: URL, only for the image types above


@dataclass
class Turn:
    role: str
    parts: list[Part] = field(default_factory=list)

    @property
    def size(self) -> int:
        """Characters it adds to the context (a rough share of the prompt's tokens)."""
        return sum(len(p.text) + len(p.image or "") for p in self.parts)

    def key(self) -> str:
        """What identifies the turn when two calls are compared."""
        text = json.dumps([self.role, [(p.kind, p.name, p.text, p.image) for p in self.parts]])
        return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class Conversation:
    system: str = ""
    turns: list[Turn] = field(default_factory=list)
    reply: Turn | None = None
    tools: list[str] = field(default_factory=list)
    chained: bool = False  # previous_response_id: the earlier context is held by the server


def conversation(call: Call) -> Conversation:
    body = call.request.body_json if isinstance(call.request.body_json, dict) else {}
    convo = Conversation()
    if "contents" in body or "systemInstruction" in body:
        _gemini(body, convo)
    elif "input" in body or "instructions" in body:
        _responses(body, convo)
    else:
        _messages(body, convo)
    convo.tools = [_tool_name(t) for t in body.get("tools") or [] if isinstance(t, dict)]
    parts = response_parts(call)
    convo.reply = Turn("assistant", [Part(**p) for p in parts]) if parts else None
    return convo


def _tool_name(tool: dict[str, Any]) -> str:
    function = tool.get("function")
    function = function if isinstance(function, dict) else {}
    return str(tool.get("name") or function.get("name") or tool.get("type") or "?")


def _messages(body: dict[str, Any], convo: Conversation) -> None:
    """Anthropic Messages and OpenAI Chat Completions."""
    convo.system = _text(body.get("system"))
    for message in body.get("messages") or []:
        if not isinstance(message, dict):
            continue
        role = str(message.get("role") or "?")
        parts = _content(message.get("content"))
        for call in message.get("tool_calls") or []:
            function = (call.get("function") or {}) if isinstance(call, dict) else {}
            parts.append(Part("tool_call", str(function.get("arguments") or ""),
                              str(function.get("name") or "?")))
        if role in ("system", "developer") and not convo.turns:
            convo.system = "\n\n".join(filter(None, [convo.system, _plain(parts)]))
            continue
        if role == "tool":
            parts = [Part("tool_result", _plain(parts), str(message.get("tool_call_id") or ""))]
        convo.turns.append(Turn(role, parts))


def _responses(body: dict[str, Any], convo: Conversation) -> None:
    """OpenAI Responses: instructions, then input items."""
    convo.system = _text(body.get("instructions"))
    convo.chained = bool(body.get("previous_response_id"))
    items = body.get("input")
    if isinstance(items, str):
        convo.turns.append(Turn("user", [Part("text", items)]))
        return
    for item in items or []:
        if not isinstance(item, dict):
            continue
        kind = item.get("type") or "message"
        if kind == "message" or "role" in item:
            role = str(item.get("role") or "?")
            parts = _content(item.get("content"))
            if role in ("system", "developer") and not convo.turns:
                convo.system = "\n\n".join(filter(None, [convo.system, _plain(parts)]))
                continue
            convo.turns.append(Turn(role, parts))
        elif kind in ("function_call", "custom_tool_call", "local_shell_call"):
            text = item.get("arguments") or item.get("input") or item.get("action")
            convo.turns.append(Turn("assistant", [Part("tool_call", _dump(text),
                                                       str(item.get("name") or kind))]))
        elif kind.endswith("_output"):
            convo.turns.append(Turn("tool", [Part("tool_result", _dump(item.get("output")),
                                                  str(item.get("call_id") or ""))]))
        elif kind == "reasoning":
            summary = [s.get("text", "") for s in item.get("summary") or [] if isinstance(s, dict)]
            convo.turns.append(Turn("assistant", [Part("thinking", "\n".join(summary))]))
        else:
            convo.turns.append(Turn("?", [Part("other", _dump(item), kind)]))


def _gemini(body: dict[str, Any], convo: Conversation) -> None:
    system = body.get("systemInstruction") or body.get("system_instruction") or {}
    convo.system = _plain(_gemini_parts(system.get("parts") if isinstance(system, dict) else None))
    for content in body.get("contents") or []:
        if isinstance(content, dict):
            role = str(content.get("role") or "user")
            convo.turns.append(Turn(role, _gemini_parts(content.get("parts"))))


def _gemini_parts(parts: Any) -> list[Part]:
    out: list[Part] = []
    for part in parts or []:
        if not isinstance(part, dict):
            continue
        if "text" in part:
            out.append(Part("thinking" if part.get("thought") else "text", str(part["text"])))
        elif isinstance(part.get("inlineData"), dict):
            data = part["inlineData"]
            out.append(_image(str(data.get("mimeType")), str(data.get("data") or "")))
        elif isinstance(part.get("functionCall"), dict):
            call = part["functionCall"]
            out.append(Part("tool_call", _dump(call.get("args")), str(call.get("name"))))
        elif isinstance(part.get("functionResponse"), dict):
            result = part["functionResponse"]
            out.append(Part("tool_result", _dump(result.get("response")), str(result.get("name"))))
        else:
            out.append(Part("other", _dump(part)))
    return out


def _content(content: Any) -> list[Part]:
    """Content blocks of Anthropic, Chat Completions and Responses messages."""
    if isinstance(content, str):
        return [Part("text", content)]
    parts: list[Part] = []
    for block in content or []:
        if isinstance(block, dict):
            parts.append(_block(block))
    return parts


def _block(block: dict[str, Any]) -> Part:
    kind = block.get("type")
    if kind in ("text", "input_text", "output_text"):
        return Part("text", str(block.get("text") or ""))
    if kind in ("thinking", "redacted_thinking"):
        return Part("thinking", str(block.get("thinking") or "(redacted)"))
    if kind in ("tool_use", "server_tool_use"):
        return Part("tool_call", _dump(block.get("input")), str(block.get("name") or "?"))
    if kind == "tool_result":
        return Part("tool_result", _text(block.get("content")), str(block.get("tool_use_id") or ""))
    if kind == "image" and isinstance(block.get("source"), dict):
        source = block["source"]
        return _image(str(source.get("media_type")), str(source.get("data") or ""))
    if kind in ("image_url", "input_image"):
        url = block.get("image_url")
        url = url.get("url") if isinstance(url, dict) else url
        if isinstance(url, str) and url.startswith("data:") and ";base64," in url:
            media, _, data = url[5:].partition(";base64,")
            return _image(media, data)
        return Part("image", str(url or ""), "link")
    return Part("other", _dump(block), str(kind or "?"))


def _image(media_type: str, data: str) -> Part:
    if media_type in IMAGE_TYPES and data and BASE64.match(data):
        return Part("image", "", media_type, f"data:{media_type};base64,{data}")
    return Part("image", f"{len(data)} characters of {media_type} (not shown)", media_type)


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return _plain(_content(value))
    return "" if value is None else _dump(value)


def _plain(parts: list[Part]) -> str:
    return "\n\n".join(p.text for p in parts if p.text)


def _dump(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, indent=2, ensure_ascii=False)


MAX_DIFF_ITEMS = 5000  # lines or turns compared by difflib
MAX_SYSTEM_DIFF = 200  # lines


@dataclass
class Diff:
    added: list[int]  # indexes of the turns of the newer call that the older did not have
    removed: list[Turn]  # turns of the older call that fell out of the newer one
    system_changed: bool
    system_diff: list[str] = field(default_factory=list)  # unified diff lines of the system prompt


def diff(older: Conversation, newer: Conversation) -> Diff:
    lines = _system_diff(older.system.splitlines(), newer.system.splitlines())
    if newer.chained:  # it sends only what is new; nothing fell out
        return Diff(list(range(len(newer.turns))), [], older.system != newer.system, lines)
    before, after = [t.key() for t in older.turns], [t.key() for t in newer.turns]
    added: list[int] = []
    removed: list[Turn] = []
    for tag, a0, a1, b0, b1 in _opcodes(before, after):
        if tag in ("replace", "delete"):
            removed += older.turns[a0:a1]
        if tag in ("replace", "insert"):
            added += range(b0, b1)
    return Diff(added, removed, older.system != newer.system, lines)


def _system_diff(before: list[str], after: list[str]) -> list[str]:
    if max(len(before), len(after)) > MAX_DIFF_ITEMS:  # difflib is quadratic at worst
        return []
    return list(difflib.unified_diff(before, after, "previous", "this call", n=1,
                                     lineterm=""))[2:MAX_SYSTEM_DIFF]


def _opcodes(before: list[str], after: list[str]) -> Sequence[tuple[str, int, int, int, int]]:
    """difflib's opcodes; past MAX_DIFF_ITEMS (a client can send any number of turns, and the
    matcher is quadratic at worst) the common prefix is kept and the rest is replaced."""
    if max(len(before), len(after)) <= MAX_DIFF_ITEMS:
        return difflib.SequenceMatcher(a=before, b=after, autojunk=False).get_opcodes()
    same = next((i for i, (a, b) in enumerate(zip(before, after, strict=False)) if a != b),
                min(len(before), len(after)))
    return [("equal", 0, same, 0, same), ("replace", same, len(before), same, len(after))]
