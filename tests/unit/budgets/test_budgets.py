"""Budgets and rate limits: the policy file, the spend ledger, the estimate, and the budgets
stage alone (mitmproxy's taddons/tflow, an injected clock)."""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

import pytest
from llmtap import budgets as policy_mod
from llmtap.addons.budgets import Budgets
from llmtap.addons.pricing import Pricing
from llmtap.addons.protocols import Protocols
from llmtap.budgets import Budget, Limit, Policy, Selectors, parse_policy, periods
from llmtap.errors import UsageError
from llmtap.flow import BLOCKED_HEADER, fields
from llmtap.price_data import bundled
from llmtap.pricing import Call, Pricer
from llmtap.records.index import Index, index_path, row_of
from llmtap.spend import DEFAULT_OUTPUT, estimate
from mitmproxy import http
from mitmproxy.test import taddons, tflow

ANTHROPIC = ("api.anthropic.com", "/v1/messages")
OPENAI = ("api.openai.com", "/v1/chat/completions")
GEMINI = ("generativelanguage.googleapis.com", "/v1beta/models/gemini-2.5-flash:generateContent")


def local(year: int, month: int, day: int, hour: int = 12, minute: int = 0) -> float:
    return datetime.datetime(year, month, day, hour, minute).timestamp()


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def sonnet_cost(input_tokens: int, output_tokens: int) -> float:
    quote = Pricer([bundled()]).quote(Call("claude-sonnet-4-5", {
        "input_tokens": input_tokens, "output_tokens": output_tokens}, *ANTHROPIC))
    assert quote.cost is not None
    return float(quote.cost)


class Stage:
    """The budgets stage with the protocols and pricing stages it reads."""

    def __init__(self, policy: Policy, now: float, events: list[dict[str, Any]] | None = None):
        self.clock = Clock(now)
        self.protocols, self.pricing = Protocols(), Pricing()
        self.events = events if events is not None else []
        self.budgets = Budgets(pricer=lambda: self.pricing.pricer,
                               request_info=self.protocols.request_info,
                               events=self.events.append, clock=self.clock)
        self.budgets.use(policy)

    def send(self, where: tuple[str, str] = ANTHROPIC, max_tokens: int = 1000,
             model: str = "claude-sonnet-4-5", credential: str | None = None,
             body_pad: int = 0) -> http.HTTPFlow:
        flow = tflow.tflow()
        body = {"model": model, "max_tokens": max_tokens, "pad": "x" * body_pad,
                "messages": [{"role": "user", "content": "hi"}]}
        flow.request = http.Request.make("POST", f"https://{where[0]}{where[1]}",
                                         json.dumps(body).encode(),
                                         {"content-type": "application/json"})
        flow.response = None
        if credential:
            fields(flow)["credential"] = credential
        self.protocols.request(flow)
        assert self.budgets.request(flow) is None
        return flow

    def finish(self, flow: http.HTTPFlow, cost: float, usage: dict[str, int] | None = None) -> None:
        flow.response = http.Response.make(200, b"{}")
        record = fields(flow)
        record.update({"cost_usd": cost, "counted": True, "model": "claude-sonnet-4-5",
                       "usage": usage or {"input_tokens": 10, "output_tokens": 10}})
        self.budgets.response(flow)


def refused(flow: http.HTTPFlow) -> dict[str, Any] | None:
    if flow.response is None:
        return None
    assert flow.response.status_code == 429
    assert flow.response.headers[BLOCKED_HEADER] == "budgets"
    body: dict[str, Any] = json.loads(flow.response.content or b"{}")
    return body


NOON = local(2026, 12, 2, 12)


# -- the policy file ------------------------------------------------------------------------------


def test_policy_round_trips_through_its_file():
    policy = Policy(
        (policy_mod.budget("team", 5.0, 100.0, "alert", 50, Selectors(secret="work", model="claude-*")),),
        (policy_mod.limit("agents", 10, 50_000, Selectors(process="/usr/bin/node", user="ci")),),
    )
    assert parse_policy(policy.to_json()) == policy


