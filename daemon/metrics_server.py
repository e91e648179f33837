"""`[metrics] listen`: Prometheus' /metrics and a /health for load balancers and probes.

Served by the root supervisor in threads of its own, never by the proxy worker: a scrape costs
the proxy's event loop nothing, and /health says what the supervisor knows (redirect in place,
worker answering). Loopback unless told (config_validation.validate_metrics); with a bearer token set, every
request must carry it. Few threads, short timeouts: a stuck client cannot pile up threads.
"""

from __future__ import annotations

import hmac
import json
import logging
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from llmtap.errors import UsageError
from llmtap.metrics import CONTENT_TYPE

log = logging.getLogger(__name__)

MAX_CLIENTS = 16
CLIENT_TIMEOUT_S = 10.0


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 32

    def __init__(self, address: tuple[str, int], render: Callable[[], str],
                 health: Callable[[], dict[str, Any]], token: str) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.render, self.health, self.token = render, health, token
        self.slots = threading.BoundedSemaphore(MAX_CLIENTS)
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):  # too many at once: this one is turned away
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = CLIENT_TIMEOUT_S
    server_version = "llmtap"
    sys_version = ""

    def do_GET(self) -> None:
        if self.server.token and not hmac.compare_digest(
                self.headers.get("Authorization", "").encode(),
                f"Bearer {self.server.token}".encode()):
            self._reply(401, b"unauthorized\n", "text/plain; charset=utf-8",
                        {"WWW-Authenticate": "Bearer"})
            return
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._reply(200, self.server.render().encode(), CONTENT_TYPE)
        elif path == "/health":
            state = self.server.health()
            body = json.dumps(state, default=str).encode() + b"\n"
            self._reply(200 if state.get("status") == "intercepting" else 503, body,
                        "application/json")
        else:
            self._reply(404, b"not found: try /metrics or /health\n", "text/plain; charset=utf-8")

    def do_HEAD(self) -> None:
        self.do_GET()

    def _reply(self, status: int, body: bytes, content_type: str,
               headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # a scrape every few seconds is not news


class MetricsServer:
    def __init__(self, address: tuple[str, int], render: Callable[[], str],
                 health: Callable[[], dict[str, Any]], token: str = "") -> None:
        try:
            self._server = _Server(address, render, health, token)
        except OSError as exc:
            raise UsageError(f"metrics.listen {address[0]}:{address[1]}: {exc.strerror}") from None
        self._thread = threading.Thread(target=self._server.serve_forever, name="llmtap-metrics",
                                        daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
