"""Embeds mitmproxy: transparent listeners on loopback, our TLS policy, and the pipeline."""

from __future__ import annotations

import asyncio
import inspect
import logging
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from llmtap import addons, hostpatterns
from llmtap.addons.scope import allow_patterns
from llmtap.early_replies import EarlyReplies
from llmtap.parsers.classify import normalise_host
from llmtap.platform.base import OriginalAddrLookup
from llmtap.upstream_http import needs_h2_upstream
from llmtap.upstream_pool import UpstreamPool, UpstreamReuse
from mitmproxy import addonmanager, certs, ctx, exceptions, hooks, http, master, options, tls
from mitmproxy.addons import core, disable_h2c, errorcheck, next_layer, proxyserver, tlsconfig
from mitmproxy.proxy import context, mode_specs
from mitmproxy.utils import human

log = logging.getLogger(__name__)
LOOPBACK_HOSTS = ("127.0.0.1", "::1")
# Bodies larger than this are streamed through instead of held in memory.
STREAM_LARGE_BODIES = "4m"


class NameOnlyTlsConfig(tlsconfig.TlsConfig):
    """Forged leaves only ever for a target's own name, carrying that name and nothing else.

    mitmproxy also adds the destination IP address; a CA name-constrained to the targets (with
    every IP excluded) makes clients reject such a leaf with "permitted subtree violation".
    A client whose TLS names no target, or (explicit proxy) names another host than its CONNECT
    did, gets no certificate at all: the handshake is refused with one log line.
    """

    def tls_clienthello(self, tls_clienthello: tls.ClientHelloData) -> None:
        super().tls_clienthello(tls_clienthello)
        if leaf_refusal(tls_clienthello.context):
            tls_clienthello.establish_server_tls_first = False  # nothing goes upstream either
        elif needs_h2_upstream(tls_clienthello.context.client):
            # A client speaking only HTTP/2 (gRPC) gets its server's HTTP/2 as with connection
            # strategy eager, and no pooled HTTP/1.1 connection (llmtap.upstream_pool).
            tls_clienthello.establish_server_tls_first = tls_clienthello.context.server.tls

    def tls_start_client(self, tls_start: tls.TlsData) -> None:
        reason = leaf_refusal(tls_start.context)
        if reason:  # no ssl_conn: mitmproxy closes the connection
            peer = human.format_address(tls_start.context.client.peername)
            log.warning("refused TLS from %s: %s; no certificate issued", peer, reason)
            return
        super().tls_start_client(tls_start)

    def get_cert(self, conn_context: context.Context) -> certs.CertStoreEntry:
        sni = conn_context.client.sni
        assert sni  # leaf_refusal turned away every connection without one
        return self.certstore.get_cert(sni, [x509.DNSName(sni)])


def leaf_refusal(conn_context: context.Context) -> str | None:
    """Why no leaf may be forged for this connection, or None."""
    client, server = conn_context.client, conn_context.server
    if not client.sni:
        return "the client sent no server name (SNI)"
    name = normalise_host(client.sni)
    targets = getattr(ctx.options, "llmtap_targets", None)  # absent in the bare benchmark proxy
    if targets is not None and not hostpatterns.host_set(tuple(targets)).matches(client.sni):
        return f"{client.sni!r} is not a target"
    if isinstance(client.proxy_mode, mode_specs.RegularMode) and server.address:
        connect_host = normalise_host(str(server.address[0]))
        if name != connect_host:
            return f"the TLS server name {client.sni!r} is not the CONNECT host {connect_host!r}"
    return None


