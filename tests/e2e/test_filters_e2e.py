"""Filter rules and DLP end to end: the official SDKs in the client namespace, no proxy settings.

What the fake upstream logs is exactly what left the machine, so "the provider received the
rewritten request" and "the blocked request never left" are checked there. Rules are added with
the CLI while the daemon runs: they take effect at the next request, without a restart.
"""

from __future__ import annotations

import json
import pwd
import textwrap
from typing import Any

import pytest
from testbed import Daemon, Testbed

pytestmark = pytest.mark.root

GITHUB_TOKEN = "ghp_" + "R2d2C3po" * 4 + "Bb8x"
AWS_KEY = "AKIAIOSFODNN7EXAMPLE"
SIGNATURE = "EqQBCkgIARABGAIiQLsig-internal.corp-untouchable"

ANTHROPIC = """
import json, os, anthropic
sdk = anthropic.Anthropic(api_key="sk-ant-test", max_retries=0,
                          http_client=anthropic.DefaultHttpxClient(verify=os.environ["CA"]))
"""
OPENAI = """
import json, os, openai
sdk = openai.OpenAI(api_key="sk-test", max_retries=0,
                    http_client=openai.DefaultHttpxClient(verify=os.environ["CA"]))
"""


def sdk(testbed: Testbed, daemon: Daemon, prelude: str, code: str, text: str = "") -> Any:
    """Runs SDK code in the client namespace; its last printed line is JSON. `text` (the prompt)
    goes in the environment: a command line is recorded (process.cmdline), a prompt is not."""
    result = testbed.python(prelude + textwrap.dedent(code),
                            env={"CA": str(daemon.ca_pem), "TEXT": text})
    return json.loads(result.stdout.strip().splitlines()[-1])


def ask_claude(testbed: Testbed, daemon: Daemon, text: str) -> Any:
    messages = [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "hmm internal.corp", "signature": SIGNATURE},
            {"type": "text", "text": "ok"}]},
        {"role": "user", "content": "TEXT"},
    ]
    return sdk(testbed, daemon, ANTHROPIC, f"""
        messages = {messages!r}
        messages[-1]["content"] = os.environ["TEXT"]
        reply = sdk.messages.create(model="claude-sonnet-4-5", max_tokens=64,
                                    metadata={{"user_id": "alice@corp"}}, messages=messages)
        print(json.dumps(reply.content[0].text))
    """, text)


def last_upstream(testbed: Testbed) -> tuple[dict[str, str], dict[str, Any]]:
    seen = testbed.upstream_requests()[-1]
    return seen["headers"], json.loads(seen["body"])


def test_rules_added_while_running_rewrite_what_the_sdk_sends(testbed, llmtap) -> None:  # type: ignore[no-untyped-def]
    daemon = llmtap()
    assert ask_claude(testbed, daemon, "hello") == "Hello from the fake upstream."
    headers, _ = last_upstream(testbed)
    assert any(name.startswith("x-stainless-") for name in headers)

    def add(*args: str) -> None:
        daemon.llmtap("rules", "add", *args)

    add("--scope", "header", "--action", "remove", "--match", "regex", "--target", "^x-stainless-")
    add("--scope", "header", "--action", "set", "--target", "X-Team", "--replacement", "blue",
        "--host", "api.anthropic.com")
    add("--scope", "body", "--action", "json_path", "--target", "metadata.user_id",
        "--replacement", "anonymous", "--description", "no user ids upstream")
    add("--scope", "body", "--action", "text_replace", "--match", "contains", "--target",
        "internal.corp", "--replacement", "example.com")
    add("--scope", "body", "--action", "text_replace", "--match", "regex", "--target",
        r"ticket-(\d+)", "--replacement", r"T\1", "--priority", "1")
    add("--scope", "body", "--action", "json_path", "--target", "metadata.team.name",
        "--replacement", "x")  # a miss: metadata.team does not exist
    database = daemon.state_dir / "rules.db"
    assert database.stat().st_uid == pwd.getpwnam("llmtap").pw_uid  # the worker reads it

    text = f"deploy ticket-42 to api.internal.corp with {GITHUB_TOKEN}"
    ask_claude(testbed, daemon, text)
    headers, body = last_upstream(testbed)
    assert not any(name.startswith("x-stainless-") for name in headers)
    assert headers["x-team"] == "blue"
    assert body["metadata"] == {"user_id": "anonymous"}
    assert body["messages"][2]["content"] == "deploy T42 to api.example.com with [REDACTED:github_token]"
    thinking = body["messages"][1]["content"][0]
    assert thinking == {"type": "thinking", "thinking": "hmm internal.corp", "signature": SIGNATURE}
    assert body["messages"][1]["content"][1]["text"] == "ok"

    record = daemon.records(expected=2)[-1]
    assert {hit["id"] for hit in record["rules_hit"]} == {1, 2, 3, 4, 5}
    hit = next(h for h in record["rules_hit"] if h["id"] == 3)
    assert hit == {"id": 3, "description": "no user ids upstream",
                   "changes": ["body metadata.user_id set"]}
    assert record["rules_missed"][0]["id"] == 6
    assert record["dlp_hits"] == [{"detector": "github_token", "action": "redact",
                                   "location": "body messages[2].content", "count": 1}]
    written = b"".join(p.read_bytes() for p in daemon.records_dir.rglob("*") if p.is_file())
    assert GITHUB_TOKEN.encode() not in written  # records, Markdown twins, the index

    # Disabling takes effect at once too.
    daemon.llmtap("rules", "disable", "4")
    ask_claude(testbed, daemon, "still internal.corp")
    _, body = last_upstream(testbed)
    assert body["messages"][2]["content"] == "still internal.corp"
    assert daemon.proc.poll() is None  # never restarted


