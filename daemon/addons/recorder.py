"""Writes one JSON record per intercepted exchange under `records_dir`.

Writes never block the proxy: records go through a bounded queue to a writer thread; when the
queue is full or the disk refuses, the record is dropped and counted, and relaying goes on.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import queue
import threading
from pathlib import Path
from typing import Any

from llmtap.addons.protocols import STREAM_FLAG
from mitmproxy import ctx, exceptions, http

log = logging.getLogger(__name__)

QUEUE_SIZE = 1024


def rfc3339(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    moment = datetime.datetime.fromtimestamp(timestamp, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


RECORD_FIELDS = "llmtap.record"


def fields(flow: http.HTTPFlow) -> dict[str, Any]:
    """The record fields other addons contribute (model, usage, credential, rules_hit, ...).

    Each addon writes what it knows here; the recorder merges it over the base record.
    """
    contributed: dict[str, Any] = flow.metadata.setdefault(RECORD_FIELDS, {})
    return contributed


def build_record(flow: http.HTTPFlow) -> dict[str, Any]:
    request, response = flow.request, flow.response
    started = request.timestamp_start
    ended = (response.timestamp_end if response else None) or (
        flow.error.timestamp if flow.error else None
    )
    record: dict[str, Any] = {
        "id": flow.id,
        "started_at": rfc3339(started),
        "ended_at": rfc3339(ended),
        "host": request.pretty_host,
        "method": request.method,
        "path": request.path,
        "status": response.status_code if response else None,
        "http_version": request.http_version,
        "provider": None,
        "api": None,
        "model": None,
        "stream": bool(flow.metadata.get(STREAM_FLAG)),
        "duration_ms": round((ended - started) * 1000, 3) if ended else None,
        "process": None,
        "credential": None,
        "rules_hit": [],
        "dlp_hits": [],
        "error": flow.error.msg if flow.error else None,
    }
    record.update(flow.metadata.get(RECORD_FIELDS, {}))
    return record


def record_name(record: dict[str, Any]) -> str:
    stamp = (record["started_at"] or "unknown").replace(":", "").replace("-", "")
    model = str(record.get("model") or "unknown").replace("/", "_")
    return f"{stamp}_{model}_{record['id']}"


class RecordWriter:
    """The writer thread behind the bounded queue."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.dropped = 0
        self.written = 0
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue(QUEUE_SIZE)
        self._thread = threading.Thread(target=self._run, name="llmtap-recorder", daemon=True)
        self._thread.start()

    def submit(self, record: dict[str, Any]) -> None:
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while (record := self._queue.get()) is not None:
            try:
                self._write(record)
                self.written += 1
            except OSError as exc:
                self.dropped += 1
                log.warning("record %s not written: %s", record["id"], exc.strerror)

    def _write(self, record: dict[str, Any]) -> None:
        path = self.directory / f"{record_name(record)}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(tmp, path)


class Recorder:
    def __init__(self) -> None:
        self.writer: RecordWriter | None = None

    def load(self, loader) -> None:  # type: ignore[no-untyped-def]
        loader.add_option("llmtap_records_dir", str, "", "Directory for the exchange records.")

    def configure(self, updated: set[str]) -> None:
        if "llmtap_records_dir" not in updated:
            return
        directory = ctx.options.llmtap_records_dir
        if directory and not os.access(directory, os.W_OK):
            raise exceptions.OptionsError(f"records directory {directory} is not writable")
        if self.writer:
            self.writer.close()
        self.writer = RecordWriter(Path(directory)) if directory else None

    def response(self, flow: http.HTTPFlow) -> None:
        self._record(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._record(flow)

    def _record(self, flow: http.HTTPFlow) -> None:
        if self.writer is not None:
            self.writer.submit(build_record(flow))

    def done(self) -> None:
        if self.writer:
            self.writer.close()
            self.writer = None
