"""Counters of what the proxy saw, for `llmtap status` (and the live dashboard later)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from mitmproxy import connection, http, tls


@dataclass
class Counters:
    connections: int = 0  # accepted from local clients (targets and passthrough)
    intercepted: int = 0  # TLS connections decrypted (SNI matched a target)
    requests: int = 0
    responses: int = 0
    errors: int = 0


class Live:
    def __init__(self) -> None:
        self.counters = Counters()

    def client_connected(self, client: connection.Client) -> None:
        self.counters.connections += 1

    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        if not data.ignore_connection:
            self.counters.intercepted += 1

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        self.counters.requests += 1

    def response(self, flow: http.HTTPFlow) -> None:
        self.counters.responses += 1

    def error(self, flow: http.HTTPFlow) -> None:
        self.counters.errors += 1

    def snapshot(self) -> dict[str, int]:
        counters = asdict(self.counters)
        counters["passthrough"] = max(0, self.counters.connections - self.counters.intercepted)
        return counters
