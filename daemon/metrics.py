"""Prometheus metrics, kept by the root supervisor from what the worker already reports.

The worker's live `end` events (one per exchange, batched a few times a second) carry the model,
usage, cost, TTFT and duration; its counter reports carry connections, records and exports. So
the proxy's event loop does no more work for metrics than it did for the dashboard, and the
totals outlive a worker's restart (each worker's counters start at zero; `Accumulated` adds them
up). Rendered in the Prometheus text exposition format, version 0.0.4.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from llmtap import __version__
from llmtap.parsers.base import as_dict

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TTFT_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 60.0)
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
MAX_SERIES = 2000  # label sets per family: past it, new ones are counted under "other"
TOKEN_KINDS = (("input_tokens", "input"), ("output_tokens", "output"),
               ("cache_read_tokens", "cache_read"), ("cache_write_5m_tokens", "cache_write_5m"),
               ("cache_write_1h_tokens", "cache_write_1h"), ("reasoning_tokens", "reasoning"))
CALL = ("provider", "model", "tool", "user")
# The worker's counters (per worker process) that become totals here: name -> (metric, help).
WORKER_COUNTERS = {
    "connections": ("llmtap_connections_total", "Connections accepted from local clients."),
    "intercepted": ("llmtap_intercepted_connections_total", "TLS connections decrypted."),
    "errors": ("llmtap_proxy_errors_total", "Exchanges that ended in a connection error."),
    "records_written": ("llmtap_records_written_total", "Records written."),
    "records_dropped": ("llmtap_records_dropped_total", "Records lost (queue full, disk error)."),
    "records_index_errors": ("llmtap_records_index_errors_total", "Records not indexed."),
    "upstream_kept": ("llmtap_upstream_connections_kept_total",
                      "Verified upstream connections kept for a later client when theirs left."),
    "upstream_reused": ("llmtap_upstream_connections_reused_total",
                        "Server connections taken from those kept (no TCP or TLS handshake)."),
}
STORES = ("otlp_traces", "otlp_metrics", "loki", "clickhouse")  # llmtap.records.export's sinks


def escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else repr(float(value))


def _labels(names: Iterable[str], values: Iterable[str], extra: str = "") -> str:
    pairs = [f'{n}="{escape(v)}"' for n, v in zip(names, values, strict=True)]
    if extra:
        pairs.append(extra)
    return "{" + ",".join(pairs) + "}" if pairs else ""


@dataclass
class Family:
    name: str
    kind: str  # counter | gauge | histogram
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()
    samples: dict[tuple[str, ...], list[float]] = field(default_factory=dict)

    def _slot(self, key: tuple[str, ...]) -> list[float]:
        if key not in self.samples and len(self.samples) >= MAX_SERIES:
            key = tuple("other" for _ in key)  # bounded, whatever the label values
        if key not in self.samples:  # a histogram: bucket counts, then sum and count
            self.samples[key] = [0.0] * (len(self.buckets) + 2) if self.kind == "histogram" else [0.0]
        return self.samples[key]

    def add(self, key: tuple[str, ...], amount: float) -> None:
        self._slot(key)[0] += amount

    def set(self, key: tuple[str, ...], value: float) -> None:
        self._slot(key)[0] = value

    def observe(self, key: tuple[str, ...], value: float) -> None:
        slot = self._slot(key)
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                slot[i] += 1
        slot[-2] += value
        slot[-1] += 1

    def render(self) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]
        for key, slot in sorted(self.samples.items()):
            if self.kind != "histogram":
                lines.append(f"{self.name}{_labels(self.labels, key)} {number(slot[0])}")
                continue
            for bound, count in zip((*self.buckets, math.inf), (*slot[:-2], slot[-1]), strict=True):
                le = f'le="{number(bound)}"'
                lines.append(f"{self.name}_bucket{_labels(self.labels, key, le)} {number(count)}")
            lines.append(f"{self.name}_sum{_labels(self.labels, key)} {number(slot[-2])}")
            lines.append(f"{self.name}_count{_labels(self.labels, key)} {number(slot[-1])}")
        return lines


class Accumulated:
    """Per-process counters summed over the processes' lifetimes: a new worker starts at zero."""

    def __init__(self) -> None:
        self.base: dict[str, float] = {}
        self.current: dict[str, float] = {}
        self.source = 0

    def update(self, counters: dict[str, Any], source: int) -> None:
        if source != self.source:
            for name, value in self.current.items():
                self.base[name] = self.base.get(name, 0.0) + value
            self.current, self.source = {}, source
        for name, value in counters.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                self.current[name] = float(value)

    @property
    def seen(self) -> set[str]:
        return set(self.base) | set(self.current)

    def total(self, name: str) -> float:
        return self.base.get(name, 0.0) + self.current.get(name, 0.0)

    def latest(self, name: str) -> float:
        return self.current.get(name, 0.0)


def _text(value: Any) -> str:
    return str(value) if value not in (None, "") else "unknown"


def _float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


