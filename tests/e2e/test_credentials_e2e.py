"""Credential injection end to end: real clients hold only the placeholders `llmtap env` prints.

The fake upstream logs every request it gets (headers included), so each test can see which key
reached the "provider"; at the end, no real key may be in any file llmtap wrote or in its stderr.
"""

from __future__ import annotations

import json
import pwd
import re
import secrets
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from testbed import LLMTAP, Daemon, Testbed, clean_env

pytestmark = pytest.mark.root

ECHO = "https://api.anthropic.com/llmtap-test/echo-headers"


def real_key(prefix: str) -> str:
    """Fresh per test, so a grep for it means something."""
    return f"{prefix}REAL{secrets.token_hex(24)}"


def set_secret(daemon: Daemon, name: str, value: str, *args: str) -> str:
    out = daemon.llmtap("secrets", "set", name, *args, input=value + "\n").stdout
    match = re.search(r"placeholder: (\S+)", out)
    assert match, out
    return match.group(1)


def exports(daemon: Daemon) -> dict[str, str]:
    lines = daemon.llmtap("env").stdout.splitlines()
    return dict(re.fullmatch(r"export (\w+)='([^']*)'", line).groups()  # type: ignore[union-attr]
                for line in lines if line.startswith("export "))


def requests_since(testbed: Testbed, start: int) -> list[dict]:  # type: ignore[type-arg]
    return testbed.upstream_requests()[start:]


def sent_key(request: dict) -> str | None:  # type: ignore[type-arg]
    """The key the upstream received, wherever the client put it."""
    headers = request["headers"]
    bearer = headers.get("authorization", "").removeprefix("Bearer ")
    return headers.get("x-api-key") or headers.get("x-goog-api-key") or bearer or None


def assert_no_real_key_anywhere(daemon: Daemon, *keys: str) -> None:
    """No real key in any file under state_dir or records_dir, nor in the daemon's stderr."""
    files = [p for d in (daemon.state_dir, daemon.records_dir) for p in d.rglob("*") if p.is_file()]
    assert any(p.name == "secrets.json" for p in files)  # the store itself is among them
    for key in keys:
        for path in files:
            assert key.encode() not in path.read_bytes(), f"{key[:12]}… found in {path}"
        assert key not in daemon.stderr()


def sdk_env(daemon: Daemon, env: dict[str, str]) -> dict[str, str]:
    """What a user's shell would hold after `eval "$(llmtap env)"`: placeholders only."""
    return {**env, "ANTHROPIC_BASE_URL": "https://api.anthropic.com",
            "OPENAI_BASE_URL": "https://api.openai.com/v1", "SSL_CERT_FILE": str(daemon.ca_pem)}


ANTHROPIC_SDK = """
    import anthropic, json, os
    client = anthropic.Anthropic(http_client=anthropic.DefaultHttpxClient(verify=os.environ["SSL_CERT_FILE"]),
                                 max_retries=0)
    message = client.messages.create(model="claude-sonnet-4-5", max_tokens=32,
                                     messages=[{"role": "user", "content": "hi"}])
    with client.messages.stream(model="claude-sonnet-4-5", max_tokens=32,
                                messages=[{"role": "user", "content": "hi"}]) as stream:
        streamed = stream.get_final_text()
    print(json.dumps([message.content[0].text, streamed]))
"""

OPENAI_SDK = """
    import openai, json, os
    client = openai.OpenAI(http_client=openai.DefaultHttpxClient(verify=os.environ["SSL_CERT_FILE"]),
                           max_retries=0)
    chunks = client.chat.completions.create(model="gpt-4o-mini", stream=True,
                                            messages=[{"role": "user", "content": "hi"}])
    print(json.dumps("".join(c.choices[0].delta.content or "" for c in chunks if c.choices)))
"""

