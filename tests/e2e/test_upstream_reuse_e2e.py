"""Upstream connection reuse end to end (llmtap.upstream_pool): fresh clients, one after the
other, share one verified upstream TLS connection; the pool is bounded, idle connections close,
an upstream whose certificate fails is never pooled, and credentials stay per request.

The fake upstream logs each request with its peer (address, port): one port is one TCP (and TLS)
connection. `ss` in the client namespace shows the worker's open upstream connections.
"""

from __future__ import annotations

import json
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import pytest
from test_credentials_e2e import assert_no_real_key_anywhere, real_key, sent_key, set_secret
from test_key_theft_e2e import ANTHROPIC_HOST, curl, sniffer  # noqa: F401 - the sniffer fixture
from testbed import Daemon, Testbed, running_daemon, wait_for

pytestmark = pytest.mark.root

ECHO = f"https://{ANTHROPIC_HOST}/llmtap-test/echo-headers"


@pytest.fixture
def daemon_with(testbed: Testbed) -> Iterator[Any]:
    """daemon_with(**upstream): a ready daemon whose [upstream] has these keys (e.g. pool_idle_s)."""
    stack: list[Any] = []

    def start(scope: str = "targets", **upstream: Any) -> Daemon:
        context = running_daemon(testbed, upstream=upstream, scope=scope)
        stack.append(context)
        return context.__enter__()

    testbed.upstream_log.write_text("")
    try:
        yield start
    finally:
        for context in reversed(stack):
            context.__exit__(None, None, None)


def fresh_client(testbed: Testbed, daemon: Daemon, url: str = ECHO, *headers: str) -> str:
    """One request from a new curl process over a new HTTP/1.1 connection, like an SDK script."""
    extra = [arg for header in headers for arg in ("-H", header)]
    return testbed.client("curl", "-sS", "--http1.1", "--max-time", "15", "--cacert",
                          str(daemon.ca_pem), *extra, url).stdout


def upstream_ports(testbed: Testbed) -> list[int]:
    return [request["client"][1] for request in testbed.upstream_requests()]


def upstream_connections(testbed: Testbed, address: str = "") -> int:
    """Established TCP connections from the client namespace to port 443 (of `address`)."""
    where = f"dst {address}:443" if address else "( dport = :443 )"
    out = testbed.ns_exec(testbed.client_ns, "ss", "-Htn", "state", "established", where).stdout
    return len([line for line in out.splitlines() if line.strip()])


def test_fresh_clients_one_after_another_share_one_upstream_connection(testbed, daemon_with):
    daemon = daemon_with()
    for _ in range(3):
        assert json.loads(fresh_client(testbed, daemon))["headers"]["host"] == ANTHROPIC_HOST
    ports = upstream_ports(testbed)
    assert len(ports) == 3 and len(set(ports)) == 1, ports
    assert wait_for(lambda: upstream_connections(testbed) == 1)
    # `llmtap status` (and /metrics) count them: two requests took the one kept connection
    assert wait_for(lambda: {k: v for k, v in daemon.status()["counters"].items() if "upstream" in k}
                    == {"upstream_reused": 2, "upstream_kept": 3, "upstream_idle": 1}), daemon.status()


def test_a_connection_idle_past_the_limit_is_closed(testbed, daemon_with):
    daemon = daemon_with(pool_idle_s=1)
    fresh_client(testbed, daemon)
    assert upstream_connections(testbed) == 1
    assert wait_for(lambda: upstream_connections(testbed) == 0, timeout=5)
    fresh_client(testbed, daemon)
    first, second = upstream_ports(testbed)
    assert first != second  # a new connection: the idle one was closed, not kept


PARALLEL = """
    import sys, threading, httpx
    url, cacert, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    def one():  # its own client: its own connection, held for the whole stream
        with httpx.Client(verify=cacert) as client:
            with client.stream("POST", url, json={"model": "m", "stream": True}) as response:
                for _ in response.iter_lines():
                    pass
    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads: t.start()
    for t in threads: t.join()
"""


