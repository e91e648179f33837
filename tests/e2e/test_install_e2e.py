"""`sudo llmtap install` for real, end to end, without touching the host.

The install runs in a private mount namespace inside the test bed's client network namespace:
/etc is a bind-mounted copy and so is /usr/local/share/ca-certificates, so the real
update-ca-certificates trusts and untrusts the CA in the copies only, useradd edits the copy's
passwd, and the detached service (no systemd here) taps the client namespace only. The host's
trust store, /etc/profile.d and services are checked unchanged at the end.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from testbed import LLMTAP, Testbed, clean_env, make_workdir, sh, write_config

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(not shutil.which("update-ca-certificates") or not shutil.which("nsenter"),
                       reason="needs update-ca-certificates (ca-certificates) and nsenter"),
]
# The runtimes doctor must find trusting the CA (node: apt-get install nodejs).
RUNTIMES = tuple(name for name in ("curl", "python3", "node", "java") if shutil.which(name))

SHADOW_BACKUPS = ("passwd-", "group-", "shadow-", "gshadow-")  # shadow-utils' own backups
# This machine's environment points every runtime at a CA file of its own: the tests run without
# them, so what trusts llmtap's CA is the store and /etc/profile.d/llmtap.sh, nothing ambient.
CA_VARIABLES = ("SSL_CERT_FILE", "SSL_CERT_DIR", "NODE_EXTRA_CA_CERTS", "REQUESTS_CA_BUNDLE",
                "CURL_CA_BUNDLE", "CODEX_CA_CERTIFICATE")
HOST_PATHS = ("/etc/ssl/certs", "/usr/local/share/ca-certificates", "/etc/profile.d",
              "/etc/environment.d", "/etc/systemd/system", "/etc/llmtap", "/var/lib/llmtap",
              "/var/lib/ca-certificates-java", "/var/log/llmtap.log")


def plain_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {k: v for k, v in clean_env(extra).items() if k not in CA_VARIABLES}


def keystore_entries(keystore: Path) -> str:
    """A Java keystore's content as keytool shows it: each alias with its certificate."""
    listed = sh("keytool", "-list", "-rfc", "-keystore", str(keystore), "-storepass", "changeit").stdout
    entries = re.split(r"\n(?=Alias name: )", listed)[1:]
    return hashlib.sha256("".join(sorted(entries)).encode()).hexdigest()


def listing(*tops: Path) -> dict[str, tuple[object, ...]]:
    """Every path under `tops`: type and mode, owner, and content (symlinks by target)."""
    entries: dict[str, tuple[object, ...]] = {}
    for top in tops:
        if not top.exists() and not top.is_symlink():
            continue
        for path in [top, *(top.rglob("*") if top.is_dir() and not top.is_symlink() else [])]:
            if path.name in SHADOW_BACKUPS:
                continue
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                content = os.readlink(path)
            elif path.name == "cacerts" and path.parent.name == "java":
                content = keystore_entries(path)  # keytool rewrites the file: its bytes change
            elif stat.S_ISREG(st.st_mode):
                content = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                content = ""
            entries[str(path)] = (stat.filemode(st.st_mode), st.st_uid, st.st_gid, content)
    return entries


