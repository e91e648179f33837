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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmtap.errors import RuntimeFailure
from llmtap.privileges import is_member

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], dict[str, Any]]


def peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


class ControlServer:
    def __init__(self, path: Path, group: str, gid: int, handler: Handler) -> None:
        self.path = path
        self.group = group
        self.handler = handler
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
