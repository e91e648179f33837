"""Writes each intercepted exchange under `records_dir`: a JSON record, its Markdown twin, the
system prompt (once per distinct text), a row in the SQLite index; rotates; exports to OTLP.

Writes never block the proxy: the event loop only copies (bounded) and queues; the writer
process (RecordWriterProcess, in the daemon) or a writer thread (RecordWriter, where nothing
forks) does the rest. When the queue is full or the disk refuses, the record is dropped and
counted (`llmtap status`), and relaying goes on.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import datetime
import logging
import os
import pickle
import queue
import signal
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.sharedctypes import RawArray  # at import: the worker cannot import later
from pathlib import Path
from typing import Any, BinaryIO

from llmtap.config import Config, ExportConfig, RecordsConfig, load_config
from llmtap.errors import LlmtapError
from llmtap.masking import NO_MASK, SecretMask
from llmtap.parsers import request as request_parser
from llmtap.records import markdown, rotation, store
from llmtap.records.capture import (
    BodyCapture,
    Exchange,
    bounded,
    mask_path,
    masked_headers,
    tee_stream,
)
from llmtap.records.index import Index, index_path, row_of
from llmtap.records.otlp import OtlpExporter
from mitmproxy import ctx, exceptions, http

log = logging.getLogger(__name__)

QUEUE_SIZE = 1024
PIPE_BYTES = 1 << 20  # the unprivileged maximum by default (/proc/sys/fs/pipe-max-size)
BATCH_S = 0.05  # records reach the writer process at most this late
BATCH_MAX = 64  # or as soon as this many are collected
# The writer process runs at idle priority (SCHED_IDLE): its bursts, a batch at a time, otherwise
# hold a core for a few ms just when the proxy wakes up on it, and the proxy's p95 doubled. Only
# when a batch reaches it this late (a machine busy with builds) does it take its fair share,
# until it is within CAUGHT_UP_S again: records lag while the machine is busy, never lost to it.
STARVED_S = 2.0
CAUGHT_UP_S = 0.5
# RLIMIT_NICE lets an unprivileged process leave SCHED_IDLE for nice 0 (and nothing higher).
NICE_LIMIT = 20
STREAM_FLAG = "llmtap.stream"  # flow.metadata: the response was relayed as a stream
CAPTURE = "llmtap.capture"  # flow.metadata: the BodyCapture of a streamed response
# flow.metadata: the text a protocol parser assembled from a streamed response, if it does.
RESPONSE_TEXT = "llmtap.response_text"
SYSTEM_PROMPT = "llmtap.system_prompt"  # set by the protocols stage: the request's system prompt
PROCESS_WAIT_S = 2.0  # how long a record waits for its process lookup
LOG_EVERY = 100  # a full disk would otherwise log a line per request


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


def system_prompt(exchange: Exchange) -> tuple[str, str] | None:
    """(sha256, text) of the request's system prompt, as the protocols stage parsed it."""
    text = exchange.system_prompt
    sha = request_parser.sha256_text(text)
    return (sha, text) if sha and text else None


@dataclass(frozen=True)
class WriterSettings:
    records: RecordsConfig = field(default_factory=RecordsConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    spool_dir: Path | None = None


class RecordWriter:
    """The writer thread behind the bounded queue."""

    def __init__(self, directory: Path, settings: WriterSettings | None = None,
                 threaded: bool = True) -> None:
        self.directory = directory
        self.settings = settings or WriterSettings()
        self.dropped = 0
        self.written = 0
        self.index_errors = 0
        self._queue: queue.Queue[tuple[dict[str, Any], Exchange | None] | None] = queue.Queue(
            self.settings.records.queue_size)
        self._policy = rotation.Policy(self.settings.records.max_files,
                                       self.settings.records.archive_after_days,
                                       self.settings.records.delete_after_days)
        self.exporter: OtlpExporter | None = None
        if self.settings.export.otlp_endpoint:
            self.exporter = OtlpExporter(self.settings.export,
                                         self.settings.spool_dir or directory / ".otlp-spool")
        self._index: Index | None = None
        self._live = 0  # records in the directory (for rotation)
        self._thread = threading.Thread(target=self._run, name="llmtap-recorder", daemon=True)
        if threaded:
            self._thread.start()

    def submit(self, record: dict[str, Any], exchange: Exchange | None = None) -> None:
        try:
            self._queue.put_nowait((record, exchange))
        except queue.Full:
            self.dropped += 1

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)
        if self.exporter:
            self.exporter.close()

    def counters(self) -> dict[str, int]:
        counters = {"records_written": self.written, "records_dropped": self.dropped,
                    "records_index_errors": self.index_errors}
        if self.exporter:
            counters.update(export_spans=self.exporter.exported,
                            export_dropped=self.exporter.dropped,
                            export_spooled=self.exporter.spooled())
        return counters

    def _run(self) -> None:
        self.start()
        while (item := self._queue.get()) is not None:
            self.handle(*item)
        self.finish()

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
            self.exporter.submit(record)

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
        try:
            self._index.add([row_of(record, location)])
        except sqlite3.Error as exc:
            self.index_errors += 1
            if self.index_errors % LOG_EVERY == 1:
                log.warning("record %s not indexed: %s", record["id"], exc)

    def _rotate(self) -> None:
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


