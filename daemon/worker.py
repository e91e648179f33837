"""The proxy worker: forked, as root, by the spawner (llmtap.spawner), then dropping to the
service user.

It is forked rather than executed because the interpreter may live where the service user cannot
read (pyenv under /root): everything it needs is imported before the fork, and the few modules
Python or mitmproxy import lazily are imported here up front. The worker reports to the
supervisor with JSON lines on a pipe: one "ready" when its listeners are up, then counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import IO, Any

from llmtap import addons
from llmtap.addons.attribution import Attribution
from llmtap.addons.budgets import Budgets
from llmtap.addons.live import Live
from llmtap.addons.recorder import Recorder, start_writer_process
from llmtap.errors import LlmtapError
from llmtap.platform.base import plug_into_mitmproxy
from llmtap.platform.linux.proc import parent_death_signal
from llmtap.privileges import ServiceUser, drop_privileges
from llmtap.proxy import ProxySettings, build_master
from llmtap.records.writer_process import RecordWriterProcess, allow_leaving_idle_priority
from llmtap.upstream_pool import UpstreamPool
from mitmproxy import ctx

log = logging.getLogger("llmtap.worker")

REPORT_INTERVAL_S = 0.5  # counters, and the heartbeat the supervisor watches
GIL_SWITCH_S = 0.0005
LIVE_INTERVAL_S = 0.2
# Imported lazily by Python or mitmproxy on first use, which would fail after the drop when the
# interpreter's directory is unreadable to the service user.
LAZY_IMPORTS = (
    "encodings.idna",
    "encodings.latin_1",
    "encodings.ascii",
    "encodings.utf_8_sig",
    "mitmproxy.net.encoding",
    "mitmproxy.proxy.layers.http",
    "mitmproxy.proxy.layers.tls",
    "mitmproxy.proxy.layers.tcp",
    "mitmproxy.proxy.layers.websocket",
    "mitmproxy.proxy.layers.quic",
    "mitmproxy.addons.dns_resolver",
    "mitmproxy.utils.asyncio_utils",
    "llmtap.parsers.encoding",  # brotli and zstd (backports.zstd or compression.zstd)
    "gzip",
    "zlib",
    "h2.connection",
    "h11",
    "wsproto",
    "OpenSSL.SSL",
    "cryptography.hazmat.primitives.asymmetric.rsa",
    "asyncio.unix_events",
    "fcntl",  # the record writer process sizes its pipe
    "resource",  # the record writer process's priority
)


def preload() -> None:
    for name in LAZY_IMPORTS:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    "x".encode("idna")  # registers the codec in the codec cache


@dataclass
class WorkerHandle:
    """The supervisor's view of one worker (a child of the spawner, which reaps it and sets
    `status`)."""

    pid: int
    events: IO[str]
    lifeline: int = -1  # held open for as long as the worker should live; never written
    status: int | None = None  # its wait status once it has exited
    last_heard: float = field(default_factory=time.monotonic)  # its last report: the heartbeat
    ended: bool = False  # its report pipe closed: it has exited

    def next_event(self) -> dict[str, Any] | None:
        """The next report from the worker, or None when its pipe is closed (it exited)."""
        line = self.events.readline()
        if not line:
            return None
        self.last_heard = time.monotonic()
        try:
            event: dict[str, Any] = json.loads(line)
        except ValueError:
            return {"event": "garbled"}
        return event

    def exited(self) -> int | None:
        """The exit status once the worker has exited (and been reaped), else None."""
        return self.status

    def wait_status(self, timeout_s: float) -> int | None:
        """The exit status, waiting up to `timeout_s` for the spawner to report it."""
        deadline = time.monotonic() + timeout_s
        while self.status is None and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.status

    def silent_for(self) -> float:
        return time.monotonic() - self.last_heard

    def stop(self, timeout_s: float = 10.0, kill: bool = False) -> None:
        """SIGTERM (SIGKILL at once if `kill`, e.g. a hung worker), SIGKILL after `timeout_s`;
        then the supervisor's ends of its pipes are closed."""
        for sig, wait_s in ((signal.SIGKILL, 5.0),) if kill else (
                (signal.SIGTERM, timeout_s), (signal.SIGKILL, 5.0)):
            if self.status is not None:
                break
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)
            deadline = time.monotonic() + wait_s
            while self.status is None and time.monotonic() < deadline:
                time.sleep(0.02)
        with contextlib.suppress(OSError):
            os.close(self.lifeline)
        self.lifeline = -1


