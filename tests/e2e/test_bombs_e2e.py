"""Decompression bombs, end to end: a local process (or an upstream) sends a gzip body of about
1 MiB that inflates to 1 GiB, under mitmproxy's stream_large_bodies, so the worker holds it whole.

The worker must never decode more than llmtap's cap of it (llmtap.addons.bodies): a request bomb
is refused with a 413 and nothing reaches the upstream; a response bomb to a request that carried
a real key cannot be checked for an echo, so the client gets a 502 instead (a streamed one is
cut). The worker's peak memory (VmHWM) stays under a fixed budget throughout, and other clients
are served meanwhile.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fake_providers import bomb as gzip_bomb
from test_credentials_e2e import assert_no_real_key_anywhere, real_key, set_secret
from test_key_theft_e2e import ANTHROPIC_HOST, record_with_error
from testbed import Daemon, Testbed

pytestmark = [pytest.mark.root, pytest.mark.serial]

PEAK_BUDGET_MB = 300  # the worker's VmHWM at any point of these tests
BOMB_SIZE = 1 << 30  # what each bomb inflates to; about 1 MiB on the wire
MESSAGES = f"https://{ANTHROPIC_HOST}/v1/messages"
CHAT = {"model": "claude-sonnet-4-5", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}]}


def peak_mb(daemon: Daemon) -> float:
    """The worker's resident high-water mark so far, in MB."""
    pid = daemon.status()["worker_pid"]
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM for worker {pid}")


@pytest.fixture(scope="module")
def bomb_file(testbed: Testbed) -> Path:
    path = testbed.workdir / "bomb.json.gz"
    path.write_bytes(gzip_bomb(BOMB_SIZE))
    path.chmod(0o644)
    return path


def curl(testbed: Testbed, url: str, *args: str) -> tuple[int, bytes]:
    """(HTTP status, body) of one curl run in the client namespace, no proxy variables."""
    out = testbed.workdir / f"curl-{secrets.token_hex(4)}.out"
    try:
        status = testbed.client("curl", "-sS", "--max-time", "60", "-o", str(out), "-w", "%{http_code}",
                                *args, url, check=False).stdout
        return int(status or 0), out.read_bytes() if out.exists() else b""
    finally:
        out.unlink(missing_ok=True)


def send_bomb(testbed: Testbed, daemon: Daemon, bomb: Path, tag: str, *headers: str) -> tuple[int, bytes]:
    return curl(testbed, f"{MESSAGES}?bomb={tag}", "--cacert", str(daemon.ca_pem),
                "-H", "content-type: application/json", "-H", "content-encoding: gzip",
                *(arg for header in headers for arg in ("-H", header)),
                "--data-binary", f"@{bomb}")


def send_chat(testbed: Testbed, daemon: Daemon, tag: str, *headers: str) -> tuple[int, bytes]:
    """A Messages call; `x-fake-bomb: N` among the headers makes the upstream answer a bomb."""
    return curl(testbed, f"{MESSAGES}?ok={tag}", "--cacert", str(daemon.ca_pem),
                "-H", "content-type: application/json", "-d", json.dumps(CHAT),
                *(arg for header in headers for arg in ("-H", header)))


def assert_refused(status: int, body: bytes) -> None:
    assert status == 413, (status, body[:300])
    error = json.loads(body)["error"]
    assert error["type"] == "request_too_large"  # Anthropic's shape: the SDK raises its 413 error
    assert "decodes to more than 32 MiB" in error["message"] and "limit is 32 MiB" in error["message"]


def bombs_upstream(testbed: Testbed) -> list[str]:
    return [r["query"] for r in testbed.upstream_requests() if "bomb=" in r["query"]]


def run_together(*calls: Callable[[], tuple[int, bytes]]) -> list[tuple[int, bytes]]:
    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(lambda call: call(), calls))


def test_a_request_bomb_is_refused_without_inflating_it(testbed, llmtap, bomb_file):
    daemon = llmtap()
    key = real_key("sk-ant-api03-")
    placeholder = set_secret(daemon, "anthropic", key, "--host", ANTHROPIC_HOST, "--header", "x-api-key")
    before = peak_mb(daemon)
    alone = [send_bomb(testbed, daemon, bomb_file, "plain"),
             send_bomb(testbed, daemon, bomb_file, "keyed", f"x-api-key: {placeholder}")]
    # Three at once, while other clients go on being served.
    together = run_together(*(lambda i=i: send_bomb(testbed, daemon, bomb_file, f"p{i}") for i in range(3)),
                            *(lambda i=i: send_chat(testbed, daemon, str(i)) for i in range(3)))
    after = peak_mb(daemon)
    print(f"worker VmHWM: {before:.0f} MB before, {after:.0f} MB after five request bombs")
    for status, body in alone + together[:3]:
        assert_refused(status, body)
    assert [status for status, _ in together[3:]] == [200, 200, 200]
    assert after < PEAK_BUDGET_MB, (before, after)
    assert bombs_upstream(testbed) == []  # nothing of them left the machine
    record = record_with_error(daemon, "decodes to more than 32 MiB")
    assert record["status"] == 413 and record["provider"] == "anthropic"
    keyed = [r for r in daemon.records(8) if "bomb=keyed" in str(r["path"])]
    assert keyed and keyed[0]["credential"] == "anthropic" and keyed[0]["status"] == 413
    assert "Traceback" not in daemon.stderr()
    assert_no_real_key_anywhere(daemon, key)