class RecordWriterProcess:
    """The record writer in a process of its own, so that JSON, Markdown, the index and export
    never hold the GIL the proxy's event loop needs (profiling showed requests queuing behind
    them). Fork it before the worker starts any thread.

    The worker side keeps RecordWriter's interface. `submit` only collects; every BATCH_S the
    event loop pickles what was collected onto a non-blocking pipe in one write. A feeder thread
    cost more in GIL hand-offs than the pickling, and waking the writer once per request cost
    the proxy more than the batch's delay costs anyone. What the pipe cannot take yet waits,
    bounded with the collected ones by `queue_size` records, and goes when it is writable.
    Counters come back through shared memory."""

    def __init__(self, directory: Path, settings: WriterSettings) -> None:
        self.directory = directory
        self.dropped = 0  # here: too many records waiting, or the writer process is gone
        self._shared = RawArray("q", len(SHARED_COUNTERS))  # shared memory, survives the fork
        self._max_waiting = settings.records.queue_size
        self._batch: list[tuple[dict[str, Any], Exchange | None]] = []
        self._waiting: collections.deque[tuple[memoryview, int]] = collections.deque()  # pickled
        self._flush_timer: asyncio.TimerHandle | None = None
        self._draining: asyncio.AbstractEventLoop | None = None
        read_fd, write_fd = os.pipe()
        self._pid = os.fork()
        if self._pid == 0:
            os.close(write_fd)
            code = 1
            try:
                signal.signal(signal.SIGINT, signal.SIG_IGN)  # the worker's end of the pipe ends us
                self._serve(os.fdopen(read_fd, "rb"), RecordWriter(directory, settings, False))
                code = 0
            finally:
                os._exit(code)
        os.close(read_fd)
        self._fd: int | None = write_fd
        os.set_blocking(write_fd, False)
        import fcntl  # here: no writer process (nor fcntl) on Windows; the worker pre-imports it

        grow = getattr(fcntl, "F_SETPIPE_SZ", None)  # Linux only: room for bursts
        if grow is not None:
            with contextlib.suppress(OSError):
                fcntl.fcntl(write_fd, grow, PIPE_BYTES)

    def _serve(self, pipe: BinaryIO, writer: RecordWriter) -> None:
        writer.start()
        priority = BackgroundPriority()
        with pipe:
            while True:
                try:
                    sent_at, batch = pickle.load(pipe)
                except (EOFError, pickle.UnpicklingError):
                    break
                priority.adjust(time.monotonic() - sent_at)
                for record, exchange in batch:
                    writer.handle(record, exchange)
                for i, value in enumerate(writer.counters().get(n, 0) for n in SHARED_COUNTERS):
                    self._shared[i] = value
        writer.finish()
        if writer.exporter:
            writer.exporter.close()

    def submit(self, record: dict[str, Any], exchange: Exchange | None = None) -> None:
        if self._fd is None or self.waiting() >= self._max_waiting:
            self.dropped += 1
            return
        self._batch.append((record, exchange))
        if len(self._batch) >= BATCH_MAX:
            self._flush()
        elif self._flush_timer is None:
            try:
                self._flush_timer = asyncio.get_running_loop().call_later(BATCH_S, self._flush)
            except RuntimeError:  # no event loop (a test): no batching
                self._flush()

    def waiting(self) -> int:
        """Records submitted and not yet taken by the pipe."""
        return len(self._batch) + sum(count for _, count in self._waiting)

    def _flush(self) -> None:
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        batch, self._batch = self._batch, []
        if not batch:
            return
        try:
            data = pickle.dumps((time.monotonic(), batch), pickle.HIGHEST_PROTOCOL)
        except (pickle.PicklingError, TypeError):
            self.dropped += len(batch)
            return
        self._waiting.append((memoryview(data), len(batch)))
        if len(self._waiting) == 1:
            self._drain()

    def _drain(self) -> None:
        """Writes what waits until the pipe is full; then waits for it to become writable."""
        while self._waiting and self._fd is not None:
            head, count = self._waiting[0]
            try:
                written = os.write(self._fd, head)
            except BlockingIOError:
                break
            except OSError:  # the writer process is gone: nothing will take these
                self.dropped += self.waiting() - len(self._batch)
                self._waiting.clear()
                break
            if written < len(head):
                self._waiting[0] = (head[written:], count)
            else:
                self._waiting.popleft()
        self._watch_writable(bool(self._waiting))

    def _watch_writable(self, wanted: bool) -> None:
        if wanted and self._draining is None and self._fd is not None:
            try:
                self._draining = asyncio.get_running_loop()
            except RuntimeError:  # no event loop (a test, or shutdown): close() flushes
                return
            self._draining.add_writer(self._fd, self._drain)
        elif not wanted and self._draining is not None:
            if self._fd is not None:
                self._draining.remove_writer(self._fd)
            self._draining = None

    def counters(self) -> dict[str, int]:
        counters = dict(zip(SHARED_COUNTERS, self._shared, strict=True))
        counters["records_dropped"] += self.dropped
        return counters

    def close(self) -> None:
        """Hands over what still waits, lets the writer finish it, then waits for it (bounded)."""
        if self._fd is None:
            return
        self._flush()
        self._watch_writable(False)
        fd, self._fd = self._fd, None
        os.set_blocking(fd, True)
        try:
            while self._waiting:
                head, count = self._waiting[0]
                written = os.write(fd, head)  # may be partial even when blocking
                if written < len(head):
                    self._waiting[0] = (head[written:], count)
                else:
                    self._waiting.popleft()
        except OSError:
            self.dropped += self.waiting()
            self._waiting.clear()
        os.close(fd)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if os.waitpid(self._pid, os.WNOHANG)[0]:
                return
            time.sleep(0.02)
        with contextlib.suppress(ProcessLookupError):
            os.kill(self._pid, signal.SIGKILL)
        os.waitpid(self._pid, 0)


