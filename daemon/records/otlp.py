"""OpenTelemetry export: each exchange as an OTLP/HTTP span, and the `gen_ai.client.*` metrics,
in the GenAI semantic conventions (semconv 1.37+: `gen_ai.provider.name`, not `gen_ai.system`).

Two stores for llmtap.records.export (its queue, spool and retry policy): traces to
`export.otlp_endpoint` and, unless `export.otlp_metrics = false`, metrics to the sibling
`/v1/metrics`. Each batch of records becomes one export request of each; the metrics are delta
histograms over the batch (a spooled batch stays meaningful whenever it is delivered), which a
collector turns cumulative with its `deltatocumulative` processor where a backend needs that.
"""

from __future__ import annotations

import contextlib
import secrets
import socket
import time
from collections.abc import Sequence
from typing import Any

from llmtap import __version__
from llmtap.config import ExportConfig
from llmtap.parsers.base import as_dict
from llmtap.records.export import Sink, direct_opener, header_pairs, post_http
from llmtap.records.index import parse_time
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue
from opentelemetry.proto.metrics.v1.metrics_pb2 import (
    AggregationTemporality,
    Histogram,
    HistogramDataPoint,
    Metric,
    ResourceMetrics,
    ScopeMetrics,
)
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, Status

# llmtap's provider names -> the semconv's well-known gen_ai.provider.name values
PROVIDER_NAMES = {"google": "gcp.gemini", "openai": "openai", "anthropic": "anthropic",
                  "mistral": "mistral_ai", "xai": "x_ai", "deepseek": "deepseek", "groq": "groq"}
OPERATIONS = {"generateContent": "generate_content", "streamGenerateContent": "generate_content",
              "embeddings": "embeddings", "embedContent": "embeddings",
              "completions": "text_completion", "complete": "text_completion"}
# The semconv's recommended bucket boundaries (gen-ai-metrics.md).
TOKEN_BOUNDS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304,
                16777216, 67108864)
DURATION_BOUNDS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48,
                   40.96, 81.92)


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
    return {
        "gen_ai.operation.name": operation(record),
        "gen_ai.provider.name": provider_name(record),
        "gen_ai.conversation.id": request.get("conversation_id"),
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
        "llmtap.cost_usd": _float(record.get("cost_usd")),  # US dollars, llmtap's pricing
        "llmtap.price.source": as_dict(record.get("price")).get("source"),
        "llmtap.counted": record.get("counted") is not False,  # false: a retrieval, a poll...
        "llmtap.repeat_of": record.get("repeat_of"),
        "llmtap.ttft_ms": _float(record.get("ttft_ms")),
        "llmtap.tool": process.get("tool"),
        "llmtap.credential": record.get("credential"),
    }


def operation(record: dict[str, Any]) -> str:
    return OPERATIONS.get(str(record.get("api")), "chat")


def provider_name(record: dict[str, Any]) -> Any:
    host, provider = str(record.get("host") or ""), record.get("provider")
    if host.endswith("aiplatform.googleapis.com"):
        return "gcp.vertex_ai"
    if "bedrock" in host:
        return "aws.bedrock"
    return PROVIDER_NAMES.get(str(provider), provider)


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


def _resource(service_name: str) -> Resource:
    return Resource(attributes=_attributes({"service.name": service_name,
                                            "host.name": socket.gethostname()}))


def encode(records: Sequence[dict[str, Any]], service_name: str) -> bytes:
    scope_spans = ScopeSpans(spans=[make_span(r) for r in records])
    scope_spans.scope.name = "llmtap"
    scope_spans.scope.version = __version__
    request = ExportTraceServiceRequest(
        resource_spans=[ResourceSpans(resource=_resource(service_name), scope_spans=[scope_spans])])
    return bytes(request.SerializeToString())


