"""Budgets and rate limits end to end: the official SDKs and curl in the client namespace, no
proxy settings, one daemon (restarted by the last test), the fake upstream.

Each test covers its calls with a budget or limit on a model of its own (the fake upstream's
default /v1/messages and /v1/chat/completions answer with the model asked for), tags its requests
with `t=` and removes its budgets and limits when done.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import pytest
from test_protocols_e2e import client, records, upstream_seen
from testbed import LLMTAP, Daemon, Testbed, clean_env, running_daemon, wait_for

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def tap(testbed: Testbed) -> Iterator[Daemon]:
    with running_daemon(testbed) as daemon:
        yield daemon


def policy(daemon: Daemon) -> dict[str, dict[str, Any]]:
    """The daemon's budgets and limits with their use, by name (`llmtap status`)."""
    rows = daemon.status().get("counters", {}).get("policy") or []
    return {row["name"]: row for row in rows}


def set_rule(daemon: Daemon, kind: str, name: str, *options: str) -> dict[str, Any]:
    """`llmtap budget|limit set`, then waits for the daemon to apply it."""
    daemon.llmtap(kind, "set", name, *options)
    assert wait_for(lambda: name in policy(daemon), timeout=8), f"{name} not applied"
    return policy(daemon)[name]


def remove(daemon: Daemon, kind: str, name: str) -> None:
    daemon.llmtap(kind, "rm", name)
    assert wait_for(lambda: name not in policy(daemon), timeout=8)


ANTHROPIC_CALLS = """
    import anthropic
    sdk = anthropic.Anthropic(api_key="sk-ant-placeholder",  # default retries: must not retry
                              http_client=anthropic.DefaultHttpxClient(verify=CA))
    def call(tag, model, usage, max_tokens=100, retries=2):
        headers = {"x-fake-usage": json.dumps(usage), "x-fake-pause-ms": "40"}
        ask = dict(model=model, max_tokens=max_tokens, extra_query={"t": tag}, extra_headers=headers,
                   messages=[{"role": "user", "content": "Hi"}])
        try:
            with sdk.with_options(max_retries=retries).messages.stream(**ask) as stream:
                stream.get_final_message()
            return {"ok": True}
        except anthropic.RateLimitError as exc:
            return {"ok": False, "status": exc.status_code, "message": exc.message,
                    "type": exc.body["error"]["type"], "retry_after": exc.response.headers.get("retry-after")}
"""


def with_calls(code: str) -> str:
    return textwrap.dedent(ANTHROPIC_CALLS) + textwrap.dedent(code)


def test_a_daily_budget_hit_mid_sequence_fails_the_next_call_with_the_sdks_rate_limit_error(
        testbed, tap):
    # each call costs $0.0015 (1000 in, 100 out at haiku's $1/$5) and reserves ~$0.0005
    set_rule(tap, "budget", "seq", "--daily", "0.004", "--model", "claude-haiku-4-5")
    try:
        out = client(testbed, tap, with_calls("""
        results = []
        for i in range(8):
            results.append(call("bud-seq", "claude-haiku-4-5", {"input_tokens": 1000, "output_tokens": 100}))
            if not results[-1]["ok"]:
                break
        print(json.dumps(results))
        """))
        assert [r["ok"] for r in out] == [True, True, True, False]
        refusal = out[-1]
        assert refusal["status"] == 429 and refusal["type"] == "rate_limit_error"
        assert "llmtap: budget 'seq'" in refusal["message"]
        assert "sudo llmtap budget set seq --daily" in refusal["message"]
        assert int(refusal["retry_after"]) > 0
        found = records(tap, "bud-seq", 4)
        assert len(found) == 4  # the SDK did not retry the refusal
        assert len(upstream_seen(testbed, "bud-seq")) == 3  # the upstream saw nothing of it
        blocked = found[-1]
        assert blocked["policy"] == {"budgets": ["seq"], "limits": [], "decision": "blocked",
                                     "budget": "seq"}
        assert blocked["status"] == 429 and "budget 'seq'" in blocked["error"]
        spent = sum(r["cost_usd"] for r in found[:3])
        estimate = found[0]["policy"]["estimate_usd"]
        assert spent + estimate > 0.004 >= spent - found[2]["cost_usd"] + estimate
        shown = policy(tap)["seq"]
        assert shown["spent_today"] == pytest.approx(spent) and shown["in_flight"] == 0
        listed = tap.llmtap("budget", "list").stdout
        assert "seq: $0.0045 of $0.0040 today" in listed
        by_budget = json.loads(tap.llmtap("stats", "--by", "budget", "--json").stdout)["groups"]
        assert {g["key"]: g["calls"] for g in by_budget}.get("seq") == 4
    finally:
        remove(tap, "budget", "seq")


