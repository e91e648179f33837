"""ClickHouse: one row per exchange, over ClickHouse's HTTP interface.

A batch is one `INSERT ... FORMAT JSONEachRow`, gzip-compressed. The database and table are
created if missing, before the first insert and again whenever ClickHouse says they are gone.
The column types are ones every ClickHouse since 2018 has (Debian's 18.16 included): DateTime,
Nullable, Array, MergeTree with PARTITION BY / ORDER BY; no DateTime64 or LowCardinality.
Unknown JSON fields are skipped, so a table made by an older llmtap keeps taking rows. Delivery is
at least once (a store that took a batch but answered too late gets it again): the table is a
ReplacingMergeTree keyed by (started_at, id), so merges drop the repeats; count(DISTINCT id) or
FINAL counts exactly before they do.
Bodies are off by default; with `bodies = true` they are the Markdown twin's (bounded by
records.max_body_bytes, decoded) with every held secret masked by value.
"""

from __future__ import annotations

import base64
import gzip
import json
import urllib.parse
from collections.abc import Sequence
from typing import Any

from llmtap.config import ClickhouseConfig
from llmtap.parsers.base import as_dict
from llmtap.parsers.encoding import decode_all
from llmtap.records.capture import Body, Exchange
from llmtap.records.export import BODIES, Rejected, Sink, StoreError, direct_opener, post_http
from llmtap.records.index import parse_time

MAX_DECODED = 4 << 20
BODY_CHARS = 65536  # of each body in a row: a row is for finding a call, the record has the rest
# Masked before it is cut, over this much more: a secret the first cut splits lies past the second.
MARGIN = 65536
TOKENS = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_5m_tokens",
          "cache_write_1h_tokens", "reasoning_tokens")
COLUMNS = (
    ("id", "String"), ("started_at", "DateTime('UTC')"), ("ended_at", "Nullable(DateTime('UTC'))"),
    ("machine", "String"), ("host", "String"), ("method", "String"), ("path", "String"),
    ("status", "Nullable(UInt16)"), ("provider", "String"), ("api", "String"), ("model", "String"),
    ("stream", "UInt8"), ("counted", "UInt8"), ("repeat_of", "String"),
    *((name, "Nullable(UInt64)") for name in TOKENS),
    ("cost_usd", "Nullable(Float64)"), ("price_source", "String"), ("price_row", "String"),
    ("stop_reason", "String"), ("ttft_ms", "Nullable(Float64)"),
    ("duration_ms", "Nullable(Float64)"), ("chunks", "Nullable(UInt32)"),
    ("process_name", "String"), ("process_user", "String"), ("tool", "String"),
    ("pid", "Nullable(UInt32)"), ("credential", "String"), ("rules_hit", "Array(String)"),
    ("dlp_hits", "String"), ("error", "String"), ("request_body", "String"),
    ("response_body", "String"),
)


def create_table(database: str, table: str) -> str:
    columns = ", ".join(f"{name} {kind}" for name, kind in COLUMNS)
    return (f"CREATE TABLE IF NOT EXISTS {database}.{table} ({columns}) ENGINE = ReplacingMergeTree() "
            "PARTITION BY toYYYYMM(started_at) ORDER BY (started_at, id)")


