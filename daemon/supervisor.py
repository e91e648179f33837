"""The root supervisor: cleanup leftovers -> start worker -> install redirect -> watch -> remove.

The worker starts before the redirect goes in, so no connection is ever sent to a port nobody
listens on. The supervisor is the only root process; it owns the rules, and it makes sure they
are gone whatever way it ends (see the RedirectBackend notes on `dies_with_owner`).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import functools
import logging
import os
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

from llmtap import alerts, ca, control, livehub, metrics, proclookup, redirect
from llmtap.config import Config
from llmtap.errors import LlmtapError, RuntimeFailure, UsageError
from llmtap.healing import HEARTBEAT_TIMEOUT_S, Healer
from llmtap.metrics_server import MetricsServer
from llmtap.platform.base import OriginalAddrLookup, RedirectBackend, RedirectPlan, TargetAddresses
from llmtap.platform.linux import gateway
from llmtap.privileges import ServiceUser, ensure_service_user, require_root
from llmtap.proxy import LOOPBACK_HOSTS, ProxySettings
from llmtap.secrets_store import resolve_at_start
from llmtap.spawner import WorkerSpawner
from llmtap.targets import TargetResolver, redirect_names
from llmtap.worker import WorkerHandle

log = logging.getLogger("llmtap")

READY_TIMEOUT_S = 60.0
WATCH_INTERVAL_S = 0.2
GATEWAY_CHECK_S = 5.0  # how soon a gateway interface created after the start is tapped
REAP_WAIT_S = 0.5  # how long the watchdog waits for a dead worker's exit status, for the log
CAP_LOG_S = 5.0  # how often the connection cap's refusals are looked at (and logged)


def listen_hosts(port: int, explicit: tuple[str, int] | None = None,
                 candidates: tuple[str, ...] = LOOPBACK_HOSTS) -> tuple[str, ...]:
    """The addresses (loopback unless told) to listen on; refuses (exit 2) when the port, or the
    explicit listener's address, is taken."""
    hosts = [host for host in candidates if _can_bind(host, port, "redirect.proxy_port")]
    if explicit and not _can_bind(*explicit, "explicit.listen"):
        raise UsageError(f"explicit.listen {explicit[0]}: this machine has no IPv6")
    return tuple(hosts)


def probe_option(platform: str | None = None) -> int:
    """The SOL_SOCKET option of the port probe. POSIX: SO_REUSEADDR, so a TIME_WAIT left by an
    earlier run is no refusal. Windows: SO_REUSEADDR would let the probe bind a port another
    program listens on; SO_EXCLUSIVEADDRUSE (~SO_REUSEADDR) fails on exactly that."""
    if (platform or sys.platform) == "win32":
        return int(getattr(socket, "SO_EXCLUSIVEADDRUSE", ~4))
    return socket.SO_REUSEADDR


# Windows answers WSAEACCES for a port held exclusively by another program or reserved.
PORT_TAKEN = {errno.EADDRINUSE, getattr(errno, "WSAEACCES", errno.EADDRINUSE)}


def _can_bind(host: str, port: int, key: str) -> bool:
    """False when the machine has no IPv6 (the v6 listener is then left out)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, probe_option(), 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            if exc.errno in PORT_TAKEN:
                raise UsageError(
                    f"port {port} on {host} is already in use: stop what uses it or set {key}"
                ) from None
            if exc.errno == errno.EADDRNOTAVAIL and key == "explicit.listen":
                raise UsageError(f"explicit.listen: {host} is not an address of this machine") from None
            if family == socket.AF_INET6:
                return False
            raise RuntimeFailure(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return True


def prepare_dirs(config: Config, user: ServiceUser) -> None:
    for directory, mode in ((config.state_dir, 0o700), (config.records_dir, 0o750)):
        directory.mkdir(parents=True, exist_ok=True)
        os.chown(directory, user.uid, user.gid)
        os.chmod(directory, mode)
    config.run_dir.mkdir(mode=0o755, parents=True, exist_ok=True)


def start_guardian(cleanup: Callable[[], object]) -> int:
    """For what the kernel does not undo by itself (iptables rules, route_localnet): a child that
    outlives the supervisor and runs `cleanup` if the supervisor dies without saying goodbye.
    Returns the pipe to write to."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.setpgid(0, 0)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            os.closerange(3, read_fd)
            os.closerange(read_fd + 1, 1024)
            message = b""
            while chunk := os.read(read_fd, 64):
                message += chunk
            if message != b"done":
                cleanup()
        finally:
            os._exit(0)
    os.close(read_fd)
    return write_fd


