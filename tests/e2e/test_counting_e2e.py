"""Every call counted once, end to end: the official SDKs in the client namespace, one daemon.

A background response polled and retrieved again, batch results downloaded twice and a Responses
WebSocket each leave several records; exactly one of them is the billed call. And a complete
exchange is no error whatever the client does after its final event.
"""

from __future__ import annotations

import json
import subprocess
import textwrap
from collections.abc import Iterator
from typing import Any

import pytest
import streams
from test_protocols_e2e import client, cost, records, usage
from testbed import LLMTAP, Daemon, Testbed, clean_env, running_daemon

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def tap(testbed: Testbed) -> Iterator[Daemon]:
    with running_daemon(testbed) as daemon:
        yield daemon


def stats(daemon: Daemon, by: str = "model") -> dict[str, Any]:
    result: dict[str, Any] = json.loads(daemon.llmtap("stats", "--by", by, "--json").stdout)
    return result


def calls_of(daemon: Daemon, model: str) -> int:
    return sum(g["calls"] for g in stats(daemon)["groups"] if g["key"] == model)


GPT41_MINI = cost(input=(36, "0.40"), output=(87, "1.60"))


def test_a_background_response_polled_and_retrieved_is_one_call(testbed, tap):
    out = client(testbed, tap, """
        import openai
        sdk = openai.OpenAI(api_key="sk-placeholder", max_retries=0,
                            http_client=openai.DefaultHttpxClient(verify=CA))
        tag = {"t": "cnt-bg"}
        created = sdk.responses.create(model="gpt-4.1-mini", input="Hi", background=True,
                                       extra_query=tag)
        statuses = [created.status]
        while statuses[-1] != "completed":
            done = sdk.responses.retrieve(created.id, extra_query=tag)
            statuses.append(done.status)
        again = [sdk.responses.retrieve(created.id, extra_query=tag).status for _ in range(2)]
        resumed = [e.type for e in sdk.responses.retrieve(created.id, stream=True, starting_after=5,
                                                          extra_query=tag)]
        print(json.dumps({"id": created.id, "statuses": statuses, "again": again,
                          "resumed": resumed, "usage": done.usage.model_dump()}))
    """)
    assert out["statuses"] == ["queued", "in_progress", "completed"]
    assert out["again"] == ["completed"] * 2 and out["resumed"][-1] == "response.completed"
    assert out["usage"]["output_tokens"] == 87
    found = records(tap, "cnt-bg", 6)
    assert [(r["method"], r["counted"]) for r in found] == [
        ("POST", False), ("GET", False), ("GET", True), ("GET", False), ("GET", False),
        ("GET", False)]
    billed = found[2]
    assert billed["billed_id"] == out["id"] and billed["response_status"] == "completed"
    assert billed["usage"] == usage(36, 87) and billed["cost_usd"] == GPT41_MINI
    for record in found[:2] + found[3:]:
        assert record["repeat_of"] == out["id"] and record["cost_usd"] == 0.0
        assert record["error"] is None
    assert found[0]["request"]["background"] is True and found[-1]["stream"] is True
    assert calls_of(tap, "gpt-4.1-mini-2025-04-14") == 1


def test_batch_results_downloaded_twice_are_billed_once(testbed, tap):
    out = client(testbed, tap, """
        import uuid
        import anthropic
        sdk = anthropic.Anthropic(api_key="sk-ant-placeholder", max_retries=0,
                                  http_client=anthropic.DefaultHttpxClient(verify=CA))
        batch_id = "msgbatch_" + uuid.uuid4().hex
        results = [[r.result.type for r in sdk.messages.batches.results(
                        batch_id, extra_query={"t": "cnt-batch"})] for _ in range(2)]
        print(json.dumps({"id": batch_id, "results": results}))
    """)
    assert out["results"] == [["succeeded", "succeeded", "errored"]] * 2
    first, second = records(tap, "cnt-batch", 2)
    assert (first["api"], first["counted"], first["billed_id"]) == (
        "messages.batches.results", True, out["id"])
    assert first["usage"] == usage(18, 46, reasoning=None) and first["batch_pricing"] is True
    assert first["cost_usd"] == cost(input=(18, "1.5"), output=(46, "7.5"))  # half price
    assert (second["counted"], second["repeat_of"], second["cost_usd"]) == (False, out["id"], 0.0)
    polls = [r for r in tap.records() if r["path"] == f"/v1/messages/batches/{out['id']}"]
    assert len(polls) == 2 and all(r["counted"] is False for r in polls)  # the SDK's look-ups


