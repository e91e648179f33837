"""HTTP/2 clients and upstream reuse (llmtap.upstream_pool): a client offering h2 speaks HTTP/2
with the proxy, and its requests go upstream over HTTP/1.1 connections shared with every other
client, one after another stream of its own too; a client offering h2 without http/1.1 (gRPC) gets
its server's HTTP/2 and never a pooled connection.

Attacks: a stream the client resets halfway must not leave the rest of its response on a
connection another request (or client) then reads; a body sent without a length (HTTP/2 needs
none) must not reach an HTTP/1.1 upstream as a request of its own (smuggling), nor a large one be
cut; an HTTP/2 request naming another host than its TLS did gets no key.
"""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
from test_credentials_e2e import real_key, set_secret
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

# A raw HTTP/2 client: its ALPN offers (argv 3, comma-separated), then the requests of argv 4 (a
# JSON list of [path, reset_after_bytes or 0]) one after another on one connection. Prints, per
# request, what came back (a reset one: what came before the reset).
RAW_H2 = """
    import json, socket, ssl, sys
    import h2.config, h2.connection, h2.errors, h2.events
    host, cacert, offers, plan = sys.argv[1], sys.argv[2], sys.argv[3].split(","), json.loads(sys.argv[4])
    context = ssl.create_default_context(cafile=cacert)
    context.set_alpn_protocols(offers)
    sock = context.wrap_socket(socket.create_connection((host, 443), timeout=20), server_hostname=host)
    assert sock.selected_alpn_protocol() == "h2", sock.selected_alpn_protocol()
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    results = []
    for number, (path, reset_after) in enumerate(plan):
        stream_id = 1 + 2 * number
        conn.send_headers(stream_id, [(":method", "GET"), (":path", path), (":authority", host),
                                      (":scheme", "https")], end_stream=True)
        sock.sendall(conn.data_to_send())
        body, done = b"", False
        while not done:
            for event in conn.receive_data(sock.recv(65536)):
                if isinstance(event, h2.events.DataReceived) and event.stream_id == stream_id:
                    body += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, stream_id)
                done = done or (isinstance(event, h2.events.StreamEnded) and event.stream_id == stream_id)
            if reset_after and len(body) >= reset_after and not done:
                conn.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
                done = True
            sock.sendall(conn.data_to_send())
        results.append(body.decode(errors="replace"))
    sock.close()
    print(json.dumps(results))
"""
# A raw HTTP/2 POST whose body (argv 3, or argv 4 bytes of "a") is sent without content-length,
# in DATA frames of at most 16 KB; prints the response body.
H2_POST = """
    import socket, ssl, sys
    import h2.config, h2.connection, h2.events
    host, cacert, text, size = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    body = text.encode() if text else b"a" * size
    context = ssl.create_default_context(cafile=cacert)
    context.set_alpn_protocols(["h2", "http/1.1"])
    sock = context.wrap_socket(socket.create_connection((host, 443), timeout=30), server_hostname=host)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    conn.send_headers(1, [(":method", "POST"), (":path", "/v1/upload"), (":authority", host),
                          (":scheme", "https"), ("content-type", "text/plain")])
    sent, got, done, ended = 0, b"", False, False
    while not done:
        while sent < len(body) and conn.local_flow_control_window(1) > 0:
            piece = body[sent:sent + min(16384, conn.local_flow_control_window(1))]
            conn.send_data(1, piece)
            sent += len(piece)
        if sent == len(body) and not ended:
            conn.end_stream(1)
            ended = True
        sock.sendall(conn.data_to_send())
        for event in conn.receive_data(sock.recv(65536)):
            if isinstance(event, h2.events.DataReceived):
                got += event.data
                conn.acknowledge_received_data(event.flow_controlled_length, 1)
            done = done or isinstance(event, h2.events.StreamEnded)
        sock.sendall(conn.data_to_send())
    print(got.decode())
"""
SLOW_STREAM = "/llmtap-test/echo-headers?stream=1&pause=0.3"  # awkward chunks, for seconds


def raw_h2(testbed, daemon, offers: str, plan: list[tuple[str, int]]) -> list[str]:  # type: ignore[no-untyped-def]
    out = testbed.client(sys.executable, "-c", textwrap.dedent(RAW_H2), ANTHROPIC_HOST,
                         str(daemon.ca_pem), offers, json.dumps(plan))
    return json.loads(out.stdout)


def test_h2_clients_speak_http2_with_the_proxy_and_share_the_pooled_connection(testbed, daemon_with):  # noqa: F811
    daemon = daemon_with()
    fresh_client(testbed, daemon)  # an HTTP/1.1 client: its upstream connection is pooled
    assert wait_for(lambda: upstream_connections(testbed) == 1)
    httpx_h2 = testbed.client(sys.executable, "-c", textwrap.dedent(HTTPX_H2), ECHO, str(daemon.ca_pem))
    assert httpx_h2.stdout.strip() == "HTTP/2"
    curl_h2 = testbed.curl(ECHO, daemon.ca_pem, "--http2", "-o", "/dev/null", "-w", "%{http_version}")
    assert curl_h2.stdout == "2"
    # Three requests on one HTTP/2 connection, one after another: one upstream connection still.
    assert all('"headers"' in body for body in raw_h2(testbed, daemon, "h2,http/1.1", [
        ("/llmtap-test/echo-headers", 0)] * 3))
    fresh_client(testbed, daemon)
    requests = testbed.upstream_requests()
    assert [r["http_version"] for r in requests] == ["1.1"] * 7
    assert len({r["client"][1] for r in requests}) == 1, requests  # all on one upstream connection
    assert requests[1]["headers"]["host"] == ANTHROPIC_HOST  # :authority became Host
    assert wait_for(lambda: upstream_connections(testbed) == 1)


