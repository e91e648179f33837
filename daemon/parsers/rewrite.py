"""Exact usage for every streamed Chat Completions call.

OpenAI sends usage in a stream only when the request sets `stream_options.include_usage`. For a
streamed request without it, `usage_rewrite` adds the option, and `UsageChunkStripper` removes the
one extra event it causes (the chunk with `choices: []` and a `usage`) from what the client
receives; every other byte reaches the client unchanged. The same holds on the compatible APIs
of other hosts: one that puts the usage on a chunk that still has choices (Gemini's, DeepSeek's)
loses nothing, since only a chunk with `choices: []` and a usage is ever removed.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from llmtap.parsers import azure
from llmtap.parsers.request import RequestInfo
from llmtap.parsers.sse import DEFAULT_MAX_EVENT_BYTES, next_line

_OPTION = b'"stream_options":{"include_usage":true}'
# Providers whose streams always end with the usage, asked for or not (OpenRouter and Mistral in
# `usage`, Groq in `x_groq.usage`): their requests are left as sent. Mistral must be: it answers
# 422 (extra_forbidden) to a request with stream_options.
USAGE_ALWAYS_STREAMED = frozenset({"openrouter", "groq", "mistral"})
_EMPTY_CHOICES = re.compile(rb'"choices"\s*:\s*\[\s*\]')  # cheap test before decoding any JSON


@dataclass(frozen=True)
class UsageRewrite:
    """The body to send upstream, and whether the response needs the usage chunk stripped.

    `headers` are request headers to set along with the new body: the stripper works on
    identity-encoded bytes, so the upstream is asked not to compress the stream.
    """

    body: bytes
    strip_usage_chunk: bool = False
    headers: dict[str, str] = field(default_factory=dict)


def usage_rewrite(info: RequestInfo, body: bytes, content_encoding: str | None = None) -> UsageRewrite:
    """For a streamed Chat Completions request lacking include_usage: the body with it added."""
    if info.api != "chat.completions" or not info.stream or info.error:
        return UsageRewrite(body)
    if info.provider in USAGE_ALWAYS_STREAMED:
        return UsageRewrite(body)
    if info.provider == "azure" and not azure.stream_options_supported(info.extra.get("api_version")):
        return UsageRewrite(body)  # an older api-version refuses stream_options with a 400
    if content_encoding and content_encoding.strip().lower() != "identity":
        return UsageRewrite(body)  # re-encoding a compressed request body is not worth it
    try:
        obj = json.loads(body)
    except ValueError:
        return UsageRewrite(body)
    if not isinstance(obj, dict) or obj.get("stream") is not True:
        return UsageRewrite(body)
    options = obj.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        return UsageRewrite(body)
    new_body = _insert_option(body) if options is None else _replace_option(obj)
    return UsageRewrite(new_body, True, {"accept-encoding": "identity"})


def _insert_option(body: bytes) -> bytes:
    """Adds the member before the closing brace, so every other byte stays as the client sent it."""
    end = body.rstrip().rfind(b"}")
    head = body[:end].rstrip()
    separator = b"" if head.endswith(b"{") else b","
    return head + separator + _OPTION + body[end:]


def _replace_option(obj: dict[str, Any]) -> bytes:
    options = obj["stream_options"] if isinstance(obj["stream_options"], dict) else {}
    obj["stream_options"] = {**options, "include_usage": True}
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode()


def is_usage_chunk(data: bytes) -> bool:
    """`data: {...}` of the usage-only chunk: empty choices and a usage object."""
    if not _EMPTY_CHOICES.search(data):
        return False
    try:
        obj = json.loads(data)
    except ValueError:
        return False
    return isinstance(obj, dict) and obj.get("choices") == [] and isinstance(obj.get("usage"), dict)


class UsageChunkStripper:
    """`feed(bytes) -> bytes` for the client: the SSE bytes minus the usage-only event.

    Complete events pass through at once, byte for byte; only the current, unfinished event is
    held until its blank line arrives (a client cannot act on half an event anyway). `feed(b"")`
    (mitmproxy's end-of-stream call) releases whatever is held. After the usage chunk has been
    removed, or once an event grows past `max_event_bytes` (no usage chunk is that big), bytes
    pass straight through.
    """

    def __init__(self, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        self.max_event_bytes = max_event_bytes
        self.stripped = False
        self.gave_up = False
        self._held = bytearray()
        self._scan = 0  # where the next line starts in _held
        self._data = bytearray()  # the current event's data lines
        self._skip_lf: bool | None = None  # CR ended an event at a chunk's end: drop its LF?
        self._lf_in_held = False  # CR ended a line inside an event at a chunk's end
        self._searched = 0  # held bytes before this hold no line end
        self._chunk_held = False  # the chunk being fed is already in _held

    def feed(self, chunk: bytes) -> bytes:
        if not chunk:
            return self._flush()
        out = bytearray()
        self._chunk_held = False
        if self._skip_lf is not None:
            chunk = self._after_cr(chunk, out)
        if self.stripped or self.gave_up:
            return bytes(out) + self._flush() + chunk
        self._held += chunk
        self._chunk_held = True
        self._events(out)
        if len(self._held) > self.max_event_bytes:
            self.gave_up = True
            out += self._flush()
        return bytes(out)

    def _after_cr(self, chunk: bytes, out: bytearray) -> bytes:
        """The LF of a CRLF split across chunks belongs with the event that ended at the CR."""
        drop, self._skip_lf = self._skip_lf, None
        if chunk[:1] == b"\n":
            if not drop:
                out += b"\n"
            return chunk[1:]
        return chunk

    def _events(self, out: bytearray) -> None:
        while self._skip_held_lf() and (found := self._next_line()) is not None:
            end, next_start, dangling_cr = found
            line = bytes(self._held[self._scan : end])
            self._scan = next_start
            if line.startswith(b"data:"):
                value = line[5:]
                self._data += (value[1:] if value.startswith(b" ") else value) + b"\n"
            if line:
                self._lf_in_held = dangling_cr
                continue
            self._event_end(out, dangling_cr)
            if self.stripped:
                out += self._flush()
                return

    def _next_line(self) -> tuple[int, int, bool] | None:
        """The next complete held line; a long line in many chunks is scanned once."""
        found = next_line(self._held, max(self._scan, self._searched))
        self._searched = 0 if found else len(self._held)
        return found

    def _skip_held_lf(self) -> bool:
        """Steps over the LF of a CRLF split across chunks; False until that byte has arrived."""
        if not self._lf_in_held:
            return True
        if self._scan >= len(self._held):
            return False
        self._lf_in_held = False
        if self._held[self._scan : self._scan + 1] == b"\n":
            self._scan += 1
        return True

    def _event_end(self, out: bytearray, dangling_cr: bool) -> None:
        event = bytes(self._held[: self._scan])
        drop = bool(self._data) and is_usage_chunk(bytes(self._data))
        if drop:
            self.stripped = True
        else:
            out += event
        if dangling_cr:
            self._skip_lf = drop
        del self._held[: self._scan]
        self._scan = self._searched = 0
        self._data.clear()

    def release(self, chunk: bytes) -> bytes:
        """After `feed(chunk)` raised: everything held, and the chunk unless it is held too."""
        self.gave_up = True
        held = self._flush()
        return held if self._chunk_held else held + chunk

    def _flush(self) -> bytes:
        held = bytes(self._held)
        self._held.clear()
        self._scan = self._searched = 0
        self._data.clear()
        return held
