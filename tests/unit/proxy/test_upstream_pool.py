"""The upstream pool's bookkeeping, without a network: how long a kept connection may idle, which
keys it is filed under, and the config that bounds it (the end-to-end behaviour is in
tests/e2e/test_upstream_reuse_e2e.py)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from llmtap.config import load_config
from llmtap.errors import UsageError
from llmtap.upstream_http import finished_for_h2, frame_for_http1, framed
from llmtap.upstream_pool import UpstreamPool, key_of
from mitmproxy import connection
from mitmproxy.test import tutils


def server(address: tuple[str, int] | None = ("10.0.0.1", 443), sni: str | None = "api.anthropic.com"
           ) -> connection.Server:
    conn = connection.Server(address=address)
    conn.sni = sni
    return conn


@pytest.mark.parametrize(("header", "keep_s"), [
    (None, 30.0), ("", 30.0), ("timeout=5", 4.0), ("timeout=5, max=100", 4.0), ("max=3, Timeout=61", 60.0),
    ("timeout=abc", 30.0), ("timeout=0", 0.0),
])
def test_a_server_keep_alive_hint_shortens_the_idle_limit(header: str | None, keep_s: float) -> None:
    pool = UpstreamPool(idle_s=30)
    conn = server()
    response = tutils.tresp()
    if header is not None:
        response.headers["keep-alive"] = header
    pool.responded(conn, response)
    assert pool.last_response[conn.id][1] == keep_s
    assert conn.id not in pool.unsound


@pytest.mark.parametrize("status", [100, 103])
def test_an_informational_answer_taken_for_the_response_leaves_the_connection_unpoolable(status: int) -> None:
    """mitmproxy reads a 100 (`Expect: 100-continue, x` passes it by) or a 103 as the final
    response; the real one is still to come on that connection."""
    pool = UpstreamPool()
    conn = server()
    pool.responded(conn, tutils.tresp(status_code=status))
    assert conn.id in pool.unsound
    layer = SimpleNamespace(request=tutils.treq(http_version=b"HTTP/2.0"),
                            response=tutils.tresp(status_code=status))
    assert finished_for_h2(layer) is False  # type: ignore[arg-type]


def test_connections_are_filed_by_address_port_and_verified_name() -> None:
    assert key_of(server()) == ("10.0.0.1", 443, "api.anthropic.com")
    assert key_of(server(sni=None)) is None  # no name to have verified the certificate for
    assert key_of(server(address=None)) is None


def test_the_pool_bounds_are_checked(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text("[upstream]\npool_per_host = 2\npool_idle_s = 5\n")
    upstream = load_config(path).upstream
    assert (upstream.pool_per_host, upstream.pool_idle_s) == (2, 5)
    for bad, message in (("pool_per_host = -1", "pool_per_host"), ("pool_per_host = 65", "pool_per_host"),
                         ("pool_idle_s = 0", "pool_idle_s")):
        path.write_text(f"[upstream]\n{bad}\n")
        with pytest.raises(UsageError, match=message):
            load_config(path)


@pytest.mark.parametrize(("request_version", "response_headers", "poolable"), [
    ("HTTP/2.0", {"content-length": "7"}, True),
    ("HTTP/2.0", {"transfer-encoding": "chunked"}, True),
    ("HTTP/2.0", {"content-length": "7", "connection": "close"}, False),  # the server says close
    ("HTTP/2.0", {}, False),  # no length: read until the server closes
    ("HTTP/1.1", {"content-length": "7"}, False),  # not the one-request rule: the idle check's case
])
def test_an_http2_clients_connection_is_kept_only_when_nothing_else_would_close_it(
        request_version: str, response_headers: dict[str, str], poolable: bool) -> None:
    """mitmproxy closes the HTTP/1.1 connection of an HTTP/2 client's request after it; the pool
    takes it only when that one-request rule is the only reason."""
    response = tutils.tresp(content=b"x" * 7)
    response.headers.clear()
    response.headers.update(response_headers)
    layer = SimpleNamespace(request=tutils.treq(http_version=request_version), response=response)
    assert finished_for_h2(layer) is poolable  # type: ignore[arg-type]


def h2_request(method: str = "POST", body: bytes | None = b"", **headers: str):  # type: ignore[no-untyped-def]
    request = tutils.treq(method=method.encode(), http_version=b"HTTP/2.0", content=b"")
    request.headers.clear()
    request.headers.update(headers)
    request.raw_content = body  # as mitmproxy stores it: no header changed
    return request


def test_an_http2_body_gets_its_length_before_it_goes_out_over_http1() -> None:
    """Chunked at the headers (a streamed body goes out so), its exact length once it is whole."""
    post = h2_request(body=None)
    frame_for_http1(post, body_known=False)
    assert post.headers.get("transfer-encoding") == "chunked"
    post.raw_content = b'{"model": "m"}'
    frame_for_http1(post, body_known=True)
    assert "transfer-encoding" not in post.headers and post.headers["content-length"] == "14"
    assert framed(post)
    empty = h2_request(body=None)
    frame_for_http1(empty, body_known=False)
    empty.raw_content = b""
    frame_for_http1(empty, body_known=True)
    assert "content-length" not in empty.headers and framed(empty)  # no body, no framing needed
    get = h2_request("GET", body=None)
    frame_for_http1(get, body_known=False)
    assert get.headers["transfer-encoding"] == "chunked"  # a GET may carry a body too
    get.raw_content = b""
    frame_for_http1(get, body_known=True)
    assert "transfer-encoding" not in get.headers and "content-length" not in get.headers
    stated = h2_request(body=None, **{"content-length": "3"})
    frame_for_http1(stated, body_known=False)
    assert "transfer-encoding" not in stated.headers


@pytest.mark.parametrize(("body", "headers", "sound"), [
    (b"abc", {"content-length": "3"}, True),
    (b"", {}, True),
    (b"abc", {}, False),  # no length: the upstream would read it as the next request
    (b"abcdef", {"content-length": "3"}, False),  # a length that is not the body's
    (None, {"transfer-encoding": "chunked"}, False),  # streamed: never counted sound
])
def test_only_an_exactly_framed_request_leaves_its_connection_poolable(
        body: bytes | None, headers: dict[str, str], sound: bool) -> None:
    assert framed(h2_request(body=body, **headers)) is sound
