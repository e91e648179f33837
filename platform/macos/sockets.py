"""Which process owns a TCP connection, on macOS: psutil, which asks libproc (proc_pidinfo with
PROC_PIDLISTFDS, then proc_pidfdinfo's socket_fdinfo per descriptor) as root.

A full scan reads every descriptor of every process, so the processes that made the latest
connections are asked first (an agent opens many): one proc_pidinfo round for a hit. When the
connection's remote end is known (the original destination DIOCNATLOOK gave), a socket must match
it too, so a reused local port of a closed socket cannot be taken for this one.
"""

from __future__ import annotations

import contextlib
import ipaddress
from collections.abc import Iterable
from typing import Any

import psutil

Endpoint = tuple[str, int]


def normal(ip: str) -> str:
    """`::ffff:1.2.3.4` -> `1.2.3.4`: how the proxy and libproc may spell the same address."""
    address = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return str(address)


def matches(conn: Any, local: Endpoint, remote: Endpoint | None) -> bool:
    laddr: Any = getattr(conn, "laddr", None)
    raddr: Any = getattr(conn, "raddr", None)
    if not laddr or (normal(laddr.ip), laddr.port) != local:
        return False
    return remote is None or (bool(raddr) and (normal(raddr.ip), raddr.port) == remote)


def pid_of_connection(local: Endpoint, remote: Endpoint | None = None,
                      recent: Iterable[int] = ()) -> int | None:
    local = (normal(local[0]), local[1])
    remote = (normal(remote[0]), remote[1]) if remote else None
    for pid in recent:
        with contextlib.suppress(psutil.Error, OSError):
            if any(matches(c, local, remote) for c in psutil.Process(pid).net_connections("tcp")):
                return pid
    with contextlib.suppress(psutil.Error, OSError):
        for conn in psutil.net_connections(kind="tcp"):
            if matches(conn, local, remote) and conn.pid is not None:
                return int(conn.pid)
    return None
