"""The macOS install pieces, run for real where Linux can: dscl parsing on saved outputs, the
shell block round trip, the LaunchAgent's script run by a real sh (launchctl replaced by a
recorder), real TLS handshakes with the variables those files set, doctor on a fake Mac, and
psutil attribution of a real connection."""

from __future__ import annotations

import json
import os
import plistlib
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from fake_macos import fixture
from llmtap import ca, proclookup
from llmtap.config import system_paths
from llmtap.doctor import Doctor
from llmtap.install.runtime_env import ca_bundle, env_values
from llmtap.platform.macos import environment, java, sockets, users
from llmtap.platform.macos.users import Account
from test_macos_lifecycle import Mac
from tls_bed import SniServer, issue

TARGET = "api.anthropic.com"
CERT, BUNDLE = Path("/etc/llmtap/llmtap-ca.pem"), Path("/etc/llmtap/ca-bundle.pem")

# --- dscl ---


def test_ids_are_read_from_saved_dscl_listings() -> None:
    uids = users.parse_ids(fixture("dscl_list_users.txt"))
    gids = users.parse_ids(fixture("dscl_list_groups.txt"))
    assert uids["root"] == 0 and uids["nobody"] == -2 and uids["_oahd"] == 441
    assert gids["com.apple.access_ssh"] == 399 and gids["nogroup"] == -1
    assert users.free_id(set(uids.values()), set(gids.values())) == 499
    assert users.free_id({499}, {498}) == 497  # free as a UID and as a GID
    assert users.parse_read(fixture("dscl_read_uniqueid.txt")) == "499"


def test_the_account_is_made_as_apple_makes_its_daemon_accounts() -> None:
    account = users.account_for("llmtap")
    assert account == Account("_llmtap", "llmtap")
    assert users.account_for("_svc") == Account("_svc", "svc")
    commands = users.create_commands(account, 499, group_exists=False)
    dscl = ["/usr/bin/dscl", "."]
    assert commands[:2] == [[*dscl, "-create", "/Groups/_llmtap"],
                            [*dscl, "-create", "/Groups/_llmtap", "PrimaryGroupID", "499"]]
    assert [*dscl, "-create", "/Users/_llmtap", "RecordName", "_llmtap", "llmtap"] in commands
    assert [*dscl, "-create", "/Users/_llmtap", "IsHidden", "1"] in commands
    assert [*dscl, "-create", "/Users/_llmtap", "UserShell", "/usr/bin/false"] in commands
    assert [*dscl, "-create", "/Users/_llmtap", "NFSHomeDirectory", "/var/empty"] in commands
    assert len(users.create_commands(account, 499, group_exists=True)) == len(commands) - 5


def test_run_files_go_in_var_run_on_macos() -> None:
    """macOS has no /run, and its system volume is read-only: /run/llmtap cannot be made there."""
    assert system_paths("darwin").run_dir == Path("/var/run/llmtap")
    assert system_paths("linux").run_dir == Path("/run/llmtap")
    assert system_paths("darwin").state_dir == system_paths("linux").state_dir


# --- the shell block ---


@pytest.mark.parametrize("text", ["", "export A=1\n", "no final newline", "\n\n",
                                  "a\n# >>> llmtap: not ours\n"])
def test_the_block_comes_out_byte_for_byte(text: str) -> None:
    values = env_values(CERT, BUNDLE)
    added = environment.with_block(text, values)
    assert environment.has_block(added) and environment.block_values(added) == values
    assert environment.with_block(added, values) == added  # idempotent
    assert environment.without_block(added) == text