WEBSOCKET_UPGRADE = """
    import base64, os, socket, ssl
    context = ssl.create_default_context(cafile=os.environ["SSL_CERT_FILE"])
    with socket.create_connection(("api.openai.com", 443)) as raw:
        with context.wrap_socket(raw, server_hostname="api.openai.com") as tls:
            key = base64.b64encode(os.urandom(16)).decode()
            token = os.environ["OPENAI_API_KEY"]
            lines = ["GET /v1/responses HTTP/1.1", "Host: api.openai.com", "Upgrade: websocket",
                     "Connection: Upgrade", f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13",
                     f"Authorization: Bearer {token}", "", ""]
            tls.sendall("\\r\\n".join(lines).encode())
            print(tls.recv(4096).decode().split("\\r\\n")[0])
"""


def test_tools_hold_placeholders_and_the_upstream_gets_the_real_key(testbed, llmtap):
    daemon = llmtap()
    keys = {"anthropic": real_key("sk-ant-api03-"), "openai": real_key("sk-proj-"),
            "gemini": real_key("AIza")}
    set_secret(daemon, "anthropic", keys["anthropic"], "--host", "api.anthropic.com")
    set_secret(daemon, "openai", keys["openai"], "--host", "api.openai.com")
    set_secret(daemon, "gemini", keys["gemini"], "--host", "generativelanguage.googleapis.com")
    llmtap_gid = pwd.getpwnam("llmtap").pw_gid
    secrets_dir = daemon.state_dir / "secrets"
    for path, mode in ((secrets_dir, 0o750), (secrets_dir / "secrets.json", 0o640),
                       (secrets_dir / "store.key", 0o640)):  # root's; the worker reads as its group
        info = path.stat()
        assert (info.st_uid, info.st_gid, info.st_mode & 0o777) == (0, llmtap_gid, mode)
    env = exports(daemon)
    assert set(env) == {"ANTHROPIC_API_KEY", "OPENAI_API_KEY", "CODEX_API_KEY", "GEMINI_API_KEY",
                        "GOOGLE_API_KEY"}
    assert env["ANTHROPIC_API_KEY"].startswith("sk-ant-api03-") and env["GEMINI_API_KEY"].startswith("AIza")
    assert not set(env.values()) & set(keys.values())

    # The official SDKs, configured by the environment alone (JSON and streamed).
    start = len(testbed.upstream_requests())
    texts = json.loads(testbed.python(ANTHROPIC_SDK, env=sdk_env(daemon, env)).stdout)
    assert all(texts)
    assert json.loads(testbed.python(OPENAI_SDK, env=sdk_env(daemon, env)).stdout)
    seen = requests_since(testbed, start)
    # (This SDK version sends its key as `Authorization: Bearer`; older ones as `x-api-key`.)
    assert [sent_key(r) for r in seen if r["path"] == "/v1/messages"] == [keys["anthropic"]] * 2
    assert [r["headers"].get("authorization") for r in seen if r["path"] == "/v1/chat/completions"] == \
        [f"Bearer {keys['openai']}"]

    # curl over HTTP/2 with x-goog-api-key, HTTP/1.1 with ?key=, and a WebSocket upgrade.
    start = len(testbed.upstream_requests())
    gemini = "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.0-flash:generateContent"
    body = '{"contents": [{"parts": [{"text": "hi"}]}]}'
    over_h2 = testbed.curl(gemini, daemon.ca_pem, "--http2", "-H", f"x-goog-api-key: {env['GEMINI_API_KEY']}",
                           "-H", "content-type: application/json", "-d", body, "-o", "/dev/null",
                           "-w", "%{http_version}")
    assert over_h2.stdout == "2"
    testbed.curl(f"https://generativelanguage.googleapis.com/v1beta/models?key={env['GOOGLE_API_KEY']}",
                 daemon.ca_pem, "--http1.1")
    upgrade = testbed.python(WEBSOCKET_UPGRADE, env=sdk_env(daemon, env)).stdout.strip()
    assert upgrade.startswith("HTTP/1.1 101")
    seen = requests_since(testbed, start)
    # (HTTP/2 with the proxy; upstream connections speak HTTP/1.1: llmtap.upstream_pool)
    assert seen[0]["http_version"] == "1.1" and seen[0]["headers"]["x-goog-api-key"] == keys["gemini"]
    assert seen[1]["query"] == f"key={keys['gemini']}"
    assert seen[2]["path"] == "/v1/responses"
    assert seen[2]["headers"]["authorization"] == f"Bearer {keys['openai']}"

    # A placeholder sent to a host its secret is not bound to: blocked, in that provider's shape.
    start = len(testbed.upstream_requests())
    wrong = testbed.curl("https://api.openai.com/v1/chat/completions", daemon.ca_pem,
                         "-H", f"x-api-key: {env['ANTHROPIC_API_KEY']}", "-d", "{}", "-w", "\n%{http_code}")
    blocked_body, status = wrong.stdout.rsplit("\n", 1)
    assert status == "403"
    assert json.loads(blocked_body)["error"]["code"] == "llmtap_credential_blocked"
    wrong = testbed.curl("https://api.anthropic.com/v1/messages", daemon.ca_pem,
                         "-H", f"authorization: Bearer {env['OPENAI_API_KEY']}", "-d", "{}")
    assert json.loads(wrong.stdout)["error"]["type"] == "permission_error"
    assert requests_since(testbed, start) == []  # nothing, let alone the real key, went out

    # An upstream echoing the key back: the client gets the placeholder (headers, JSON, stream).
    echoed = testbed.curl(ECHO, daemon.ca_pem, "-i", "--http1.1",
                          "-H", f"x-api-key: {env['ANTHROPIC_API_KEY']}").stdout
    streamed = testbed.curl(f"{ECHO}?stream=1", daemon.ca_pem, "-i", "-N", "--http2",
                            "-H", f"x-api-key: {env['ANTHROPIC_API_KEY']}").stdout
    assert testbed.upstream_requests()[-1]["headers"]["x-api-key"] == keys["anthropic"]
    for text in (echoed, streamed):
        assert f"x-echo-x-api-key: {env['ANTHROPIC_API_KEY']}" in text
        assert f'"x-api-key": "{env["ANTHROPIC_API_KEY"]}"' in text
        assert keys["anthropic"] not in text
    assert "event: done" in streamed

    # A client holding the real key is flagged (and still served).
    testbed.curl("https://api.anthropic.com/v1/models", daemon.ca_pem,
                 "-H", f"x-api-key: {keys['anthropic']}")
    assert "a client sent the real key of secret 'anthropic'" in daemon.stderr()

    records = daemon.records(expected=11)  # every exchange above, blocked ones included
    by_path = {}
    for record in records:
        by_path.setdefault(record["path"].split("?")[0], []).append(record)
    assert {r["credential"] for r in by_path["/v1/messages"]} >= {"anthropic", "openai"}
    assert any(r["status"] == 403 and "blocked" in (r["error"] or "") for r in by_path["/v1/messages"])
    assert by_path["/v1/models"][-1]["credential_alerts"][0]["secret"] == "anthropic"
    listed = {row["name"]: row for row in json.loads(daemon.llmtap("secrets", "list", "--json").stdout)}
    assert listed["anthropic"]["last_used"] and listed["anthropic"]["key"] == "…" + keys["anthropic"][-4:]
    daemon.stop()
    assert_no_real_key_anywhere(daemon, *keys.values())


