"""The UI's reads of the records index: recent calls, a window for sessions, series for charts.

Records that are not billed calls (`counted` false, where the index has that column) are listed
but never counted in totals or charts.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llmtap.context_windows import context_window
from llmtap.records import store
from llmtap.records.index import COUNTED, Index

WINDOW = 1000  # the calls sessions are grouped over (the newest; each is read once)
MAX_KNOWN = 100_000
CONTEXT_KEYS = ("input_tokens", "cache_read_tokens", "cache_write_5m_tokens", "cache_write_1h_tokens",
                "output_tokens")


@contextlib.contextmanager
def opened(records_dir: Path) -> Iterator[Index]:
    index = Index.open_reader(records_dir)
    try:
        yield index
    finally:
        index.close()


def has_counted(index: Index) -> bool:
    return "counted" in {row[1] for row in index.conn.execute("PRAGMA table_info(calls)")}


def counted_sql(index: Index) -> str:
    """A WHERE clause that keeps billed calls only (every call, on an index without `counted`)."""
    return COUNTED if has_counted(index) else "1=1"


class Billed:
    """Whether a call counts, from its JSON record where the index has no `counted` column yet.

    Records never change, so each answer is kept (bounded).
    """

    def __init__(self, records_dir: Path) -> None:
        self.records_dir = records_dir
        self._known: dict[str, bool] = {}

    def keep(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [row for row in rows if self.counts(row)]

    def counts(self, row: dict[str, Any]) -> bool:
        if "counted" in row:
            return bool(row["counted"] != 0)
        if row["id"] not in self._known:
            data = store.read_location(self.records_dir, str(row["location"]))
            try:
                record = json.loads(data) if data else {}
            except ValueError:
                record = {}
            if len(self._known) >= MAX_KNOWN:
                self._known.pop(next(iter(self._known)))
            self._known[row["id"]] = not (isinstance(record, dict) and record.get("counted") is False)
        return self._known[row["id"]]


def context_use(row: Any) -> dict[str, Any]:
    used = sum(row[k] or 0 for k in CONTEXT_KEYS)
    window = context_window(row["model"])
    return {"used": used, "window": window,
            "percent": round(100 * used / window, 1) if window and used else None}


def recent(index: Index, limit: int = 50, before_ts: float | None = None) -> list[dict[str, Any]]:
    where, args = "1=1", []
    if before_ts is not None:
        where, args = "started_ts <= ?", [before_ts]
    sql = (f"SELECT rowid, * FROM calls WHERE {where} ORDER BY started_ts DESC, rowid DESC "
           f"LIMIT {int(limit)}")
    return [dict(row) for row in index.conn.execute(sql, args)]


def window(index: Index, until_ts: float | None = None, size: int = WINDOW) -> list[dict[str, Any]]:
    """The newest `size` calls (up to a time), oldest first: what sessions are built from."""
    return list(reversed(recent(index, size, until_ts)))


def find(index: Index, record_id: str) -> dict[str, Any] | None:
    row = index.conn.execute("SELECT rowid, * FROM calls WHERE id = ?", (record_id,)).fetchone()
    return dict(row) if row else None


def search(index: Index, text: str, limit: int = 200) -> list[dict[str, Any]]:
    pattern = "%" + text.replace("%", "").replace("_", "") + "%"
    columns = ("id", "model", "host", "path", "process_name", "process_tool", "process_user",
               "error", "provider", "api", "credential")
    test = " OR ".join(f"{c} LIKE ?" for c in columns)
    sql = f"SELECT rowid, * FROM calls WHERE {test} ORDER BY started_ts DESC LIMIT {int(limit)}"
    return [dict(row) for row in index.conn.execute(sql, [pattern] * len(columns))]


def usage_rows(index: Index, since: float | None) -> list[dict[str, Any]]:
    """Billed calls since a time, oldest first, with what the charts add up."""
    counted = ", counted" if has_counted(index) else ""
    sql = (f"SELECT id, location, started_ts{counted}, model, "
           f"COALESCE(process_tool, process_name) AS process, input_tokens, output_tokens, "
           f"cache_read_tokens, cache_write_5m_tokens, "
           f"cache_write_1h_tokens, cost_usd FROM calls WHERE {counted_sql(index)} AND "
           f"model IS NOT NULL AND started_ts >= ? ORDER BY started_ts")
    try:
        return [dict(row) for row in index.conn.execute(sql, [since or 0])]
    except sqlite3.Error:
        return []
