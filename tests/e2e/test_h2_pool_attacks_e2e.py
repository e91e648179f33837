"""Attacks on shared upstream connections, written by a red team against HTTP/2 clients going out
over pooled HTTP/1.1 (llmtap.upstream_pool), kept as tests. Each failed before its defence:

- `Expect: 100-continue, x` (mitmproxy lets it pass; the upstream answers 100 at once, mitmproxy
  reads that as the response): the connection went to the pool with the real response still to
  come, and the next client, its key in its request, got the attacker's answer. Defence: a 1xx
  taken for a response leaves its connection unpoolable, and a connection is pooled only after
  its response hook has seen that response.
- A GET with a 5 MB body and no length (mitmproxy streams it after its headers hook): the body
  reached the upstream as a request of its own, seen by no stage. Defence: every length-less
  HTTP/2 request is marked chunked at its headers, whatever its method.
- Request trailers, which mitmproxy's HTTP/1.1 client cannot send: it crashed. They are dropped.

The rest check legitimate HTTP/2 clients: concurrent streams, HEAD, cookies, a reset mid-body.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import pytest
from test_credentials_e2e import real_key, set_secret
from test_key_theft_e2e import ANTHROPIC_HOST
from test_upstream_reuse_e2e import (  # noqa: F401 - daemon_with is a fixture
    ECHO,
    daemon_with,
    fresh_client,
    upstream_connections,
)
from testbed import clean_env, wait_for

pytestmark = pytest.mark.root

# A raw HTTP/2 client. argv: host, cacert, plan (JSON). The plan's keys: offers (ALPN), timeout,
# requests (each: method, path, headers as pairs, body text, pad: that many "a" appended,
# trailers as pairs), sequential (bool), linger (seconds connected after).
# Streams are sent all at once (concurrent) unless sequential. Prints JSON: per stream
# {"status", "headers", "body", "ended", "reset", "error"}.
RAW = r"""
import json, socket, ssl, sys, time
import h2.config, h2.connection, h2.errors, h2.events
host, cacert, plan = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
context = ssl.create_default_context(cafile=cacert)
context.set_alpn_protocols(plan.get("offers", ["h2", "http/1.1"]))
sock = context.wrap_socket(socket.create_connection((host, 443), timeout=plan.get("timeout", 15)),
                           server_hostname=host)
assert sock.selected_alpn_protocol() == "h2", sock.selected_alpn_protocol()
conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, validate_outbound_headers=False,
                                                            normalize_outbound_headers=False))
conn.initiate_connection()
sock.sendall(conn.data_to_send())
results, pending = {}, {}
def start(number, req):
    sid = 1 + 2 * number
    body = req.get("body", "").encode() + b"a" * req.get("pad", 0)
    headers = [(":method", req.get("method", "GET")), (":path", req["path"]), (":authority", host),
               (":scheme", "https")] + [tuple(h) for h in req.get("headers", [])]
    no_body = not body and not req.get("trailers")
    conn.send_headers(sid, headers, end_stream=no_body)
    results[sid] = {"status": None, "headers": [], "body": "", "ended": False, "reset": None, "info": []}
    if not no_body:
        pending[sid] = [body, 0, req.get("trailers")]
    return sid
def pump():
    for sid, state in list(pending.items()):
        body, sent, trailers = state
        while sent < len(body):
            window = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
            if window <= 0:
                break
            piece = body[sent:sent + window]
            conn.send_data(sid, piece)
            sent += len(piece)
        state[1] = sent
        if sent == len(body):
            if trailers:
                conn.send_headers(sid, [tuple(t) for t in trailers], end_stream=True)
            else:
                conn.end_stream(sid)
            del pending[sid]
    sock.sendall(conn.data_to_send())