def test_rotation_applies_to_the_next_request_and_open_streams_go_on(testbed, llmtap):
    daemon = llmtap()
    first, second = real_key("sk-ant-api03-"), real_key("sk-ant-api03-")
    placeholder = set_secret(daemon, "anthropic", first, "--host", "api.anthropic.com")
    worker = daemon.status()["worker_pid"]
    start = len(testbed.upstream_requests())
    stream = subprocess.Popen(
        ["ip", "netns", "exec", testbed.client_ns, "curl", "-sS", "-N", "-i", "--max-time", "60",
         "--cacert", str(daemon.ca_pem), "-H", f"x-api-key: {placeholder}", f"{ECHO}?stream=1&pause=0.5"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env())
    try:
        deadline = time.monotonic() + 20
        while not requests_since(testbed, start) and time.monotonic() < deadline:
            time.sleep(0.05)
        rotated = daemon.llmtap("secrets", "set", "anthropic", "--replace", input=second).stdout
        assert f"placeholder: {placeholder}" in rotated
        testbed.curl("https://api.anthropic.com/v1/models", daemon.ca_pem, "-H", f"x-api-key: {placeholder}")
        assert stream.poll() is None, "the stream should still be open after the rotation"
        out, err = stream.communicate(timeout=60)
    finally:
        stream.kill()
    assert stream.returncode == 0, err
    seen = requests_since(testbed, start)
    assert [r["headers"]["x-api-key"] for r in seen] == [first, second]
    assert "event: done" in out and placeholder in out and first not in out
    assert daemon.status()["worker_pid"] == worker  # no restart
    daemon.stop()
    assert_no_real_key_anywhere(daemon, first, second)


KEYRING_BACKEND = """
import json, os
from keyring.backend import KeyringBackend

class FileKeyring(KeyringBackend):
    priority = 1

    def get_password(self, service, username):
        with open(os.environ["LLMTAP_E2E_KEYRING"]) as entries:
            return json.load(entries).get(f"{service}/{username}")

    def set_password(self, service, username, password):
        raise NotImplementedError

    def delete_password(self, service, username):
        raise NotImplementedError
"""


@contextmanager
def restarted(daemon: Daemon, env: dict[str, str], wait: bool = True) -> Iterator[Daemon]:
    """The same state, records and config, in a new `llmtap run` with extra environment."""
    daemon.stop()
    with open(daemon.stderr_path, "ab") as stderr:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", daemon.bed.client_ns, LLMTAP, "run", "--config", str(daemon.config_path)],
            stdout=stderr, stderr=stderr, env=clean_env(env))
    again = Daemon(daemon.bed, daemon.root, proc, daemon.config_path)
    try:
        if wait:
            again.wait_ready()
        yield again
    finally:
        if proc.poll() is None:
            again.stop()


