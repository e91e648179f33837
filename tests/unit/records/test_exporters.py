"""The shared export spool and retry policy, and what Loki and ClickHouse are sent (their wire
formats; the real ClickHouse and the Loki receiver are in tests/e2e/test_exporters_e2e.py)."""

from __future__ import annotations

import gzip
import json
import time
from collections.abc import Sequence
from typing import Any

from llmtap.config import ClickhouseConfig, LokiConfig
from llmtap.masking import SecretMask
from llmtap.records import clickhouse, export, loki
from llmtap.records.capture import Body, Exchange
from llmtap.records.export import BODIES, Exporters, Rejected, Sink, Spool, StoreError
from testbed import wait_for

RECORD = {"id": "r1", "started_at": "2026-06-01T10:00:00.250Z", "ended_at": "2026-06-01T10:00:02Z",
          "host": "api.anthropic.com", "method": "POST", "path": "/v1/messages", "status": 200,
          "provider": "anthropic", "api": "messages", "model": "claude-sonnet-4-5", "stream": True,
          "usage": {"input_tokens": 10, "output_tokens": 20, "cache_read_tokens": None},
          "cost_usd": 0.5, "price": {"source": "genai-prices", "version": "0.2.3",
                                     "row": "anthropic/claude-sonnet-4-5"},
          "timeline": [[1, 2]] * 50, "rules_hit": ["r"], "dlp_hits": [{"detector": "jwt"}],
          "process": {"pid": 7, "name": "node", "tool": "claude-code", "user": "alice"}}


def test_the_spool_is_one_bound_for_every_store_oldest_out_first(tmp_path):
    spool = Spool(tmp_path, max_files=3, max_bytes=1000)
    spool.put("loki", b"a" * 100, 2)
    spool.put("clickhouse", b"b" * 100, 3)
    spool.put("loki", b"c" * 100, 4)
    spool.put("clickhouse", b"d" * 100, 5)  # a fourth file: the oldest (loki's 2) goes
    assert len(spool) == 3 and spool.dropped == {"loki": 2}
    spool.put("loki", b"e" * 900, 1)  # bytes too: 300 + 900 > 1000 pushes out the older ones
    assert spool.dropped == {"loki": 6, "clickhouse": 3} and len(spool) == 2
    entry = spool.oldest("loki")
    assert entry is not None and spool.read(entry) == b"e" * 900
    assert spool.oldest("clickhouse") is not None
    reopened = Spool(tmp_path, 3, 1000)  # after a restart, what was spooled is still there
    assert reopened.oldest("loki") == entry


def test_a_spool_left_by_the_otlp_only_exporter_is_delivered(tmp_path):
    (tmp_path / "00000000000000000001-000001-7.pb").write_bytes(b"old")
    entry = Spool(tmp_path, 10, 1 << 20).oldest("otlp_traces")
    assert entry is not None and entry.count == 7


class Fake(Sink):
    def __init__(self, name: str = "fake", fail: type[Exception] | None = None) -> None:
        self.name, self.fail = name, fail
        self.posted: list[list[str]] = []

    def encode(self, records: Sequence[dict[str, Any]]) -> bytes:
        return json.dumps([r["id"] for r in records]).encode()

    def post(self, payload: bytes) -> None:
        if self.fail:
            raise self.fail("no")
        self.posted.append(json.loads(payload))


def test_a_store_that_is_down_gets_its_batches_in_order_once_it_is_back(tmp_path, monkeypatch):
    monkeypatch.setattr(export, "RETRY_MIN_S", 0.1)
    monkeypatch.setattr(export, "BATCH_WAIT_S", 0.05)
    down, up = Fake("down", StoreError), Fake("up")
    exporters = Exporters([down, up], Spool(tmp_path, 100, 1 << 20))
    try:
        for n in range(3):
            exporters.submit({"id": f"r{n}"})
            time.sleep(0.2)  # a batch each
        assert wait_for(lambda: len(exporters.spool) == 3)
        assert [i for batch in up.posted for i in batch] == ["r0", "r1", "r2"]  # never held up
        down.fail = None
        assert wait_for(lambda: len(exporters.spool) == 0)
    finally:
        exporters.close()
    assert [i for batch in down.posted for i in batch] == ["r0", "r1", "r2"]
    counters = exporters.counters()
    assert counters["export_down_sent"] == counters["export_up_sent"] == 3
    assert counters["export_dropped"] == 0


def test_a_batch_the_store_refuses_is_dropped_and_counted_not_retried(tmp_path, monkeypatch):
    monkeypatch.setattr(export, "BATCH_WAIT_S", 0.05)
    refusing = Fake("refusing", Rejected)
    exporters = Exporters([refusing], Spool(tmp_path, 100, 1 << 20))
    try:
        exporters.submit({"id": "r0"})
        assert wait_for(lambda: exporters.counters()["export_refusing_dropped"] == 1)
    finally:
        exporters.close()
    assert len(exporters.spool) == 0


