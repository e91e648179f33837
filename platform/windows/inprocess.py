"""`llmtap run` where there is no fork (Windows): the redirect and the proxy in one process.

WinDivert's original-destination table lives in the process that holds its handles, and mitmproxy
asks it for every connection, so the proxy cannot be a separate worker. The order is the
supervisor's: leftovers cleaned up -> the backend made and its lookup plugged into mitmproxy ->
the embedded Master (llmtap.proxy, the same pipeline) started on a thread and event loop of its
own -> listening -> the redirect installed -> watched -> on stop, the redirect removed, then the
Master shut down.

There is no privilege drop (Windows has no setuid): the process stays elevated, the loop guard is
the process id (WindivertBackend's OwnProcessExemption excludes this process's connections), and
llmtap's directories are restricted to Administrators and SYSTEM instead of being owned by a
service user. CPython has no AF_UNIX on Windows, so there is no control socket: the status is
published to a file (llmtap.platform.statusfile).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from llmtap import addons, ca, redirect
from llmtap.config import Config
from llmtap.errors import LlmtapError, RuntimeFailure, UsageError
from llmtap.platform import statusfile
from llmtap.platform.base import RedirectBackend, plug_into_mitmproxy
from llmtap.platform.windows.acl import restrict_to_administrators
from llmtap.platform.windows.attribution import resolver_for
from llmtap.privileges import ServiceUser, require_root
from llmtap.proxy import ProxySettings, build_master
from llmtap.supervisor import (
    READY_TIMEOUT_S,
    WATCH_INTERVAL_S,
    Supervisor,
    configure_logging,
    listen_hosts,
)
from llmtap.worker import GIL_SWITCH_S, Reporter
from mitmproxy import master

log = logging.getLogger("llmtap")

# No service user: chown to -1 changes nothing, and the plan's uid is unused (the guard is the pid).
NO_USER = ServiceUser("", -1, -1)
# Loopback only: the redirect re-injects each connection as LO:cp -> LO:proxy
# (llmtap.platform.windows.loopback); a peer it did not redirect has no entry, and is dropped.
LISTEN_HOSTS = ("127.0.0.1", "::1")
STATUS_EVERY_S = 1.0
STOP_TIMEOUT_S = 10.0
# SIGBREAK (Windows only): Ctrl-Break in the console. The service host, which runs us on a
# thread of its own (no signals there), calls request_stop() instead.
STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGBREAK")

Event = dict[str, Any]


class EventSink(io.StringIO):
    """Where Reporter writes its JSON lines: each is handed over as it is written (no pipe)."""

    def __init__(self, handle: Callable[[Event], None]) -> None:
        super().__init__()
        self.handle = handle

    def write(self, text: str) -> int:
        for line in text.splitlines():
            if line.strip():
                with contextlib.suppress(ValueError):
                    self.handle(json.loads(line))
        return len(text)


class EmbeddedProxy:
    """llmtap.proxy's Master on a thread and event loop of its own, reporting through the
    forked worker's Reporter."""

    def __init__(self, settings: ProxySettings, on_event: Callable[[Event], None],
                 resolve: Callable[[dict[str, Any]], Any] | None = None) -> None:
        self.settings = settings
        self.on_event = on_event
        self.resolve = resolve  # attribution, answered in this process
        self._master: master.Master | None = None
        self._stopping = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="llmtap-proxy", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        with self._lock:
            self._stopping = True
            if self._master is not None and self._thread.is_alive():
                with contextlib.suppress(RuntimeError):  # its loop closed meanwhile: it is done
                    self._master.shutdown()  # thread-safe
        if self._thread.ident is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.warning("the proxy did not stop within %gs", timeout_s)

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except SystemExit:
            pass  # mitmproxy's startup error check has printed the reason
        except LlmtapError as exc:
            print(f"llmtap: proxy: {exc}", file=sys.stderr)
        except BaseException as exc:  # never a traceback: one line; the runner notices and exits
            print(f"llmtap: proxy failed: {type(exc).__name__}: {exc}", file=sys.stderr)

    async def _serve(self) -> None:
        stages = (addons.pipeline(lookup=self.settings.process_lookup, resolve=self.resolve)
                  if self.settings.pipeline else [])
        proxy = build_master(self.settings, with_pipeline=self.settings.pipeline, stages=stages)
        proxy.addons.add(Reporter(EventSink(self.on_event), stages))
        with self._lock:
            if self._stopping:
                return
            self._master = proxy
        try:
            await proxy.run()
        finally:
            # mitmproxy leaves its listening sockets to the process's exit; close them here.
            if server := proxy.addons.get("proxyserver"):
                await server.servers.update([])