def test_parallel_streamed_calls_overshoot_a_nearly_spent_budget_by_no_more_than_in_flight(
        testbed, tap):
    set_rule(tap, "budget", "par", "--daily", "100", "--model", "claude-sonnet-4-5")
    usage = {"input_tokens": 2000, "output_tokens": 300}  # $0.0105; each reserves ~$0.015
    try:
        client(testbed, tap, with_calls(f"""
        print(json.dumps(call("bud-par-0", "claude-sonnet-4-5", {usage}, max_tokens=1000)))
        """))
        first = records(tap, "bud-par-0", 1)[0]
        estimate, cost = first["policy"]["estimate_usd"], first["cost_usd"]
        assert 0 < cost < estimate
        assert wait_for(lambda: policy(tap)["par"]["spent_today"] > 0)
        cap = policy(tap)["par"]["spent_today"] + 3.5 * estimate  # room for three reservations
        set_rule(tap, "budget", "par", "--daily", f"{cap:.6f}")
        assert wait_for(lambda: policy(tap)["par"]["daily"] == pytest.approx(cap, abs=1e-6))
        out = client(testbed, tap, with_calls(f"""
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(20) as pool:
            results = list(pool.map(lambda i: call("bud-par", "claude-sonnet-4-5", {usage},
                                                   max_tokens=1000), range(20)))
        print(json.dumps(results))
        """))
        admitted = [r for r in out if r["ok"]]
        refused = [r for r in out if not r["ok"]]
        assert len(admitted) == 3 and len(refused) == 17
        assert all("budget 'par'" in r["message"] for r in refused)
        assert len(upstream_seen(testbed, "bud-par")) == 3
        records(tap, "bud-par", 20)
        assert wait_for(lambda: policy(tap)["par"]["in_flight"] == 0)
        spent = policy(tap)["par"]["spent_today"]
        in_flight_estimate = len(admitted) * estimate
        assert spent - cap <= in_flight_estimate
        assert spent <= cap  # here the estimates were upper bounds: no overshoot at all
    finally:
        remove(tap, "budget", "par")


def test_a_rate_limit_returns_429_with_retry_after(testbed, tap):
    set_rule(tap, "limit", "rl", "--rpm", "2", "--model", "gpt-4.1-nano")
    try:
        url = "https://api.openai.com/v1/chat/completions?t=rl-curl"
        answers = []
        for _ in range(3):
            done = testbed.curl(url, tap.ca_pem, "-i", "-H", "content-type: application/json",
                                "-d", json.dumps({"model": "gpt-4.1-nano", "messages": []}))
            answers.append(done.stdout.replace("\r\n", "\n"))
        assert all(" 200" in a.split("\n", 1)[0] for a in answers[:2])
        head, body = answers[2].split("\n\n", 1)
        assert " 429" in head.split("\n", 1)[0]
        headers = dict(line.lower().split(": ", 1) for line in head.split("\n")[1:])
        assert 1 <= int(headers["retry-after"]) <= 60
        error = json.loads(body)["error"]
        assert error["code"] == "llmtap_rate_limited" and "rate limit 'rl'" in error["message"]
        assert len(upstream_seen(testbed, "rl-curl")) == 2
        out = client(testbed, tap, """
        import openai
        sdk = openai.OpenAI(api_key="sk-placeholder", max_retries=0,
                            http_client=openai.DefaultHttpxClient(verify=CA))
        try:
            sdk.chat.completions.create(model="gpt-4.1-nano", messages=[], extra_query={"t": "rl-sdk"})
            print(json.dumps({"ok": True}))
        except openai.RateLimitError as exc:
            print(json.dumps({"code": exc.code, "message": exc.message}))
        """)
        assert out["code"] == "llmtap_rate_limited" and "'rl'" in out["message"]
        assert policy(tap)["rl"]["calls_last_minute"] == 2
    finally:
        remove(tap, "limit", "rl")


AS_NOBODY = """
import os, sys
from llmtap.cli import main  # imported as root: root's interpreter is closed to nobody
os.setgroups([])
os.setgid(65534)
os.setuid(65534)
sys.exit(main(sys.argv[1:]))
"""


