"""The explicit listener's config, `llmtap tunnel` (against a fake ssh) and gateway mode's sysctl
bookkeeping: everything that needs neither root nor a network namespace."""

from __future__ import annotations

import json
import os
import socket
import stat
import textwrap
import threading
import time
from pathlib import Path

import pytest
from llmtap import tunnel
from llmtap.config import load_config
from llmtap.errors import RuntimeFailure, UsageError
from llmtap.platform.linux import gateway
from llmtap.proxy import ProxySettings, proxy_modes
from llmtap.supervisor import listen_hosts


def config_file(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(textwrap.dedent(body))
    return path


# --- config -----------------------------------------------------------------------------------


def test_explicit_listener_is_off_by_default_and_parses_both_families(tmp_path):
    assert load_config(config_file(tmp_path, "")).explicit.address is None
    v4 = load_config(config_file(tmp_path, '[explicit]\nlisten = "127.0.0.1:8890"\n'))
    assert v4.explicit.address == ("127.0.0.1", 8890)
    v6 = load_config(config_file(tmp_path, '[explicit]\nlisten = "[::1]:8890"\n'))
    assert v6.explicit.address == ("::1", 8890)


@pytest.mark.parametrize(("listen", "message"), [
    ("0.0.0.0:8890", "is not a loopback address"),
    ("192.168.1.5:8890", "set explicit.allow_non_loopback = true"),
    ("localhost:8890", "must look like"),
    ("127.0.0.1", "must look like"),
    ("127.0.0.1:70000", "out of range"),
    ("127.0.0.1:8443", "is redirect.proxy_port"),
])
def test_explicit_listener_refuses_what_it_must(tmp_path, listen, message):
    with pytest.raises(UsageError, match=message):
        load_config(config_file(tmp_path, f'[explicit]\nlisten = "{listen}"\n'))


def test_non_loopback_explicit_listener_needs_the_opt_in(tmp_path):
    config = load_config(config_file(tmp_path, """\
        [explicit]
        listen = "0.0.0.0:8890"
        allow_non_loopback = true
        """))
    assert config.explicit.address == ("0.0.0.0", 8890)


def test_gateway_interfaces_are_checked(tmp_path):
    ok = load_config(config_file(tmp_path, '[redirect]\ngateway_interfaces = ["docker0", "br-1a2b"]\n'))
    assert ok.redirect.gateway_interfaces == ("docker0", "br-1a2b")
    for bad in ('"lo"', '"eth0; drop"', '"a-very-long-interface-name"', '""'):
        with pytest.raises(UsageError, match=r"redirect\.gateway_interfaces"):
            load_config(config_file(tmp_path, f"[redirect]\ngateway_interfaces = [{bad}]\n"))


def test_explicit_listener_is_one_more_mode_of_the_same_master():
    settings = ProxySettings(proxy_port=8443, confdir=Path("/x"), upstream_ca_bundle=Path("/y"),
                             targets=("api.anthropic.com",), records_dir=None,
                             explicit_listen=("::1", 8890))
    assert proxy_modes(settings) == ["transparent@127.0.0.1:8443", "transparent@::1:8443",
                                     "regular@::1:8890"]


def test_port_check_covers_the_explicit_listener():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(UsageError, match=rf"port {port} on 127.0.0.1 .* set explicit.listen"):
            listen_hosts(port + 1 if port < 65535 else port - 1, ("127.0.0.1", port))


# --- llmtap tunnel ----------------------------------------------------------------------------

SPEC = tunnel.TunnelSpec("dev@build.example", 8890, ("127.0.0.1", 8890), ("Port=2222",))


def test_ssh_command_keeps_what_must_hold_ahead_of_the_users_options():
    command = tunnel.ssh_command(SPEC, "/usr/bin/ssh")
    assert command[:4] == ["/usr/bin/ssh", "-N", "-T", "-v"]
    options = [command[i + 1] for i, arg in enumerate(command) if arg == "-o"]
    assert options[:3] == ["ExitOnForwardFailure=yes", "ControlPath=none", "Port=2222"]
    assert {"BatchMode=yes", "ServerAliveInterval=15"} <= set(options[3:])
    assert command[-4:] == ["-R", "127.0.0.1:8890:127.0.0.1:8890", "--", "dev@build.example"]
    ipv6 = tunnel.TunnelSpec("h", 9000, ("::1", 8890))
    assert "127.0.0.1:9000:[::1]:8890" in tunnel.ssh_command(ipv6)


@pytest.mark.parametrize("spec", [
    tunnel.TunnelSpec("-oProxyCommand=touch /tmp/x", 8890, ("127.0.0.1", 8890)),
    tunnel.TunnelSpec("user@host extra", 8890, ("127.0.0.1", 8890)),
    tunnel.TunnelSpec("host", 8890, ("127.0.0.1", 8890), ("-F/etc/passwd",)),
])
def test_spec_refuses_arguments_ssh_would_take_as_options(spec):
    with pytest.raises(UsageError):
        tunnel.check_spec(spec)


def test_exports_name_the_proxy_the_ca_and_the_placeholders():
    lines = tunnel.exports(SPEC, "/var/lib/llmtap/ca/llmtap-ca.pem", ["export ANTHROPIC_API_KEY='ph'"])
    text = "\n".join(lines)
    assert "export HTTPS_PROXY=http://127.0.0.1:8890" in lines
    assert "Only TCP is carried" in text
    assert "< /var/lib/llmtap/ca/llmtap-ca.pem" in text
    assert 'export SSL_CERT_FILE="$HOME/.llmtap-bundle.pem"' in lines
    assert lines[-1] == "export ANTHROPIC_API_KEY='ph'"
    assert not any(line.startswith("export HTTP_PROXY") for line in lines)


FAKE_SSH = """\
#!/bin/sh
n=$(($(cat "$FAKE_SSH_DIR/count" 2>/dev/null || echo 0) + 1))
echo "$n" > "$FAKE_SSH_DIR/count"
echo "debug1: Reading configuration data" >&2
case "$FAKE_SSH_MODE" in
  denied) echo "dev@build.example: Permission denied (publickey)." >&2; exit 255 ;;
esac
echo "debug1: remote forward success for: listen 127.0.0.1:8890, connect 127.0.0.1:8890" >&2
if [ "$n" -lt 3 ]; then sleep 0.2; echo "Connection to build.example closed by remote host." >&2; exit 255; fi
echo $$ > "$FAKE_SSH_DIR/pid"
exec sleep 30
"""


@pytest.fixture
def fake_ssh(tmp_path, monkeypatch):
    script = tmp_path / "ssh"
    script.write_text(FAKE_SSH)
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    monkeypatch.setenv("FAKE_SSH_DIR", str(tmp_path))
    monkeypatch.setattr(tunnel, "BACKOFF_FIRST_S", 0.05)
    return tmp_path


def test_tunnel_reconnects_after_drops_and_stops_ssh(fake_ssh):
    said: list[str] = []
    runner = tunnel.Tunnel(SPEC, said.append)
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(runner.run()))
    thread.start()
    pid_file = fake_ssh / "pid"
    deadline = time.monotonic() + 10
    while not pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pid_file.exists(), said
    runner.stop.set()
    thread.join(timeout=10)
    assert result == [0]
    assert [line for line in said if line.startswith("up:")] == [
        "up: 127.0.0.1:8890 on dev@build.example -> 127.0.0.1:8890 here"] * 3
    assert sum("the tunnel is down (Connection to build.example closed" in line for line in said) == 2
    assert not any("debug1" in line for line in said)
    assert said[-1] == "stopped"
    with pytest.raises(ProcessLookupError):  # ssh was stopped with the tunnel
        os.kill(int(pid_file.read_text()), 0)