BLOCKING = """
[dlp.actions]
aws_access_key = "block"
[[dlp.patterns]]
name = "employee_id"
pattern = "EMP-[0-9]{6}"
action = "alert"
"""


def test_blocked_requests_raise_the_sdks_permission_error(testbed, llmtap) -> None:  # type: ignore[no-untyped-def]
    daemon = llmtap(extra_toml=BLOCKING)
    claude = sdk(testbed, daemon, ANTHROPIC, """
        try:
            sdk.messages.create(model="claude-sonnet-4-5", max_tokens=64,
                                messages=[{"role": "user", "content": os.environ["TEXT"]}])
            print(json.dumps("not blocked"))
        except anthropic.PermissionDeniedError as exc:
            print(json.dumps([exc.status_code, exc.body["error"]["type"], exc.message]))
    """, f"use {AWS_KEY} please")
    assert claude[0] == 403 and claude[1] == "permission_error"
    assert "aws_access_key" in claude[2] and AWS_KEY not in claude[2]

    gpt = sdk(testbed, daemon, OPENAI, """
        try:
            stream = sdk.chat.completions.create(model="gpt-4o", stream=True,
                messages=[{"role": "user", "content": os.environ["TEXT"]}])
            print(json.dumps([chunk.model for chunk in stream]))
        except openai.PermissionDeniedError as exc:
            print(json.dumps([exc.status_code, exc.code]))
    """, f"key {AWS_KEY}")
    assert gpt == [403, "llmtap_dlp_blocked"]
    assert testbed.upstream_requests() == []  # neither ever left the machine

    gemini = sdk(testbed, daemon, "import httpx, json, os\n", """
        r = httpx.post("https://generativelanguage.googleapis.com/v1beta/models/"
                       "gemini-2.5-flash:generateContent", verify=os.environ["CA"],
                       json={"contents": [{"parts": [{"text": os.environ["TEXT"]}]}]})
        print(json.dumps([r.status_code, r.json()["error"]["status"]]))
    """, AWS_KEY)
    assert gemini == [403, "PERMISSION_DENIED"]

    # An alert lets the request through unchanged, and is recorded.
    reply = sdk(testbed, daemon, OPENAI, """
        reply = sdk.chat.completions.create(model="gpt-4o",
            messages=[{"role": "user", "content": os.environ["TEXT"]}])
        print(json.dumps(reply.choices[0].message.content))
    """, "who is EMP-123456?")
    assert reply == "Hello from the fake upstream."
    assert "EMP-123456" in testbed.upstream_requests()[-1]["body"]

    records = daemon.records(expected=4)
    blocked = [r for r in records if r["status"] == 403]
    assert len(blocked) == 3
    for record in blocked:
        assert record["dlp_hits"][0]["detector"] == "aws_access_key"
        assert record["dlp_hits"][0]["action"] == "block"
    [alerted] = [r for r in records if r["status"] == 200]
    assert alerted["dlp_hits"] == [{"detector": "employee_id", "action": "alert",
                                    "location": "body messages[0].content", "count": 1}]
    assert "dlp: alert employee_id" in daemon.stderr()
    written = b"".join(p.read_bytes() for p in daemon.records_dir.rglob("*") if p.is_file())
    assert AWS_KEY.encode() not in written and b"EMP-123456" not in written


def test_a_streamed_request_body_is_redacted_on_the_fly(testbed, llmtap) -> None:  # type: ignore[no-untyped-def]
    """A body past stream_large_bodies (4 MB) is never held: DLP redacts it as it passes."""
    daemon = llmtap()
    sent = sdk(testbed, daemon, OPENAI, """
        filler = "lorem ipsum dolor sit amet " * 200_000
        token, key = os.environ["TEXT"].split()
        text = filler + f" {token} " + filler + f" {key}"
        reply = sdk.chat.completions.create(model="gpt-4o",
            messages=[{"role": "user", "content": text}])
        print(json.dumps(reply.choices[0].message.content))
    """, f"{GITHUB_TOKEN} {AWS_KEY}")
    assert sent == "Hello from the fake upstream."
    body = testbed.upstream_requests()[-1]["body"]
    assert len(body) > 10_000_000
    assert GITHUB_TOKEN not in body and AWS_KEY not in body
    content = json.loads(body)["messages"][0]["content"]  # still valid JSON, same length
    token = "[REDACTED:github_token" + "*" * 17 + "]"
    assert content.endswith(f" {token} " + "lorem ipsum dolor sit amet " * 200_000
                            + " [REDACTED" + "*" * 10 + "]")
    [record] = daemon.records(expected=1)
    assert record["model"] == "gpt-4o"  # the protocols stage still read the (redacted) stream
    assert {(h["detector"], h["location"]) for h in record["dlp_hits"]} == {
        ("github_token", "body (streamed)"), ("aws_access_key", "body (streamed)")}
