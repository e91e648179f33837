"""`llmtap ui` in a real browser (Debian's chromium, headless) over records made by real clients
through the test bed: the Claude Code CLI (two turns of one session) and the Anthropic SDK (a
conversation with an image and a tool call). Checks that a session groups its calls, that the
diff shows the added message and that the charts render; with LLMTAP_SAVE_SCREENSHOT=1 it
refreshes the screenshots in docs/.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import shutil
import struct
import subprocess
import sys
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paths
import pytest
from browser import Browser
from test_claude_code_e2e import CLAUDE, USAGE, placeholder_for
from testbed import LLMTAP, Daemon, Testbed, clean_env

pytestmark = pytest.mark.root

DOCS = paths.DOCS


def gradient_png(size: int = 96) -> str:
    """A small real PNG (base64), so the thumbnail in the screenshot shows something."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    rows = b"".join(b"\0" + bytes(v for x in range(size) for v in (x * 255 // size, y * 255 // size, 160))
                    for y in range(size))
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    return base64.b64encode(png).decode()


PNG = gradient_png()
SDK_CLIENT = """
import sys, anthropic
claude = anthropic.Anthropic(api_key=sys.argv[2], max_retries=0,
                             http_client=anthropic.DefaultHttpxClient(verify=sys.argv[1]))
image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": sys.argv[3]}}
first = [{"role": "user", "content": [{"type": "text", "text": "What is in this picture?"}, image]}]
claude.messages.create(model="claude-sonnet-4-5", max_tokens=64, system="You describe pictures.",
                       messages=first)
second = first + [
    {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "zoom",
                                       "input": {"factor": 2}}]},
    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                  "content": "a white pixel, zoomed twice"}]}]
with claude.messages.stream(model="claude-sonnet-4-5", max_tokens=64, system="You describe pictures.",
                            messages=second) as stream:
    stream.get_final_message()
"""
RESPONSES_CLIENT = """
import sys, openai
gpt = openai.OpenAI(api_key="sk-proj-PLACEHOLDERNEVERUSED", max_retries=0,
                    http_client=openai.DefaultHttpxClient(verify=sys.argv[1]))
first = gpt.responses.create(model="gpt-5", instructions="Answer in one word.", input="Capital of France?")
gpt.responses.create(model="gpt-5", previous_response_id=first.id, input="And of Italy?")
"""
ONE_MORE = """
import sys, anthropic
claude = anthropic.Anthropic(api_key="sk-ant-api03-NOTAREALKEYATALL", max_retries=0,
                             http_client=anthropic.DefaultHttpxClient(verify=sys.argv[1]))
with claude.messages.stream(model="claude-haiku-4-5", max_tokens=16,
                            messages=[{"role": "user", "content": "one more"}],
                            extra_headers={"x-fake-pause-ms": "400"}) as stream:  # slow: in flight
    stream.get_final_message()
"""


