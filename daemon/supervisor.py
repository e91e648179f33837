"""`llmtap run` on POSIX: the lifecycle (llmtap.lifecycle) as root, the proxy in a forked worker.

The supervisor is the only root process; it owns the rules, and it makes sure they are gone
whatever way it ends (see the RedirectBackend notes on `dies_with_owner`). Around the redirect it
serves the control socket and /metrics, and for what the kernel does not undo by itself it leaves
a guardian process.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable
from typing import Any

from llmtap import ca, control, redirect
from llmtap.config import Config
from llmtap.errors import LlmtapError, RuntimeFailure, UsageError
from llmtap.forked_host import ForkedWorkerHost
from llmtap.lifecycle import Lifecycle, configure_logging
from llmtap.metrics_server import MetricsServer
from llmtap.platform.base import RedirectBackend, RedirectPlan
from llmtap.platform.linux import gateway
from llmtap.privileges import ServiceUser, ensure_service_user, require_root
from llmtap.proxy import LOOPBACK_HOSTS, ProxySettings
from llmtap.secret_references import resolve_at_start

log = logging.getLogger("llmtap")

GATEWAY_CHECK_S = 5.0  # how soon a gateway interface created after the start is tapped


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


class Supervisor(Lifecycle):
    """The lifecycle as root on POSIX: the proxy in a forked, unprivileged worker; the control
    socket, /metrics and the guardian around the redirect."""

    def __init__(self, config: Config, bare: bool = False) -> None:
        self.workers = ForkedWorkerHost()
        super().__init__(config, bare, self.workers)
        self.localnet = gateway.RouteLocalnet(config.redirect.gateway_interfaces,
                                              gateway.record_path(config.run_dir))
        self.guardian_fd = -1
        self.control_server: control.ControlServer | None = None
        self.metrics_server: MetricsServer | None = None

    def prepare(self) -> tuple[type[RedirectBackend], ProxySettings]:
        config = self.config
        require_root("llmtap run")
        backend_cls = redirect.choose_backend(config.redirect.backend)
        hosts = listen_hosts(config.redirect.proxy_port, config.explicit.address)
        user = self.workers.user = ensure_service_user(config.service_user)
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
        return backend_cls, self.settings(bundle, hosts)

    def redirect_plan(self) -> RedirectPlan:
        r = self.config.redirect
        assert self.workers.user is not None
        return RedirectPlan(
            proxy_port=r.proxy_port,
            service_uid=self.workers.user.uid,
            ports=r.ports,
            scope=r.scope,
            block_quic=r.block_quic,
            gateway_interfaces=r.gateway_interfaces,
            max_connections_per_user=r.max_connections_per_user,
        )

    def before_redirect(self) -> None:
        """/metrics (a port in use stops the start), the guardian, the gateway interfaces."""
        assert self.backend_cls is not None
        self.metrics_server = self._serve_metrics()
        if not self.backend_cls.dies_with_owner or self.localnet.interfaces:
            self.guardian_fd = start_guardian(
                functools.partial(self._undo_leftovers, self.backend_cls))
        self._enable_gateway()

    def after_redirect(self) -> None:
        assert self.workers.user is not None
        self.control_server = control.ControlServer(
            self.config.control_socket, self.config.service_user, self.workers.user.gid,
            self._handle, streams={"subscribe": self.hub.serve},
        )

    def stop_services(self) -> None:
        gateway.restore(self.localnet.record)
        if self.guardian_fd >= 0:
            os.write(self.guardian_fd, b"done")
            os.close(self.guardian_fd)
            self.guardian_fd = -1
        if self.control_server is not None:
            self.control_server.close()
        if self.metrics_server is not None:
            self.metrics_server.close()

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

    def _serve_metrics(self) -> MetricsServer | None:
        """[metrics] listen: before the redirect goes in, so a port in use stops the start."""
        settings = self.config.metrics
        if settings.address is None:
            return None
        server = MetricsServer(settings.address, lambda: self.metrics.render(self.metrics_state),
                               self.health, settings.bearer_token)
        log.info("metrics on http://%s/metrics", settings.listen)
        return server

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
                "worker_pid": self.workers.pid, "proxy_listening": self.listening,
                **self.healer.status()}

    def _handle(self, message: dict[str, Any]) -> dict[str, Any]:
        if message.get("cmd") == "status":
            return self.status()
        return {"error": f"unknown command {message.get('cmd')!r}"}


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

