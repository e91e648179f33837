"""The uniform incremental response parser every protocol module builds on.

`feed(chunk, now)` takes the raw wire bytes (still content-encoded) as they pass through; it never
raises: any failure is captured into `error` and parsing stops, while the caller keeps relaying.
`feed(b"", now)` or `finish(now)` marks the end of the body (mitmproxy calls a stream callable
with b"" at the end). `result()` gives the record fields at any time.

Token usage is normalised so that the six counters never overlap and each is billed at one rate:
- `input_tokens`: prompt tokens billed at the base input rate, i.e. EXCLUDING cache reads and
  cache writes (Anthropic's own convention; OpenAI's prompt_tokens and Gemini's promptTokenCount
  include the cached tokens, so those are subtracted).
- `cache_read_tokens`, `cache_write_5m_tokens`, `cache_write_1h_tokens`: the cached parts.
  The whole prompt is input + cache_read + cache_write_5m + cache_write_1h.
- `output_tokens`: every billed output token, INCLUDING reasoning/thinking tokens (OpenAI's
  completion_tokens already does; Gemini's thoughtsTokenCount is added to candidatesTokenCount).
- `reasoning_tokens`: the part of output_tokens spent reasoning, for information only (it is not
  billed again); None when the provider does not report it (Anthropic).
A counter is None when no usage was seen at all (e.g. a stream cut before its usage arrived).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from llmtap import jsontext
from llmtap.parsers.encoding import BodyDecoder, DecodeError
from llmtap.parsers.framers import ArrayFramer, Framer, SSEFramer, make_framer
from llmtap.parsers.sse import Event, FramingError

MiB = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    max_decoded_bytes: int = 256 * MiB  # what compressed bodies may inflate to (bomb cap)
    max_json_body_bytes: int = 32 * MiB  # a non-streamed body held to parse; larger: best effort
    max_event_bytes: int = 16 * MiB  # one SSE event, JSON-stream element or JSONL line
    max_timeline: int = 10_000  # timeline points kept; chunks are still counted past it


DEFAULT_LIMITS = Limits()


@dataclass
class Usage:
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_read_tokens: int | None = None
    cache_write_5m_tokens: int | None = None
    cache_write_1h_tokens: int | None = None
    reasoning_tokens: int | None = None

    def as_dict(self) -> dict[str, int | None]:
        return asdict(self)

    @property
    def known(self) -> bool:
        return self.input_tokens is not None or self.output_tokens is not None

    def __add__(self, other: Usage) -> Usage:
        def plus(a: int | None, b: int | None) -> int | None:
            return None if a is None and b is None else (a or 0) + (b or 0)

        return Usage(*(plus(getattr(self, f.name), getattr(other, f.name)) for f in fields(self)))


def as_int(value: Any) -> int:
    """A token count from JSON; absent, null or garbage counts as 0."""
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def as_dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


_SECRETISH = re.compile(r"\b(sk-[\w*-]{6,}|AIza[\w-]{10,}|ABSK[\w+/=]{20,}|bedrock-api-key-\S{20,}"
                        r"|(?:Bearer|Basic)\s+\S+)", re.IGNORECASE)


def scrub(text: str, limit: int = 500) -> str:
    """Provider error text, shortened and with anything key-shaped masked."""
    text = _SECRETISH.sub("[redacted]", text)
    return text if len(text) <= limit else text[:limit] + "…"


def ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


class Timeline:
    """Wire chunks: count, [offset ms, bytes] points, first byte and first content times."""

    def __init__(self, started: float, max_points: int) -> None:
        self.started = started
        self.max_points = max_points
        self.chunks = 0
        self.bytes = 0
        self.points: list[list[float | int]] = []
        self.first_byte: float | None = None
        self.last_byte: float | None = None
        self.first_content: float | None = None

    def chunk(self, size: int, now: float) -> None:
        self.chunks += 1
        self.bytes += size
        offset = ms(now - self.started)
        if self.first_byte is None:
            self.first_byte = offset
        self.last_byte = offset
        if len(self.points) < self.max_points:
            self.points.append([offset, size])

    def content(self, now: float) -> None:
        if self.first_content is None:
            self.first_content = ms(now - self.started)


_KEEP_HEADERS = re.compile(r"^(retry-after(-ms)?|.*ratelimit.*|x-should-retry)$")
_REQUEST_ID_HEADERS = ("request-id", "x-request-id", "anthropic-request-id")


def header_fields(headers: Mapping[str, str]) -> dict[str, Any]:
    """Rate-limit and request-id response headers only: nothing else can leak a secret."""
    raw = getattr(headers, "fields", None)  # mitmproxy's Headers: its pairs, not a lookup per key
    if raw is not None:
        lowered = {k.decode("latin-1").lower(): v.decode("utf-8", "surrogateescape")
                   for k, v in raw}
    else:
        lowered = {str(k).lower(): str(v) for k, v in headers.items()}
    found: dict[str, Any] = {}
    limits = {k: v for k, v in lowered.items() if _KEEP_HEADERS.match(k)}
    if limits:
        found["rate_limit"] = limits
    for name in _REQUEST_ID_HEADERS:
        if name in lowered:
            found["request_id"] = lowered[name]
            break
    return found


class ParseStop(Exception):
    """Raised by a protocol hook to stop parsing with a message (becomes `error`)."""


class ResponseParser:
    """Base class: decoding, framing, timing and error capture. Protocols override the hooks."""

    provider = "unknown"

    def __init__(
        self,
        api: str,
        *,
        started: float,
        model: str | None = None,
        stream: bool = False,
        status: int = 200,
        headers: Mapping[str, str] | None = None,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        self.api = api
        self.model = model  # the request's; the reply's own model name replaces it
        self.requested_stream = stream  # the request asked for a stream (an error may be JSON)
        self.status = status
        self.limits = limits
        self.usage = Usage()
        self.stop_reason: str | None = None
        self.error: str | None = None
        self.events = 0
        self.extra: dict[str, Any] = header_fields(headers if headers is not None else {})
        self.timeline = Timeline(started, limits.max_timeline)
        self.finished = False
        self.notes: list[str] = []  # worth knowing, but not a failed exchange
        self._failed = False
        self._now = started
        self._ws = False  # fed WebSocket messages
        self._framer: Framer | None = None
        lowered = {str(k).lower(): str(v) for k, v in (headers or {}).items()}
        self.content_type = lowered.get("content-type", "").split(";")[0].strip().lower()
        self._setup(lowered.get("content-encoding"))

    def _setup(self, content_encoding: str | None) -> None:
        try:
            self._decoder = BodyDecoder(content_encoding, self.limits.max_decoded_bytes)
            self._framer = self.new_framer()
        except Exception as exc:
            self._decoder = BodyDecoder(None, self.limits.max_decoded_bytes)
            self.fail(str(exc))

    # -- what the caller uses ---------------------------------------------------------------

    def feed(self, chunk: bytes, now: float) -> None:
        """Raw wire bytes as they arrive; b"" marks the end of the body."""
        if self.finished:
            return
        if not chunk:
            self.finish(now)
            return
        self._now = now
        self.timeline.chunk(len(chunk), now)
        if self._failed or self._framer is None:
            return
        try:
            for piece in self._decoder.decode(chunk):
                self._framer.feed(piece)
        except Exception as exc:
            self.fail(describe(exc))

    def feed_message(self, message: bytes | str, now: float) -> None:
        """One whole WebSocket text message carrying one JSON event."""
        self._now = now
        self._ws = True
        raw = message.encode() if isinstance(message, str) else message
        self.timeline.chunk(len(raw), now)
        if self._failed or self.finished:
            return
        try:
            self.events += 1
            self.on_object(_json_message(raw))
        except Exception as exc:
            self.fail(describe(exc))

    def finish(self, now: float) -> None:
        if self.finished:
            return
        self.finished = True
        self._now = now
        if not self._failed and self._framer is not None:
            try:
                trailer = self._finish_decoding()
                self._framer.end()
                self._check_complete()
            except Exception as exc:
                self.fail(describe(exc))
            else:
                if trailer is not None:  # every event came: only the encoding's end is missing
                    self.notes.append(f"{trailer} after the stream's last event (the client hung "
                                      "up once it had it)")
        if self.error is None and self.status >= 400:
            self.error = f"http {self.status}"

    def _finish_decoding(self) -> str | None:
        """Feeds what the decoder still holds. A compressed stream cut before its trailer is
        returned as a reason, not raised: whether that matters depends on the events (a client
        that hangs up after the last event, as litellm and aider do, cuts only the trailer)."""
        assert self._framer is not None
        try:
            pieces = self._decoder.finish()
        except DecodeError as exc:
            if not self.streamed or "truncated" not in str(exc):
                raise
            return str(exc)
        for piece in pieces:
            self._framer.feed(piece)
        return None

    def result(self) -> dict[str, Any]:
        streamed = self.streamed
        ttft = self.timeline.first_content
        if not streamed:  # a whole body: its first byte is its first token
            ttft = self.timeline.first_byte if self.status < 400 else None
        return {
            "provider": self.provider,
            "api": self.api,
            "model": self.model,
            "stream": streamed or self.requested_stream,
            "usage": self.usage.as_dict(),
            "stop_reason": self.stop_reason,
            "chunks": self.timeline.chunks,
            "timeline": [list(point) for point in self.timeline.points],
            "ttft_ms": ttft,
            "first_byte_ms": self.timeline.first_byte,
            "last_byte_ms": self.timeline.last_byte,
            "events": self.events,
            "error": self.error,
            **self.extra,
        }

    # -- for the protocol subclasses --------------------------------------------------------

    @property
    def failed(self) -> bool:
        return self._failed

    @property
    def streamed(self) -> bool:
        """Whether the reply arrived as a stream (SSE, JSON array, WebSocket messages)."""
        return isinstance(self._framer, (SSEFramer, ArrayFramer)) or self._ws

    def framing(self) -> str:
        """Which framer reads the body: "sse", "array", "lines" or "body"."""
        return "sse" if self.content_type == "text/event-stream" else "body"

    def new_framer(self) -> Framer:
        """The framer for this reply; a protocol with a binary framing of its own overrides it."""
        return make_framer(self.framing(), self)

    def on_event(self, event: Event) -> None:
        """An SSE event; by default its data is one JSON object (or OpenAI's [DONE])."""
        if event.data.strip() == "[DONE]":
            self.on_done()
            return
        try:
            obj = jsontext.parse(event.data)
        except ValueError as exc:
            raise ParseStop(f"invalid JSON in SSE event {event.event!r}: {exc}") from None
        self.on_object(obj)

    def on_object(self, obj: Any) -> None:
        """One JSON value: a whole body, a stream element or an SSE event's data."""

    def on_done(self) -> None:
        """OpenAI's `data: [DONE]`."""

    def incomplete(self) -> str | None:
        """Why a stream that ended is incomplete (its end marker never came), or None."""
        return None

    def content(self) -> None:
        """Called when the first content (text, thinking, tool input...) is seen."""
        self.timeline.content(self._now)

    def provider_error(self, kind: Any, message: Any) -> None:
        if self.error is None:
            text = ": ".join(str(p) for p in (kind, message) if p not in (None, ""))
            self.error = scrub(text or "error")

    def fail(self, message: str) -> None:
        """The parser's own failure: recorded once, and parsing stops."""
        self._failed = True
        if self.error is None:
            self.error = "llmtap: " + scrub(message)

    def set_model(self, model: Any) -> None:
        if isinstance(model, str) and model:
            self.model = model

    def note_tool(self, name: Any) -> None:
        if isinstance(name, str) and name:
            self.extra.setdefault("tool_calls", []).append(name)

    def _check_complete(self) -> None:
        if self.error is not None or self.status >= 400:
            return  # an error reply has no end marker to wait for
        framing = self._framer.incomplete() if self._framer else None
        final = self.incomplete() if self.streamed else None
        if framing and not final and self._framer and self._framer.only_end_missing():
            # Every event came, its final one too: a client that hangs up once it has the last
            # element never waits for the array's `]`.
            self.notes.append(f"{framing}, after the stream's last element (the client hung up "
                              "once it had it)")
            framing = None
        if framing or final:
            raise ParseStop(framing or final)

    def on_body_fallback(self, raw: bytes, exc: Exception) -> None:
        """A whole body that is not JSON: an error page, or garbage."""
        if self.status >= 400:
            text = raw[:300].decode("utf-8", errors="replace").strip()
            self.provider_error(f"http {self.status}", text)
        else:
            raise ParseStop(f"invalid JSON body: {exc}")


def _json_message(raw: bytes) -> Any:
    try:
        return jsontext.parse(raw)
    except ValueError as exc:
        raise ParseStop(f"invalid JSON in WebSocket message: {exc}") from None


def describe(exc: Exception) -> str:
    if isinstance(exc, ParseStop | DecodeError | FramingError):
        return str(exc)  # our own messages say what went wrong
    return f"{type(exc).__name__}: {exc}"


class UnknownParser(ResponseParser):
    """An API llmtap does not know: only timing and byte counts are recorded."""

    def _setup(self, content_encoding: str | None) -> None:
        self._decoder = BodyDecoder(None, self.limits.max_decoded_bytes)
        self._framer = None

    @property
    def streamed(self) -> bool:
        return self.content_type == "text/event-stream" or self._ws
