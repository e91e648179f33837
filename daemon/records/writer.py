"""The record writer: JSON record, Markdown twin, system-prompt archive, index row, rotation and
export, one exchange at a time, behind a bounded queue (a thread here; a process of its own in the
daemon, llmtap.records.writer_process)."""

from __future__ import annotations

import logging
import queue
import socket
import sqlite3
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmtap.config import ExportConfig, RecordsConfig
from llmtap.parsers import request as request_parser
from llmtap.records import clickhouse, markdown, otlp, rotation, store
from llmtap.records.capture import Exchange
from llmtap.records.clickhouse import Clickhouse
from llmtap.records.export import Exporters, Sink, Spool
from llmtap.records.index import Index, index_path, row_of
from llmtap.records.loki import Loki

log = logging.getLogger("llmtap.addons.recorder")

QUEUE_SIZE = 1024
LOG_EVERY = 100  # a full disk would otherwise log a line per request


def system_prompt(exchange: Exchange) -> tuple[str, str] | None:
    """(sha256, text) of the request's system prompt, as the protocols stage parsed it."""
    text = exchange.system_prompt
    sha = request_parser.sha256_text(text)
    return (sha, text) if sha and text else None


class DropLog:
    """Records dropped are counted always, and logged loudly once per episode: at the first drop
    after things were fine, not at every one (a full disk would otherwise flood the log)."""

    def __init__(self) -> None:
        self.dropping = False

    def dropped(self, total: int, why: str) -> None:
        if not self.dropping:
            self.dropping = True
            log.error("records are being dropped: %s (%d dropped so far; see `llmtap status`)",
                      why, total)

    def recovered(self) -> None:
        self.dropping = False


@dataclass(frozen=True)
class WriterSettings:
    records: RecordsConfig = field(default_factory=RecordsConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    spool_dir: Path | None = None


def exporters(config: ExportConfig, spool_dir: Path) -> Exporters | None:
    """The configured stores behind one spool (state_dir/otlp-spool: its name predates the
    other stores), or None when there are none."""
    sinks: list[Sink] = [*otlp.sinks(config)]
    if config.loki.url:
        sinks.append(Loki(config.loki, config.timeout_s))
    if config.clickhouse.url:
        sinks.append(Clickhouse(config.clickhouse, config.timeout_s, socket.gethostname()))
    if not sinks:
        return None
    return Exporters(sinks, Spool(spool_dir, config.spool_max_files, config.spool_max_mb << 20),
                     clickhouse.bodies)


class RecordWriter:
    """The writer thread behind the bounded queue."""

    def __init__(self, directory: Path, settings: WriterSettings | None = None,
                 threaded: bool = True) -> None:
        self.directory = directory
        self.settings = settings or WriterSettings()
        self.dropped = 0
        self.drops = DropLog()
        self.written = 0
        self.index_errors = 0
        self._queue: queue.Queue[tuple[dict[str, Any], Exchange | None] | None] = queue.Queue(
            self.settings.records.queue_size)
        self._policy = rotation.Policy(self.settings.records.max_files,
                                       self.settings.records.archive_after_days,
                                       self.settings.records.delete_after_days)
        self.exporter = exporters(self.settings.export,
                                  self.settings.spool_dir or directory / ".otlp-spool")
        self._index: Index | None = None
        self._unindexed: list[tuple[Any, ...]] | None = None  # a batch's rows, not yet indexed
        self._index_failures = 0  # index writes that failed (a batch's rows fail together)
        self._live = 0  # records in the directory (for rotation)
        self._thread = threading.Thread(target=self._run, name="llmtap-recorder", daemon=True)
        if threaded:
            self._thread.start()

    def submit(self, record: dict[str, Any], exchange: Exchange | None = None) -> None:
        try:
            self._queue.put_nowait((record, exchange))
        except queue.Full:
            self.dropped += 1
            self.drops.dropped(self.dropped, "the record writer cannot keep up")
            return
        self.drops.recovered()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)
        if self.exporter:
            self.exporter.close()

    def counters(self) -> dict[str, int]:
        counters = {"records_written": self.written, "records_dropped": self.dropped,
                    "records_index_errors": self.index_errors}
        if self.exporter:
            counters.update(self.exporter.counters())
        return counters

    def _run(self) -> None:
        self.start()
        while (item := self._queue.get()) is not None:
            self.handle(*item)
        self.finish()

    def handle_batch(self, items: Iterable[tuple[dict[str, Any], Exchange | None]]) -> None:
        """Records in one go: each written to its files, then all indexed in one transaction
        (one per record cost the writer process a sixth of its time)."""
        self._unindexed = []
        try:
            for record, exchange in items:
                self.handle(record, exchange)
        finally:
            self._index_pending()
            self._unindexed = None

    def handle(self, record: dict[str, Any], exchange: Exchange | None) -> None:
        try:
            self._write(record, exchange)
        except OSError as exc:
            self.dropped += 1
            if self.dropped % LOG_EVERY == 1:
                log.warning("record %s not written: %s (%d dropped so far)", record["id"],
                            exc.strerror or exc, self.dropped)
            return
        self.written += 1
        if self.exporter:
            self.exporter.submit(record, exchange)

    def finish(self) -> None:
        if self._index:
            self._index.close()

    def start(self) -> None:
        try:
            self._index = Index.open_writer(index_path(self.directory))
        except sqlite3.Error as exc:
            log.warning("the records index is unavailable (%s): run `llmtap reindex`", exc)
        try:
            self._live = len(rotation.live_records(self.directory))
            if self._live > self._policy.max_files:
                self._rotate()
        except OSError as exc:
            log.warning("cannot rotate the records: %s", exc.strerror or exc)

    def _write(self, record: dict[str, Any], exchange: Exchange | None) -> None:
        text = None
        if exchange is not None:  # the record came masked; bodies are decoded only here
            prompt = system_prompt(exchange)
            if prompt:
                sha, prompt_text = prompt
                record["system_prompt"] = store.save_system_prompt(
                    self.directory, sha, exchange.mask.text(prompt_text))
            if self.settings.records.markdown:
                text = exchange.mask.text(markdown.render(record, exchange))
        location = store.write_exchange(self.directory, record, text)
        self._index_add(record, location)
        self._live += 1
        if self._live > self._policy.max_files:
            self._rotate()

    def _index_add(self, record: dict[str, Any], location: str) -> None:
        if self._index is None:
            return
        if self._unindexed is not None:  # within a batch: indexed at its end
            self._unindexed.append(row_of(record, location))
            return
        self._index_rows([row_of(record, location)])

    def _index_pending(self) -> None:
        if self._unindexed:
            rows, self._unindexed = self._unindexed, []
            self._index_rows(rows)

    def _index_rows(self, rows: list[tuple[Any, ...]]) -> None:
        assert self._index is not None
        try:
            self._index.add(rows)
        except sqlite3.Error as exc:
            self.index_errors += len(rows)
            self._index_failures += 1
            if self._index_failures % LOG_EVERY == 1:
                log.warning("%d record(s) not indexed: %s (%d so far)", len(rows), exc,
                            self.index_errors)

    def _rotate(self) -> None:
        self._index_pending()  # rotation moves indexed rows: the batch's are indexed first
        try:
            moves = rotation.rotate(self.directory, self._policy)
        except OSError as exc:
            log.warning("rotation failed: %s", exc.strerror or exc)
            moves = {}
        self._live = len(rotation.live_records(self.directory))
        if moves and self._index is not None:
            try:
                self._index.relocate(moves)
            except sqlite3.Error as exc:
                log.warning("index not updated after rotation (%s): run `llmtap reindex`", exc)
