"""ALPN with upstream reuse (lazy connection strategy): a client offering HTTP/2 speaks it with
the proxy, whatever its order of preference, over HTTP/1.1 upstream connections that can be
pooled; a client offering h2 without http/1.1 (gRPC) has its server connection made during its
handshake and mirrors its server's HTTP/2."""

from __future__ import annotations

import pytest
from llmtap.addons.scope import Scope
from llmtap.proxy import NameOnlyTlsConfig
from llmtap.upstream_pool import UpstreamPool, UpstreamReuse
from mitmproxy import tls
from mitmproxy.addons import proxyserver
from mitmproxy.proxy import context, mode_specs
from mitmproxy.test import taddons, tflow

HTTPX_H2 = [b"http/1.1", b"h2"]  # httpx with http2=True, in its order


def hello(offers: list[bytes], sni: str = "api.openai.com") -> tls.ClientHelloData:
    client = tflow.tclient_conn()
    client.sni, client.alpn, client.alpn_offers = sni, None, offers
    client.proxy_mode = mode_specs.ProxyMode.parse("transparent")
    server = tflow.tserver_conn()
    server.tls = True
    conn_context = context.Context(client, None)  # type: ignore[arg-type]
    conn_context.server = server
    return tls.ClientHelloData(conn_context, None)  # type: ignore[arg-type]


def server_first(data: tls.ClientHelloData, strategy: str = "lazy", http2: bool = True) -> bool:
    scope = Scope()
    with taddons.context(scope, proxyserver.Proxyserver()) as tctx:
        tctx.configure(scope, llmtap_targets=["api.openai.com"])
        tctx.options.update(connection_strategy=strategy, http2=http2)
        NameOnlyTlsConfig().tls_clienthello(data)
    return data.establish_server_tls_first


@pytest.mark.parametrize("offers", [[b"h2"], [b"grpc-exp", b"h2"]])
def test_a_client_offering_only_h2_has_its_server_connection_first(offers):
    assert server_first(hello(offers)) is True


@pytest.mark.parametrize("offers", [HTTPX_H2, [b"h2", b"http/1.1"], [b"http/1.1"], [], [b"spdy/3"]])
def test_a_client_that_can_be_served_over_http1_stays_lazy_for_the_pool(offers):
    assert server_first(hello(offers)) is False


def alpn_choices(offers: list[bytes], http2: bool = True) -> tuple[bytes | None, list[bytes]]:
    """(the ALPN the client is answered with, the offers upstream) as upstream reuse sets them."""
    data = hello(offers)
    reuse = UpstreamReuse(UpstreamPool())
    with taddons.context(reuse) as tctx:
        tctx.options.update(http2=http2)
        conn_context = data.context
        reuse.tls_start_client(tls.TlsData(conn_context.client, conn_context))
        reuse.tls_start_server(tls.TlsData(conn_context.server, conn_context))
    return conn_context.client.alpn, list(conn_context.server.alpn_offers)


@pytest.mark.parametrize("offers", [HTTPX_H2, [b"h2", b"http/1.1"]])
def test_an_h2_client_speaks_http2_with_the_proxy_and_http1_upstream(offers):
    assert alpn_choices(offers) == (b"h2", [b"http/1.1"])


@pytest.mark.parametrize("offers", [[b"h2"], [b"http/1.1"], []])
def test_other_clients_are_left_to_mitmproxy(offers):
    """h2 only: mirrored (its server connection comes first); the rest offer no h2 upstream."""
    assert alpn_choices(offers) == (None, [])


def test_without_http2_no_client_is_given_it():
    assert alpn_choices(HTTPX_H2, http2=False) == (None, [b"http/1.1"])  # mitmproxy's offers too


def test_without_http2_nobody_needs_the_server_first():
    assert server_first(hello(HTTPX_H2), http2=False) is False


def test_a_refused_client_gets_no_server_connection_even_offering_h2():
    assert server_first(hello(HTTPX_H2, sni="evil.example")) is False


def test_eager_is_unchanged():
    assert server_first(hello([b"http/1.1"]), strategy="eager") is True
