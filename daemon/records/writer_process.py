"""The record writer in a process of its own (see RecordWriterProcess)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import pickle
import signal
import time
from multiprocessing.sharedctypes import RawArray  # at import: the worker cannot import later
from pathlib import Path
from typing import Any, BinaryIO

from llmtap.records.capture import Exchange
from llmtap.records.writer import RecordWriter, WriterSettings

log = logging.getLogger("llmtap.addons.recorder")

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
