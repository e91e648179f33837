"""A client offering HTTP/2 has its server connection made during its handshake, even with the
lazy connection strategy of upstream reuse, so that it gets the ALPN its server chose (h2) and
not mitmproxy's pick from the client's list (http/1.1 for httpx, which lists it first)."""

from __future__ import annotations

import pytest
from llmtap.addons.scope import Scope
from llmtap.proxy import NameOnlyTlsConfig
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


@pytest.mark.parametrize("offers", [HTTPX_H2, [b"h2", b"http/1.1"], [b"h2"]])
def test_a_client_offering_h2_has_its_server_connection_first(offers):
    assert server_first(hello(offers)) is True


@pytest.mark.parametrize("offers", [[b"http/1.1"], [], [b"spdy/3"]])
def test_a_client_without_h2_stays_lazy_for_the_pool(offers):
    assert server_first(hello(offers)) is False


def test_without_http2_nobody_needs_the_server_first():
    assert server_first(hello(HTTPX_H2), http2=False) is False


def test_a_refused_client_gets_no_server_connection_even_offering_h2():
    assert server_first(hello(HTTPX_H2, sni="evil.example")) is False


def test_eager_is_unchanged():
    assert server_first(hello([b"http/1.1"]), strategy="eager") is True
