"""Red-team attacks on llmtap's privilege and trust boundaries, each one a regression test."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import streams
from llmtap import ca, price_data
from llmtap.addons.counting import BilledIds, Counting
from llmtap.addons.pricing import Pricing
from llmtap.addons.protocols import Protocols
from llmtap.errors import RuntimeFailure
from llmtap.flow import fields
from test_protocols_addon import JSON, request_flow, response_headers, run_addons


def test_price_write_does_not_follow_a_planted_tmp_symlink(tmp_path: Path):
    """The state directory belongs to the service user; root's `prices update`/`import` write
    there. A symlink the service user planted at the temporary name must not make root
    overwrite, chmod 0644 or chown the file it points at (/etc/shadow)."""
    state = tmp_path / "state"
    state.mkdir()
    secret = tmp_path / "shadow"
    secret.write_bytes(b"root:$6$hash\n")
    os.chmod(secret, 0o600)
    (state / ".genai-prices.json.tmp").symlink_to(secret)
    price_data.write_public(state / "genai-prices.json", b"{}", None)
    assert secret.read_bytes() == b"root:$6$hash\n"
    assert secret.stat().st_mode & 0o777 == 0o600
    assert (state / "genai-prices.json").read_bytes() == b"{}"
    assert not (state / "genai-prices.json").is_symlink()


def test_ca_setup_does_not_chown_a_symlinked_ca_dir(tmp_path: Path):
    """The service user owns state_dir and can replace `ca` by a symlink to /etc: the root
    supervisor's ensure_ca at the next start must not chown that directory to it."""
    victim = tmp_path / "etc"
    victim.mkdir(mode=0o755)
    state = tmp_path / "state"
    state.mkdir()
    (state / "ca").symlink_to(victim)
    with pytest.raises(RuntimeFailure):
        ca.ensure_ca(state / "ca", ("api.openai.com",), os.getuid(), os.getgid())
    assert victim.stat().st_mode & 0o777 == 0o755
    assert list(victim.iterdir()) == []


def test_ca_write_does_not_follow_a_planted_tmp_symlink(tmp_path: Path):
    """A symlink at the old fixed temporary name (install.json.llmtap-tmp) made root truncate,
    rewrite and chown whatever it pointed at."""
    secret = tmp_path / "shadow"
    secret.write_bytes(b"root:$6$hash\n")
    os.chmod(secret, 0o600)
    (tmp_path / "install.json.llmtap-tmp").symlink_to(secret)
    ca.write_file(tmp_path / "install.json", b"{}", 0o644, os.getuid(), os.getgid())
    assert secret.read_bytes() == b"root:$6$hash\n"
    assert secret.stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "install.json").read_bytes() == b"{}"


def _billed_call(headers: dict[str, str], path: str = "/v1/messages") -> dict[str, Any]:
    """A real call, answered 200 with usage, through protocols, counting and pricing."""
    addons = (Protocols(), Counting(BilledIds()), Pricing())
    protocols, counting, pricing = addons
    anthropic = path.startswith("/v1/messages")
    request = {"model": "claude-sonnet-4-5" if anthropic else "gpt-4.1-mini", "max_tokens": 64,
               "messages": [{"role": "user", "content": "hi"}]}
    flow = request_flow("api.anthropic.com" if anthropic else "api.openai.com", "/", request,
                        headers={"content-type": "application/json", **headers})
    flow.request.path = path  # as it came on the wire
    body = streams.load("anthropic_message.json" if anthropic else "openai_responses.json")
    with run_addons(*addons):
        protocols.request(flow)
        response_headers(flow, 200, JSON, size=len(body))
        protocols.responseheaders(flow)
        flow.response.raw_content = body
        protocols.response(flow)
        counting.response(flow)
        pricing.response(flow)
    return fields(flow)


def test_an_upgrade_header_does_not_hide_a_billed_call():
    """A client that wants its calls uncounted adds `Upgrade: websocket` to a POST: the server
    ignores it (no 101), the call is billed, and it must be counted and priced."""
    plain = _billed_call({})
    assert plain["counted"] is True and plain["cost_usd"]
    for extra in ({"upgrade": "websocket"}, {"upgrade": "WebSocket", "connection": "Upgrade"}):
        record = _billed_call(extra)
        assert record["counted"] is True, extra
        assert record["cost_usd"] == plain["cost_usd"]


def test_a_fragment_in_the_path_does_not_make_a_create_a_cancel():
    """classify() ignores a `#...` tail; counting read it as part of the path, so a create sent
    as `/v1/responses#/responses/x/cancel` was recorded as a cancel (not counted)."""
    plain = _billed_call({}, "/v1/responses")
    assert plain["counted"] is True and plain["cost_usd"]
    record = _billed_call({}, "/v1/responses#/responses/resp_x/cancel")
    assert record["api"] == "responses"
    assert record["counted"] is True and record["cost_usd"] == plain["cost_usd"]


def test_a_non_ascii_digit_in_bedrock_count_headers_is_no_crash():
    """str.isdigit() accepts "²", which int() refuses: the parser died in its constructor."""
    from llmtap.parsers.bedrock import header_usage

    usage = header_usage({"x-amzn-bedrock-input-token-count": "\u00b2",
                          "x-amzn-bedrock-output-token-count": "3"})
    assert usage is not None and (usage.input_tokens, usage.output_tokens) == (0, 3)


