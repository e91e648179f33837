"""Verified upstream TLS connections kept warm and shared across client connections.

mitmproxy owns each server connection inside the client connection that opened it, and closes it
when that client goes. Most agent CLIs open a new connection per run, so every run would pay TCP
and TLS to the provider again (two round trips of 20-150 ms each). Here, when a client
disconnects, each of its upstream connections that is idle and sound (HTTP/1.1 between two
exchanges, TLS verified, nothing unread, nothing closed) is handed to the pool instead of being
closed; the next client connection to the same address and server name adopts it: mitmproxy gets
the socket in place of a TCP connect (UpstreamHandler.open_connection) and the established TLS
object in place of a handshake (UpstreamReuse.tls_start_server), and goes on exactly as with a
connection it made itself. Everything else (HTTP/2 upstreams, WebSockets, CONNECT tunnels,
responses read to EOF, Connection: close) is never pooled and closes as before.

So that HTTP/2 clients (curl, Codex's reqwest, Chromium) gain too, upstream connections speak
HTTP/1.1: a client offering h2 speaks HTTP/2 with the proxy (what its server would have chosen),
and mitmproxy translates each of its streams to an HTTP/1.1 connection upstream, pooled as any
other. A client that offers h2 without http/1.1 (gRPC) cannot be served over HTTP/1.1: it gets
its own connection, made during its handshake with the server's HTTP/2, and never a pooled one
(needs_h2_upstream; llmtap.proxy.NameOnlyTlsConfig.tls_clienthello). HTTP/2 frames a body by
itself, HTTP/1.1 does not: each such request gets its body's length (or chunks, when streamed)
before it goes out, and a connection is pooled only after a request framed exactly (otherwise the
upstream could read part of a body as a request of its own, whose rest would be the next client's
request: upstream_http.framed).

Bounds: at most `per_host` idle connections per (address, port, server name), `total` in all;
an idle connection is closed after `idle_s`, or as soon as its server sends anything or closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

from llmtap.upstream_http import frame_for_http1, http1_client, http1_idle, needs_h2_upstream
from mitmproxy import connection, ctx, http, tls
from mitmproxy.proxy import commands, context, events, mode_servers, server, server_hooks
from mitmproxy.utils import human
from OpenSSL import SSL

log = logging.getLogger(__name__)

Key = tuple[str, int, str]  # (peer address, port, server name the certificate was verified for)
X509_V_OK = 0


@dataclass
class Idle:
    """A pooled connection: its socket's streams and its established TLS."""

    key: Key
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    tls: SSL.Connection
    since: float  # the end of its last response
    keep_s: float  # closed once idle this long
    previous: asyncio.Task[Any] | None = None  # mitmproxy's reader task, winding down
    watch: asyncio.Task[None] | None = None


