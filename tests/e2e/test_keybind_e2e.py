"""Keys bound to programs, end to end: only the executables, scripts and users a secret names get
its real key; anyone else sending its placeholder gets a 403 naming the rule and the upstream
sees nothing. Clients run in the test bed's client namespace with no proxy variables."""

from __future__ import annotations

import json
import shutil
import sys
import textwrap
from pathlib import Path

import pytest
from test_claude_code_e2e import CLAUDE
from test_credentials_e2e import assert_no_real_key_anywhere, real_key, sent_key, set_secret
from testbed import Daemon, Testbed

pytestmark = pytest.mark.root

ECHO = "https://api.anthropic.com/llmtap-test/echo-headers"

CLIENT = """
    import os, ssl, sys, urllib.error, urllib.request
    request = urllib.request.Request(os.environ["URL"], headers={"x-api-key": os.environ["KEY"]})
    context = ssl.create_default_context(cafile=os.environ["CA"])
    try:
        with urllib.request.urlopen(request, context=context, timeout=20) as response:
            print(response.status, response.read().decode())
    except urllib.error.HTTPError as exc:
        print(exc.code, exc.read().decode())
"""


def curl_as(testbed: Testbed, program: str, ca: Path, placeholder: str, *prefix: str,
            url: str = ECHO, http2: bool = False) -> tuple[int, str]:
    """(status, body) of one request `program` (a curl) makes with the placeholder."""
    done = testbed.client(*prefix, program, "-sS", "--max-time", "20", "--cacert", str(ca),
                          "--http2" if http2 else "--http1.1", "-w", "\n%{http_code}",
                          "-H", f"x-api-key: {placeholder}", url)
    body, _, status = done.stdout.rpartition("\n")
    return int(status), body


def refused(body: str, secret: str) -> str:
    error = json.loads(body)["error"]
    assert error["type"] == "permission_error"  # Anthropic's shape: the SDKs raise PermissionDenied
    assert error["message"].startswith(f"llmtap refused the key of secret '{secret}': it is only added for ")
    return str(error["message"])


@pytest.fixture
def bed(testbed: Testbed, llmtap) -> tuple[Testbed, Daemon, Path]:  # type: ignore[no-untyped-def]
    daemon = llmtap()
    ca = testbed.workdir / "keybind-ca.pem"  # where another user can read it
    ca.write_bytes(daemon.ca_pem.read_bytes())
    ca.chmod(0o644)
    return testbed, daemon, ca


def test_only_the_bound_executable_gets_the_key(bed):
    testbed, daemon, ca = bed
    tools = testbed.workdir / "keybind-tools"
    tools.mkdir(exist_ok=True)
    allowed = tools / "allowed-curl"
    shutil.copy2(shutil.which("curl") or "/usr/bin/curl", allowed)
    key = real_key("sk-ant-api03-")
    placeholder = set_secret(daemon, "bound", key, "--host", "api.anthropic.com", "--allow-exe", str(allowed))
    listed = daemon.llmtap("secrets", "list").stdout
    assert f"bound to:    programs {allowed}" in listed

    # The bound program, over HTTP/1.1 and HTTP/2, and through a symlink to it: the real key.
    link_to_allowed = tools / "via-link"
    link_to_allowed.symlink_to(allowed)
    start = len(testbed.upstream_requests())
    for program, http2 in ((allowed, False), (allowed, True), (link_to_allowed, False)):
        status, body = curl_as(testbed, str(program), ca, placeholder, http2=http2)
        assert status == 200, body
    seen = testbed.upstream_requests()[start:]
    assert [sent_key(r) for r in seen] == [key] * 3

    # Anyone else: plain curl, a symlink named like the allowed one that points elsewhere,
    # a copy of the allowed binary at another path. The upstream sees none of them.
    impostor = tools / "impostor" / "allowed-curl"
    impostor.parent.mkdir(exist_ok=True)
    impostor.symlink_to(shutil.which("curl") or "/usr/bin/curl")
    copy = tools / "copy-of-allowed-curl"
    shutil.copy2(allowed, copy)
    start = len(testbed.upstream_requests())
    for program, http2 in (("curl", False), ("curl", True), (str(impostor), False), (str(copy), False)):
        status, body = curl_as(testbed, program, ca, placeholder, http2=http2)
        assert status == 403, body
        message = refused(body, "bound")
        assert f"programs {allowed}, and it came from " in message
    assert testbed.upstream_requests()[start:] == []

    decisions = [r.get("credential_decision") for r in daemon.records(expected=7)]
    assert [d["decision"] for d in decisions if d] == ["injected"] * 3 + ["refused"] * 4
    assert all(d["rule"] == f"programs {allowed}" for d in decisions if d)
    assert "/curl (pid " in next(d["reason"] for d in decisions if d and d["decision"] == "refused")
    assert_no_real_key_anywhere(daemon, key)


