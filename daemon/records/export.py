"""Remote export: every store (OTLP traces and metrics, Loki, ClickHouse) behind one bounded disk
spool and one retry policy.

Asynchronous: the record writer hands each written (masked) record to `Exporters.submit`, which
only puts it on each store's bounded queue, never waiting. Each store has a thread of its own
that batches, encodes and posts, so a slow store holds up no other store and never the writer,
let alone the proxy. A batch that cannot be posted (the store is down, slow, or refuses it)
goes to the shared spool directory, and is retried oldest first with exponential backoff; while
a store has batches in the spool, its new batches queue behind them there, so it receives them in
order. The spool is bounded in files and bytes across all stores: past the bound the oldest
batch goes, and its records are counted as dropped for its store.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmtap.atomic import write_atomic

log = logging.getLogger(__name__)

QUEUE_SIZE = 2048  # records waiting per store
QUEUE_BODY_BYTES = 32 << 20  # and, for a store that takes bodies, their characters at most
BATCH_SIZE = 256
BATCH_WAIT_S = 0.5
RETRY_MIN_S, RETRY_MAX_S = 1.0, 30.0
DRAIN_PER_ROUND = 16  # spooled batches sent before the queue is looked at again
BODIES = "llmtap.bodies"  # the key under which an export item carries its masked bodies
ENTRY = re.compile(r"^(\d+)-(\d+)-([a-z_]+)-(\d+)\.batch$")
LEGACY = re.compile(r"^(\d+)-(\d+)-(\d+)\.pb$")  # the OTLP-only spool's names, before stores


class StoreError(Exception):
    """A post the store did not accept (the batch is kept for a retry)."""


@dataclass(frozen=True)
class Entry:
    name: str
    sink: str
    count: int  # records in the batch
    size: int


class Spool:
    """One bounded directory of encoded batches, for every store. Thread-safe."""

    def __init__(self, directory: Path, max_files: int, max_bytes: int) -> None:
        self.directory, self.max_files, self.max_bytes = directory, max_files, max_bytes
        self.dropped: dict[str, int] = {}
        self._lock = threading.Lock()
        self._sequence = 0
        self._entries: list[Entry] = []  # oldest first
        with contextlib.suppress(OSError):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._entries = sorted((e for e in map(self._parse, os.listdir(directory)) if e),
                                   key=lambda e: e.name)

    def _parse(self, name: str) -> Entry | None:
        try:
            size = (self.directory / name).stat().st_size
        except OSError:
            return None
        if match := ENTRY.match(name):
            return Entry(name, match[3], int(match[4]), size)
        if match := LEGACY.match(name):
            return Entry(name, "otlp_traces", int(match[3]), size)
        return None

    def put(self, sink: str, payload: bytes, count: int) -> None:
        with self._lock:
            self._sequence += 1
            entry = Entry(f"{time.time_ns():020d}-{self._sequence:06d}-{sink}-{count}.batch", sink,
                          count, len(payload))
            while self._entries and (len(self._entries) >= self.max_files or sum(
                    e.size for e in self._entries) + entry.size > self.max_bytes):
                self._evict(self._entries.pop(0))  # bounded: the oldest go first
            try:
                write_atomic(self.directory / entry.name, payload, mode=None)
            except OSError:
                self.dropped[sink] = self.dropped.get(sink, 0) + count
                return
            self._entries.append(entry)

    def _evict(self, entry: Entry) -> None:
        with contextlib.suppress(OSError):
            (self.directory / entry.name).unlink()
        self.dropped[entry.sink] = self.dropped.get(entry.sink, 0) + entry.count

    def oldest(self, sink: str) -> Entry | None:
        with self._lock:
            return next((e for e in self._entries if e.sink == sink), None)

    def read(self, entry: Entry) -> bytes | None:
        try:
            return (self.directory / entry.name).read_bytes()
        except OSError:
            self.remove(entry)
            return None

    def remove(self, entry: Entry) -> None:
        with self._lock:
            if entry in self._entries:
                self._entries.remove(entry)
        with contextlib.suppress(OSError):
            (self.directory / entry.name).unlink()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


class Sink:
    """One store: how a batch of records becomes a payload, and how the payload is posted."""

    name = "sink"
    wants_bodies = False  # its records carry the exchange's masked bodies (see Exporters.submit)

    def encode(self, records: Sequence[dict[str, Any]]) -> bytes:
        raise NotImplementedError

    def post(self, payload: bytes) -> None:
        """Raises StoreError (or OSError) unless the store accepted the batch."""
        raise NotImplementedError


def post_http(opener: urllib.request.OpenerDirector, url: str, payload: bytes,
              headers: dict[str, str], timeout_s: float) -> None:
    """POST, any 2xx is success. A 4xx other than 408/429 is a store that will never take the
    batch: it is logged and dropped rather than retried forever."""
    request = urllib.request.Request(url, data=payload, headers=headers, method="POST")
    try:
        with opener.open(request, timeout=timeout_s) as response:
            response.read(65536)
    except urllib.error.HTTPError as exc:
        detail = exc.read(300).decode("utf-8", "replace").strip()
        if 400 <= exc.code < 500 and exc.code not in (408, 429):
            raise Rejected(f"HTTP {exc.code}: {detail}") from None
        raise StoreError(f"HTTP {exc.code}: {detail}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise StoreError(str(getattr(exc, "reason", exc))) from None


class Rejected(StoreError):
    """The store refused the batch itself (bad request, auth): retrying will not help."""


def direct_opener() -> urllib.request.OpenerDirector:
    """Never through a proxy from the environment: the stores are reached directly."""
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


def header_pairs(pairs: Sequence[str]) -> dict[str, str]:
    return {name.strip(): value.strip() for name, value in (p.split("=", 1) for p in pairs)}


class Retry:
    """Exponential backoff, per store: the first failure waits RETRY_MIN_S, then twice as long
    each time up to RETRY_MAX_S; a success resets it."""

    def __init__(self) -> None:
        self.at = 0.0
        self.backoff = RETRY_MIN_S

    def ready(self) -> bool:
        return time.monotonic() >= self.at

    def failed(self) -> None:
        self.at = time.monotonic() + self.backoff
        self.backoff = min(RETRY_MAX_S, self.backoff * 2)

    def succeeded(self) -> None:
        self.at, self.backoff = 0.0, RETRY_MIN_S


class StoreWorker:
    """One store's queue and thread: batch, encode, post or spool, drain the spool."""

    def __init__(self, sink: Sink, spool: Spool) -> None:
        self.sink, self.spool = sink, spool
        self.sent = 0  # records the store accepted
        self.dropped = 0  # records lost here: queue full, encoding failed, refused by the store
        self.failures = 0  # posts that failed
        self.retry = Retry()
        self._queue: queue.Queue[tuple[dict[str, Any], int] | None] = queue.Queue(QUEUE_SIZE)
        self._body_bytes = 0  # of the bodies waiting in the queue (a store that takes them)
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"llmtap-{sink.name}", daemon=True)
        self._thread.start()

    def submit(self, record: dict[str, Any], body_bytes: int = 0) -> None:
        with self._lock:
            if self._body_bytes + body_bytes > QUEUE_BODY_BYTES:
                self.dropped += 1
                return
            try:
                self._queue.put_nowait((record, body_bytes))
            except queue.Full:
                self.dropped += 1
                return
            self._body_bytes += body_bytes

    def close(self, timeout_s: float) -> None:
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=1)
        self._thread.join(timeout=timeout_s)

    def _run(self) -> None:
        closing = False
        while not closing:
            # A backlog the store can take now is drained at full speed, between batches.
            backlog = self.retry.ready() and self.spool.oldest(self.sink.name) is not None
            batch, closing = self._collect(0.0 if backlog else BATCH_WAIT_S)
            if batch:
                self._deliver(batch)
            if self.retry.ready():
                self._drain()

    def _collect(self, wait_s: float) -> tuple[list[dict[str, Any]], bool]:
        batch: list[dict[str, Any]] = []
        deadline = time.monotonic() + wait_s
        while len(batch) < BATCH_SIZE:
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if item is None:
                return batch, True
            record, body_bytes = item
            with self._lock:
                self._body_bytes -= body_bytes
            batch.append(record)
        return batch, False

    def _deliver(self, batch: list[dict[str, Any]]) -> None:
        try:
            payload = self.sink.encode(batch)
        except Exception as exc:  # a record no encoder should choke on; never the thread's end
            self.dropped += len(batch)
            log.warning("%s: a batch of %d could not be encoded (%s)", self.sink.name, len(batch),
                        exc)
            return
        # Straight to the store only when nothing older waits for it and the queue keeps up;
        # otherwise to the spool (local disk, fast), so order holds and the queue never fills.
        if (self.retry.ready() and self.spool.oldest(self.sink.name) is None
                and self._queue.qsize() < QUEUE_SIZE // 2 and self._post(payload, len(batch))):
            return
        self.spool.put(self.sink.name, payload, len(batch))

    def _post(self, payload: bytes, count: int) -> bool:
        """True when the batch is done with: accepted, or refused for good (and counted)."""
        try:
            self.sink.post(payload)
        except Rejected as exc:
            self.dropped += count
            log.warning("%s refused a batch of %d records: %s", self.sink.name, count, exc)
            self.retry.succeeded()  # the store is up; it is the batch it does not want
            return True
        except (StoreError, OSError) as exc:
            if self.failures % 100 == 0:
                log.warning("export to %s failed (%s); spooling and retrying", self.sink.name, exc)
            self.failures += 1
            self.retry.failed()
            return False
        self.sent += count
        self.retry.succeeded()
        return True

    def _drain(self) -> None:
        for _ in range(DRAIN_PER_ROUND):
            entry = self.spool.oldest(self.sink.name)
            if entry is None or not self.retry.ready():
                return
            payload = self.spool.read(entry)
            if payload is None:
                continue
            if not self._post(payload, entry.count):
                return
            self.spool.remove(entry)


class Exporters:
    """The configured stores, sharing one spool. `submit` never waits."""

    def __init__(self, sinks: Sequence[Sink], spool: Spool,
                 bodies: Callable[[Any], dict[str, str]] | None = None) -> None:
        self.spool = spool
        self.workers = [StoreWorker(sink, spool) for sink in sinks]
        self.bodies = bodies  # exchange -> its masked bodies, for the stores that want them

    def submit(self, record: dict[str, Any], exchange: Any = None) -> None:
        with_bodies: dict[str, Any] | None = None
        size = 0
        for worker in self.workers:
            if worker.sink.wants_bodies and exchange is not None and self.bodies:
                if with_bodies is None:
                    bodies = self.bodies(exchange)
                    size = sum(len(text) for text in bodies.values())
                    with_bodies = {**record, BODIES: bodies}
                worker.submit(with_bodies, size)
            else:
                worker.submit(record)

    def close(self, timeout_s: float = 5.0) -> None:
        for worker in self.workers:
            worker.close(timeout_s)

    def counters(self) -> dict[str, int]:
        """Totals over the stores (records each store got), and per store."""
        counters = {"export_spans": 0, "export_dropped": 0, "export_spooled": len(self.spool)}
        for worker in self.workers:
            name = worker.sink.name
            dropped = worker.dropped + self.spool.dropped.get(name, 0)
            counters[f"export_{name}_sent"] = worker.sent
            counters[f"export_{name}_dropped"] = dropped
            counters["export_spans"] += worker.sent
            counters["export_dropped"] += dropped
        return counters
