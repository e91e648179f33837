"""Windows attribution: GetExtendedTcpTable's tables parsed from bytes laid out by ctypes structures
that copy tcpmib.h (MIB_TCPROW_OWNER_PID, MIB_TCP6ROW_OWNER_PID: an independent description of
the layout), then the pid of a redirected connection found through the redirect table and
described, through the Attribution stage, as on Linux."""

from __future__ import annotations

import asyncio
import ctypes
import ipaddress
import os
import socket
from typing import Any

from llmtap.addons.attribution import Attribution
from llmtap.platform.base import RedirectPlan, TargetAddresses
from llmtap.platform.windows.attribution import RedirectedLookup, Resolver, resolver_for
from llmtap.platform.windows.loopback import Flows, Redirector, Targets
from llmtap.platform.windows.tcptable import (
    MIB_TCP_STATE_ESTAB,
    MIB_TCP_STATE_LISTEN,
    TcpOwners,
    TcpRow,
    parse_table,
)
from win_packets import SYN, ipv4, ipv6

DWORD = ctypes.c_uint32
CLIENT4, TARGET4 = "192.168.1.23", "160.79.104.10"
CLIENT6, TARGET6 = "2a01:e0a:1d5:7c40:8d3:21f4:9a1b:3c2e", "2607:6bc0::10"
MIB_TCP_STATE_TIME_WAIT = 11


class MibTcpRowOwnerPid(ctypes.LittleEndianStructure):
    _fields_ = [("dwState", DWORD), ("dwLocalAddr", ctypes.c_ubyte * 4), ("dwLocalPort", DWORD),
                ("dwRemoteAddr", ctypes.c_ubyte * 4), ("dwRemotePort", DWORD),
                ("dwOwningPid", DWORD)]


class MibTcp6RowOwnerPid(ctypes.LittleEndianStructure):
    _fields_ = [("ucLocalAddr", ctypes.c_ubyte * 16), ("dwLocalScopeId", DWORD),
                ("dwLocalPort", DWORD), ("ucRemoteAddr", ctypes.c_ubyte * 16),
                ("dwRemoteScopeId", DWORD), ("dwRemotePort", DWORD), ("dwState", DWORD),
                ("dwOwningPid", DWORD)]


def port_dword(port: int) -> int:
    """As iphlpapi stores it: the port's network-order bytes first, read as a little-endian DWORD."""
    return int.from_bytes(port.to_bytes(2, "big") + b"\0\0", "little")


def table(rows: list[tuple[int, str, int, str, int, int]], v6: bool = False) -> bytes:
    """A MIB_TCP(6)TABLE_OWNER_PID: dwNumEntries, then the rows (state, local, remote, pid)."""
    row_type = MibTcp6RowOwnerPid if v6 else MibTcpRowOwnerPid
    array = (row_type * len(rows))()
    for slot, (state, lip, lport, rip, rport, pid) in zip(array, rows, strict=True):
        slot.dwState, slot.dwOwningPid = state, pid
        slot.dwLocalPort, slot.dwRemotePort = port_dword(lport), port_dword(rport)
        local, remote = ipaddress.ip_address(lip).packed, ipaddress.ip_address(rip).packed
        if v6:
            slot.ucLocalAddr[:], slot.ucRemoteAddr[:] = list(local), list(remote)
            slot.dwLocalScopeId = 0
        else:
            slot.dwLocalAddr[:], slot.dwRemoteAddr[:] = list(local), list(remote)
    return DWORD(len(rows)).value.to_bytes(4, "little") + bytes(array)


# A machine as `netstat -ano` would show it: a listener, a browser, the agent (node.exe) with one
# connection to the target, a TIME_WAIT leftover on the same port number from another address.
V4 = [
    (MIB_TCP_STATE_LISTEN, "0.0.0.0", 135, "0.0.0.0", 0, 1020),
    (MIB_TCP_STATE_LISTEN, "127.0.0.1", 8443, "0.0.0.0", 0, 4242),
    (MIB_TCP_STATE_ESTAB, CLIENT4, 51544, "140.82.112.4", 443, 9120),
    (MIB_TCP_STATE_ESTAB, CLIENT4, 52431, TARGET4, 443, 7316),
    (MIB_TCP_STATE_TIME_WAIT, "10.8.0.2", 52431, "93.184.216.34", 443, 0),
]
V6 = [
    (MIB_TCP_STATE_LISTEN, "::1", 8443, "::", 0, 4242),
    (MIB_TCP_STATE_ESTAB, CLIENT6, 52432, TARGET6, 443, 7316),
]


