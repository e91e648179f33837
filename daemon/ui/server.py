"""The UI's ASGI app served by hypercorn, on loopback addresses only.

The sockets are made here, not by hypercorn: every address is checked to be loopback before
anything is bound, and all of them share the port the first one picked. hypercorn then serves
them (`fd://`), with its caps on request heads and idle connections; the app itself refuses
bodies and every method but GET.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from hypercorn.asyncio import serve
from hypercorn.config import Config

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

LOOPBACK = ("127.0.0.1", "::1")
MAX_HEAD = 16 * 1024
IDLE_S = 30


class Server:
    def __init__(self, app: App, port: int = 0, hosts: tuple[str, ...] = LOOPBACK) -> None:
        for host in hosts:
            if not ipaddress.ip_address(host).is_loopback:
                raise ValueError(f"the UI listens on loopback only, not {host}")
        self.app, self.port, self.hosts = app, port, hosts
        self.addresses: list[tuple[str, int]] = []  # where it listens
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> int:
        """Binds every loopback address on one port (the first picks it when port is 0)."""
        descriptors = []
        for host in self.hosts:
            try:
                sock = _listening(host, self.port)
            except OSError as exc:
                if host == self.hosts[0]:
                    raise
                log.info("not listening on %s: %s", host, exc)  # e.g. IPv6 disabled
                continue
            self.port = sock.getsockname()[1]
            self.addresses.append(sock.getsockname()[:2])
            descriptors.append(sock.detach())  # hypercorn owns (and closes) them from here
        self._task = asyncio.get_running_loop().create_task(
            serve(self.app, _config(descriptors), shutdown_trigger=self._stop.wait))  # type: ignore[arg-type]
        return self.port

    async def close(self) -> None:
        self._stop.set()
        if self._task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._task, 5)


def _listening(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host, port))
        sock.listen(64)  # connections queue from now on, before hypercorn's loop accepts them
    except OSError:
        sock.close()
        raise
    return sock


def _config(descriptors: list[int]) -> Config:
    config = Config()
    config.bind = [f"fd://{fd}" for fd in descriptors]
    config.h11_max_incomplete_size = MAX_HEAD
    config.h2_max_header_list_size = MAX_HEAD
    config.keep_alive_timeout = IDLE_S
    config.read_timeout = IDLE_S
    config.include_server_header = False
    config.accesslog = None
    config.errorlog = log
    return config
