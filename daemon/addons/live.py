"""Counters of what the proxy saw (for `llmtap status`) and live events for the dashboard.

Events (`start`, `update` while a response streams, `end`) are only queued here; the worker's
reporter drains them a few times a second and sends them to the supervisor in one write, which
fans them out to the control socket's subscribers. Streaming updates are throttled per request,
so the hot path costs a counter increment and a clock read per chunk.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from llmtap.addons.streams import layer_of
from llmtap.flow import BLOCKED_HEADER, LIVE_PARSER, ProcessLookup, fields
from llmtap.masking import NO_MASK, SecretMask
from llmtap.parsers.base import as_dict
from mitmproxy import connection, http, tls

UPDATE_EVERY_S = 0.25
MAX_PENDING = 5000  # events kept when nobody drains them (the oldest go first)


@dataclass
class Counters:
    connections: int = 0  # accepted from local clients (targets and passthrough)
    intercepted: int = 0  # TLS connections decrypted (SNI matched a target)
    requests: int = 0
    responses: int = 0
    errors: int = 0


def process_summary(process: Any) -> dict[str, Any] | None:
    if not isinstance(process, dict):
        return None
    return {k: process.get(k) for k in ("pid", "name", "tool", "user")}


class StreamMeter:
    """A stream layer that counts a streamed response's chunks, bytes and SSE data lines (a
    token estimate), passing each chunk on unchanged."""

    def __init__(self, live: Live, flow: http.HTTPFlow) -> None:
        self.live, self.flow = live, flow
        self.chunks = 0
        self.bytes = 0
        self.data_lines = 0
        self.last_sent = 0.0

    def __call__(self, data: bytes) -> bytes:
        if data:
            self.chunks += 1
            self.bytes += len(data)
            self.data_lines += data.count(b"data:")
            now = time.monotonic()
            if now - self.last_sent >= UPDATE_EVERY_S:
                self.last_sent = now
                self.live.stream_update(self.flow, self)
        return data


class Live:
    observes_response = True  # its response hook may run after the response is relayed

    def __init__(self, mask: Callable[[], SecretMask] = lambda: NO_MASK,
                 lookup: ProcessLookup | None = None) -> None:
        self.mask = mask  # the held secrets (the credentials stage's), masked by value
        self.lookup = lookup  # who made each request (the attribution stage)
        self.counters = Counters()
        self.pending: list[dict[str, Any]] = []
        self._updates: dict[str, dict[str, Any]] = {}  # the latest update per flow, coalesced
        # Flows that started before their process was known (its lookup answers later on a
        # busy machine): their next update carries it, so a live view can name who streams.
        self._unnamed: set[str] = set()

    def client_connected(self, client: connection.Client) -> None:
        self.counters.connections += 1

    def tls_clienthello(self, data: tls.ClientHelloData) -> None:
        if not data.ignore_connection:
            self.counters.intercepted += 1

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        self.counters.requests += 1

    def request(self, flow: http.HTTPFlow) -> None:
        known = fields(flow)
        request = as_dict(known.get("request"))
        process = self._process(flow)
        if process is None:
            self._unnamed.add(flow.id)
        self._queue({
            "type": "start", "id": flow.id, "ts": flow.request.timestamp_start,
            "host": flow.request.pretty_host, "method": flow.request.method,
            "path": flow.request.path.split("?", 1)[0], "model": known.get("model"),
            "provider": known.get("provider"), "api": known.get("api"),
            "max_tokens": request.get("max_tokens"), "process": process,
        })

    def response_layer(self, flow: http.HTTPFlow) -> StreamMeter | None:
        """A streamed response's meter (llmtap.addons.streams): its counts feed the updates."""
        return StreamMeter(self, flow) if flow.response is not None else None

    def stream_update(self, flow: http.HTTPFlow, meter: StreamMeter) -> None:
        event: dict[str, Any] = {"type": "update", "id": flow.id, "ts": time.time(),
                                 "chunks": meter.chunks, "bytes": meter.bytes,
                                 "output_tokens_estimate": meter.data_lines}
        if flow.id in self._unnamed and (process := self._process(flow)) is not None:
            self._unnamed.discard(flow.id)
            event["process"] = process
        parser = flow.metadata.get(LIVE_PARSER)
        usage = getattr(parser, "usage", None)
        if usage is not None:
            event["input_tokens"] = getattr(usage, "input_tokens", None)
            event["output_tokens"] = getattr(usage, "output_tokens", None)
        if flow.id not in self._updates:
            self._queue(event)
        self._updates.setdefault(flow.id, event).update(event)

    def response(self, flow: http.HTTPFlow) -> None:
        self.counters.responses += 1
        self._end(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self.counters.errors += 1
        self._end(flow)

    def _end(self, flow: http.HTTPFlow) -> None:
        known = fields(flow)
        started = flow.request.timestamp_start
        ended = (flow.response.timestamp_end if flow.response else None) or time.time()
        self._updates.pop(flow.id, None)
        self._unnamed.discard(flow.id)
        meter = layer_of(flow.response.stream, StreamMeter) if flow.response is not None else None
        self._queue({
            "type": "end", "id": flow.id, "ts": ended,
            "status": flow.response.status_code if flow.response else None,
            "model": known.get("model"), "provider": known.get("provider"),
            "usage": known.get("usage"), "cost_usd": _number(known.get("cost_usd")),
            "ttft_ms": known.get("ttft_ms"), "duration_ms": round((ended - started) * 1000, 1),
            "chunks": known.get("chunks") or (meter.chunks if meter else None),
            "error": known.get("error") or (flow.error.msg if flow.error else None),
            "process": process_summary(known.get("process")) or self._process(flow),
            "host": flow.request.pretty_host,
            # for the supervisor's metrics: who refused it, whose key went in, is it a billed call
            "api": known.get("api"), "credential": known.get("credential"),
            "blocked": flow.response.headers.get(BLOCKED_HEADER) if flow.response else None,
            "counted": known.get("counted"),
        })

    def _process(self, flow: http.HTTPFlow) -> dict[str, Any] | None:
        known = process_summary(fields(flow).get("process"))
        if known:
            return known
        return process_summary(self.lookup.process_of(flow)) if self.lookup else None

    def event(self, event: dict[str, Any]) -> None:
        """An event another stage sends to the feed (a budget alert)."""
        self._queue(event)

    def _queue(self, event: dict[str, Any]) -> None:
        self.pending.append(event)
        if len(self.pending) > MAX_PENDING:
            del self.pending[: len(self.pending) - MAX_PENDING]

    def drain(self) -> list[dict[str, Any]]:
        """The queued events, oldest first; updates carry their latest counters."""
        events, self.pending = self.pending, []
        self._updates = {}  # each was queued when first made: the next update starts afresh
        masked: list[dict[str, Any]] = self.mask().deep(events)
        return masked

    def snapshot(self) -> dict[str, int]:
        counters = asdict(self.counters)
        counters["passthrough"] = max(0, self.counters.connections - self.counters.intercepted)
        return counters


def _number(value: Any) -> float | None:
    try:
        return None if value is None or isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        return None