def test_an_h2_only_client_gets_http2_upstream_and_leaves_the_pool_alone(testbed, daemon_with):  # noqa: F811
    daemon = daemon_with()
    fresh_client(testbed, daemon)
    [body] = raw_h2(testbed, daemon, "h2", [("/llmtap-test/echo-headers", 0)])
    assert '"headers"' in body
    fresh_client(testbed, daemon)
    requests = testbed.upstream_requests()
    assert [r["http_version"] for r in requests] == ["1.1", "2", "1.1"]
    ports = [r["client"][1] for r in requests]
    assert ports[0] == ports[2] != ports[1], ports


def test_a_stream_reset_halfway_leaves_nothing_for_the_next_request(testbed, daemon_with):  # noqa: F811
    """The reset stream's HTTP/1.1 connection still has its response coming: it must be closed,
    never read by the same client's next stream nor pooled for another client."""
    daemon = daemon_with()
    fresh_client(testbed, daemon)  # one pooled connection, which the reset stream takes
    plan = [(SLOW_STREAM, 8), ("/llmtap-test/echo-headers", 0)]
    reset, after = raw_h2(testbed, daemon, "h2,http/1.1", plan)
    assert reset.startswith("data: ") and "event: done" not in reset
    assert json.loads(after)["headers"]["host"] == ANTHROPIC_HOST  # its own response, whole
    assert json.loads(fresh_client(testbed, daemon))["headers"]["host"] == ANTHROPIC_HOST
    requests = testbed.upstream_requests()
    ports = [r["client"][1] for r in requests]
    # The reset stream took the pooled connection; nothing after it ever used that one again.
    assert ports[1] == ports[0] and ports[0] not in ports[2:], ports


def test_an_h2_request_naming_another_host_than_its_tls_gets_no_key(testbed, daemon_with):  # noqa: F811
    daemon = daemon_with()
    key = real_key("sk-proj-")
    placeholder = set_secret(daemon, "openai", key, "--host", "api.openai.com")
    fresh_client(testbed, daemon)  # the pool holds a connection verified for api.anthropic.com
    start = len(testbed.upstream_requests())
    out = testbed.curl(ECHO, daemon.ca_pem, "--http2", "-H", "Host: api.openai.com",
                       "-H", f"authorization: Bearer {placeholder}", "-w", "\n%{http_code} %{http_version}")
    body, status = out.stdout.rsplit("\n", 1)
    assert status == "403 2", out.stdout
    assert "llmtap_credential_blocked" in body
    assert testbed.upstream_requests()[start:] == []


def h2_post(testbed, daemon, text: str = "", size: int = 0) -> str:  # type: ignore[no-untyped-def]
    return testbed.client(sys.executable, "-c", textwrap.dedent(H2_POST), ANTHROPIC_HOST,
                          str(daemon.ca_pem), text, str(size)).stdout


SMUGGLED = (f"GET /llmtap-test/smuggled HTTP/1.1\r\nHost: {ANTHROPIC_HOST}\r\n"
            "Content-Length: 400\r\n\r\n")  # would swallow the next client's request, key and all


def test_a_body_without_a_length_never_reaches_the_upstream_as_a_request(testbed, daemon_with):  # noqa: F811
    daemon = daemon_with()
    fresh_client(testbed, daemon)  # the pool holds a connection: the POST takes it, then gives it back
    answer = json.loads(h2_post(testbed, daemon, text=SMUGGLED))
    assert answer["path"] == "/v1/upload"
    fresh_client(testbed, daemon)  # after it, on the connection it gave back
    requests = testbed.upstream_requests()
    assert [r["path"] for r in requests] == ["/llmtap-test/echo-headers", "/v1/upload",
                                             "/llmtap-test/echo-headers"], requests
    assert requests[1]["body"] == SMUGGLED  # the body, whole, as a body
    assert requests[1]["headers"]["content-length"] == str(len(SMUGGLED))


def test_a_large_body_without_a_length_is_streamed_upstream_whole(testbed, daemon_with):  # noqa: F811
    """Past 4 MB mitmproxy streams a body (its headers gone before the body is known): chunked."""
    daemon = daemon_with()
    size = 5 * 1024 * 1024
    assert json.loads(h2_post(testbed, daemon, size=size))["path"] == "/v1/upload"
    [upload] = [r for r in testbed.upstream_requests() if r["path"] == "/v1/upload"]
    assert len(upload["body"]) == size and upload["headers"]["transfer-encoding"] == "chunked"
