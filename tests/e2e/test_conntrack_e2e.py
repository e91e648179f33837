"""Stale connection-tracking entries never decide where a new connection goes.

The kernel NATs a connection (the redirect to the proxy) when its first packet makes a new
conntrack entry; a packet that finds an entry with its tuple takes that entry's decision. The
clients' connections and the proxy's own upstream connections share one tuple space (this
machine's address to the API's, port 443), so a source port used again while an old entry lives
(one whose end conntrack never saw stays ESTABLISHED for five days) would:
- send a client direct, unintercepted (it sees the provider's certificate; CI saw this once), or
- send the proxy's upstream connection into the proxy itself (the benchmark saw a 502 so).
The proxy's connections are tracked in a conntrack zone of their own (the redirect's `zone_own`
chain). Each test makes such an entry on purpose: a connection from a chosen port closed with a
reset that a raw-priority rule drops before conntrack sees it.
"""

from __future__ import annotations

import json
import pwd
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest
from testbed import Daemon, Testbed

pytestmark = pytest.mark.root

# Below the ephemeral range, so that no other connection takes them; one per test and backend,
# since an entry lives on in the test bed (five days, or until its namespace goes).
PORTS = {"nft": (31400, 31410, 31412), "iptables": (31500, 31510, 31512)}
STALE_PORTS = ", ".join(str(port) for ports in PORTS.values() for port in ports[:2])
BACKENDS = pytest.mark.parametrize("backend", sorted(PORTS))

ABANDON = textwrap.dedent("""
    import os, socket, struct, sys
    if len(sys.argv) > 4:
        os.setgid(int(sys.argv[5])); os.setuid(int(sys.argv[4]))
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close: a reset
    s.bind(("", int(sys.argv[3])))
    s.connect((sys.argv[1], int(sys.argv[2])))
    s.close()
""")


@pytest.fixture
def resets_unseen(testbed: Testbed) -> Iterator[None]:
    """Resets from those ports are dropped before conntrack: their entries stay ESTABLISHED."""
    rules = (f"table inet lt_stale {{\n chain out {{\n  type filter hook output priority -400;\n"
             f"  tcp sport {{ {STALE_PORTS} }} tcp flags rst drop\n }}\n}}\n")
    testbed.ns_exec(testbed.client_ns, "nft", "-f", "-", input=rules)
    try:
        yield
    finally:
        testbed.ns_exec(testbed.client_ns, "nft", "delete", "table", "inet", "lt_stale", check=False)


def abandon(testbed: Testbed, port: int, as_user: str | None = None) -> None:
    """A connection from `port` to the upstream's port 443, gone without conntrack seeing it."""
    who: list[str] = []
    if as_user:
        entry = pwd.getpwnam(as_user)
        who = [str(entry.pw_uid), str(entry.pw_gid)]
    testbed.ns_exec(testbed.client_ns, sys.executable, "-c", ABANDON, testbed.upstream_v4, "443",
                    str(port), *who)


def entries(testbed: Testbed, port: int) -> str:
    table = testbed.ns_exec(testbed.client_ns, "cat", "/proc/net/nf_conntrack").stdout
    return "\n".join(line for line in table.splitlines() if f"sport={port} " in line)


@BACKENDS
def test_a_stale_entry_of_the_proxys_own_never_sends_a_client_direct(testbed, llmtap,
                                                                     resets_unseen, backend):
    stale = PORTS[backend][0]
    daemon: Daemon = llmtap(backend=backend)
    abandon(testbed, stale, as_user="llmtap")  # the service user's: not redirected
    assert "ESTABLISHED" in entries(testbed, stale)
    answer = testbed.curl("https://api.openai.com/conntrack/client", daemon.ca_pem, "-4",
                          "--local-port", str(stale))
    assert json.loads(answer.stdout)["path"] == "/conntrack/client"


@BACKENDS
def test_a_stale_client_entry_never_sends_the_proxys_connection_into_the_proxy(testbed, llmtap,
                                                                             resets_unseen, backend):
    _, stale, client_port = PORTS[backend]
    daemon: Daemon = llmtap(backend=backend, upstream={"pool_per_host": 0})
    abandon(testbed, stale)  # root's: redirected to the proxy, NATed
    assert "src=127.0.0.1 dst=10.77" in entries(testbed, stale)  # its reply: from the proxy
    # The proxy's next upstream connection can only take that port (the client has its own).
    sysctl = ["sysctl", "-n", "net.ipv4.ip_local_port_range"]
    before = testbed.ns_exec(testbed.client_ns, *sysctl).stdout.split()
    testbed.ns_exec(testbed.client_ns, "sysctl", "-qw",
                    f"net.ipv4.ip_local_port_range={stale} {stale + 1}")
    try:
        answer = testbed.curl("https://api.openai.com/conntrack/proxy", daemon.ca_pem, "-4",
                              "--local-port", str(client_port), check=False)
    finally:
        subprocess.run(["ip", "netns", "exec", testbed.client_ns, "sysctl", "-qw",
                        f"net.ipv4.ip_local_port_range={before[0]} {before[1]}"], check=True)
    assert answer.returncode == 0 and '"/conntrack/proxy"' in answer.stdout, (
        answer.stdout[:300], daemon.stderr()[-1500:])
