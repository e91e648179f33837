"""`llmtap run` where there is no fork (Windows): the redirect and the proxy in one process.

WinDivert's original-destination table lives in the process that holds its handles, and mitmproxy
asks it for every connection, so the proxy cannot be a separate worker. The lifecycle is the one
of every OS (llmtap.lifecycle); what is Windows's is here: InProcessHost makes the backend first
and plugs its lookup into mitmproxy, then runs the embedded Master (llmtap.proxy, the same
pipeline) on a thread and event loop of its own; InProcessRunner supplies the checks, the
directories and the status file.

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
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmtap import addons, ca, redirect
from llmtap.config import Config
from llmtap.errors import LlmtapError, RuntimeFailure, UsageError
from llmtap.lifecycle import READY_TIMEOUT_S, Event, EventHandler, Lifecycle, configure_logging
from llmtap.platform import statusfile
from llmtap.platform.base import RedirectBackend, RedirectPlan, plug_into_mitmproxy
from llmtap.platform.windows.acl import restrict_to_administrators
from llmtap.platform.windows.attribution import resolver_for
from llmtap.privileges import ServiceUser, require_root
from llmtap.proxy import ProxySettings, build_master
from llmtap.supervisor import listen_hosts
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


class InProcessHost:
    """The proxy in this process (a ProxyHost, llmtap.lifecycle): the backend is made first and
    its original-destination table plugged into mitmproxy, then the embedded Master. It does not
    heal: a proxy that stops ends the run (the service manager restarts it)."""

    heals = False

    def __init__(self) -> None:
        self.proxy: EmbeddedProxy | None = None
        self._settings: ProxySettings | None = None
        self._resolve: Callable[[dict[str, Any]], Any] | None = None
        self._ready = threading.Event()
        self._listening: list[str] = []

    @property
    def pid(self) -> int:
        return os.getpid()  # status reports it as the worker

    def prepare(self, settings: ProxySettings, backend_cls: type[RedirectBackend],
                plan: RedirectPlan) -> RedirectBackend | None:
        backend = backend_cls(plan)
        if lookup := backend.original_addr_lookup():
            plug_into_mitmproxy(lookup)  # before the Master: its transparent mode reads it at configure
        self._settings = settings
        self._resolve = resolver_for(backend)  # attribution, answered in this process
        return backend

    def start(self, on_event: EventHandler, stop: threading.Event) -> list[str] | None:
        """Where the proxy listens, once it does; None if a stop came first."""
        assert self._settings is not None

        def handle(event: Event) -> None:
            if event.get("event") == "ready":
                self._listening = list(event.get("listening", []))
                self._ready.set()
            on_event(event)

        proxy = self.proxy = EmbeddedProxy(self._settings, handle, self._resolve)
        proxy.start()
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not self._ready.wait(0.05):
            if stop.is_set():
                return None
            if not proxy.alive() or time.monotonic() > deadline:
                raise RuntimeFailure("the proxy did not start (its reason is printed above)")
        return self._listening

    def alive(self) -> bool:
        return self.proxy is not None and self.proxy.alive()

    def trouble(self) -> str | None:
        if self.proxy is not None and not self.proxy.alive():
            return "the proxy stopped (its reason is printed above)"
        return None

    def kill(self) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proxy is not None:
            self.proxy.stop()


class InProcessRunner(Lifecycle):
    """The lifecycle elevated on Windows: the proxy in this process, the status in a file."""

    REDIRECT_LOST = "the redirect was lost (the {} handles closed)"

    def __init__(
        self, config: Config, bare: bool = False, *,
        backend_cls: type[RedirectBackend] | None = None,
        check_rights: Callable[[str], None] | None = None,
        restrict: Callable[[Path], None] | None = None,
    ) -> None:
        super().__init__(config, bare, InProcessHost())
        self.chosen_backend = backend_cls
        self.check_rights = check_rights or require_root  # Windows: elevated
        self.restrict = restrict or restrict_to_administrators
        self.next_status = 0.0

    def prepare(self) -> tuple[type[RedirectBackend], ProxySettings]:
        """Checks, directories, leftovers and the CA."""
        config = self.config
        self.check_rights("llmtap run")
        if config.redirect.gateway_interfaces:
            raise UsageError("redirect.gateway_interfaces is Linux-only: remove it from the config")
        if config.metrics.listen:  # served by the supervisor, which this runner has none of
            raise UsageError("metrics.listen is not available on Windows yet: remove it from the "
                             "config")
        backend_cls = self.chosen_backend or redirect.choose_backend(config.redirect.backend)
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
        return backend_cls, self.settings(bundle, hosts)

    def _prepare_dirs(self) -> None:
        """Restricted before anything is written in them (the CA key first of all)."""
        for directory in (self.config.state_dir, self.config.records_dir, self.config.run_dir):
            directory.mkdir(parents=True, exist_ok=True)
            self.restrict(directory)

    def redirect_plan(self) -> RedirectPlan:
        """No service user: the plan's uid is unused (the loop guard is the process id)."""
        r = self.config.redirect
        return RedirectPlan(proxy_port=r.proxy_port, service_uid=NO_USER.uid, ports=r.ports,
                            scope=r.scope, block_quic=r.block_quic,
                            gateway_interfaces=r.gateway_interfaces,
                            max_connections_per_user=r.max_connections_per_user)

    def tick(self) -> None:
        """The status file, every STATUS_EVERY_S (no control socket: no AF_UNIX here)."""
        if time.monotonic() >= self.next_status:
            statusfile.publish(self.config.control_socket, self.status())
            self.next_status = time.monotonic() + STATUS_EVERY_S

    def stop_services(self) -> None:
        statusfile.withdraw(self.config.control_socket)


def make_runner(config: Config, bare: bool = False) -> InProcessRunner:
    """The runner, with this process tuned as the forked worker tunes its own."""
    logging.getLogger("mitmproxy").setLevel(logging.WARNING)  # as quiet as the forked worker
    # As in the worker: the record writer thread must not hold the GIL the proxy's loop needs.
    sys.setswitchinterval(GIL_SWITCH_S)
    return InProcessRunner(config, bare)


def run(config: Config, bare: bool = False) -> int:
    configure_logging()
    return make_runner(config, bare).run()