WS_CLIENT = """
    import socket, ssl
    import wsproto
    from wsproto import events as ev
    tls = ssl.create_default_context(cafile=CA).wrap_socket(
        socket.create_connection(("api.openai.com", 443)), server_hostname="api.openai.com")
    ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
    tls.sendall(ws.send(ev.Request(host="api.openai.com", target="/v1/responses?t=TAG",
                                   extra_headers=[(b"authorization", b"Bearer sk-placeholder")])))
    def until(done):
        while True:
            ws.receive_data(tls.recv(65536))
            for event in ws.events():
                if done(event):
                    return event
    until(lambda e: isinstance(e, ev.AcceptConnection))
    create = open(CREATE).read().strip()
    for _ in range(TURNS):
        tls.sendall(ws.send(ev.TextMessage(create)))
        until(lambda e: isinstance(e, ev.TextMessage) and "response.completed" in e.data)
    CLOSE
    print("{}")
"""


def ws_client(tag: str, turns: int, close: str) -> str:
    return (WS_CLIENT.replace("TAG", tag).replace("TURNS", str(turns)).replace("CLOSE", close)
            .replace("CREATE", repr(str(streams.DIR / "openai_responses_ws_client.json"))))


def test_a_websocket_session_counts_its_responses_not_its_upgrade(testbed, tap):
    before = stats(tap)["not_counted"]
    client(testbed, tap, ws_client("cnt-ws", 2, "tls.sendall(ws.send(ev.CloseConnection(code=1000)))"))
    upgrade, *turns = records(tap, "cnt-ws", 3)
    assert (upgrade["status"], upgrade["counted"], upgrade["cost_usd"]) == (101, False, 0.0)
    assert [t["counted"] for t in turns] == [True, True]
    assert all(t["cost_usd"] and t["error"] is None for t in turns)
    refused = client(testbed, tap, """
        import socket, ssl
        import wsproto
        from wsproto import events as ev
        tls = ssl.create_default_context(cafile=CA).wrap_socket(
            socket.create_connection(("api.openai.com", 443)), server_hostname="api.openai.com")
        ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
        tls.sendall(ws.send(ev.Request(host="api.openai.com", target="/v1/responses?t=cnt-ws-401",
                                       extra_headers=[(b"x-fake-reject", b"401")])))
        while not (seen := [e for e in (ws.receive_data(tls.recv(65536)) or ws.events())
                            if isinstance(e, ev.RejectConnection)]):
            pass
        print(json.dumps({"status": seen[0].status_code}))
    """)
    assert refused["status"] == 401
    [failed] = records(tap, "cnt-ws-401", 1)
    assert (failed["status"], failed["counted"], failed["cost_usd"]) == (401, False, 0.0)
    assert calls_of(tap, "gpt-5-2025-08-07") == 2  # the responses, not the connections
    assert stats(tap)["not_counted"] == before + 2


def restart(daemon: Daemon) -> None:
    """Stops the daemon and starts it again, same config, state and records (in place)."""
    daemon.stop()
    stderr = open(daemon.stderr_path, "ab")  # noqa: SIM115 - the daemon keeps writing to it
    daemon.proc = subprocess.Popen(["ip", "netns", "exec", daemon.bed.client_ns, LLMTAP, "run",
                                    "--config", str(daemon.config_path)],
                                   stdout=stderr, stderr=stderr, env=clean_env())
    daemon.wait_ready()


