"""The ClickHouse export's table, rows and the shipped dashboard's SQL on a current engine (chDB).

tests/e2e/test_exporters_e2e.py runs them against Debian's ClickHouse 18.16, an old release; chDB is
today's ClickHouse in-process, so the same schema is checked on both ends of the range.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import chdb
import paths
from chdb import session
from llmtap.records.clickhouse import create_table, row

DASHBOARD = paths.DOCS / "grafana-llmtap.json"


def record(n: int, model: str, cost: float | None, counted: bool = True) -> dict[str, Any]:
    return {
        "id": f"call{n}", "started_at": f"2026-12-02T09:0{n}:00.250000+00:00",
        "ended_at": f"2026-12-02T09:0{n}:01+00:00", "host": "api.anthropic.com", "method": "POST",
        "path": "/v1/messages", "status": 200, "provider": "anthropic", "api": "messages",
        "model": model, "stream": True, "counted": counted, "repeat_of": None if counted else "x",
        "usage": {"input_tokens": 100 * n, "output_tokens": 10 * n, "cache_read_tokens": 1000,
                  "cache_write_5m_tokens": 0, "cache_write_1h_tokens": None, "reasoning_tokens": None},
        "cost_usd": cost, "price": {"source": "genai-prices", "row": f"anthropic/{model}"},
        "stop_reason": "end_turn", "ttft_ms": 120.5, "duration_ms": 900.0, "chunks": 12,
        "process": {"name": "claude", "user": "dev", "tool": "claude", "pid": 4242},
        "credential": "anthropic", "rules_hit": ["r1"], "dlp_hits": [], "error": None,
    }


def test_the_schema_rows_and_dashboard_queries_run_on_a_current_clickhouse(tmp_path: Path) -> None:
    rows = [row(r, "laptop-1") for r in (
        record(1, "claude-opus-5-5", 0.5), record(2, "claude-opus-5-5", 0.25),
        record(3, "claude-haiku-4-5", None), record(4, "claude-opus-5-5", 0.0, counted=False))]
    db = session.Session(str(tmp_path / "chdb"))
    try:
        db.query("CREATE DATABASE IF NOT EXISTS llmtap")
        db.query(create_table("llmtap", "exchanges"))
        data = "\n".join(json.dumps(r) for r in rows).replace("'", "\\'")
        db.query(f"INSERT INTO llmtap.exchanges FORMAT JSONEachRow {data}")
        totals = json.loads(str(db.query(
            "SELECT count() AS calls, sum(cost_usd) AS usd, sum(output_tokens) AS output "
            "FROM llmtap.exchanges FINAL WHERE counted", "JSON")))["data"][0]
        assert (int(totals["calls"]), totals["usd"], int(totals["output"])) == (3, 0.75, 60)
        for sql in dashboard_queries():
            db.query(sql, "JSON")  # every panel's SQL parses and runs on today's engine
    finally:
        db.close()
    assert chdb.__version__


def dashboard_queries() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    queries = [t["rawSql"] for p in panels for t in p.get("targets", []) if t.get("rawSql")]
    assert queries, "the dashboard has no SQL panels"
    # Grafana's macros, as the ClickHouse data source expands them.
    return [re.sub(r"\$__timeFilter\((\w+)\)", r"\1 >= toDateTime(0)", q)
            .replace("$__timeInterval(started_at)", "toStartOfHour(started_at)") for q in queries]