@pytest.mark.parametrize(("raw", "message"), [
    (b"[", "not valid JSON"),
    (b'{"budgets": {}}', "budgets must be a list"),
    (b'{"budgets": [{"name": "a b", "daily": 1}]}', "use 1-64 letters"),
    (b'{"budgets": [{"name": "a", "daily": -1}]}', "--daily must be an amount"),
    (b'{"budgets": [{"name": "a"}]}', "needs --daily or --monthly"),
    (b'{"budgets": [{"name": "a", "daily": 1, "action": "stop"}]}', "--action must be one of"),
    (b'{"budgets": [{"name": "a", "daily": 1, "alert_at": 0}]}', "--alert-at must be"),
    (b'{"budgets": [{"name": "a", "daily": "x"}]}', "budgets:"),
    (b'{"limits": [{"name": "a", "rpm": 0}]}', "--rpm must be"),
    (b'{"limits": [{"name": "a"}]}', "needs --rpm or --tpm"),
    (b'{"limits": [{"name": "a", "rpm": 1, "model": ""}]}', "--model must be"),
])
def test_a_bad_policy_is_one_line(raw, message):
    with pytest.raises(UsageError, match=message) as caught:
        parse_policy(raw)
    assert "\n" not in str(caught.value)


def test_selectors_match_secret_process_model_and_user():
    process = {"name": "node", "exe": "/usr/local/bin/node", "tool": "claude", "user": "alice"}
    call = {"credential": "work", "model": "claude-sonnet-4-5", "process": process}
    for where in (Selectors(), Selectors(secret="work"), Selectors(model="claude-*"),
                  Selectors(process="claude"), Selectors(process="node"),
                  Selectors(process="/usr/local/bin/node"), Selectors(user="alice")):
        assert where.matches(call), where
    for where in (Selectors(secret="home"), Selectors(model="gpt-*"), Selectors(process="python3"),
                  Selectors(user="bob"), Selectors(secret="work", user="bob")):
        assert not where.matches(call), where
    assert not Selectors(user="alice").matches({"process": None})  # unknown: not covered


def test_periods_and_resets_follow_local_midnight():
    assert periods(local(2026, 12, 31, 23, 59)) == ("2026-12-31", "2026-12")
    assert policy_mod.next_reset(local(2026, 12, 31, 23, 59)) == local(2027, 1, 1, 0)
    assert policy_mod.next_reset(local(2026, 12, 15), monthly=True) == local(2027, 1, 1, 0)
    assert policy_mod.month_start(local(2026, 12, 15)) == local(2026, 12, 1, 0)


# -- the estimate ---------------------------------------------------------------------------------


def test_the_estimate_is_request_bytes_over_four_in_and_max_tokens_out():
    pricer = Pricer([bundled()])

    class Info:
        provider, model, max_tokens = "anthropic", "claude-sonnet-4-5", 2000

    assert estimate(pricer, Info(), 4000, *ANTHROPIC) == pytest.approx(sonnet_cost(1000, 2000))
    Info.max_tokens = None  # none named: DEFAULT_OUTPUT
    assert estimate(pricer, Info(), 0, *ANTHROPIC) == pytest.approx(sonnet_cost(0, DEFAULT_OUTPUT))
    Info.model = "no-such-model"
    assert estimate(pricer, Info(), 4000, *ANTHROPIC) == 0.0


# -- the stage --------------------------------------------------------------------------------------


def test_a_block_budget_refuses_the_call_that_could_run_over_in_each_providers_shape():
    cap = sonnet_cost(1000, 1000) * 2.5  # room for two calls' estimates, not three
    stage = Stage(Policy((Budget("daily", daily=cap),)), NOON)
    with taddons.context(stage.budgets):
        first, second = stage.send(), stage.send()
        assert first.response is None and second.response is None
        third = stage.send()
        body = refused(third)
        assert body is not None and body["error"]["type"] == "rate_limit_error"
        message = body["error"]["message"]
        assert "'daily'" in message and "sudo llmtap budget set daily --daily" in message
        assert third.response is not None and third.response.headers["x-should-retry"] == "false"
        assert int(third.response.headers["retry-after"]) == 12 * 3600  # until local midnight
        assert fields(third)["policy"] == {"budgets": ["daily"], "limits": [], "decision": "blocked",
                                           "budget": "daily"}
        assert fields(third)["error"] == message
        openai = refused(stage.send(OPENAI, model="gpt-4o", max_tokens=5000))
        assert openai is not None and openai["error"]["code"] == "llmtap_budget_exceeded"
        gemini = refused(stage.send(GEMINI, model="gemini-2.5-flash", body_pad=400_000))
        assert gemini is not None and gemini["error"]["status"] == "RESOURCE_EXHAUSTED"
        # the real costs replace the reservations: room again
        stage.finish(first, 0.0001)
        stage.finish(second, 0.0001)
        assert stage.send().response is None


