"""Request side: what an intercepted request asks for, read without ever raising.

The record keeps the model, stream flag, temperature, max tokens (whatever the API calls it:
max_tokens, max_completion_tokens, max_output_tokens, maxOutputTokens), the SHA-256 of the system
prompt (never the prompt itself) and the tool names. Headers are never read here: nothing from a
request's credentials can reach a record.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from llmtap import jsontext
from llmtap.parsers import anthropic, azure, bedrock, gemini, openai_chat, openai_responses
from llmtap.parsers.base import as_dict
from llmtap.parsers.classify import classify, wire_shape
from llmtap.parsers.encoding import decode_all

MAX_REQUEST_BYTES = 64 * 1024 * 1024  # raw or decoded; a larger body is relayed but not read


@dataclass
class RequestInfo:
    """What a request asks for. `system_sha256` is the SHA-256 (hex) of the system prompt's
    UTF-8 text: Anthropic's `system` (text blocks joined by a blank line), OpenAI's system and
    developer messages (joined by a blank line), Responses' `instructions`, Gemini's
    `systemInstruction` parts (joined by a blank line); None when there is none."""

    provider: str
    api: str
    model: str | None = None
    stream: bool = False
    temperature: float | None = None
    max_tokens: int | None = None
    system_sha256: str | None = None
    system_text: str | None = field(default=None, repr=False)  # archived once by the recorder
    tools: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # reasoning effort, batch size, ...
    error: str | None = None

    def record(self) -> dict[str, Any]:
        """The record's `request` object."""
        fields = {
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "system_sha256": self.system_sha256,
            "tools": list(self.tools),
        }
        return {**fields, **{k: v for k, v in self.extra.items() if v is not None}}


def sha256_text(text: str | None) -> str | None:
    return hashlib.sha256(text.encode("utf-8")).hexdigest() if text else None


def _fields(api: str, body: dict[str, Any], path: str) -> dict[str, Any]:
    """The request's fields, read by its wire shape (a compatible API on any host)."""
    shape = wire_shape(api)
    if api == "messages.batches":
        return anthropic.batch_request_fields(body)
    if shape == "anthropic":
        return anthropic.request_fields(body)
    if api in ("responses", "responses.input_tokens"):
        return openai_responses.request_fields(body)
    if shape == "openai":
        return openai_chat.request_fields(body)
    if shape == "google":
        return gemini.request_fields(body, path)
    if shape == "bedrock":
        return bedrock.request_fields(body, path)
    return {}


SESSION_IN_USER_ID = re.compile(r"session_([0-9A-Za-z-]{8,64})")


def client_session(body: dict[str, Any]) -> tuple[str, str] | None:
    """(client, id) of the conversation a request body says it belongs to: Responses'
    `conversation`, Claude Code's session in `metadata.user_id` (a JSON string in newer versions),
    Codex's `prompt_cache_key` (its conversation id); None when it says nothing."""
    convo = body.get("conversation")
    convo = convo.get("id") if isinstance(convo, dict) else convo
    if isinstance(convo, str) and convo:
        return "openai", convo[:128]
    user_id = as_dict(body.get("metadata")).get("user_id")
    if isinstance(user_id, str):
        try:
            decoded = json.loads(user_id) if user_id.startswith("{") else None
        except ValueError:
            decoded = None
        if isinstance(decoded, dict) and decoded.get("session_id"):
            return "claude-code", str(decoded["session_id"])[:80]
        if match := SESSION_IN_USER_ID.search(user_id):
            return "claude-code", match.group(1)
    if isinstance(body.get("prompt_cache_key"), str) and body["prompt_cache_key"]:
        return "codex", body["prompt_cache_key"][:80]
    return None


def _number(value: Any) -> Any:
    return value if isinstance(value, int | float) and not isinstance(value, bool) else None


def parse_request(
    host: str,
    method: str,
    path: str,
    body: bytes,
    content_encoding: str | None = None,
) -> RequestInfo:
    """Classifies and reads a request; problems end up in `.error`, never as an exception."""
    provider, api = classify(host, method, path)
    info = RequestInfo(provider, api)
    if wire_shape(api) in ("google", "anthropic"):  # Gemini and Vertex AI name it in the path
        model = gemini.model_from_path(path)
        info.model = unquote(model) if model else None
        info.stream = api == "streamGenerateContent"
    if wire_shape(api) == "bedrock":  # the model and the stream flag are in the path, not the body
        info.model = bedrock.model_from_path(path)
        info.stream = api in bedrock.STREAMS
    if provider == "azure":
        info.extra = azure.request_extra(path)
    if api == "unknown" or not body:
        return info
    if len(body) > MAX_REQUEST_BYTES:
        info.error = f"llmtap: request body over {MAX_REQUEST_BYTES} bytes, not read"
        return info
    try:
        obj = as_dict(jsontext.parse(decode_all(body, content_encoding, MAX_REQUEST_BYTES)))
        fields = _fields(api, obj, path)
        if session := client_session(obj):  # gen_ai.conversation.id in the OTLP export
            fields["conversation_id"] = session[1]
        _fill(info, fields)
    except Exception as exc:
        info.error = f"llmtap: request not understood: {type(exc).__name__}: {exc}"[:300]
    return info


def _fill(info: RequestInfo, fields: dict[str, Any]) -> None:
    model = fields.pop("model", None)
    if info.extra.get("deployment"):  # Azure: the body's model is the deployment (the SDK's copy)
        model = None  # the reply names the model
    info.model = str(model) if isinstance(model, str) and model else info.model
    info.stream = bool(fields.pop("stream", info.stream))
    info.temperature = _number(fields.pop("temperature", None))
    info.max_tokens = _number(fields.pop("max_tokens", None))
    system = fields.pop("system", None)
    info.system_text = system if isinstance(system, str) and system else None
    info.system_sha256 = sha256_text(info.system_text)
    info.tools = [str(name) for name in fields.pop("tools", []) or []]
    info.extra = {**info.extra, **{k: v for k, v in fields.items() if v is not None}}


def info_from_fields(provider: str, api: str, fields: dict[str, Any]) -> RequestInfo:
    """A RequestInfo from a protocol's request_fields() (e.g. a WebSocket `response.create`)."""
    info = RequestInfo(provider, api)
    _fill(info, dict(fields))
    return info


_MODEL = re.compile(rb'"model"\s*:\s*"([^"\\]{1,200})"')
_STREAM = re.compile(rb'"stream"\s*:\s*true')


def salvage_request(host: str, method: str, path: str, head: bytes, tail: bytes) -> RequestInfo:
    """A body too large to hold (streamed upstream): model and stream flag from its ends."""
    info = parse_request(host, method, path, b"")
    if info.api == "unknown":
        return info
    for part in (head, tail):
        if info.model is None and (found := _MODEL.search(part)):
            info.model = found.group(1).decode("utf-8", "replace")
        info.stream = info.stream or bool(_STREAM.search(part))
    info.error = "llmtap: request body too large to hold: read best-effort"
    return info