class Supervisor:
    def __init__(self, config: Config, bare: bool = False) -> None:
        self.config = config
        self.bare = bare
        self.stop = threading.Event()
        self.started_at = datetime.datetime.now(datetime.UTC)
        self.counters: dict[str, Any] = {}
        self.listening: list[str] = []
        self.worker_pid = 0
        self.backend: RedirectBackend | None = None
        self.resolver = TargetResolver(
            redirect_names(config.targets.host_set(), config.redirect.scope),
            grace_s=config.redirect.dns_grace_s,
            refresh_max_s=config.redirect.dns_refresh_max_s,
        )
        self.addresses = TargetAddresses()
        self.exit_reason = ""
        self.localnet = gateway.RouteLocalnet(config.redirect.gateway_interfaces,
                                              gateway.record_path(config.run_dir))
        self.hub = livehub.LiveHub(lambda: self.counters)
        self.metrics = metrics.Metrics()
        self.worker: WorkerHandle | None = None
        self.plan: RedirectPlan | None = None
        self.wake = threading.Event()  # the watchdog looks now, not at its next round
        self.redirect_lock = threading.RLock()  # the backend, as the watchdog and refresh see it
        self.healer = Healer(self.stop)

    def run(self) -> int:
        config = self.config
        require_root("llmtap run")
        backend_cls = redirect.choose_backend(config.redirect.backend)
        hosts = listen_hosts(config.redirect.proxy_port, config.explicit.address)
        user = ensure_service_user(config.service_user)
        prepare_dirs(config, user)
        resolve_at_start(config.state_dir, user.uid, user.name)  # as root, before the fork
        raise_descriptor_limit(config.redirect.max_connections_per_user)
        if removed := redirect.cleanup_all():
            log.info("removed llmtap rules left by an earlier run (%s)", ", ".join(removed))
        if restored := gateway.restore(self.localnet.record):
            log.info("restored route_localnet left by an earlier run (%s)", ", ".join(restored))
        cert = ca.ensure_ca(config.ca_dir, config.targets.all_hosts, user.uid, user.gid)
        if missing := ca.uncovered_hosts(cert, config.targets.all_hosts):
            log.warning("the CA does not cover %s: run `llmtap ca rotate`", ", ".join(missing))
        bundle = ca.write_upstream_bundle(
            config.run_dir / "upstream-ca.pem", config.upstream.extra_ca, user.uid, user.gid
        )
        self.addresses, next_refresh = self.resolver.refresh()
        channel = backend_cls.original_addr_channel()  # made before the fork, like the lookup
        lookup = proclookup.LookupService()  # the worker asks it which process is connecting
        settings = self._settings(bundle, hosts, channel.lookup if channel else None, lookup.client)
        spawner = WorkerSpawner(settings, user)  # before any thread: it forks every worker
        lookup.start()
        if channel:
            channel.serve()
        spawner.start()
        self.plan = self._plan(user)
        guardian_fd = -1
        control_server = metrics_server = None
        try:
            self._start_worker(spawner)
            metrics_server = self._serve_metrics()
            if not backend_cls.dies_with_owner or self.localnet.interfaces:
                guardian_fd = start_guardian(functools.partial(self._undo_leftovers, backend_cls))
            self._install_signal_handlers()
            self._enable_gateway()
            self._install_redirect(backend_cls)
            threading.Thread(target=self._refresh, args=(next_refresh,), daemon=True).start()
            control_server = control.ControlServer(
                config.control_socket, config.service_user, user.gid, self._handle,
                streams={"subscribe": self.hub.serve},
            )
            self._write_pidfile()
            log.info(
                "intercepting with %s (scope %s, %d target addresses); proxy on %s",
                backend_cls.name, config.redirect.scope, len(self.addresses),
                ", ".join(self.listening),
            )
            return self._watch(spawner, backend_cls)
        finally:
            self._lift_redirect()
            gateway.restore(self.localnet.record)
            if guardian_fd >= 0:
                os.write(guardian_fd, b"done")
                os.close(guardian_fd)
            if self.worker is not None:
                self.worker.stop()
            spawner.close()
            lookup.close()
            if control_server is not None:
                control_server.close()
            if metrics_server is not None:
                metrics_server.close()
            with contextlib.suppress(FileNotFoundError):
                (config.run_dir / "llmtap.pid").unlink()

    def _settings(self, bundle: Path, hosts: tuple[str, ...],
                  original_addr: OriginalAddrLookup | None = None,
                  process_lookup: socket.socket | None = None) -> ProxySettings:
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
            original_addr=original_addr,
            process_lookup=process_lookup,
            key_ports=config.redirect.ports,
            idle_timeout_s=config.redirect.idle_timeout_s,
            upstream_pool_per_host=config.upstream.pool_per_host,
            upstream_pool_idle_s=config.upstream.pool_idle_s,
        )

    def _plan(self, user: ServiceUser) -> RedirectPlan:
        r = self.config.redirect
        return RedirectPlan(
            proxy_port=r.proxy_port,
            service_uid=user.uid,
            ports=r.ports,
            scope=r.scope,
            block_quic=r.block_quic,
            gateway_interfaces=r.gateway_interfaces,
            max_connections_per_user=r.max_connections_per_user,
        )

    def _enable_gateway(self) -> None:
        """route_localnet on the gateway interfaces, now and whenever one (re)appears."""
        if not self.localnet.interfaces:
            return
        _, missing = self.localnet.enable()
        if missing:
            log.warning("gateway interface %s not found: tapped once it appears", ", ".join(missing))
        threading.Thread(target=self._keep_gateway, daemon=True).start()

    def _keep_gateway(self) -> None:
        while not self.stop.wait(GATEWAY_CHECK_S):
            try:
                if changed := self.localnet.enable()[0]:
                    log.info("gateway interface %s: route_localnet set", ", ".join(changed))
            except (OSError, LlmtapError) as exc:
                log.warning("gateway interfaces: %s", exc)

    def _undo_leftovers(self, backend_cls: type[RedirectBackend]) -> None:
        """What the guardian runs when the supervisor died without cleaning up."""
        if not backend_cls.dies_with_owner:
            backend_cls.cleanup_leftovers()
        gateway.restore(self.localnet.record)

    def _start_worker(self, spawner: WorkerSpawner) -> None:
        """A new worker, listening, with a thread reading its reports."""
        worker = spawner.spawn()
        self.worker = worker
        readable, _, _ = select.select([worker.events], [], [], READY_TIMEOUT_S)
        event = worker.next_event() if readable else None
        if not event or event.get("event") != "ready":
            raise RuntimeFailure("the proxy worker did not start (its reason is printed above)")
        self.listening = list(event.get("listening", []))
        self.worker_pid = worker.pid
        threading.Thread(target=self._read_reports, args=(worker,), daemon=True).start()

    def _install_redirect(self, backend_cls: type[RedirectBackend]) -> None:
        assert self.plan is not None
        with self.redirect_lock:
            backend = backend_cls(self.plan)
            backend.install(self.addresses)
            self.backend = backend

    def _lift_redirect(self) -> None:
        """Traffic goes direct until the redirect is back (a placeholder then fails safely)."""
        with self.redirect_lock:
            backend, self.backend = self.backend, None
            if backend is not None:
                backend.remove()

    def _install_signal_handlers(self) -> None:
        def request_stop(signum: int, _frame: FrameType | None) -> None:
            self.exit_reason = signal.Signals(signum).name
            self.stop.set()
            self.wake.set()

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, request_stop)

    def _watch(self, spawner: WorkerSpawner, backend_cls: type[RedirectBackend]) -> int:
        """Watches the worker (exit, or silence past HEARTBEAT_TIMEOUT_S) and the redirect;
        heals either, and ends (exit 1) only when healing keeps failing."""
        cap = ConnectionCapWatch(self.config.redirect.max_connections_per_user)
        while not self.stop.is_set():
            self.wake.wait(WATCH_INTERVAL_S)  # or sooner: a worker's reports ended
            self.wake.clear()
            if self.stop.is_set():
                break
            cap.check(self.backend)
            if self.worker is not None and self.worker.ended:
                self._lift_redirect()  # dead: until the redirect goes, connections are refused
            trouble = self._worker_trouble()
            redirect_lost = self.backend is not None and not self.backend.alive()
            if not trouble and not redirect_lost:
                continue
            reason = trouble or f"the redirect rules were lost (the {backend_cls.name} helper exited)"
            try:
                self.healer.heal(reason, functools.partial(self._restore, spawner, backend_cls,
                                                           bool(trouble)))
            except RuntimeFailure as exc:
                log.error("%s; giving up", exc)
                return 1
        log.info("stopping (%s); removing the redirect", self.exit_reason or "requested")
        return 0

    def _worker_trouble(self) -> str | None:
        worker = self.worker
        if worker is None:
            return None
        if worker.ended or worker.exited() is not None:
            status = worker.wait_status(REAP_WAIT_S)
            return f"the proxy worker exited ({_describe(status) if status is not None else 'no status'})"
        if worker.silent_for() > HEARTBEAT_TIMEOUT_S:
            return f"the proxy worker stopped answering for {worker.silent_for():.1f} s"
        return None

    def _restore(self, spawner: WorkerSpawner, backend_cls: type[RedirectBackend],
                 new_worker: bool) -> None:
        """One attempt at healing: the worker (if it is the trouble) killed, the redirect lifted,
        a new worker, the redirect back once it listens.

        The old worker dies before the redirect goes: the resets of its clients' connections must
        still pass the NAT that made them (without a NAT chain the kernel translates nothing), or
        those clients wait for their own timeouts instead of retrying at once, direct.
        """
        worker = self.worker if new_worker else None
        if worker is not None and not worker.ended:
            worker.stop(kill=True)  # SIGKILL: a stopped (SIGSTOP) process takes it too
        self._lift_redirect()
        if worker is not None:
            worker.stop(kill=True)  # reaped, and our ends of its pipes closed
            self._start_worker(spawner)
        self._install_redirect(backend_cls)

    def _read_reports(self, worker: WorkerHandle) -> None:
        with worker.events:
            while (event := worker.next_event()) is not None:
                if event.get("event") == "counters":
                    self.counters = event.get("counters", {})
                    self.metrics.update_counters(self.counters, worker.pid)
                elif event.get("event") == "live":
                    self.hub.publish(event.get("events", []))
                    alerts.deliver(event.get("events", []), self.config.budgets.webhook)
                    self.metrics.observe(event.get("events", []))
        worker.ended = True  # it exited: every moment the redirect still points at it is refusals
        self.wake.set()

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

    def _serve_metrics(self) -> MetricsServer | None:
        """[metrics] listen: before the redirect goes in, so a port in use stops the start."""
        settings = self.config.metrics
        if settings.address is None:
            return None
        server = MetricsServer(settings.address, lambda: self.metrics.render(self.metrics_state),
                               self.health, settings.bearer_token)
        log.info("metrics on http://%s/metrics", settings.listen)
        return server

    def intercepting(self) -> bool:
        worker = self.worker
        return bool(self.backend and self.backend.alive() and worker is not None
                    and not worker.ended and worker.silent_for() <= HEARTBEAT_TIMEOUT_S)

    def metrics_state(self) -> dict[str, Any]:
        healer = self.healer.status()
        return {"intercepting": self.intercepting(), "healing": healer["healing"],
                "restarts": healer["restarts"], "active": len(self.hub.active),
                "started": self.started_at.timestamp()}

    def health(self) -> dict[str, Any]:
        """/health: 200 only while intercepting; otherwise why not."""
        up = self.intercepting()
        status = "intercepting" if up else "healing" if self.healer.healing else (
            "stopping" if self.stop.is_set() else "starting" if self.backend is None else "down")
        return {"status": status, "backend": self.backend.name if self.backend else None,
                "worker_pid": self.worker_pid, "proxy_listening": self.listening,
                **self.healer.status()}

    def _write_pidfile(self) -> None:
        (self.config.run_dir / "llmtap.pid").write_text(f"{os.getpid()}\n")

    def _handle(self, message: dict[str, Any]) -> dict[str, Any]:
        if message.get("cmd") == "status":
            return self.status()
        return {"error": f"unknown command {message.get('cmd')!r}"}

    def status(self) -> dict[str, Any]:
        r = self.config.redirect
        return {
            "running": True,
            "pid": os.getpid(),
            "worker_pid": self.worker_pid,
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


def raise_descriptor_limit(per_user: int) -> None:
    """The soft limit up to the hard one (the unit sets LimitNOFILE): each intercepted connection
    holds two descriptors in the worker, which inherits this limit."""
    import resource  # here: POSIX only, and the Windows runner imports this module

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    connections = resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 2
    if per_user and connections < per_user:
        log.warning("only about %d connections fit in this process's descriptor limit, fewer than "
                    "redirect.max_connections_per_user (%d): raise LimitNOFILE", connections, per_user)


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


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit code {os.waitstatus_to_exitcode(status)}"


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="llmtap: %(message)s", stream=sys.stderr)


def run(config: Config, bare: bool = False) -> int:
    configure_logging()
    return Supervisor(config, bare).run()


def offline_status(config: Config) -> dict[str, Any]:
    """What `status` can tell without a daemon: which rules (leftovers) are on the machine."""
    present = redirect.rules_present()
    return {
        "running": False,
        "rules_present": any(present.values()),
        "rules_by_backend": present,
        "ca_cert": str(ca.public_cert_path(config.ca_dir)),
        "records_dir": str(config.records_dir),
        "control_socket": str(config.control_socket),
    }