def receive():
    data = sock.recv(65536)
    if not data:
        raise EOFError("closed")
    for ev in conn.receive_data(data):
        sid = getattr(ev, "stream_id", None)
        r = results.get(sid)
        if isinstance(ev, h2.events.ResponseReceived):
            r["headers"] = [(k.decode(), v.decode()) for k, v in ev.headers]
            r["status"] = dict(r["headers"]).get(":status")
        elif isinstance(ev, h2.events.InformationalResponseReceived):
            r["info"].append(dict((k.decode(), v.decode()) for k, v in ev.headers).get(":status"))
        elif isinstance(ev, h2.events.DataReceived):
            r["body"] += ev.data.decode(errors="replace")
            conn.acknowledge_received_data(ev.flow_controlled_length, sid)
        elif isinstance(ev, h2.events.StreamEnded):
            r["ended"] = True
        elif isinstance(ev, h2.events.StreamReset):
            r["reset"] = ev.error_code
        elif isinstance(ev, h2.events.ConnectionTerminated):
            for r in results.values():
                r["reset"] = r["reset"] or "goaway"
    sock.sendall(conn.data_to_send())
def done(sid):
    return results[sid]["ended"] or results[sid]["reset"] is not None
error = None
try:
    if plan.get("sequential"):
        for n, req in enumerate(plan["requests"]):
            sid = start(n, req)
            while not done(sid):
                pump()
                receive()
    else:
        sids = [start(n, req) for n, req in enumerate(plan["requests"])]
        while not all(done(s) for s in sids):
            pump()
            receive()
except Exception as e:
    error = repr(e)
time.sleep(plan.get("linger", 0))
print(json.dumps({"error": error, "streams": [results[k] for k in sorted(results)]}))
"""


def h2(testbed, daemon, plan: dict, timeout: float = 60) -> dict:  # type: ignore[no-untyped-def]
    out = testbed.client(sys.executable, "-c", RAW, ANTHROPIC_HOST, str(daemon.ca_pem), json.dumps(plan),
                         timeout=timeout)
    return json.loads(out.stdout)


def h2_background(testbed, daemon, plan: dict) -> subprocess.Popen:  # type: ignore[no-untyped-def,type-arg]
    return subprocess.Popen(["ip", "netns", "exec", testbed.client_ns, sys.executable, "-c", RAW,
                             ANTHROPIC_HOST, str(daemon.ca_pem), json.dumps(plan)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=clean_env())


def paths(testbed) -> list[str]:  # type: ignore[no-untyped-def]
    return [r["path"] for r in testbed.upstream_requests()]


# ---------------------------------------------------------------------------------------------
# 1. An Expect: 100-continue that mitmproxy does not recognise (it pops only the exact value
#    "100-continue") but the upstream does: the upstream's "100 Continue" is read as the final
#    response, the h1 connection is "done" and goes to the pool while the real response is still
#    coming. The next client on that connection reads the attacker's response.
# ---------------------------------------------------------------------------------------------

SLOW = "600000000"  # x-fake-bomb: the fake upstream computes ~2 s before its real response


def test_expect_100_variant_desyncs_the_pool_h2(testbed, daemon_with):  # noqa: F811
    daemon = daemon_with()
    key = real_key("sk-ant-api03-")
    placeholder = set_secret(daemon, "anthropic", key, "--host", ANTHROPIC_HOST, "--header", "x-api-key")
    fresh_client(testbed, daemon)  # one pooled connection
    attacker = h2_background(testbed, daemon, {"timeout": 8, "requests": [{
        "method": "POST", "path": "/v1/attacker",
        "headers": [["content-type", "application/json"], ["expect", "100-continue, x"],
                    ["x-fake-bomb", SLOW]],
        "body": '{"model": "m"}'}]})
    time.sleep(0.7)  # the 100 came back at once; the real answer is still being made
    victim = fresh_client(testbed, daemon, ECHO, f"x-api-key: {placeholder}")
    out, err = attacker.communicate(timeout=30)
    print("ATTACKER:", out[:500], err[-2000:])
    print("VICTIM:", victim[:300])
    print("UPSTREAM:", [(r["path"], r["client"]) for r in testbed.upstream_requests()])
    print(daemon.stderr()[-3000:])
    assert '"headers"' in victim, f"victim got someone else's response: {victim[:200]!r}"


def test_expect_100_variant_desyncs_the_pool_h1(testbed, daemon_with):  # noqa: F811
    """The same with an HTTP/1.1 attacker (pooled when it disconnects): for comparison."""
    daemon = daemon_with()
    key = real_key("sk-ant-api03-")
    placeholder = set_secret(daemon, "anthropic", key, "--host", ANTHROPIC_HOST, "--header", "x-api-key")
    fresh_client(testbed, daemon)
    code = textwrap.dedent(r"""
        import socket, ssl, sys
        host, cacert = sys.argv[1], sys.argv[2]
        ctx = ssl.create_default_context(cafile=cacert)
        s = ctx.wrap_socket(socket.create_connection((host, 443), timeout=10), server_hostname=host)
        body = b'{"model": "m"}'
        s.sendall(b"POST /v1/attacker HTTP/1.1\r\nHost: " + host.encode() + b"\r\nExpect: 100-continue, x\r\n"
                  b"x-fake-bomb: """ + SLOW + r"""\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        print(s.recv(4096))
        s.close()
    """)
    testbed.client(sys.executable, "-c", code, ANTHROPIC_HOST, str(daemon.ca_pem))
    victim = fresh_client(testbed, daemon, ECHO, f"x-api-key: {placeholder}")
    print("VICTIM:", victim[:300])
    print("UPSTREAM:", [(r["path"], r["client"]) for r in testbed.upstream_requests()])
    assert '"headers"' in victim, f"victim got someone else's response: {victim[:200]!r}"


