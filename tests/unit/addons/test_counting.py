"""Every call counted once: which record bills a call, and what the history makes of the rest."""

from __future__ import annotations

import asyncio
import datetime
import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest
import streams
from llmtap.addons.counting import BilledIds, Counting, Decision, decide
from llmtap.addons.pricing import Pricing
from llmtap.addons.protocols import Protocols
from llmtap.flow import fields
from llmtap.records.index import COLUMNS, BilledLookup, Index, index_path
from llmtap.records.writer import RecordWriter
from test_protocols_addon import (
    JSON,
    SSE,
    T0,
    Collector,
    relay,
    request_flow,
    response_headers,
    run_addons,
    stream_headers,
    websocket_session,
)

RESP = "resp_bg1"
OPENAI = "api.openai.com"
GPT41_MINI = (36 * 0.40 + 87 * 1.60) / 1e6  # openai_responses.json: gpt-4.1-mini-2025-04-14


def stored(status: str, response_id: str = RESP) -> bytes:
    response = json.loads(streams.load("openai_responses.json"))
    response.update(id=response_id, status=status, background=True)
    if status not in ("completed", "failed", "incomplete", "cancelled"):
        response.update(output=[], usage=None)
    return json.dumps(response).encode()


def held(addons: tuple[Any, ...], method: str, path: str, body: bytes, request: Any = None,
         host: str = OPENAI, status: int = 200,
         content_type: dict[str, str] = JSON) -> dict[str, Any]:
    """One exchange with a held (sized) body through protocols, counting and pricing."""
    protocols, counting, pricing = addons
    flow = request_flow(host, path, request, method=method)
    protocols.request(flow)
    response_headers(flow, status, content_type, size=len(body))
    protocols.responseheaders(flow)
    flow.response.raw_content = body
    flow.response.timestamp_end = T0 + 0.5
    protocols.response(flow)
    counting.response(flow)
    pricing.response(flow)
    return fields(flow)


def streamed(addons: tuple[Any, ...], path: str, body: bytes, method: str = "GET",
             request: Any = None) -> dict[str, Any]:
    protocols, counting, pricing = addons
    flow = request_flow(OPENAI, path, request, method=method)
    protocols.request(flow)
    response_headers(flow, 200, SSE)
    stream_headers(protocols, flow)
    relay(protocols, flow, [body[i:i + 97] for i in range(0, len(body), 97)])
    counting.response(flow)
    pricing.response(flow)
    return fields(flow)


def pipeline(billed: BilledIds | None = None) -> tuple[Protocols, Counting, Pricing]:
    return Protocols(), Counting(billed or BilledIds()), Pricing()


# --- the decisions alone --------------------------------------------------------------------


@pytest.mark.parametrize(("record", "method", "path", "expected"), [
    ({"api": "responses", "response_id": "r1", "response_status": "completed"}, "POST",
     "/v1/responses", Decision(True, "r1")),
    ({"api": "responses", "response_id": "r1", "response_status": "queued",
      "request": {"background": True}}, "POST", "/v1/responses?t=x", Decision(False, "r1")),
    ({"api": "responses", "response_id": "r1", "response_status": "completed",
      "request": {"background": True}}, "POST", "/v1/responses", Decision(None, "r1")),
    ({"api": "responses", "status": 400, "request": {"background": True}}, "POST",
     "/v1/responses", Decision(True, None)),  # a failed create is a call that failed
    ({"api": "responses", "response_id": "r1", "response_status": "in_progress"}, "GET",
     "/v1/responses/r1", Decision(False, "r1")),
    ({"api": "responses", "response_id": "r1", "response_status": "cancelled"}, "GET",
     "/v1/responses/r1?stream=true&starting_after=3", Decision(None, "r1")),
    ({"api": "responses", "status": 404}, "GET", "/v1/responses/r9", Decision(False, "r9")),
    ({"api": "responses"}, "DELETE", "/v1/responses/r1", Decision(False, "r1")),
    ({"api": "unknown"}, "POST", "/v1/responses/r1/cancel", Decision(False, "r1")),
    ({"api": "unknown"}, "GET", "/v1/responses/r1/input_items", Decision(False, "r1")),
    ({"api": "responses", "status": 101}, "GET", "/v1/responses", Decision(False, None)),
    ({"api": "messages.batches.results", "status": 200, "error": None}, "GET",
     "/v1/messages/batches/b1/results", Decision(None, "b1")),
    ({"api": "messages.batches.results", "status": 200, "error": "llmtap: cut"}, "GET",
     "/v1/messages/batches/b1/results", Decision(False, "b1")),
    ({"api": "messages.batches"}, "GET", "/v1/messages/batches/b1", Decision(False, None)),
    ({"api": "messages.batches"}, "POST", "/v1/messages/batches", Decision(False, None)),
    ({"api": "models"}, "GET", "/v1/models", Decision(False, None)),
    ({"api": "messages.count_tokens"}, "POST", "/v1/messages/count_tokens", Decision(False, None)),
    ({"api": "countTokens"}, "POST", "/v1beta/models/g:countTokens", Decision(False, None)),
    ({"api": "responses.input_tokens"}, "POST", "/v1/responses/input_tokens",
     Decision(False, None)),
    ({"api": "count-tokens"}, "POST", "/model/anthropic.claude-sonnet-4-5/count-tokens",
     Decision(False, None)),  # Bedrock's
    ({"api": "converse"}, "POST", "/model/anthropic.claude-sonnet-4-5/converse", Decision(True)),
    ({"api": "unknown"}, "GET", "/v1/files/file-1/content", Decision(False, None)),
    ({"api": "unknown"}, "POST", "/v1/batches", Decision(False, None)),
    ({"api": "unknown"}, "GET", "/v1/chat/completions/chatcmpl-1", Decision(False, None)),
    ({"api": "unknown"}, "POST", "/v1/audio/transcriptions", Decision(True)),  # unread, a call
    ({"api": "messages", "response_id": "msg_1"}, "POST", "/v1/messages", Decision(True)),
    ({"api": "chat.completions"}, "POST", "/v1/chat/completions", Decision(True)),
])
def test_decisions(record: dict[str, Any], method: str, path: str, expected: Decision) -> None:
    status = record.pop("status", 200)
    decision = decide(record, method, path, status=status, upgrade=status == 101)
    assert (decision.counted, decision.key) == (expected.counted, expected.key)
    assert (decision.why is not None) == (decision.counted is not True)