def _when(stamp: Any) -> str | None:
    moment = parse_time(stamp)
    return moment.strftime("%Y-%m-%d %H:%M:%S") if moment else None


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def _num(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _str(value: Any) -> str:
    return "" if value is None else str(value)


def row(record: dict[str, Any], machine: str) -> dict[str, Any]:
    usage, process = as_dict(record.get("usage")), as_dict(record.get("process"))
    price, bodies = as_dict(record.get("price")), as_dict(record.get(BODIES))
    return {
        "id": _str(record.get("id")), "started_at": _when(record.get("started_at")) or
        "1970-01-01 00:00:00", "ended_at": _when(record.get("ended_at")), "machine": machine,
        "host": _str(record.get("host")), "method": _str(record.get("method")),
        "path": _str(record.get("path")), "status": _int(record.get("status")),
        "provider": _str(record.get("provider")), "api": _str(record.get("api")),
        "model": _str(record.get("model")), "stream": int(bool(record.get("stream"))),
        "counted": int(record.get("counted") is not False),
        "repeat_of": _str(record.get("repeat_of")),
        **{name: _int(usage.get(name)) for name in TOKENS},
        "cost_usd": _num(record.get("cost_usd")), "price_source": _str(price.get("source")),
        "price_row": _str(price.get("row")), "stop_reason": _str(record.get("stop_reason")),
        "ttft_ms": _num(record.get("ttft_ms")), "duration_ms": _num(record.get("duration_ms")),
        "chunks": _int(record.get("chunks")), "process_name": _str(process.get("name")),
        "process_user": _str(process.get("user")), "tool": _str(process.get("tool")),
        "pid": _int(process.get("pid")), "credential": _str(record.get("credential")),
        "rules_hit": [str(r) for r in record.get("rules_hit") or []],
        "dlp_hits": json.dumps(record.get("dlp_hits") or [], default=str),
        "error": _str(record.get("error")),
        "request_body": _str(bodies.get("request")), "response_body": _str(bodies.get("response")),
    }


def body_text(body: Body, exchange: Exchange) -> str:
    """A captured body as text, decoded, every held secret masked (as in the Markdown twin)."""
    if not body.data:
        return ""
    try:
        raw = decode_all(body.data, body.encoding, MAX_DECODED)
    except Exception:  # an encoding that does not decode: nothing shown, as in the Markdown
        return ""
    return cut(raw[:BODY_CHARS * 4 + MARGIN].decode("utf-8", "replace"), exchange)


def bodies(exchange: Exchange) -> dict[str, str]:
    response = exchange.response_text or body_text(exchange.response_body, exchange)
    return {"request": body_text(exchange.request_body, exchange),
            "response": cut(response[:BODY_CHARS + MARGIN], exchange)}


def cut(text: str, exchange: Exchange) -> str:
    return exchange.mask.text(text)[:BODY_CHARS]


class Clickhouse(Sink):
    name = "clickhouse"

    def __init__(self, config: ClickhouseConfig, timeout_s: float, machine: str) -> None:
        self.config, self.timeout_s, self.machine = config, timeout_s, machine
        self.wants_bodies = config.bodies
        self.base = config.url.rstrip("/") + "/"
        self.headers: dict[str, str] = {}
        if config.user:
            token = base64.b64encode(f"{config.user}:{config.password}".encode()).decode()
            self.headers["Authorization"] = f"Basic {token}"
        self.table = f"{config.database}.{config.table}"
        self._ready = False
        self._opener = direct_opener()

    def encode(self, records: Sequence[dict[str, Any]]) -> bytes:
        lines = (json.dumps(row(r, self.machine), separators=(",", ":")) for r in records)
        return gzip.compress("\n".join(lines).encode() + b"\n", compresslevel=6)

    def _query(self, sql: str, body: bytes, headers: dict[str, str] | None = None,
               **params: str) -> None:
        url = self.base + "?" + urllib.parse.urlencode({"query": sql, **params})
        post_http(self._opener, url, body, {**self.headers, **(headers or {})}, self.timeout_s)

    def post(self, payload: bytes) -> None:
        if not self._ready:
            self._query(f"CREATE DATABASE IF NOT EXISTS {self.config.database}", b"")
            self._query(create_table(self.config.database, self.config.table), b"")
            self._ready = True
        try:
            self._query(f"INSERT INTO {self.table} FORMAT JSONEachRow", payload,
                        {"Content-Encoding": "gzip"}, input_format_skip_unknown_fields="1")
        except Rejected as exc:
            if "Code: 60," in str(exc) or "Code: 81," in str(exc):  # table or database gone
                self._ready = False
                raise StoreError(str(exc)) from None
            raise
