"""Writes each intercepted exchange under `records_dir`: a JSON record, its Markdown twin, the
system prompt (once per distinct text), a row in the SQLite index; rotates; exports to OTLP.

Writes never block the proxy: the event loop only copies (bounded) and queues; the writer
process (RecordWriterProcess, in the daemon) or a writer thread (RecordWriter, where nothing
forks) does the rest. When the queue is full or the disk refuses, the record is dropped and
counted (`llmtap status`), and relaying goes on.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmtap.config import Config, RecordsConfig, load_config
from llmtap.errors import LlmtapError
from llmtap.masking import NO_MASK, SecretMask
from llmtap.records import store
from llmtap.records.capture import (
    BodyCapture,
    Exchange,
    bounded,
    mask_path,
    masked_headers,
    tee_stream,
)
from llmtap.records.writer import RecordWriter, WriterSettings
from llmtap.records.writer_process import RecordWriterProcess
from mitmproxy import ctx, exceptions, http

log = logging.getLogger(__name__)

STREAM_FLAG = "llmtap.stream"  # flow.metadata: the response was relayed as a stream
CAPTURE = "llmtap.capture"  # flow.metadata: the BodyCapture of a streamed response
# flow.metadata: the text a protocol parser assembled from a streamed response, if it does.
RESPONSE_TEXT = "llmtap.response_text"
SYSTEM_PROMPT = "llmtap.system_prompt"  # set by the protocols stage: the request's system prompt
PROCESS_WAIT_S = 2.0  # how long a record waits for its process lookup


def rfc3339(timestamp: float | None) -> str | None:
    if timestamp is None:
        return None
    moment = datetime.datetime.fromtimestamp(timestamp, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


RECORD_FIELDS = "llmtap.record"
# On a response a stage made itself instead of relaying it (a block): which stage. The stage's
# reason, not the status, is then the record's error.
BLOCKED_HEADER = "x-llmtap-blocked"


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
        "path": mask_path(request.path),
        "status": response.status_code if response else None,
        "http_version": request.http_version,
        "provider": None,
        "api": None,
        "model": None,
        "stream": bool(flow.metadata.get(STREAM_FLAG)),
        "request": None,
        "usage": None,
        "cost_usd": None,
        "stop_reason": None,
        "ttft_ms": None,
        "duration_ms": round((ended - started) * 1000, 3) if ended else None,
        "chunks": None,
        "timeline": None,
        "process": None,
        "credential": None,
        "rules_hit": [],
        "dlp_hits": [],
        "error": flow.error.msg if flow.error else None,
    }
    record.update(flow.metadata.get(RECORD_FIELDS, {}))
    return record


def record_name(record: dict[str, Any]) -> str:
    return store.record_name(record)


def capture_exchange(flow: http.HTTPFlow, limit: int) -> Exchange:
    """Bounded copies of what the Markdown twin shows; cheap enough for the event loop."""
    request, response = flow.request, flow.response
    streamed: BodyCapture | None = flow.metadata.get(CAPTURE)
    if response is None:
        response_body = bounded(None, limit, None, "")
    elif streamed is not None and response.raw_content is None:
        response_body = bounded(bytes(streamed.data), limit, response.headers.get(
            "content-encoding"), response.headers.get("content-type", ""))
        response_body.size = streamed.size
    else:
        response_body = bounded(response.raw_content, limit, response.headers.get(
            "content-encoding"), response.headers.get("content-type", ""))
    return Exchange(
        request_headers=masked_headers(request.headers.items(multi=True)),
        response_headers=masked_headers(response.headers.items(multi=True)) if response else [],
        request_body=bounded(request.raw_content, limit, request.headers.get("content-encoding"),
                             request.headers.get("content-type", "")),
        response_body=response_body,
        response_text=flow.metadata.get(RESPONSE_TEXT),
        system_prompt=flow.metadata.get(SYSTEM_PROMPT),
    )


# Set by the worker before the proxy starts (see start_writer_process); the Recorder uses it.
PROCESS_WRITER: RecordWriterProcess | None = None


def writer_settings(config_file: str, state_dir: str) -> tuple[Config, WriterSettings]:
    config = addon_config(config_file)
    return config, WriterSettings(config.records, config.export,
                                  Path(state_dir) / "otlp-spool" if state_dir else None)


def start_writer_process(records_dir: Path | None, config_file: Path | None,
                         state_dir: Path | None) -> None:
    """In the worker, before any thread starts: the records go to a writer process."""
    global PROCESS_WRITER
    if records_dir is None or not str(records_dir):
        return
    _, settings = writer_settings(str(config_file or ""), str(state_dir or ""))
    PROCESS_WRITER = RecordWriterProcess(records_dir, settings)


def addon_config(path: str) -> Config:
    """The daemon's config as an addon sees it ("" = the defaults)."""
    try:
        return load_config(path) if path else Config()
    except LlmtapError as exc:
        raise exceptions.OptionsError(str(exc)) from None