def test_an_interpreter_gets_the_key_only_for_the_bound_script(bed):
    testbed, daemon, ca = bed
    scripts = testbed.workdir / "keybind-scripts"
    scripts.mkdir(exist_ok=True)
    good, evil = scripts / "agent.py", scripts / "evil.py"
    for path in (good, evil):
        path.write_text(textwrap.dedent(CLIENT))
    key = real_key("sk-ant-api03-")
    placeholder = set_secret(daemon, "agent", key, "--host", "api.anthropic.com",
                             "--allow-script", f"{sys.executable}:{good}")
    env = {"URL": ECHO, "KEY": placeholder, "CA": str(ca)}
    start = len(testbed.upstream_requests())
    status, _, body = testbed.client(sys.executable, str(good), env=env).stdout.partition(" ")
    assert status == "200", body
    assert [sent_key(r) for r in testbed.upstream_requests()[start:]] == [key]

    # The same interpreter running another script, the script's code given with -c, or the
    # bound script behind an option that runs other code first: refused, nothing goes out.
    start = len(testbed.upstream_requests())
    for argv in ((str(evil),), ("-c", textwrap.dedent(CLIENT)), ("-W", "ignore", str(good))):
        status, _, body = testbed.client(sys.executable, *argv, env=env).stdout.partition(" ")
        assert status == "403", body
        refused(body, "agent")
    assert testbed.upstream_requests()[start:] == []
    assert_no_real_key_anywhere(daemon, key)


def test_another_users_process_is_refused_and_unbound_secrets_are_unchanged(bed):
    testbed, daemon, ca = bed
    key, free_key = real_key("sk-ant-api03-"), real_key("sk-proj-")
    placeholder = set_secret(daemon, "roots", key, "--host", "api.anthropic.com", "--allow-user", "root")
    free = set_secret(daemon, "free", free_key, "--host", "api.openai.com")
    assert "bound to:    users root" in daemon.llmtap("secrets", "list").stdout

    start = len(testbed.upstream_requests())
    assert curl_as(testbed, "curl", ca, placeholder)[0] == 200
    as_nobody = ("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups")
    status, body = curl_as(testbed, "curl", ca, placeholder, *as_nobody)
    assert status == 403
    assert "only added for users root, and it came from " in refused(body, "roots")
    assert "user nobody)" in body
    # The unbound secret: anyone's placeholder still becomes the key, with no decision recorded.
    done = testbed.client(*as_nobody, "curl", "-sS", "--max-time", "20", "--cacert", str(ca),
                          "-H", f"authorization: Bearer {free}", "https://api.openai.com/llmtap-test/echo-headers")
    assert json.loads(done.stdout)["headers"]["authorization"] == f"Bearer {free}"  # echo scrubbed
    seen = testbed.upstream_requests()[start:]
    assert [sent_key(r) for r in seen] == [key, free_key]
    records = daemon.records(expected=3)
    free_record = next(r for r in records if r["credential"] == "free")
    assert "credential_decision" not in free_record
    assert_no_real_key_anywhere(daemon, key, free_key)


HAND_OFF = """
    import os, socket, ssl, subprocess, sys, time
    # The socket is made first and handed to the bound program (which only sleeps); then this
    # process connects and writes the request itself, hoping to be taken for its child.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    child = subprocess.Popen([os.environ["ALLOWED"], "30"], pass_fds=[sock.fileno()])
    time.sleep(0.5)
    sock.connect(("api.anthropic.com", 443))
    time.sleep(0.5)
    context = ssl.create_default_context(cafile=os.environ["CA"])
    with context.wrap_socket(sock, server_hostname="api.anthropic.com") as tls:
        tls.sendall(("GET /llmtap-test/echo-headers HTTP/1.1\\r\\nHost: api.anthropic.com\\r\\n"
                     f"x-api-key: {os.environ['KEY']}\\r\\nConnection: close\\r\\n\\r\\n").encode())
        print(tls.recv(65536).decode().split("\\r\\n")[0])
    child.kill()
"""