def test_references_are_resolved_at_start_by_root_and_bad_stores_refused(testbed, llmtap):
    daemon = llmtap()
    values = {"env": real_key("sk-ant-api03-"), "file": real_key("sk-proj-"), "keyring": real_key("AIza")}
    private = daemon.root / "root-only"  # the worker (user llmtap) cannot read anything in here
    private.mkdir(mode=0o700)
    (private / "openai.key").write_text(values["file"] + "\n")
    (private / "openai.key").chmod(0o600)
    (private / "keyring_e2e.py").write_text(KEYRING_BACKEND)
    (private / "keyring.json").write_text(json.dumps({"llmtap-e2e/gemini": values["keyring"]}))
    ph = {
        "env": set_secret(daemon, "from-env", "env:LLMTAP_E2E_KEY", "--host", "api.anthropic.com"),
        "file": set_secret(daemon, "from-file", f"file:{private / 'openai.key'}", "--host", "api.openai.com"),
        "keyring": set_secret(daemon, "from-keyring", "keyring:llmtap-e2e/gemini",
                              "--host", "generativelanguage.googleapis.com"),
        "missing": set_secret(daemon, "missing", "env:LLMTAP_E2E_UNSET", "--host", "api.anthropic.com"),
    }
    listed = daemon.llmtap("secrets", "list").stdout
    assert "env:LLMTAP_E2E_KEY" in listed and "keyring:llmtap-e2e/gemini" in listed
    # Only the daemon's environment has the variable: the CLI never resolves references.
    daemon_env = {"LLMTAP_E2E_KEY": values["env"], "PYTHONPATH": str(private),
                  "PYTHON_KEYRING_BACKEND": "keyring_e2e.FileKeyring",
                  "LLMTAP_E2E_KEYRING": str(private / "keyring.json")}
    start = len(testbed.upstream_requests())
    with restarted(daemon, daemon_env) as running:
        testbed.curl("https://api.anthropic.com/v1/models", running.ca_pem, "-H", f"x-api-key: {ph['env']}")
        testbed.curl("https://api.openai.com/v1/models", running.ca_pem,
                     "-H", f"authorization: Bearer {ph['file']}")
        testbed.curl("https://generativelanguage.googleapis.com/v1beta/models", running.ca_pem,
                     "-H", f"x-goog-api-key: {ph['keyring']}")
        missing = testbed.curl("https://api.anthropic.com/v1/models", running.ca_pem,
                               "-H", f"x-api-key: {ph['missing']}")
        assert "secret 'missing' has no value (cannot resolve env:LLMTAP_E2E_UNSET: not set in the " \
               "daemon's environment)" in json.loads(missing.stdout)["error"]["message"]
        assert "secret 'missing': cannot resolve env:LLMTAP_E2E_UNSET" in running.stderr()
    seen = requests_since(testbed, start)
    assert [sent_key(r) for r in seen] == [values["env"], values["file"], values["keyring"]]

    store_file = daemon.state_dir / "secrets" / "secrets.json"
    store_file.chmod(0o644)
    fix = (f"refusing the secret store: {store_file} is mode 0644 (must be root's, group llmtap, "
           f"0640); fix: sudo chown root:llmtap {store_file} && sudo chmod 640 {store_file}")
    listing = daemon.llmtap("secrets", "list", check=False)
    assert (listing.returncode, listing.stderr.strip()) == (2, f"llmtap: {fix}")
    with restarted(daemon, daemon_env, wait=False) as refused:
        assert refused.proc.wait(timeout=30) == 2
        assert refused.stderr().strip().splitlines()[-1] == f"llmtap: {fix}"
    store_file.chmod(0o640)
    assert_no_real_key_anywhere(daemon, *values.values())


