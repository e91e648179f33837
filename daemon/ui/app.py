"""The UI's ASGI app: the guards every request passes, then the routes.

Guards, in order: the Host header must name loopback on our port (403: DNS rebinding); the peer
must be root, the UI's own user or a member of the records group (403: another local user); the
per-run token must be in the query (401). Only GET is served (405), and no answer carries CORS
headers. Every answer has a strict Content-Security-Policy: scripts and styles from our own
files only, nothing inline, no eval, no frames, no outside connections.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from llmtap.platform.linux.sockets import socket_inode
from llmtap.privileges import is_member
from llmtap.ui.server import Receive, Scope, Send

STATIC = Path(__file__).parent / "static"
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'self'; "
       "frame-ancestors 'none'")
SECURITY_HEADERS = [
    ("content-security-policy", CSP), ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"), ("x-frame-options", "DENY"),
    ("cross-origin-opener-policy", "same-origin"), ("cross-origin-resource-policy", "same-origin"),
    ("cache-control", "no-store"),
]
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
STATIC_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}
STATIC_NAME = re.compile(r"^[A-Za-z0-9._-]+$")


class Reply:
    def __init__(self, status: int, body: bytes | str, content_type: str = "text/html; charset=utf-8",
                 headers: list[tuple[str, str]] | None = None) -> None:
        self.status = status
        self.body = body.encode() if isinstance(body, str) else body
        self.content_type = content_type
        self.headers = headers or []


class Stream:
    """A streamed answer (the live feed): chunks from an async iterator until the client leaves."""

    def __init__(self, chunks: Callable[[], Any], content_type: str) -> None:
        self.chunks, self.content_type = chunks, content_type


Handler = Callable[[dict[str, str]], Awaitable[Reply | Stream]]


class Guard:
    """Who may ask: decided before any route runs."""

    def __init__(self, token: str, group: str, check_peer: bool = True) -> None:
        self.token, self.group, self.check_peer = token, group, check_peer
        self.port = 0  # set once the server listens
        self.proc = Path("/proc")

    def refuse(self, scope: Scope, query: dict[str, str]) -> Reply | None:
        if not self.host_ok(_header(scope, b"host")):
            return Reply(403, "forbidden: this UI answers only to 127.0.0.1, localhost or [::1]\n",
                         "text/plain; charset=utf-8")
        if self.check_peer and not self.peer_ok(scope.get("client"), scope.get("server")):
            return Reply(403, "forbidden: only root and the llmtap group may use this UI\n",
                         "text/plain; charset=utf-8")
        if not hmac.compare_digest(query.get("token", "").encode(), self.token.encode()):
            return Reply(401, "unauthorized: open the URL with ?token= that `llmtap ui` printed\n",
                         "text/plain; charset=utf-8")
        return None

    def host_ok(self, host: str | None) -> bool:
        if not host:
            return False
        return host.lower() in {f"{name}:{self.port}" for name in LOOPBACK_NAMES}

    def peer_ok(self, client: Any, server: Any = None) -> bool:
        """The peer's user, from the kernel's socket table (Linux); elsewhere the token decides.
        The peer's socket is the one from its address to ours: another user's socket may share
        its local port with a socket of ours connected elsewhere."""
        if not (self.proc / "net/tcp").exists() or not client:
            return True
        remote = (str(server[0]), int(server[1])) if server else None
        found = socket_inode(str(client[0]), int(client[1]), self.proc, remote)
        if found is None:
            return False
        uid = found[1]
        return uid in (0, os.geteuid()) or is_member(uid, self.group)


class App:
    def __init__(self, guard: Guard, routes: list[tuple[re.Pattern[str], Handler]]) -> None:
        self.guard, self.routes = guard, routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        query = {k: v[0] for k, v in parse_qs(scope["query_string"].decode("latin-1")).items()}
        reply: Reply | Stream | None = self.guard.refuse(scope, query)
        if reply is None and scope["method"] != "GET":
            reply = Reply(405, "method not allowed: this UI only reads\n", "text/plain; charset=utf-8",
                          [("allow", "GET")])
        if reply is None:
            reply = await self.route(scope["path"], query)
        if isinstance(reply, Stream):
            await _stream(reply, receive, send)
        else:
            await _send(reply, send)

    async def route(self, path: str, query: dict[str, str]) -> Reply | Stream:
        for pattern, handler in self.routes:
            if match := pattern.fullmatch(path):
                return await handler({**query, **match.groupdict()})
        if path.startswith("/static/"):
            return static(path.removeprefix("/static/"))
        return Reply(404, "not found\n", "text/plain; charset=utf-8")


def static(name: str) -> Reply:
    path = STATIC / name
    if not STATIC_NAME.match(name) or not path.is_file():
        return Reply(404, "not found\n", "text/plain; charset=utf-8")
    return Reply(200, path.read_bytes(), STATIC_TYPES.get(path.suffix, "text/plain; charset=utf-8"))


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return bytes(value).decode("latin-1")
    return None


def _headers(content_type: str, extra: list[tuple[str, str]]) -> list[tuple[bytes, bytes]]:
    pairs = [("content-type", content_type), *SECURITY_HEADERS, *extra]
    return [(k.encode(), v.encode()) for k, v in pairs]


async def _send(reply: Reply, send: Send) -> None:
    extra = [("content-length", str(len(reply.body))), *reply.headers]
    await send({"type": "http.response.start", "status": reply.status,
                "headers": _headers(reply.content_type, extra)})
    await send({"type": "http.response.body", "body": reply.body})


async def _stream(reply: Stream, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200,
                "headers": _headers(reply.content_type, [])})
    gone = asyncio.ensure_future(_disconnected(receive))
    try:
        async for chunk in reply.chunks():
            if gone.done():
                return
            await send({"type": "http.response.body", "body": chunk, "more_body": True})
    except OSError:
        return
    finally:
        gone.cancel()
    await send({"type": "http.response.body", "body": b""})


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