class BackgroundPriority:
    """The record writer's scheduling: idle while it keeps up, its fair share when it lags."""

    def __init__(self) -> None:
        self.idle = False
        self._set(idle=True)

    def adjust(self, lag_s: float) -> None:
        if self.idle and lag_s > STARVED_S:
            self._set(idle=False)
        elif not self.idle and lag_s < CAUGHT_UP_S:
            self._set(idle=True)

    def _set(self, idle: bool) -> None:
        if not hasattr(os, "SCHED_IDLE"):  # macOS: no SCHED_IDLE; a higher nice is the closest
            if idle and not self.idle:
                with contextlib.suppress(OSError):
                    os.nice(10)
                self.idle = True
            return
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE if idle else os.SCHED_OTHER, os.sched_param(0))
            self.idle = idle
        except OSError:  # no RLIMIT_NICE to leave idle with: stay as we are
            pass


def allow_leaving_idle_priority() -> None:
    """Before the privilege drop (Linux): lets the record writer return from SCHED_IDLE to nice 0
    when it lags. RLIMIT_NICE 20 permits nice 0 at most, nothing a normal process lacks."""
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_NICE, (NICE_LIMIT, NICE_LIMIT))
    except (ImportError, AttributeError, ValueError, OSError):
        pass  # not Linux, or not root: the writer then stays idle or at its nice


SHARED_COUNTERS = ("records_written", "records_dropped", "records_index_errors", "export_spans",
                   "export_dropped", "export_spooled")
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
                record["process"] = record.get("process") or fields(flow).get("process")
                writer.submit(exchange.mask.deep(record), exchange)

        pending.add_done_callback(submit)
        asyncio.get_running_loop().call_later(PROCESS_WAIT_S, submit)

    def counters(self) -> dict[str, int]:
        return self.writer.counters() if self.writer else {}

    def done(self) -> None:
        if self.writer:
            self.writer.close()
            self.writer = None
