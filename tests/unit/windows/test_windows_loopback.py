"""The Windows loopback-only redirect on real packet bytes: the rewritten packets are handed to the
Linux kernel's own TCP stack, which answers a SYN only when every checksum is right, from a
listener bound to 127.0.0.1 / ::1 alone. Then the decisions that keep two clients apart and keep
direct connections out."""

from __future__ import annotations

import os
import random
import select
import socket
import struct
import time
from collections.abc import Iterator
from typing import Any

import psutil
import pytest
from llmtap.platform.base import RedirectPlan, TargetAddresses
from llmtap.platform.windows import inprocess, packets
from llmtap.platform.windows.loopback import BUSY_S, Action, Flow, Flows, Redirector, Targets
from llmtap.platform.windows.tcptable import TcpOwners, TcpRow
from win_packets import ACK, PSH, RST, SYN, checksum, fields, ipv4, ipv6

CLIENT4, TARGET4, OTHER_NIC4 = "192.168.1.23", "160.79.104.10", "10.8.0.2"
CLIENT6, TARGET6 = "2a01:e0a:1d5:7c40:8d3:21f4:9a1b:3c2e", "2607:6bc0::10"
ADDRESSES = TargetAddresses(v4=frozenset({TARGET4}), v6=frozenset({TARGET6}))
IPV6_HDRINCL = 36  # linux/in6.h (Linux >= 4.5); not in the socket module
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="raw sockets need root")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def redirector(port: int = 8443, direct: set[tuple[Any, Any]] | None = None,
               clock: Clock | None = None) -> Redirector:
    plan = RedirectPlan(proxy_port=port, service_uid=0)
    return Redirector(port, Targets.build(plan, ADDRESSES), Flows(clock=clock or Clock()),
                      exempt=lambda client: False,
                      direct=lambda local, remote: (local, remote) in (direct or set()))


# --- the kernel as the independent checker -------------------------------------------------------


@pytest.fixture(params=[4, 6], ids=["ipv4", "ipv6"])
def listener(request: pytest.FixtureRequest) -> Iterator[tuple[int, socket.socket]]:
    family = socket.AF_INET if request.param == 4 else socket.AF_INET6
    server = socket.socket(family, socket.SOCK_STREAM)
    server.bind(("127.0.0.1" if request.param == 4 else "::1", 0))
    server.listen()
    yield request.param, server
    server.close()


def inject_and_wait_for_synack(version: int, raw: bytes, proxy_port: int, client_port: int) -> bool:
    """Sends the packet into the loopback path as it is, then watches for the stack's answer."""
    if version == 4:
        sender = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        watcher = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
    else:
        sender = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)
        sender.setsockopt(socket.IPPROTO_IPV6, IPV6_HDRINCL, 1)  # the header is ours, as is
        watcher = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_TCP)
    with sender, watcher:
        sender.sendto(raw, ("127.0.0.1" if version == 4 else "::1", 0))
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            if not select.select([watcher], [], [], 0.1)[0]:
                continue
            data = watcher.recv(4096)
            segment = data[(data[0] & 0x0F) * 4:] if version == 4 else data  # v6: no IP header
            sport, dport = struct.unpack_from("!HH", segment)
            if (sport, dport) == (proxy_port, client_port) and segment[13] & (SYN | ACK) == SYN | ACK:
                return True
    return False


@as_root
def test_the_rewritten_syn_is_answered_by_a_loopback_only_listener(
    listener: tuple[int, socket.socket],
) -> None:
    version, server = listener
    port = server.getsockname()[1]
    r = redirector(port)
    syn = (ipv4(CLIENT4, TARGET4, 40001, 443, SYN) if version == 4
           else ipv6(CLIENT6, TARGET6, 40001, 443, SYN))
    rewritten = r.request(syn)
    assert isinstance(rewritten, bytes)
    assert inject_and_wait_for_synack(version, rewritten, port, 40001)


@as_root
def test_the_kernel_drops_it_when_a_checksum_is_wrong(listener: tuple[int, socket.socket]) -> None:
    """The control: the stack does check, so the answer above proves our checksums."""
    version, server = listener
    port = server.getsockname()[1]
    syn = (ipv4(CLIENT4, TARGET4, 40002, 443, SYN) if version == 4
           else ipv6(CLIENT6, TARGET6, 40002, 443, SYN))
    rewritten = bytearray(redirector(port).request(syn))  # type: ignore[arg-type]
    rewritten[-1] ^= 0x01  # the last TCP option byte: only the TCP checksum can notice
    assert not inject_and_wait_for_synack(version, bytes(rewritten), port, 40002)


# --- the rewrite, field by field (checksums verified by win_packets.fields) ------------------------


@pytest.mark.parametrize("version", [4, 6])
def test_every_field_but_addresses_ports_and_checksums_is_kept(version: int) -> None:
    build, client, target, lo = ((ipv4, CLIENT4, TARGET4, "127.0.0.1") if version == 4
                                 else (ipv6, CLIENT6, TARGET6, "::1"))
    r = redirector()
    r.request(build(client, target, 40003, 443, SYN))
    before = build(client, target, 40003, 443, ACK | PSH, b"\x16\x03\x01" + bytes(range(97)))
    after = r.request(before)
    assert isinstance(after, bytes) and len(after) == len(before)
    a, b = fields(before), fields(after)
    assert (b["src"], b["dst"]) == ((lo, 40003), (lo, 8443))
    assert {k: v for k, v in a.items() if k not in ("src", "dst")} == \
           {k: v for k, v in b.items() if k not in ("src", "dst")}
    reply = r.reply(build(lo, lo, 8443, 40003, ACK | PSH, b"\x17\x03\x03abc"))
    assert isinstance(reply, bytes)
    assert (fields(reply)["src"], fields(reply)["dst"]) == ((target, 443), (client, 40003))
    assert fields(reply)["payload"] == b"\x17\x03\x03abc"


