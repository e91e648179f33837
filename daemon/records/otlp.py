"""OpenTelemetry export: each exchange as an OTLP/HTTP span (GenAI semantic conventions).

Asynchronous: the writer thread hands records to `OtlpExporter.submit` (a bounded queue, never
waiting); a thread of its own batches them, encodes protobuf and posts. When the collector is down
the encoded batch goes to a bounded spool directory and is retried, oldest first, with backoff, so
a collector that is down never slows the proxy and a short outage loses nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import secrets
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from llmtap import __version__
from llmtap.config import ExportConfig
from llmtap.parsers.base import as_dict
from llmtap.records.index import parse_time
from llmtap.records.store import write_atomic
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, Status

log = logging.getLogger(__name__)

QUEUE_SIZE = 2048
BATCH_SIZE = 64
BATCH_WAIT_S = 0.5
RETRY_MIN_S, RETRY_MAX_S = 1.0, 60.0
PROVIDER_NAMES = {"google": "gcp.gemini", "openai": "openai", "anthropic": "anthropic"}
OPERATIONS = {"generateContent": "generate_content", "streamGenerateContent": "generate_content",
              "embeddings": "embeddings", "embedContent": "embeddings",
              "completions": "text_completion", "complete": "text_completion"}


def _value(value: Any) -> AnyValue:
    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, int):
        return AnyValue(int_value=value)
    if isinstance(value, float):
        return AnyValue(double_value=value)
    if isinstance(value, list | tuple):
        return AnyValue(array_value=ArrayValue(values=[_value(v) for v in value]))
    return AnyValue(string_value=str(value))


def _attributes(pairs: dict[str, Any]) -> list[KeyValue]:
    return [KeyValue(key=k, value=_value(v)) for k, v in pairs.items() if v is not None]


def _nanos(stamp: Any, fallback: float) -> int:
    moment = parse_time(stamp)
    return int((moment.timestamp() if moment else fallback) * 1e9)


def span_attributes(record: dict[str, Any]) -> dict[str, Any]:
    usage = as_dict(record.get("usage"))
    request = as_dict(record.get("request"))
    process = as_dict(record.get("process"))
    cached = usage.get("cache_read_tokens")
    created = [usage.get(k) for k in ("cache_write_5m_tokens", "cache_write_1h_tokens")]
    created_total = sum(v for v in created if isinstance(v, int)) if any(
        isinstance(v, int) for v in created) else None
    prompt = None
    if isinstance(usage.get("input_tokens"), int):  # semconv: the whole prompt, cached included
        prompt = usage["input_tokens"] + (cached or 0) + (created_total or 0)
    provider = record.get("provider")
    return {
        "gen_ai.operation.name": OPERATIONS.get(str(record.get("api")), "chat"),
        "gen_ai.provider.name": PROVIDER_NAMES.get(str(provider), provider),
        "gen_ai.system": PROVIDER_NAMES.get(str(provider), provider),
        "gen_ai.request.model": record.get("model"),
        "gen_ai.response.model": record.get("model"),
        "gen_ai.request.max_tokens": request.get("max_tokens"),
        "gen_ai.request.temperature": request.get("temperature"),
        "gen_ai.usage.input_tokens": prompt,
        "gen_ai.usage.output_tokens": usage.get("output_tokens"),
        "gen_ai.usage.cache_read.input_tokens": cached,
        "gen_ai.usage.cache_creation.input_tokens": created_total,
        "gen_ai.usage.reasoning.output_tokens": usage.get("reasoning_tokens"),
        "gen_ai.response.finish_reasons": [record["stop_reason"]] if record.get("stop_reason") else None,
        "gen_ai.response.id": record.get("request_id"),
        "server.address": record.get("host"),
        "server.port": 443,
        "http.request.method": record.get("method"),
        "http.response.status_code": record.get("status"),
        "error.type": _error_type(record),
        "process.pid": process.get("pid"),
        "process.executable.name": process.get("name"),
        "process.executable.path": process.get("exe"),
        "process.owner": process.get("user"),
        "llmtap.record_id": record.get("id"),
        "llmtap.api": record.get("api"),
        "llmtap.stream": bool(record.get("stream")),
        "llmtap.cost_usd": _float(record.get("cost_usd")),
        "llmtap.counted": record.get("counted") is not False,  # false: a retrieval, a poll...
        "llmtap.repeat_of": record.get("repeat_of"),
        "llmtap.ttft_ms": _float(record.get("ttft_ms")),
        "llmtap.tool": process.get("tool"),
        "llmtap.credential": record.get("credential"),
    }


def _float(value: Any) -> float | None:
    with contextlib.suppress(TypeError, ValueError):
        return None if value is None or isinstance(value, bool) else float(value)
    return None


def _error_type(record: dict[str, Any]) -> str | None:
    status = record.get("status")
    if isinstance(status, int) and status >= 400:
        return str(status)
    return "error" if record.get("error") else None


def make_span(record: dict[str, Any]) -> Span:
    attrs = span_attributes(record)
    now = time.time()
    failed = attrs["error.type"] is not None
    return Span(
        trace_id=secrets.token_bytes(16),
        span_id=secrets.token_bytes(8),
        name=f"{attrs['gen_ai.operation.name']} {record.get('model') or 'unknown'}",
        kind=Span.SpanKind.SPAN_KIND_CLIENT,
        start_time_unix_nano=_nanos(record.get("started_at"), now),
        end_time_unix_nano=_nanos(record.get("ended_at") or record.get("started_at"), now),
        attributes=_attributes(attrs),
        status=Status(code=Status.StatusCode.STATUS_CODE_ERROR if failed
                      else Status.StatusCode.STATUS_CODE_UNSET,
                      message=str(record.get("error") or "")[:300] if failed else ""),
    )


def encode(records: list[dict[str, Any]], service_name: str) -> bytes:
    resource = Resource(attributes=_attributes({"service.name": service_name,
                                                "host.name": socket.gethostname()}))
    scope_spans = ScopeSpans(spans=[make_span(r) for r in records])
    scope_spans.scope.name = "llmtap"
    scope_spans.scope.version = __version__
    request = ExportTraceServiceRequest(
        resource_spans=[ResourceSpans(resource=resource, scope_spans=[scope_spans])])
    return request.SerializeToString()


class OtlpExporter:
    def __init__(self, config: ExportConfig, spool_dir: Path) -> None:
        self.config = config
        self.spool_dir = spool_dir
        self.exported = 0  # spans the collector accepted
        self.dropped = 0  # spans lost: queue full, or spool full
        self.failures = 0  # posts that failed (their batch was spooled)
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue(QUEUE_SIZE)
        self._headers = {"Content-Type": "application/x-protobuf"}
        for pair in config.headers:
            name, value = pair.split("=", 1)
            self._headers[name.strip()] = value.strip()
        # Never through a proxy from the environment: the collector is reached directly.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self._retry_at = 0.0
        self._backoff = RETRY_MIN_S
        self._sequence = 0
        with contextlib.suppress(OSError):
            spool_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._run, name="llmtap-otlp", daemon=True)
        self._thread.start()

    def submit(self, record: dict[str, Any]) -> None:
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1

    def close(self, timeout_s: float = 5.0) -> None:
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=1)
        self._thread.join(timeout=timeout_s)

    def spooled(self) -> int:
        with contextlib.suppress(OSError):
            return sum(1 for e in os.listdir(self.spool_dir) if e.endswith(".pb"))
        return 0

    def _run(self) -> None:
        closing = False
        while not closing:
            batch, closing = self._collect()
            if batch:
                self._deliver(encode(batch, self.config.service_name), len(batch))
            if time.monotonic() >= self._retry_at:
                self._drain_spool()

    def _collect(self) -> tuple[list[dict[str, Any]], bool]:
        batch: list[dict[str, Any]] = []
        deadline = time.monotonic() + BATCH_WAIT_S
        while len(batch) < BATCH_SIZE:
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if item is None:
                return batch, True
            batch.append(item)
        return batch, False

    def _deliver(self, payload: bytes, spans: int) -> None:
        if time.monotonic() >= self._retry_at and self._post(payload):
            self.exported += spans
            return
        self._spool(payload, spans)

    def _post(self, payload: bytes) -> bool:
        request = urllib.request.Request(self.config.otlp_endpoint, data=payload,
                                         headers=self._headers, method="POST")
        try:
            with self._opener.open(request, timeout=self.config.timeout_s) as response:
                ok = 200 <= response.status < 300
        except (urllib.error.URLError, OSError, ValueError) as exc:
            ok = False
            reason = getattr(exc, "reason", exc)
            if self.failures % 100 == 0:
                log.warning("OTLP export to %s failed (%s); spooling", self.config.otlp_endpoint,
                            reason)
        if ok:
            self._backoff = RETRY_MIN_S
            self._retry_at = 0.0
        else:
            self.failures += 1
            self._retry_at = time.monotonic() + self._backoff
            self._backoff = min(RETRY_MAX_S, self._backoff * 2)
        return ok

    def _spool(self, payload: bytes, spans: int) -> None:
        self._sequence += 1
        name = f"{time.time_ns():020d}-{self._sequence:06d}-{spans}.pb"
        try:
            entries = sorted(e for e in os.listdir(self.spool_dir) if e.endswith(".pb"))
            while len(entries) >= self.config.spool_max_files:  # bounded: the oldest go first
                oldest = entries.pop(0)
                (self.spool_dir / oldest).unlink()
                self.dropped += _spans_in(oldest)
            write_atomic(self.spool_dir / name, payload)
        except OSError:
            self.dropped += spans

    def _drain_spool(self) -> None:
        try:
            entries = sorted(e for e in os.listdir(self.spool_dir) if e.endswith(".pb"))
        except OSError:
            return
        for entry in entries:
            path = self.spool_dir / entry
            try:
                payload = path.read_bytes()
            except OSError:
                continue
            if not self._post(payload):
                return
            self.exported += _spans_in(entry)
            with contextlib.suppress(OSError):
                path.unlink()


def _spans_in(entry: str) -> int:
    with contextlib.suppress(ValueError, IndexError):
        return int(entry.removesuffix(".pb").rsplit("-", 1)[1])
    return 1
