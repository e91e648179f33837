"""`llmtap run` on every OS, as one story: prepare -> resolve the targets -> host the proxy ->
redirect to it -> watch and heal -> undo everything in `finally`.

Two ways to host the proxy (ProxyHost): a worker forked from a root supervisor (POSIX:
llmtap.forked_host, driven by llmtap.supervisor) and mitmproxy embedded in this process (Windows,
where WinDivert's table lives in the process holding its handles: llmtap.platform.windows.inprocess).
What differs per OS (rights, directories, leftovers, the control socket or the status file) is in
the subclass's hooks; the order is here, once:

- the proxy listens before the redirect goes in, so no connection is sent to a port nobody
  listens on;
- the redirect goes before the proxy stops, so no connection is caught by a proxy on its way out;
- whatever way `run` ends, the redirect is removed and the proxy stopped.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any, ClassVar, Protocol

from llmtap import alerts, ca, livehub, metrics
from llmtap.config import Config
from llmtap.errors import RuntimeFailure
from llmtap.healing import Healer
from llmtap.platform.base import RedirectBackend, RedirectPlan, TargetAddresses
from llmtap.proxy import ProxySettings
from llmtap.targets import TargetResolver, redirect_names

log = logging.getLogger("llmtap")

READY_TIMEOUT_S = 60.0
WATCH_INTERVAL_S = 0.2
CAP_LOG_S = 5.0  # how often the connection cap's refusals are looked at (and logged)
# SIGBREAK (Windows only): Ctrl-Break in the console; SIGHUP: POSIX only. A host without signals
# (the Windows service runs us on a thread of its own) calls request_stop() instead.
STOP_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP", "SIGBREAK")

Event = dict[str, Any]


class EventHandler(Protocol):
    def __call__(self, event: Event) -> None: ...


class ProxyHost(Protocol):
    """Where the proxy runs. The lifecycle calls prepare() once, before it starts any thread;
    start() once (again on a host that `heals`, to replace a failed proxy, after kill());
    alive() and trouble() from any thread; stop() once, in `finally`, whatever happened before
    (even when prepare or start failed or never ran). kill() and stop() may be called twice."""

    heals: bool  # whether a failed proxy can be replaced (start() after kill())

    @property
    def pid(self) -> int:
        """The process the proxy runs in (0 before it started)."""

    def prepare(self, settings: ProxySettings, backend_cls: type[RedirectBackend],
                plan: RedirectPlan) -> RedirectBackend | None:
        """Before any thread exists (a host may fork here). Returns the redirect backend when the
        proxy must have it before it starts (in-process: the proxy asks the backend's own table);
        None: the lifecycle makes one each time it installs the redirect."""

    def start(self, on_event: EventHandler, stop: threading.Event) -> list[str] | None:
        """Returns once the proxy listens: where it does. None when `stop` was set first. Raises
        RuntimeFailure when it does not start (its reason is printed). The proxy's reports
        ("ready", "counters", "live") go to `on_event`, from a thread of the host's."""

    def alive(self) -> bool:
        """Cheap: the proxy runs and reports (for status and /health)."""

    def trouble(self) -> str | None:
        """Why the proxy does not serve (exited, or silent too long), or None."""

    def kill(self) -> None:
        """The failed proxy ends at once (healing's first step, before the redirect is lifted)."""

    def stop(self) -> None:
        """The proxy ends in order, and everything the host made is released."""


class Lifecycle:
    """The story of `run`; the subclass supplies the OS's hooks (prepare, the services around the
    redirect, tick) and its ProxyHost."""

    REDIRECT_LOST: ClassVar[str] = "the redirect rules were lost (the {} helper exited)"

    def __init__(self, config: Config, bare: bool, host: ProxyHost) -> None:
        self.config = config
        self.bare = bare
        self.host = host
        self.stop = threading.Event()
        self.wake = threading.Event()  # the watch looks now, not at its next round
        self.started_at = datetime.datetime.now(datetime.UTC)
        self.counters: dict[str, Any] = {}
        self.listening: list[str] = []
        self.exit_reason = ""
        self.resolver = TargetResolver(
            redirect_names(config.targets.host_set(), config.redirect.scope),
            grace_s=config.redirect.dns_grace_s,
            refresh_max_s=config.redirect.dns_refresh_max_s,
        )
        self.addresses = TargetAddresses()
        self.backend_cls: type[RedirectBackend] | None = None
        self.backend: RedirectBackend | None = None
        self.plan: RedirectPlan | None = None
        self.redirect_lock = threading.RLock()  # the backend, as the watch and refresh see it
        self.hub = livehub.LiveHub(lambda: self.counters)
        self.metrics = metrics.Metrics()
        self.healer = Healer(self.stop)

    def run(self) -> int:
        self.backend_cls, settings = self.prepare()  # nothing in it needs undoing
        self.addresses, next_refresh = self.resolver.refresh()
        self.plan = self.redirect_plan()
        previous_signals: dict[int, Any] = {}
        try:
            self.backend = self.host.prepare(settings, self.backend_cls, self.plan)
            previous_signals = self._catch_stop_signals()
            listening = self.host.start(self._on_event, self.stop)
            if listening is None:
                return 0  # a stop came first
            self.listening = listening
            self.before_redirect()
            self._install_redirect()
            threading.Thread(target=self._refresh, args=(next_refresh,), daemon=True).start()
            self.after_redirect()
            (self.config.run_dir / "llmtap.pid").write_text(f"{os.getpid()}\n")
            log.info("intercepting with %s (scope %s, %d target addresses); proxy on %s",
                     self.backend_cls.name, self.config.redirect.scope, len(self.addresses),
                     ", ".join(self.listening))
            return self._watch()
        finally:
            self.stop.set()  # no target refresh, no healing from now on
            self._lift_redirect()
            self.stop_services()
            self.host.stop()
            for sig, handler in previous_signals.items():
                signal.signal(sig, handler)
            with contextlib.suppress(FileNotFoundError):
                (self.config.run_dir / "llmtap.pid").unlink()

    # --- the hooks: what differs per OS ----------------------------------------------------------

    def prepare(self) -> tuple[type[RedirectBackend], ProxySettings]:
        """Rights, directories, leftovers of an earlier run, the CA: the backend and the proxy's
        settings. Refuses (UsageError) before anything starts."""
        raise NotImplementedError

    def redirect_plan(self) -> RedirectPlan:
        raise NotImplementedError

    def before_redirect(self) -> None:
        """Services that must be up before traffic comes (a port in use stops the start)."""

    def after_redirect(self) -> None:
        """Services that say the daemon runs (its status): only once it intercepts."""

    def tick(self) -> None:
        """Each watch round."""

    def stop_services(self) -> None:
        """Undoes before_redirect and after_redirect (safe when they did not run)."""

    # --- the story's parts --------------------------------------------------------------------

    def settings(self, bundle: Path, hosts: tuple[str, ...]) -> ProxySettings:
        config = self.config
        return ProxySettings(
            proxy_port=config.redirect.proxy_port,
            confdir=config.ca_dir,
            upstream_ca_bundle=bundle,
            targets=config.targets.all_hosts,
            records_dir=config.records_dir,
            state_dir=config.state_dir,
            config_file=config.source,
            listen_hosts=hosts,
            pipeline=not self.bare,
            explicit_listen=config.explicit.address,
            key_ports=config.redirect.ports,
            idle_timeout_s=config.redirect.idle_timeout_s,
            upstream_pool_per_host=config.upstream.pool_per_host,
            upstream_pool_idle_s=config.upstream.pool_idle_s,
        )

    def request_stop(self, reason: str = "requested") -> None:
        """From any thread, any time (even before run): the redirect is removed, then the proxy
        stopped, and run() returns 0."""
        if not self.stop.is_set():
            self.exit_reason = reason
        self.stop.set()
        self.wake.set()

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

    def _on_event(self, event: Event) -> None:
        """The proxy's reports, on the host's thread."""
        kind = event.get("event")
        if kind == "counters":
            self.counters = event.get("counters", {})
            self.metrics.update_counters(self.counters, self.host.pid)
        elif kind == "live":
            self.hub.publish(event.get("events", []))
            alerts.deliver(event.get("events", []), self.config.budgets.webhook)  # budget thresholds
            self.metrics.observe(event.get("events", []))
        elif kind == "ended":  # the proxy is gone: look now
            self.wake.set()

    def _install_redirect(self) -> None:
        assert self.backend_cls is not None and self.plan is not None
        with self.redirect_lock:
            backend = self.backend or self.backend_cls(self.plan)
            self.backend = backend
            backend.install(self.addresses)

    def _lift_redirect(self) -> None:
        """Traffic goes direct until the redirect is back (a placeholder then fails safely)."""
        with self.redirect_lock:
            backend, self.backend = self.backend, None
            if backend is not None:
                backend.remove()

    def _watch(self) -> int:
        """Watches the proxy (exited, or silent) and the redirect; heals either where the host
        can, and ends (exit 1) when it cannot or healing keeps failing."""
        cap = ConnectionCapWatch(self.config.redirect.max_connections_per_user)
        while not self.stop.is_set():
            self.tick()
            cap.check(self.backend)
            trouble = self.host.trouble()
            backend = self.backend
            if trouble or (backend is not None and not backend.alive()):
                reason = trouble or self.REDIRECT_LOST.format(self.backend_cls and self.backend_cls.name)
                if not self._heal(reason, new_proxy=bool(trouble)):
                    return 1
            self.wake.wait(WATCH_INTERVAL_S)  # or sooner: the proxy's reports ended
            self.wake.clear()
        log.info("stopping (%s); removing the redirect", self.exit_reason or "requested")
        return 0

    def _heal(self, reason: str, new_proxy: bool) -> bool:
        """False: the daemon must end."""
        if new_proxy:  # dead or hung: it ends, then the redirect goes (see _restore), at once
            self.host.kill()
            self._lift_redirect()
        if not self.host.heals:
            log.error("%s: the redirect is removed, llmtap stops", reason)
            return False
        try:
            self.healer.heal(reason, functools.partial(self._restore, new_proxy))
        except RuntimeFailure as exc:
            log.error("%s; giving up", exc)
            return False
        return True

    def _restore(self, new_proxy: bool) -> None:
        """One attempt at healing: the proxy (if it is the trouble) killed, the redirect lifted,
        a new proxy, the redirect back once it listens.

        The old proxy dies before the redirect goes: the resets of its clients' connections must
        still pass the NAT that made them (without a NAT chain the kernel translates nothing), or
        those clients wait for their own timeouts instead of retrying at once, direct.
        """
        if new_proxy:
            self.host.kill()
        self._lift_redirect()
        if new_proxy:
            listening = self.host.start(self._on_event, self.stop)
            if listening is None:
                return  # stopping
            self.listening = listening
        self._install_redirect()

    def _refresh(self, first_in: float) -> None:
        wait = first_in
        while not self.stop.wait(wait):
            try:
                addresses, wait = self.resolver.refresh()
                with self.redirect_lock:
                    if addresses != self.addresses and self.backend is not None:
                        self.backend.update_targets(addresses)
                    self.addresses = addresses
            except Exception as exc:  # keep refreshing; the old set stays in force
                log.warning("target refresh failed: %s", exc)
                wait = 30.0

    def intercepting(self) -> bool:
        return bool(self.backend and self.backend.alive() and self.host.alive())

    def status(self) -> dict[str, Any]:
        r = self.config.redirect
        return {
            "running": True,
            "pid": os.getpid(),
            "worker_pid": self.host.pid,
            "started_at": self.started_at.isoformat(timespec="seconds").replace("+00:00", "Z"),
            "backend": self.backend.name if self.backend else None,
            "scope": r.scope,
            "ports": list(r.ports),
            "proxy_port": r.proxy_port,
            "listening": self.listening,
            "explicit": self.config.explicit.listen or None,
            "metrics": self.config.metrics.listen or None,
            "gateway_interfaces": list(r.gateway_interfaces),
            "rules_present": bool(self.backend and self.backend.alive()),
            **self.healer.status(),
            "block_quic": r.block_quic,
            "targets": self.resolver.by_host,
            "addresses": {"v4": sorted(self.addresses.v4), "v6": sorted(self.addresses.v6)},
            "counters": self.counters,
            "ca_cert": str(ca.public_cert_path(self.config.ca_dir)),
            "records_dir": str(self.config.records_dir),
        }


class ConnectionCapWatch:
    """Says, at most every CAP_LOG_S, when the per-user connection cap refused connections."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.seen = 0
        self.next_check = 0.0

    def check(self, backend: RedirectBackend | None) -> None:
        now = time.monotonic()
        if not self.cap or backend is None or now < self.next_check:
            return
        self.next_check = now + CAP_LOG_S
        refused = backend.refused_connections()
        if refused > self.seen:
            log.warning("the per-user connection cap (redirect.max_connections_per_user = %d) "
                        "refused %d new connection(s): a local process opens too many",
                        self.cap, refused - self.seen)
        self.seen = max(self.seen, refused)


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="llmtap: %(message)s", stream=sys.stderr)