def test_each_response_on_a_websocket_is_a_call_and_the_upgrade_is_not() -> None:
    record = {"api": "responses", "response_id": "r1"}
    assert decide(record, "GET", "/v1/responses", upgrade=True, ws_exchange=True) == \
        Decision(True, "r1")
    assert decide(record, "GET", "/v1/responses", upgrade=True).counted is False
    assert decide({"api": "responses"}, "GET", "/v1/responses", status=401,
                  upgrade=True).counted is False  # a failed upgrade


def test_billed_ids_are_bounded_and_asked_of_the_index_once_forgotten() -> None:
    asked: list[str] = []
    billed = BilledIds(lookup=lambda key: asked.append(key) or key == "old", remembered=3)
    for key in ("a", "b", "c", "d"):
        billed.add(key)
    assert len(billed._ids) == 3 and billed.billed("d") and asked == []
    assert not billed.billed("a") and asked == ["a"]  # forgotten: asked, not billed there
    assert billed.billed("old") and billed.billed("old") and asked == ["a", "old"]  # remembered


# --- through the addons ---------------------------------------------------------------------


def test_a_background_response_polled_then_retrieved_is_counted_once() -> None:
    addons = pipeline()
    with run_addons(*addons):
        created = held(addons, "POST", "/v1/responses", stored("queued"),
                       {"model": "gpt-4.1-mini", "input": "Hi", "background": True})
        polled = held(addons, "GET", f"/v1/responses/{RESP}", stored("in_progress"))
        done = held(addons, "GET", f"/v1/responses/{RESP}", stored("completed"))
        again = [held(addons, "GET", f"/v1/responses/{RESP}", stored("completed"))
                 for _ in range(2)]
        resumed = streamed(addons, f"/v1/responses/{RESP}?stream=true&starting_after=0",
                           streams.load("openai_responses_stream.sse").replace(
                               b"resp_67ccd2bed1ec8190b14f964abc0542670bb6a6b452d3795b",
                               RESP.encode()))
    assert created["request"]["background"] is True and created["response_status"] == "queued"
    assert done["counted"] is True and done["billed_id"] == RESP
    assert done["cost_usd"] == pytest.approx(GPT41_MINI) and done["error"] is None
    for record in (created, polled, *again, resumed):
        assert record["counted"] is False and record["repeat_of"] == RESP
        assert record["cost_usd"] == 0.0 and "billed_id" not in record
        assert any(n.startswith("not counted: ") for n in record["notes"])
    assert resumed["usage"]["output_tokens"] == 612  # what it says stays recorded