def test_a_first_attempt_that_fails_is_reported_once(fake_ssh, monkeypatch):
    monkeypatch.setenv("FAKE_SSH_MODE", "denied")
    with pytest.raises(RuntimeFailure, match=r"Permission denied .* key-based login"):
        tunnel.Tunnel(SPEC, lambda _line: None).run()
    assert (fake_ssh / "count").read_text().strip() == "1"


# --- gateway mode: route_localnet -------------------------------------------------------------


def fake_sysctls(root: Path, **values: str) -> None:
    for name, value in values.items():
        (root / name).mkdir(parents=True)
        (root / name / "route_localnet").write_text(value + "\n")


def localnet(root: Path, name: str) -> str:
    return (root / name / "route_localnet").read_text().strip()


def test_route_localnet_is_recorded_before_it_is_set_then_restored(tmp_path):
    root, record = tmp_path / "conf", tmp_path / "run" / gateway.RECORD_NAME
    fake_sysctls(root, docker0="0", virbr0="1")
    keeper = gateway.RouteLocalnet(("docker0", "virbr0", "br-late"), record, root)
    assert keeper.enable() == (["docker0"], ["br-late"])
    assert localnet(root, "docker0") == "1" and localnet(root, "virbr0") == "1"
    assert json.loads(record.read_text()) == {"docker0": "0"}  # virbr0 was 1 already: not ours
    fake_sysctls(root, **{"br-late": "0"})  # an interface that appears later
    (root / "docker0" / "route_localnet").write_text("0\n")  # docker0 recreated: reset
    assert keeper.enable() == (["docker0", "br-late"], [])
    assert json.loads(record.read_text()) == {"docker0": "0", "br-late": "0"}
    assert gateway.restore(record, root) == ["docker0", "br-late"]
    assert [localnet(root, n) for n in ("docker0", "virbr0", "br-late")] == ["0", "1", "0"]
    assert not record.exists()
    assert gateway.restore(record, root) == []  # safe any time


def test_restore_skips_what_it_cannot_trust(tmp_path):
    root, record = tmp_path / "conf", tmp_path / gateway.RECORD_NAME
    fake_sysctls(root, docker0="1")
    record.write_text(json.dumps({"docker0": "1; rm -rf /", "gone0": "0"}))
    assert gateway.restore(record, root) == []
    assert localnet(root, "docker0") == "1" and not record.exists()