class InProcessRunner(Supervisor):
    """The supervisor's lifecycle (target refresh, status) with the proxy in this process."""

    def __init__(
        self, config: Config, bare: bool = False, *,
        backend_cls: type[RedirectBackend] | None = None,
        check_rights: Callable[[str], None] | None = None,
        restrict: Callable[[Path], None] | None = None,
    ) -> None:
        super().__init__(config, bare)
        self.backend_cls = backend_cls
        self.check_rights = check_rights or require_root  # Windows: elevated
        self.restrict = restrict or restrict_to_administrators
        self.ready = threading.Event()
        self.worker_pid = os.getpid()  # the proxy is this process (status reports it as the worker)

    def run(self) -> int:
        config = self.config
        backend_cls, hosts, bundle = self._prepare()
        self.addresses, next_refresh = self.resolver.refresh()
        self.backend = backend = backend_cls(self._plan(NO_USER))
        if lookup := backend.original_addr_lookup():
            plug_into_mitmproxy(lookup)  # before the Master: its transparent mode reads it at configure
        proxy = EmbeddedProxy(self._settings(bundle, hosts), self._on_event,
                              resolver_for(backend))
        previous = self._catch_stop_signals()
        try:
            proxy.start()
            if not self._wait_listening(proxy):
                return 0
            backend.install(self.addresses)
            threading.Thread(target=self._refresh, args=(next_refresh,), daemon=True).start()
            self._write_pidfile()
            log.info(
                "intercepting with %s (scope %s, %d target addresses); proxy on %s",
                backend.name, config.redirect.scope, len(self.addresses), ", ".join(self.listening),
            )
            return self._watch_proxy(proxy)
        finally:
            self.stop.set()  # no target refresh from now on
            backend.remove()
            proxy.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            statusfile.withdraw(config.control_socket)
            with contextlib.suppress(FileNotFoundError):
                (config.run_dir / "llmtap.pid").unlink()

    def _prepare(self) -> tuple[type[RedirectBackend], tuple[str, ...], Path]:
        """Checks, directories, leftovers and the CA: (backend class, listen hosts, CA bundle)."""
        config = self.config
        self.check_rights("llmtap run")
        if config.redirect.gateway_interfaces:
            raise UsageError("redirect.gateway_interfaces is Linux-only: remove it from the config")
        if config.metrics.listen:  # served by the supervisor, which this runner has none of
            raise UsageError("metrics.listen is not available on Windows yet: remove it from the "
                             "config")
        backend_cls = self.backend_cls or redirect.choose_backend(config.redirect.backend)
        hosts = listen_hosts(config.redirect.proxy_port, config.explicit.address, LISTEN_HOSTS)
        self._prepare_dirs()
        if backend_cls.cleanup_leftovers():
            log.info("removed llmtap rules left by an earlier run (%s)", backend_cls.name)
        cert = ca.ensure_ca(config.ca_dir, config.targets.all_hosts, NO_USER.uid, NO_USER.gid)
        if missing := ca.uncovered_hosts(cert, config.targets.all_hosts):
            log.warning("the CA does not cover %s: run `llmtap ca rotate`", ", ".join(missing))
        bundle = ca.write_upstream_bundle(
            config.run_dir / "upstream-ca.pem", config.upstream.extra_ca, NO_USER.uid, NO_USER.gid
        )
        return backend_cls, hosts, bundle

    def _prepare_dirs(self) -> None:
        """Restricted before anything is written in them (the CA key first of all)."""
        for directory in (self.config.state_dir, self.config.records_dir, self.config.run_dir):
            directory.mkdir(parents=True, exist_ok=True)
            self.restrict(directory)

    def request_stop(self, reason: str = "requested") -> None:
        """From any thread, any time (even before run): the redirect is removed, then the proxy
        stopped, and run() returns 0."""
        if not self.stop.is_set():
            self.exit_reason = reason
        self.stop.set()

    def _catch_stop_signals(self) -> dict[int, Any]:
        """The previous handlers, to put back. Only the main thread may set them."""
        if threading.current_thread() is not threading.main_thread():
            return {}

        def request_stop(signum: int, _frame: FrameType | None) -> None:
            self.request_stop(signal.Signals(signum).name)

        previous: dict[int, Any] = {}
        for name in STOP_SIGNALS:
            if (sig := getattr(signal, name, None)) is not None:
                previous[sig] = signal.signal(sig, request_stop) or signal.SIG_DFL
        return previous

    def _wait_listening(self, proxy: EmbeddedProxy) -> bool:
        """True once the proxy listens; False if a stop came first."""
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not self.ready.wait(0.05):
            if self.stop.is_set():
                return False
            if not proxy.alive() or time.monotonic() > deadline:
                raise RuntimeFailure("the proxy did not start (its reason is printed above)")
        return True

    def _on_event(self, event: Event) -> None:
        """Reporter's events, on the proxy's thread. "live" events feed the control socket's
        subscribers; there is no socket here."""
        kind = event.get("event")
        if kind == "ready":
            self.listening = list(event.get("listening", []))
            self.ready.set()
        elif kind == "counters":
            self.counters = event.get("counters", {})

    def _watch_proxy(self, proxy: EmbeddedProxy) -> int:
        assert self.backend is not None
        next_status = 0.0
        while True:
            if not proxy.alive():
                log.error("the proxy stopped (its reason is printed above); redirect removed")
                return 1
            if not self.backend.alive():
                log.error("the redirect was lost (the %s handles closed)", self.backend.name)
                return 1
            if time.monotonic() >= next_status:
                statusfile.publish(self.config.control_socket, self.status())
                next_status = time.monotonic() + STATUS_EVERY_S
            if self.stop.wait(WATCH_INTERVAL_S):
                break
        log.info("stopping (%s); removing the redirect", self.exit_reason or "requested")
        return 0


def make_runner(config: Config, bare: bool = False) -> InProcessRunner:
    """The runner, with this process tuned as the forked worker tunes its own."""
    logging.getLogger("mitmproxy").setLevel(logging.WARNING)  # as quiet as the forked worker
    # As in the worker: the record writer thread must not hold the GIL the proxy's loop needs.
    sys.setswitchinterval(GIL_SWITCH_S)
    return InProcessRunner(config, bare)


def run(config: Config, bare: bool = False) -> int:
    configure_logging()
    return make_runner(config, bare).run()
