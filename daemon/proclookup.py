"""Which local process owns a TCP connection, answered by the root supervisor.

The proxy worker runs as the unprivileged service user and cannot see other users' processes in
/proc, so it asks the supervisor over a socketpair made before the fork (nothing listens):

    worker -> {"id": 7, "ip": "10.0.0.1", "port": 51234}
    worker <- {"id": 7, "process": {"pid": ..., "name": ..., "exe": ..., "cmdline": ...,
                                    "user": ..., "tool": "claude", "parents": [...]}}

Linux: the socket whose local address is the client's (/proc/net/tcp and tcp6), then the process
holding that socket inode (/proc/PID/fd, recently seen processes first). Elsewhere: psutil.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import socket
import struct
import sys
import threading
import time
from collections import OrderedDict, deque
from pathlib import Path
from typing import Any

import psutil
from llmtap.records.capture import mask_secrets

log = logging.getLogger(__name__)

CACHE_TTL_S = 2.0  # a local port is reused only after TIME_WAIT, far longer than this
MAX_MESSAGE = 64 * 1024
MAX_PARENTS = 8
MAX_CMDLINE = 1024
# Agents first: the chain is walked up to the first of these. Runtimes name a tool only when no
# agent is found (a bare `python script.py` is attributed to python).
AGENTS = ("claude", "codex", "cursor", "aider", "gemini", "copilot", "windsurf", "zed", "code",
          "goose", "opencode", "continue", "cline")
RUNTIMES = ("node", "python", "bun", "deno", "ruby", "java", "go")
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


def tool_name(name: str, cmdline: list[str], exe: str | None = None) -> str | None:
    """The tool a process is: its own name, the script an interpreter runs (node …/claude), or
    the runtime its executable is (a `pytest` process is python)."""
    candidates = [name, *(Path(arg).name for arg in cmdline[1:3] if not arg.startswith("-"))]
    for candidate in candidates:
        base = candidate.lower().removesuffix(".exe").removesuffix(".js").removesuffix(".py")
        for agent in AGENTS:
            if base == agent or base.startswith(f"{agent}-"):
                return agent
    for base in (name.lower().removesuffix(".exe"), Path(exe or "").name.lower().removesuffix(".exe")):
        for runtime in RUNTIMES:
            version = base[len(runtime):].replace(".", "")
            if base.startswith(runtime) and (not version or version.isdigit()):
                return runtime
    return None


def describe(pid: int) -> dict[str, Any] | None:
    """pid, name, exe, cmdline (key-shaped arguments masked), user, tool and the parent chain."""
    try:
        process = psutil.Process(pid)
        with process.oneshot():
            info = _basic(process)
            parents = []
            for parent in process.parents()[:MAX_PARENTS]:
                if parent.pid <= 1:
                    break
                parents.append(_basic(parent))
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None
    chain = [info, *parents]
    agent = next((p["tool"] for p in chain if p["tool"] in AGENTS), None)
    info["tool"] = agent or info["tool"]  # a runtime parent (a shell script's python) is no tool
    # The chain up to the first agent (or the whole short chain): who started this call.
    cut = next((i for i, p in enumerate(parents) if p["tool"] in AGENTS), len(parents) - 1)
    info["parents"] = [{k: p[k] for k in ("pid", "name", "exe", "tool")} for p in parents[:cut + 1]]
    return info


def _basic(process: psutil.Process) -> dict[str, Any]:
    name = _safe(process.name) or "?"
    cmdline = _safe(process.cmdline) or []
    exe = _safe(process.exe) or None
    text = mask_secrets(" ".join(cmdline))
    return {
        "pid": process.pid,
        "name": name,
        "exe": exe,
        "cmdline": text[:MAX_CMDLINE] + ("…" if len(text) > MAX_CMDLINE else ""),
        "user": _safe(process.username),
        "tool": tool_name(name, cmdline, exe),
    }


def _safe(getter: Any) -> Any:
    try:
        return getter()
    except (psutil.Error, OSError):
        return None


class Lookup:
    """Local address -> process, with a short cache per address and recent pids tried first."""

    def __init__(self, proc: Path = Path("/proc")) -> None:
        self.proc = proc
        self._cache: OrderedDict[tuple[str, int], tuple[float, dict[str, Any] | None]] = OrderedDict()
        self._recent: deque[int] = deque(maxlen=16)
        # pid -> (when, description): a client opening 50 connections is described once.
        self._described: dict[int, tuple[float, dict[str, Any] | None]] = {}

    def find(self, ip: str, port: int, remote: tuple[str, int] | None = None
             ) -> dict[str, Any] | None:
        """The process whose socket has local address (ip, port); `remote`, the address that
        socket is connected to, allows the fast exact lookup."""
        key = (normalise_ip(ip), port)
        now = time.monotonic()
        cached = self._cache.get(key)
        if cached and now - cached[0] < CACHE_TTL_S:
            return cached[1]
        found = self._find(*key, remote)
        self._cache[key] = (now, found)
        while len(self._cache) > 1024:
            self._cache.popitem(last=False)
        return found

    def _find(self, ip: str, port: int, remote: tuple[str, int] | None = None
              ) -> dict[str, Any] | None:
        pid = (self._pid_linux(ip, port, remote) if sys.platform == "linux"
               else self._pid_psutil(ip, port))
        if pid is None:
            return None
        if pid in self._recent:
            self._recent.remove(pid)
        self._recent.appendleft(pid)
        now = time.monotonic()
        cached = self._described.get(pid)
        if cached and now - cached[0] < CACHE_TTL_S:
            return cached[1]
        if len(self._described) > 1024:
            self._described = {p: d for p, d in self._described.items() if now - d[0] < CACHE_TTL_S}
        found = self._described[pid] = (now, describe(pid))
        return found[1]

    def _pid_linux(self, ip: str, port: int, remote: tuple[str, int] | None) -> int | None:
        found = diag_socket_inode((ip, port), remote) if remote else None
        found = found or socket_inode(ip, port, self.proc)
        if found is None:
            return None
        inode, uid = found
        return pid_of_inode(inode, list(self._recent), self.proc, uid)

    @staticmethod
    def _pid_psutil(ip: str, port: int) -> int | None:
        with contextlib.suppress(psutil.Error, OSError):
            for conn in psutil.net_connections(kind="tcp"):
                if conn.laddr and (normalise_ip(conn.laddr.ip), conn.laddr.port) == (ip, port):
                    return conn.pid
        return None


def answer(lookup: Lookup, message: bytes) -> bytes:
    """One reply; never raises on a malformed request (the worker is not trusted blindly)."""
    try:
        request = json.loads(message)
        ip, port = normalise_ip(str(request["ip"])), int(request["port"])
        if not 0 < port < 65536:
            raise ValueError("port out of range")
        remote = None
        if request.get("remote_ip") and 0 < int(request.get("remote_port", 0)) < 65536:
            remote = (normalise_ip(str(request["remote_ip"])), int(request["remote_port"]))
        process = lookup.find(ip, port, remote)
    except (ValueError, KeyError, TypeError) as exc:
        return json.dumps({"id": _id(message), "process": None, "error": str(exc)[:100]}).encode()
    return json.dumps({"id": request.get("id"), "process": process}).encode()


def _id(message: bytes) -> Any:
    with contextlib.suppress(ValueError, AttributeError, TypeError):
        return json.loads(message).get("id")
    return None


class LookupService:
    """The supervisor's side. Make it before forking the worker, `start()` it after."""

    def __init__(self) -> None:
        self.server, self.client = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.lookup = Lookup()
        # The worker keeps only its own end (a forked child must not hold ours).
        os.register_at_fork(after_in_child=self._child_closes_server_end)
        self._thread: threading.Thread | None = None

    def _child_closes_server_end(self) -> None:
        with contextlib.suppress(OSError):
            self.server.close()

    def start(self) -> None:
        """In the supervisor, after the fork: drop the worker's end, serve until it closes."""
        self.client.close()
        self._thread = threading.Thread(target=self._serve, name="llmtap-attribution", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                message = self.server.recv(MAX_MESSAGE)
            except OSError:
                return
            if not message:
                return  # the worker is gone
            try:
                self.server.send(answer(self.lookup, message))
            except OSError:
                return
            except Exception as exc:  # a lookup bug must not end attribution for good
                log.warning("process lookup failed: %s: %s", type(exc).__name__, exc)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.server.close()