class CachedHooks(addonmanager.AddonManager):
    """mitmproxy's AddonManager, with the handlers of each event looked up once per addon chain,
    and the response relayed before the stages that only account for it.

    Profiling the pipeline showed mitmproxy's generic dispatch (for every event and every addon:
    a tree walk, getattr, a context manager, the hook's arguments rebuilt) costing more per
    request than the pipeline's own work. Behaviour is mitmproxy's: handlers run in chain order,
    async ones are awaited, AddonHalt stops the event, any other error is logged as mitmproxy
    logs it and the next handler runs.

    One difference, by design: the `response` handlers of addons that declare
    `observes_response = True` (parsing, pricing, records, the live feed: they read the exchange
    and change nothing the client receives) run, in chain order, right after mitmproxy has sent
    the response on, instead of before. The client never waits for the accounting.
    """

    def __init__(self, owner: master.Master) -> None:
        super().__init__(owner)  # type: ignore[no-untyped-call]  # mitmproxy's, via super()
        self._handlers: dict[str, list[Callable[..., Any]]] = {}
        self._observers: dict[str, list[Callable[..., Any]]] = {}
        self._later: set[asyncio.Task[None]] = set()  # deferred observers, referenced until done

    @classmethod
    def replacing(cls, owner: master.Master) -> CachedHooks:
        """Takes the place of a new Master's own manager (before any addon is added)."""
        owner.options.changed.disconnect(owner.addons._configure_all)
        return cls(owner)

    def register(self, addon: Any) -> Any:
        self._forget()
        return super().register(addon)  # type: ignore[no-untyped-call]  # mitmproxy's, via super()

    def add(self, *addons: Any) -> None:
        super().add(*addons)  # type: ignore[no-untyped-call]  # mitmproxy's, via super()
        self._forget()

    def remove(self, addon: Any) -> None:
        super().remove(addon)  # type: ignore[no-untyped-call]  # mitmproxy's, via super()
        self._forget()

    def clear(self) -> None:
        super().clear()  # type: ignore[no-untyped-call]  # mitmproxy's, via super()
        self._forget()

    def _forget(self) -> None:
        self._handlers.clear()
        self._observers.clear()

    def handlers(self, event: hooks.Hook) -> list[Callable[..., Any]]:
        """What runs before the event's flow goes on: every handler but deferred observers."""
        found = self._handlers.get(event.name)
        if found is None:
            pairs = [pair for addon in self.chain for pair in self._iter_hooks(addon, event)]
            deferred = event.name == DEFERRED_EVENT
            found = [f for a, f in pairs if not (deferred and getattr(a, OBSERVER_FLAG, False))]
            self._observers[event.name] = [f for a, f in pairs if f not in found]
            self._handlers[event.name] = found
        return found

    async def trigger_event(self, event: hooks.Hook) -> None:
        if event.name == "done" and self._later:  # accounting still under way is finished first
            await asyncio.gather(*self._later, return_exceptions=True)
        handlers = self.handlers(event)
        observers = self._observers[event.name]
        if not handlers and not observers:
            return
        args = event.args()
        await self._run(handlers, args)
        if observers:  # after this task step, in which mitmproxy sends the response on
            asyncio.get_running_loop().call_soon(self._run_later, observers, args)

    def _run_later(self, observers: list[Callable[..., Any]], args: list[Any]) -> None:
        task = asyncio.get_running_loop().create_task(self._run(observers, args))
        self._later.add(task)
        task.add_done_callback(self._later.discard)

    @staticmethod
    async def _run(handlers: list[Callable[..., Any]], args: list[Any]) -> None:
        for func in handlers:
            try:
                result = func(*args)
                if result is not None and inspect.isawaitable(result):
                    await result
            except exceptions.AddonHalt:
                return
            except exceptions.OptionsError:
                raise
            except Exception as exc:  # as mitmproxy's safecall: one addon's bug stops nothing
                ADDON_LOG.error(f"Addon error: {exc}", exc_info=True)


DEFERRED_EVENT = "response"
OBSERVER_FLAG = "observes_response"  # an addon's class attribute: see CachedHooks
ADDON_LOG = logging.getLogger(addonmanager.__name__)  # where mitmproxy logs addon errors


class StreamEverything:
    """The bare proxy's only addon: relay every response as it arrives. Without it mitmproxy
    buffers whole responses, and a benchmark against that would flatter any streaming pipeline."""

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        assert flow.response
        flow.response.stream = True


@dataclass(frozen=True)
class ProxySettings:
    proxy_port: int
    confdir: Path  # the CA lives here as mitmproxy-ca.pem
    upstream_ca_bundle: Path  # system roots + upstream.extra_ca
    targets: tuple[str, ...]
    records_dir: Path | None
    state_dir: Path | None = None  # secrets, rules, price overrides: read by the addons
    config_file: Path | None = None  # addons with their own config section read it from here
    listen_hosts: tuple[str, ...] = LOOPBACK_HOSTS
    pipeline: bool = True  # False: the "bare mitmproxy" of the benchmarks
    # Where mitmproxy cannot find a connection's original destination itself unprivileged
    # (macOS): the worker asks the supervisor through this.
    original_addr: OriginalAddrLookup | None = None
    explicit_listen: tuple[str, int] | None = None  # (ip, port) of the regular HTTP/CONNECT proxy
    key_ports: tuple[int, ...] = (443,)  # the redirected ports: the only ones keys are added toward
    # The worker's end of the supervisor's process lookup (llmtap.proclookup), made before the fork.
    process_lookup: socket.socket | None = None
    idle_timeout_s: int = 600
    # Idle verified upstream connections kept for later clients, per (address, server name);
    # 0: none (llmtap.upstream_pool). The bare proxy never pools.
    upstream_pool_per_host: int = 4
    upstream_pool_idle_s: int = 30


