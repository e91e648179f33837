"""Beyond one process tree, end to end: the explicit proxy, `llmtap tunnel` and gateway mode.

Extra namespaces hang off the test bed's client namespace (where llmtap runs):

    remote ns (10.78.S.2, sshd)     <--veth-->  client ns  <--veth-->  upstream ns
    container ns (10.79.S.2, gw .1) <--veth-->  client ns (forwarding + masquerade, like docker0)

The remote namespace has no route anywhere but the client namespace's sshd link, so whatever it
reaches went through the tunnel. The container namespace reaches the upstream only through the
client namespace, as a container reaches the world through its host.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from llmtap import addons
from testbed import (
    LLMTAP,
    OTHER_HOST,
    PREFIX,
    SHARED_HOST,
    TARGET_HOSTS,
    Daemon,
    Testbed,
    clean_env,
    make_workdir,
    sh,
)

pytestmark = pytest.mark.root

EXPLICIT_PORT = 8890
REAL_KEY = "sk-ant-api03-TUNNELREALKEY0123456789abcdefghijklmnopq"
EXPLICIT_TOML = f'[explicit]\nlisten = "127.0.0.1:{EXPLICIT_PORT}"'
SYSTEM_ROOTS = "/etc/ssl/certs/ca-certificates.crt"
SSHD = "/usr/sbin/sshd"  # absolute: sshd re-executes itself for each connection
HAS_CREDENTIALS = "credentials" in addons.STAGES


def wait_until(condition: Callable[[], object], timeout: float = 15.0, every: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(every)
    return bool(condition())


@dataclass
class Netns:
    """Namespaces, links and settings this file adds to the test bed; `undo` removes them all."""

    bed: Testbed
    namespaces: list[str] = field(default_factory=list)
    undo_steps: list[Callable[[], object]] = field(default_factory=list)

    def add(self, suffix: str, hosts: dict[str, list[str]]) -> str:
        name = f"{PREFIX}-{self.bed.tag}-{suffix}"
        sh("ip", "netns", "add", name)
        self.namespaces.append(name)
        etc = Path("/etc/netns") / name
        etc.mkdir(parents=True, exist_ok=True)
        lines = ["127.0.0.1 localhost", "::1 localhost"]
        lines += [f"{addr} {host}" for host, addrs in hosts.items() for addr in addrs]
        (etc / "hosts").write_text("\n".join(lines) + "\n")
        (etc / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:1 attempts:1\n")
        self.run(name, "ip", "link", "set", "lo", "up")
        return name

    def link(self, ns: str, host_if: str, ns_if: str, net4: str, net6: str = "") -> None:
        """A veth pair from the client namespace (address .1 / ::1) to `ns` (.2 / ::2)."""
        client = self.bed.client_ns
        sh("ip", "link", "add", host_if, "netns", client, "type", "veth",
           "peer", "name", ns_if, "netns", ns)
        for where, dev, last in ((client, host_if, 1), (ns, ns_if, 2)):
            self.run(where, "ip", "addr", "add", f"{net4}.{last}/24", "dev", dev)
            if net6:
                self.run(where, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=0")
                self.run(where, "ip", "-6", "addr", "add", f"{net6}::{last}/64", "dev", dev, "nodad")
            self.run(where, "ip", "link", "set", dev, "up")

    def sysctl(self, key: str, value: str) -> None:
        """Sets `key` in the client namespace; the old value comes back at the end."""
        before = self.run(self.bed.client_ns, "sysctl", "-n", key).stdout.strip()
        self.undo_steps.append(lambda: self.run(self.bed.client_ns, "sysctl", "-qw",
                                                f"{key}={before}", check=False))
        self.run(self.bed.client_ns, "sysctl", "-qw", f"{key}={value}")

    def run(self, ns: str, *args: str, check: bool = True, env: dict[str, str] | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return sh("ip", "netns", "exec", ns, *args, check=check, env=clean_env(env), timeout=timeout)

    def undo(self) -> None:
        for step in reversed(self.undo_steps):
            with contextlib.suppress(Exception):
                step()
        for name in self.namespaces:  # deleting a namespace deletes its end of every veth pair
            sh("ip", "netns", "del", name, check=False)
            shutil.rmtree(f"/etc/netns/{name}", ignore_errors=True)


@pytest.fixture
def netns(testbed: Testbed) -> Iterator[Netns]:
    extra = Netns(testbed)
    try:
        yield extra
    finally:
        extra.undo()


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = make_workdir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# --- the SSH reverse tunnel -------------------------------------------------------------------


@dataclass
class Remote:
    ns: str
    address: str
    sshd: subprocess.Popen[bytes]
    client_options: list[str]  # -o options for llmtap tunnel: our key, our known_hosts

    def connection_children(self) -> list[int]:
        found = sh("pgrep", "-P", str(self.sshd.pid), check=False).stdout.split()
        return [int(pid) for pid in found]


def start_sshd(netns: Netns, workdir: Path) -> Iterator[Remote]:
    if not Path(SSHD).exists() or not shutil.which("ssh") or not shutil.which("ssh-keygen"):
        pytest.skip("needs sshd and ssh (apt-get install openssh-server; scripts/test.sh does)")
    bed = netns.bed
    ns = netns.add("rm", hosts={})  # no API names, no route to them: only the tunnel
    net = f"10.78.{bed.subnet}"
    netns.link(ns, f"{bed.tag}r", f"{bed.tag}s", net)
    address = f"{net}.2"
    for name in ("host_key", "client_key"):
        sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(workdir / name))
    (workdir / "authorized_keys").write_text((workdir / "client_key.pub").read_text())
    host_pub = " ".join((workdir / "host_key.pub").read_text().split()[:2])
    (workdir / "known_hosts").write_text(f"{address} {host_pub}\n")
    config = workdir / "sshd_config"
    config.write_text(textwrap.dedent(f"""\
        ListenAddress {address}:22
        HostKey {workdir / "host_key"}
        PidFile none
        AuthorizedKeysFile {workdir / "authorized_keys"}
        PermitRootLogin prohibit-password
        PubkeyAuthentication yes
        PasswordAuthentication no
        KbdInteractiveAuthentication no
        UsePAM no
        StrictModes no
        AllowTcpForwarding yes
        GatewayPorts no
        LogLevel VERBOSE
        """))
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
    log = open(workdir / "sshd.log", "wb")  # noqa: SIM115 - sshd keeps writing to it
    sshd = subprocess.Popen(["ip", "netns", "exec", ns, SSHD, "-D", "-e", "-f", str(config)],
                            stdout=log, stderr=log)
    try:
        probe = f"import socket; socket.create_connection(('{address}', 22), 1)"
        assert wait_until(lambda: bed.python(probe, check=False).returncode == 0, timeout=10), (
            (workdir / "sshd.log").read_text())
        options = [f"IdentityFile={workdir / 'client_key'}", "IdentitiesOnly=yes",
                   f"UserKnownHostsFile={workdir / 'known_hosts'}", "GlobalKnownHostsFile=/dev/null",
                   "StrictHostKeyChecking=yes"]
        yield Remote(ns, address, sshd, options)
    finally:
        sshd.terminate()
        try:
            sshd.wait(timeout=5)
        except subprocess.TimeoutExpired:
            sshd.kill()


@pytest.fixture
def remote(netns: Netns, workdir: Path) -> Iterator[Remote]:
    yield from start_sshd(netns, workdir)


@dataclass
class TunnelRun:
    proc: subprocess.Popen[bytes]
    out: Path
    err: Path

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def ups(self) -> int:
        return self.stderr().count("llmtap tunnel: up:")

    def ssh_pid(self) -> int | None:
        found = sh("pgrep", "-P", str(self.proc.pid), "-x", "ssh", check=False).stdout.split()
        return int(found[0]) if found else None


@contextlib.contextmanager
def run_tunnel(bed: Testbed, daemon: Daemon, remote: Remote, workdir: Path) -> Iterator[TunnelRun]:
    out, err = workdir / "tunnel.out", workdir / "tunnel.err"
    command = ["ip", "netns", "exec", bed.client_ns, LLMTAP, "tunnel", f"root@{remote.address}",
               "--remote-port", str(EXPLICIT_PORT), *(a for o in remote.client_options for a in ("-o", o)),
               "--config", str(daemon.config_path)]
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        proc = subprocess.Popen(command, stdout=stdout, stderr=stderr, env=clean_env())
    run = TunnelRun(proc, out, err)
    try:
        yield run
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def remote_shell(netns: Netns, remote: Remote, home: Path, exports: Path, command: str
                 ) -> subprocess.CompletedProcess[str]:
    """`command` in the remote namespace with the printed exports and nothing else."""
    bare = ("env", "-i", f"PATH={os.environ['PATH']}", f"HOME={home}")
    return netns.run(remote.ns, *bare, "sh", "-c", f". {exports} && {command}", check=False)


def test_tunnel_carries_remote_clients_to_the_tap_and_comes_back(testbed, llmtap, netns, remote,
                                                                  workdir):
    daemon = llmtap(extra_toml=EXPLICIT_TOML)
    assert f"127.0.0.1:{EXPLICIT_PORT}" in daemon.status()["listening"]
    placeholder = None
    if HAS_CREDENTIALS:
        stored = daemon.llmtap("secrets", "set", "anthropic", "--host", "api.anthropic.com",
                               input=REAL_KEY)
        placeholder = re.search(r"placeholder: (\S+)", stored.stdout)[1]  # type: ignore[index]
    # By itself, the remote namespace cannot reach the upstream at all.
    route = netns.run(remote.ns, "ip", "route", "get", testbed.upstream_v4, check=False)
    assert route.returncode != 0 and "unreachable" in route.stderr, route
    alone = netns.run(remote.ns, "curl", "-sS", "--connect-timeout", "3", "-k",
                      f"https://{testbed.upstream_v4}/", check=False)
    assert alone.returncode == 7, alone

    with run_tunnel(testbed, daemon, remote, workdir) as tunnel:
        assert wait_until(lambda: tunnel.ups() == 1), tunnel.stderr()
        printed = tunnel.out.read_text()
        assert f"export HTTPS_PROXY=http://127.0.0.1:{EXPLICIT_PORT}" in printed
        assert "Only TCP is carried" in printed
        assert str(daemon.ca_pem) in printed  # the CA path hint
        assert REAL_KEY not in printed
        if placeholder:
            assert f"export ANTHROPIC_API_KEY='{placeholder}'" in printed
        exports = workdir / "exports.sh"
        exports.write_text(printed)
        # As the hint says: the remote's own roots plus llmtap's CA, where the exports point.
        home = workdir / "remote-home"
        home.mkdir()
        (home / ".llmtap-bundle.pem").write_text(Path(SYSTEM_ROOTS).read_text() + daemon.ca_pem.read_text())

        def remote_curl(path: str) -> subprocess.CompletedProcess[str]:
            return remote_shell(netns, remote, home, exports,
                                f"curl -sS --max-time 20 https://api.anthropic.com{path}")

        first = remote_curl("/v1/models?via=tunnel")
        assert first.returncode == 0, first.stderr + tunnel.stderr()
        assert json.loads(first.stdout)["path"] == "/v1/models"
        # It left from the client namespace, where llmtap runs.
        assert testbed.upstream_requests()[-1]["client"][0] in (testbed.client_v4, testbed.client_v6)
        sdk = remote_shell(netns, remote, home, exports, f"{sys.executable} -c '{SDK_CALL}'")
        assert sdk.returncode == 0, sdk.stderr
        assert json.loads(sdk.stdout)["model"] == "claude-sonnet-4-5"
        seen = testbed.upstream_requests()[-1]
        assert seen["path"] == "/v1/messages"
        records = daemon.records(expected=2)
        assert [r["path"] for r in records] == ["/v1/models?via=tunnel", "/v1/messages"]
        assert records[1]["model"] == "claude-sonnet-4-5"

        # The link drops at the far end (its sshd session is killed): the tunnel comes back.
        [session] = remote.connection_children()
        os.killpg(session, signal.SIGKILL)
        assert wait_until(lambda: tunnel.ups() == 2, timeout=20), tunnel.stderr()
        assert "the tunnel is down" in tunnel.stderr()
        assert remote_curl("/after-drop").returncode == 0
        # ... and when the local ssh dies.
        ssh_pid = tunnel.ssh_pid()
        assert ssh_pid
        os.kill(ssh_pid, signal.SIGKILL)
        assert wait_until(lambda: tunnel.ups() == 3, timeout=20), tunnel.stderr()
        assert tunnel.ssh_pid() not in (None, ssh_pid)
        assert remote_curl("/after-ssh-kill").returncode == 0

        tunnel.proc.send_signal(signal.SIGINT)
        assert tunnel.proc.wait(timeout=10) == 0
        assert "llmtap tunnel: stopped" in tunnel.stderr()
        assert tunnel.ssh_pid() is None
        assert wait_until(lambda: not remote.connection_children(), timeout=10)
        assert remote_curl("/after-stop").returncode != 0

    if not placeholder:
        pytest.skip("needs credential injection (issue 4)")
    # The key was injected here; the remote side only ever had the placeholder.
    sent = json.dumps(seen["headers"])  # x-api-key or authorization, as the SDK's version does
    assert REAL_KEY in sent and placeholder not in sent
    assert records[1]["credential"] == "anthropic"
    assert REAL_KEY not in exports.read_text()


SDK_CALL = """
import anthropic, json, os
client = anthropic.Anthropic(api_key=os.environ.get("ANTHROPIC_API_KEY", "sk-ant-no-secret-set"))
reply = client.messages.create(model="claude-sonnet-4-5", max_tokens=32,
                               messages=[{"role": "user", "content": "hi"}])