def test_a_forged_location_reads_nothing_outside_the_records(tmp_path: Path, monkeypatch):
    """The index and the tree are the service user's; root's `llmtap ui` serves
    /call/ID.json from the row's location. A location that is absolute, climbs out, or is a
    symlink the service user planted must not read /etc/shadow for whoever holds the token."""
    import gzip

    from llmtap.records import store

    records, outside = tmp_path / "records", tmp_path / "outside"
    records.mkdir()
    outside.mkdir()
    secret = outside / "shadow"
    secret.write_bytes(b"root:$6$hash\n")
    (records / "20261201T000000.000Z_m_a.json").write_bytes(b"{}")
    assert store.read_location(records, "20261201T000000.000Z_m_a.json") == b"{}"
    for forged in (str(secret), "../outside/shadow", "archive/../../outside/shadow"):
        assert store.read_location(records, forged) is None, forged
    (records / "20261201T000000.000Z_m_b.json").symlink_to(secret)
    assert store.read_location(records, "20261201T000000.000Z_m_b.json") is None
    (outside / "x.json.gz").write_bytes(gzip.compress(b"secret"))
    (records / "archive").symlink_to(outside)
    assert store.read_location(records, "archive/x.json.gz") is None
    (records / "archive").unlink()
    (records / "archive").mkdir()
    (records / "archive" / "bomb.json.gz").write_bytes(gzip.compress(b"0" * 4096))
    monkeypatch.setattr(store, "MAX_READ", 100)
    assert store.read_location(records, "archive/bomb.json.gz") == b"0" * 100
    os.mkfifo(records / "fifo.json")  # opening it must not wait for a writer
    assert store.read_location(records, "fifo.json") is None


def _tcp_line(n: int, local: tuple[str, int], remote: tuple[str, int], uid: int, inode: int) -> str:
    from llmtap.platform.linux.sockets import proc_net_address

    return (f"  {n}: {proc_net_address(*local)} {proc_net_address(*remote)} 01 00000000:00000000 "
            f"00:00000000 00000000 {uid:5d}        0 {inode} 1 0000000000000000 20 4 30 10 -1\n")


def test_the_ui_peer_is_the_socket_to_the_ui_not_one_sharing_its_port(tmp_path: Path):
    """Sockets to different peers may share a local port (connect() reuses ports whose 4-tuples
    differ). Another user who connects to the UI from 127.0.0.1:X while one of root's sockets
    has local address 127.0.0.1:X toward elsewhere was taken for root."""
    from llmtap.platform.linux.sockets import socket_inode
    from llmtap.ui.app import Guard

    ui, peer = ("127.0.0.1", 8377), ("127.0.0.1", 40000)
    (tmp_path / "net").mkdir()
    (tmp_path / "net" / "tcp").write_text(
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
        + _tcp_line(0, peer, ("127.0.0.1", 5432), 0, 111)  # root's, elsewhere
        + _tcp_line(1, peer, ui, 65534, 222)  # the other user's, to the UI
        + _tcp_line(2, ui, peer, 0, 333))  # the UI's end of it
    (tmp_path / "net" / "tcp6").write_text("")
    assert socket_inode(*peer, tmp_path, ui) == (222, 65534)
    guard = Guard("t", "no-such-group-llmtap-test")
    guard.proc = tmp_path
    assert guard.peer_ok(peer, ui) is False


def test_deeply_nested_price_data_is_refused_not_a_crash(tmp_path: Path):
    """A hostile update URL serving `[[[[...]]]]` raised RecursionError, which neither
    `prices update` nor the daemon's periodic updater catches (it ended the updater)."""
    source = tmp_path / "deep.json"
    source.write_bytes(b"[" * 200_000 + b"]" * 200_000)
    with pytest.raises(ValueError, match="nested too deep"):
        price_data.update(source.as_uri(), tmp_path / "state")
    assert not (tmp_path / "state" / "genai-prices.json").exists()


def test_history_does_not_pass_escape_sequences_to_the_terminal(tmp_path: Path, capsys):
    """A model name (the client's request body) holding escape sequences: `llmtap logs` as the
    admin ran it erased the previous lines (a call hidden from view) or set the clipboard."""
    from cli_runs import run_cli, write_config
    from test_counting import record, write

    records_dir = tmp_path / "records"
    records_dir.mkdir()
    hide = "\x1b[1A\x1b[2K\x1b]52;c;Y3VybCBldmlsfHNo\x07gpt-4.1-mini\x9b2J"
    write(records_dir, record(1, "gpt-4.1-mini", 0.01), record(2, hide, None))
    config = str(write_config(tmp_path, records_dir))
    for command in (("logs",), ("show", "rec0002"), ("prices", "missing")):
        code, out, _ = run_cli(capsys, *command, "--config", config)
        assert code == 0, command
        assert not any(c in out for c in "\x1b\x07\x9b"), command
        assert "\\x1b[1A" in out or "\\u001b[1A" in out, command  # shown, harmless


def test_a_huge_conversation_diffs_in_linear_time():
    """difflib is quadratic at worst: a client that sends two calls of ~60k short repeating
    system lines and turns held the UI (all of it: one lock) for ~20 s per page view."""
    import random
    import time

    from llmtap.ui.conversation import Conversation, Part, Turn, diff

    pick = random.Random(0)

    def crafted() -> Conversation:
        lines = [str(pick.randrange(300)) for _ in range(60_000)]
        return Conversation("\n".join(lines), [Turn("user", [Part("text", line)]) for line in lines])

    older, newer = crafted(), crafted()
    newer.turns[:10] = older.turns[:10]
    started = time.monotonic()
    changes = diff(older, newer)
    assert time.monotonic() - started < 3
    assert changes.system_changed and changes.added[0] == 10
    small = diff(Conversation("a\nb", [Turn("user", [Part("text", "x")])]),
                 Conversation("a\nc", [Turn("user", [Part("text", "x")]), Turn("assistant")]))
    assert small.added == [1] and "+c" in small.system_diff  # small ones still diff line by line