def test_parallel_calls_overshoot_by_no_more_than_their_estimates_missed():
    stage = Stage(Policy((Budget("daily", daily=1.0),)), NOON)
    with taddons.context(stage.budgets):
        probe = stage.send()
        one = stage.budgets.reserved[probe.id].estimate  # what each identical call reserves
        assert one == pytest.approx(sonnet_cost(len(probe.request.raw_content or b"") // 4, 1000))
        stage.budgets.error(probe)
        stage.budgets.ledger.add(periods(NOON)[0], {}, 1.0 - 3.5 * one)  # nearly spent
        flows = [stage.send() for _ in range(20)]
        admitted = [f for f in flows if f.response is None]
        assert len(admitted) == 3
        assert stage.budgets.in_flight(Budget("daily", daily=1.0), NOON) == pytest.approx(3 * one)
        for flow in admitted:  # each costs what it could at most
            stage.finish(flow, one)
        spent, _ = stage.budgets.ledger.spent(Budget("daily", daily=1.0), NOON)
        assert spent <= 1.0
        assert stage.budgets.in_flight(Budget("daily", daily=1.0), NOON) == 0


def test_an_error_releases_the_reservation():
    stage = Stage(Policy((Budget("daily", daily=1.0),)), NOON)
    with taddons.context(stage.budgets):
        flow = stage.send()
        assert stage.budgets.reserved
        flow.error = tflow.terr()
        stage.budgets.error(flow)
        assert not stage.budgets.reserved


def test_the_spend_resets_at_the_local_day_boundary_but_not_the_month():
    stage = Stage(Policy((Budget("b", daily=1.0, monthly=1.5),)), local(2026, 12, 2, 23, 50))
    with taddons.context(stage.budgets):
        stage.finish(stage.send(), 0.99)
        assert refused(stage.send()) is not None
        stage.clock.now = local(2026, 12, 3, 0, 1)  # a new day
        assert stage.send().response is None
        assert stage.budgets.ledger.spent(Budget("b", daily=1.0, monthly=1.5), stage.clock.now) == \
            pytest.approx((0.0, 0.99))
        stage.clock.now = local(2027, 1, 1, 0, 1)  # a new month: the old one is forgotten
        assert stage.budgets.ledger.spent(Budget("b", daily=1.0, monthly=1.5), stage.clock.now) == (0, 0)


def test_an_alert_budget_never_blocks_and_each_threshold_fires_once_per_period():
    events: list[dict[str, Any]] = []
    stage = Stage(Policy((Budget("watch", daily=1.0, action="alert", alert_at=50),)), NOON, events)
    with taddons.context(stage.budgets):
        for cost in (0.3, 0.3, 0.3, 0.3, 0.3):
            flow = stage.send()
            assert flow.response is None
            stage.finish(flow, cost)
        assert [(e["threshold"], e["period"]) for e in events] == [(50.0, "2026-12-02"),
                                                                     (100.0, "2026-12-02")]
        assert all(e["type"] == "alert" and "'watch'" in e["message"] for e in events)
        stage.clock.now = local(2026, 12, 3, 12)
        stage.finish(stage.send(), 0.6)
        assert events[-1]["period"] == "2026-12-03" and events[-1]["threshold"] == 50.0


def test_selectors_keep_other_calls_out_of_a_budget():
    stage = Stage(Policy((Budget("work", daily=0.0001, where=Selectors(secret="work")),)), NOON)
    with taddons.context(stage.budgets):
        assert refused(stage.send(credential="work")) is not None
        other = stage.send(credential="home")
        assert other.response is None and "policy" not in fields(other)


def test_a_rate_limit_refuses_with_retry_after_until_a_slot_frees():
    stage = Stage(Policy((), (Limit("rpm", rpm=2),)), NOON)
    with taddons.context(stage.budgets):
        assert stage.send().response is None
        stage.clock.now += 20
        assert stage.send().response is None
        stage.clock.now += 10
        body = refused(third := stage.send(OPENAI, model="gpt-4o"))
        assert body is not None and body["error"]["code"] == "llmtap_rate_limited"
        assert third.response is not None and third.response.headers["retry-after"] == "30"
        assert "x-should-retry" not in third.response.headers  # SDKs may wait and retry
        assert fields(third)["policy"]["decision"] == "rate_limited"
        stage.clock.now += 30.5  # the first call has left the minute
        assert stage.send().response is None


def test_a_tokens_per_minute_limit_counts_completed_calls():
    stage = Stage(Policy((), (Limit("tpm", tpm=1000),)), NOON)
    with taddons.context(stage.budgets):
        stage.finish(stage.send(), 0.0, {"input_tokens": 700, "output_tokens": 400})
        stage.clock.now += 15
        flow = stage.send()
        assert refused(flow) is not None
        assert flow.response is not None and flow.response.headers["retry-after"] == "45"
        assert stage.budgets.snapshot()[0]["tokens_last_minute"] == 1100


def test_spend_is_loaded_from_the_records_index_and_primes_the_alerts(tmp_path: Path):
    index = Index.open_writer(index_path(tmp_path))
    today = datetime.datetime.fromtimestamp(NOON, datetime.UTC).isoformat().replace("+00:00", "Z")
    old = datetime.datetime.fromtimestamp(local(2026, 11, 30), datetime.UTC).isoformat()
    index.add([row_of({"id": "a", "started_at": today, "cost_usd": 0.9, "credential": "work",
                       "model": "claude-sonnet-4-5", "process": {"name": "node"}}, "a.json"),
               row_of({"id": "b", "started_at": today, "cost_usd": 5.0, "counted": False}, "b.json"),
               row_of({"id": "c", "started_at": old, "cost_usd": 7.0}, "c.json")])
    index.close()
    events: list[dict[str, Any]] = []
    stage = Stage(Policy((Budget("work", daily=1.0, where=Selectors(secret="work",
                                                                    process="node")),)), NOON, events)
    with taddons.context(stage.budgets) as tctx:
        tctx.configure(stage.budgets, llmtap_records_dir=str(tmp_path))
        assert stage.budgets.snapshot()[0]["spent_today"] == pytest.approx(0.9)
        stage.finish(stage.send(credential="work"), 0.01)
    assert events == []  # 80% was crossed before the start: not again


def test_the_policy_file_is_read_again_when_it_changes(tmp_path: Path):
    stage = Stage(Policy(), NOON)
    with taddons.context(stage.budgets) as tctx:
        tctx.configure(stage.budgets, llmtap_state_dir=str(tmp_path))
        assert stage.budgets.policy == Policy()
        policy = Policy((Budget("tiny", daily=0.0001),))
        (tmp_path / "budgets.json").write_bytes(policy.to_json())
        stage.budgets._checked = float("-inf")  # as RECHECK_S later
        assert refused(stage.send()) is not None
        (tmp_path / "budgets.json").write_text("{not json")
        stage.budgets._checked = float("-inf")
        stage.budgets.refresh()
        assert stage.budgets.policy == policy  # a broken file leaves the last good one in force


def test_a_response_create_over_a_websocket_is_checked_like_a_request(monkeypatch):
    from mitmproxy.websocket import WebSocketMessage
    from wsproto.frame_protocol import Opcode

    def create(model: str) -> WebSocketMessage:
        body = {"type": "response.create", "response": {"model": model, "max_output_tokens": 1000}}
        return WebSocketMessage(Opcode.TEXT, True, json.dumps(body).encode())

    stage = Stage(Policy((Budget("ws", daily=0.001, where=Selectors(model="gpt-4.1")),)), NOON)
    flow = tflow.twebsocketflow(messages=False)
    flow.request.host, flow.request.path = "api.openai.com", "/v1/responses"
    injected: list[tuple[Any, ...]] = []
    with taddons.context(stage.budgets) as tctx:
        monkeypatch.setattr(tctx.master.commands, "call", lambda *args: injected.append(args))
        assert flow.websocket is not None
        flow.websocket.messages.append(create("gpt-4.1-nano"))  # not covered: it goes
        stage.budgets.websocket_message(flow)
        assert not flow.websocket.messages[-1].dropped and not injected
        flow.websocket.messages.append(create("gpt-4.1"))  # $0.008 of output could run over
        stage.budgets.websocket_message(flow)
    assert flow.websocket.messages[-1].dropped
    ((command, _, to_client, content, is_text),) = injected
    event = json.loads(content)
    assert (command, to_client, is_text, event["type"], event["error"]["code"]) == (
        "inject.websocket", True, True, "error", "llmtap_budget_exceeded")
    assert "budget 'ws'" in event["error"]["message"]