class Metrics:
    """Thread-safe: the supervisor's report reader feeds it, the HTTP server reads it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.worker = Accumulated()
        self.calls = Family("llmtap_requests_total", "counter",
                            "LLM API calls (billed exchanges), by HTTP status code.", (*CALL, "code"))
        self.tokens = Family("llmtap_tokens_total", "counter",
                             "Tokens by kind (input excludes cache reads and writes).", (*CALL, "kind"))
        self.cost = Family("llmtap_cost_usd_total", "counter", "Cost in US dollars.", CALL)
        self.unpriced = Family("llmtap_unpriced_requests_total", "counter",
                               "Calls with tokens whose model no price source knows.",
                               ("provider", "model"))
        self.ttft = Family("llmtap_time_to_first_token_seconds", "histogram",
                           "Time from the request to the first response byte of content.",
                           ("provider", "model"), TTFT_BUCKETS)
        self.duration = Family("llmtap_request_duration_seconds", "histogram",
                               "Time from the request to the end of the response.",
                               ("provider", "model"), DURATION_BUCKETS)
        self.errors = Family("llmtap_errors_total", "counter",
                             "Exchanges recorded with an error.", ("provider", "model"))
        self.blocks = Family("llmtap_blocks_total", "counter",
                             "Requests llmtap refused itself, by stage.", ("stage",))
        self.injections = Family("llmtap_injections_total", "counter",
                                 "Requests sent with a real key in place of a placeholder.",
                                 ("credential",))
        self.families = (self.calls, self.tokens, self.cost, self.unpriced, self.ttft,
                         self.duration, self.errors, self.blocks, self.injections)

    def observe(self, events: list[dict[str, Any]]) -> None:
        with self._lock:
            for event in events:
                if event.get("type") == "end":
                    self._end(event)

    def _end(self, event: dict[str, Any]) -> None:
        provider, model = _text(event.get("provider")), _text(event.get("model"))
        blocked = event.get("blocked")
        if blocked:
            self.blocks.add((str(blocked),), 1)
        elif event.get("credential"):
            self.injections.add((str(event["credential"]),), 1)
        if event.get("error"):
            self.errors.add((provider, model), 1)
        if event.get("counted") is False:  # not a billed call (e.g. a model list)
            return
        process = as_dict(event.get("process"))
        call = (provider, model, _text(process.get("tool") or process.get("name")),
                _text(process.get("user")))
        self.calls.add((*call, _text(event.get("status"))), 1)
        usage = as_dict(event.get("usage"))
        for key, kind in TOKEN_KINDS:
            if (count := _float(usage.get(key))) is not None:
                self.tokens.add((*call, kind), count)
        if (cost := _float(event.get("cost_usd"))) is not None:
            self.cost.add(call, cost)
        elif any(_float(usage.get(k)) is not None for k in ("input_tokens", "output_tokens")):
            self.unpriced.add((provider, model), 1)  # tokens but no price (as `prices missing`)
        if (ttft := _float(event.get("ttft_ms"))) is not None:
            self.ttft.observe((provider, model), ttft / 1000)
        if (duration := _float(event.get("duration_ms"))) is not None:
            self.duration.observe((provider, model), duration / 1000)

    def update_counters(self, counters: dict[str, Any], worker_pid: int) -> None:
        with self._lock:
            self.worker.update(counters, worker_pid)

    def render(self, state: Callable[[], dict[str, Any]]) -> str:
        """`state` is the supervisor's: intercepting, restarts, healing, active, started."""
        now = state()
        lines = [*_gauge("llmtap_build_info", "llmtap's version.", 1, f'version="{__version__}"'),
                 *_gauge("llmtap_intercepting", "1 when the redirect is in place and the proxy "
                         "answers.", float(bool(now.get("intercepting")))),
                 *_gauge("llmtap_healing", "1 while a failed part is being replaced.",
                         float(bool(now.get("healing")))),
                 *_gauge("llmtap_active_requests", "Exchanges in flight.", now.get("active", 0)),
                 *_gauge("llmtap_start_time_seconds", "When the daemon started (Unix time).",
                         now.get("started", time.time())),
                 "# HELP llmtap_restarts_total Proxy worker restarts by the watchdog.",
                 "# TYPE llmtap_restarts_total counter",
                 f"llmtap_restarts_total {number(now.get('restarts', 0))}"]
        with self._lock:
            for family in self.families:
                lines.extend(family.render())
            for name, (metric, text) in WORKER_COUNTERS.items():
                lines += [f"# HELP {metric} {text}", f"# TYPE {metric} counter",
                          f"{metric} {number(self.worker.total(name))}"]
            for what, text in (("sent", "Records a remote store accepted."),
                               ("dropped", "Records a remote store will never get.")):
                metric = f"llmtap_export_{what}_total"
                lines += [f"# HELP {metric} {text}", f"# TYPE {metric} counter"]
                lines += [f'{metric}{{store="{store}"}} {number(self.worker.total(key))}'
                          for store in STORES
                          if (key := f"export_{store}_{what}") in self.worker.seen]
            lines += _gauge("llmtap_export_spooled", "Export batches waiting in the spool.",
                            self.worker.latest("export_spooled"))
        return "\n".join(lines) + "\n"


def _gauge(name: str, text: str, value: float, labels: str = "") -> list[str]:
    return [f"# HELP {name} {text}", f"# TYPE {name} gauge",
            f"{name}{'{' + labels + '}' if labels else ''} {number(value)}"]