def test_the_block_and_the_agent_set_the_same_values_in_a_real_shell(tmp_path: Path) -> None:
    values = {**env_values(CERT, BUNDLE), "ODD": "it's a \"path\" with $HOME and spaces"}
    script = tmp_path / "zshenv"
    script.write_text(environment.with_block("", values))
    shown = subprocess.run(["sh", "-c", f". {script} && env"], capture_output=True, text=True,
                           env={}, check=True).stdout.splitlines()
    assert {k: v for k, v in (line.split("=", 1) for line in shown) if k in values} == values

    recorder = tmp_path / "launchctl"
    recorder.write_text(f'#!/bin/sh\nprintf "%s\\0" "$@" >> {tmp_path}/calls\nprintf "\\n" '
                        f">> {tmp_path}/calls\n")
    recorder.chmod(0o755)
    agent = plistlib.loads(environment.render_agent(values))
    assert agent["LimitLoadToSessionType"] == ["Aqua"] and agent["RunAtLoad"] is True
    program, flag, line = agent["ProgramArguments"]
    assert (program, flag) == ("/bin/sh", "-c")
    subprocess.run(["sh", "-n", "-c", line], check=True)  # the syntax, by a real sh
    subprocess.run(["sh", "-c", line.replace(environment.LAUNCHCTL, str(recorder))], check=True)
    calls = [c.split("\0")[:-1] for c in (tmp_path / "calls").read_text().split("\n") if c]
    assert calls == [["setenv", name, value] for name, value in values.items()]


@pytest.fixture(scope="module")
def tls_target(tmp_path_factory: pytest.TempPathFactory) -> tuple[SniServer, Path, Path]:
    """A target whose leaf the CA signed, and the files install would publish."""
    folder = tmp_path_factory.mktemp("mac-env")
    ca_key, ca_cert = ca.create_ca((TARGET,))
    key_pem, cert_pem = issue(ca_key, ca_cert, [x509.DNSName(TARGET)])
    (folder / "leaf.crt").write_bytes(cert_pem)
    (folder / "leaf.key").write_bytes(key_pem)
    cert, bundle = folder / "llmtap-ca.pem", folder / "ca-bundle.pem"
    cert.write_bytes(ca_cert)
    bundle.write_bytes(ca_bundle(ca.system_roots(), ca_cert))
    server = SniServer({TARGET: (folder / "leaf.crt", folder / "leaf.key")})
    yield server, cert, bundle
    server.close()


PYTHON = """
import socket, ssl, sys
ctx = ssl.create_default_context()  # reads SSL_CERT_FILE, as the SDKs' httpx does
with socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=10) as raw:
    with ctx.wrap_socket(raw, server_hostname=sys.argv[2]) as tls:
        print("trusted", tls.version())
"""
NODE = """
const tls = require("tls");
const s = tls.connect({host: "127.0.0.1", port: +process.argv[1], servername: process.argv[2]},
  () => { console.log(s.authorized ? "trusted" : "untrusted"); s.end(); });
s.on("error", (e) => console.log(e.code));
"""


def in_new_shell(block_file: Path | None, argv: list[str]) -> str:
    source = f". {block_file} && " if block_file else ""
    env = {"PATH": os.environ["PATH"]}
    return subprocess.run(["sh", "-c", f"{source}exec {shlex.join(argv)}"], capture_output=True,
                          text=True, env=env, timeout=30).stdout.strip()


@pytest.mark.parametrize("runtime", ["python", "node"])
def test_a_new_shell_trusts_the_ca_from_the_block_by_a_real_handshake(
        runtime: str, tls_target: tuple[SniServer, Path, Path], tmp_path: Path) -> None:
    if runtime == "node" and not shutil.which("node"):
        pytest.skip("needs node")
    server, cert, bundle = tls_target
    zshenv = tmp_path / "zshenv"
    zshenv.write_text(environment.with_block("export EDITOR=vi\n", env_values(cert, bundle)))
    argv = ([sys.executable, "-c", PYTHON] if runtime == "python" else ["node", "-e", NODE])
    argv += [str(server.port), TARGET]
    assert in_new_shell(zshenv, argv).startswith("trusted")
    assert not in_new_shell(None, argv).startswith("trusted")  # without the block: refused


# --- doctor on the fake Mac ---