def test_a_corrupt_gzip_request_is_refused(testbed, llmtap):
    daemon = llmtap()
    status, body = curl(testbed, f"{MESSAGES}?bomb=corrupt", "--cacert", str(daemon.ca_pem),
                        "-H", "content-encoding: gzip", "--data-binary", "not gzip at all")
    assert status == 413 and "cannot be decoded" in json.loads(body)["error"]["message"], body[:300]
    assert bombs_upstream(testbed) == []
    assert record_with_error(daemon, "cannot be decoded")["status"] == 413


def test_a_response_bomb_to_a_key_bearing_request_is_withheld(testbed, llmtap):
    daemon = llmtap()
    key = real_key("sk-ant-api03-")
    placeholder = set_secret(daemon, "anthropic", key, "--host", ANTHROPIC_HOST, "--header", "x-api-key")
    bomb = f"x-fake-bomb: {BOMB_SIZE}"  # answered whatever accept-encoding the request has
    before = peak_mb(daemon)
    # Without a key it is not llmtap's to check: relayed as it came (curl does not inflate it),
    # and parsed on the side under the parsers' own caps.
    status, body = send_chat(testbed, daemon, "plain", bomb)
    assert status == 200 and body == gzip_bomb(BOMB_SIZE), (status, body[:100])
    results = run_together(*(lambda: send_chat(testbed, daemon, "keyed", bomb, f"x-api-key: {placeholder}")
                             for _ in range(3)),
                           lambda: send_chat(testbed, daemon, "during"))
    after = peak_mb(daemon)
    print(f"worker VmHWM: {before:.0f} MB before, {after:.0f} MB after four response bombs")
    for status, body in results[:3]:
        assert status == 502, (status, body[:300])
        error = json.loads(body)["error"]
        assert error["type"] == "api_error"
        assert "decodes to more than 32 MiB" in error["message"] and "echoed key" in error["message"]
    assert results[3][0] == 200
    assert after < PEAK_BUDGET_MB, (before, after)
    record = record_with_error(daemon, "cannot be checked for an echoed key")
    assert record["status"] == 502 and record["credential"] == "anthropic"
    assert "Traceback" not in daemon.stderr()
    assert_no_real_key_anywhere(daemon, key)


def test_a_streamed_response_bomb_to_a_key_bearing_request_is_cut_and_stays_bounded(testbed, llmtap):
    daemon = llmtap()
    key = real_key("sk-ant-api03-")
    placeholder = set_secret(daemon, "anthropic", key, "--host", ANTHROPIC_HOST, "--header", "x-api-key")
    # No content-length: the proxy streams it through the echo guard instead of holding it.
    bomb = (f"x-fake-bomb: {BOMB_SIZE}", "x-fake-unsized: 1", f"x-api-key: {placeholder}")
    before = peak_mb(daemon)
    results = run_together(*(lambda: send_chat(testbed, daemon, "streamed", *bomb) for _ in range(3)),
                           lambda: send_chat(testbed, daemon, "during"))
    after = peak_mb(daemon)
    print(f"worker VmHWM: {before:.0f} MB before, {after:.0f} MB after three streamed response bombs")
    # Watched as it passed, one decoder piece at a time, and cut where it could no longer be.
    for status, body in results[:3]:
        assert status == 200 and 0 < len(body) < len(gzip_bomb(BOMB_SIZE)) // 2, (status, len(body))
    assert results[3][0] == 200
    assert after < PEAK_BUDGET_MB, (before, after)
    alerts = [a for r in daemon.records(4) for a in r.get("credential_alerts") or []]
    assert [a["alert"] for a in alerts] == [
        "more than 256 MiB decoded, too much to check for an echoed key in a compressed stream: "
        "the stream was cut"] * 3
    assert "Traceback" not in daemon.stderr()
    assert_no_real_key_anywhere(daemon, key)