def as_nobody(daemon: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    return daemon.bed.client(sys.executable, "-c", AS_NOBODY, *args, "--config",
                             str(daemon.config_path), check=False)


def test_only_root_changes_budgets(testbed, tap):
    set_rule(tap, "budget", "guard", "--daily", "1", "--model", "no-such-model")
    try:
        before = (tap.state_dir / "budgets.json").read_bytes()
        assert (tap.state_dir / "budgets.json").stat().st_uid == 0
        for args in (("budget", "set", "guard", "--daily", "1000"), ("budget", "rm", "guard"),
                     ("limit", "set", "mine", "--rpm", "1")):
            done = as_nobody(tap, *args)
            assert done.returncode != 0 and "needs root" in done.stderr, done
            assert len(done.stderr.strip().splitlines()) == 1  # one line, no traceback
        # nor around the CLI: the state directory is closed to other users
        sneak = testbed.client("runuser", "-u", "nobody", "--", "sh", "-c",
                               f"echo '{{}}' > {tap.state_dir}/budgets.json", check=False)
        assert sneak.returncode != 0
        assert (tap.state_dir / "budgets.json").read_bytes() == before
        bad = tap.llmtap("budget", "set", "guard", "--daily", "-5", check=False)
        assert bad.returncode != 0 and bad.stderr.strip().count("\n") == 0
        assert "--daily must be an amount of USD above 0" in bad.stderr
    finally:
        remove(tap, "budget", "guard")


def test_budgets_and_limits_survive_a_daemon_restart(testbed, tap):
    set_rule(tap, "limit", "keep", "--rpm", "1", "--model", "claude-opus-4-5")
    set_rule(tap, "budget", "kept", "--daily", "50", "--model", "claude-opus-4-5")
    try:
        client(testbed, tap, with_calls("""
        print(json.dumps(call("keep-1", "claude-opus-4-5", {"input_tokens": 100, "output_tokens": 10})))
        """))
        records(tap, "keep-1", 1)
        assert wait_for(lambda: policy(tap)["kept"]["spent_today"] > 0)
        spent = policy(tap)["kept"]["spent_today"]
        restart(tap)
        shown = policy(tap)
        assert shown["keep"]["rpm"] == 1 and shown["kept"]["daily"] == 50
        assert shown["kept"]["spent_today"] == pytest.approx(spent)  # from the records index
        # the rpm window restarts empty: one call goes, the next waits
        out = client(testbed, tap, with_calls("""
        usage = {"input_tokens": 100, "output_tokens": 10}
        print(json.dumps([call("keep-2", "claude-opus-4-5", usage, retries=0) for _ in range(2)]))
        """))
        assert out[0]["ok"] and not out[1]["ok"]
        assert "rate limit 'keep'" in out[1]["message"] and int(out[1]["retry_after"]) >= 1
    finally:
        remove(tap, "limit", "keep")
        remove(tap, "budget", "kept")


def restart(daemon: Daemon) -> None:
    """Stops the daemon and starts it again on the same config, state and records."""
    assert daemon.stop() == 0
    stderr = open(daemon.stderr_path, "ab")  # noqa: SIM115 - the daemon keeps writing to it
    daemon.proc = subprocess.Popen(
        ["ip", "netns", "exec", daemon.bed.client_ns, LLMTAP, "run", "--config",
         str(daemon.config_path)], stdout=stderr, stderr=stderr, env=clean_env())
    daemon.wait_ready()


WS_TURN = """
    import socket, ssl
    import wsproto
    from wsproto import events as ev
    tls = ssl.create_default_context(cafile=CA).wrap_socket(
        socket.create_connection(("api.openai.com", 443)), server_hostname="api.openai.com")
    ws = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
    tls.sendall(ws.send(ev.Request(host="api.openai.com", target="/v1/responses?t=bud-ws",
                                   extra_headers=[(b"authorization", b"Bearer sk-placeholder")])))
    def first(kind):
        while True:
            ws.receive_data(tls.recv(65536))
            for event in ws.events():
                if isinstance(event, kind):
                    return event
    first(ev.AcceptConnection)
    tls.sendall(ws.send(ev.TextMessage(open(CREATE).read().strip())))
    reply = json.loads(first(ev.TextMessage).data)
    tls.sendall(ws.send(ev.CloseConnection(code=1000)))
    print(json.dumps(reply))
"""


def test_a_budget_also_holds_each_response_asked_for_over_a_websocket(testbed, tap):
    """The upgrade is one request; every response.create after it is a call the budget must see."""
    import streams

    set_rule(tap, "budget", "wsb", "--daily", "0.03", "--model", "gpt-5*")  # one turn reserves $0.04
    try:
        create = repr(str(streams.DIR / "openai_responses_ws_client.json"))
        reply = client(testbed, tap, WS_TURN.replace("CREATE", create))
        assert reply["type"] == "error" and reply["error"]["code"] == "llmtap_budget_exceeded"
        assert "budget 'wsb'" in reply["error"]["message"]
        upgrade, turn = records(tap, "bud-ws", 2)
        assert upgrade["status"] == 101 and "llmtap_budget_exceeded" in (turn["error"] or "")
        assert not turn["usage"] or not turn["cost_usd"]
        assert policy(tap)["wsb"]["spent_today"] == 0
    finally:
        remove(tap, "budget", "wsb")


def test_no_addon_failed_along_the_way(tap):
    assert "Addon error" not in tap.stderr()
    assert "Traceback" not in tap.stderr()
