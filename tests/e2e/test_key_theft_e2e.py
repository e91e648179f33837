"""Attacks on the keys, end to end: each one a local process trying to make llmtap send a real key
somewhere an attacker listens. The listener (tests/support/sniffer.py) sits in the upstream namespace on
an address of its own and keeps every byte it receives; no real key may ever be among them.

The one rule under test: a real key is added only to a request on TLS whose upstream certificate
is verified for a host the key is bound to, on a redirected port.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from llmtap.masking import encoded_forms
from test_credentials_e2e import assert_no_real_key_anywhere, real_key, set_secret
from testbed import TESTS_DIR, Daemon, Testbed

pytestmark = pytest.mark.root

ANTHROPIC_HOST = "api.anthropic.com"


@dataclass
class Sniffer:
    address: str
    log: Path
    proc: subprocess.Popen[bytes]

    def received(self) -> bytes:
        return self.log.read_bytes()


@pytest.fixture
def sniffer(testbed: Testbed) -> Iterator[Callable[..., Sniffer]]:
    """sniffer(tls=False): a listener on 443 of a new address in the upstream namespace."""
    started: list[Sniffer] = []

    def start(tls: bool = False, last_octet: int = 4) -> Sniffer:
        address = f"10.77.{testbed.subnet}.{last_octet}"
        testbed.ns_exec(testbed.upstream_ns, "ip", "addr", "replace", f"{address}/24",
                        "dev", f"{testbed.tag}u")
        log = testbed.workdir / f"sniffer-{last_octet}.bin"
        log.touch()
        args = ["--bind", f"{address}:443", "--log", str(log)]
        if tls:  # a certificate from a CA nobody trusts: only an unverified client would go on
            cert = trustme.CA().issue_cert(ANTHROPIC_HOST)
            pem = testbed.workdir / f"sniffer-{last_octet}.pem"
            cert.private_key_and_cert_chain_pem.write_to_path(str(pem))
            args += ["--cert", str(pem)]
        proc = subprocess.Popen(["ip", "netns", "exec", testbed.upstream_ns, sys.executable,
                                 str(TESTS_DIR / "sniffer.py"), *args])
        sniffer = Sniffer(address, log, proc)
        started.append(sniffer)
        _wait_listening(testbed, address)
        return sniffer

    try:
        yield start
    finally:
        for each in started:
            each.proc.terminate()
            each.proc.wait(timeout=5)
            testbed.ns_exec(testbed.upstream_ns, "ip", "addr", "del", f"{each.address}/24",
                            "dev", f"{testbed.tag}u", check=False)


def _wait_listening(testbed: Testbed, address: str) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        probe = testbed.ns_exec(testbed.upstream_ns, "ss", "-Hltn", f"src {address}:443")
        if probe.stdout.strip():
            return
        time.sleep(0.1)
    raise AssertionError(f"sniffer on {address} did not start")


def curl(testbed: Testbed, *args: str) -> tuple[int, str]:
    """(HTTP status, body) of one curl run in the client namespace, no proxy variables."""
    out = testbed.client("curl", "-sS", "--max-time", "15", "-o", "-", "-w", "\n%{http_code}",
                         *args, check=False).stdout
    body, _, status = out.rpartition("\n")
    return int(status or 0), body


def record_with_error(daemon: Daemon, needle: str) -> dict[str, object]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for record in daemon.records():
            if needle in (record.get("error") or ""):
                return record
        time.sleep(0.2)
    raise AssertionError(f"no record with error {needle!r}: {[r.get('error') for r in daemon.records()]}")


@pytest.fixture
def extra_address(testbed: Testbed) -> Iterator[Callable[[str, str], None]]:
    """extra_address(ip, host): one more address for `host` in the client namespace, for this
    test only (the test bed is shared by the session)."""
    hosts = Path("/etc/netns") / testbed.client_ns / "hosts"
    before = hosts.read_text()
    yield lambda ip, host: hosts.write_text(hosts.read_text() + f"{ip} {host}\n")
    hosts.write_text(before)


def test_plain_http_to_a_target_address_never_carries_a_key(testbed, llmtap, sniffer, extra_address):
    spy = sniffer()
    # The attacker's address is one of the target's: the redirect sends it to the proxy.
    extra_address(spy.address, ANTHROPIC_HOST)
    daemon = llmtap()
    key = real_key("sk-ant-api03-")
    placeholder = set_secret(daemon, "anthropic", key, "--host", ANTHROPIC_HOST, "--header", "x-api-key")
    status, body = curl(testbed, f"http://{spy.address}:443/v1/messages", "-H", f"host: {ANTHROPIC_HOST}",
                        "-H", f"x-api-key: {placeholder}", "-d", "{}")
    assert status == 403 and "only added over HTTPS" in body, body
    assert key.encode() not in spy.received()
    record = record_with_error(daemon, "plain HTTP")
    assert record["credential"] == "anthropic" and record["status"] == 403
    assert_no_real_key_anywhere(daemon, key)


def test_scope_all_sends_no_key_to_another_address_in_clear_or_unverified_tls(testbed, llmtap, sniffer):
    clear, tls = sniffer(), sniffer(tls=True, last_octet=5)
    daemon = llmtap(scope="all")
    key = real_key("sk-ant-api03-")
    placeholder = set_secret(daemon, "anthropic", key, "--host", ANTHROPIC_HOST, "--header", "x-api-key")
    status, body = curl(testbed, f"http://{clear.address}:443/v1/messages", "-H", f"host: {ANTHROPIC_HOST}",
                        "-H", f"x-api-key: {placeholder}", "-d", "{}")
    assert status == 403 and "only added over HTTPS" in body
    # TLS naming the target, to an address whose certificate no root vouches for.
    status, body = curl(testbed, f"https://{ANTHROPIC_HOST}/v1/messages", "--cacert", str(daemon.ca_pem),
                        "--resolve", f"{ANTHROPIC_HOST}:443:{tls.address}",
                        "-H", f"x-api-key: {placeholder}", "-d", "{}")
    assert status == 502, body  # the proxy refused the upstream's certificate
    for spy in (clear, tls):
        assert key.encode() not in spy.received() and b"x-api-key" not in spy.received()
    assert_no_real_key_anywhere(daemon, key)


EXPLICIT = '[explicit]\nlisten = "127.0.0.1:8890"\n'


def test_explicit_listener_adds_no_key_to_absolute_form_plain_http(testbed, llmtap, sniffer):
    spy = sniffer()
    daemon = llmtap(extra_toml=EXPLICIT)
    key = real_key("sk-ant-api03-")
    placeholder = set_secret(daemon, "anthropic", key, "--host", ANTHROPIC_HOST, "--header", "x-api-key")
    status, body = curl(testbed, "-x", "http://127.0.0.1:8890", f"http://{spy.address}:443/v1/messages",
                        "-H", f"host: {ANTHROPIC_HOST}", "-H", f"x-api-key: {placeholder}", "-d", "{}")
    assert status == 403 and "only added over HTTPS" in body, body
    assert key.encode() not in spy.received()
    assert_no_real_key_anywhere(daemon, key)


def s_client(testbed: Testbed, daemon: Daemon, *args: str) -> str:
    done = testbed.client("openssl", "s_client", "-proxy", "127.0.0.1:8890", "-connect",
                          f"{ANTHROPIC_HOST}:443", "-CAfile", str(daemon.ca_pem), *args,
                          input="", check=False, timeout=20)
    return done.stdout + done.stderr


def test_explicit_listener_issues_leaves_only_for_the_connect_host(testbed, llmtap):
    daemon = llmtap(extra_toml=EXPLICIT)
    good = s_client(testbed, daemon, "-servername", ANTHROPIC_HOST)
    assert f"subject=CN = {ANTHROPIC_HOST}" in good or f"CN={ANTHROPIC_HOST}" in good, good
    for attempt in (("-servername", "www.google.com"), ("-servername", "bank.example"),
                    ("-noservername",), ("-servername", "api.openai.com")):
        out = s_client(testbed, daemon, *attempt)
        assert "no peer certificate available" in out, (attempt, out)
    log = daemon.stderr()
    assert "is not the CONNECT host 'api.anthropic.com'" in log
    assert "sent no server name" in log and "Traceback" not in log
    assert json.dumps(daemon.status())  # still running and answering


def test_when_absent_serves_only_the_users_it_names(testbed, llmtap):
    daemon = llmtap()
    key = real_key("sk-ant-api03-")
    done = daemon.llmtap("secrets", "set", "shared", "--host", ANTHROPIC_HOST, "--header", "x-api-key",
                         "--when-absent", "--for-user", "root", input=key + "\n")
    assert "placeholder:" in done.stdout
    ca = testbed.workdir / "llmtap-ca.pem"  # where another user can read it
    ca.write_bytes(daemon.ca_pem.read_bytes())
    ca.chmod(0o644)
    start = len(testbed.upstream_requests())
    url = f"https://{ANTHROPIC_HOST}/v1/models"
    as_nobody = testbed.client("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                               "curl", "-sS", "--max-time", "15", "--cacert", str(ca), url)
    as_root = testbed.client("curl", "-sS", "--max-time", "15", "--cacert", str(ca), url)
    assert as_nobody.returncode == 0 and as_root.returncode == 0
    keys = [r["headers"].get("x-api-key") for r in testbed.upstream_requests()[start:]]
    assert keys == [None, key]  # another local user's request went out without it
    assert "for users: root" in daemon.llmtap("secrets", "list").stdout
    assert_no_real_key_anywhere(daemon, key)


def outputs_of(daemon: Daemon) -> str:
    """Everything llmtap shows of its records: logs, show, export, stats."""
    shown = [daemon.llmtap("logs", "--json").stdout, daemon.llmtap("stats", "--by", "host").stdout,
             daemon.llmtap("export", "--format", "jsonl").stdout,
             daemon.llmtap("export", "--format", "csv").stdout]
    shown += [daemon.llmtap("show", str(r["id"])).stdout for r in daemon.records()]
    return "\n".join(shown)


def test_an_unprefixed_key_is_masked_by_value_in_every_output_and_file(testbed, llmtap):
    # held_key = alert: the key is let through in bodies, so every later stage meets it.
    daemon = llmtap(extra_toml='[dlp.actions]\nheld_key = "alert"\n')
    key = secrets.token_hex(16)  # Azure-style: 32 hex digits, a shape no detector knows
    placeholder = set_secret(daemon, "azure", key, "--host", "api.openai.com", "--header", "api-key")
    ca = daemon.ca_pem
    echoed = testbed.curl("https://api.openai.com/llmtap-test/echo-headers", ca,
                          "-H", f"api-key: {placeholder}").stdout
    assert placeholder in echoed and key not in echoed  # the echo was scrubbed for the client
    chat = {"model": "gpt-4o-mini", "messages": [{"role": "system", "content": f"Use {key}."},
                                                 {"role": "user", "content": f"my key is {key}"}]}
    testbed.curl("https://api.openai.com/v1/chat/completions?t=mask", ca, "-H", f"api-key: {placeholder}",
                  "-H", "content-type: application/json", "-d", json.dumps(chat))
    testbed.curl(f"https://api.openai.com/v1/models?q={key}", ca, "-u", f"someone:{key}")
    records = daemon.records(3)
    assert len(records) == 3 and any(r.get("system_prompt") for r in records)
    forms = encoded_forms(key)
    shown = outputs_of(daemon) + daemon.stderr()
    files = [p for d in (daemon.state_dir, daemon.records_dir) for p in d.rglob("*") if p.is_file()]
    for form in forms:
        assert form not in shown, form
        for path in files:
            assert form.encode() not in path.read_bytes(), (form, path)
    assert "[REDACTED:held_key]" in shown


GZIP_ECHO = """
    import httpx, json, sys
    url, placeholder, ca = sys.argv[1:4]
    out = {}
    for case, extra in (("honoured", {}), ("ignored", {"x-fake-ignore-accept-encoding": "1"})):
        headers = {"x-api-key": placeholder, "accept-encoding": "gzip", "x-fake-encoding": "gzip", **extra}
        text = ""
        try:
            with httpx.stream("GET", url, headers=headers, verify=ca, timeout=20) as response:
                for piece in response.iter_text():  # httpx decodes the gzip as it comes
                    text += piece
        except httpx.HTTPError as exc:
            text += f"<{type(exc).__name__}>"
        out[case] = text
    print(json.dumps(out))
"""


def test_a_key_echoed_in_a_gzip_stream_never_reaches_the_client(testbed, llmtap):
    daemon = llmtap()
    key = real_key("sk-ant-api03-")
    placeholder = set_secret(daemon, "anthropic", key, "--host", ANTHROPIC_HOST, "--header", "x-api-key")
    done = testbed.client(sys.executable, "-c", textwrap.dedent(GZIP_ECHO),
                          f"https://{ANTHROPIC_HOST}/llmtap-test/echo-headers?stream=1", placeholder,
                          str(daemon.ca_pem))
    out = json.loads(done.stdout)
    assert key not in done.stdout and key[:24] not in done.stdout
    assert placeholder in out["honoured"] and "event: done" in out["honoured"]  # scrubbed, whole
    assert placeholder not in out["ignored"] and "event: done" not in out["ignored"]  # cut
    assert "echoed a real key in a gzip-encoded stream" in daemon.stderr()
    sent = [r for r in testbed.upstream_requests() if "echo-headers" in r.get("path", "")]
    assert [r["headers"].get("accept-encoding") for r in sent] == ["identity", "identity"]
    assert_no_real_key_anywhere(daemon, key)
