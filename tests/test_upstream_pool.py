"""The upstream pool's bookkeeping, without a network: how long a kept connection may idle, which
keys it is filed under, and the config that bounds it (the end-to-end behaviour is in
tests/test_upstream_reuse_e2e.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from llmtap.config import load_config
from llmtap.errors import UsageError
from llmtap.upstream_pool import UpstreamPool, key_of
from mitmproxy import connection


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
    pool.responded(conn, header)
    assert pool.last_response[conn.id][1] == keep_s


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
