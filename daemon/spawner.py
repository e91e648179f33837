"""The worker spawner: a root process forked before the supervisor starts any thread, that forks
each proxy worker on request.

The supervisor must be able to replace a hung or dead worker while its own threads (the control
socket, the process lookup, target refresh) run. Forking a threaded process copies every lock
those threads hold at that instant, so the new worker could hang on its first log line or DNS
lookup. The spawner stays single-threaded all its life: each worker is forked from it, exactly
as the first one would have been from the supervisor, with everything preloaded and the resolved
secrets inherited.

Protocol, over a SOCK_SEQPACKET socketpair (one message per datagram):
    supervisor -> spawner   b"spawn"
    spawner -> supervisor   b"spawned PID" with two descriptors: the worker's report pipe
                            (read end) and its lifeline (write end)
    spawner -> supervisor   b"exited PID STATUS" when it has reaped a worker
EOF on the socket means the supervisor is gone: the spawner stops its worker and exits.
"""

from __future__ import annotations

import contextlib
import os
import queue
import select
import signal
import socket
import sys
import threading
from typing import IO

from llmtap.errors import RuntimeFailure
from llmtap.platform.linux.proc import parent_death_signal
from llmtap.privileges import ServiceUser
from llmtap.proxy import ProxySettings
from llmtap.worker import WorkerHandle, preload, start_worker

REAP_INTERVAL_S = 0.05
SPAWN_TIMEOUT_S = 30.0


class WorkerSpawner:
    """The supervisor's side. `spawn()` returns a WorkerHandle whose exit status arrives here."""

    def __init__(self, settings: ProxySettings, user: ServiceUser) -> None:
        preload()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        supervisor = os.getpid()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            ours.close()
            code = 1
            try:
                os.setpgid(0, 0)  # terminal signals go to the supervisor, which stops us in order
                if sys.platform == "linux":
                    parent_death_signal(supervisor)
                serve(theirs, settings, user)
                code = 0
            finally:
                os._exit(code)
        theirs.close()
        self.pid = pid
        self._socket = ours
        self._spawned: queue.Queue[WorkerHandle] = queue.Queue()
        self._handles: dict[int, WorkerHandle] = {}
        self._lock = threading.Lock()
        self._reader: threading.Thread | None = None

    def start(self) -> None:
        """Starts reading the spawner's messages (call once the supervisor may have threads)."""
        self._reader = threading.Thread(target=self._read, name="llmtap-spawner", daemon=True)
        self._reader.start()

    def spawn(self) -> WorkerHandle:
        try:
            self._socket.send(b"spawn")
            return self._spawned.get(timeout=SPAWN_TIMEOUT_S)
        except (OSError, queue.Empty):
            raise RuntimeFailure("the worker spawner did not answer") from None

    def _read(self) -> None:
        while True:
            try:
                message, fds, _, _ = socket.recv_fds(self._socket, 256, 2)
            except OSError:
                return
            if not message:
                return  # the spawner is gone: the supervisor notices the worker's silence
            words = message.decode().split()
            if words[0] == "spawned" and len(fds) == 2:
                handle = WorkerHandle(int(words[1]), os.fdopen(fds[0], "r"), fds[1])
                with self._lock:
                    self._handles[handle.pid] = handle
                self._spawned.put(handle)
            elif words[0] == "exited":
                with self._lock:
                    ended = self._handles.pop(int(words[1]), None)
                if ended is not None:
                    ended.status = int(words[2])

    def close(self) -> None:
        """Stops the spawner (and through it any worker still running)."""
        with contextlib.suppress(OSError):
            self._socket.shutdown(socket.SHUT_RDWR)
        self._socket.close()
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)


def serve(channel: socket.socket, settings: ProxySettings, user: ServiceUser) -> None:
    """The spawner's loop: forks a worker per request, reaps them, reports their ends."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the supervisor ends us by closing the channel
    workers: set[int] = set()
    try:
        while True:
            readable, _, _ = select.select([channel], [], [], REAP_INTERVAL_S)
            if readable:
                request = channel.recv(64)
                if not request:
                    return
                handle = start_worker(settings, user)
                workers.add(handle.pid)
                _send_handle(channel, handle)
            for pid, status in _reaped(workers):
                workers.discard(pid)
                channel.send(f"exited {pid} {status}".encode())
    finally:
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)


def _send_handle(channel: socket.socket, handle: WorkerHandle) -> None:
    events: IO[str] = handle.events
    socket.send_fds(channel, [f"spawned {handle.pid}".encode()], [events.fileno(), handle.lifeline])
    events.close()  # the supervisor holds the copies now
    os.close(handle.lifeline)


def _reaped(workers: set[int]) -> list[tuple[int, int]]:
    done = []
    for pid in list(workers):
        with contextlib.suppress(ChildProcessError):
            reaped, status = os.waitpid(pid, os.WNOHANG)
            if reaped:
                done.append((pid, status))
    return done
