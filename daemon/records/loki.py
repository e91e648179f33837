"""Grafana Loki: one log line per exchange, through Loki's documented push API.

`POST /loki/api/v1/push` with the JSON body (`{"streams": [{"stream": {labels}, "values":
[["<unix ns>", "<line>"], ...]}]}`), gzip-compressed (`Content-Encoding: gzip`, which Loki's
push handler accepts beside snappy-protobuf), batched. The labels are the few a team filters by
and that stay few: the machine, the local user, the provider, the model and the tool; everything
else (costs, tokens, ids, paths) is in the line, the record as JSON (masked like every record;
bodies are never part of a record, and the per-chunk timeline is left out).
"""

from __future__ import annotations

import datetime
import gzip
import json
import socket
from collections.abc import Sequence
from typing import Any

from llmtap.config import LokiConfig
from llmtap.parsers.base import as_dict
from llmtap.records.export import Sink, direct_opener, header_pairs, post_http
from llmtap.records.index import parse_time

EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
PUSH_PATH = "/loki/api/v1/push"
LEFT_OUT = ("timeline",)  # one point per chunk: too long for a log line, and in the record file


def push_url(url: str) -> str:
    url = url.rstrip("/")
    return url if url.endswith(PUSH_PATH) else url + PUSH_PATH


def labels(record: dict[str, Any], machine: str) -> dict[str, str]:
    process = as_dict(record.get("process"))
    values = {"host": machine, "user": process.get("user"), "provider": record.get("provider"),
              "model": record.get("model"), "tool": process.get("tool") or process.get("name")}
    return {name: str(value) if value not in (None, "") else "unknown"
            for name, value in values.items()}


def timestamp_ns(record: dict[str, Any]) -> str:
    moment = parse_time(record.get("started_at"))  # exact: a float's ns would drift
    return str((moment - EPOCH) // datetime.timedelta(microseconds=1) * 1000) if moment else "0"


def line(record: dict[str, Any]) -> str:
    kept = {k: v for k, v in record.items() if k not in LEFT_OUT}
    return json.dumps(kept, default=str, separators=(",", ":"), ensure_ascii=False)


def encode(records: Sequence[dict[str, Any]], machine: str) -> bytes:
    streams: dict[tuple[tuple[str, str], ...], list[list[str]]] = {}
    for record in records:
        key = tuple(sorted(labels(record, machine).items()))
        streams.setdefault(key, []).append([timestamp_ns(record), line(record)])
    body = {"streams": [{"stream": dict(key), "values": sorted(values, key=lambda v: int(v[0]))}
                        for key, values in streams.items()]}
    return gzip.compress(json.dumps(body, separators=(",", ":")).encode(), compresslevel=6)


class Loki(Sink):
    name = "loki"

    def __init__(self, config: LokiConfig, timeout_s: float) -> None:
        self.url = push_url(config.url)
        self.timeout_s = timeout_s
        self.machine = socket.gethostname()
        self.headers = {"Content-Type": "application/json", "Content-Encoding": "gzip",
                        **header_pairs(config.headers)}
        if config.tenant:
            self.headers["X-Scope-OrgID"] = config.tenant
        self._opener = direct_opener()

    def encode(self, records: Sequence[dict[str, Any]]) -> bytes:
        return encode(records, self.machine)

    def post(self, payload: bytes) -> None:
        post_http(self._opener, self.url, payload, self.headers, self.timeout_s)