class Recorder:
    observes_response = True  # its response hook may run after the response is relayed

    def __init__(self, mask: Callable[[], SecretMask] = lambda: NO_MASK) -> None:
        self.writer: RecordWriter | RecordWriterProcess | None = None
        self.max_body_bytes = RecordsConfig().max_body_bytes
        self.mask = mask  # the held secrets (the credentials stage's), masked by value

    def load(self, loader) -> None:  # type: ignore[no-untyped-def]
        loader.add_option("llmtap_records_dir", str, "", "Directory for the exchange records.")
        loader.add_option("llmtap_state_dir", str, "", "llmtap's state directory.")
        loader.add_option("llmtap_config_file", str, "", "llmtap's TOML config file.")

    def configure(self, updated: set[str]) -> None:
        if not updated & {"llmtap_records_dir", "llmtap_config_file", "llmtap_state_dir"}:
            return
        directory = ctx.options.llmtap_records_dir
        if directory and not os.access(directory, os.W_OK):
            raise exceptions.OptionsError(f"records directory {directory} is not writable")
        config, settings = writer_settings(ctx.options.llmtap_config_file,
                                           ctx.options.llmtap_state_dir)
        self.max_body_bytes = config.records.max_body_bytes
        if PROCESS_WRITER is not None and directory == str(PROCESS_WRITER.directory):
            self.writer = PROCESS_WRITER  # the worker's: closed once, in done()
            return
        if self.writer:
            self.writer.close()
        self.writer = RecordWriter(Path(directory), settings) if directory else None

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        """A streamed response (another addon set `stream`): copy what passes, bounded."""
        if self.writer is None or flow.response is None or not flow.response.stream:
            return
        capture = BodyCapture(self.max_body_bytes)
        flow.metadata[CAPTURE] = capture
        flow.response.stream = tee_stream(flow.response.stream, capture)

    def response(self, flow: http.HTTPFlow) -> None:
        self._record(flow)

    def error(self, flow: http.HTTPFlow) -> None:
        self._record(flow)

    def _record(self, flow: http.HTTPFlow) -> None:
        writer = self.writer
        if writer is None:
            return
        record, exchange = build_record(flow), capture_exchange(flow, self.max_body_bytes)
        exchange.mask = self.mask()
        attribution = ctx.master.addons.get("attribution")
        pending = attribution.pending(flow) if attribution else None
        if pending is None:
            writer.submit(exchange.mask.deep(record), exchange)
            return
        # The process lookup is still under way (a short-lived client): write the record when
        # it answers, or without it after a while. Nothing waits on the proxy's loop.
        submitted = False

        def submit(*_: object) -> None:
            nonlocal submitted
            if not submitted:
                submitted = True
                process = record.get("process") or fields(flow).get("process")
                if process is None and pending.done() and not pending.cancelled():
                    process = pending.result()  # the client hung up before the answer came
                record["process"] = process
                writer.submit(exchange.mask.deep(record), exchange)

        pending.add_done_callback(submit)
        asyncio.get_running_loop().call_later(PROCESS_WAIT_S, submit)

    def counters(self) -> dict[str, int]:
        return self.writer.counters() if self.writer else {}

    def done(self) -> None:
        if self.writer:
            self.writer.close()
            self.writer = None
