"""What the recorder keeps of an exchange beyond the record: masked headers and bounded bodies.

Everything here runs on the proxy's event loop, so it only copies (bounded) and never parses;
the writer thread does the rest.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from urllib.parse import unquote

from llmtap.dlp import mask_known_secrets
from llmtap.masking import NO_MASK, SecretMask

MASK = "••••"
# Headers whose values are credentials or session state: never written anywhere.
_SECRET_HEADER = re.compile(r"(auth|key|token|secret|cookie|session|password|credential)", re.I)
# SigV4 presigned URLs (AWS) carry the signature, the access key id and a session token.
_SECRET_QUERY = re.compile(r"^(key|api[-_]?key|access[-_]?token|token|secret|sig|signature"
                           r"|x-amz-(signature|credential|security-token))$", re.I)
# Key-shaped strings in bodies and command lines (OpenAI/Anthropic/Google/GitHub/Slack, bearer,
# Bedrock API keys: long-term ABSK..., short-term bedrock-api-key-...).
SECRETISH = re.compile(
    r"\b(sk-[\w*-]{6,}|AIza[\w-]{10,}|gh[pousr]_\w{10,}|xox[abpr]-[\w-]{10,}"
    r"|ABSK[\w+/=]{20,}|bedrock-api-key-[\w%+/=-]{20,}"
    r"|(?:Bearer|Basic)\s+[\w.~+/=-]{6,})",
    re.IGNORECASE,
)


def mask_header(name: str, value: str) -> str:
    if not _SECRET_HEADER.search(name):
        return value
    scheme = value.split(" ", 1)[0] if " " in value.strip() else ""
    return f"{scheme} {MASK}" if scheme else MASK


def masked_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(name, mask_header(name, value)) for name, value in headers]


def mask_secrets(text: str) -> str:
    """Key-shaped strings and whatever a built-in DLP detector recognises, masked."""
    return mask_known_secrets(SECRETISH.sub(lambda m: m.group(0)[:3] + MASK, text))


def mask_path(path: str) -> str:
    """A request path with credential-carrying query parameters (Gemini's `?key=`) masked."""
    if "?" not in path:
        return path
    base, query = path.split("?", 1)
    pairs = query.split("&")
    masked = [f"{p.split('=', 1)[0]}={MASK}" if _SECRET_QUERY.match(unquote(p.split("=", 1)[0]))
              else p for p in pairs]
    return f"{base}?{'&'.join(masked)}"


@dataclass
class BodyCapture:
    """Up to `limit` bytes of a body, as they pass."""

    limit: int
    data: bytearray = field(default_factory=bytearray)
    size: int = 0

    def add(self, chunk: bytes) -> None:
        self.size += len(chunk)
        room = self.limit - len(self.data)
        if room > 0:
            self.data += chunk[:room]

    @property
    def truncated(self) -> bool:
        return self.size > len(self.data)


StreamFn = Callable[[bytes], "Iterable[bytes] | bytes"]


def tee_stream(inner: StreamFn | bool, capture: BodyCapture) -> StreamFn:
    """Wraps a response's `stream` (True or another addon's callable) to copy what arrives.

    The bytes the client gets are exactly what the inner callable returns; this only copies.
    """

    def tee(data: bytes) -> Iterable[bytes] | bytes:
        if data:
            capture.add(data)
        return inner(data) if callable(inner) else data

    return tee


@dataclass
class Body:
    data: bytes | None  # None: not captured (streamed request, or no body)
    size: int
    encoding: str | None = None  # content-encoding, still applied to data
    content_type: str = ""

    @property
    def truncated(self) -> bool:
        return self.data is not None and self.size > len(self.data)


@dataclass
class Exchange:
    """Everything the Markdown twin needs besides the record."""

    request_headers: list[tuple[str, str]]
    response_headers: list[tuple[str, str]]
    request_body: Body
    response_body: Body
    response_text: str | None = None  # the parser's assembled text of a stream, if it gives one
    system_prompt: str | None = None  # the request's system prompt, as the protocols stage read it
    mask: SecretMask = NO_MASK  # the held secrets, masked in whatever is made of this exchange


def bounded(raw: bytes | None, limit: int, encoding: str | None, content_type: str) -> Body:
    if raw is None:
        return Body(None, 0, encoding, content_type)
    return Body(raw[:limit], len(raw), encoding, content_type)
