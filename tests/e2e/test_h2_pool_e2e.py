"""HTTP/2 clients next to upstream reuse: a client offering h2 gets HTTP/2 end to end, as its
server chose, even while the pool holds an idle HTTP/1.1 connection to the same host; the pooled
connection is left for the HTTP/1.1 clients that follow.

Regression: with the lazy connection strategy of the pool, mitmproxy picked the client's first
ALPN (httpx lists http/1.1 before h2), and an h2-offering client could adopt a pooled HTTP/1.1
connection, whose ALPN it then mirrored.
"""

from __future__ import annotations

import sys
import textwrap

import pytest
from test_key_theft_e2e import ANTHROPIC_HOST
from test_upstream_reuse_e2e import (  # noqa: F401 - daemon_with is a fixture
    ECHO,
    daemon_with,
    fresh_client,
    upstream_connections,
)
from testbed import wait_for

pytestmark = pytest.mark.root

HTTPX_H2 = """
    import httpx, sys
    with httpx.Client(http2=True, verify=sys.argv[2]) as client:  # offers http/1.1, then h2
        print(client.get(sys.argv[1]).http_version)
"""


def test_h2_clients_get_http2_while_the_pool_holds_an_http1_connection(testbed, daemon_with):  # noqa: F811
    daemon = daemon_with()
    fresh_client(testbed, daemon)  # an HTTP/1.1 client: its upstream connection is pooled
    assert wait_for(lambda: upstream_connections(testbed) == 1)
    httpx_h2 = testbed.client(sys.executable, "-c", textwrap.dedent(HTTPX_H2), ECHO, str(daemon.ca_pem))
    assert httpx_h2.stdout.strip() == "HTTP/2"
    curl_h2 = testbed.curl(ECHO, daemon.ca_pem, "--http2", "-o", "/dev/null", "-w", "%{http_version}")
    assert curl_h2.stdout == "2"
    fresh_client(testbed, daemon)  # the HTTP/1.1 clients still share the pooled connection
    requests = testbed.upstream_requests()
    assert [r["http_version"] for r in requests] == ["1.1", "2", "2", "1.1"]
    ports = [r["client"][1] for r in requests]
    assert ports[0] == ports[3] and len(set(ports)) == 3, ports
    assert requests[0]["headers"]["host"] == ANTHROPIC_HOST
