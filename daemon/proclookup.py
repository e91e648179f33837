"""Which local process owns a TCP connection, answered by the root supervisor.

The proxy worker runs as the unprivileged service user and cannot see other users' processes in
/proc, so it asks the supervisor over a socketpair made before the fork (nothing listens):

    worker -> {"id": 7, "ip": "10.0.0.1", "port": 51234}
    worker <- {"id": 7, "process": {"pid": ..., "name": ..., "exe": ..., "cmdline": ...,
                                    "user": ..., "tool": "claude", "parents": [...]}}

Linux: the socket whose local address is the client's, then the process holding that socket inode
(llmtap.platform.linux.sockets). Elsewhere: psutil.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
from llmtap.platform.linux.sockets import (
    diag_socket_inode,
    holds_socket,
    normalise_ip,
    other_holder,
    pid_of_inode,
    socket_inode,
)
from llmtap.platform.macos.sockets import pid_of_connection
from llmtap.records.capture import mask_secrets

log = logging.getLogger(__name__)

CACHE_TTL_S = 2.0  # a local port is reused only after TIME_WAIT, far longer than this
MAX_MESSAGE = 64 * 1024
MAX_PARENTS = 8
MAX_CMDLINE = 1024
MAX_SCRIPT = 1024  # a longer first argument is no script path (and the reply stays small)
# Agents first: the chain is walked up to the first of these. Runtimes name a tool only when no
# agent is found (a bare `python script.py` is attributed to python).
AGENTS = ("claude", "codex", "cursor", "aider", "gemini", "copilot", "windsurf", "zed", "code",
          "goose", "opencode", "continue", "cline")
RUNTIMES = ("node", "python", "bun", "deno", "ruby", "java", "go")
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
    info["parents"] = [{k: p[k] for k in ("pid", "name", "exe", "tool", "uid", "script")}
                       for p in parents[:cut + 1]]
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
        "uid": _safe(lambda: process.uids().real),
        "tool": tool_name(name, cmdline, exe),
        "script": script_of(process, cmdline),
    }


def script_of(process: psutil.Process, cmdline: list[str]) -> str | None:
    """The script an interpreter runs, as a real path: its first argument when that is no option
    (`node /usr/local/bin/claude …`, what a shebang line makes), against its working directory.
    An option first (`node -r x.js cli.js`, `python -c …`) gives none: code would run that is not
    the script. The process can rewrite its own arguments: this names, it does not prove."""
    arg = cmdline[1] if len(cmdline) > 1 else ""
    if not arg or arg.startswith("-") or len(arg) > MAX_SCRIPT:
        return None
    if not os.path.isabs(arg):
        cwd = _safe(process.cwd)
        if not cwd:
            return None
        arg = os.path.join(cwd, arg)
    return os.path.realpath(arg)[:MAX_SCRIPT]


def _same_root(pid: int, proc: Path) -> bool:
    try:
        theirs, ours = os.stat(proc / str(pid) / "root"), os.stat("/")
    except OSError:
        return False
    return (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino)


def _exe_link(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None


def _safe(getter: Any) -> Any:
    try:
        return getter()
    except (psutil.Error, OSError):
        return None


class Lookup:
    """Local address -> process, with a short cache per address and recent pids tried first."""

    def __init__(self, proc: Path = Path("/proc"), deep: Callable[[], bool] = lambda: True) -> None:
        self.proc = proc
        # Whether to look for other holders of the socket (the parents' descriptors, then every
        # process of its user): a bound key needs it, and it costs ~10 ms a connection.
        self.deep = deep
        self._cache: OrderedDict[tuple[str, int, int], tuple[float, dict[str, Any] | None]] = OrderedDict()
        self._recent: deque[int] = deque(maxlen=16)
        # pid -> (when, description): a client opening 50 connections is described once.
        self._described: dict[int, tuple[float, str | None, dict[str, Any] | None]] = {}

    def find(self, ip: str, port: int, remote: tuple[str, int] | None = None
             ) -> dict[str, Any] | None:
        """The process whose socket has local address (ip, port); `remote`, the address that
        socket is connected to, allows the fast exact lookup."""
        address = (normalise_ip(ip), port)
        sock = None
        if sys.platform == "linux":
            sock = diag_socket_inode(address, remote) if remote else None
            sock = sock or socket_inode(*address, self.proc)
        # Keyed by the socket too: a port freed by one process and bound at once by another
        # (bind() to that very port) must not inherit the first one's answer.
        key = (*address, sock[0] if sock else 0)
        now = time.monotonic()
        cached = self._cache.get(key)
        if cached and now - cached[0] < CACHE_TTL_S:
            return cached[1]
        found = self._find_linux(*sock) if sock else self._describe(self._pid(*address, remote))
        self._cache[key] = (now, found)
        while len(self._cache) > 1024:
            self._cache.popitem(last=False)
        return found

    def _find_linux(self, inode: int, uid: int) -> dict[str, Any] | None:
        pid = pid_of_inode(inode, list(self._recent), self.proc, uid)
        info = self._describe(pid)
        if pid is None or info is None:
            return None
        # Described after it was found: if it no longer holds the socket it exited (its pid may
        # be another's now) and what was described is not who connected.
        if not holds_socket(pid, inode, self.proc):
            return None
        if not self.deep():
            return {**info, "foreign_root": True} if not _same_root(pid, self.proc) else info
        # A parent holding the same socket handed it to this child (fork, exec of another
        # program): who writes on it is not known, and a key bound to the child must not go.
        if any(holds_socket(p["pid"], inode, self.proc) for p in info["parents"]):
            return {**info, "shared": True}
        # Another program holding it too, outside the chain (it was handed over, or inherited by
        # a detached child made before the connect): who writes on it is not known either.
        skip = {pid, *(p["pid"] for p in info["parents"])}
        if (other := other_holder(inode, _exe_link(pid), skip, self.proc, uid)) is not None:
            return {**info, "held_elsewhere": other}
        # In another root (a container): its paths name other files than ours.
        if not _same_root(pid, self.proc):
            return {**info, "foreign_root": True}
        return info

    def _describe(self, pid: int | None) -> dict[str, Any] | None:
        if pid is None:
            return None
        if pid in self._recent:
            self._recent.remove(pid)
        self._recent.appendleft(pid)
        now = time.monotonic()
        exe = _exe_link(pid)
        cached = self._described.get(pid)
        if cached and now - cached[0] < CACHE_TTL_S and cached[1] == exe:  # no exec() since
            return cached[2]
        if len(self._described) > 1024:
            self._described = {p: d for p, d in self._described.items() if now - d[0] < CACHE_TTL_S}
        self._described[pid] = (now, exe, describe(pid))
        return self._described[pid][2]

    def _pid(self, ip: str, port: int, remote: tuple[str, int] | None) -> int | None:
        """The owning pid where no socket was found by its inode (Linux: nobody to name;
        Windows: llmtap.platform.windows.attribution overrides it)."""
        if sys.platform == "linux":
            return None
        if sys.platform == "darwin":  # recent pids first, the remote end checked too
            return pid_of_connection((ip, port), remote, list(self._recent))
        return self._pid_psutil(ip, port)

    @staticmethod
    def _pid_psutil(ip: str, port: int) -> int | None:
        with contextlib.suppress(psutil.Error, OSError):
            for conn in psutil.net_connections(kind="tcp"):
                if conn.laddr and (normalise_ip(conn.laddr.ip), conn.laddr.port) == (ip, port):
                    return int(conn.pid) if conn.pid is not None else None
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


LOOKUP_NICE = -5


def _ahead_of_user_processes() -> None:
    """Lowers this thread's niceness (Linux keeps one per thread; the supervisor is root): a
    lookup runs against a short-lived client (curl is gone in milliseconds), and on a busy
    machine one answered late finds no process left to name."""
    if sys.platform == "linux":
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOOKUP_NICE)


class LookupService:
    """The supervisor's side. Make it before forking the worker, `start()` it after."""

    def __init__(self, deep: Callable[[], bool] = lambda: True) -> None:
        self.server, self.client = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.lookup = Lookup(deep=deep)
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
        _ahead_of_user_processes()
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