WEBSOCKET_UPGRADE = """
    import base64, os, socket, ssl
    context = ssl.create_default_context(cafile=os.environ["CA"])
    with socket.create_connection(("api.openai.com", 443)) as raw:
        with context.wrap_socket(raw, server_hostname="api.openai.com") as tls:
            lines = ["GET /v1/responses HTTP/1.1", "Host: api.openai.com", "Upgrade: websocket",
                     "Connection: Upgrade", f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}",
                     "Sec-WebSocket-Version: 13", f"Authorization: Bearer {os.environ['KEY']}", "", ""]
            tls.sendall("\\r\\n".join(lines).encode())
            print(tls.recv(4096).decode().split("\\r\\n")[0])
"""


def test_a_socket_handed_to_the_bound_program_and_a_websocket_from_another_are_refused(bed):
    testbed, daemon, ca = bed
    allowed = testbed.workdir / "keybind-tools" / "allowed-sleep"
    allowed.parent.mkdir(exist_ok=True)
    shutil.copy2(shutil.which("sleep") or "/usr/bin/sleep", allowed)
    key, openai_key = real_key("sk-ant-api03-"), real_key("sk-proj-")
    placeholder = set_secret(daemon, "handed", key, "--host", "api.anthropic.com",
                             "--allow-exe", str(allowed))
    openai = set_secret(daemon, "ws", openai_key, "--host", "api.openai.com", "--allow-exe", str(allowed))
    start = len(testbed.upstream_requests())
    env = {"ALLOWED": str(allowed), "KEY": placeholder, "CA": str(ca)}
    assert testbed.python(HAND_OFF, env=env).stdout.strip() == "HTTP/1.1 403 Forbidden"
    env = {"KEY": openai, "CA": str(ca)}
    assert testbed.python(WEBSOCKET_UPGRADE, env=env).stdout.strip() == "HTTP/1.1 403 Forbidden"
    assert testbed.upstream_requests()[start:] == []
    reasons = [r["credential_decision"]["reason"] for r in daemon.records(expected=2)]
    assert any(r.startswith("the connection is shared with its parent process") for r in reasons)
    assert_no_real_key_anywhere(daemon, key, openai_key)



def test_claude_code_bound_to_its_binary_works_and_shows_a_refusal_to_another_program(bed, tmp_path):
    """The real Claude Code (its native binary): bound to it, its turn goes through with the real
    key; a node script holding the same placeholder is refused, nothing reaching the upstream."""
    testbed, daemon, ca = bed
    if not CLAUDE.exists():
        pytest.fail(f"{CLAUDE} is missing: scripts/test.sh installs it (npm ci in tests/clis)")
    key = real_key("sk-ant-api03-")
    placeholder = set_secret(daemon, "claude", key, "--host", "api.anthropic.com", "--allow-exe", str(CLAUDE))
    home = tmp_path / "home"
    home.mkdir()
    start = len(testbed.upstream_requests())
    result = testbed.client(str(CLAUDE), "-p", "Say hello.", "--output-format", "json", timeout=120,
                            env={"HOME": str(home), "ANTHROPIC_API_KEY": placeholder,
                                 "NODE_EXTRA_CA_CERTS": str(ca),
                                 "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1"})
    assert json.loads(result.stdout)["is_error"] is False, result.stdout
    calls = [r for r in testbed.upstream_requests()[start:] if r["path"].startswith("/v1/messages")]
    assert calls and all(sent_key(r) == key for r in calls)

    script = tmp_path / "other.mjs"
    script.write_text(
        "const r = await fetch('https://api.anthropic.com/v1/messages', {method: 'POST', headers: "
        "{'x-api-key': process.env.KEY, 'content-type': 'application/json', 'anthropic-version': "
        "'2023-06-01'}, body: JSON.stringify({model: 'claude-sonnet-4-5', max_tokens: 8, messages: "
        "[{role: 'user', content: 'hi'}]})});\nconsole.log(r.status, await r.text());\n")
    start = len(testbed.upstream_requests())
    done = testbed.client(shutil.which("node") or "node", str(script),
                          env={"KEY": placeholder, "NODE_EXTRA_CA_CERTS": str(ca)})
    status, _, body = done.stdout.strip().partition(" ")
    assert status == "403", done.stdout
    assert f"only added for programs {CLAUDE.resolve()}, and it came from " in refused(body, "claude")
    assert testbed.upstream_requests()[start:] == []
    assert_no_real_key_anywhere(daemon, key)
