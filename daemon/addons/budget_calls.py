"""What the budgets stage reads of a call before it decides: a WebSocket's response.create, whether
mitmproxy may send a body on before the request hook, which rules cover it, and a refusal."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from llmtap import jsontext
from llmtap.budgets import Selectors
from llmtap.parsers.base import as_dict
from mitmproxy import http


@dataclass(frozen=True)
class Refused:
    message: str
    code: str  # llmtap_budget_exceeded | llmtap_rate_limited
    headers: dict[str, str]
    decision: dict[str, Any]  # for the record's `policy`


@dataclass(frozen=True)
class Asked:
    """A response.create on a WebSocket, as the estimate reads a request."""

    provider: str
    model: str | None
    max_tokens: int | None


def ws_request(content: bytes) -> Asked | None:
    try:
        obj = as_dict(jsontext.parse(content))
    except ValueError:
        return None
    if obj.get("type") != "response.create":
        return None
    body = as_dict(obj.get("response")) or obj
    model, most = body.get("model"), body.get("max_output_tokens")
    return Asked("openai", model if isinstance(model, str) else None,
                 most if isinstance(most, int) and not isinstance(most, bool) else None)


def may_stream(request: http.Request) -> bool:
    """Whether mitmproxy may send this request's body on before the `request` hook: it already
    chose to (a stated length past stream_large_bodies), or the length is not stated (chunked,
    or HTTP/2 without content-length), so it streams once the body grows past that."""
    if request.stream:
        return True
    if "content-length" in request.headers or request.method in ("GET", "HEAD", "OPTIONS"):
        return False
    return "transfer-encoding" in request.headers or request.is_http2 or request.is_http3


def covers(where: Selectors, call: dict[str, Any], any_model: bool) -> bool:
    """Whether a rule covers the call; with `any_model` (not yet known) whatever its model."""
    return (dataclasses.replace(where, model=None) if any_model else where).matches(call)