def rows() -> list[TcpRow]:
    return (parse_table(table(V4), socket.AF_INET)
            + parse_table(table(V6, v6=True), socket.AF_INET6))


def test_rows_are_read_as_iphlpapi_lays_them_out() -> None:
    parsed = rows()
    assert TcpRow((CLIENT4, 52431), (TARGET4, 443), MIB_TCP_STATE_ESTAB, 7316) in parsed
    assert TcpRow(("::1", 8443), ("::", 0), MIB_TCP_STATE_LISTEN, 4242) in parsed
    assert TcpRow((CLIENT6, 52432), (TARGET6, 443), MIB_TCP_STATE_ESTAB, 7316) in parsed
    assert len(parsed) == len(V4) + len(V6)


def test_a_truncated_table_is_refused() -> None:
    raw = table(V4)
    for cut in (raw[:3], raw[:-1]):
        try:
            parse_table(cut, socket.AF_INET)
        except ValueError:
            continue
        raise AssertionError("a truncated table was accepted")


def test_owner_is_exact_with_the_remote_and_prefers_a_connection_to_a_listener() -> None:
    owners = TcpOwners(rows)
    assert owners.owner((CLIENT4, 52431), (TARGET4, 443)) == 7316
    assert owners.owner(("10.8.0.2", 52431), (TARGET4, 443)) is None  # another connection
    assert owners.owner(("127.0.0.1", 8443)) == 4242
    assert owners.connected(("::1", 8443), ("::", 0))
    assert not owners.connected(("127.0.0.1", 52431), ("127.0.0.1", 8443))


def test_no_table_means_no_answer_never_an_exception() -> None:
    def broken() -> list[TcpRow]:
        raise OSError(50, "GetExtendedTcpTable exists only on Windows")

    assert TcpOwners(broken).owner((CLIENT4, 1)) is None
    assert TcpOwners().owner((CLIENT4, 1)) is None  # Linux: iphlpapi is not there


def redirector() -> Redirector:
    plan = RedirectPlan(proxy_port=8443, service_uid=0)
    targets = TargetAddresses(v4=frozenset({TARGET4}), v6=frozenset({TARGET6}))
    return Redirector(8443, Targets.build(plan, targets), Flows(), lambda client: False,
                      TcpOwners(rows).connected)


def test_the_proxys_peer_is_attributed_to_the_process_owning_the_real_connection() -> None:
    """The proxy sees 127.0.0.1:52431; the agent's socket is 192.168.1.23:52431 -> target:443."""
    r = redirector()
    r.request(ipv4(CLIENT4, TARGET4, 52431, 443, SYN))
    r.request(ipv6(CLIENT6, TARGET6, 52432, 443, SYN))
    lookup = RedirectedLookup(r, TcpOwners(rows))
    assert lookup._pid("127.0.0.1", 52431, None) == 7316
    assert lookup._pid("::1", 52432, None) == 7316
    assert lookup._pid("127.0.0.1", 51544, None) is None  # not redirected: nobody to name


class OwnedByThisProcess(TcpOwners):
    def owner(self, local: Any, remote: Any = None) -> int | None:
        return os.getpid()


class Client:
    def __init__(self, peer: tuple[str, int]) -> None:
        self.id, self.peername, self.sockname = "c1", peer, ("127.0.0.1", 8443)


def test_the_attribution_stage_gets_the_same_answer_as_on_linux() -> None:
    r = redirector()
    r.request(ipv4(CLIENT4, TARGET4, 52431, 443, SYN))
    stage = Attribution(resolve=Resolver(RedirectedLookup(r, OwnedByThisProcess(rows))))

    async def connect() -> Any:
        stage.client_connected(Client(("127.0.0.1", 52431)))  # type: ignore[arg-type]
        return await stage._pending["c1"]

    process = asyncio.run(connect())
    assert process["pid"] == os.getpid()
    assert process["tool"] == "python"  # described by proclookup.describe, as on Linux
    assert stage.asked == stage.answered == 1


def test_a_direct_connection_is_attributed_to_nobody() -> None:
    stage = Attribution(resolve=Resolver(RedirectedLookup(redirector(), OwnedByThisProcess(rows))))
    stage.client_connected(Client(("127.0.0.1", 60000)))  # type: ignore[arg-type]
    assert stage.process_of(type("F", (), {"client_conn": Client(("127.0.0.1", 60000))})()) is None


def test_only_a_windivert_backend_gets_a_resolver() -> None:
    assert resolver_for(object()) is None
    assert isinstance(resolver_for(type("B", (), {"redirector": redirector()})()), Resolver)
