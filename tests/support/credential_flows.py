"""Flows and a secret store for testing the credential stages alone (mitmproxy's tflow)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from llmtap import secrets_store as store
from llmtap.addons.credentials import Credentials
from mitmproxy import http
from mitmproxy.test import tflow


def write_secrets(state_dir: Path, *specs: tuple[str, tuple[str, ...], str, bool, str],
                  for_users: tuple[str, ...] = ("alice",)) -> dict[str, str]:
    """Writes the store (--when-absent ones for `for_users`); returns each placeholder by name."""
    paths = store.StorePaths.under(state_dir)
    uid, gid = os.getuid(), os.getgid()
    store.ensure_directory(paths, uid, gid)
    key = store.ensure_key(paths, gid)
    old = {s.name: s for s in store.read_store(paths)}
    items = [store.new_secret(name, hosts, header, absent, value, key, old.get(name), for_users)
             for name, hosts, header, absent, value in specs]
    store.write_store(paths, items, gid)
    return {s.name: s.placeholder for s in items}


def flow_to(host: str, path: str = "/v1/messages", headers: dict[str, str] | None = None,
            http2: bool = False, method: str = "POST", content: bytes = b"{}") -> http.HTTPFlow:
    request = http.Request.make(method, f"https://{host}{path}", content, headers or {})
    request.http_version = "HTTP/2.0" if http2 else "HTTP/1.1"
    request.headers["host"] = host
    flow = tflow.tflow(req=request)
    flow.client_conn.sni = host
    flow.client_conn.alpn = b"h2" if http2 else b"http/1.1"
    flow.client_conn.tls = flow.server_conn.tls = True  # as in transparent mode, TLS both ways
    flow.server_conn.address, flow.server_conn.sni = (host, 443), None
    return flow


def respond(addon: Credentials, flow: http.HTTPFlow, body: bytes = b"ok",
            headers: dict[str, str] | None = None) -> http.Response:
    flow.response = http.Response.make(200, body, headers or {})
    addon.responseheaders(flow)
    addon.response(flow)
    return flow.response


class KnownUser:
    """Attribution's answer, already in: every connection is this user's."""

    def __init__(self, user: str | None) -> None:
        self.user = user

    def process_of(self, flow: http.HTTPFlow) -> dict[str, object] | None:
        return {"pid": 4242, "user": self.user} if self.user else None

    def pending(self, flow: http.HTTPFlow) -> None:
        return None


def run_hook(result: object) -> None:
    if asyncio.iscoroutine(result):
        asyncio.run(result)