def start_worker(settings: ProxySettings, user: ServiceUser) -> WorkerHandle:
    """Forks the worker. Called in the single-threaded spawner (llmtap.spawner), never in a
    process with other threads."""
    preload()
    read_fd, write_fd = os.pipe()
    # The worker's lifeline: it never carries data; EOF means the supervisor is gone, however it
    # ended, on every OS (PR_SET_PDEATHSIG, Linux only, is the second line of defence).
    lifeline_read, lifeline_write = os.pipe()
    parent = os.getpid()  # the spawner: if it dies, so does the worker
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the worker
        os.close(read_fd)
        os.close(lifeline_write)
        code = 1
        try:
            os.setpgid(0, 0)  # terminal signals go to the supervisor, which stops us in order
            if settings.pipeline:
                allow_leaving_idle_priority()
            drop_privileges(user)
            if sys.platform == "linux":  # after the drop: a credential change clears it
                parent_death_signal(parent)
            writer = None
            if settings.pipeline:  # before any thread: it forks the record writer process
                writer = start_writer_process(settings.records_dir, settings.config_file,
                                              settings.state_dir)
            with os.fdopen(write_fd, "w", buffering=1) as report:
                code = asyncio.run(serve(settings, report, lifeline_read, writer))
        except SystemExit as exc:  # mitmproxy's startup error check has printed the reason
            code = exc.code if isinstance(exc.code, int) else 1
        except LlmtapError as exc:
            print(f"llmtap: proxy worker: {exc}", file=sys.stderr)
        except BaseException as exc:  # never a traceback: one line, then exit
            print(f"llmtap: proxy worker failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        finally:
            sys.stderr.flush()
            os._exit(code)
    os.close(write_fd)
    os.close(lifeline_read)
    return WorkerHandle(pid, os.fdopen(read_fd, "r"), lifeline_write)


class Reporter:
    """Worker-only addon: tells the supervisor when listeners are up, then sends counters (and
    the live feed) of the pipeline's `stages`."""

    def __init__(self, out: IO[str], stages: Iterable[object] = ()) -> None:
        self.out = out
        stages = list(stages)
        self.live = addons.stage(stages, Live)
        self.recorder = addons.stage(stages, Recorder)
        self.attribution = addons.stage(stages, Attribution)
        self.budgets = addons.stage(stages, Budgets)
        self.pool: UpstreamPool | None = None  # found when running: build_master adds it
        self._task: asyncio.Task[None] | None = None

    def _send(self, event: dict[str, Any]) -> None:
        with contextlib.suppress(BrokenPipeError, ValueError):
            self.out.write(json.dumps(event, default=str) + "\n")

    async def running(self) -> None:
        server = ctx.master.addons.get("proxyserver")
        listening = [f"{h}:{p}" for h, p, *_ in server.listen_addrs()]
        self.pool = getattr(ctx.master.addons.get("upstreamreuse"), "pool", None)
        self._send({"event": "ready", "listening": listening, "pid": os.getpid()})
        self._task = asyncio.create_task(self._report_forever())

    async def _report_forever(self) -> None:
        live, recorder, attribution = self.live, self.recorder, self.attribution
        ticks = 0
        while True:
            if live and (events := live.drain()):  # dashboard events: batched, a few a second
                self._send({"event": "live", "events": events})
            if ticks % round(REPORT_INTERVAL_S / LIVE_INTERVAL_S) == 0:
                counters: dict[str, Any] = live.snapshot() if live else {}
                counters.update(recorder.counters() if recorder else {})
                if attribution:
                    counters["attribution_unanswered"] = attribution.unanswered
                if self.pool is not None:
                    counters |= self.pool.counters()
                if self.budgets and (policy := self.budgets.snapshot()):
                    counters["policy"] = policy  # budgets and limits with their use
                self._send({"event": "counters", "counters": counters})
            ticks += 1
            await asyncio.sleep(LIVE_INTERVAL_S)

    def done(self) -> None:
        if self._task:
            self._task.cancel()


async def serve(settings: ProxySettings, report: IO[str], lifeline: int,
                writer: RecordWriterProcess | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="llmtap worker: %(message)s", force=True)
    # Other threads (the parse pool for large bodies, attribution) hold the GIL in slices of this
    # length; at CPython's default 5 ms a request arriving meanwhile waits up to that long.
    sys.setswitchinterval(GIL_SWITCH_S)
    if settings.original_addr is not None:  # e.g. macOS: asked of the root supervisor
        plug_into_mitmproxy(settings.original_addr)
    stages = addons.pipeline(lookup=settings.process_lookup, writer=writer) if settings.pipeline else []
    proxy = build_master(settings, with_pipeline=settings.pipeline, stages=stages)
    proxy.addons.add(Reporter(report, stages))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, proxy.shutdown)
    loop.add_reader(lifeline, proxy.shutdown)  # readable only at EOF: the supervisor is gone
    await proxy.run()
    return 0
