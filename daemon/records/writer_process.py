"""The record writer in a process of its own (see RecordWriterProcess)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import pickle
import signal
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.sharedctypes import RawArray  # at import: the worker cannot import later
from pathlib import Path
from typing import Any, BinaryIO

from llmtap.records.capture import Exchange
from llmtap.records.writer import DropLog, RecordWriter, WriterSettings

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
FIXED_NICE = 10  # where that is not granted: never idle (see BackgroundPriority)
SHARED_COUNTERS = ("records_written", "records_dropped", "records_index_errors", "export_spans",
                   "export_dropped", "export_spooled",
                   *(f"export_{store}_{what}" for store in ("otlp_traces", "otlp_metrics", "loki",
                                                           "clickhouse")
                     for what in ("sent", "dropped")))
HANDLED = len(SHARED_COUNTERS)  # the shared slot after the counters: batches handled


@dataclass
class Pickled:
    """One batch on its way to the writer process."""

    sequence: int
    data: bytes
    count: int
    offset: int = 0  # how much of it the pipe has taken
    at: float = field(default_factory=time.monotonic)  # when it was collected

    def unsent(self) -> memoryview:
        return memoryview(self.data)[self.offset:]


def _ended(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit code {os.waitstatus_to_exitcode(status)}"


class RecordWriterProcess:
    """The record writer in a process of its own, so that JSON, Markdown, the index and export
    never hold the GIL the proxy's event loop needs (profiling showed requests queuing behind
    them). Fork it before the worker starts any thread.

    The worker side keeps RecordWriter's interface. `submit` only collects; every BATCH_S the
    event loop pickles what was collected onto a non-blocking pipe in one write. A feeder thread
    cost more in GIL hand-offs than the pickling, and waking the writer once per request cost
    the proxy more than the batch's delay costs anyone. What the pipe cannot take yet waits,
    bounded with the collected ones by `queue_size` records, and goes when it is writable.
    Counters come back through shared memory.

    A batch written to the pipe is kept (pickled) until the writer says it has handled it, so
    when the writer process dies nothing it had not written yet is lost: a writer thread in the
    worker takes over (take_over) with those batches first. What the thread cannot take either
    (its queue is bounded too) is counted and logged, once per episode."""

    def __init__(self, directory: Path, settings: WriterSettings) -> None:
        self.directory = directory
        self.dropped = 0  # here: too many records waiting, or the writer process is gone
        self.settings = settings
        # shared memory, survives the fork: the counters, then how many batches it has handled
        self._shared = RawArray("q", len(SHARED_COUNTERS) + 1)
        self._max_waiting = settings.records.queue_size
        self._batch: list[tuple[dict[str, Any], Exchange | None]] = []
        self._waiting: collections.deque[Pickled] = collections.deque()  # not in the pipe yet
        self._sent: collections.deque[Pickled] = collections.deque()  # in it, not handled yet
        self._sequence = 0
        self.fallback: RecordWriter | None = None  # the writer thread, once the process died
        self._closed = False
        self.drops = DropLog()
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

    def _publish(self, writer: RecordWriter) -> None:
        for i, value in enumerate(writer.counters().get(n, 0) for n in SHARED_COUNTERS):
            self._shared[i] = value

    def _publish_exports(self, writer: RecordWriter) -> None:
        """The stores deliver (and the spool drains) while no record comes: counters follow."""
        while True:
            time.sleep(1.0)
            self._publish(writer)

    def _serve(self, pipe: BinaryIO, writer: RecordWriter) -> None:
        writer.start()
        priority = BackgroundPriority()
        if writer.exporter:
            threading.Thread(target=self._publish_exports, args=(writer,), daemon=True).start()
        with pipe:
            while True:
                try:
                    sent_at, batch = pickle.load(pipe)
                except (EOFError, pickle.UnpicklingError):
                    break
                priority.adjust(time.monotonic() - sent_at)
                writer.handle_batch(batch)
                self._publish(writer)
                self._shared[HANDLED] += 1
        writer.finish()
        if writer.exporter:
            writer.exporter.close()

    def submit(self, record: dict[str, Any], exchange: Exchange | None = None) -> None:
        if self.fallback is not None:
            self.fallback.submit(record, exchange)
            return
        if self._fd is None or self.waiting() >= self._max_waiting:
            self.dropped += 1
            self.drops.dropped(self.dropped, "the record writer cannot keep up")
            return
        self.drops.recovered()
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
        return len(self._batch) + sum(batch.count for batch in self._waiting)

    def _flush(self) -> None:
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        if self.check():
            return
        batch, self._batch = self._batch, []
        if not batch:
            return
        try:
            data = pickle.dumps((time.monotonic(), batch), pickle.HIGHEST_PROTOCOL)
        except (pickle.PicklingError, TypeError):
            self.dropped += len(batch)
            return
        self._waiting.append(Pickled(self._sequence, data, len(batch)))
        self._sequence += 1
        if len(self._waiting) == 1:
            self._drain()

    def _drain(self) -> None:
        """Writes what waits until the pipe is full; then waits for it to become writable."""
        while self._waiting and self._fd is not None:
            head = self._waiting[0]
            try:
                written = os.write(self._fd, head.unsent())
            except BlockingIOError:
                break
            except OSError:  # the writer process is gone: the writer thread takes these
                self._watch_writable(False)
                self.check()
                return
            head.offset += written
            if head.offset == len(head.data):
                self._sent.append(self._waiting.popleft())
        self._forget_handled()
        self._watch_writable(bool(self._waiting))

    def _forget_handled(self) -> None:
        handled = self._shared[HANDLED]
        while self._sent and self._sent[0].sequence < handled:
            self._sent.popleft()

    def _unstarve(self) -> None:
        """Gives the writer process its fair share when its oldest batch has waited STARVED_S.
        Idle-scheduled on a machine busy with builds it gets almost no CPU, not even enough to
        see that it lags; we run at normal priority. It goes back to idle itself once caught up
        (permitted across processes of one user by the RLIMIT_NICE it inherited)."""
        oldest = self._sent[0] if self._sent else (self._waiting[0] if self._waiting else None)
        if (oldest is None or time.monotonic() - oldest.at < STARVED_S or self._fd is None
                or not hasattr(os, "SCHED_IDLE")):
            return
        with contextlib.suppress(OSError):
            if os.sched_getscheduler(self._pid) == os.SCHED_IDLE:
                os.sched_setscheduler(self._pid, os.SCHED_OTHER, os.sched_param(0))

    def check(self) -> bool:
        """True once the writer process has died and the writer thread has taken over."""
        if self.fallback is not None:
            return True
        if self._closed:  # it ended because we closed it
            return False
        try:
            pid, status = os.waitpid(self._pid, os.WNOHANG)
        except ChildProcessError:
            pid, status = self._pid, 0
        if not pid:
            return False
        self.take_over(status)
        return True

    def take_over(self, status: int) -> None:
        """The writer process died: a writer thread here writes what it had not, then the rest."""
        self._watch_writable(False)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._forget_handled()
        fallback = RecordWriter(self.directory, self.settings)
        pending = [*self._sent, *self._waiting]
        self._sent.clear()
        self._waiting.clear()
        records = [item for batch in pending for item in pickle.loads(batch.data)[1]]
        for record, exchange in [*records, *self._batch]:
            fallback.submit(record, exchange)
        self._batch = []
        self.fallback = fallback
        log.error("the record writer process died (%s): records are written by a thread in the "
                  "proxy worker from now on; %d not yet written were handed to it",
                  _ended(status), len(records))

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
        """Asked every half second by the worker's reporter: also when a lag is noticed."""
        if not self.check():
            self._forget_handled()
            self._unstarve()
        counters = dict(zip(SHARED_COUNTERS, self._shared[: len(SHARED_COUNTERS)], strict=True))
        counters["records_dropped"] += self.dropped
        if self.fallback is not None:
            for name, value in self.fallback.counters().items():
                counters[name] = counters.get(name, 0) + value
            counters["record_writer_restarts"] = 1
        return counters

    def close(self) -> None:
        """Hands over what still waits, lets the writer finish it, then waits for it (bounded)."""
        self._flush()
        if self.fallback is not None:
            self.fallback.close()
            return
        if self._fd is None:
            return
        self._closed = True
        self._watch_writable(False)
        fd, self._fd = self._fd, None
        os.set_blocking(fd, True)
        try:
            while self._waiting:
                head = self._waiting[0]
                head.offset += os.write(fd, head.unsent())  # may be partial even when blocking
                if head.offset == len(head.data):
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
        self.fixed = hasattr(os, "SCHED_IDLE") and not _can_leave_idle()
        if self.fixed:
            # Idle would then be for good: on a machine busy with builds, almost no CPU at all,
            # and records pile up until they are dropped. A high nice yields to the proxy and
            # still takes a share (~10% of a core against busy ones).
            with contextlib.suppress(OSError):
                os.nice(FIXED_NICE)
            return
        self._set(idle=True)

    def adjust(self, lag_s: float) -> None:
        if self.fixed:
            return
        idle = self._is_idle()
        if idle and lag_s > STARVED_S:
            self._set(idle=False)
        elif not idle and lag_s < CAUGHT_UP_S:
            self._set(idle=True)

    def _is_idle(self) -> bool:
        """As the kernel has it: the worker may have raised us (RecordWriterProcess._unstarve)."""
        if hasattr(os, "SCHED_IDLE"):
            with contextlib.suppress(OSError):
                return os.sched_getscheduler(0) == os.SCHED_IDLE
        return self.idle

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


def _can_leave_idle() -> bool:
    """Whether this process may return from SCHED_IDLE to nice 0: root, or RLIMIT_NICE 20 (a
    root without CAP_SYS_RESOURCE, as in some containers, cannot grant it)."""
    try:
        import resource

        return os.geteuid() == 0 or resource.getrlimit(resource.RLIMIT_NICE)[0] >= NICE_LIMIT
    except (ImportError, AttributeError, ValueError, OSError):
        return False


def allow_leaving_idle_priority() -> None:
    """Before the privilege drop (Linux): lets the record writer return from SCHED_IDLE to nice 0
    when it lags. RLIMIT_NICE 20 permits nice 0 at most, nothing a normal process lacks."""
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_NICE, (NICE_LIMIT, NICE_LIMIT))
    except (ImportError, AttributeError, ValueError, OSError):
        pass  # not Linux, or not root: the writer then stays idle or at its nice


