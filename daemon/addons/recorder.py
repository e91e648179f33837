"""Writes each intercepted exchange under `records_dir`: a JSON record, its Markdown twin, the
system prompt (once per distinct text), a row in the SQLite index; rotates; exports to OTLP.

Writes never block the proxy: the event loop only copies (bounded) and queues; the writer
process (RecordWriterProcess, in the daemon) or a writer thread (RecordWriter, where nothing
forks) does the rest. When the queue is full or the disk refuses, the record is dropped and
counted (`llmtap status`), and relaying goes on.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path

from llmtap.addons.options import addon_config
from llmtap.config import Config, RecordsConfig
from llmtap.flow import CAPTURE, SYSTEM_PROMPT, ProcessLookup, build_record, fields
from llmtap.masking import NO_MASK, SecretMask
from llmtap.records.capture import (
    BodyCapture,
    Exchange,
    StreamFn,
    bounded,
    masked_headers,
    tee_stream,
)
from llmtap.records.writer import RecordWriter, WriterSettings
from llmtap.records.writer_process import RecordWriterProcess
from mitmproxy import ctx, exceptions, http

log = logging.getLogger(__name__)

PROCESS_WAIT_S = 2.0  # how long a record waits for its process lookup


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
        system_prompt=flow.metadata.get(SYSTEM_PROMPT),
    )


def writer_settings(config_file: str, state_dir: str) -> tuple[Config, WriterSettings]:
    config = addon_config(config_file)
    return config, WriterSettings(config.records, config.export,
                                  Path(state_dir) / "otlp-spool" if state_dir else None)


def start_writer_process(records_dir: Path | None, config_file: Path | None,
                         state_dir: Path | None) -> RecordWriterProcess | None:
    """In the worker, before any thread starts: the writer process the records go to (given to
    the pipeline, see llmtap.addons.pipeline)."""
    if records_dir is None or not str(records_dir):
        return None
    _, settings = writer_settings(str(config_file or ""), str(state_dir or ""))
    return RecordWriterProcess(records_dir, settings)


class Recorder:
    observes_response = True  # its response hook may run after the response is relayed

    def __init__(self, mask: Callable[[], SecretMask] = lambda: NO_MASK,
                 lookup: ProcessLookup | None = None,
                 process_writer: RecordWriterProcess | None = None) -> None:
        self.writer: RecordWriter | RecordWriterProcess | None = None
        self.lookup = lookup  # who made each request (the attribution stage): a record waits for it
        # The worker's writer process, forked before any thread: used for its own directory.
        self.process_writer = process_writer
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
        if self.process_writer and directory == str(self.process_writer.directory):
            self.writer = self.process_writer  # the worker's: closed once, in done()
            return
        if self.writer:
            self.writer.close()
        self.writer = RecordWriter(Path(directory), settings) if directory else None

    def response_layer(self, flow: http.HTTPFlow) -> StreamFn | None:
        """A streamed response (llmtap.addons.streams): a bounded copy of what passes."""
        if self.writer is None or flow.response is None:
            return None
        capture = BodyCapture(self.max_body_bytes)
        flow.metadata[CAPTURE] = capture
        return tee_stream(True, capture)

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
        pending = self.lookup.pending(flow) if self.lookup else None
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