SDK = """
import openai
sdk = openai.OpenAI(api_key="sk-placeholder", max_retries=0,
                    http_client=openai.DefaultHttpxClient(verify=CA))
"""


def test_a_retrieval_after_a_restart_is_still_a_repeat(testbed, tap):
    """The ids already billed are found in the records index by the restarted (unprivileged)
    worker: what the old one remembered went with it."""
    out = client(testbed, tap, SDK + textwrap.dedent("""
        tag = {"t": "cnt-restart"}
        created = sdk.responses.create(model="gpt-4.1-mini", input="Hi", background=True,
                                       extra_query=tag)
        while sdk.responses.retrieve(created.id, extra_query=tag).status != "completed":
            pass
        print(json.dumps({"id": created.id}))
    """))
    assert [r["counted"] for r in records(tap, "cnt-restart", 3)] == [False, False, True]
    restart(tap)
    client(testbed, tap, SDK + textwrap.dedent(f"""
        sdk.responses.retrieve({out["id"]!r}, extra_query={{"t": "cnt-restart-after"}})
        print("{{}}")
    """))
    [again] = records(tap, "cnt-restart-after", 1)
    assert (again["counted"], again["repeat_of"], again["cost_usd"]) == (False, out["id"], 0.0)


# --- no false error on a complete exchange, whatever the client does after its final event -----


def hang_up_after(url: str, body: dict[str, Any], headers: dict[str, str], size: int) -> str:
    """Client code: reads `size` bytes of the reply (all its events) and hangs up at once."""
    return f"""
        got = b""
        with httpx.Client(verify=CA, timeout=30) as http:
            with http.stream("POST", {url!r}, content=json.dumps({body!r}),
                             headers={{"content-type": "application/json", **{headers!r}}}) as r:
                for piece in r.iter_raw():
                    got += piece
                    if len(got) >= {size}:
                        break  # and hang up: the last chunk (or ]) has not come yet
        print(json.dumps({{"size": len(got)}}))
    """


LATE = {"x-fake-pause-ms": "0", "x-fake-trailer-delay-ms": "1500"}


def test_hanging_up_after_the_last_sse_event_of_an_uncompressed_stream_is_no_error(testbed, tap):
    stream = streams.anthropic_messages_stream()
    out = client(testbed, tap, hang_up_after(
        "https://api.anthropic.com/v1/messages?t=cnt-sse-end", {"model": "claude-sonnet-4-5",
                                                                "stream": True},
        {"x-fake-fixture": "anthropic_messages_stream.sse", **LATE}, len(stream)))
    assert out["size"] == len(stream)
    [record] = records(tap, "cnt-sse-end", 1)
    assert record["error"] is None and record["stop_reason"] == "tool_use"
    assert record["usage"] == usage(472, 189, read=10240, w5m=1536, w1h=512, reasoning=None)
    assert any("after the complete response" in n for n in record["notes"])


def test_hanging_up_after_done_is_no_error(testbed, tap):
    stream = streams.openai_chat_stream()
    out = client(testbed, tap, hang_up_after(
        "https://api.openai.com/v1/chat/completions?t=cnt-done",
        {"model": "gpt-4o", "stream": True, "stream_options": {"include_usage": True},
         "messages": []}, {"x-fake-fixture": "openai_chat_stream.sse", **LATE}, len(stream)))
    assert out["size"] == len(stream)
    [record] = records(tap, "cnt-done", 1)
    assert record["error"] is None and record["usage"] == usage(210, 56, read=1024)


def test_hanging_up_before_a_gemini_arrays_closing_bracket_is_no_error(testbed, tap):
    array = streams.gemini_stream_json()
    assert array.endswith(b"]")
    out = client(testbed, tap, hang_up_after(
        "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.5-flash:"
        "streamGenerateContent?t=cnt-array", {}, {**LATE, "x-fake-tail-bytes": "1"},
        len(array) - 1))
    assert out["size"] == len(array) - 1
    [record] = records(tap, "cnt-array", 1)
    assert record["error"] is None, record["error"]
    assert record["usage"] == usage(114, 368, read=4096, reasoning=320)
    assert any("closing bracket" in n for n in record["notes"])


