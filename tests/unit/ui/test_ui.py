"""The web UI without a browser: reading calls from their records, conversations and diffs,
sessions, chart series, and the guards every request passes (driven over real loopback sockets)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from llmtap.config import load_config
from llmtap.records import markdown, store
from llmtap.records.capture import Exchange, bounded
from llmtap.ui import charts, history
from llmtap.ui.app import CSP, App, Guard
from llmtap.ui.calls import load
from llmtap.ui.conversation import conversation, diff
from llmtap.ui.live import LiveFeed, shown
from llmtap.ui.server import Server
from llmtap.ui.sessions import Sessions
from llmtap.ui.views import Views

PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 16).decode()
SESSION = "0f0e0d0c-1111-2222-3333-444455556666"
TOKEN = "t0ken-for-tests"


def write_call(directory: Path, call_id: str, started: str, body: dict[str, Any],
               reply: dict[str, Any] | str, headers: list[tuple[str, str]] | None = None,
               **fields: Any) -> None:
    record = {"id": call_id, "started_at": started, "ended_at": started, "host": "api.anthropic.com",
              "method": "POST", "path": "/v1/messages", "status": 200, "provider": "anthropic",
              "api": "messages", "model": body.get("model"), "stream": isinstance(reply, str),
              "usage": {"input_tokens": 100, "output_tokens": 20, "cache_read_tokens": 1000},
              "cost_usd": 0.01, "process": {"pid": 42, "name": "claude", "tool": "claude"}, **fields}
    response = reply.encode() if isinstance(reply, str) else json.dumps(reply).encode()
    content_type = "text/event-stream" if isinstance(reply, str) else "application/json"
    exchange = Exchange(request_headers=headers or [("content-type", "application/json")],
                        response_headers=[("content-type", content_type)],
                        request_body=bounded(json.dumps(body).encode(), 1 << 20, None, "application/json"),
                        response_body=bounded(response, 1 << 20, None, content_type))
    store.write_exchange(directory, record, markdown.render(record, exchange))


FIRST = [{"role": "user", "content": [{"type": "text", "text": "<system-reminder>\nctx\n</system-reminder>"},
                                      {"type": "text", "text": "What is in this picture?"},
                                      {"type": "image", "source": {"type": "base64",
                                                                   "media_type": "image/png", "data": PNG}}]}]
SECOND = [*FIRST,
          {"role": "assistant", "content": [{"type": "thinking", "thinking": "Let me look."},
                                            {"type": "tool_use", "id": "tu1", "name": "zoom",
                                             "input": {"factor": 2}}]},
          {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "tu1",
                                        "content": "a cat, zoomed"}]}]
STREAM = ('event: message_start\ndata: {"type":"message_start","message":{"id":"msg_1"}}\n\n'
          'event: content_block_start\ndata: {"type":"content_block_start","index":0,'
          '"content_block":{"type":"text","text":""}}\n\n'
          'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
          '"delta":{"type":"text_delta","text":"A ca"}}\n\n'
          'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
          '"delta":{"type":"text_delta","text":"t."}}\n\n')


@pytest.fixture
def records(tmp_path: Path) -> Path:
    directory = tmp_path / "records"
    directory.mkdir()
    metadata = {"user_id": f"user_abc_account_def_session_{SESSION}"}
    base = {"model": "claude-sonnet-4-5", "max_tokens": 64, "system": "You look at pictures.",
            "metadata": metadata}
    write_call(directory, "call1", "2026-12-01T10:00:00.000Z", {**base, "messages": FIRST},
               {"content": [{"type": "text", "text": "Let me zoom."}]})
    write_call(directory, "call2", "2026-12-01T10:00:05.000Z", {**base, "messages": SECOND}, STREAM)
    other = {"model": "gpt-4.1", "messages": [{"role": "system", "content": "Be brief."},
                                              {"role": "user", "content": "hi"}]}
    for n in (3, 4):
        write_call(directory, f"call{n}", f"2026-12-01T11:00:0{n}.000Z", other,
                   {"choices": [{"message": {"content": "hello"}}]},
                   headers=[("authorization", "Bearer sk-pro...****")], host="api.openai.com",
                   process={"pid": 7, "name": "python3"})
    write_call(directory, "call5", "2026-12-01T12:00:00.000Z", {**base, "messages": FIRST},
               {"content": []}, counted=False, cost_usd=5.0)
    return directory


def row(directory: Path, call_id: str) -> dict[str, Any]:
    with history.opened(directory) as index:
        found = history.find(index, call_id)
    assert found
    return found


def test_a_call_reads_as_a_conversation_with_a_diff(records: Path) -> None:
    first = load(records, row(records, "call1")["location"])
    second = load(records, row(records, "call2")["location"])
    assert first and second
    older, newer = conversation(first), conversation(second)
    assert newer.system == "You look at pictures."
    assert [p.kind for p in newer.turns[0].parts] == ["text", "text", "image"]
    assert newer.turns[0].parts[2].image == f"data:image/png;base64,{PNG}"
    assert [p.kind for p in newer.turns[1].parts] == ["thinking", "tool_call"]
    assert newer.turns[2].parts[0].kind == "tool_result"
    assert newer.turns[2].parts[0].text == "a cat, zoomed"
    assert older.reply and older.reply.parts[0].text == "Let me zoom."
    assert newer.reply and [p.text for p in newer.reply.parts] == ["A cat."]  # rebuilt from the stream
    changes = diff(older, newer)
    assert changes.added == [1, 2] and changes.removed == [] and not changes.system_changed
    assert diff(newer, older).removed == newer.turns[1:]  # what fell out of the context


def test_an_image_of_another_type_is_never_inlined(records: Path) -> None:
    call = load(records, row(records, "call1")["location"])
    assert call
    call.request.body_json["messages"][0]["content"][2]["source"]["media_type"] = "image/svg+xml"
    image = conversation(call).turns[0].parts[2]
    assert image.image is None and "not shown" in image.text


def test_sessions_by_client_id_and_by_prompt_prefix(records: Path) -> None:
    with history.opened(records) as index:
        rows = history.window(index)
    keys = Sessions(records).assign(rows)
    assert keys["call1"] == keys["call2"] == keys["call5"] == f"claude-code:{SESSION}"
    assert keys["call3"] == keys["call4"] and keys["call3"].startswith("prefix:")
    assert Sessions(records).label(rows[0]) == "What is in this picture?"  # not Claude Code's reminder


def test_session_ids_from_headers_and_response_chains(tmp_path: Path) -> None:
    directory = tmp_path / "records"
    directory.mkdir()
    body = {"model": "gpt-5", "input": "start"}
    write_call(directory, "r1", "2026-12-01T10:00:00.000Z", body,
               {"object": "response", "id": "resp_1", "output": []})
    write_call(directory, "r2", "2026-12-01T10:00:01.000Z",
               {"model": "gpt-5", "input": "next", "previous_response_id": "resp_1"},
               {"object": "response", "id": "resp_2", "output": []})
    write_call(directory, "c1", "2026-12-01T10:00:02.000Z", body, {"output": []},
               headers=[("session_id", "codex-abc")])
    write_call(directory, "k1", "2026-12-01T10:00:03.000Z", {"model": "claude", "messages": []},
               {"content": []}, headers=[("X-Claude-Code-Session-Id", "s-1")])
    write_call(directory, "m1", "2026-12-01T10:00:04.000Z", {"model": "claude", "messages": []},
               {"content": []}, headers=[("X-Claude-Code-Session-Id", "••••")])  # as records have it
    write_call(directory, "n1", "2026-12-01T10:00:05.000Z", {}, {"content": []}, model=None)
    with history.opened(directory) as index:
        keys = Sessions(directory).assign(history.window(index))
    assert keys["r1"] == keys["r2"] and keys["r1"].startswith("prefix:")
    first, second = (load(directory, row(directory, i)["location"]) for i in ("r1", "r2"))
    assert first and second
    chained = diff(conversation(first), conversation(second))
    assert chained.added == [0] and chained.removed == []  # the server holds the context
    assert keys["c1"] == "codex:codex-abc" and keys["k1"] == "claude-code:s-1"
    assert keys["m1"].startswith("prefix:") and "n1" not in keys


def test_charts_leave_out_calls_that_are_not_billed(records: Path) -> None:
    with history.opened(records) as index:
        rows = history.Billed(records).keep(history.usage_rows(index, None))
    assert "call5" not in [r["id"] for r in rows]
    data = charts.series(rows, "model", "hour")
    assert data["cost"]["labels"] == ["claude-sonnet-4-5", "gpt-4.1"]
    assert sum(sum(s) for s in data["cost"]["data"][1:]) == pytest.approx(0.04)
    assert data["cache"]["data"][1][0] == pytest.approx(round(100 * 2000 / 2200, 1))
    assert len(data["context"]["data"][0]) == 4


def test_the_live_feed_passes_on_only_what_it_shows() -> None:
    event = {"type": "start", "id": "1", "model": "m", "process": {"pid": 1, "exe": "/x",
                                                                     "cmdline": ["--key", "sk-x"]},
             "error": "bad key sk-ant-api03-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", "secret": "s"}
    out = shown(event)
    assert "secret" not in out and out["process"] == {"pid": 1, "name": None, "tool": None, "user": None}
    assert "AAAAAAAAAAAAAAAAAAAAAAAA" not in out["error"]


# --- the server and its guards, over real sockets ----------------------------------------------


class Running:
    def __init__(self, records: Path, tmp_path: Path, check_peer: bool = True) -> None:
        config_file = tmp_path / "config.toml"
        config_file.write_text(f'state_dir = "{tmp_path / "state"}"\nrecords_dir = "{records}"\n'
                               f'run_dir = "{tmp_path / "run"}"\n')
        self.config = load_config(str(config_file))
        self.loop = asyncio.new_event_loop()
        self.guard = Guard(TOKEN, "llmtap-ui-test-group", check_peer)
        views = Views(self.config, TOKEN, LiveFeed(self.config))
        self.server = Server(App(self.guard, views.routes()))
        self.guard.port = self.port = self.loop.run_until_complete(self.server.start())
        import threading
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    def get(self, target: str, host: str | None = None, method: str = "GET",
            family: int = socket.AF_INET) -> tuple[int, dict[str, str], bytes]:
        address = ("127.0.0.1" if family == socket.AF_INET else "::1", self.port)
        with socket.create_connection(address, timeout=10) as sock:
            host = host or f"127.0.0.1:{self.port}"
            sock.sendall(f"{method} {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n"
                         "Content-Length: 0\r\n\r\n".encode())
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        if headers.get("transfer-encoding") == "chunked":
            body = _unchunk(body)
        return int(lines[0].split()[1]), headers, body

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)


def _unchunk(data: bytes) -> bytes:
    out = b""
    while data:
        size, _, rest = data.partition(b"\r\n")
        n = int(size, 16)
        if n == 0:
            break
        out, data = out + rest[:n], rest[n + 2:]
    return out


@pytest.fixture
def running(records: Path, tmp_path: Path) -> Iterator[Running]:
    server = Running(records, tmp_path)
    try:
        yield server
    finally:
        server.close()


def test_the_token_is_required(running: Running) -> None:
    assert running.get("/")[0] == 401
    assert running.get("/?token=wrong")[0] == 401
    assert running.get("/static/app.js")[0] == 401
    status, headers, body = running.get(f"/?token={TOKEN}")
    assert status == 200 and b"Latest calls" in body
    assert headers["content-security-policy"] == CSP
    assert "access-control-allow-origin" not in headers
    assert headers["referrer-policy"] == "no-referrer"


def test_only_loopback_host_names_are_answered(running: Running) -> None:
    for host in ("evil.example", f"evil.example:{running.port}", "127.0.0.1",
                 f"127.0.0.1:{running.port + 1}", f"10.0.0.1:{running.port}"):
        assert running.get(f"/?token={TOKEN}", host=host)[0] == 403, host
    for name in ("127.0.0.1", "localhost", "[::1]", "LOCALHOST"):
        assert running.get(f"/?token={TOKEN}", host=f"{name}:{running.port}")[0] == 200, name
    assert running.get("/", host="evil.example")[0] == 403  # the Host check comes first


def test_nothing_but_get_and_no_cors(running: Running) -> None:
    for method in ("POST", "PUT", "DELETE", "OPTIONS"):
        status, headers, _ = running.get(f"/?token={TOKEN}", method=method)
        assert status == 405 and not any(k.startswith("access-control") for k in headers), method
    assert running.get("/", method="POST")[0] == 401  # and not even that without the token


def test_it_listens_on_loopback_only(running: Running) -> None:
    if socket.has_ipv6 and Path("/proc/net/if_inet6").exists():
        assert running.get(f"/?token={TOKEN}", host=f"[::1]:{running.port}", family=socket.AF_INET6)[0] == 200
    assert {host for host, _ in running.server.addresses} <= {"127.0.0.1", "::1"}
    with pytest.raises(ValueError, match="loopback only"):
        Server(App(running.guard, []), hosts=("0.0.0.0",))


def test_pages_render_calls_sessions_and_records(running: Running) -> None:
    status, _, body = running.get(f"/call/call2?token={TOKEN}")
    page = body.decode()
    assert status == 200 and "2 message(s) added" in page and "a cat, zoomed" in page
    assert f'src="data:image/png;base64,{PNG}"' in page
    assert "<details class=\"thinking\">" in page
    status, _, body = running.get(f"/sessions?token={TOKEN}")
    assert status == 200 and f"claude-code:{SESSION}" in body.decode()
    status, headers, body = running.get(f"/call/call3.json?token={TOKEN}")
    assert status == 200 and json.loads(body)["id"] == "call3"
    status, headers, body = running.get(f"/call/call3.md?token={TOKEN}")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    assert body == store.read_location(running.config.records_dir, store.markdown_location(
        row(running.config.records_dir, "call3")["location"]))  # the twin as written (masked)
    status, _, body = running.get(f"/search?q=zoomed&token={TOKEN}")
    assert status == 200 and "/call/call2?" in body.decode()
    status, _, body = running.get(f"/api/series?by=session&bucket=day&since=all&token={TOKEN}")
    assert status == 200 and json.loads(body)["cost"]["data"][0]
    assert running.get(f"/call/nope?token={TOKEN}")[0] == 404
    status, _, body = running.get(f"/session/claude-code:{SESSION}?token={TOKEN}")
    assert status == 200 and "$0.0200" in body.decode()  # three calls, the one not billed not counted
    assert running.get(f"/static/..%2Fapp.py?token={TOKEN}")[0] == 404


def test_another_local_user_is_refused_even_with_the_token(records: Path, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to act as another user")
    import subprocess

    server = Running(records, tmp_path)
    try:
        url = f"http://127.0.0.1:{server.port}/?token={TOKEN}"
        result = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                                 "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", url],
                                capture_output=True, text=True, timeout=30)
        assert result.stdout.strip() == "403", result
        assert server.get(f"/?token={TOKEN}")[0] == 200  # root (our own user) still may
    finally:
        server.close()


def test_the_command_refuses_bad_usage_and_missing_records(tmp_path: Path) -> None:
    import subprocess
    import sys

    llmtap = str(Path(sys.executable).parent / "llmtap")
    config_file = tmp_path / "config.toml"
    config_file.write_text(f'state_dir = "{tmp_path}"\nrecords_dir = "{tmp_path / "none"}"\n')
    bad = subprocess.run([llmtap, "ui", "--no-open", "--port", "70000", "--config", str(config_file)],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--port" in bad.stderr
    missing = subprocess.run([llmtap, "ui", "--no-open", "--config", str(config_file)],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and "no records yet" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_oversized_requests_are_refused_without_reading_them_whole(running: Running) -> None:
    with socket.create_connection(("127.0.0.1", running.port), timeout=10) as sock:
        try:  # a head that never ends is cut off once its unparsed part passes the cap
            sock.sendall(f"GET /?token={TOKEN} HTTP/1.1\r\nHost: 127.0.0.1:{running.port}\r\n"
                         f"X-Big: {'a' * 4_000_000}\r\n\r\n".encode())
            answer = sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):  # closed on us mid-send: refused too
            answer = b""
        assert answer[:12] in (b"", b"HTTP/1.1 400", b"HTTP/1.1 431")
    with socket.create_connection(("127.0.0.1", running.port), timeout=10) as sock:
        sock.sendall(f"POST /?token={TOKEN} HTTP/1.1\r\nHost: 127.0.0.1:{running.port}\r\n"
                     f"Content-Length: 10000000\r\n\r\n".encode() + b"x" * 100_000)
        assert sock.recv(65536).startswith(b"HTTP/1.1 405")  # answered without reading the body
