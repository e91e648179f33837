"""One bounded, decoded view of each held body of an exchange, made once and shared by the stages.

mitmproxy's `get_content()` inflates a body without any limit: a 1 MiB gzip request body (held
whole, being under `stream_large_bodies`) can become 1 GiB in the worker. So every stage that
reads a held body reads it here instead: decoded once per direction (llmtap.parsers.encoding,
under MAX_DECODED) and kept in the flow's metadata for as long as the raw bytes are the very ones
it was decoded from. Writing a changed body back (`message.content = ...`) re-encodes it as usual;
the next reader decodes the new bytes.

The policy:
- A held request body that decodes to more than MAX_DECODED, 32 MiB (no LLM API takes more in
  one request: Anthropic's Messages API stops at 32 MB), that holds more than
  MAX_JSON_CONTAINERS objects and arrays, or that cannot be decoded at all
  (unsupported or corrupt content-encoding, truncated), is refused with a provider-shaped 413,
  code `llmtap_body_too_large`: nothing is sent upstream, and the record's `error` says why.
- The held response of a key-bearing flow is checked for echoed keys in its decoded form; one
  that cannot be decoded within MAX_DECODED cannot be checked, and is replaced by a
  provider-shaped 502 (llmtap.addons.echoes; a compressed stream is cut past its own cap there).
- Every other response is relayed as it came: the parsers decode on the side, under their own caps.
Memory: at most MAX_DECODED (plus one decoder piece) of decoded data per body. Bodies streamed
past `stream_large_bodies` are never held, so never decoded here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from llmtap.addons.replies import refusal
from llmtap.flow import BODIES, fields
from llmtap.parsers.classify import classify
from llmtap.parsers.encoding import DecodeError, TooLarge, decode_all
from llmtap.rules import Body
from mitmproxy import http

log = logging.getLogger(__name__)

MAX_DECODED = 32 * 1024 * 1024
# Parsed, every JSON object or array costs the worker far more than its two bytes: 31 MiB of
# `[{},{},...]` grew it by 770 MB. Counted before any stage parses (braces inside strings count
# too, so this is generous: a large agent request has tens of thousands).
MAX_JSON_CONTAINERS = 500_000
TOO_LARGE_CODE = "llmtap_body_too_large"
LIMIT = f"{MAX_DECODED >> 20} MiB decoded, as identity, gzip, deflate, br or zstd"


@dataclass(frozen=True)
class Decoded:
    """A held body as its sender meant it (content-encoding undone), or why it cannot be read."""

    data: bytes = b""
    error: str | None = None  # set: data is empty, and the body must not be passed on unread


class Views:
    """A flow's decoded bodies, each with the raw bytes it was decoded from; and the filters
    stage's parse of the request, handed to the DLP stage so a body is parsed once."""

    def __init__(self) -> None:
        self.decoded: dict[str, tuple[bytes | None, Decoded]] = {}  # "request" | "response"
        self.parsed: Body | None = None

    def __deepcopy__(self, memo: dict[int, Any]) -> Views:
        return Views()  # a cache, not state: a copied flow decodes its own bodies


def decode(message: http.Message, parsed_later: bool = False) -> Decoded:
    """`parsed_later`: the stages will parse it as JSON (a request), so its objects are counted."""
    raw = message.raw_content
    if not raw:
        return Decoded()
    encoding = (message.headers.get("content-encoding") or "identity")[:40]
    try:
        data = decode_all(raw, encoding, MAX_DECODED)
    except TooLarge:
        return Decoded(error=f"its {encoding} body decodes to more than {MAX_DECODED >> 20} MiB")
    except DecodeError as exc:
        return Decoded(error=f"its body cannot be decoded ({str(exc)[:160]})")
    if parsed_later and data.count(b"{") + data.count(b"[") > MAX_JSON_CONTAINERS:
        return Decoded(error=f"its body has more than {MAX_JSON_CONTAINERS} JSON objects and arrays")
    return Decoded(data)


def views(flow: http.HTTPFlow) -> Views:
    found = flow.metadata.get(BODIES)
    if not isinstance(found, Views):
        found = flow.metadata[BODIES] = Views()
    return found


def _decoded(flow: http.HTTPFlow, direction: str, message: http.Message) -> Decoded:
    cache = views(flow).decoded
    kept = cache.get(direction)
    raw = message.raw_content
    if kept is not None and kept[0] is raw:
        return kept[1]
    decoded = decode(message, parsed_later=direction == "request")
    cache[direction] = (raw, decoded)
    return decoded


def decoded_request(flow: http.HTTPFlow) -> Decoded:
    """The request body, decoded once (b"" when none is held)."""
    return _decoded(flow, "request", flow.request)


def decoded_response(flow: http.HTTPFlow) -> Decoded:
    """The response body, decoded once (b"" when none is held)."""
    assert flow.response is not None
    return _decoded(flow, "response", flow.response)


def forget_request(flow: http.HTTPFlow) -> None:
    """The request stages are done with its body: its decoded copy need not wait for the reply."""
    found = flow.metadata.get(BODIES)
    if isinstance(found, Views):
        found.decoded.pop("request", None)
        found.parsed = None


def load_body(flow: http.HTTPFlow) -> Body | str | None:
    """The request body (its bounded decoded view), parsed; why not; or None when there is none."""
    request = flow.request
    if not request.raw_content:
        return None
    decoded = decoded_request(flow)
    if decoded.error is not None:
        return decoded.error
    if not decoded.data:
        return None
    return Body.parse(decoded.data, request.headers.get("content-type", ""), raw=request.raw_content)


def hand_over(flow: http.HTTPFlow, body: Body) -> None:
    """Keeps the parsed request body for the next stage; valid while `body.raw` is the request's
    raw content (the bytes it was parsed from or written to)."""
    views(flow).parsed = body


def take_over(flow: http.HTTPFlow) -> Body | None:
    """The parsed request body an earlier stage handed over, if it still matches the request."""
    found = flow.metadata.get(BODIES)
    if not isinstance(found, Views) or found.parsed is None:
        return None
    body, found.parsed = found.parsed, None
    raw = flow.request.raw_content
    return body if raw is not None and body.raw is raw else None


def refuse_unreadable(flow: http.HTTPFlow, stage: str) -> bool:
    """Answers a held request body that cannot be read within the cap with a 413, so that it is
    never sent on unread; True when it did. `stage` names the stage that refused."""
    request = flow.request
    if flow.response is not None or request.stream or request.raw_content is None:
        return False
    decoded = decoded_request(flow)
    if decoded.error is None:
        return False
    message = f"llmtap refused this request: {decoded.error}; the limit is {LIMIT}"
    provider, _ = classify(request.pretty_host, request.method, request.path)
    flow.response = refusal(provider, 413, message, TOO_LARGE_CODE, stage)
    fields(flow)["error"] = message
    log.warning("%s: %s %s", message.removeprefix("llmtap "), request.method, request.pretty_host)
    return True