def test_a_stream_cut_before_its_final_event_keeps_its_error(testbed, tap):
    stream = streams.anthropic_messages_stream()
    cut = len(stream) // 2  # well before message_stop, whatever the pieces' sizes
    client(testbed, tap, hang_up_after(
        "https://api.anthropic.com/v1/messages?t=cnt-cut", {"model": "claude-sonnet-4-5",
                                                            "stream": True},
        {"x-fake-fixture": "anthropic_messages_stream.sse", "x-fake-pause-ms": "300"}, cut))
    [record] = records(tap, "cnt-cut", 1)
    assert record["error"].startswith("Client disconnected.; llmtap: stream ended")
    array = streams.gemini_stream_json()
    client(testbed, tap, hang_up_after(
        "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.5-flash:"
        "streamGenerateContent?t=cnt-array-cut", {}, {"x-fake-pause-ms": "300"}, len(array) // 2))
    [record] = records(tap, "cnt-array-cut", 1)
    assert record["error"]


def test_an_http2_reset_after_the_final_event_is_no_error(testbed, tap):
    stream = streams.anthropic_messages_stream()
    client(testbed, tap, f"""
        import socket, ssl
        import h2.config, h2.connection, h2.errors, h2.events
        context = ssl.create_default_context(cafile=CA)
        context.set_alpn_protocols(["h2"])
        sock = context.wrap_socket(socket.create_connection(("api.anthropic.com", 443)),
                                   server_hostname="api.anthropic.com")
        assert sock.selected_alpn_protocol() == "h2"
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        body = json.dumps({{"model": "claude-sonnet-4-5", "stream": True}}).encode()
        conn.send_headers(1, [(":method", "POST"), (":path", "/v1/messages?t=cnt-rst"),
                              (":authority", "api.anthropic.com"), (":scheme", "https"),
                              ("content-type", "application/json"),
                              ("content-length", str(len(body))),
                              ("x-fake-fixture", "anthropic_messages_stream.sse"),
                              ("x-fake-pause-ms", "0"), ("x-fake-trailer-delay-ms", "1500")])
        conn.send_data(1, body, end_stream=True)
        sock.sendall(conn.data_to_send())
        got = b""
        while len(got) < {len(stream)}:
            for event in conn.receive_data(sock.recv(65536)):
                if isinstance(event, h2.events.DataReceived):
                    got += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, 1)
            sock.sendall(conn.data_to_send())
        conn.reset_stream(1, h2.errors.ErrorCodes.CANCEL)  # every event is in: RST_STREAM
        sock.sendall(conn.data_to_send())
        time.sleep(0.5)
        sock.close()
        print(json.dumps({{"size": len(got)}}))
    """)
    [record] = records(tap, "cnt-rst", 1)
    assert record["http_version"] == "HTTP/2.0"
    assert record["error"] is None and record["stop_reason"] == "tool_use"
    assert any("after the complete response" in n for n in record["notes"]), record.get("notes")


def test_a_websocket_closed_right_after_response_completed_is_no_error(testbed, tap):
    client(testbed, tap, ws_client("cnt-ws-drop", 1, "tls.close()"))  # no close frame at all
    upgrade, turn = records(tap, "cnt-ws-drop", 2)
    assert turn["error"] is None and turn["counted"] is True and turn["stop_reason"] == "completed"
    assert upgrade["counted"] is False and upgrade["error"] is None
    assert len(records(tap, "cnt-ws-drop", 3, timeout=2)) == 2  # the upgrade recorded once


def test_no_addon_failed_along_the_way(tap):
    assert tap.proc.poll() is None
    log = tap.stderr()
    assert "Addon error" not in log and "Traceback" not in log, log