def test_a_sync_create_bills_its_id_so_a_later_retrieval_repeats_it() -> None:
    addons = pipeline()
    body = streams.load("openai_responses.json")
    with run_addons(*addons):
        created = held(addons, "POST", "/v1/responses", body, {"model": "gpt-4.1-mini"})
        again = held(addons, "POST", "/v1/responses", body, {"model": "gpt-4.1-mini"})
        rid = created["response_id"]
        retrieved = held(addons, "GET", f"/v1/responses/{rid}", body)
        deleted = held(addons, "DELETE", f"/v1/responses/{rid}",
                       json.dumps({"id": rid, "object": "response", "deleted": True}).encode())
    assert created["counted"] is True and created["cost_usd"] == pytest.approx(GPT41_MINI)
    assert again["counted"] is True  # a create is a call, whatever id the upstream gives back
    assert (retrieved["counted"], retrieved["repeat_of"], retrieved["cost_usd"]) == (False, rid, 0.0)
    assert (deleted["counted"], deleted["repeat_of"]) == (False, rid)


def test_batch_results_are_billed_at_the_first_complete_download() -> None:
    addons = pipeline()
    body = streams.load("anthropic_batch_results.jsonl")
    binary = {"content-type": "application/binary"}
    path = "/v1/messages/batches/msgbatch_1/results"
    with run_addons(*addons):
        cut = held(addons, "GET", path, body[:-40], host="api.anthropic.com", content_type=binary)
        first = held(addons, "GET", path, body, host="api.anthropic.com", content_type=binary)
        second = held(addons, "GET", path, body, host="api.anthropic.com", content_type=binary)
        polled = held(addons, "GET", "/v1/messages/batches/msgbatch_1",
                      streams.load("anthropic_batch.json"), host="api.anthropic.com")
    assert cut["error"] and (cut["counted"], cut["repeat_of"]) == (False, "msgbatch_1")
    assert first["counted"] is True and first["billed_id"] == "msgbatch_1"
    assert first["batch_pricing"] is True and first["usage"]["output_tokens"] == 46
    assert first["cost_usd"] and first["cost_usd"] > 0
    assert (second["counted"], second["repeat_of"], second["cost_usd"]) == (False, "msgbatch_1", 0.0)
    assert polled["counted"] is False and "repeat_of" not in polled


def test_the_websocket_upgrade_is_no_call_and_each_response_on_it_is_one() -> None:
    protocols, counting, pricing, collector = Protocols(), Counting(), Pricing(), Collector()
    upgrade = asyncio.run(websocket_session(protocols, counting, pricing, collector))
    with run_addons(counting):
        counting.response(upgrade)
    assert fields(upgrade)["counted"] is False and "repeat_of" not in fields(upgrade)
    records = [fields(f) for f in collector.flows]
    assert [r["counted"] for r in records] == [True, True, True]  # the third was cut: still a call
    assert records[0]["cost_usd"] and records[0]["cost_usd"] > 0


def test_a_websocket_exchange_sheds_what_it_took_from_its_upgrade() -> None:
    record = {"counted": False, "notes": ["kept", "not counted: a WebSocket upgrade"],
              "repeat_of": "x"}  # the connection's fields, copied into each exchange's
    Counting().apply(record, Decision(True, "r1"))
    assert record == {"counted": True, "notes": ["kept"], "billed_id": "r1"}


def test_a_failed_upgrade_is_no_call() -> None:
    addons = pipeline()
    protocols, counting, pricing = addons
    flow = request_flow(OPENAI, "/v1/responses", method="GET",
                        headers={"upgrade": "websocket", "connection": "Upgrade"})
    body = b'{"error": {"type": "invalid_request_error", "message": "bad key"}}'
    with run_addons(*addons):
        protocols.request(flow)
        response_headers(flow, 401, JSON, size=len(body))
        protocols.responseheaders(flow)
        flow.response.raw_content = body
        protocols.response(flow)
        counting.response(flow)
        counting.error(flow)  # a later hook for the same flow changes nothing
        pricing.response(flow)
    record = fields(flow)
    assert record["counted"] is False and record["error"] and record["cost_usd"] == 0.0
    assert len(record["notes"]) == 1


# --- across a restart, and in the history ---------------------------------------------------


def write(records_dir: Path, *records: dict[str, Any]) -> None:
    writer = RecordWriter(records_dir)
    for record in records:
        writer.submit(record)
    writer.close()


def test_a_retrieval_after_a_restart_is_still_a_repeat(tmp_path: Path) -> None:
    records_dir = tmp_path / "records"
    records_dir.mkdir()
    lookup = BilledLookup(index_path(records_dir))
    assert lookup("resp_x") is False  # no index yet: nothing billed
    addons = pipeline(BilledIds(lookup))
    with run_addons(*addons):
        done = held(addons, "GET", f"/v1/responses/{RESP}", stored("completed"))
    write(records_dir, {"id": "rec1", "started_at": "2026-01-01T00:00:00Z", **done})
    after_restart = pipeline(BilledIds(BilledLookup(index_path(records_dir))))
    with run_addons(*after_restart):
        again = held(after_restart, "GET", f"/v1/responses/{RESP}", stored("completed"))
        other = held(after_restart, "GET", "/v1/responses/resp_other",
                     stored("completed", "resp_other"))
    assert done["counted"] is True
    assert (again["counted"], again["repeat_of"]) == (False, RESP)
    assert other["counted"] is True