class Ui:
    def __init__(self, daemon: Daemon) -> None:
        self.proc = subprocess.Popen([LLMTAP, "ui", "--no-open", "--config", str(daemon.config_path)],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout
        line = self.proc.stdout.readline()
        match = re.search(r"(http://127\.0\.0\.1:(\d+)/)\?token=(\S+)", line)
        assert match, (line, self.proc.stderr.read() if self.proc.stderr else "")
        self.base, self.port, self.token = match.group(1), int(match.group(2)), match.group(3)

    def url(self, path: str, **params: str) -> str:
        query = "&".join(f"{k}={v}" for k, v in {**params, "token": self.token}.items())
        return f"{self.base}{path.lstrip('/')}?{query}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def run_clients(testbed: Testbed, tap: Daemon, home: Path) -> str:
    placeholder = placeholder_for(tap, f"sk-ant-api03-REAL{secrets.token_hex(24)}")
    session = str(uuid.uuid4())
    env = {"HOME": str(home), "ANTHROPIC_API_KEY": placeholder, "NODE_EXTRA_CA_CERTS": str(tap.ca_pem),
           "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
           "ANTHROPIC_CUSTOM_HEADERS": "x-fake-usage: " + json.dumps(USAGE)}
    for args in (("--session-id", session, "Say hello."), ("--resume", session, "Now say goodbye.")):
        # in a directory of its own: Claude Code sends the git status of where it runs
        testbed.client("env", "-C", str(home), str(CLAUDE), "-p", "--output-format", "json", *args,
                       timeout=120, env=env)
    testbed.client(sys.executable, "-c", SDK_CLIENT, str(tap.ca_pem), placeholder, PNG, timeout=60)
    testbed.client(sys.executable, "-c", RESPONSES_CLIENT, str(tap.ca_pem), timeout=60)
    return session


@pytest.fixture(scope="module")
def recorded(testbed: Testbed, tmp_path_factory: pytest.TempPathFactory,
             ) -> Iterator[tuple[Daemon, str]]:
    from testbed import start_daemon

    if not CLAUDE.exists():
        pytest.fail(f"{CLAUDE} is missing: scripts/test.sh installs it (npm ci in tests/clis)")
    testbed.upstream_log.write_text("")
    tap = start_daemon(testbed)
    try:
        tap.wait_ready()
        home = tmp_path_factory.mktemp("home")
        home.chmod(0o755)
        session = run_clients(testbed, tap, home)
        tap.records(expected=7, timeout=20)
        yield tap, session
    finally:
        tap.stop()
        shutil.rmtree(tap.root, ignore_errors=True)


@pytest.fixture(scope="module")
def ui(recorded: tuple[Daemon, str]) -> Iterator[Ui]:
    server = Ui(recorded[0])
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """docs/ with LLMTAP_SAVE_SCREENSHOT=1 (refreshes the committed ones), else a temporary folder."""
    return DOCS if os.environ.get("LLMTAP_SAVE_SCREENSHOT") else tmp_path_factory.mktemp("shots")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    chrome = Browser()
    try:
        yield chrome
    finally:
        chrome.close()


def messages_calls(daemon: Daemon) -> list[dict[str, Any]]:
    return [r for r in daemon.records() if r["path"].startswith("/v1/messages") and r.get("usage")]


def _mentions(daemon: Daemon, record: dict[str, Any], text: str) -> bool:
    twins = list(daemon.records_dir.glob(f"*_{record['id']}.md"))
    return bool(twins) and text in twins[0].read_text()


def test_a_claude_code_session_groups_its_calls_and_the_diff_shows_the_new_message(
        recorded: tuple[Daemon, str], ui: Ui, browser: Browser, shots: Path) -> None:
    tap, session = recorded
    browser.open(ui.url("/sessions"))
    rows = browser.eval("[...document.querySelectorAll('tr.session')].map(r => r.innerText)")
    mine = [r for r in rows if f"claude-code:{session}" in r]
    assert len(mine) == 1, rows
    count = browser.eval(f"[...document.querySelectorAll('tr.session')].filter(r => r.innerText.includes("
                         f"'{session}'))[0].querySelector('.calls-count').innerText")
    assert int(count) == 2  # the two turns, and nothing else of Claude Code's traffic
    browser.screenshot(shots / "ui-sessions.png")
    link = browser.eval(f"[...document.querySelectorAll('tr.session')].filter(r => r.innerText.includes("
                        f"'{session}'))[0].querySelector('a').getAttribute('href')")
    browser.open(f"{ui.base}{link.lstrip('/')}")
    assert browser.wait("document.getElementById('session-context').dataset.rendered") == "2"
    assert browser.eval("document.querySelectorAll('table.calls tbody tr').length") == 2
    browser.screenshot(shots / "ui-session.png")
    goodbye = [c for c in messages_calls(tap) if _mentions(tap, c, "Now say goodbye.")]
    assert goodbye, "no recorded call carries the second prompt"
    browser.open(ui.url(f"/call/{goodbye[-1]['id']}"))
    added = browser.eval("[...document.querySelectorAll('.conversation .turn.added')].map(t => t.innerText)")
    assert any("Now say goodbye." in a for a in added), added
    assert "Against the previous call of this session" in browser.text()
    assert browser.csp_violations() == []
    browser.eval("document.querySelector('.turn.added').scrollIntoView({block: 'center'})")
    browser.screenshot(shots / "ui-call-diff.png")


def test_a_conversation_shows_the_image_tool_call_and_result(recorded: tuple[Daemon, str], ui: Ui,
                                                            browser: Browser, shots: Path) -> None:
    tap, _ = recorded
    zoomed = [c for c in messages_calls(tap) if _mentions(tap, c, "zoomed twice")]
    assert zoomed
    browser.open(ui.url(f"/call/{zoomed[-1]['id']}"))
    assert browser.wait("document.querySelector('img.thumb').naturalWidth") == 96  # decoded, not blocked
    text = browser.text()
    assert "TOOL CALL" in text.upper() and "zoom" in text and "a white pixel, zoomed twice" in text
    assert "2 message(s) added" in text and "0 fell out of the context" in text
    assert browser.csp_violations() == []
    browser.screenshot(shots / "ui-conversation.png")


def test_a_previous_response_id_chain_is_one_session(recorded: tuple[Daemon, str], ui: Ui,
                                                     browser: Browser) -> None:
    tap, _ = recorded
    chained = [r for r in tap.records()
               if r["path"] == "/v1/responses" and _mentions(tap, r, "And of Italy?")]
    assert chained
    browser.open(ui.url(f"/call/{chained[-1]['id']}"))
    text = browser.text()
    assert "Against the previous call of this session" in text and "previous_response_id" in text
    assert "1 message(s) added" in text and "0 fell out of the context" in text
    assert "Capital of France?" not in text  # only what it sent; the server holds the rest
    previous = browser.eval("document.querySelector('.diff a').getAttribute('href')")
    browser.open(f"{ui.base}{previous.lstrip('/')}")
    assert "Capital of France?" in browser.text()
    assert browser.csp_violations() == []


def test_the_charts_render(ui: Ui, browser: Browser, shots: Path) -> None:
    browser.open(ui.url("/charts", since="all", by="model", bucket="minute"))
    browser.wait("document.getElementById('charts').dataset.ready === '1'")
    rendered = browser.eval("Object.fromEntries([...document.querySelectorAll('[data-chart]')]"
                            ".map(n => [n.dataset.chart, Number(n.dataset.rendered)]))")
    assert all(rendered[name] > 0 for name in ("cost", "tokens", "cache", "context")), rendered
    assert browser.eval("document.querySelectorAll('#charts canvas').length") >= 4
    assert "claude-sonnet-4-5" in browser.eval("document.getElementById('groups').innerText")
    assert browser.csp_violations() == []
    browser.screenshot(shots / "ui-charts.png")


def test_the_live_feed_shows_a_new_call(recorded: tuple[Daemon, str], testbed: Testbed, ui: Ui,
                                        browser: Browser, shots: Path) -> None:
    tap, _ = recorded
    browser.open(ui.url("/"))
    browser.wait("document.getElementById('daemon').innerText === 'daemon connected'")
    before = browser.eval("document.querySelectorAll('#recent a[href^=\"/call/\"]').length")
    client = subprocess.Popen(["ip", "netns", "exec", testbed.client_ns, sys.executable, "-c", ONE_MORE,
                               str(tap.ca_pem)], env=clean_env())
    try:
        browser.wait("document.querySelector('#active .card').innerText.includes('/v1/messages')")
        browser.screenshot(shots / "ui-live.png")  # the call in flight, over the latest calls
        assert client.wait(timeout=60) == 0
    finally:
        if client.poll() is None:
            client.kill()
    browser.wait("document.querySelector('#active').innerText.includes('nothing in flight')")
    browser.wait("document.querySelector('#recent').innerText.includes('claude-haiku-4-5')", timeout=40)
    after = browser.eval("document.querySelectorAll('#recent a[href^=\"/call/\"]').length")
    assert after > before
    assert browser.csp_violations() == []


def test_the_browser_gets_nothing_without_the_token_or_from_a_foreign_host(ui: Ui, browser: Browser) -> None:
    browser.open(f"{ui.base}sessions")
    assert "unauthorized" in browser.text()
    result = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-H",
                             f"Host: attacker.example:{ui.port}", ui.url("/")],
                            capture_output=True, text=True, timeout=30)
    assert result.stdout == "403"
    listening = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True).stdout
    mine = [line.split()[3] for line in listening.splitlines() if f"pid={ui.proc.pid}," in line]
    assert mine and all(a.rsplit(":", 1)[0] in ("127.0.0.1", "[::1]") for a in mine), mine