def transparent_modes(port: int, hosts: Iterable[str]) -> list[str]:
    return [f"transparent@{host}:{port}" for host in hosts]


def proxy_modes(settings: ProxySettings) -> list[str]:
    """The transparent listeners, plus the explicit one: same Master, same addons, same pipeline.

    In regular mode a CONNECT to a non-target is relayed blind like any other non-target: the
    scope addon's allow_hosts is checked against the CONNECT host and the SNI before any TLS.
    """
    modes = transparent_modes(settings.proxy_port, settings.listen_hosts)
    if settings.explicit_listen:
        host, port = settings.explicit_listen
        modes.append(f"regular@{host}:{port}")  # mitmproxy takes IPv6 unbracketed: regular@::1:8890
    return modes


def upstream_reuse(settings: ProxySettings, with_pipeline: bool) -> list[UpstreamReuse]:
    if not with_pipeline or settings.upstream_pool_per_host < 1:
        return []
    return [UpstreamReuse(UpstreamPool(settings.upstream_pool_per_host, settings.upstream_pool_idle_s))]


def build_master(settings: ProxySettings, with_pipeline: bool = True,
                 stages: list[object] | None = None) -> master.Master:
    """A mitmproxy Master with only the addons llmtap needs. Call inside a running event loop.

    `stages`: the pipeline (llmtap.addons.pipeline), when the caller needs to hold its stages;
    otherwise one is built. Without the pipeline it is the "bare mitmproxy" of the benchmarks:
    same listeners and TLS.
    """
    opts = options.Options()
    proxy = master.Master(opts, with_termlog=False)
    if with_pipeline:  # the bare arm of the benchmarks stays stock mitmproxy
        proxy.addons = CachedHooks.replacing(proxy)
    proxy.addons.add(
        core.Core(),
        proxyserver.Proxyserver(),
        next_layer.NextLayer(),
        *upstream_reuse(settings, with_pipeline),  # before the TLS config: it hands over pooled TLS
        NameOnlyTlsConfig(),
        disable_h2c.DisableH2C(),
        errorcheck.ErrorCheck(repeat_errors_on_stderr=True),
    )
    if with_pipeline:
        if stages is None:
            stages = addons.pipeline(lookup=settings.process_lookup)
        proxy.addons.add(EarlyReplies(), *stages)
    else:
        proxy.addons.add(StreamEverything())
    opts.update(
        mode=proxy_modes(settings),
        confdir=str(settings.confdir),
        upstream_cert=False,
        ssl_insecure=False,
        ssl_verify_upstream_trusted_ca=str(settings.upstream_ca_bundle),
        stream_large_bodies=STREAM_LARGE_BODIES,
        tcp_timeout=settings.idle_timeout_s,  # a connection with no traffic either way is closed
    )
    if with_pipeline and settings.upstream_pool_per_host > 0:
        # Upstream connections are opened when a request needs one, when the server name is
        # known and a pooled connection for it can be taken; eager would connect at accept time,
        # before the ClientHello names the server (llmtap.upstream_pool). A client offering h2
        # still has its server connection made during its handshake (NameOnlyTlsConfig).
        opts.update(connection_strategy="lazy")
    if with_pipeline:
        # Deferred: each llmtap_* option is declared by the addon that owns it, in its load().
        opts.update_defer(
            llmtap_targets=list(settings.targets),
            llmtap_records_dir=str(settings.records_dir or ""),
            llmtap_state_dir=str(settings.state_dir or ""),
            llmtap_config_file=str(settings.config_file or ""),
            llmtap_key_ports=[str(port) for port in settings.key_ports],
        )
    else:
        opts.update(allow_hosts=allow_patterns(settings.targets))
    return proxy
