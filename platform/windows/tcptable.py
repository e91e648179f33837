"""Windows: which process owns each TCP socket, from GetExtendedTcpTable(TCP_TABLE_OWNER_PID_ALL).

The tables are parsed from their raw bytes (pure, tested on Linux with tables laid out as
iphlpapi lays them out: tcpmib.h's MIB_TCPTABLE_OWNER_PID and MIB_TCP6TABLE_OWNER_PID); only
`read_table` touches iphlpapi. mitmproxy <= 6's TcpConnectionTable used the same call and rows
(mitmproxy/platform/windows.py).
"""

from __future__ import annotations

import ctypes
import ipaddress
import socket
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from llmtap.platform.windows.packets import Endpoint, normalize

TCP_TABLE_OWNER_PID_ALL = 5
NO_ERROR = 0
ERROR_INSUFFICIENT_BUFFER = 122
MAX_TRIES = 4  # the table may grow between the size query and the read
# Rows: DWORDs in the machine's order (little-endian on every Windows), addresses as on the wire,
# a port's DWORD holding the port in network order in its first two bytes.
ROW4 = struct.Struct("<I4sI4sII")  # dwState, dwLocalAddr, dwLocalPort, dwRemoteAddr, dwRemotePort, pid
ROW6 = struct.Struct("<16sII16sIIII")  # local addr, scope, port, remote addr, scope, port, state, pid
MIB_TCP_STATE_LISTEN = 2
MIB_TCP_STATE_ESTAB = 5


@dataclass(frozen=True)
class TcpRow:
    local: Endpoint
    remote: Endpoint
    state: int
    pid: int


def _port(dword: int) -> int:
    """The port in a row's port DWORD (its two low-address bytes, in network order)."""
    return ((dword & 0xFF) << 8) | ((dword >> 8) & 0xFF)


def parse_table(buffer: bytes, family: int) -> list[TcpRow]:
    """The rows of a MIB_TCPTABLE_OWNER_PID (AF_INET) or MIB_TCP6TABLE_OWNER_PID (AF_INET6)."""
    if len(buffer) < 4:
        raise ValueError("a TCP table is at least its 4-byte row count")
    (count,) = struct.unpack_from("<I", buffer)
    row = ROW4 if family == socket.AF_INET else ROW6
    if 4 + count * row.size > len(buffer):
        raise ValueError(f"the table says {count} rows but holds {(len(buffer) - 4) // row.size}")
    rows = []
    for offset in range(4, 4 + count * row.size, row.size):
        if family == socket.AF_INET:
            state, laddr, lport, raddr, rport, pid = ROW4.unpack_from(buffer, offset)
        else:
            laddr, _, lport, raddr, _, rport, state, pid = ROW6.unpack_from(buffer, offset)
        rows.append(TcpRow((normalize(str(ipaddress.ip_address(laddr))), _port(lport)),
                           (normalize(str(ipaddress.ip_address(raddr))), _port(rport)),
                           state, pid))
    return rows


def read_table(family: int) -> bytes:
    """The raw table from iphlpapi (Windows only)."""
    windll = getattr(ctypes, "windll", None)
    if windll is None:
        raise OSError("GetExtendedTcpTable exists only on Windows")
    size = ctypes.c_ulong(0)
    for _ in range(MAX_TRIES):
        buffer = ctypes.create_string_buffer(size.value or 4)
        code = windll.iphlpapi.GetExtendedTcpTable(
            buffer, ctypes.byref(size), False, family, TCP_TABLE_OWNER_PID_ALL, 0)
        if code == NO_ERROR:
            return buffer.raw[:max(size.value, 4)]
        if code != ERROR_INSUFFICIENT_BUFFER:
            raise OSError(code, f"GetExtendedTcpTable failed ({code})")
    raise OSError(ERROR_INSUFFICIENT_BUFFER, "the TCP table kept growing")


def machine_rows() -> list[TcpRow]:
    return [row for family in (socket.AF_INET, socket.AF_INET6)
            for row in parse_table(read_table(family), family)]


class TcpOwners:
    """Local (and remote) address -> the owning pid, read afresh on each question."""

    def __init__(self, rows: Callable[[], Iterable[TcpRow]] = machine_rows) -> None:
        self.rows = rows

    def owner(self, local: Endpoint, remote: Endpoint | None = None) -> int | None:
        """The pid of the socket at `local` (connected to `remote`, when given: exact)."""
        local = (normalize(local[0]), local[1])
        found = None
        for row in self._rows():
            if row.local != local or (remote is not None and row.remote != remote):
                continue
            if row.state != MIB_TCP_STATE_LISTEN:
                return row.pid
            found = found or row.pid  # a listener only if no connection has that address
        return found

    def connected(self, local: Endpoint, remote: Endpoint) -> bool:
        """Whether a real socket has exactly this local and remote address."""
        return any(row.local == local and row.remote == remote for row in self._rows())

    def _rows(self) -> list[TcpRow]:
        try:
            return list(self.rows())
        except (OSError, ValueError):
            return []  # no answer: nobody is attributed, nothing is taken for a direct connection