print(json.dumps({"text": reply.content[0].text, "model": reply.model}))
"""


# --- the explicit listener --------------------------------------------------------------------


def test_explicit_listener_taps_targets_and_relays_other_connects_blind(testbed, llmtap):
    daemon = llmtap(extra_toml=EXPLICIT_TOML)
    proxy = ("-x", f"http://127.0.0.1:{EXPLICIT_PORT}")
    tapped = testbed.curl("https://api.openai.com/v1/models?via=explicit", daemon.ca_pem, *proxy)
    assert json.loads(tapped.stdout)["path"] == "/v1/models"
    for host in (OTHER_HOST, SHARED_HOST):
        # Only the upstream's own certificate verifies: the tunnel was not decrypted.
        relayed = testbed.curl(f"https://{host}/blind", testbed.upstream_ca_pem, *proxy)
        assert json.loads(relayed.stdout)["host"] == host
        refused = testbed.curl(f"https://{host}/blind", daemon.ca_pem, *proxy, check=False)
        assert refused.returncode == 60, refused.stderr
    assert [r["path"] for r in daemon.records(expected=1)] == ["/v1/models?via=explicit"]
    # The worker's own connections were not sent back to it: one request each reached upstream.
    assert [r["path"] for r in testbed.upstream_requests()] == ["/v1/models", "/blind", "/blind"]


# --- gateway mode -----------------------------------------------------------------------------


@dataclass
class Container:
    ns: str
    interface: str  # its gateway's end, in the client namespace (docker0's role)
    own_interface: str
    gateway_v4: str


def gateway_interface(bed: Testbed) -> str:
    return f"{bed.tag}g"


def add_container(netns: Netns) -> Container:
    """A namespace whose only way out is the client namespace, routed and masqueraded there."""
    bed = netns.bed
    names = {host: [bed.upstream_v4, bed.upstream_v6] for host in (*TARGET_HOSTS, SHARED_HOST)}
    ns = netns.add("ct", hosts={**names, OTHER_HOST: [bed.other_v4]})
    net4, net6 = f"10.79.{bed.subnet}", f"fd79:{bed.subnet}"
    netns.link(ns, gateway_interface(bed), f"{bed.tag}k", net4, net6)
    netns.run(ns, "ip", "route", "add", "default", "via", f"{net4}.1")
    netns.run(ns, "ip", "-6", "route", "add", "default", "via", f"{net6}::1")
    netns.sysctl("net.ipv4.ip_forward", "1")
    netns.sysctl("net.ipv6.conf.all.forwarding", "1")
    table = "lt_masquerade"
    netns.undo_steps.append(lambda: netns.run(bed.client_ns, "nft", "delete", "table", "inet", table,
                                              check=False))
    netns.run(bed.client_ns, "nft", f"add table inet {table}; add chain inet {table} post "
              "{ type nat hook postrouting priority srcnat; }; "
              f'add rule inet {table} post oifname "{bed.tag}c" masquerade')
    return Container(ns, gateway_interface(bed), f"{bed.tag}k", f"{net4}.1")


def route_localnet(bed: Testbed, interface: str) -> str:
    return bed.ns_exec(bed.client_ns, "sysctl", "-n", f"net.ipv4.conf.{interface}.route_localnet"
                       ).stdout.strip()


def container_curl(netns: Netns, box: Container, url: str, cacert: Path, *extra: str
                   ) -> subprocess.CompletedProcess[str]:
    return netns.run(box.ns, "curl", "-sS", "--max-time", "20", "--cacert", str(cacert), *extra, url,
                     check=False)


def assert_container_tapped(netns: Netns, box: Container, daemon: Daemon, path: str) -> None:
    bed = netns.bed
    tapped = container_curl(netns, box, f"https://api.anthropic.com{path}", daemon.ca_pem)
    assert tapped.returncode == 0, tapped.stderr + daemon.stderr()
    assert json.loads(tapped.stdout)["path"] == path
    # Seen by the upstream once, from the client namespace: the proxy did not loop to itself.
    [seen] = [r for r in bed.upstream_requests() if r["path"] == path]
    assert seen["client"][0] in (bed.client_v4, bed.client_v6)
    # IPv6 to a target cannot reach the loopback proxy: it is reset, never let past the tap
    # (the request above fell back to IPv4 the same way).
    v6 = container_curl(netns, box, "https://api.anthropic.com/v6", bed.upstream_ca_pem, "-6")
    assert v6.returncode == 7, v6.stderr
    # Non-targets: forwarded as before (OTHER_HOST), or relayed by SNI (SHARED_HOST's address is
    # a target's), both with the upstream's own certificate.
    for host in (OTHER_HOST, SHARED_HOST):
        direct = container_curl(netns, box, f"https://{host}/untouched", bed.upstream_ca_pem, "-4")
        assert direct.returncode == 0, direct.stderr
        assert json.loads(direct.stdout)["host"] == host


def assert_loopback_stays_closed(netns: Netns, box: Container) -> None:
    """route_localnet must not let a container talk to the host's loopback services itself
    (CVE-2020-8558): here it sends its own packets to 127.0.0.1:<proxy port>, which only DNATed
    connections may reach."""
    netns.run(box.ns, "sysctl", "-qw", f"net.ipv4.conf.{box.own_interface}.route_localnet=1")
    netns.run(box.ns, "ip", "addr", "flush", "dev", "lo")  # so 127/8 is not local in the container
    netns.run(box.ns, "ip", "route", "add", "127.0.0.0/8", "via", box.gateway_v4)
    try:
        probe = netns.run(box.ns, "curl", "-sS", "--connect-timeout", "2", "http://127.0.0.1:8443/",
                          check=False)
        assert probe.returncode == 28, probe  # dropped, not answered
    finally:
        netns.run(box.ns, "ip", "route", "del", "127.0.0.0/8")
        netns.run(box.ns, "ip", "addr", "add", "127.0.0.1/8", "dev", "lo")


def assert_gateway_undone(netns: Netns, box: Container) -> None:
    bed = netns.bed
    assert wait_until(lambda: route_localnet(bed, box.interface) == "0")
    assert wait_until(lambda: "llmtap" not in bed.nft_tables() and "LLMTAP" not in bed.iptables_rules())
    direct = container_curl(netns, box, "https://api.anthropic.com/direct", bed.upstream_ca_pem, "-4")
    assert direct.returncode == 0, direct.stderr


def test_gateway_nft_taps_containers_and_sigkill_undoes_it(testbed, llmtap, netns):
    interface = gateway_interface(testbed)
    daemon = llmtap(gateway_interfaces=[interface])
    assert f"gateway interface {interface} not found" in daemon.stderr()
    box = add_container(netns)  # docker0 appears after llmtap started: tapped all the same
    assert wait_until(lambda: route_localnet(testbed, interface) == "1", timeout=10)
    assert daemon.status()["gateway_interfaces"] == [interface]
    assert "chain gateway_prerouting" in testbed.ns_exec(
        testbed.client_ns, "nft", "list", "table", "inet", "llmtap").stdout
    assert_container_tapped(netns, box, daemon, "/from/container")
    [record] = daemon.records(expected=1)
    assert record["path"] == "/from/container"
    assert_loopback_stays_closed(netns, box)
    assert f"gateway: traffic forwarded from {interface}" in daemon.llmtap("status").stdout
    os.kill(daemon.proc.pid, signal.SIGKILL)  # the kernel drops the table; the guardian the sysctl
    assert_gateway_undone(netns, box)


def test_gateway_iptables_taps_containers_and_cleanup_restores(testbed, llmtap, netns):
    box = add_container(netns)
    daemon = llmtap(backend="iptables", gateway_interfaces=[box.interface])
    assert route_localnet(testbed, box.interface) == "1"
    rules = testbed.iptables_rules()
    assert f"-A PREROUTING -i {box.interface} -p tcp -m comment --comment llmtap -j LLMTAP_GW" in rules
    assert_container_tapped(netns, box, daemon, "/from/container-iptables")
    assert_loopback_stays_closed(netns, box)
    os.kill(daemon.proc.pid, signal.SIGKILL)  # the guardian removes the rules and the sysctl
    assert_gateway_undone(netns, box)
    # Had the guardian died too, `llmtap cleanup` (or the next start) restores what was recorded.
    record = daemon.root / "run" / "route_localnet.json"
    record.write_text(json.dumps({box.interface: "0"}))
    testbed.ns_exec(testbed.client_ns, "sysctl", "-qw", f"net.ipv4.conf.{box.interface}.route_localnet=1")
    assert "route_localnet" in daemon.llmtap("cleanup").stdout
    assert route_localnet(testbed, box.interface) == "0" and not record.exists()
