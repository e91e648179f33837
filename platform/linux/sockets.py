"""Which process holds a TCP socket on Linux: the socket by its addresses (sock_diag over netlink,
or /proc/net/tcp*), then its inode among the processes' descriptors (/proc/PID/fd). Read by the
root supervisor for llmtap.proclookup; nothing here runs a command."""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import struct
from pathlib import Path

_TCP_STATES_OPEN = {"01", "02", "03", "04", "05", "06", "08", "09", "0B"}  # not LISTEN/CLOSE


def _hex_address(text: str) -> tuple[str, int]:
    """`0100007F:1F90` (IPv4) or the 32-hex-digit IPv6 form, as in /proc/net/tcp*."""
    address, port = text.split(":")
    raw = bytes.fromhex(address)
    # The kernel prints each 32-bit word in host (little-endian) order.
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    ip = ipaddress.ip_address(words)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return str(ip), int(port, 16)


def normalise_ip(ip: str) -> str:
    parsed = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped:
        return str(parsed.ipv4_mapped)
    return str(parsed)


def proc_net_address(ip: str, port: int) -> str:
    """(ip, port) as /proc/net/tcp* prints it: each 32-bit word in host (little-endian) order."""
    raw = ipaddress.ip_address(ip).packed
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return f"{words.hex().upper()}:{port:04X}"


def socket_inode(ip: str, port: int, proc: Path = Path("/proc"),
                 remote: tuple[str, int] | None = None) -> tuple[int, int] | None:
    """(inode, owner uid) of the connected TCP socket whose local address is (ip, port), and
    whose remote address is `remote` when given (sockets to different peers may share a local
    port: only both addresses name one socket).

    The tables can be long (TIME_WAIT), so the address is searched as text, not parsed per line.
    """
    needles = [("net/tcp", proc_net_address(ip, port), _peer(remote, False))] if ":" not in ip else []
    mapped = f"::ffff:{ip}" if ":" not in ip else ip  # a dual-stack socket lists IPv4 as mapped
    needles.append(("net/tcp6", proc_net_address(mapped, port), _peer(remote, True)))
    for table, needle, peer in needles:
        try:
            text = (proc / table).read_text()
        except OSError:
            continue
        position = text.find(f" {needle} ")
        while position >= 0:
            line_end = text.find("\n", position)
            parts = text[text.rfind("\n", 0, position) + 1:line_end if line_end >= 0 else None].split()
            if len(parts) >= 10 and parts[1] == needle and parts[3] in _TCP_STATES_OPEN \
                    and parts[9] != "0" and peer in (None, parts[2]):
                return int(parts[9]), int(parts[7])
            position = text.find(f" {needle} ", position + 1)
    return None


def _peer(remote: tuple[str, int] | None, six: bool) -> str | None:
    if remote is None:
        return None
    ip = normalise_ip(remote[0])
    return proc_net_address(f"::ffff:{ip}" if six and ":" not in ip else ip, remote[1])


SOCK_DIAG_BY_FAMILY = 20
NETLINK_SOCK_DIAG = 4
NLMSG_ERROR = 2
INET_DIAG_NOCOOKIE = 0xFFFFFFFF


def diag_request(local: tuple[str, int], remote: tuple[str, int]) -> bytes:
    """A NETLINK sock_diag request for the one TCP socket with this local and remote address."""
    ip = ipaddress.ip_address(local[0])
    family = socket.AF_INET if ip.version == 4 else socket.AF_INET6
    sockid = (struct.pack("!HH", local[1], remote[1])
              + ip.packed.ljust(16, b"\0") + ipaddress.ip_address(remote[0]).packed.ljust(16, b"\0")
              + struct.pack("=III", 0, INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE))
    body = struct.pack("=BBBxI", family, socket.IPPROTO_TCP, 0, 0xFFFFFFFF) + sockid
    return struct.pack("=IHHII", 16 + len(body), SOCK_DIAG_BY_FAMILY, 1, 1, 0) + body  # NLM_F_REQUEST


def parse_diag_reply(reply: bytes) -> tuple[int, int] | None:
    """(inode, uid) from an inet_diag_msg, None for an error (no such socket)."""
    if len(reply) < 16 + 72:
        return None
    _, kind = struct.unpack_from("=IH", reply)
    if kind == NLMSG_ERROR:
        return None
    uid, inode = struct.unpack_from("=II", reply, 16 + 4 + 48 + 12)
    return (inode, uid) if inode else None


def diag_socket_inode(local: tuple[str, int], remote: tuple[str, int]) -> tuple[int, int] | None:
    """The socket by its exact addresses: a hash lookup in the kernel, where reading
    /proc/net/tcp walks every bucket of the table (milliseconds even with a handful of sockets)."""
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as diag:
            diag.settimeout(1.0)
            diag.send(diag_request(local, remote))
            return parse_diag_reply(diag.recv(8192))
    except (OSError, ValueError):
        return None


def _pid_has(pid: int, target: str, proc: Path) -> bool:
    fd_dir = proc / str(pid) / "fd"
    try:
        for fd in os.listdir(fd_dir):
            with contextlib.suppress(OSError):
                if os.readlink(fd_dir / fd) == target:
                    return True
    except OSError:
        pass
    return False


def holds_socket(pid: int, inode: int, proc: Path = Path("/proc")) -> bool:
    """Whether process `pid` has the socket among its descriptors (now)."""
    return _pid_has(pid, f"socket:[{inode}]", proc)


def other_holder(inode: int, exe: str | None, skip: set[int], proc: Path = Path("/proc"),
                 uid: int | None = None) -> int | None:
    """A process of the socket's owner, not in `skip` and running another executable than `exe`
    (a fork of the same program is the same program), that holds the socket too: it may write on
    it. A full scan, as pid_of_inode's slow path."""
    target = f"socket:[{inode}]"
    for pid in (int(e) for e in os.listdir(proc) if e.isdigit()):
        if pid in skip:
            continue
        with contextlib.suppress(OSError):
            if uid is not None and os.stat(proc / str(pid)).st_uid != uid:
                continue
            if _pid_has(pid, target, proc) and os.readlink(proc / str(pid) / "exe") != exe:
                return pid
    return None


def pid_of_inode(inode: int, hints: list[int], proc: Path = Path("/proc"), uid: int | None = None
                 ) -> int | None:
    """The process holding the socket; recent ones first, then only those of the socket's owner."""
    target = f"socket:[{inode}]"
    for pid in hints:
        if _pid_has(pid, target, proc):
            return pid
    # Newest first: a client has usually just started (pids are handed out in increasing order,
    # and when they wrap this is still a correct, if slower, full scan).
    for pid in sorted((int(e) for e in os.listdir(proc) if e.isdigit()), reverse=True):
        if pid in hints:
            continue
        with contextlib.suppress(OSError):
            if uid is not None and os.stat(proc / str(pid)).st_uid != uid:
                continue
            if _pid_has(pid, target, proc):
                return pid
    return None
