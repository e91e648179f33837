"""The SQLite index of the records (WAL mode): fast queries; the files stay the source of truth.

The writer thread of the daemon adds each record as it is written; `llmtap reindex` rebuilds the
index from the files at any time, in place (so a running daemon keeps writing to the same file).
Readers open it read-only; `--read-only` never changes a byte (see `open_reader`).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import sqlite3
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from llmtap.parsers.base import as_dict
from llmtap.records.store import INDEX_NAME, iter_records

USAGE_KEYS = ("input_tokens", "output_tokens", "cache_read_tokens", "cache_write_5m_tokens",
              "cache_write_1h_tokens", "reasoning_tokens")
COLUMNS: tuple[tuple[str, str], ...] = (
    ("id", "TEXT PRIMARY KEY"), ("location", "TEXT"), ("started_at", "TEXT"),
    ("started_ts", "REAL"), ("day", "TEXT"), ("ended_at", "TEXT"), ("host", "TEXT"),
    ("method", "TEXT"), ("path", "TEXT"), ("status", "INTEGER"), ("provider", "TEXT"),
    ("api", "TEXT"), ("model", "TEXT"), ("stream", "INTEGER"),
    *((key, "INTEGER") for key in USAGE_KEYS),
    ("max_tokens", "INTEGER"), ("cost_usd", "REAL"), ("ttft_ms", "REAL"), ("duration_ms", "REAL"),
    ("process_pid", "INTEGER"), ("process_name", "TEXT"), ("process_tool", "TEXT"),
    ("process_user", "TEXT"), ("credential", "TEXT"), ("error", "TEXT"),
    # 0: a retrieval, a poll, a WebSocket upgrade... (llmtap.addons.counting); NULL counts
    ("counted", "INTEGER"), ("billed_id", "TEXT"), ("repeat_of", "TEXT"),
    ("budgets", "TEXT"),  # a JSON list: the budgets covering the call (record's policy.budgets)
)
NAMES = tuple(name for name, _ in COLUMNS)
SCHEMA = f"""
CREATE TABLE IF NOT EXISTS calls ({", ".join(f"{n} {t}" for n, t in COLUMNS)});
"""
INDEXES = """
CREATE INDEX IF NOT EXISTS calls_started ON calls(started_ts);
CREATE INDEX IF NOT EXISTS calls_billed ON calls(billed_id) WHERE billed_id IS NOT NULL;
"""
COUNTED = "COALESCE(counted, 1) = 1"  # the calls that count (records from before `counted` do)
INSERT = (f"INSERT OR REPLACE INTO calls ({', '.join(NAMES)}) "
          f"VALUES ({', '.join('?' for _ in NAMES)})")
UNPRICED = (f"{COUNTED} AND cost_usd IS NULL AND "
            "(input_tokens IS NOT NULL OR output_tokens IS NOT NULL)")  # tokens, but no price
UNPRICED_SUM = f"SUM(CASE WHEN {UNPRICED} THEN 1 ELSE 0 END) AS unpriced"
STATS_KEYS = {"model": "model", "process": "COALESCE(process_tool, process_name)",
              "host": "host", "day": "day", "budget": "budget.value"}
# A call covered by several budgets is in each one's group; one covered by none, in none.
STATS_FROM = {"budget": "calls, json_each(calls.budgets) AS budget"}


def ensure_schema(conn: sqlite3.Connection) -> None:
    """The table as NAMES says: an index from an older llmtap gains the columns it lacks."""
    conn.executescript(SCHEMA)
    have = {row[1] for row in conn.execute("PRAGMA table_info(calls)")}
    for name, kind in COLUMNS:
        if name not in have:
            conn.execute(f"ALTER TABLE calls ADD COLUMN {name} {kind}")
    conn.executescript(INDEXES)


def index_path(records_dir: Path) -> Path:
    return records_dir / INDEX_NAME


def parse_time(value: Any) -> datetime.datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        moment = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=datetime.UTC)


def row_of(record: dict[str, Any], location: str) -> tuple[Any, ...]:
    """The index row of a record; tolerant of any field being absent or odd."""
    started = parse_time(record.get("started_at"))
    usage = as_dict(record.get("usage"))
    process = as_dict(record.get("process"))
    request = as_dict(record.get("request"))
    budgets = as_dict(record.get("policy")).get("budgets")
    values: dict[str, Any] = {
        "id": str(record["id"]), "location": location,
        "started_at": record.get("started_at"),
        "started_ts": started.timestamp() if started else None,
        "day": started.date().isoformat() if started else None,
        **{k: record.get(k) for k in ("ended_at", "host", "method", "path", "status", "provider",
                                      "api", "model", "cost_usd", "ttft_ms", "duration_ms",
                                      "credential", "error", "billed_id", "repeat_of")},
        "stream": 1 if record.get("stream") else 0,
        "counted": 0 if record.get("counted") is False else 1,
        **{k: _int(usage.get(k)) for k in USAGE_KEYS},
        "max_tokens": _int(request.get("max_tokens")),
        "process_pid": _int(process.get("pid")), "process_name": process.get("name"),
        "process_tool": process.get("tool"), "process_user": process.get("user"),
        "budgets": json.dumps([str(b) for b in budgets]) if isinstance(budgets, list) and budgets
        else None,
    }
    for key in ("cost_usd", "ttft_ms", "duration_ms"):
        values[key] = _float(values[key])
    for key in ("error", "credential", "model", "host", "path", "billed_id", "repeat_of"):
        if values[key] is not None and not isinstance(values[key], str):
            values[key] = str(values[key])
    values["status"] = _int(values["status"])
    return tuple(values[name] for name in NAMES)


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _float(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):  # a Decimal written as a string
        with contextlib.suppress(ValueError):
            return float(value)
    return None


class Index:
    def __init__(self, conn: sqlite3.Connection, source: str) -> None:
        self.conn = conn
        self.conn.row_factory = sqlite3.Row
        self.source = source  # "index", "index (read-only)" or "files" (built in memory)

    # --- writing (the daemon's writer thread, `reindex`) ------------------------------------

    @classmethod
    def open_writer(cls, path: Path) -> Index:
        conn = sqlite3.connect(path, timeout=10, check_same_thread=False, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        ensure_schema(conn)
        return cls(conn, "index")

    def add(self, rows: Iterable[tuple[Any, ...]]) -> None:
        with self._transaction():
            self.conn.executemany(INSERT, rows)

    def relocate(self, moves: dict[str, str | None]) -> None:
        """Record id -> new location after rotation; None: the record was deleted."""
        with self._transaction():
            for record_id, location in moves.items():
                if location is None:
                    self.conn.execute("DELETE FROM calls WHERE id = ?", (record_id,))
                else:
                    self.conn.execute("UPDATE calls SET location = ? WHERE id = ?",
                                      (location, record_id))

    def rebuild(self, records_dir: Path) -> int:
        """Replaces every row with what the files say, in one transaction."""
        rows = [row_of(record, location) for location, record in iter_records(records_dir)]
        with self._transaction():
            self.conn.execute("DELETE FROM calls")
            self.conn.executemany(INSERT, rows)
        return len(rows)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    def close(self) -> None:
        self.conn.close()

    # --- reading -----------------------------------------------------------------------------

    @classmethod
    def open_reader(cls, records_dir: Path, read_only: bool = False) -> Index:
        """The index for queries.

        read_only: nothing in the tree changes — the index is opened immutable when it is
        complete (no pending WAL), else an in-memory index is built from the files.
        Otherwise the index is opened read-only, or built in memory when it is missing or
        unreadable (a stopped daemon's tree copied elsewhere, a damaged file).
        """
        path = index_path(records_dir)
        if path.exists():
            wal = path.with_name(path.name + "-wal")
            wal_pending = wal.exists() and wal.stat().st_size > 0
            mode = "ro&immutable=1" if read_only else "ro"
            if not (read_only and wal_pending):
                with contextlib.suppress(sqlite3.Error):
                    conn = sqlite3.connect(f"file:{path}?mode={mode}", uri=True,
                                           check_same_thread=False)
                    conn.execute(f"SELECT {', '.join(NAMES)} FROM calls LIMIT 1").fetchone()
                    return cls(conn, "index (read-only)" if read_only else "index")
        return cls.in_memory(records_dir)

    @classmethod
    def in_memory(cls, records_dir: Path) -> Index:
        if not os.access(records_dir, os.R_OK | os.X_OK):
            raise PermissionError(records_dir)
        conn = sqlite3.connect(":memory:", check_same_thread=False, isolation_level=None)
        ensure_schema(conn)
        index = cls(conn, "files")
        index.rebuild(records_dir)
        return index

    def calls(self, since: float | None = None, model: str | None = None,
              process: str | None = None, after_rowid: int = 0, limit: int | None = None,
              counted_only: bool = False) -> list[sqlite3.Row]:
        """Calls oldest first; `limit` keeps the newest ones. Every record unless `counted_only`
        (then not the retrievals, polls and upgrades that repeat or carry no call)."""
        where, args = self._filters(since, model, process, counted_only)
        where.append("rowid > ?")
        args.append(after_rowid)
        sql = f"SELECT rowid, * FROM calls WHERE {' AND '.join(where)} ORDER BY started_ts DESC, rowid DESC"
        if limit:
            sql += f" LIMIT {int(limit)}"
        return list(reversed(self.conn.execute(sql, args).fetchall()))

    def max_rowid(self) -> int:
        return int(self.conn.execute("SELECT COALESCE(MAX(rowid), 0) FROM calls").fetchone()[0])

    def find(self, id_prefix: str) -> list[sqlite3.Row]:
        pattern = id_prefix.replace("%", "").replace("_", "") + "%"
        return self.conn.execute("SELECT * FROM calls WHERE id LIKE ? LIMIT 5", (pattern,)).fetchall()

    @staticmethod
    def _filters(since: float | None, model: str | None, process: str | None,
                 counted_only: bool = False) -> tuple[list[str], list[Any]]:
        where: list[str] = [COUNTED if counted_only else "1=1"]
        args: list[Any] = []
        if since is not None:
            where.append("started_ts >= ?")
            args.append(since)
        if model:
            where.append("model LIKE ?")
            args.append(f"%{model}%")
        if process:
            where.append("(process_name LIKE ? OR process_tool LIKE ?)")
            args += [f"%{process}%", f"%{process}%"]
        return where, args

    def stats(self, by: str, since: float | None = None) -> list[dict[str, Any]]:
        key, source = STATS_KEYS[by], STATS_FROM.get(by, "calls")
        where, args = self._filters(since, None, None, counted_only=True)
        sums = ", ".join(f"SUM({k}) AS {k}" for k in USAGE_KEYS)
        sql = (f"SELECT {key} AS key, COUNT(*) AS calls, {sums}, SUM(cost_usd) AS cost_usd, "
               f"COUNT(cost_usd) AS priced, {UNPRICED_SUM} FROM {source} "
               f"WHERE {' AND '.join(where)} "
               f"GROUP BY {key} ORDER BY cost_usd DESC NULLS LAST, calls DESC")
        groups = [dict(row) for row in self.conn.execute(sql, args)]
        for group in groups:
            ttfts = self._ttfts(key, group["key"], where, args, source)
            group["ttft_p50_ms"] = percentile(ttfts, 50)
            group["ttft_p95_ms"] = percentile(ttfts, 95)
        return groups

    def _ttfts(self, key: str, value: Any, where: list[str], args: list[Any],
               source: str = "calls") -> list[float]:
        test = f"{key} IS ?"
        sql = (f"SELECT ttft_ms FROM {source} WHERE {' AND '.join(where)} AND {test} "
               "AND ttft_ms IS NOT NULL ORDER BY ttft_ms")
        return [row[0] for row in self.conn.execute(sql, [*args, value])]

    def totals(self, since: float | None = None) -> dict[str, Any]:
        """Calls, tokens by kind and cost since a time (the dashboard's "today")."""
        where, args = self._filters(since, None, None, counted_only=True)
        sums = ", ".join(f"SUM({k}) AS {k}" for k in USAGE_KEYS)
        sql = (f"SELECT COUNT(*) AS calls, {sums}, SUM(cost_usd) AS cost_usd, "
               f"COUNT(cost_usd) AS priced, {UNPRICED_SUM} FROM calls "
               f"WHERE {' AND '.join(where)}")
        return dict(self.conn.execute(sql, args).fetchone())

    def unpriced(self, since: float | None = None) -> list[dict[str, Any]]:
        """Models (at a host) of counted calls that reported usage but have no cost: unknown to
        the prices."""
        where, args = self._filters(since, None, None)
        sql = (f"SELECT model, host, MAX(provider) AS provider, COUNT(*) AS calls, "
               f"MAX(started_at) AS last_seen FROM calls WHERE {' AND '.join(where)} AND "
               f"{UNPRICED} AND model IS NOT NULL GROUP BY model, host ORDER BY calls DESC")
        return [dict(row) for row in self.conn.execute(sql, args)]

    def not_counted(self, since: float | None = None) -> int:
        """Records that are no call of their own (retrievals, polls, upgrades, listings)."""
        where, args = self._filters(since, None, None)
        sql = f"SELECT COUNT(*) FROM calls WHERE {' AND '.join(where)} AND NOT ({COUNTED})"
        return int(self.conn.execute(sql, args).fetchone()[0])

    def latest_per_model(self, since: float | None = None) -> list[sqlite3.Row]:
        where, args = self._filters(since, None, None, counted_only=True)
        sql = (f"SELECT * FROM calls WHERE {' AND '.join(where)} AND model IS NOT NULL AND "
               "started_ts = (SELECT MAX(started_ts) FROM calls c2 WHERE c2.model = calls.model "
               "AND COALESCE(c2.counted, 1) = 1) GROUP BY model ORDER BY started_ts DESC")
        return self.conn.execute(sql, args).fetchall()


class BilledLookup:
    """Whether a provider id (a response, a batch) already has its billed record in the index.

    The proxy worker asks it, read-only, about ids it does not remember (seen before a restart,
    or long ago); any problem (no index yet, an older one, a busy disk) answers False.
    """

    def __init__(self, path: Path, timeout_s: float = 0.2) -> None:
        self.path = path
        self.timeout_s = timeout_s
        self._conn: sqlite3.Connection | None = None

    def __call__(self, provider_id: str) -> bool:
        try:
            if self._conn is None:
                if not self.path.exists():
                    return False
                self._conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True,
                                             timeout=self.timeout_s, check_same_thread=False)
            sql = "SELECT 1 FROM calls WHERE billed_id = ? LIMIT 1"
            return self._conn.execute(sql, (provider_id,)).fetchone() is not None
        except sqlite3.Error:
            self.close()
            return False

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
            self._conn = None


def percentile(sorted_values: list[float], pct: float) -> float | None:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return None
    rank = max(1, -(-len(sorted_values) * pct // 100))
    return sorted_values[int(rank) - 1]
