"""The proxy in a worker process (POSIX): forked by the spawner, unprivileged, replaceable.

A ProxyHost (llmtap.lifecycle). The worker reports on a pipe (JSON lines: "ready" once it
listens, then counters and live events); its exit or silence past HEARTBEAT_TIMEOUT_S is the
trouble the lifecycle heals by starting another. The process lookup and, where the backend needs
one (macOS), the original-destination channel are made before the spawner forks, and answered
here, as root, for every worker.
"""

from __future__ import annotations

import dataclasses
import os
import select
import signal
import threading
import time
from pathlib import Path

from llmtap import keybind, proclookup
from llmtap import secrets_store as store
from llmtap.errors import RuntimeFailure
from llmtap.healing import HEARTBEAT_TIMEOUT_S
from llmtap.lifecycle import READY_TIMEOUT_S, EventHandler
from llmtap.platform.base import OriginalAddrChannel, RedirectBackend, RedirectPlan
from llmtap.privileges import ServiceUser
from llmtap.proxy import ProxySettings
from llmtap.spawner import WorkerSpawner
from llmtap.worker import WorkerHandle


class AnyBoundSecret:
    """Whether the secret store holds a key bound to programs or users, re-read when it changes.
    Unreadable or unknown counts as bound: the checks then run, as they would for a bound key."""

    def __init__(self, state_dir: Path) -> None:
        self.paths = store.StorePaths.under(state_dir)
        self._seen: tuple[int, int] | None = None
        self._bound = True

    def __call__(self) -> bool:
        try:
            info = self.paths.store.stat()
        except FileNotFoundError:
            return False
        except OSError:
            return True
        if (info.st_mtime_ns, info.st_ino) != self._seen:
            try:
                secrets = store.read_store(self.paths)
            except Exception:
                return True
            self._bound = any(keybind.of_secret(secret).bound for secret in secrets)
            self._seen = (info.st_mtime_ns, info.st_ino)
        return self._bound

REAP_WAIT_S = 0.5  # how long trouble() waits for a dead worker's exit status, for the log
READY_POLL_S = 0.05  # how often a start looks whether a stop came


class ForkedWorkerHost:
    heals = True

    def __init__(self) -> None:
        self.user: ServiceUser | None = None  # set by the supervisor once it has made sure of it
        self.worker: WorkerHandle | None = None
        self._spawner: WorkerSpawner | None = None
        self._lookup: proclookup.LookupService | None = None
        self._channel: OriginalAddrChannel | None = None

    @property
    def pid(self) -> int:
        return self.worker.pid if self.worker is not None else 0

    def prepare(self, settings: ProxySettings, backend_cls: type[RedirectBackend],
                plan: RedirectPlan) -> RedirectBackend | None:
        assert self.user is not None
        self._channel = backend_cls.original_addr_channel()  # made before the fork, like the lookup
        # the worker asks it which process connects; the costly checks only while a key is bound
        deep = AnyBoundSecret(settings.state_dir) if settings.state_dir else (lambda: True)
        self._lookup = proclookup.LookupService(deep=deep)
        settings = dataclasses.replace(
            settings, original_addr=self._channel.lookup if self._channel else None,
            process_lookup=self._lookup.client)
        self._spawner = WorkerSpawner(settings, self.user)  # before any thread: it forks workers
        self._lookup.start()
        if self._channel:
            self._channel.serve()
        self._spawner.start()
        return None

    def start(self, on_event: EventHandler, stop: threading.Event) -> list[str] | None:
        """A new worker (the old one reaped first), listening, with a thread reading its reports."""
        assert self._spawner is not None
        self.kill()
        worker = self.worker = self._spawner.spawn()
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not select.select([worker.events], [], [], READY_POLL_S)[0]:
            if stop.is_set():
                return None
            if time.monotonic() > deadline:
                break
        event = worker.next_event() if select.select([worker.events], [], [], 0)[0] else None
        if not event or event.get("event") != "ready":
            raise RuntimeFailure("the proxy worker did not start (its reason is printed above)")
        threading.Thread(target=self._read_reports, args=(worker, on_event), daemon=True).start()
        return list(event.get("listening", []))

    def alive(self) -> bool:
        worker = self.worker
        return (worker is not None and not worker.ended
                and worker.silent_for() <= HEARTBEAT_TIMEOUT_S)

    def trouble(self) -> str | None:
        worker = self.worker
        if worker is None:
            return None
        if worker.ended or worker.exited() is not None:
            status = worker.wait_status(REAP_WAIT_S)
            return f"the proxy worker exited ({_describe(status) if status is not None else 'no status'})"
        if worker.silent_for() > HEARTBEAT_TIMEOUT_S:
            return f"the proxy worker stopped answering for {worker.silent_for():.1f} s"
        return None

    def kill(self) -> None:
        """SIGKILL (a stopped, SIGSTOP, process takes it too), reaped, our ends of its pipes
        closed."""
        if self.worker is not None:
            self.worker.stop(kill=True)

    def stop(self) -> None:
        if self.worker is not None:
            self.worker.stop()
        if self._spawner is not None:
            self._spawner.close()
        if self._lookup is not None:
            self._lookup.close()

    def _read_reports(self, worker: WorkerHandle, on_event: EventHandler) -> None:
        with worker.events:
            while (event := worker.next_event()) is not None:
                on_event(event)
        worker.ended = True  # it exited: every moment the redirect still points at it is refusals
        on_event({"event": "ended"})


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit code {os.waitstatus_to_exitcode(status)}"