# ---------------------------------------------------------------------------------------------
# 2. A GET (a "bodyless" method: never marked chunked at its headers) with a body past
#    stream_large_bodies and no content-length: mitmproxy switches it to streaming after the
#    headers hook, so the headers go out with no framing and the body reaches the upstream as
#    requests of their own (smuggling past every llmtap stage).
# ---------------------------------------------------------------------------------------------


def test_h2_get_with_a_large_unsized_body_is_not_smuggled(testbed, daemon_with):  # noqa: F811
    daemon = daemon_with()
    pad = 5 * 1024 * 1024
    smuggled = (f"POST /llmtap-test/smuggled HTTP/1.1\r\nHost: {ANTHROPIC_HOST}\r\n"
                f"Content-Length: {pad}\r\n\r\n")
    result = h2(testbed, daemon, {"timeout": 30, "requests": [{
        "method": "GET", "path": "/llmtap-test/echo-headers", "body": smuggled, "pad": pad}]})
    print(json.dumps(result)[:600])
    wait_for(lambda: len(testbed.upstream_requests()) > 1, timeout=5)
    print("UPSTREAM:", [(r["path"], r["method"], r["headers"].get("content-length"),
                         r["headers"].get("transfer-encoding"), len(r["body"]))
                        for r in testbed.upstream_requests()])
    print(daemon.stderr()[-3000:])
    assert "/llmtap-test/smuggled" not in paths(testbed), "a body went out as a request of its own"


# ---------------------------------------------------------------------------------------------
# 3. Legitimate HTTP/2 clients.
# ---------------------------------------------------------------------------------------------


def test_h2_request_trailers_work(testbed, daemon_with):  # noqa: F811
    daemon = daemon_with()
    fresh_client(testbed, daemon)
    result = h2(testbed, daemon, {"timeout": 8, "requests": [{
        "method": "POST", "path": "/v1/trailers", "headers": [["te", "trailers"]],
        "body": '{"model": "m"}', "trailers": [["x-checksum", "abc"]]}]})
    print(json.dumps(result)[:800])
    print(daemon.stderr()[-2500:])
    stream = result["streams"][0]
    assert stream["status"] == "200" and stream["ended"], result
    assert "has crashed" not in daemon.stderr()
    fresh_client(testbed, daemon)