def test_doctor_checks_each_step_on_the_fake_mac(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    mac = Mac(tmp_path)
    mac.installer().install()
    status = {"running": True, "pid": 4821, "rules_present": True, "backend": "pf",
              "scope": "targets", "ports": [443], "proxy_port": 8443, "targets": {}}
    monkeypatch.setattr("llmtap.doctor.control.request", lambda *a, **k: status)

    def doctor() -> dict[str, tuple[str, str]]:
        installer = mac.installer()
        found = Doctor(installer.config, str(mac.config_file), which=lambda name: None, env={},
                       mac=installer).run()
        return {c.name: (c.status, c.detail) for c in found}

    checks = doctor()
    for name in ("service", "account", "pf", "OS trust", "shell environment", "GUI environment"):
        assert checks[name][0] == "ok", (name, checks[name])
    assert "reference 14574231651387265831" in checks["pf"][1]
    assert checks["environment"][0] == "warn"  # this test's shell predates the block
    mac.installer().uninstall()
    checks = doctor()
    for name in ("OS trust", "shell environment", "GUI environment"):
        assert checks[name][0] == "fail", (name, checks[name])
    assert checks["pf"][0] == "fail"  # the status says running, but pf holds nothing of ours
    assert json.dumps(checks)


def test_doctor_skips_the_shims_that_would_open_an_install_dialog(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")
    mac = Mac(tmp_path)  # no developer tools, no Java: xcode-select -p and java_home fail
    installer = mac.installer()
    doctor = Doctor(installer.config, str(mac.config_file), which=lambda name: f"/usr/bin/{name}",
                    env={}, mac=installer)
    assert doctor.which("python3") is None and doctor.which("java") is None
    assert doctor.which("node") == "/usr/bin/node"
    assert ["/usr/bin/xcode-select", "-p"] in mac.fake.calls


# --- attribution ---


def test_a_connection_is_attributed_to_its_process_by_psutil(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The lookup macOS uses (psutil over libproc there; over /proc here), on real sockets."""
    server = socket.create_server(("127.0.0.1", 0))
    with server, socket.create_connection(server.getsockname()) as client:
        local, remote = client.getsockname(), server.getsockname()
        assert sockets.pid_of_connection(local, remote) == os.getpid()
        assert sockets.pid_of_connection((f"::ffff:{local[0]}", local[1])) == os.getpid()
        assert sockets.pid_of_connection(local, ("127.0.0.1", 1)) is None  # another connection
        assert proclookup.Lookup._pid_psutil(*local) == os.getpid()

        def no_scan(kind: str) -> list[object]:
            raise AssertionError("a recent pid must answer without a full scan")

        monkeypatch.setattr(sockets.psutil, "net_connections", no_scan)
        assert sockets.pid_of_connection(local, remote, recent=[1, os.getpid()]) == os.getpid()


def test_each_jdk_is_found_once(tmp_path: Path) -> None:
    brew = tmp_path / "opt/homebrew/opt/openjdk@21/libexec/openjdk.jdk/Contents/Home"
    (brew / "lib/security").mkdir(parents=True)
    (brew / "lib/security/cacerts").write_bytes(b"")
    linked = tmp_path / "Library/Java/JavaVirtualMachines/openjdk-21.jdk"
    linked.parent.mkdir(parents=True)
    linked.symlink_to(brew.parent.parent)  # what `brew info openjdk` tells users to do
    (tmp_path / "Library/Java/JavaVirtualMachines/broken.jdk/Contents/Home").mkdir(parents=True)
    assert java.jdk_homes(tmp_path) == [
        Path("/Library/Java/JavaVirtualMachines/openjdk-21.jdk/Contents/Home")]
    store = java.JdkTrustStore(java.jdk_homes(tmp_path)[0], lambda argv, stdin=None: None,
                               tmp_path)  # type: ignore[arg-type, return-value]
    assert store.command("-list", "-alias", store.alias) == [
        str(linked / "Contents/Home/bin/keytool"), "-list", "-alias", "llmtap", "-keystore",
        str(linked / "Contents/Home/lib/security/cacerts"), "-storepass", "changeit"]
