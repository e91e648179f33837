"""Rules live in SQLite under the state dir (`rules.db`).

The CLI (root) writes and hands the file to the service user; the proxy worker opens it read-only
and notices changes with `PRAGMA data_version`, one cheap query per request, so rules reload
without a restart. The default rollback journal is kept (no WAL): a read-only reader then needs
no -shm file it could not create.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import sqlite3
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from llmtap.rules.model import Rule

log = logging.getLogger(__name__)

DB_NAME = "rules.db"
SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS rules (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    scope TEXT NOT NULL,
    action TEXT NOT NULL,
    match TEXT NOT NULL,
    target TEXT NOT NULL,
    replacement TEXT NOT NULL DEFAULT '',
    pattern TEXT NOT NULL DEFAULT '',
    priority INTEGER NOT NULL,
    enabled INTEGER NOT NULL DEFAULT 1,
    description TEXT NOT NULL DEFAULT '',
    hosts TEXT NOT NULL DEFAULT '[]',
    paths TEXT NOT NULL DEFAULT '[]',
    created_at TEXT NOT NULL
);
"""
COLUMNS = ("id", "scope", "action", "match", "target", "replacement", "pattern", "priority",
           "enabled", "description", "hosts", "paths", "created_at")
ORDER = "ORDER BY priority, id"


def db_path(state_dir: Path) -> Path:
    return state_dir / DB_NAME


def _row_to_rule(row: tuple[object, ...]) -> Rule:
    values = dict(zip(COLUMNS, row, strict=True))
    return Rule(
        scope=str(values["scope"]), action=str(values["action"]), match=str(values["match"]),
        target=str(values["target"]), replacement=str(values["replacement"]),
        pattern=str(values["pattern"]), priority=int(values["priority"]),  # type: ignore[call-overload]
        enabled=bool(values["enabled"]), description=str(values["description"]),
        hosts=tuple(json.loads(str(values["hosts"]))), paths=tuple(json.loads(str(values["paths"]))),
        id=int(values["id"]), created_at=str(values["created_at"]),  # type: ignore[call-overload]
    )


def read_rules(connection: sqlite3.Connection) -> list[Rule]:
    rows = connection.execute(f"SELECT {', '.join(COLUMNS)} FROM rules {ORDER}").fetchall()
    return [_row_to_rule(row) for row in rows]


class RuleStore:
    """Read-write access for the CLI. `owner` (uid, gid) gets the file when it is created."""

    def __init__(self, path: Path, owner: tuple[int, int] | None = None) -> None:
        self.path = path
        self.owner = owner

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        created = not self.path.exists()
        connection = sqlite3.connect(self.path, timeout=5)
        try:
            if created:
                self._hand_over()
            with connection:
                connection.executescript(SCHEMA)
                connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            with connection:
                yield connection
        finally:
            connection.close()

    def _hand_over(self) -> None:
        """The worker reads the file as the service user; nobody else needs to."""
        os.chmod(self.path, 0o600)
        if self.owner is not None:
            os.chown(self.path, *self.owner)

    @contextmanager
    def _reader(self) -> Iterator[sqlite3.Connection | None]:
        """Reading needs no write access (and creates nothing): None when there is no database."""
        if not self.path.exists():
            yield None
            return
        uri = f"file:{urllib.parse.quote(str(self.path))}?mode=ro"
        connection = sqlite3.connect(uri, uri=True, timeout=5)
        try:
            yield connection
        finally:
            connection.close()

    def all(self) -> list[Rule]:
        with self._reader() as connection:
            return read_rules(connection) if connection else []

    def get(self, rule_id: int) -> Rule | None:
        with self._reader() as connection:
            if connection is None:
                return None
            row = connection.execute(
                f"SELECT {', '.join(COLUMNS)} FROM rules WHERE id = ?", (rule_id,)).fetchone()
        return _row_to_rule(row) if row else None

    def add(self, rule: Rule) -> Rule:
        now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
        with self._connect() as connection:
            cursor = connection.execute(
                "INSERT INTO rules (scope, action, match, target, replacement, pattern, priority,"
                " enabled, description, hosts, paths, created_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (rule.scope, rule.action, rule.match, rule.target, rule.replacement, rule.pattern,
                 rule.priority, int(rule.enabled), rule.description, json.dumps(list(rule.hosts)),
                 json.dumps(list(rule.paths)), now),
            )
            rule_id = cursor.lastrowid
        stored = self.get(int(rule_id or 0))
        assert stored is not None
        return stored

    def _update(self, rule_id: int, sql: str, *args: object) -> bool:
        with self._connect() as connection:
            cursor = connection.execute(f"UPDATE rules SET {sql} WHERE id = ?", (*args, rule_id))
            return cursor.rowcount > 0

    def set_enabled(self, rule_id: int, enabled: bool) -> bool:
        return self._update(rule_id, "enabled = ?", int(enabled))

    def set_priority(self, rule_id: int, priority: int) -> bool:
        return self._update(rule_id, "priority = ?", priority)

    def remove(self, rule_id: int) -> bool:
        with self._connect() as connection:
            return connection.execute("DELETE FROM rules WHERE id = ?", (rule_id,)).rowcount > 0


class RuleSource:
    """The worker's read-only view: `poll()` returns the rules when they changed, else None.

    Costs one stat and one `PRAGMA data_version` per call. A database that is locked or broken
    keeps the rules last read (and is retried at the next call).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._connection: sqlite3.Connection | None = None
        self._identity: tuple[int, int] | None = None
        self._version: int | None = None
        self._warned = ""

    def poll(self) -> list[Rule] | None:
        try:
            stat = os.stat(self.path)
        except FileNotFoundError:
            if self._identity is None and self._version == -1:
                return None
            self.close()
            self._version = -1  # "no database" is a version too: rules were read as none
            return []
        except OSError as exc:
            self._warn(f"cannot stat {self.path}: {exc.strerror}")
            return None
        try:
            return self._read_if_changed((stat.st_dev, stat.st_ino))
        except sqlite3.Error as exc:
            self._warn(f"cannot read {self.path}: {exc}")
            return None

    def _read_if_changed(self, identity: tuple[int, int]) -> list[Rule] | None:
        if self._connection is None or identity != self._identity:
            self.close()
            uri = f"file:{urllib.parse.quote(str(self.path))}?mode=ro"
            self._connection = sqlite3.connect(uri, uri=True, timeout=0, check_same_thread=False)
            self._identity = identity
        version = int(self._connection.execute("PRAGMA data_version").fetchone()[0])
        if version == self._version:
            return None
        rules = read_rules(self._connection)
        self._version = version
        self._warned = ""
        return rules

    def _warn(self, message: str) -> None:
        if message != self._warned:  # once per distinct problem, not once per request
            log.warning("rules: %s; keeping the rules last read", message)
            self._warned = message

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
        self._connection = None
        self._identity = None
        self._version = None
