"""The real Claude Code CLI (from npm, pinned in tests/clis) through llmtap, with no proxy settings.

Claude Code holds only a placeholder key; the fake upstream answers with a usage that has every
kind of token (cache reads, 5-minute and 1-hour cache writes); llmtap's cost for the turn must be
exactly the `total_cost_usd` Claude Code itself reports.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import paths
import pytest
from testbed import Daemon, Testbed

pytestmark = pytest.mark.root

CLIS = paths.CLIS
CLAUDE = CLIS / "@anthropic-ai" / "claude-code-linux-x64" / "claude"
USAGE = {"input_tokens": 1234, "cache_creation_input_tokens": 3000, "cache_read_input_tokens": 20000,
         "cache_creation": {"ephemeral_5m_input_tokens": 1000, "ephemeral_1h_input_tokens": 2000},
         "output_tokens": 567}


def placeholder_for(daemon: Daemon, real: str) -> str:
    out = daemon.llmtap("secrets", "set", "anthropic", "--host", "api.anthropic.com",
                        input=real + "\n").stdout
    match = re.search(r"placeholder: (\S+)", out)
    assert match, out
    return match.group(1)


def test_a_claude_code_turn_costs_what_claude_code_reports(testbed: Testbed, llmtap: Callable[[], Daemon],
                                                           tmp_path: Path) -> None:
    if not CLAUDE.exists():
        pytest.fail(f"{CLAUDE} is missing: scripts/test.sh installs it (npm ci in tests/clis)")
    tap = llmtap()
    real = f"sk-ant-api03-REAL{secrets.token_hex(24)}"
    placeholder = placeholder_for(tap, real)
    home = tmp_path / "home"
    home.mkdir()
    started = time.time()
    result = testbed.client(
        str(CLAUDE), "-p", "Say hello.", "--output-format", "json", timeout=120,
        env={"HOME": str(home), "ANTHROPIC_API_KEY": placeholder,
             "NODE_EXTRA_CA_CERTS": str(tap.ca_pem),
             "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
             "ANTHROPIC_CUSTOM_HEADERS": "x-fake-usage: " + json.dumps(USAGE)},
    )
    reported = json.loads(result.stdout)
    assert reported["is_error"] is False, reported
    [model] = reported["modelUsage"]  # Claude Code's default model, as it named it
    calls = wait_for_calls(tap, started, len(reported["modelUsage"]))
    assert {c["model"] for c in calls} == {model}
    total = sum(Decimal(str(c["cost_usd"])) for c in calls)
    assert total == Decimal(str(reported["total_cost_usd"])), (calls, reported)
    for call in calls:
        assert call["price"]["row"] == f"anthropic/{model}" and call["credential"] == "anthropic"
        assert call["usage"]["cache_write_1h_tokens"] == 2000
        assert real not in json.dumps(call) and placeholder not in json.dumps(call)
    keys = {r["headers"].get("x-api-key") for r in testbed.upstream_requests()
            if r["path"].startswith("/v1/messages") and r.get("time", started) >= started}
    assert keys == {real}  # the real key reached the provider; Claude Code only held the placeholder


def wait_for_calls(daemon: Daemon, since: float, at_least: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 15
    while True:
        calls = [r for r in daemon.records() if r["path"].startswith("/v1/messages")
                 and r["started_at"] >= time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(since))
                 and r.get("usage")]
        if len(calls) >= at_least or time.monotonic() > deadline:
            return calls
        time.sleep(0.2)
