"""Process attribution (the supervisor's lookup and the worker's addon), live events, the
supervisor's fan-out, the control socket's subscribe stream, and the dashboard's rendering."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from llmtap import control, proclookup
from llmtap.addons.attribution import Attribution
from llmtap.addons.live import Live
from llmtap.addons.streams import Streams
from llmtap.config import Config, DashboardConfig
from llmtap.context_windows import context_window
from llmtap.dashboard import History, State
from llmtap.dashboard_view import render
from llmtap.flow import fields
from llmtap.livehub import LiveHub
from llmtap.platform.linux import sockets
from mitmproxy.test import taddons, tflow
from rich.console import Console


def connected_pair(family: int) -> tuple[socket.socket, socket.socket, socket.socket]:
    host = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    server = socket.socket(family, socket.SOCK_STREAM)
    server.bind((host, 0))
    server.listen()
    client = socket.create_connection(server.getsockname()[:2])
    accepted, _ = server.accept()
    return server, client, accepted


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_lookup_finds_the_process_of_a_local_address(family):
    if sys.platform != "linux":
        pytest.skip("the /proc path is Linux's")
    server, client, accepted = connected_pair(family)
    try:
        ip, port = client.getsockname()[:2]
        found = proclookup.Lookup().find(ip, port)
        assert found is not None
        assert found["pid"] == os.getpid()
        assert found["exe"] == os.path.realpath(sys.executable)
        assert found["tool"] == "python"
        assert found["user"]
    finally:
        for sock in (server, client, accepted):
            sock.close()


def test_lookup_names_a_child_process_and_its_parent_chain(tmp_path):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    script = tmp_path / "claude"  # an agent run by an interpreter: named by its script
    script.write_text(textwrap.dedent(f"""
        import socket, time
        s = socket.create_connection(("127.0.0.1", {server.getsockname()[1]}))
        time.sleep(30)
    """))
    child = subprocess.Popen([sys.executable, str(script), "--api-key", "sk-proj-SECRETSECRET"])
    try:
        accepted, peer = server.accept()
        found = proclookup.Lookup().find(*peer)
        assert found is not None and found["pid"] == child.pid
        assert found["tool"] == "claude"
        assert "SECRETSECRET" not in found["cmdline"] and str(script) in found["cmdline"]
        assert found["parents"][0]["pid"] == os.getpid()
        accepted.close()
    finally:
        child.kill()
        child.wait()
        server.close()


def test_tool_names():
    assert proclookup.tool_name("claude", ["claude"]) == "claude"
    assert proclookup.tool_name("node", ["node", "/usr/lib/node_modules/@openai/codex/bin/codex.js"]) \
        == "codex"
    assert proclookup.tool_name("python3.12", ["python3", "x.py"]) == "python"
    assert proclookup.tool_name("curl", ["curl", "-s"]) is None


def test_lookup_answer_survives_garbage():
    lookup = proclookup.Lookup()
    for message in (b"not json", b'{"id": 1}', b'{"id": 2, "ip": "x", "port": 1}',
                    b'{"id": 3, "ip": "127.0.0.1", "port": 99999}'):
        reply = json.loads(proclookup.answer(lookup, message))
        assert reply["process"] is None and "error" in reply
    assert json.loads(proclookup.answer(lookup, b'{"id": 4, "ip": "127.0.0.1", "port": 1}')) == {
        "id": 4, "process": None}


def test_proc_net_addresses_decode():
    assert sockets._hex_address("0100007F:1F90") == ("127.0.0.1", 8080)
    assert sockets._hex_address("00000000000000000000000001000000:0050") == ("::1", 80)
    assert sockets._hex_address("0000000000000000FFFF00000100007F:0050") == ("127.0.0.1", 80)


def test_attribution_addon_asks_at_connect_and_fills_the_flows():
    service = proclookup.LookupService()
    service.start = lambda: None  # type: ignore[method-assign] # this test answers by hand
    addon = Attribution(service.client)
    flow = tflow.tflow(resp=True)
    flow.client_conn.peername = ("127.0.0.1", 50000)
    late = tflow.tflow(resp=True)
    late.client_conn = flow.client_conn
    with taddons.context(addon):
        addon.client_connected(flow.client_conn)
        asked = json.loads(service.server.recv(1000))
        assert asked == {"id": flow.client_conn.id, "ip": "127.0.0.1", "port": 50000}
        addon.requestheaders(flow)  # no answer yet: the flow waits for it
        assert "process" not in fields(flow)
        service.server.send(json.dumps({"id": asked["id"], "process": {"pid": 7}}).encode())
        addon.channel.setblocking(False)
        addon._receive()
        addon.requestheaders(late)
    assert fields(flow)["process"] == {"pid": 7} and fields(late)["process"] == {"pid": 7}
    service.close()
    service.client.close()


def test_live_events_start_throttled_updates_end(monkeypatch):
    live = Live()
    flow = tflow.tflow(resp=True)
    fields(flow).update(model="claude-sonnet-4-5", request={"max_tokens": 100},
                        process={"pid": 5, "name": "node", "tool": "claude"})
    with taddons.context(live):
        live.requestheaders(flow)
        live.request(flow)
        flow.response.stream = True
        Streams(response=(live,)).responseheaders(flow)
        clock = [100.0]
        monkeypatch.setattr("llmtap.addons.live.time.monotonic", lambda: clock[0])
        for _ in range(10):
            clock[0] += 0.1
            assert flow.response.stream(b"data: {}\n\n") == [b"data: {}\n\n"]
        events = live.drain()
        fields(flow).update(usage={"output_tokens": 12}, cost_usd="0.0003")
        live.response(flow)
        ended = live.drain()
    assert [e["type"] for e in events] == ["start", "update"]
    assert events[0]["model"] == "claude-sonnet-4-5" and events[0]["max_tokens"] == 100
    assert events[0]["process"] == {"pid": 5, "name": "node", "tool": "claude", "user": None}
    assert events[1]["chunks"] >= 9 and events[1]["output_tokens_estimate"] >= 9  # coalesced
    assert [e["type"] for e in ended] == ["end"]
    assert ended[0]["cost_usd"] == 0.0003 and ended[0]["chunks"] == 10


def test_hub_tracks_active_requests_and_streams_to_subscribers():
    hub = LiveHub(lambda: {"requests": 3})
    hub.publish([{"type": "start", "id": "a", "model": "m"}, {"type": "start", "id": "b"},
                 {"type": "update", "id": "a", "chunks": 4}, {"type": "end", "id": "b"}])
    ours, theirs = socket.socketpair()
    thread = threading.Thread(target=hub.serve, args=(theirs,), daemon=True)
    thread.start()
    lines = ours.makefile("r")
    snapshot = json.loads(lines.readline())
    assert snapshot["type"] == "snapshot" and snapshot["counters"] == {"requests": 3}
    assert snapshot["active"] == [{"type": "start", "id": "a", "model": "m", "chunks": 4}]
    deadline = time.monotonic() + 5
    while hub.subscribers() == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    hub.publish([{"type": "end", "id": "a"}])
    assert json.loads(lines.readline()) == {"type": "end", "id": "a"}
    assert json.loads(lines.readline())["type"] == "counters"  # the heartbeat
    lines.close()
    ours.close()
    thread.join(timeout=5)
    assert hub.subscribers() == 0


@pytest.mark.skipif(os.geteuid() != 0, reason="the control socket is root's")
def test_control_subscribe_stream(tmp_path):
    hub = LiveHub(dict)
    path = tmp_path / "control.sock"
    server = control.ControlServer(path, "root", 0, lambda m: {"ok": True},
                                   streams={"subscribe": hub.serve})
    try:
        assert control.request(path, {"cmd": "status"}) == {"ok": True}
        events = control.subscribe(path)
        assert events is not None and next(events)["type"] == "snapshot"
        hub.publish([{"type": "start", "id": "x"}])
        assert next(events) == {"type": "start", "id": "x"}
        events.close()  # type: ignore[attr-defined]
    finally:
        server.close()
    assert control.subscribe(path) is None  # no daemon: the dashboard falls back to the index


def dashboard_state(cost: float, budget: float) -> State:
    config = Config(dashboard=DashboardConfig(daily_budget_usd=budget, alert_at=(0.5, 0.8, 1.0)))
    state = State(config, connected=True, counters={"requests": 4, "records_written": 3})
    state.apply({"type": "snapshot", "counters": state.counters, "active": [{
        "type": "start", "id": "f1", "ts": time.time() - 2, "model": "claude-sonnet-4-5",
        "host": "api.anthropic.com", "method": "POST", "path": "/v1/messages", "max_tokens": 200,
        "process": {"pid": 4242, "name": "node", "tool": "claude"}}]})
    state.apply({"type": "update", "id": "f1", "chunks": 30, "output_tokens_estimate": 50})
    state.history = History(
        totals={"calls": 3, "input_tokens": 1200, "output_tokens": 300, "cost_usd": cost, "priced": 3},
        per_process=[{"key": "claude", "calls": 2, "cost_usd": cost}],
        context=[{"model": "claude-sonnet-4-5", "used": 150_000, "window": context_window(
            "claude-sonnet-4-5")}],
        source="index")
    return state


def screen(state: State) -> str:
    console = Console(record=True, width=150, height=40, color_system=None)
    console.print(render(state, 150))
    return console.export_text()


def test_dashboard_renders_cards_gauge_context_and_processes():
    state = dashboard_state(cost=0.2, budget=1.0)
    assert state.check_budget() is False
    text = screen(state)
    for expected in ("Active requests (1)", "claude-sonnet-4-5 · claude/node[4242]", "out ~50 tok",
                     "50/200 max_tokens", "budget $0.2000 of $1.00 (20%)",
                     "claude-sonnet-4-5: 150.0k/200.0k (75%)", "Cost per process", "llmtap · live"):
        assert expected in text, expected


def test_dashboard_budget_alert_rings_once_per_threshold():
    state = dashboard_state(cost=0.85, budget=1.0)
    assert state.check_budget() is True  # 50% and 80% crossed
    assert state.check_budget() is False  # already rung today
    assert "budget alert: $0.8500 spent today, 85% of the $1.00 daily budget" in screen(state)
    state.history.totals["cost_usd"] = 1.2
    assert state.check_budget() is True


def test_dashboard_without_daemon_says_so():
    state = dashboard_state(cost=0.0, budget=0.0)
    state.connected, state.active = False, {}
    text = screen(state)
    assert "daemon not running · history from the index" in text and "no requests in flight" in text


def test_attribution_is_in_the_pipeline():
    from llmtap import addons

    assert addons.STAGES["attribution"] is Attribution
    assert Path(proclookup.__file__).name == "proclookup.py"



@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_exact_netlink_lookup_finds_the_same_socket_as_proc(host):
    from llmtap.platform.linux.sockets import diag_socket_inode, socket_inode

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.create_server((host, 0), family=family) as server:
        client = socket.create_connection(server.getsockname()[:2])
        accepted, _ = server.accept()
        with client, accepted:
            local, remote = client.getsockname()[:2], client.getpeername()[:2]
            found = diag_socket_inode(local, remote)
            assert found is not None and found == socket_inode(*local)
            assert diag_socket_inode(local, (remote[0], remote[1] + 1 or 1)) is None


def test_a_stream_that_started_before_its_process_was_known_names_it_in_an_update(monkeypatch):
    """On a busy machine the lookup answers after the request: the live views must not show
    "unknown process" for the whole stream."""
    clock = [100.0]
    monkeypatch.setattr("llmtap.addons.live.time.monotonic", lambda: clock[0])
    live = Live()
    flow = tflow.tflow(resp=True)
    with taddons.context(live):
        live.requestheaders(flow)
        live.request(flow)
        flow.response.stream = True
        Streams(response=(live,)).responseheaders(flow)
        flow.response.stream(b"data: {}\n\n")
        fields(flow)["process"] = {"pid": 5, "name": "curl"}  # the answer arrives
        clock[0] += 1
        flow.response.stream(b"data: {}\n\n")
        first = live.drain()
        clock[0] += 1
        flow.response.stream(b"data: {}\n\n")
        later = live.drain()
    assert first[0]["type"] == "start" and first[0]["process"] is None
    assert [e.get("process", {}).get("name") for e in first[1:]] == ["curl"]
    assert all("process" not in e for e in later)  # said once


@pytest.mark.skipif(os.geteuid() != 0, reason="only root may lower a niceness")
def test_the_lookup_thread_runs_ahead_of_user_processes():
    """Its answers race short-lived clients: on a busy machine a late one names nobody."""
    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    service = proclookup.LookupService()
    worker_end = service.client.dup()  # the worker's: the service serves while it is open
    service.start()
    thread = service._thread
    assert thread is not None and thread.native_id is not None
    stat = Path(f"/proc/self/task/{thread.native_id}/stat")

    def nice() -> int:
        return int(stat.read_text().rsplit(")", 1)[1].split()[16])

    deadline = time.monotonic() + 5
    while nice() != proclookup.LOOKUP_NICE and time.monotonic() < deadline:
        time.sleep(0.01)
    assert nice() == proclookup.LOOKUP_NICE
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine  # that thread only
    worker_end.close()
    service.close()