def exchange(mask: SecretMask) -> Exchange:
    return Exchange(request_headers=[], response_headers=[],
                    request_body=Body(gzip.compress(b'{"content": "key sk-REAL-123456"}'), 33,
                                      "gzip", "application/json"),
                    response_body=Body(b'{"ok": true}', 12, None, "application/json"), mask=mask)


def test_only_a_store_that_wants_bodies_gets_them_masked(tmp_path, monkeypatch):
    monkeypatch.setattr(export, "BATCH_WAIT_S", 0.05)
    seen: dict[str, list[dict[str, Any]]] = {}

    class Keeps(Fake):
        def encode(self, records: Sequence[dict[str, Any]]) -> bytes:
            seen.setdefault(self.name, []).extend(records)
            return b"[]"

    wants = Keeps("wants")
    wants.wants_bodies = True
    exporters = Exporters([wants, Keeps("plain")], Spool(tmp_path, 10, 1 << 20),
                          clickhouse.bodies)
    try:
        exporters.submit(dict(RECORD), exchange(SecretMask(["sk-REAL-123456"])))
        assert wait_for(lambda: len(seen) == 2)
    finally:
        exporters.close()
    assert BODIES not in seen["plain"][0]
    bodies = seen["wants"][0][BODIES]
    assert "sk-REAL-123456" not in json.dumps(bodies) and '"content": "key' in bodies["request"]
    assert bodies["response"] == '{"ok": true}'


def test_bodies_are_masked_before_they_are_cut(monkeypatch):
    monkeypatch.setattr(clickhouse, "BODY_CHARS", 10)
    secret = "sk-REAL-123456"
    made = exchange(SecretMask([secret]))
    text = "\U0001F600" * 8 + secret  # 4-byte characters: a cut at 40 bytes splits the secret
    made.request_body = Body(text.encode(), len(text.encode()))
    made.response_text = "x" * 5 + secret
    monkeypatch.setattr(clickhouse, "MARGIN", 0)
    assert clickhouse.bodies(made)["request"].endswith("sk")  # what the margin is for
    monkeypatch.setattr(clickhouse, "MARGIN", 20)
    bodies = clickhouse.bodies(made)
    assert "sk" not in bodies["request"] and bodies["request"].startswith("\U0001F600" * 8)
    assert "sk-" not in bodies["response"] and len(bodies["response"]) == 10


def test_loki_push_is_gzip_json_in_streams_by_five_labels():
    payload = loki.encode([RECORD, {**RECORD, "id": "r0", "started_at": "2026-06-01T09:00:00Z"},
                           {**RECORD, "id": "r2", "model": "other", "process": None}], "box1")
    body = json.loads(gzip.decompress(payload))
    streams = {s["stream"]["model"]: s for s in body["streams"]}
    assert streams["claude-sonnet-4-5"]["stream"] == {
        "host": "box1", "user": "alice", "provider": "anthropic", "model": "claude-sonnet-4-5",
        "tool": "claude-code"}
    assert streams["other"]["stream"]["user"] == "unknown"
    values = streams["claude-sonnet-4-5"]["values"]
    assert [json.loads(line)["id"] for _, line in values] == ["r0", "r1"]  # oldest first
    assert values[1][0] == "1780308000250000000"
    assert "timeline" not in json.loads(values[1][1])
    assert loki.push_url("http://l:3100/") == "http://l:3100/loki/api/v1/push"
    sink = loki.Loki(LokiConfig(url="http://l:3100", tenant="t1", headers=("authorization=Basic x",)),
                     5)
    assert sink.headers["X-Scope-OrgID"] == "t1" and sink.headers["Content-Encoding"] == "gzip"


def test_clickhouse_rows_keep_to_old_column_types_and_nulls():
    row = clickhouse.row({**RECORD, "counted": False, BODIES: {"request": "q", "response": "a"}},
                         "box1")
    assert row["started_at"] == "2026-06-01 10:00:00" and row["ended_at"] == "2026-06-01 10:00:02"
    assert (row["input_tokens"], row["cache_read_tokens"], row["counted"]) == (10, None, 0)
    assert (row["price_source"], row["price_row"]) == ("genai-prices", "anthropic/claude-sonnet-4-5")
    assert (row["request_body"], row["tool"], row["machine"]) == ("q", "claude-code", "box1")
    assert set(row) == {name for name, _ in clickhouse.COLUMNS}
    table = clickhouse.create_table("llmtap", "exchanges")
    assert "DateTime64" not in table and "LowCardinality" not in table
    sink = clickhouse.Clickhouse(ClickhouseConfig(url="http://c:8123", user="u", password="p"), 5,
                                 "box1")
    assert sink.headers["Authorization"] == "Basic dTpw"
    lines = gzip.decompress(sink.encode([RECORD, RECORD])).decode().splitlines()
    assert len(lines) == 2 and json.loads(lines[0])["request_body"] == ""  # bodies off
