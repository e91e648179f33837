"""Responses llmtap makes itself instead of relaying a request: in the shape each provider's own
SDKs parse, so the tool shows the person llmtap's reason instead of retrying blindly."""

from __future__ import annotations

import json
from typing import Any

from llmtap.flow import BLOCKED_HEADER
from mitmproxy import http

# Per status: (Anthropic error type, Google status, OpenAI error type)
KINDS = {
    403: ("permission_error", "PERMISSION_DENIED", "permission_error"),
    413: ("request_too_large", "INVALID_ARGUMENT", "invalid_request_error"),
    429: ("rate_limit_error", "RESOURCE_EXHAUSTED", "rate_limit_error"),
    502: ("api_error", "UNAVAILABLE", "server_error"),
}
# AWS (Bedrock): botocore reads the error code from this header and the text from `message`.
AWS_ERROR_TYPES = {403: "AccessDeniedException", 413: "ValidationException",
                   429: "ThrottlingException", 502: "ServiceUnavailableException"}


def refusal(provider: str | None, status: int, message: str, code: str, stage: str,
            headers: dict[str, str] | None = None) -> http.Response:
    """`provider` as classify() names it; `code` is the machine-readable reason (OpenAI's
    `error.code`); `stage` goes into the BLOCKED_HEADER, so the records know who refused."""
    anthropic_type, google_status, openai_type = KINDS[status]
    body: dict[str, Any]
    extra = dict(headers or {})
    if provider == "bedrock":
        body = {"message": message}
        extra.setdefault("x-amzn-errortype", AWS_ERROR_TYPES[status])
    elif provider == "anthropic":
        body = {"type": "error", "error": {"type": anthropic_type, "message": message}}
    elif provider == "google":
        body = {"error": {"code": status, "message": message, "status": google_status}}
    else:  # OpenAI's shape, which the other providers' compatible APIs share
        body = {"error": {"message": message, "type": openai_type, "param": None, "code": code}}
    return http.Response.make(status, json.dumps(body).encode(), {
        "content-type": "application/json", BLOCKED_HEADER: stage, **extra})