class Sandbox:
    """A private mount namespace in the client network namespace, held open by `sleep`."""

    def __init__(self, bed: Testbed, workdir: Path) -> None:
        self.workdir = workdir
        self.holder = subprocess.Popen(
            ["ip", "netns", "exec", bed.client_ns, "unshare", "--mount", "--propagation",
             "private", "sleep", "infinity"])
        deadline = time.monotonic() + 10
        while Path(f"/proc/{self.holder.pid}/comm").read_text().strip() != "sleep":
            assert time.monotonic() < deadline, "the sandbox did not start"
            time.sleep(0.02)
        self.etc, self.anchors = workdir / "etc", workdir / "local-ca"
        # update.d's hook (ca-certificates-java) would queue work outside /etc: emptied here. The
        # copy is brought to update-ca-certificates' own state first (a store edited by hand, as
        # this host's is, would be normalised by the first run, whoever runs it).
        self.run("sh", "-c", textwrap.dedent(f"""\
            set -e
            cp -a /etc {self.etc} && mount --bind {self.etc} /etc
            rm -f /etc/ca-certificates/update.d/*
            mkdir {self.anchors} && cp -a /usr/local/share/ca-certificates/. {self.anchors}/
            mount --bind {self.anchors} /usr/local/share/ca-certificates
            update-ca-certificates >/dev/null
            host_uid=$(getent passwd llmtap | cut -d: -f3)
            if [ -n "$host_uid" ]; then userdel --force llmtap; fi
            if getent group llmtap >/dev/null; then groupdel llmtap; fi
            # The host's llmtap processes (other tests) keep their uid busy: install gets another.
            if [ -n "$host_uid" ]; then
              useradd --system --no-create-home --uid "$host_uid" --user-group host-llmtap-uid
            fi
        """))

    def run(self, *args: str, check: bool = True, env: dict[str, str] | None = None
            ) -> subprocess.CompletedProcess[str]:
        return sh("nsenter", "-t", str(self.holder.pid), "-m", "-n", "--", *args, check=check,
                  env=plain_env(env), timeout=180)

    def llmtap(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run(LLMTAP, *args, "--config", str(self.workdir / "config.toml"), check=check)

    def close(self) -> None:
        self.holder.kill()
        self.holder.wait()


@pytest.fixture
def sandbox(testbed: Testbed) -> Iterator[Sandbox]:
    workdir = make_workdir()
    box = Sandbox(testbed, workdir)
    try:
        yield box
    finally:
        pidfile = workdir / "run/service.pid"
        with contextlib.suppress(OSError, ValueError):
            for pid in map(int, pidfile.read_text().split()):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        box.close()
        testbed.ns_exec(testbed.client_ns, "nft", "delete", "table", "inet", "llmtap", check=False)
        sh("rm", "-rf", str(workdir))


def wait_until(condition: Any, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := condition():
            return result
        time.sleep(0.2)
    return condition()


def doctor(box: Sandbox) -> dict[str, dict[str, str]]:
    result = box.llmtap("doctor", "--json", check=False)
    checks = {c["name"].split(" ")[0]: c for c in json.loads(result.stdout)}
    checks["exit"] = {"status": str(result.returncode)}
    return checks


def status(box: Sandbox) -> dict[str, Any]:
    answer: dict[str, Any] = json.loads(box.llmtap("status", "--json").stdout)
    return answer


def java_aliases(box: Sandbox) -> list[str]:
    """llmtap's entries in the sandbox's Java keystore, as keytool lists them."""
    listed = box.run("keytool", "-list", "-keystore", "/etc/ssl/certs/java/cacerts", "-storepass",
                     "changeit").stdout
    return [line.split(",")[0] for line in listed.splitlines() if "llmtap" in line]


def test_real_install_trusts_restarts_rotates_and_uninstall_leaves_no_trace(testbed, sandbox):
    box, w = sandbox, sandbox.workdir
    config = write_config(w / "config.toml", w, testbed, f"""
        [install]
        log_file = "{w / 'llmtap.log'}"
        nss = false  # the host's users' browser databases are not the sandbox's to change
    """)
    host_before = listing(*map(Path, HOST_PATHS))
    host_passwd = sh("getent", "passwd", "llmtap", check=False).stdout
    tops = (box.etc, box.anchors, w / "state", w / "records", w / "run", w / "llmtap.log")
    before = listing(*tops)
    system_bundle = box.etc / "ssl/certs/ca-certificates.crt"

    installed = box.llmtap("install").stdout
    assert "created system user and group llmtap" in installed
    assert "trusted the CA in the OS store (update-ca-certificates)" in installed
    assert "trusted the CA in Java's keystore /etc/ssl/certs/java/cacerts" in installed
    assert java_aliases(box) == ["debian:llmtap.pem"]
    assert "systemd is not running here: started `llmtap run` detached" in installed
    ca_pem = (w / "state/ca/llmtap-ca.pem").read_bytes()
    assert ca_pem in system_bundle.read_bytes()
    assert (box.anchors / "llmtap.crt").read_bytes() == ca_pem
    assert config.exists()

    # Trusted by the OS store itself: curl with no --cacert at all reaches a target through the tap.
    tapped = box.run("curl", "-sS", "--max-time", "20", "https://api.anthropic.com/installed")
    assert json.loads(tapped.stdout)["path"] == "/installed"
    assert [r["path"] for r in records(w, 1)] == ["/installed"]

    checks = doctor(box)
    for name in ("service", "rules", "targets", "CA", "OS", *RUNTIMES):
        assert checks[name]["status"] == "ok", checks[name]
    assert checks["environment"]["status"] == "warn"  # this shell predates /etc/profile.d/llmtap.sh
    assert checks["exit"]["status"] == "0"
    assert "through the tap" in checks["curl"]["detail"]

    again = box.llmtap("install").stdout
    assert again.strip() == "nothing to change: llmtap is already installed and running"

    # The keeper restarts a daemon that died, as systemd's Restart=on-failure would.
    first = status(box)["pid"]
    os.kill(first, signal.SIGKILL)
    restarted = wait_until(lambda: (s := status(box)).get("running") and s.get("rules_present")
                           and s["pid"] != first)
    assert restarted, (w / "llmtap.log").read_text()
    assert "exited with signal SIGKILL" in (w / "llmtap.log").read_text()

    rotated = box.llmtap("ca", "rotate").stdout
    assert "restarted the service with the new CA" in rotated
    new_pem = (w / "state/ca/llmtap-ca.pem").read_bytes()
    assert new_pem != ca_pem
    assert new_pem in system_bundle.read_bytes() and ca_pem not in system_bundle.read_bytes()
    wait_until(lambda: status(box).get("rules_present"))
    after_rotate = box.run("curl", "-sS", "--max-time", "20", "https://api.anthropic.com/rotated")
    assert json.loads(after_rotate.stdout)["path"] == "/rotated"

    removed = box.llmtap("uninstall", "--purge").stdout
    assert "stopped the detached llmtap service" in removed
    assert "removed the CA from the OS store (update-ca-certificates)" in removed
    assert "removed the CA from Java's keystore" in removed and java_aliases(box) == []
    assert listing(*tops) == before
    assert new_pem not in system_bundle.read_bytes()
    untrusted = box.run("curl", "-sS", "--max-time", "20", "https://api.anthropic.com/", check=False)
    assert untrusted.returncode == 60  # no tap, and the upstream's own CA was never trusted
    assert "llmtap" not in testbed.nft_tables()
    # The host never saw any of it.
    assert listing(*map(Path, HOST_PATHS)) == host_before
    assert sh("getent", "passwd", "llmtap", check=False).stdout == host_passwd


def records(workdir: Path, expected: int) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = wait_until(
        lambda: [json.loads(p.read_text()) for p in sorted((workdir / "records").glob("*.json"))]
        if len(list((workdir / "records").glob("*.json"))) >= expected else None, timeout=10) or []
    return found


FAKE_CLAUDE = """\
#!/usr/bin/env node
// npm's Claude Code is a Node script: doctor checks it with the Node that runs it.
"""

FAKE_CODEX = """\
#!{python}
# Stands in for the native Codex binary: HTTPS with SSL_CERT_FILE/CODEX_CA_CERTIFICATE, and the
# API's answer to the dummy key (the fake upstream answers everything, so 401 is simulated).
import os, ssl, socket, sys
assert os.environ["CODEX_API_KEY"] == os.environ["OPENAI_API_KEY"] != ""
assert os.listdir(os.environ["HOME"]) == []  # an empty home: no real credentials are used
ctx = ssl.create_default_context(cafile=os.environ.get("CODEX_CA_CERTIFICATE"))
try:
    with socket.create_connection(("api.openai.com", 443), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="api.openai.com"):
            print("ERROR: unexpected status 401 Unauthorized: Incorrect API key provided")
except ssl.SSLCertVerificationError as exc:
    print(f"ERROR: error sending request: invalid peer certificate: {{exc.verify_message}}")
sys.exit(1)
"""


def client(bed: Testbed, *args: str, env: dict[str, str] | None = None
           ) -> subprocess.CompletedProcess[str]:
    return sh("ip", "netns", "exec", bed.client_ns, LLMTAP, *args, check=False, env=plain_env(env),
              timeout=180)


def test_doctor_against_a_running_daemon(testbed, llmtap):
    """A daemon started by hand, with the runtime environment installed (--no-service
    --no-trust: the host's store is not touched): the handshakes pass through it, the OS store
    check fails with its fix."""
    public = make_workdir()
    daemon = llmtap(extra_toml=f"""
        [install]
        public_dir = "{public / 'pub'}"
        profile_script = "{public / 'profile.sh'}"
        environment_file = "{public / 'environment.conf'}"
        log_file = "{public / 'llmtap.log'}"
        nss = false
    """)
    try:
        out = daemon.llmtap("install", "--no-service", "--no-trust").stdout
        assert f"{public / 'profile.sh'}" in out
        bindir = public / "bin"
        bindir.mkdir()
        for name, text in (("claude", FAKE_CLAUDE),
                           ("codex", FAKE_CODEX.format(python=sys.executable))):
            (bindir / name).write_text(text)
            (bindir / name).chmod(0o755)
        result = client(testbed, "doctor", "--json", "--config", str(daemon.config_path),
                        env={"PATH": f"{bindir}:{os.environ['PATH']}"})
        checks = {c["name"].split(" ")[0]: c for c in json.loads(result.stdout)}
        assert result.returncode == 1  # the OS store does not trust the CA
        assert checks["OS"] == {"name": "OS trust", "status": "fail", "fix": "sudo llmtap install",
                                "detail": "the CA is not in /etc/ssl/certs/ca-certificates.crt"}
        assert checks["service"]["status"] == "warn"
        assert checks["service"]["fix"].startswith("sudo llmtap install")
        for name in ("rules", "targets", "CA", *(r for r in RUNTIMES if r != "java"), "codex"):
            assert checks[name]["status"] == "ok", checks[name]
        if "java" in RUNTIMES:  # Java trusts its keystore only, which --no-trust leaves alone
            assert checks["java"]["status"] == "fail" and "PKIX" in checks["java"]["detail"]
            assert "Java's keystore" in checks["java"]["fix"]
        if "node" in RUNTIMES:
            assert checks["claude"] == {**checks["claude"], "name": "claude (Node)", "status": "ok"}
        assert checks["python3"]["name"] in ("python3 (SSL_CERT_FILE)",)
        assert "trusts the CA" in checks["codex"]["detail"]
        # Without the session variables Node no longer trusts the CA, and doctor says how to fix it.
        (public / "profile.sh").write_text("# emptied\n")
        broken = client(testbed, "doctor", "--config", str(daemon.config_path))
        assert broken.returncode == 1 and broken.stderr == ""
        if "node" in RUNTIMES:
            assert "FAIL  node: does not trust the CA (UNABLE_TO_VERIFY_LEAF_SIGNATURE)" \
                in broken.stdout
        assert "FAIL  python3 (certifi): does not trust the CA (unable to get local issuer " \
            "certificate)" in broken.stdout
        assert "FAIL  curl: does not trust the CA (curl: (60) SSL certificate problem: unable to " \
            "get local issuer certificate)" in broken.stdout
        assert f"fix: open a new shell: NODE_EXTRA_CA_CERTS comes from {public / 'profile.sh'}" \
            in broken.stdout
        assert f"FAIL  environment: {public / 'profile.sh'} is missing or empty" in broken.stdout
    finally:
        sh("rm", "-rf", str(public))