# --- decisions -----------------------------------------------------------------------------------


def test_a_port_held_by_another_client_is_refused_not_mixed_up() -> None:
    clock = Clock()
    r = redirector(clock=clock)
    assert isinstance(r.request(ipv4(CLIENT4, TARGET4, 40010, 443, SYN)), bytes)
    # the same port from another of this machine's addresses (a VPN): same loopback key
    assert r.request(ipv4(OTHER_NIC4, TARGET4, 40010, 443, SYN)) is Action.DROP
    assert r.refused == 1
    assert r.flows.get(("127.0.0.1", 40010)) == Flow((CLIENT4, 40010), (TARGET4, 443))
    # the other family has its own loopback address: no conflict
    assert isinstance(r.request(ipv6(CLIENT6, TARGET6, 40010, 443, SYN)), bytes)
    clock.now += BUSY_S + 1  # the first one went quiet long ago
    assert isinstance(r.request(ipv4(OTHER_NIC4, TARGET4, 40010, 443, SYN)), bytes)


def test_a_reset_forgets_the_connection() -> None:
    r = redirector()
    r.request(ipv4(CLIENT4, TARGET4, 40011, 443, SYN))
    assert isinstance(r.request(ipv4(CLIENT4, TARGET4, 40011, 443, RST | ACK)), bytes)
    assert len(r.flows) == 0
    r.request(ipv4(CLIENT4, TARGET4, 40012, 443, SYN))
    assert isinstance(r.reply(ipv4("127.0.0.1", "127.0.0.1", 8443, 40012, RST)), bytes)
    assert len(r.flows) == 0


def test_replies_that_are_not_on_loopback_are_left_alone() -> None:
    r = redirector()
    r.request(ipv4(CLIENT4, TARGET4, 40013, 443, SYN))
    # the proxy's own upstream connection from port 8443 would not be loopback-to-loopback
    assert r.reply(ipv4(CLIENT4, TARGET4, 8443, 40013, ACK)) is Action.PASS
    assert r.reply(ipv6("::1", "::1", 8443, 40013, ACK)) is Action.PASS  # the other family's key


class Peer:
    def __init__(self, *peer: Any) -> None:
        self.peer = peer

    def getpeername(self) -> tuple[Any, ...]:
        return self.peer


def test_a_direct_connection_to_the_listener_is_never_taken_for_a_redirected_one() -> None:
    """An attacker on this machine binds 127.0.0.1:cp itself (a stale entry's port) and connects
    to the proxy: its real socket at LO:cp gives it away."""
    r = redirector(direct={(("127.0.0.1", 40014), ("127.0.0.1", 8443))})
    r.request(ipv4(CLIENT4, TARGET4, 40014, 443, SYN))
    with pytest.raises(LookupError, match="not redirected"):
        r.original_addr(Peer("127.0.0.1", 40014))
    with pytest.raises(LookupError, match="not redirected"):
        r.original_addr(Peer("127.0.0.1", 40099))  # no entry at all


def test_the_windows_proxy_listens_on_loopback_only() -> None:
    assert inprocess.LISTEN_HOSTS == ("127.0.0.1", "::1")


def kernel_rows() -> list[TcpRow]:
    """This machine's real TCP table (psutil reads the kernel's), as GetExtendedTcpTable rows."""
    return [TcpRow((c.laddr.ip, c.laddr.port), (c.raddr.ip, c.raddr.port) if c.raddr else ("", 0),
                   5, c.pid or 0) for c in psutil.net_connections(kind="tcp") if c.laddr]


def test_attack_a_local_process_binding_a_redirected_port_gets_no_original_destination() -> None:
    """Real sockets: the attacker binds 127.0.0.1:cp (a port with a redirect entry) and connects
    to the loopback listener, hoping to be taken for the redirected client."""
    with socket.socket() as listener, socket.socket() as attacker:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        attacker.bind(("127.0.0.1", 0))
        cp = attacker.getsockname()[1]
        guarded = Redirector(port, Targets.build(RedirectPlan(proxy_port=port, service_uid=0),
                                                 ADDRESSES), Flows(), lambda client: False,
                             TcpOwners(kernel_rows).connected)
        guarded.request(ipv4(CLIENT4, TARGET4, cp, 443, SYN))
        attacker.connect(("127.0.0.1", port))
        accepted, _ = listener.accept()
        with accepted:
            with pytest.raises(LookupError, match="not redirected"):
                guarded.original_addr(accepted)
            unguarded = Redirector(port, guarded.targets, guarded.flows, lambda client: False)
            assert unguarded.original_addr(accepted) == (TARGET4, 443)  # what the guard stops


@pytest.mark.parametrize("seed", range(200))
def test_the_fast_checksum_agrees_with_the_word_by_word_one(seed: int) -> None:
    rng = random.Random(seed)
    data = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 1600)))
    for sample in (data, b"\xff" * (seed % 7 * 2), bytes(seed % 5)):
        assert packets.internet_checksum(sample) == checksum(sample)