class _Points:
    """One delta histogram's data points, by attribute set."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.points: dict[tuple[tuple[str, Any], ...], list[float]] = {}

    def add(self, attrs: dict[str, Any], value: float) -> None:
        key = tuple(sorted((k, v) for k, v in attrs.items() if v is not None))
        slot = self.points.setdefault(key, [0.0] * (len(self.bounds) + 1) + [0.0, 0.0,
                                                                             value, value])
        index = next((i for i, b in enumerate(self.bounds) if value <= b), len(self.bounds))
        slot[index] += 1
        count, total = len(self.bounds) + 1, len(self.bounds) + 2
        slot[count] += 1
        slot[total] += value
        slot[-2], slot[-1] = min(slot[-2], value), max(slot[-1], value)

    def metric(self, name: str, unit: str, text: str, start: int, end: int) -> Metric:
        n = len(self.bounds) + 1
        points = [HistogramDataPoint(
            attributes=_attributes(dict(key)), start_time_unix_nano=start, time_unix_nano=end,
            count=int(slot[n]), sum=slot[n + 1], bucket_counts=[int(c) for c in slot[:n]],
            explicit_bounds=list(self.bounds), min=slot[-2], max=slot[-1])
            for key, slot in self.points.items()]
        return Metric(name=name, unit=unit, description=text, histogram=Histogram(
            data_points=points,
            aggregation_temporality=AggregationTemporality.AGGREGATION_TEMPORALITY_DELTA))


def encode_metrics(records: Sequence[dict[str, Any]], service_name: str) -> bytes:
    """gen_ai.client.token.usage and gen_ai.client.operation.duration over the batch."""
    tokens, durations = _Points(TOKEN_BOUNDS), _Points(DURATION_BOUNDS)
    now = time.time()
    start = min((_nanos(r.get("started_at"), now) for r in records), default=int(now * 1e9))
    end = max((_nanos(r.get("ended_at") or r.get("started_at"), now) for r in records),
              default=start)
    for record in records:
        if record.get("counted") is False:
            continue
        attrs = span_attributes(record)
        common = {k: attrs[k] for k in ("gen_ai.operation.name", "gen_ai.provider.name",
                                        "gen_ai.request.model", "gen_ai.response.model",
                                        "server.address", "server.port")}
        for kind, key in (("input", "gen_ai.usage.input_tokens"),
                          ("output", "gen_ai.usage.output_tokens")):
            if isinstance(attrs[key], int):
                tokens.add({**common, "gen_ai.token.type": kind}, attrs[key])
        if (duration := _duration_s(record)) is not None:
            durations.add({**common, "error.type": attrs["error.type"]}, duration)
    scope = ScopeMetrics(metrics=[
        tokens.metric("gen_ai.client.token.usage", "{token}",
                      "Number of input and output tokens used.", start, end),
        durations.metric("gen_ai.client.operation.duration", "s", "GenAI operation duration.",
                         start, end)])
    scope.scope.name = "llmtap"
    scope.scope.version = __version__
    request = ExportMetricsServiceRequest(resource_metrics=[
        ResourceMetrics(resource=_resource(service_name), scope_metrics=[scope])])
    return bytes(request.SerializeToString())


def _duration_s(record: dict[str, Any]) -> float | None:
    if (duration := _float(record.get("duration_ms"))) is not None:
        return duration / 1000
    started, ended = parse_time(record.get("started_at")), parse_time(record.get("ended_at"))
    return (ended - started).total_seconds() if started and ended else None


def metrics_endpoint(traces: str) -> str:
    """The OTLP/HTTP metrics URL beside the traces one (the collector serves both)."""
    base = traces.removesuffix("/").removesuffix("/v1/traces")
    return f"{base}/v1/metrics"


class OtlpTraces(Sink):
    name = "otlp_traces"

    def __init__(self, config: ExportConfig) -> None:
        self.config = config
        self.url = config.otlp_endpoint
        self.headers = {"Content-Type": "application/x-protobuf", **header_pairs(config.headers)}
        self._opener = direct_opener()

    def encode(self, records: Sequence[dict[str, Any]]) -> bytes:
        return encode(records, self.config.service_name)

    def post(self, payload: bytes) -> None:
        post_http(self._opener, self.url, payload, self.headers, self.config.timeout_s)


class OtlpMetrics(OtlpTraces):
    name = "otlp_metrics"

    def __init__(self, config: ExportConfig) -> None:
        super().__init__(config)
        self.url = metrics_endpoint(config.otlp_endpoint)

    def encode(self, records: Sequence[dict[str, Any]]) -> bytes:
        return encode_metrics(records, self.config.service_name)


def sinks(config: ExportConfig) -> list[Sink]:
    if not config.otlp_endpoint:
        return []
    return [OtlpTraces(config), *([OtlpMetrics(config)] if config.otlp_metrics else [])]