def test_a_reference_planted_by_the_service_user_is_never_resolved_by_root(testbed, llmtap):
    """The service user (the worker, if compromised) writes a store whose reference names a file
    only root may read: root must not read it for them, nor inject it anywhere."""
    daemon = llmtap()
    loot = real_key("sk-ant-api03-")
    private = daemon.root / "root-only"
    private.mkdir(mode=0o700)
    (private / "shadow").write_text(loot + "\n")
    ph = set_secret(daemon, "planted", "env:LLMTAP_E2E_UNUSED", "--host", "api.anthropic.com")
    secrets_dir = daemon.state_dir / "secrets"
    store_file = secrets_dir / "secrets.json"
    document = json.loads(store_file.read_text())
    document["secrets"][0]["ref"] = f"file:{private / 'shadow'}"
    llmtap_user = pwd.getpwnam("llmtap")
    as_service_user = ["setpriv", f"--reuid={llmtap_user.pw_uid}", f"--regid={llmtap_user.pw_gid}",
                       "--clear-groups", "sh", "-c", 'umask 077; cat > "$0.new" && mv "$0.new" "$0"',
                       str(store_file)]
    secrets_dir.chmod(0o770)  # what a store the service user could write looks like
    subprocess.run(as_service_user, input=json.dumps(document), text=True, check=True)
    secrets_dir.chmod(0o750)
    assert store_file.stat().st_uid == llmtap_user.pw_uid  # planted: now the service user's file
    start = len(testbed.upstream_requests())
    with restarted(daemon, {}) as running:
        refused = testbed.curl("https://api.anthropic.com/v1/models", running.ca_pem,
                               "-H", f"x-api-key: {ph}")
        message = json.loads(refused.stdout)["error"]["message"]
        assert "not resolved with root's rights" in message and "can be written by someone other" in message
    assert all(sent_key(r) != loot for r in requests_since(testbed, start))
    assert_no_real_key_anywhere(daemon, loot)
