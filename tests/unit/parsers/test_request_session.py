"""The conversation a request says it belongs to: recorded as request.conversation_id (the OTLP
export's gen_ai.conversation.id) and used by the web UI to group sessions."""

from __future__ import annotations

import json

import pytest
from llmtap.parsers import parse_request
from llmtap.parsers.request import client_session

SESSION = "0b9d1a6e-55f5-4c3e-9d2a-7f3e2c1b4a59"


@pytest.mark.parametrize(("body", "expected"), [
    ({"conversation": "conv_123"}, ("openai", "conv_123")),
    ({"conversation": {"id": "conv_456"}}, ("openai", "conv_456")),
    ({"metadata": {"user_id": json.dumps({"device_id": "d", "session_id": SESSION})}},
     ("claude-code", SESSION)),
    ({"metadata": {"user_id": f"user_abc_account_x_session_{SESSION}"}}, ("claude-code", SESSION)),
    ({"prompt_cache_key": SESSION}, ("codex", SESSION)),
    ({"metadata": {"user_id": "{not json"}}, None),
    ({"metadata": "x", "conversation": 7}, None),
    ({}, None),
])
def test_client_session(body: dict, expected: tuple[str, str] | None) -> None:
    assert client_session(body) == expected


def test_the_record_carries_the_conversation_id() -> None:
    body = {"model": "claude-opus-5-5", "max_tokens": 5, "messages": [],
            "metadata": {"user_id": json.dumps({"session_id": SESSION})}}
    info = parse_request("api.anthropic.com", "POST", "/v1/messages", json.dumps(body).encode())
    assert info.record()["conversation_id"] == SESSION
    plain = parse_request("api.anthropic.com", "POST", "/v1/messages", b'{"model": "m"}')
    assert "conversation_id" not in plain.record()