def test_h2_concurrent_streams_get_their_own_responses(testbed, daemon_with):  # noqa: F811
    daemon = daemon_with()
    fresh_client(testbed, daemon)
    fresh_client(testbed, daemon)
    reqs = []
    for n in range(8):
        path = "/llmtap-test/echo-headers" + ("?stream=1&pause=0.01" if n % 2 else "")
        req = {"method": "POST" if n % 3 == 0 else "GET", "path": path, "headers": [["x-n", str(n)]]}
        if n % 3 == 0:
            req["body"] = "b" * (n * 1000 + 1)
        reqs.append(req)
    result = h2(testbed, daemon, {"timeout": 20, "requests": reqs})
    assert result["error"] is None, result
    for n, stream in enumerate(result["streams"]):
        assert stream["status"] == "200", (n, stream)
        assert f'"x-n": "{n}"' in stream["body"], (n, stream["body"][:200])
    # then sequential reuse, then an h1 client, each its own answer
    result = h2(testbed, daemon, {"sequential": True, "requests": [
        {"path": "/llmtap-test/echo-headers", "headers": [["x-n", str(n)]]} for n in range(5)]})
    for n, stream in enumerate(result["streams"]):
        assert f'"x-n": "{n}"' in stream["body"], (n, stream["body"][:200])
    assert json.loads(fresh_client(testbed, daemon))["headers"]["host"] == ANTHROPIC_HOST


def test_h2_head_204_and_cookies(testbed, daemon_with):  # noqa: F811
    daemon = daemon_with()
    fresh_client(testbed, daemon)
    result = h2(testbed, daemon, {"sequential": True, "requests": [
        {"method": "HEAD", "path": "/llmtap-test/echo-headers"},
        {"method": "GET", "path": "/llmtap-test/echo-headers",
         "headers": [["cookie", "a=1"], ["cookie", "b=2"]]},
        {"method": "HEAD", "path": "/bytes/1000"},
        {"method": "GET", "path": "/llmtap-test/echo-headers", "headers": [["x-n", "last"]]},
    ]})
    print(json.dumps(result)[:1500])
    head, cookies, head2, last = result["streams"]
    assert head["status"] == "200" and head["body"] == "" and head["ended"], head
    assert '"cookie": "a=1; b=2"' in cookies["body"], cookies
    assert head2["status"] == "200" and head2["body"] == "", head2
    assert '"x-n": "last"' in last["body"], last
    assert json.loads(fresh_client(testbed, daemon))["headers"]["host"] == ANTHROPIC_HOST


RESET_MID_BODY = r"""
import socket, ssl, sys, time
import h2.config, h2.connection, h2.errors, h2.events
host, cacert = sys.argv[1], sys.argv[2]
context = ssl.create_default_context(cafile=cacert)
context.set_alpn_protocols(["h2", "http/1.1"])
sock = context.wrap_socket(socket.create_connection((host, 443), timeout=20), server_hostname=host)
conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
conn.initiate_connection()
conn.send_headers(1, [(":method", "POST"), (":path", "/v1/upload"), (":authority", host),
                      (":scheme", "https")])
sent, body = 0, b"GET /llmtap-test/smuggled HTTP/1.1\r\nHost: x\r\n\r\n" * 200000
sock.sendall(conn.data_to_send())
sock.settimeout(0.2)
while sent < 4_600_000:
    w = min(conn.local_flow_control_window(1), 16384)
    if w > 0:
        conn.send_data(1, body[sent:sent + w]); sent += w
    else:
        try:
            for ev in conn.receive_data(sock.recv(65536)): pass
        except socket.timeout: pass
    sock.sendall(conn.data_to_send())
conn.reset_stream(1, h2.errors.ErrorCodes.CANCEL)
sock.sendall(conn.data_to_send())
time.sleep(1)
sock.close()
print(sent)
"""


def test_a_stream_reset_mid_streamed_body_is_not_pooled(testbed, daemon_with):  # noqa: F811
    daemon = daemon_with()
    fresh_client(testbed, daemon)
    testbed.client(sys.executable, "-c", RESET_MID_BODY, ANTHROPIC_HOST, str(daemon.ca_pem))
    after = fresh_client(testbed, daemon)
    print([(r["path"], r["client"]) for r in testbed.upstream_requests()])
    assert json.loads(after)["headers"]["host"] == ANTHROPIC_HOST
    assert "/llmtap-test/smuggled" not in paths(testbed)