def test_the_pool_keeps_at_most_per_host_connections(testbed, daemon_with):
    daemon = daemon_with(pool_per_host=2)
    stream = f"https://{ANTHROPIC_HOST}/v1/messages?bench=stream&n=10&gap_ms=100"
    testbed.client(sys.executable, "-c", textwrap.dedent(PARALLEL), stream, str(daemon.ca_pem), "4",
                   timeout=60)
    assert wait_for(lambda: upstream_connections(testbed) == 2), upstream_connections(testbed)
    for _ in range(2):
        fresh_client(testbed, daemon)
    assert upstream_connections(testbed) == 2  # both taken from the pool and given back


def test_an_upstream_with_a_bad_certificate_is_never_pooled_nor_given_the_key(testbed, daemon_with, sniffer):  # noqa: F811
    spy = sniffer(tls=True)
    daemon = daemon_with(scope="all")
    key = real_key("sk-ant-api03-")
    placeholder = set_secret(daemon, "anthropic", key, "--host", ANTHROPIC_HOST, "--header", "x-api-key")
    fresh_client(testbed, daemon, ECHO, f"x-api-key: {placeholder}")  # a good connection, pooled
    assert sent_key(testbed.upstream_requests()[0]) == key
    for _ in range(2):  # the same name at the impostor's address: refused each time
        status, body = curl(testbed, ECHO, "--http1.1", "--cacert", str(daemon.ca_pem), "--resolve",
                            f"{ANTHROPIC_HOST}:443:{spy.address}", "-H", f"x-api-key: {placeholder}")
        assert status == 502, body
    assert key.encode() not in spy.received() and b"x-api-key" not in spy.received()
    assert upstream_connections(testbed, spy.address) == 0
    fresh_client(testbed, daemon, ECHO, f"x-api-key: {placeholder}")  # the good one, still pooled
    ports = upstream_ports(testbed)
    assert len(ports) == 2 and ports[0] == ports[1], ports
    assert_no_real_key_anywhere(daemon, key)


def test_clients_with_different_placeholders_get_their_own_keys_on_one_connection(testbed, daemon_with):
    daemon = daemon_with()
    keys = {name: real_key("sk-ant-api03-") for name in ("alice", "bob")}
    placeholders = {name: set_secret(daemon, name, key, "--host", ANTHROPIC_HOST, "--header", "x-api-key")
                    for name, key in keys.items()}
    order = ["alice", "bob", "alice", "bob"]
    for name in order:
        echoed = json.loads(fresh_client(testbed, daemon, ECHO, f"x-api-key: {placeholders[name]}"))
        assert echoed["headers"]["x-api-key"] == placeholders[name]  # the echo is scrubbed back
    requests = testbed.upstream_requests()
    assert [sent_key(r) for r in requests] == [keys[name] for name in order]
    assert len({r["client"][1] for r in requests}) == 1  # all on one upstream connection
    assert_no_real_key_anywhere(daemon, *keys.values())


STREAM = """
    import json, sys, time, httpx
    url, cacert = sys.argv[1], sys.argv[2]
    delays = []
    with httpx.Client(verify=cacert) as client:
        with client.stream("POST", url, json={"model": "m", "stream": True}) as response:
            for line in response.iter_lines():
                if line.startswith("data: ") and "text_delta" in line:
                    sent = float(json.loads(line[6:])["delta"]["text"])
                    delays.append(time.time() - sent)
    print(json.dumps(delays))
"""


def test_a_stream_on_a_kept_connection_is_relayed_as_it_arrives(testbed, daemon_with):
    daemon = daemon_with()
    fresh_client(testbed, daemon)
    assert upstream_connections(testbed) == 1
    url = f"https://{ANTHROPIC_HOST}/v1/messages?bench=stream&n=5&gap_ms=400"
    out = testbed.client(sys.executable, "-c", textwrap.dedent(STREAM), url, str(daemon.ca_pem), timeout=30)
    delays = json.loads(out.stdout)
    assert len(delays) == 5
    # Each chunk reaches the client long before the next is sent (400 ms later): nothing is held.
    assert max(delays) < 0.3, delays
    assert upstream_connections(testbed) == 1  # the stream went over the kept connection
