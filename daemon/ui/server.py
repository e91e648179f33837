"""A small HTTP/1.1 server for the UI's ASGI app, on h11 (which mitmproxy already brings).

It listens on loopback addresses only and refuses to bind anything else. Every buffer is capped:
request heads (h11's own cap), request bodies (the UI takes none), connections, idle time.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote

import h11

log = logging.getLogger(__name__)

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

LOOPBACK = ("127.0.0.1", "::1")
MAX_HEAD = 16 * 1024
MAX_BODY = 64 * 1024
MAX_CONNECTIONS = 64
IDLE_S = 30.0
READ = MAX_HEAD // 2  # small reads: h11 then refuses any head over MAX_HEAD, however it arrives


class Server:
    def __init__(self, app: App, port: int = 0, hosts: tuple[str, ...] = LOOPBACK) -> None:
        for host in hosts:
            if not ipaddress.ip_address(host).is_loopback:
                raise ValueError(f"the UI listens on loopback only, not {host}")
        self.app, self.port, self.hosts = app, port, hosts
        self._servers: list[asyncio.Server] = []
        self._slots = asyncio.Semaphore(MAX_CONNECTIONS)

    async def start(self) -> int:
        """Binds every loopback address on one port (the first picks it when port is 0)."""
        for host in self.hosts:
            try:
                server = await asyncio.start_server(
                    self._connection, host, self.port, family=_family(host), reuse_address=True)
            except OSError as exc:
                if host == self.hosts[0]:
                    raise
                log.info("not listening on %s: %s", host, exc)  # e.g. IPv6 disabled
                continue
            self.port = server.sockets[0].getsockname()[1]
            self._servers.append(server)
        return self.port

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for server in self._servers:
            await server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._slots.locked():
            writer.close()
            return
        async with self._slots:
            try:
                await Connection(self.app, reader, writer, self.port).serve()
            except (TimeoutError, OSError, h11.ProtocolError):
                pass
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


class Connection:
    """One client connection: requests one after the other (keep-alive), each to the app."""

    def __init__(self, app: App, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 port: int) -> None:
        self.app, self.reader, self.writer, self.port = app, reader, writer, port
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        peer = writer.get_extra_info("peername") or ("", 0)
        self.client = (str(peer[0]), int(peer[1]))

    async def serve(self) -> None:
        while True:
            event = await self._next()
            if not isinstance(event, h11.Request):
                return
            body = await self._body()
            if body is None:
                await self._simple(413, b"request body too large\n")
                return
            await self._run(event, body)
            if self.h11.our_state is not h11.DONE or self.h11.their_state is not h11.DONE:
                return
            self.h11.start_next_cycle()

    async def _next(self) -> Any:
        while True:
            event = self.h11.next_event()
            if event is not h11.NEED_DATA:
                return event
            data = await asyncio.wait_for(self.reader.read(READ), IDLE_S)
            self.h11.receive_data(data)

    async def _body(self) -> bytes | None:
        body = bytearray()
        while True:
            event = await self._next()
            if isinstance(event, h11.Data):
                body += event.data
                if len(body) > MAX_BODY:
                    return None
            elif isinstance(event, h11.EndOfMessage):
                return bytes(body)
            else:
                raise h11.RemoteProtocolError("unexpected event in a request body")

    async def _simple(self, status: int, text: bytes) -> None:
        headers = [("content-type", "text/plain"), ("content-length", str(len(text))),
                   ("connection", "close")]
        self._write(h11.Response(status_code=status, headers=headers))
        self._write(h11.Data(data=text))
        self._write(h11.EndOfMessage())
        await self.writer.drain()

    def _write(self, event: Any) -> None:
        data = self.h11.send(event)
        if data:
            self.writer.write(data)

    def scope(self, request: h11.Request) -> Scope:
        target = request.target.decode("latin-1")
        path, _, query = target.partition("?")
        return {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": request.http_version.decode(), "method": request.method.decode(),
            "scheme": "http", "path": unquote(path), "raw_path": path.encode("latin-1"),
            "query_string": query.encode("latin-1"), "root_path": "",
            "headers": [(name.lower(), value) for name, value in request.headers],
            "client": self.client, "server": ("127.0.0.1", self.port),
        }

    async def _run(self, request: h11.Request, body: bytes) -> None:
        gone = asyncio.Event()
        watcher = asyncio.create_task(self._watch(gone))
        delivered = False

        async def receive() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            if gone.is_set():
                raise OSError("the client went away")
            if message["type"] == "http.response.start":
                headers = [(bytes(k), bytes(v)) for k, v in message.get("headers", [])]
                self._write(h11.Response(status_code=message["status"], headers=headers))
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    self._write(h11.Data(data=message["body"]))
                if not message.get("more_body"):
                    self._write(h11.EndOfMessage())
                await self.writer.drain()

        try:
            await self.app(self.scope(request), receive, send)
        except Exception:
            log.exception("the UI failed on %s", request.target[:200])
            if self.h11.our_state is h11.SEND_RESPONSE:
                await self._simple(500, b"internal error (see the terminal)\n")
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher

    async def _watch(self, gone: asyncio.Event) -> None:
        """Notices a client that hangs up mid-response (a closed live feed)."""
        data = await self.reader.read(READ)
        if not data:
            gone.set()
            return
        self.h11.receive_data(data)  # a pipelined next request: h11 buffers it (capped)
