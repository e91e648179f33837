"""Attacks on blocking budgets: calls a client shapes so that the budget check misses them.

Each test sets a budget the call cannot fit in (spent past its cap, or below the call's estimate),
then shapes the call so that the check might miss it. The call must be refused all the same.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_budgets_e2e import WS_TURN, policy, remove, set_rule, with_calls
from test_protocols_e2e import client, upstream_seen
from testbed import Daemon, Testbed, running_daemon, wait_for

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def tap(testbed: Testbed) -> Iterator[Daemon]:
    with running_daemon(testbed) as daemon:
        yield daemon


def spent_budget(testbed: Testbed, tap: Daemon, name: str, model: str, spend: str) -> None:
    """Budget `name` on `model`, with the client code `spend` spent and its cap then set below."""
    set_rule(tap, "budget", name, "--daily", "100", "--model", model)
    client(testbed, tap, spend)
    assert wait_for(lambda: policy(tap)[name]["spent_today"] > 0, timeout=10)
    tap.llmtap("budget", "set", name, "--daily", "0.0001", "--model", model)
    assert wait_for(lambda: policy(tap)[name]["daily"] == 0.0001, timeout=8)


def test_a_body_too_large_to_hold_is_checked_before_it_leaves(testbed, tap, tmp_path: Path):
    """Past stream_large_bodies (4 MB) mitmproxy sends the headers and body on as they come, and
    the `request` hook runs only once all of it has gone: the check must not wait for it."""
    spent_budget(testbed, tap, "huge", "claude-haiku-4-5", with_calls("""
    print(json.dumps(call("bud-huge-0", "claude-haiku-4-5", {"input_tokens": 1000, "output_tokens": 100})))
    """))
    try:
        body = tmp_path / "huge.json"
        body.write_text(json.dumps({"model": "claude-haiku-4-5", "max_tokens": 10, "messages": [
            {"role": "user", "content": "x" * (5 * 1024 * 1024)}]}))
        body.chmod(0o644)
        for extra in ((), ("-H", "transfer-encoding: chunked")):  # a length, and none
            done = testbed.curl("https://api.anthropic.com/v1/messages?t=bud-huge", tap.ca_pem,
                                "-H", "content-type: application/json", "-H",
                                "x-api-key: sk-ant-placeholder", "--data-binary", f"@{body}",
                                *extra, check=False)
            assert "budget 'huge'" in done.stdout, (extra, done.stdout[:300], tap.stderr()[-3000:])
        assert upstream_seen(testbed, "bud-huge") == []
    finally:
        remove(tap, "budget", "huge")


@pytest.mark.parametrize("shape", ["escaped", "binary"])
def test_a_websocket_response_create_in_another_shape_is_still_held(testbed, tap, tmp_path, shape):
    """`response.create` spelled with a JSON escape, or sent as a binary frame, is the same call
    to the upstream."""
    import streams

    fixture = streams.DIR / "openai_responses_ws_client.json"
    set_rule(tap, "budget", "wsx", "--daily", "0.03", "--model", "gpt-5*")  # a turn reserves $0.04
    try:
        create = fixture.read_text().strip()
        if shape == "escaped":
            create = create.replace('"response.create"', '"response\\u002ecreate"', 1)
        path = tmp_path / "create.json"
        path.write_text(create)
        path.chmod(0o644)
        code = WS_TURN.replace("CREATE", repr(str(path))).replace("t=bud-ws", "t=bud-wsx2")
        if shape == "binary":
            code = code.replace("ev.TextMessage(open(", "ev.BytesMessage(open(", 1)
            code = code.replace(".read().strip()", ".read().strip().encode()", 1)
        reply = client(testbed, tap, code)
        assert reply["type"] == "error" and reply["error"]["code"] == "llmtap_budget_exceeded", reply
    finally:
        remove(tap, "budget", "wsx")


def test_no_addon_failed_along_the_way(tap):
    assert "Addon error" not in tap.stderr()
    assert "Traceback" not in tap.stderr()
