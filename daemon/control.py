"""The local control socket: JSON lines over a Unix socket, callers checked with SO_PEERCRED.

Root and members of the service group may connect; anyone else is refused before reading a byte.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from llmtap.errors import RuntimeFailure
from llmtap.platform import statusfile
from llmtap.privileges import is_member

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], dict[str, Any]]
Stream = Callable[[socket.socket], None]  # a command that keeps the connection (e.g. subscribe)
# CPython has no AF_UNIX on Windows: there the daemon publishes its status to a file instead.
UNIX_SOCKETS = hasattr(socket, "AF_UNIX")


def peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


class ControlServer:
    def __init__(self, path: Path, group: str, gid: int, handler: Handler,
                 streams: dict[str, Stream] | None = None) -> None:
        self.path = path
        self.group = group
        self.handler = handler
        self.streams = streams or {}
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(path))
        os.chown(path, 0, gid)
        os.chmod(path, 0o660)
        self._sock.listen(16)
        self._thread = threading.Thread(target=self._serve, name="llmtap-control", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return  # closed
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn: socket.socket) -> None:
        with conn:
            if not is_member(peer_uid(conn), self.group):
                conn.sendall(b'{"error": "permission denied"}\n')
                return
            conn.settimeout(5)
            try:
                with conn.makefile("r") as lines:
                    request = json.loads(lines.readline() or "{}")
                if stream := self.streams.get(str(request.get("cmd"))):
                    stream(conn)
                    return
                reply = self.handler(request)
            except (ValueError, OSError) as exc:
                reply = {"error": f"bad request: {exc}"}
            conn.sendall(json.dumps(reply).encode() + b"\n")

    def close(self) -> None:
        self._sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def request(path: Path, message: dict[str, Any], timeout_s: float = 5.0) -> dict[str, Any] | None:
    """One request to the daemon; None when no daemon is listening."""
    if not UNIX_SOCKETS:
        return statusfile.read(path) if message.get("cmd") == "status" else None
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout_s)
            sock.connect(str(path))
            sock.sendall(json.dumps(message).encode() + b"\n")
            with sock.makefile("r") as lines:
                reply: dict[str, Any] = json.loads(lines.readline() or "{}")
    except (FileNotFoundError, ConnectionRefusedError):
        return None
    except PermissionError:
        raise RuntimeFailure(f"no permission to use {path}: run as root or join group llmtap") from None
    except (OSError, ValueError) as exc:
        raise RuntimeFailure(f"the daemon did not answer on {path}: {exc}") from None
    if reply.get("error") == "permission denied":
        raise RuntimeFailure("the daemon refused: run as root or join group llmtap")
    return reply


def subscribe(path: Path, connect_timeout_s: float = 5.0) -> Iterator[dict[str, Any]] | None:
    """The daemon's live events, one dict per JSON line; None when no daemon is listening.

    The iterator ends when the daemon goes away.
    """
    if not UNIX_SOCKETS:
        raise RuntimeFailure("live events need the control socket, which Python lacks on Windows: "
                             "use `llmtap status`")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(connect_timeout_s)
        sock.connect(str(path))
        sock.sendall(b'{"cmd": "subscribe"}\n')
        sock.settimeout(None)
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        return None
    except PermissionError:
        sock.close()
        raise RuntimeFailure(f"no permission to use {path}: run as root or join group llmtap") from None
    except OSError as exc:
        sock.close()
        raise RuntimeFailure(f"the daemon did not answer on {path}: {exc}") from None
    return _events(sock)


def _events(sock: socket.socket) -> Iterator[dict[str, Any]]:
    with sock, sock.makefile("r", encoding="utf-8") as lines:
        for line in lines:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("error") == "permission denied":
                raise RuntimeFailure("the daemon refused: run as root or join group llmtap")
            yield event