def record(n: int, model: str | None, cost: float | None, counted: bool = True,
           tokens: int | None = 100, **more: Any) -> dict[str, Any]:
    started = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=30 - n)
    return {"id": f"rec{n:04d}", "started_at": started.isoformat(), "host": OPENAI,
            "path": "/v1/responses", "status": 200, "model": model, "cost_usd": cost,
            "usage": {"input_tokens": tokens, "output_tokens": tokens}, "counted": counted,
            **more}


def test_history_counts_only_counted_calls_and_lists_the_unpriced(tmp_path: Path) -> None:
    records_dir = tmp_path / "records"
    records_dir.mkdir()
    write(records_dir,
          record(1, "gpt-4.1-mini", 0.01, billed_id="r1"),
          record(2, "gpt-4.1-mini", 0.0, counted=False, repeat_of="r1"),
          record(3, "gpt-4.1-mini", 0.0, counted=False, repeat_of="r1"),
          record(4, "mystery-1", None),
          record(5, "mystery-1", None),
          record(6, None, None),  # tokens, no model named: unpriced too
          record(7, "gpt-4.1-mini", None, tokens=None),  # a failed call: no tokens, not unpriced
          record(8, None, 0.0, counted=False, tokens=None))  # an upgrade
    for index in (Index.open_reader(records_dir), Index.in_memory(records_dir)):
        [gpt, mystery, unnamed] = sorted(index.stats("model"), key=lambda g: g["key"] or "~")
        assert (gpt["key"], gpt["calls"], gpt["cost_usd"], gpt["unpriced"]) == (
            "gpt-4.1-mini", 2, 0.01, 0)
        assert gpt["input_tokens"] == 100  # the repeats' tokens are not added
        assert (mystery["calls"], mystery["unpriced"], unnamed["unpriced"]) == (2, 2, 1)
        totals = index.totals()
        assert (totals["calls"], totals["cost_usd"], totals["unpriced"]) == (5, 0.01, 3)
        assert [(u["model"], u["host"], u["calls"]) for u in index.unpriced()] == [
            ("mystery-1", OPENAI, 2)]  # per model: the one with no model name is no model
        assert index.not_counted() == 3
        assert len(index.calls()) == 8 and len(index.calls(counted_only=True)) == 5
        assert [r["model"] for r in index.latest_per_model()] == ["gpt-4.1-mini", "mystery-1"]
        assert index.calls()[1]["repeat_of"] == "r1" and index.calls()[0]["billed_id"] == "r1"


def test_an_index_from_before_counting_gains_its_columns(tmp_path: Path) -> None:
    records_dir = tmp_path / "records"
    records_dir.mkdir()
    write(records_dir, record(1, "gpt-4.1-mini", 0.01))
    path = index_path(records_dir)
    conn = sqlite3.connect(path)
    old = [name for name, _ in COLUMNS if name not in ("counted", "billed_id", "repeat_of")]
    conn.executescript(f"DROP TABLE calls; CREATE TABLE calls ({', '.join(old)});"
                       f"INSERT INTO calls (id, model, cost_usd) VALUES ('old1', 'gpt-4o', 0.5)")
    conn.close()
    reader = Index.open_reader(records_dir)  # an older index: read from the files meanwhile
    assert reader.source == "files" and reader.totals()["calls"] == 1
    writer = Index.open_writer(path)  # the daemon's writer brings it up to date, rows kept
    writer.add([])
    writer.close()
    reader = Index.open_reader(records_dir)
    assert reader.source == "index" and reader.totals()["calls"] == 1  # counted: NULL counts
    assert BilledLookup(path)("r1") is False


def test_stats_command_says_what_is_unpriced_and_not_counted(tmp_path: Path, capsys) -> None:
    from cli_runs import run_cli, write_config

    records_dir = tmp_path / "records"
    records_dir.mkdir()
    write(records_dir, record(1, "gpt-4.1-mini", 0.01, billed_id="r1"),
          record(2, "gpt-4.1-mini", 0.0, counted=False, repeat_of="r1"),
          record(3, "mystery-1", None))
    config = str(write_config(tmp_path, records_dir))
    code, out, _ = run_cli(capsys, "stats", "--config", config)
    assert code == 0
    assert "* unpriced: 1 call (models: mystery-1 (1)): tokens used, no price known" in out
    assert "not counted: 1 record (retrievals, polls, repeat downloads" in out
    code, out, _ = run_cli(capsys, "logs", "--config", config)
    assert "(not counted: repeat of r1)" in out.splitlines()[1]