class DetachedWriter:
    """Stands in for a released connection's writer while mitmproxy winds its side down, so that
    nothing it does on the way (a close, a last write) reaches the socket the pool now holds."""

    def is_closing(self) -> bool:
        return True

    def write(self, data: bytes) -> None:
        pass

    def write_eof(self) -> None:
        pass

    def close(self) -> None:
        pass

    async def drain(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


def key_of(conn: connection.Server) -> Key | None:
    if conn.address is None or not conn.sni or conn.transport_protocol != "tcp":
        return None
    return (str(conn.address[0]), int(conn.address[1]), conn.sni)


def verified(tls_conn: SSL.Connection) -> bool:
    """The certificate chain and name were verified in the handshake (belt and braces: mitmproxy
    fails the handshake otherwise, as ssl_insecure is never set)."""
    result = SSL._lib.SSL_get_verify_result(tls_conn._ssl)  # type: ignore[attr-defined]
    return bool(result == X509_V_OK) and not ctx.options.ssl_insecure


class UpstreamPool:
    def __init__(self, per_host: int = 4, idle_s: float = 30.0, total: int = 64) -> None:
        self.per_host, self.idle_s, self.total = per_host, idle_s, total
        self._idle: dict[Key, list[Idle]] = {}
        self._adopting: dict[str, Idle] = {}  # server.id -> pooled TLS awaiting tls_start_server
        # server.id -> (TLS, layers) of each verified connection mitmproxy holds, while it does
        self.live: dict[str, tuple[SSL.Connection, context.Context]] = {}
        # server.id -> (monotonic time of its last response, seconds its server keeps it idle)
        self.last_response: dict[str, tuple[float, float]] = {}
        # server.id of connections that had an informational (1xx) answer taken for a response:
        # mitmproxy reads a 100 or 103 as final, and the real response is still to come on it.
        self.unsound: set[str] = set()
        self.reused = 0
        self.released = 0

    def counters(self) -> dict[str, int]:
        """For `llmtap status` and /metrics."""
        return {"upstream_reused": self.reused, "upstream_kept": self.released,
                "upstream_idle": self.idle_count()}

    def idle_count(self) -> int:
        return sum(len(entries) for entries in self._idle.values())

    async def take(self, conn: connection.Server, key: Key) -> Idle | None:
        """A sound idle connection for `key` (`conn`'s address and server name), or None."""
        entries = self._idle.get(key)
        while entries:
            idle = entries.pop()  # the most recently used: the least likely to be timed out
            if idle.previous is not None:  # one reader at a time on a StreamReader
                await asyncio.wait([idle.previous])
            if idle.watch is not None:
                idle.watch.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await idle.watch
            # Anything unread (a byte the watch saw arrive just now) or a closed end: not usable.
            if (idle.writer.is_closing() or idle.reader.at_eof() or buffered(idle.reader)
                    or idle.tls.pending() or idle.tls.get_shutdown()):
                close(idle)
                continue
            self._adopting[conn.id] = idle
            self.reused += 1
            return idle
        return None

    def adopted_tls(self, conn: connection.Server) -> SSL.Connection | None:
        idle = self._adopting.pop(conn.id, None)
        if idle is None:
            return None
        if idle.key != key_of(conn):  # never: taken for this very connection; checked all the same
            close(idle)
            return None
        return idle.tls

    def give_back(self, conn: connection.Server) -> None:
        """An adopted connection mitmproxy did not use after all (its connect was killed)."""
        idle = self._adopting.pop(conn.id, None)
        if idle is not None:
            self._keep(idle)

    def release(self, conn: connection.Server, io: server.ConnectionIO) -> bool:
        """Takes `conn` into the pool if it is idle, verified and sound; False leaves it be."""
        held = self.live.get(conn.id)
        key = key_of(conn)
        reader, writer = io.reader, io.writer
        if (held is None or key is None or conn.error or conn.state is not connection.ConnectionState.OPEN
                or conn.alpn not in (b"http/1.1", None) or not isinstance(reader, asyncio.StreamReader)
                or not isinstance(writer, asyncio.StreamWriter) or writer.is_closing()):
            return False
        tls_conn, conn_context = held
        layer = http1_client(conn_context, conn)
        if not http1_idle(layer) or tls_conn.pending() or tls_conn.get_shutdown():
            return False
        if conn.id not in self.last_response and layer and layer.response:  # before its response hook
            self.responded(conn, layer.response)
        if conn.id not in self.last_response or conn.id in self.unsound:  # unseen, or a 1xx
            return False
        if len(self._idle.get(key, ())) >= self.per_host or self.idle_count() >= self.total:
            return False
        since, keep_s = self.last_response[conn.id]
        self.released += 1
        self._keep(Idle(key, reader, writer, tls_conn, since, min(self.idle_s, keep_s), io.handler))
        return True

    def responded(self, conn: connection.Server, response: http.Response) -> None:
        """A response has ended on `conn`: its idle time counts from now, for at most what its
        server says it keeps an idle connection (Keep-Alive: timeout=N), less a second. An
        informational one leaves the connection never to be pooled."""
        if response.status_code < 200:
            self.unsound.add(conn.id)
        keep_s = self.idle_s
        for part in (response.headers.get("keep-alive") or "").split(","):
            name, _, value = part.strip().partition("=")
            if name.lower() == "timeout" and value.strip().isdigit():
                keep_s = max(0.0, int(value) - 1.0)
        self.last_response[conn.id] = (time.monotonic(), keep_s)

    def _keep(self, idle: Idle) -> None:
        self._idle.setdefault(idle.key, []).append(idle)
        idle.watch = asyncio.get_running_loop().create_task(self._watch(idle))

    async def _watch(self, idle: Idle) -> None:
        """Closes the connection when it has been idle `idle_s`, or its server sends or closes."""
        if idle.previous is not None:  # mitmproxy's reader task: it must be gone before we read
            await asyncio.wait([idle.previous])
        with contextlib.suppress(TimeoutError, OSError):
            await asyncio.wait_for(idle.reader.read(1), idle.keep_s - (time.monotonic() - idle.since))
        entries = self._idle.get(idle.key, [])
        if idle in entries:
            entries.remove(idle)
            if not entries:
                del self._idle[idle.key]
        close(idle)

    def close_all(self) -> None:
        for entries in self._idle.values():
            for idle in entries:
                if idle.watch:
                    idle.watch.cancel()
                close(idle)
        self._idle.clear()


def buffered(reader: asyncio.StreamReader) -> int:
    """Bytes received and not yet read (StreamReader keeps them in `_buffer`, all versions)."""
    return len(reader.__dict__.get("_buffer", b""))


def close(idle: Idle) -> None:
    with contextlib.suppress(OSError, RuntimeError):
        idle.writer.close()


def handler_class(pool: UpstreamPool) -> type[mode_servers.ProxyConnectionHandler]:
    """mitmproxy's connection handler, with upstream connections taken from and given to `pool`."""

    class UpstreamHandler(mode_servers.ProxyConnectionHandler):
        async def open_connection(self, command: commands.OpenConnection) -> None:
            conn = command.connection
            key = self._pool_key(conn)
            idle = await pool.take(conn, key) if key else None
            if idle is None:
                await super().open_connection(command)
            else:
                conn.sni = idle.key[2]
                await self._adopt(command, conn, idle)

        def _pool_key(self, conn: connection.Connection) -> Key | None:
            """The pool a TLS connection may be taken from. Its server name is the one the TLS
            config would give it (the client's, when none is set yet). None for a client that
            needs an HTTP/2 upstream: it has its own, made during its handshake."""
            if (not isinstance(conn, connection.Server) or not conn.tls
                    or needs_h2_upstream(self.client)):
                return None
            sni = conn.sni or self.client.sni
            if conn.address is None or not sni or conn.transport_protocol != "tcp":
                return None
            return (str(conn.address[0]), int(conn.address[1]), sni)

        async def _adopt(self, command: commands.OpenConnection, conn: connection.Server,
                         idle: Idle) -> None:
            """mitmproxy's open_connection, with the pooled socket in place of a TCP connect."""
            hook_data = server_hooks.ServerConnectionHookData(client=self.client, server=conn)
            await self.handle_hook(server_hooks.ServerConnectHook(hook_data))
            if conn.error or key_of(conn) != idle.key:  # killed or redirected by an addon
                pool.give_back(conn)
                if conn.error:
                    await self.handle_hook(server_hooks.ServerConnectErrorHook(hook_data))
                    await self.server_event(events.OpenConnectionCompleted(
                        command, f"Connection killed: {conn.error}"))
                    return
                await super().open_connection(command)
                return
            assert conn.address is not None  # key_of(conn) == idle.key
            async with self.max_conns[conn.address]:
                conn.timestamp_start = conn.timestamp_tcp_setup = time.time()
                conn.state = connection.ConnectionState.OPEN
                conn.peername = idle.writer.get_extra_info("peername")
                conn.sockname = idle.writer.get_extra_info("sockname")
                self.transports[conn] = server.ConnectionIO(
                    handler=asyncio.current_task(), reader=idle.reader, writer=idle.writer)
                self.log(f"server connect {human.format_address(conn.address)} (kept from an earlier client)")
                await self.handle_hook(server_hooks.ServerConnectedHook(hook_data))
                await self.server_event(events.OpenConnectionCompleted(command, None))
                # The TLS layer finishes a handshake only on data from the server; the adopted
                # TLS has none to wait for. An empty read completes it (queued behind the
                # tls_start_server hook, which hands over the TLS).
                await self.server_event(events.DataReceived(conn, b""))
                try:
                    await self.handle_connection(conn)
                finally:
                    conn.timestamp_end = time.time()
                    await self.handle_hook(server_hooks.ServerDisconnectedHook(hook_data))

        async def handle_hook(self, hook: commands.StartHook) -> None:
            if isinstance(hook, server_hooks.ClientDisconnectedHook):
                self._release_idle()  # before mitmproxy closes whatever the client leaves open
            await super().handle_hook(hook)

        def close_connection(self, conn: connection.Connection, half_close: bool = False) -> None:
            """An HTTP/2 client's upstream connection, closed by mitmproxy after one request,
            goes to the pool instead when sound (http1_idle): its next stream may take it back."""
            if half_close or self.client.alpn != b"h2" or not self._release(conn):
                super().close_connection(conn, half_close)

        def _release_idle(self) -> None:
            for conn in list(self.transports):
                if conn is not self.client:
                    self._release(conn)

        def _release(self, conn: connection.Connection) -> bool:
            io = self.transports.get(conn)
            if not isinstance(conn, connection.Server) or io is None or io.handler is None:
                return False
            if not pool.release(conn, io):
                return False
            self.transports[conn] = server.ConnectionIO(
                handler=io.handler, reader=io.reader, writer=DetachedWriter())  # type: ignore[arg-type]
            io.handler.cancel("kept for the next client")
            return True

    return UpstreamHandler


class UpstreamReuse:
    """Hands pooled TLS to mitmproxy and notes which verified connections may be pooled.

    Added before the TLS config addon, whose tls_start_server leaves a connection alone when an
    earlier addon has supplied its TLS.
    """

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self._original: type[mode_servers.ProxyConnectionHandler] | None = None

    def load(self, loader: Any) -> None:
        self._original = mode_servers.ProxyConnectionHandler
        mode_servers.ProxyConnectionHandler = handler_class(self.pool)  # type: ignore[misc]

    def tls_start_client(self, tls_start: tls.TlsData) -> None:
        """A client offering HTTP/2 speaks it with us, whatever its order of preference (httpx
        lists http/1.1 first and speaks HTTP/2 only when told to): what its server would choose.
        mitmproxy translates between it and the HTTP/1.1 upstream."""
        client = tls_start.context.client
        if (isinstance(tls_start.conn, connection.Client) and ctx.options.http2 and client.alpn is None
                and b"h2" in client.alpn_offers and not needs_h2_upstream(client)):
            client.alpn = b"h2"  # mitmproxy's TLS config answers the client's ALPN with it

    def tls_start_server(self, tls_start: tls.TlsData) -> None:
        conn = tls_start.conn
        if not isinstance(conn, connection.Server):
            return
        if adopted := self.pool.adopted_tls(conn):
            tls_start.ssl_conn = adopted  # established: mitmproxy's handshake step is a no-op
        elif b"h2" in (client := tls_start.context.client).alpn_offers and not needs_h2_upstream(client):
            conn.alpn_offers = (b"http/1.1",)  # not the client's offers: so that it can be pooled

    def tls_established_server(self, data: tls.TlsData) -> None:
        conn = data.conn
        if isinstance(conn, connection.Server) and data.ssl_conn is not None and verified(data.ssl_conn):
            self.pool.live[conn.id] = (data.ssl_conn, data.context)

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        if flow.request.is_http2 and not needs_h2_upstream(flow.client_conn):
            frame_for_http1(flow.request, body_known=False)

    def request(self, flow: http.HTTPFlow) -> None:
        """Before a held body goes out (a streamed one has gone: its headers were final)."""
        if flow.request.is_http2 and not flow.request.stream and not needs_h2_upstream(flow.client_conn):
            frame_for_http1(flow.request, body_known=True)

    def response(self, flow: http.HTTPFlow) -> None:
        if flow.server_conn.id in self.pool.live and flow.response is not None:
            self.pool.responded(flow.server_conn, flow.response)

    def server_disconnected(self, data: server_hooks.ServerConnectionHookData) -> None:
        self.pool.live.pop(data.server.id, None)
        self.pool.last_response.pop(data.server.id, None)
        self.pool.unsound.discard(data.server.id)

    def done(self) -> None:
        if self._original is not None:
            mode_servers.ProxyConnectionHandler = self._original  # type: ignore[misc]
        self.pool.close_all()

