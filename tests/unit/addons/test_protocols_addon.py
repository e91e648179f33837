"""The protocols and pricing addons alone, with mitmproxy's test helpers and the fixture streams."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
from pathlib import Path
from typing import Any

import pytest
import streams
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from llmtap.addons import pipeline
from llmtap.addons.exchange import BodyStream
from llmtap.addons.pricing import Pricing
from llmtap.addons.protocols import Protocols
from llmtap.addons.streams import Streams, layer_of
from llmtap.flow import WS_EXCHANGE, fields
from llmtap.parsers import ResponseParser
from llmtap.proxy import ProxySettings, build_master
from mitmproxy import http
from mitmproxy.test import taddons, tflow
from parser_helpers import cuts_for, split, stable

T0 = 1_700_000_000.0
SSE = {"content-type": "text/event-stream"}
JSON = {"content-type": "application/json"}


def request_flow(host: str, path: str, body: Any = None, method: str = "POST",
                 headers: dict[str, str] | None = None) -> http.HTTPFlow:
    flow = tflow.tflow()
    raw = body if isinstance(body, bytes) else (json.dumps(body).encode() if body is not None else b"")
    flow.request = http.Request.make(method, f"https://{host}{path}", raw, headers or JSON)
    flow.request.timestamp_start = T0
    flow.response = None
    return flow


def response_headers(flow: http.HTTPFlow, status: int, headers: dict[str, str],
                     size: int | None = None) -> None:
    flow.response = http.Response.make(status, b"", headers)
    del flow.response.headers["content-length"]
    if size is not None:
        flow.response.headers["content-length"] = str(size)
    flow.response.timestamp_start = T0 + 0.1


def stream_headers(protocols: Protocols, flow: http.HTTPFlow) -> None:
    """responseheaders, then the streams stage's (which puts the stage's layer in place)."""
    protocols.responseheaders(flow)
    Streams(response=(protocols,)).responseheaders(flow)


def relay(protocols: Protocols, flow: http.HTTPFlow, chunks: list[bytes]) -> bytes:
    """What the client receives through the stream callable; every piece comes back at once."""
    assert callable(flow.response.stream)
    out = b""
    for chunk in chunks:
        pieces = list(flow.response.stream(chunk))
        assert b"" not in pieces  # an empty piece would end an HTTP/1 chunked body
        out += b"".join(pieces)
    out += b"".join(flow.response.stream(b""))
    flow.response.timestamp_end = T0 + 1
    protocols.response(flow)
    return out


def run_addons(*addons: Any) -> taddons.context:
    return taddons.context(*addons)


def test_sse_passes_through_unchanged_and_is_parsed():
    protocols, pricing = Protocols(), Pricing()
    body = streams.anthropic_messages_stream()
    flow = request_flow("api.anthropic.com", "/v1/messages",
                        {"model": "claude-sonnet-4-5", "stream": True, "max_tokens": 64,
                         "system": "be brief", "messages": []})
    with run_addons(protocols, pricing):
        protocols.request(flow)
        response_headers(flow, 200, SSE)
        stream_headers(protocols, flow)
        assert relay(protocols, flow, split(body, range(7, len(body), 13))) == body
        pricing.response(flow)
    record = fields(flow)
    assert (record["provider"], record["api"], record["model"]) == (
        "anthropic", "messages", "claude-sonnet-4-5-20250929")
    assert record["stream"] is True and record["error"] is None
    assert record["usage"]["cache_read_tokens"] == 10240
    assert record["request"]["max_tokens"] == 64 and len(record["request"]["system_sha256"]) == 64
    assert record["chunks"] == len(record["timeline"]) > 100
    assert record["ttft_ms"] is not None and record["cost_usd"] > 0
    assert record["price"]["row"] == "anthropic/claude-sonnet-4-5"


def test_chat_stream_gets_usage_the_client_does_not_see():
    protocols = Protocols()
    flow = request_flow("api.openai.com", "/v1/chat/completions",
                        b'{"model": "gpt-4o", "stream": true, "messages": []}')
    with run_addons(protocols):
        protocols.request(flow)
        sent = json.loads(flow.request.content)
        assert sent["stream_options"] == {"include_usage": True}
        assert flow.request.headers["accept-encoding"] == "identity"
        assert flow.request.headers["content-length"] == str(len(flow.request.content))
        response_headers(flow, 200, SSE)
        stream_headers(protocols, flow)
        body = streams.openai_chat_stream()
        assert relay(protocols, flow, split(body, range(5, len(body), 11))) == (
            streams.openai_chat_stream_stripped())
    record = fields(flow)
    assert record["usage"]["input_tokens"] == 1234 - 1024
    assert record["usage"]["cache_read_tokens"] == 1024 and record["error"] is None
    assert record["request"]["include_usage"] is False  # what the client asked for


def test_client_asking_for_usage_sees_it():
    protocols = Protocols()
    flow = request_flow("api.openai.com", "/v1/chat/completions",
                        {"model": "gpt-4o", "stream": True,
                         "stream_options": {"include_usage": True}, "messages": []})
    original = flow.request.content
    with run_addons(protocols):
        protocols.request(flow)
        assert flow.request.content == original
        response_headers(flow, 200, SSE)
        stream_headers(protocols, flow)
        body = streams.openai_chat_stream()
        assert relay(protocols, flow, [body]) == body


def test_compressed_stream_is_not_stripped_but_parsed():
    protocols = Protocols()
    flow = request_flow("api.openai.com", "/v1/chat/completions",
                        {"model": "gpt-4o", "stream": True, "messages": []})
    with run_addons(protocols):
        protocols.request(flow)
        response_headers(flow, 200, {**SSE, "content-encoding": "gzip"})
        stream_headers(protocols, flow)
        body = gzip.compress(streams.openai_chat_stream())
        assert relay(protocols, flow, split(body, [10, 100, 300])) == body
    record = fields(flow)
    assert record["usage"]["output_tokens"] == 56 and record["error"] is None
    assert record["notes"] == ["usage chunk not stripped: the upstream sent an encoded or sized stream"]


def test_sized_json_is_held_by_mitmproxy_and_parsed_from_raw_bytes():
    protocols, pricing = Protocols(), Pricing()
    body = streams.anthropic_message()
    flow = request_flow("api.anthropic.com", "/v1/messages", {"model": "claude-haiku-4-5"})
    with run_addons(protocols, pricing):
        protocols.request(flow)
        response_headers(flow, 200, JSON, size=len(body))
        stream_headers(protocols, flow)
        assert not flow.response.stream
        flow.response.raw_content = body
        flow.response.timestamp_end = T0 + 0.5
        protocols.response(flow)
        pricing.response(flow)
    record = fields(flow)
    assert record["stream"] is False and record["stop_reason"] == "tool_use"
    assert record["usage"] == {"input_tokens": 2095, "output_tokens": 503, "cache_read_tokens": 3000,
                               "cache_write_5m_tokens": 0, "cache_write_1h_tokens": 1000,
                               "reasoning_tokens": None}
    # claude-haiku-4-5: 1/5/0.10/1.25/2 per 1M
    assert record["cost_usd"] == pytest.approx((2095 * 1 + 503 * 5 + 3000 * 0.1 + 1000 * 2) / 1e6)
    assert record["tool_calls"] == ["get_weather"]


def test_unknown_size_json_is_streamed():
    protocols = Protocols()
    body = streams.openai_chat()
    flow = request_flow("api.openai.com", "/v1/chat/completions", {"model": "gpt-4.1"})
    with run_addons(protocols):
        protocols.request(flow)
        response_headers(flow, 200, JSON)  # no content-length: an HTTP/2 reply, say
        stream_headers(protocols, flow)
        assert relay(protocols, flow, split(body, [100])) == body
    record = fields(flow)
    assert record["usage"]["output_tokens"] == 10 and record["error"] is None
    assert record["stream"] is False and record["ttft_ms"] is not None


def test_large_body_is_streamed_and_parsed_best_effort():
    protocols = Protocols()
    flow = request_flow("api.openai.com", "/v1/chat/completions", {"model": "gpt-4.1"})
    with run_addons(protocols):
        protocols.request(flow)
        response_headers(flow, 200, JSON, size=12 * 2**20)
        flow.response.stream = True  # what mitmproxy does past stream_large_bodies
        stream_headers(protocols, flow)
        head = b'{"object": "chat.completion", "model": "gpt-4.1", "choices": [{"message": {"content": "'
        tail = b'"}}], "usage": {"prompt_tokens": 7, "completion_tokens": 3000000}}'
        body = head + b"x" * (12 * 2**20 - len(head) - len(tail)) + tail
        assert relay(protocols, flow, split(body, range(0, len(body), 2**20))) == body
    record = fields(flow)
    assert record["usage"]["output_tokens"] == 3_000_000 and record["model"] == "gpt-4.1"
    assert record["error"] == "llmtap: body over 8388608 bytes: parsed best-effort"


def test_a_crashing_parser_never_stops_the_bytes(monkeypatch):
    protocols = Protocols()
    flow = request_flow("api.anthropic.com", "/v1/messages", {"model": "m", "stream": True})
    body = streams.anthropic_messages_stream()

    def explode(self: ResponseParser, chunk: bytes, now: float) -> None:
        raise RuntimeError("boom")

    with run_addons(protocols):
        protocols.request(flow)
        response_headers(flow, 200, SSE)
        stream_headers(protocols, flow)
        monkeypatch.setattr(ResponseParser, "feed", explode)
        client = b"".join(b"".join(flow.response.stream(c)) for c in split(body, [50, 900]))
        monkeypatch.undo()
        assert client + relay(protocols, flow, []) == body
    assert "parser crashed: RuntimeError: boom" in fields(flow)["error"]


def test_a_crashing_stripper_gives_up_stripping_not_bytes(monkeypatch):
    protocols = Protocols()
    flow = request_flow("api.openai.com", "/v1/chat/completions",
                        {"model": "gpt-4o", "stream": True, "messages": []})
    body = streams.openai_chat_stream()
    with run_addons(protocols):
        protocols.request(flow)
        response_headers(flow, 200, SSE)
        stream_headers(protocols, flow)
        body_stream = layer_of(flow.response.stream, BodyStream)
        assert body_stream is not None
        stripper = body_stream.stripper
        first = b"".join(flow.response.stream(body[:500]))
        monkeypatch.setattr(stripper, "_events", lambda out: 1 / 0)
        rest = relay(protocols, flow, [body[500:]])
    assert first + rest == body  # nothing lost, nothing stripped after the failure
    assert fields(flow)["usage"]["output_tokens"] == 56


def test_truncated_stream_and_connection_error_are_recorded():
    protocols, pricing = Protocols(), Pricing()
    flow = request_flow("api.anthropic.com", "/v1/messages", {"model": "claude-sonnet-4-5", "stream": True})
    body = streams.anthropic_messages_stream()
    with run_addons(protocols, pricing):
        protocols.request(flow)
        response_headers(flow, 200, SSE)
        stream_headers(protocols, flow)
        flow.response.stream(body[:1200])
        flow.error = tflow.terr("peer closed connection")
        protocols.error(flow)
        pricing.error(flow)
    record = fields(flow)
    assert record["error"] == "peer closed connection; llmtap: stream ended inside an SSE event"
    assert record["usage"]["input_tokens"] == 472  # what message_start said
    assert record["cost_usd"] is not None


def test_no_response_at_all():
    protocols, pricing = Protocols(), Pricing()
    flow = request_flow("api.openai.com", "/v1/responses", {"model": "gpt-5", "stream": True})
    with run_addons(protocols, pricing):
        protocols.request(flow)
        flow.error = tflow.terr("connection refused")
        protocols.error(flow)
        pricing.error(flow)
    record = fields(flow)
    assert (record["api"], record["model"], record["stream"]) == ("responses", "gpt-5", True)
    assert record["error"] == "connection refused"
    assert record["cost_usd"] is None and record["usage"]["input_tokens"] is None


def test_errors_keep_rate_limit_headers():
    protocols = Protocols()
    body = streams.load("openai_error_429.json")
    flow = request_flow("api.openai.com", "/v1/chat/completions", {"model": "gpt-4o"})
    with run_addons(protocols):
        protocols.request(flow)
        response_headers(flow, 429, {**JSON, "retry-after": "2", "x-ratelimit-remaining-tokens": "0",
                                     "x-request-id": "req_1", "set-cookie": "secret"}, size=len(body))
        stream_headers(protocols, flow)
        flow.response.raw_content = body
        protocols.response(flow)
    record = fields(flow)
    assert record["error"].startswith("tokens: Rate limit reached for gpt-4o")
    assert record["rate_limit"] == {"retry-after": "2", "x-ratelimit-remaining-tokens": "0"}
    assert record["request_id"] == "req_1" and record["ttft_ms"] is None


def test_unknown_path_and_invalid_request():
    protocols, pricing = Protocols(), Pricing()
    unknown = request_flow("api.openai.com", "/v1/files", b"x", method="GET")
    broken = request_flow("api.anthropic.com", "/v1/messages", b'{"model": "claude')
    with run_addons(protocols, pricing):
        for flow in (unknown, broken):
            protocols.request(flow)
            response_headers(flow, 200, JSON, size=2)
            stream_headers(protocols, flow)
            flow.response.raw_content = b"{}"
            protocols.response(flow)
            pricing.response(flow)
    assert (fields(unknown)["api"], fields(unknown)["error"], fields(unknown)["cost_usd"]) == (
        "unknown", None, None)
    assert "request not understood" in fields(broken)["error"]


def test_large_request_is_read_from_its_ends():
    protocols = Protocols()
    body = b'{"model": "claude-opus-4-1", "stream": true, "messages": [' + b" " * 300_000 + b"]}"
    flow = request_flow("api.anthropic.com", "/v1/messages", body)
    flow.request.stream = True  # mitmproxy streams bodies past stream_large_bodies
    with run_addons(protocols):
        protocols.requestheaders(flow)
        Streams(request=(protocols,)).requestheaders(flow)
        for chunk in split(body, range(0, len(body), 65536)):
            assert flow.request.stream(chunk) == [chunk]
        flow.request.raw_content = None
        protocols.request(flow)
        response_headers(flow, 200, SSE)
        stream_headers(protocols, flow)
        relay(protocols, flow, [streams.anthropic_overloaded_stream()])
    record = fields(flow)
    assert record["request"] is not None and record["stream"] is True
    assert "read best-effort" in record["error"] and "overloaded_error" in record["error"]


class Collector:
    """Stands for the recorder: every flow whose `response` the pipeline sees."""

    def __init__(self) -> None:
        self.flows: list[http.HTTPFlow] = []

    def response(self, flow: http.HTTPFlow) -> None:
        self.flows.append(flow)


def ws_message(flow: http.HTTPFlow, content: bytes, from_client: bool, at: float) -> None:
    from mitmproxy.websocket import WebSocketMessage

    flow.websocket.messages.append(WebSocketMessage(1, from_client, content, at))


async def websocket_session(*addons: Any) -> http.HTTPFlow:
    """Two responses on one connection, then a third cut short by the close."""
    protocols = addons[0]
    with taddons.context(*addons):
        flow = tflow.twebsocketflow(messages=False)
        flow.request.host = "api.openai.com"
        flow.request.path = "/v1/responses"
        fields(flow)["credential"] = "openai"  # known of the connection by an earlier addon
        protocols.request(flow)
        protocols.response(flow)
        assert fields(flow)["api"] == "responses" and fields(flow)["transport"] == "websocket"
        for turn in range(2):
            at = T0 + 10 * turn
            ws_message(flow, streams.openai_responses_ws_create(), True, at)
            await protocols.websocket_message(flow)
            for i, line in enumerate(streams.openai_responses_ws_messages()):
                ws_message(flow, line, False, at + 0.1 * (i + 1))
                await protocols.websocket_message(flow)
        ws_message(flow, streams.openai_responses_ws_create(), True, T0 + 30)
        await protocols.websocket_message(flow)
        await protocols.websocket_end(flow)
    return flow


def test_responses_websocket_gives_one_record_per_response():
    protocols, pricing, collector = Protocols(), Pricing(), Collector()
    flow = asyncio.run(websocket_session(protocols, pricing, collector))
    assert len(collector.flows) == 3
    first, second, cut = (fields(f) for f in collector.flows)
    for record in (first, second):
        assert record["model"] == "gpt-5-2025-08-07" and record["error"] is None
        assert record["usage"] == {"input_tokens": 425, "output_tokens": 612, "cache_read_tokens": 1920,
                                   "cache_write_5m_tokens": 0, "cache_write_1h_tokens": 0,
                                   "reasoning_tokens": 448}
        assert record["cost_usd"] == pytest.approx((425 * 1.25 + 612 * 10 + 1920 * 0.125) / 1e6)
        assert record["request"]["reasoning_effort"] == "medium"
        assert record["credential"] == "openai" and record["stream"] is True
    assert [first["websocket"]["exchange"], second["websocket"]["exchange"]] == [1, 2]
    assert collector.flows[1].request.timestamp_start == T0 + 10
    assert "WebSocket closed before response.completed" in cut["error"]
    assert all(f.metadata[WS_EXCHANGE] == flow.id and f.id != flow.id for f in collector.flows)
    first_flow = collector.flows[0]
    assert first_flow.request.content == streams.openai_responses_ws_create()
    assert first_flow.response.content.split(b"\n") == streams.openai_responses_ws_messages()
    # The connection keeps no finished exchange: the last completed and the open third's create.
    assert [json.loads(m.content)["type"] for m in flow.websocket.messages] == [
        "response.completed", "response.create"]


def test_pricing_uses_and_reloads_the_override(tmp_path: Path):
    pricing = Pricing()
    flow = tflow.tflow(resp=True)
    fields(flow).update(model="fake-model-x", usage={"input_tokens": 1_000_000, "output_tokens": 0})
    with taddons.context(pricing) as tctx:
        tctx.configure(pricing, llmtap_state_dir=str(tmp_path))
        pricing.response(flow)
        assert (fields(flow)["cost_usd"], fields(flow)["price"]) == (None, None)
        litellm = tmp_path / "litellm.json"
        litellm.write_text(json.dumps({"fake-model-x": {
            "litellm_provider": "openai", "mode": "chat",
            "input_cost_per_token": 1.1e-06, "output_cost_per_token": 2e-06}}))
        from llmtap.price_override import import_litellm, save_table

        save_table(import_litellm(litellm), tmp_path / "prices.json")
        pricing._checked = 0
        pricing.response(flow)
        assert fields(flow)["cost_usd"] == 1.1
        assert fields(flow)["price"] == {"source": "override", "row": "fake-model-x",
                                         "version": "litellm:litellm.json"}
        (tmp_path / "prices.json").write_text("{broken")
        os.utime(tmp_path / "prices.json", ns=(1, 1))
        pricing._checked = 0
        pricing.response(flow)  # a broken override is ignored, never fatal
        assert fields(flow)["cost_usd"] is None


def test_pricing_fetches_prices_itself_when_asked_and_uses_them(tmp_path: Path):
    data = tmp_path / "data.json"
    data.write_text(json.dumps([{
        "id": "openai", "name": "OpenAI", "api_pattern": "https://api\\.openai\\.com",
        "models": [{"id": "gpt-mystery", "match": {"equals": "gpt-mystery"},
                    "prices": {"input_mtok": 7, "output_mtok": 9}}]}]))
    config = tmp_path / "config.toml"
    config.write_text(f'[prices]\nupdate_hours = 24\nurl = "{data.as_uri()}"\n')
    flow = tflow.tflow(resp=True)
    flow.request.host = "api.openai.com"
    fields(flow).update(model="gpt-mystery", usage={"input_tokens": 1_000_000, "output_tokens": 0})

    async def run(pricing: Pricing) -> None:
        pricing.running()
        for _ in range(100):  # the first fetch runs at once, on a thread
            await asyncio.sleep(0.05)
            if (tmp_path / "genai-prices.json").exists():
                break
        pricing._checked = 0
        pricing.response(flow)
        pricing.done()

    pricing = Pricing()
    with taddons.context(pricing) as tctx:
        tctx.configure(pricing, llmtap_state_dir=str(tmp_path), llmtap_config_file=str(config))
        asyncio.run(run(pricing))
    assert fields(flow)["cost_usd"] == 7.0
    assert fields(flow)["price"]["version"].startswith("fetched ")


def test_bare_mitmproxy_has_no_pipeline(tmp_path: Path):
    settings = ProxySettings(proxy_port=18443, confdir=tmp_path, upstream_ca_bundle=tmp_path / "ca.pem",
                             targets=("api.openai.com",), records_dir=None)

    async def build() -> list[str]:
        master = build_master(settings, with_pipeline=False)
        return [type(a).__name__ for a in master.addons.chain]

    names = asyncio.run(build())
    assert "Protocols" not in names and "Pricing" not in names
    names = [type(a).__name__ for a in pipeline()]
    assert names.index("Pricing") == names.index("Counting") + 1 == names.index("Protocols") + 2


def test_client_hanging_up_after_the_last_event_is_no_error():
    protocols = Protocols()
    flow = request_flow("api.openai.com", "/v1/chat/completions",
                        {"model": "gpt-4o", "stream": True, "messages": []})
    with run_addons(protocols):
        protocols.request(flow)
        response_headers(flow, 200, SSE)
        stream_headers(protocols, flow)
        flow.response.stream(streams.openai_chat_stream())  # [DONE] seen, end of body not yet
        flow.error = tflow.terr("Client disconnected.")
        protocols.error(flow)
    record = fields(flow)
    assert record["error"] is None and record["usage"]["output_tokens"] == 56
    assert record["notes"] == ["Client disconnected. (after the complete response)"]


@pytest.mark.parametrize(("fixture", "provider", "output_tokens"), [
    ("gemini_compat_chat_stream.sse", "google", 397),
    ("anthropic_compat_chat_stream.sse", "anthropic", 12),
    ("groq_chat_stream.sse", "groq", 15),
    ("openrouter_chat_stream.sse", "openrouter", 310),
    ("deepseek_chat_stream.sse", "deepseek", 420),
    ("mistral_chat_stream.sse", "mistral", 9),
])
def test_compat_stream_hung_up_after_done_is_no_error(fixture: str, provider: str,
                                                       output_tokens: int):
    """A compatible endpoint's stream is read as Chat Completions under its host's provider: the
    SDK hanging up after `data: [DONE]` is a note, as on OpenAI (it used to be an error)."""
    known = streams.FIXTURES[fixture]
    protocols = Protocols()
    flow = request_flow(known.host, known.path, {"model": "m", "stream": True, "messages": []})
    with run_addons(protocols):
        protocols.request(flow)
        response_headers(flow, 200, SSE)
        stream_headers(protocols, flow)
        out = b"".join(flow.response.stream(known.body))
        flow.error = tflow.terr("Client disconnected.")
        protocols.error(flow)
    record = fields(flow)
    assert (record["provider"], record["api"], record["error"]) == (provider, "chat.completions", None)
    assert record["usage"]["output_tokens"] == output_tokens
    assert record["notes"] == ["Client disconnected. (after the complete response)"]
    expected = known.body
    if fixture == "anthropic_compat_chat_stream.sse":  # minus the usage-only event llmtap asked for
        expected = b"\n\n".join(e for e in known.body.split(b"\n\n") if b'"choices":[]' not in e)
    assert out == expected


def test_a_large_or_compressed_held_body_is_parsed_off_the_event_loop():
    import fake_providers

    protocols = Protocols()
    flow = request_flow("api.anthropic.com", "/v1/messages", {"model": "claude-sonnet-4-5"})
    bomb = fake_providers.bomb(128 * 2**20)

    async def scenario() -> None:
        with taddons.context(protocols):
            protocols.request(flow)
            response_headers(flow, 200, {**JSON, "content-encoding": "gzip"}, size=len(bomb))
            stream_headers(protocols, flow)
            flow.response.raw_content = bomb
            pending = protocols.response(flow)
            assert pending is not None and not fields(flow)  # nothing parsed on the loop
            ticks = 0

            async def ticker() -> None:
                nonlocal ticks
                while True:
                    ticks += 1
                    await asyncio.sleep(0.001)

            task = asyncio.create_task(ticker())
            await pending
            task.cancel()
            assert ticks > 3  # the loop kept running while the bomb was inflated

    asyncio.run(scenario())
    assert fields(flow)["error"] == "llmtap: decoded body over 67108864 bytes (decompression bomb?)"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_chunking_relays_the_same_bytes_and_records_the_same(data: st.DataObject):
    name = data.draw(st.sampled_from(streams.STREAMED))
    body = streams.load(name)
    cuts = data.draw(cuts_for(body))
    fixture = streams.FIXTURES[name]
    strip = name == "openai_chat_stream.sse"  # the client did not ask for usage: llmtap did
    ask = {"model": "m", "stream": True, "messages": [],
           **({} if strip else {"stream_options": {"include_usage": True}})}
    results = []
    for chunks in ([body], split(body, cuts)):
        protocols = Protocols()
        flow = request_flow(fixture.host, fixture.path, ask)
        with run_addons(protocols):
            protocols.request(flow)
            response_headers(flow, fixture.status, {"content-type": fixture.content_type})
            stream_headers(protocols, flow)
            relayed = relay(protocols, flow, chunks)
        expected = streams.openai_chat_stream_stripped() if strip else body
        assert relayed == expected
        timing = ("ttft_ms", "first_byte_ms", "last_byte_ms")  # wall-clock: differs per run
        results.append({k: v for k, v in stable(fields(flow)).items() if k not in timing})
    assert results[0] == results[1]
